//! Where a `--model` lives: a local directory, `builtin:tiny-phi3`, or a Hugging Face Hub id
//! (`owner/name`, optionally `owner/name@revision`). Hub ids are looked up in the local Hugging
//! Face cache first (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`:
//! `models--owner--name/snapshots/<commit>/`, the commit from `refs/<revision>`). A snapshot
//! counts only when complete ([`missing_files`]: config, tokenizer, and the single weights file or
//! every shard its index names); otherwise the download ([`download`]) fetches what is missing and
//! resumes what was cut short, unless `HF_HUB_OFFLINE=1`, which never touches the network and says
//! what is missing.

pub mod dataset;
mod download;
mod progress;

use anyhow::{Context, Result, bail};
pub use download::{FilePlan, RepoKind, repo_dir, repo_dir_of, select_files};
use std::path::{Path, PathBuf};

/// The Hugging Face settings that matter here.
#[derive(Debug, Clone, PartialEq)]
pub struct HubEnv {
    pub cache: Option<PathBuf>,
    pub offline: bool,
    /// `HF_ENDPOINT`, default `https://huggingface.co` (no trailing slash).
    pub endpoint: String,
    /// `HF_TOKEN`, else the token file `huggingface-cli login` writes.
    pub token: Option<String>,
    /// Retries of a request after connection errors, timeouts and 5xx (`QLORA_HUB_RETRIES`,
    /// default 5), waiting `backoff_ms` · 2^try.
    pub retries: u32,
    pub backoff_ms: u64,
}

/// `$HF_TOKEN_PATH`, else `$HF_HOME/token`, else `~/.cache/huggingface/token`.
pub fn token_path() -> Option<PathBuf> {
    std::env::var_os("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("token")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/token"))
        })
}

impl HubEnv {
    /// From `HF_HUB_CACHE` / `HF_HOME` / `HOME`, `HF_HUB_OFFLINE`, `HF_ENDPOINT`, `HF_TOKEN` (or
    /// the token file) and `QLORA_HUB_RETRIES`.
    pub fn from_env() -> Self {
        let cache = std::env::var_os("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
            });
        let offline = std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"));
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into())
            .trim_end_matches('/')
            .to_string();
        let token = std::env::var("HF_TOKEN")
            .ok()
            .or_else(|| std::fs::read_to_string(token_path()?).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let retries = std::env::var("QLORA_HUB_RETRIES")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(5);
        Self {
            cache,
            offline,
            endpoint,
            token,
            retries,
            backoff_ms: 500,
        }
    }

    /// `text` with the token replaced by `hf_***`: whatever a server or a library puts in an
    /// error or a log line (a hostile server can echo the Authorization header back).
    pub fn redact(&self, text: &str) -> String {
        match &self.token {
            Some(t) if !t.is_empty() => text.replace(t.as_str(), "hf_***"),
            _ => text.to_string(),
        }
    }

    /// `e` with the token replaced ([`Self::redact`]) when it appears anywhere in the chain: the
    /// token never reaches an error, though a server may echo it in a body we quote.
    pub fn redact_error(&self, e: anyhow::Error) -> anyhow::Error {
        match &self.token {
            Some(t) if format!("{e:?}").contains(t.as_str()) => {
                anyhow::anyhow!("{}", self.redact(&format!("{e:#}")))
            }
            _ => e,
        }
    }

    /// Offline settings over `cache` (tests).
    pub fn offline_at(cache: &Path) -> Self {
        Self {
            cache: Some(cache.to_path_buf()),
            offline: true,
            endpoint: "https://huggingface.co".into(),
            token: None,
            retries: 0,
            backoff_ms: 0,
        }
    }
}

/// A Hub model and revision: `owner/name` or `owner/name@revision` (a branch, tag or commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    pub id: String,
    pub revision: String,
}

impl ModelRef {
    /// `None` when `model` is not `owner/name[@revision]`.
    pub fn parse(model: &str) -> Option<Self> {
        let (id, revision) = match model.split_once('@') {
            Some((id, rev)) if !rev.is_empty() => (id, rev),
            Some(_) => return None,
            None => (model, "main"),
        };
        is_hub_id(id).then(|| Self {
            id: id.to_string(),
            revision: revision.to_string(),
        })
    }
}

/// `model` with `revision` (for a Hub id; a directory or builtin is returned as it is).
pub fn with_revision(model: &str, revision: Option<&str>) -> String {
    match revision {
        Some(r) if ModelRef::parse(model).is_some() => {
            format!("{}@{r}", model.split_once('@').map_or(model, |(id, _)| id))
        }
        _ => model.to_string(),
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
    parts.len() == 2
        && parts
            .iter()
            .all(|s| !s.starts_with('.') && crate::pathsafe::file_name(s).is_ok())
}

/// The cached snapshot of a model reference, complete or not: `refs/<revision>` names its commit
/// (a revision that is itself a commit names the snapshot directly).
pub fn cached_snapshot(cache: &Path, r: &ModelRef) -> Option<PathBuf> {
    snapshot_at(&repo_dir(cache, &r.id), &r.revision)
}

/// The snapshot `revision` names in the cache folder `repo` (a model's or a dataset's).
pub(crate) fn snapshot_at(repo: &Path, revision: &str) -> Option<PathBuf> {
    let snapshots = repo.join("snapshots");
    // The revision and the commit a ref holds become paths: only names that stay in the repo.
    let ref_path = crate::pathsafe::join_under(&repo.join("refs"), revision).ok()?;
    if let Ok(commit) = std::fs::read_to_string(ref_path) {
        let commit = crate::pathsafe::file_name(commit.trim()).ok()?;
        let s = snapshots.join(commit);
        return s.is_dir().then_some(s);
    }
    if let Ok(commit) = crate::pathsafe::file_name(revision) {
        let s = snapshots.join(commit);
        if s.is_dir() {
            return Some(s);
        }
    }
    // Without a ref (a download cut short before its ref was written), the one snapshot there is.
    let mut all: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    (all.len() == 1 && revision == "main").then(|| all.remove(0))
}

/// What is at a snapshot path.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    /// A link into the repo's blobs (as huggingface_hub and qlora make), or a regular file in the
    /// snapshot itself (huggingface_hub's layout where symlinks are unsupported).
    Complete,
    /// Nothing, or a link to a blob not there (yet): to be fetched.
    Absent,
    /// Anything else, with what it is: never taken as downloaded.
    Outside(String),
}

/// Classifies `pointer`, a path under `snapshot`, against the repo's `blobs` directory.
pub(crate) fn snapshot_entry(pointer: &Path, blobs: &Path, snapshot: &Path) -> Entry {
    let Ok(meta) = std::fs::symlink_metadata(pointer) else {
        return Entry::Absent;
    };
    if meta.file_type().is_symlink() {
        if crate::pathsafe::resolves_under(pointer, blobs) {
            return if std::fs::metadata(pointer).is_ok_and(|m| m.is_file()) {
                Entry::Complete
            } else {
                Entry::Outside("a link to something that is not a file".into())
            };
        }
        let target = std::fs::read_link(pointer).unwrap_or_default();
        if pointer.canonicalize().is_err() && dangling_into(pointer, &target, blobs) {
            return Entry::Absent;
        }
        return Entry::Outside(format!(
            "a link to {}, outside the repo's blobs",
            target.display()
        ));
    }
    if meta.is_file() && crate::pathsafe::resolves_under(pointer, snapshot) {
        Entry::Complete
    } else {
        Entry::Outside("not a file or a link into the repo's blobs".into())
    }
}

/// Whether a dangling link's `target` (relative to the link's directory, or absolute) names a file
/// directly in `blobs`, lexically: a blob deleted from the cache, to be fetched again.
fn dangling_into(pointer: &Path, target: &Path, blobs: &Path) -> bool {
    let mut p = pointer.parent().map(Path::to_path_buf).unwrap_or_default();
    for c in target.components() {
        match c {
            std::path::Component::ParentDir => {
                p.pop();
            }
            std::path::Component::Normal(n) => p.push(n),
            std::path::Component::CurDir => {}
            std::path::Component::RootDir | std::path::Component::Prefix(_) => {
                p = PathBuf::from(c.as_os_str());
            }
        }
    }
    p.parent() == Some(blobs)
}

/// What a snapshot lacks to be loaded: `config.json`, a tokenizer (`tokenizer.json` or
/// `tokenizer.model`), and the weights (`model.safetensors`, or the index and every shard it
/// names). A file counts when it is there whole (downloads write `.part` files beside the blobs
/// and move them into place complete; a link to a missing blob does not count) and in the cache: a
/// link out of the repo's blobs, or a name that would leave the snapshot, is listed with why.
pub fn missing_files(snapshot: &Path) -> Vec<String> {
    let blobs = snapshot
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| snapshot.join("blobs"), |repo| repo.join("blobs"));
    let entry = |f: &str| match crate::pathsafe::join_under(snapshot, f) {
        Ok(p) => snapshot_entry(&p, &blobs, snapshot),
        Err(e) => Entry::Outside(e.why.to_string()),
    };
    let present = |f: &str| entry(f) == Entry::Complete;
    // A missing file's name, with why when something not to be trusted stands there.
    let named = |f: &str, alt: &str| match entry(f) {
        Entry::Outside(why) => format!("{f} ({why})"),
        _ => format!("{f}{alt}"),
    };
    let mut missing = Vec::new();
    if !present("config.json") {
        missing.push(named("config.json", ""));
    }
    if !present("tokenizer.json") && !present("tokenizer.model") {
        missing.push(named("tokenizer.json", ""));
    }
    let index = crate::checkpoint::INDEX_FILE;
    if present(index) {
        match std::fs::read(snapshot.join(index))
            .ok()
            .and_then(|b| serde_json::from_slice::<crate::checkpoint::ShardIndex>(&b).ok())
        {
            Some(idx) => {
                let mut shards: Vec<&String> = idx.weight_map.values().collect();
                shards.sort();
                shards.dedup();
                missing.extend(
                    shards
                        .into_iter()
                        .filter(|s| !present(s))
                        .map(|s| named(s, "")),
                );
            }
            None => missing.push(format!("{index} (unreadable)")),
        }
    } else if !present(crate::checkpoint::SINGLE_FILE) {
        missing.push(named(
            crate::checkpoint::SINGLE_FILE,
            &format!(" (or {index} and its shards)"),
        ));
    }
    missing
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
    let Some(r) = ModelRef::parse(model) else {
        bail!("`{model}`: no such checkpoint directory, and not a Hub id (owner/name[@revision])");
    };
    let snapshot = env.cache.as_deref().and_then(|c| cached_snapshot(c, &r));
    let missing = snapshot.as_deref().map(missing_files);
    if let (Some(s), Some(m)) = (&snapshot, &missing)
        && m.is_empty()
    {
        return Ok(s.clone());
    }
    if env.offline {
        let cache = env
            .cache
            .as_deref()
            .map_or("unknown".into(), |c| c.display().to_string());
        match (snapshot, missing) {
            (Some(s), Some(m)) => bail!(
                "`{model}`: the cached snapshot {} is incomplete (missing {}), and HF_HUB_OFFLINE is set; finish the download while online (`qlora download {model}`, which resumes it) or pass a checkpoint directory",
                s.display(),
                m.join(", ")
            ),
            _ => bail!(
                "`{model}` is not a directory and not in the Hugging Face cache ({cache}), and HF_HUB_OFFLINE is set; download it while online (`qlora download {model}`) or pass a checkpoint directory"
            ),
        }
    }
    download(model, env)
}

/// Downloads (or finishes downloading) `model` into the cache and returns its snapshot: what
/// `qlora download` runs, and `resolve` when the cache lacks the model.
pub fn download(model: &str, env: &HubEnv) -> Result<PathBuf> {
    let r = ModelRef::parse(model)
        .with_context(|| format!("`{model}` is not a Hub id (owner/name[@revision])"))?;
    download::download(&r, env)
        .with_context(|| {
            format!(
                "downloading `{model}` from {} (set HF_HUB_OFFLINE=1 to stay offline)",
                env.endpoint
            )
        })
        .map_err(|e| env.redact_error(e))
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
        std::fs::write(snap.join("tokenizer.json"), "{}").unwrap();
        std::fs::write(snap.join("model.safetensors"), "").unwrap();
        let env = HubEnv::offline_at(tmp.path());
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
