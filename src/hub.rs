//! Where a `--model` lives: a local directory, `builtin:tiny-phi3`, or a Hugging Face Hub id. Hub
//! ids are looked up in the local Hugging Face cache first (`$HF_HUB_CACHE`, else `$HF_HOME/hub`,
//! else `~/.cache/huggingface/hub`: `models--owner--name/snapshots/<revision>/`, the revision from
//! `refs/main`), then downloaded into that same cache with hf-hub (0.4's blocking `ureq` client)
//! unless `HF_HUB_OFFLINE=1`, which never touches the network.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// The Hugging Face settings that matter here.
#[derive(Debug, Clone, PartialEq)]
pub struct HubEnv {
    pub cache: Option<PathBuf>,
    pub offline: bool,
}

impl HubEnv {
    /// From `HF_HUB_CACHE` / `HF_HOME` / `HOME` and `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        let cache = std::env::var_os("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
            });
        let offline = std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"));
        Self { cache, offline }
    }
}

/// Where qlora keeps what it builds itself (the builtin model).
pub fn qlora_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("qlora")
}

/// Resolves `model` to a checkpoint directory with the process's Hugging Face settings.
pub fn resolve(model: &str) -> Result<PathBuf> {
    resolve_with(model, &HubEnv::from_env())
}

/// Whether `model` looks like `owner/name`.
fn is_hub_id(model: &str) -> bool {
    let parts: Vec<&str> = model.split('/').collect();
    parts.len() == 2 && parts.iter().all(|s| !s.is_empty() && !s.starts_with('.'))
}

/// The cached snapshot of `owner/name`, if complete enough to load (config.json present).
pub fn cached_snapshot(cache: &Path, model: &str) -> Option<PathBuf> {
    let (owner, name) = model.split_once('/')?;
    let repo = cache.join(format!("models--{owner}--{name}"));
    let snapshots = repo.join("snapshots");
    let snapshot = match std::fs::read_to_string(repo.join("refs/main")) {
        Ok(rev) => snapshots.join(rev.trim()),
        Err(_) => std::fs::read_dir(&snapshots)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .next()?,
    };
    snapshot.join("config.json").exists().then_some(snapshot)
}

/// [`resolve`] with explicit settings.
pub fn resolve_with(model: &str, env: &HubEnv) -> Result<PathBuf> {
    if model == crate::builtin::TINY_PHI3 {
        let dir = qlora_cache_dir().join("tiny-phi3-v1");
        crate::builtin::materialize(&dir)?;
        return Ok(dir);
    }
    let p = Path::new(model);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if !is_hub_id(model) {
        bail!("`{model}`: no such checkpoint directory, and not a Hub id (owner/name)");
    }
    if let Some(s) = env.cache.as_deref().and_then(|c| cached_snapshot(c, model)) {
        return Ok(s);
    }
    if env.offline {
        bail!(
            "`{model}` is not a directory and not in the Hugging Face cache ({}), and HF_HUB_OFFLINE is set; \
             download it while online or pass a checkpoint directory",
            env.cache
                .as_deref()
                .map_or("unknown".into(), |c| c.display().to_string())
        );
    }
    download(model, env).with_context(|| {
        format!(
            "downloading `{model}` from the Hugging Face Hub (set HF_HUB_OFFLINE=1 to stay offline)"
        )
    })
}

/// Downloads a Phi-3 checkpoint's files into the cache with hf-hub and returns the snapshot dir.
fn download(model: &str, env: &HubEnv) -> Result<PathBuf> {
    let mut builder = hf_hub::api::sync::ApiBuilder::from_env();
    if let Some(c) = &env.cache {
        builder = builder.with_cache_dir(c.clone());
    }
    let repo = builder.build()?.model(model.to_string());
    let config = repo.get("config.json")?;
    for optional in [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
    ] {
        let _ = repo.get(optional);
    }
    match repo.get(crate::checkpoint::INDEX_FILE) {
        Ok(index_path) => {
            let index: crate::checkpoint::ShardIndex =
                serde_json::from_slice(&std::fs::read(&index_path)?)?;
            let mut files: Vec<&String> = index.weight_map.values().collect();
            files.sort();
            files.dedup();
            for f in files {
                repo.get(f)?;
            }
        }
        Err(_) => {
            repo.get(crate::checkpoint::SINGLE_FILE)?;
        }
    }
    Ok(config
        .parent()
        .context("config.json has a parent directory")?
        .to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_come_from_the_cache_and_offline_never_downloads() {
        let tmp = tempfile::tempdir().unwrap();
        let snap = tmp
            .path()
            .join("models--microsoft--Phi-3-mini-4k-instruct/snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        std::fs::write(
            tmp.path()
                .join("models--microsoft--Phi-3-mini-4k-instruct/refs"),
            "",
        )
        .ok();
        let env = HubEnv {
            cache: Some(tmp.path().to_path_buf()),
            offline: true,
        };
        assert_eq!(
            resolve_with("microsoft/Phi-3-mini-4k-instruct", &env).unwrap(),
            snap
        );
        let e = resolve_with("microsoft/Phi-3-medium-4k-instruct", &env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("HF_HUB_OFFLINE") && e.contains("not in the Hugging Face cache"),
            "{e}"
        );
        assert!(
            resolve_with("not-a-dir", &env)
                .unwrap_err()
                .to_string()
                .contains("not a Hub id")
        );
    }
}
