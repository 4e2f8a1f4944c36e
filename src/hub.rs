//! Where a `--model` lives: a local directory, `builtin:tiny-phi3`, or a Hugging Face Hub id found
//! in the local Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`: `models--owner--name/snapshots/<revision>/`, the revision from
//! `refs/main`). Nothing here touches the network.

use anyhow::{Result, bail};
use std::path::{Path, PathBuf};

/// The Hugging Face hub cache directory.
pub fn hf_cache_dir() -> Option<PathBuf> {
    if let Some(c) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(c));
    }
    if let Some(h) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(h).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// Where qlora keeps what it builds itself (the builtin model).
pub fn qlora_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("qlora")
}

/// Resolves `model` to a checkpoint directory.
pub fn resolve(model: &str) -> Result<PathBuf> {
    if model == crate::builtin::TINY_PHI3 {
        let dir = qlora_cache_dir().join("tiny-phi3-v1");
        crate::builtin::materialize(&dir)?;
        return Ok(dir);
    }
    let p = Path::new(model);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    let parts: Vec<&str> = model.split('/').collect();
    if parts.len() == 2 && parts.iter().all(|s| !s.is_empty() && !s.starts_with('.')) {
        if let Some(cache) = hf_cache_dir() {
            let repo = cache.join(format!("models--{}--{}", parts[0], parts[1]));
            let revision = std::fs::read_to_string(repo.join("refs/main")).ok();
            let snapshots = repo.join("snapshots");
            let snapshot = match revision {
                Some(r) => Some(snapshots.join(r.trim())),
                None => std::fs::read_dir(&snapshots)
                    .ok()
                    .and_then(|mut d| d.next())
                    .and_then(|e| e.ok())
                    .map(|e| e.path()),
            };
            if let Some(s) = snapshot.filter(|s| s.join("config.json").exists()) {
                return Ok(s);
            }
            bail!(
                "`{model}` is neither a directory nor in the Hugging Face cache ({}); download it first \
                 (e.g. `huggingface-cli download {model}`) or pass a local checkpoint directory",
                repo.display()
            );
        }
    }
    bail!("`{model}`: no such checkpoint directory (or Hub id in the local Hugging Face cache)")
}
