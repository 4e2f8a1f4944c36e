//! Downloading a checkpoint from the Hub into the Hugging Face cache, the way `huggingface_hub`
//! lays it out (`models--owner--name/{blobs/<etag>, snapshots/<commit>/<file> → blob,
//! refs/<revision>}`), so that every tool shares it:
//!
//! - the file list comes from the repo's revision info (`/api/models/<id>/revision/<rev>`), and only
//!   what a Phi-3 checkpoint needs is fetched (config, tokenizer, safetensors weights);
//! - each file's etag and size come from a `Range: bytes=0-0` request whose redirect is not
//!   followed (`X-Linked-Etag`/`X-Linked-Size` for LFS files, else `ETag`/`Content-Range`);
//! - the body goes to `blobs/<etag>.part` under the lock `.locks/<repo>/<etag>.lock` (another
//!   process downloading the same file waits, then finds the blob); a `.part` left by a killed or
//!   dropped download continues with `Range: bytes=<len>-`;
//! - connection errors, timeouts and 5xx are retried with exponential backoff (the `.part` resumes
//!   each time); 401/403/404 are not;
//! - an LFS file's etag is the sha256 of its content: checked before the blob is renamed into
//!   place, so no corrupt file ever reaches a snapshot;
//! - `refs/<revision>` is written last, when every file is in the snapshot.

use super::{HubEnv, ModelRef};
use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Files of a checkpoint besides the weights: required, then optional.
pub const REQUIRED: &[&str] = &["config.json"];
pub const OPTIONAL: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
];

/// What went wrong talking to the Hub, classified for retrying.
#[derive(Debug)]
enum Failure {
    /// Connection errors, timeouts, 5xx, a body cut short: worth another try.
    Transient(anyhow::Error),
    /// Anything else: 4xx, a bad header, a checksum mismatch.
    Fatal(anyhow::Error),
}

impl Failure {
    fn into_error(self) -> anyhow::Error {
        match self {
            Self::Transient(e) | Self::Fatal(e) => e,
        }
    }
}

type Attempt<T> = std::result::Result<T, Failure>;

/// The Hub's HTTP client for one download.
pub(crate) struct Client<'a> {
    env: &'a HubEnv,
    /// Follows redirects (file bodies from the CDN).
    follow: ureq::Agent,
    /// Does not (the resolve endpoint's own headers carry the LFS etag).
    direct: ureq::Agent,
}

fn agent(redirects: u32) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10))
        .timeout_read(Duration::from_secs(60))
        .redirects(redirects)
        .user_agent(concat!("qlora/", env!("CARGO_PKG_VERSION")))
        .build()
}

impl<'a> Client<'a> {
    pub(crate) fn new(env: &'a HubEnv) -> Self {
        Self {
            env,
            follow: agent(5),
            direct: agent(0),
        }
    }

    fn get(&self, agent: &ureq::Agent, url: &str) -> ureq::Request {
        let req = agent.get(url);
        match &self.env.token {
            Some(t) => req.set("Authorization", &format!("Bearer {t}")),
            None => req,
        }
    }

    /// A request, its failure classified: `what` names the file or the repo in messages.
    fn call(&self, req: ureq::Request, what: &str, id: &str) -> Attempt<ureq::Response> {
        match req.call() {
            Ok(r) => Ok(r),
            // A redirect that was not followed is an answer, not an error.
            Err(ureq::Error::Status(code, r)) if (300..400).contains(&code) => Ok(r),
            Err(ureq::Error::Status(code, r)) => Err(status_failure(code, r, what, id, self.env)),
            Err(ureq::Error::Transport(t)) => Err(Failure::Transient(anyhow::anyhow!(
                "{what}: cannot reach {}: {t}",
                self.env.endpoint
            ))),
        }
    }

    /// Retries `f` on transient failures with exponential backoff (0.5 s, 1 s, 2 s, … up to 16 s).
    fn retrying<T>(&self, what: &str, mut f: impl FnMut() -> Attempt<T>) -> Result<T> {
        let mut tries = 0u32;
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(Failure::Transient(e)) if tries < self.env.retries => {
                    let wait = Duration::from_millis(self.env.backoff_ms << tries.min(5));
                    eprintln!(
                        "{what}: {}; retrying in {:.1} s ({}/{})",
                        self.env.redact(&format!("{e:#}")),
                        wait.as_secs_f64(),
                        tries + 1,
                        self.env.retries
                    );
                    std::thread::sleep(wait);
                    tries += 1;
                }
                Err(f) => return Err(f.into_error()),
            }
        }
    }
}

fn status_failure(code: u16, r: ureq::Response, what: &str, id: &str, env: &HubEnv) -> Failure {
    let body = r.into_string().unwrap_or_default();
    let body = body.trim().chars().take(200).collect::<String>();
    match code {
        401 | 403 => Failure::Fatal(anyhow::anyhow!(
            "{what}: the Hub refused access to {id} (HTTP {code}): the repo is gated or private, or \
             the token is wrong. Accept its terms on the model page, then log in: set HF_TOKEN, or \
             put the token in {} (`huggingface-cli login` writes it){}",
            super::token_path().map_or("$HF_HOME/token".into(), |p| p.display().to_string()),
            if env.token.is_some() {
                "; a token was sent"
            } else {
                "; no token was sent"
            }
        )),
        404 => Failure::Fatal(anyhow::anyhow!(
            "{what}: not found on the Hub (HTTP 404 at {}): check the repo id `{id}` and the \
             revision",
            env.endpoint
        )),
        429 | 500..=599 => Failure::Transient(anyhow::anyhow!("{what}: HTTP {code} {body}")),
        _ => Failure::Fatal(anyhow::anyhow!("{what}: HTTP {code} {body}")),
    }
}

/// `/api/models/<id>/revision/<rev>`: the commit and the file names.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct RepoInfo {
    pub sha: String,
    #[serde(default)]
    pub siblings: Vec<Sibling>,
}

#[derive(Debug, serde::Deserialize)]
pub(crate) struct Sibling {
    pub rfilename: String,
}

/// A file's identity on the Hub.
#[derive(Debug)]
struct FileMeta {
    etag: String,
    size: u64,
}

/// Whether an etag is an LFS object id (the sha256 of the content, 64 hex digits).
fn is_sha256(etag: &str) -> bool {
    etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit())
}

/// What a Hub repo holds: its API path, its URLs and its cache folder differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Dataset,
}

impl RepoKind {
    /// `/api/<plural>/<id>/revision/<rev>`.
    fn plural(self) -> &'static str {
        match self {
            Self::Model => "models",
            Self::Dataset => "datasets",
        }
    }

    /// Before `<id>` in file URLs: nothing for models, `datasets/` for datasets.
    fn url_prefix(self) -> &'static str {
        match self {
            Self::Model => "",
            Self::Dataset => "datasets/",
        }
    }
}

/// The cache directory of a model repo (`models--owner--name`).
pub fn repo_dir(cache: &Path, id: &str) -> PathBuf {
    repo_dir_of(cache, RepoKind::Model, id)
}

/// The cache directory of a repo of either kind (`models--…`, `datasets--…`).
pub fn repo_dir_of(cache: &Path, kind: RepoKind, id: &str) -> PathBuf {
    let t = match kind {
        RepoKind::Model => hf_hub::RepoType::Model,
        RepoKind::Dataset => hf_hub::RepoType::Dataset,
    };
    cache.join(hf_hub::Repo::new(id.to_string(), t).folder_name())
}

/// A repo's commit and file names at `revision`.
pub(crate) fn revision_info(
    client: &Client<'_>,
    kind: RepoKind,
    id: &str,
    revision: &str,
) -> Result<RepoInfo> {
    let url = format!(
        "{}/api/{}/{id}/revision/{}",
        client.env.endpoint,
        kind.plural(),
        urlencode(revision)
    );
    client.retrying(id, || {
        let resp = client.call(client.get(&client.follow, &url), id, id)?;
        resp.into_json::<RepoInfo>()
            .map_err(|e| Failure::Transient(anyhow::anyhow!("{id}: unreadable revision info: {e}")))
    })
}

/// Writes `refs/<revision>` → `sha` (nothing when the revision is the commit itself). A revision
/// such as `refs/pr/1` or `refs/convert/parquet` is a path under refs/, as huggingface_hub
/// stores it.
pub(crate) fn write_ref(repo: &Path, id: &str, revision: &str, sha: &str) -> Result<()> {
    if revision == sha {
        return Ok(());
    }
    let ref_path = crate::pathsafe::join_under(&repo.join("refs"), revision)
        .with_context(|| format!("{id}: the revision"))?;
    if let Some(dir) = ref_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::fsx::write_atomic(&ref_path, sha.as_bytes())
}

/// Downloads what a Phi-3 checkpoint needs from `r` into the cache; returns the snapshot.
pub fn download(r: &ModelRef, env: &HubEnv) -> Result<PathBuf> {
    let cache = env
        .cache
        .as_deref()
        .context("no Hugging Face cache directory: set HF_HUB_CACHE or HF_HOME")?;
    let client = Client::new(env);
    let id = r.id.as_str();
    let info = revision_info(&client, RepoKind::Model, id, &r.revision)?;
    let names: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let plan = select_files(&names, id)?;
    let repo = repo_dir(cache, id);
    // The commit becomes a directory name: one plain component or nothing.
    let commit = crate::pathsafe::file_name(&info.sha)
        .with_context(|| format!("{id}: the Hub's commit id for `{}`", r.revision))?;
    let snapshot = repo.join("snapshots").join(commit);
    let progress = super::progress::Progress::new();
    let fetch = |file: &str| {
        let at = Place {
            kind: RepoKind::Model,
            id,
            repo: &repo,
            snapshot: &snapshot,
            commit: &info.sha,
        };
        fetch_file(&client, &at, file, &progress)
    };
    for f in &plan.first {
        fetch(f)?;
    }
    if let Some(index) = &plan.index {
        let path = snapshot.join(index);
        let parsed: crate::checkpoint::ShardIndex = serde_json::from_slice(&std::fs::read(&path)?)
            .with_context(|| format!("{}: not a safetensors index", path.display()))?;
        let mut shards: Vec<&String> = parsed.weight_map.values().collect();
        shards.sort();
        shards.dedup();
        // Every name checked before any is fetched: a hostile index gets nothing written.
        for s in &shards {
            crate::pathsafe::join_under(&snapshot, s)
                .with_context(|| format!("{id}: {index} names a shard"))?;
            if !names.contains(&s.as_str()) {
                bail!("{id}: the index names {s}, which the repo does not have");
            }
        }
        for s in shards {
            fetch(s)?;
        }
    }
    let missing = super::missing_files(&snapshot);
    if !missing.is_empty() {
        bail!(
            "{id}: after the download the snapshot still lacks {}",
            missing.join(", ")
        );
    }
    // The ref last: a snapshot is named by a ref only when complete.
    write_ref(&repo, id, &r.revision, &info.sha)?;
    Ok(snapshot)
}

/// The files to fetch, in order: config and tokenizer, then the weights (the single file, or the
/// index whose shards follow).
#[derive(Debug, PartialEq)]
pub struct FilePlan {
    pub first: Vec<String>,
    pub index: Option<String>,
}

/// Picks a Phi-3 checkpoint's files out of a repo's file names: never `*.bin`, `*.pth`, `*.gguf`
/// or `original/`.
pub fn select_files(names: &[&str], id: &str) -> Result<FilePlan> {
    let has = |f: &str| names.contains(&f);
    for f in REQUIRED {
        if !has(f) {
            bail!("{id}: the repo has no {f}; is it a Hugging Face transformers checkpoint?");
        }
    }
    let mut first: Vec<String> = REQUIRED
        .iter()
        .chain(OPTIONAL)
        .filter(|f| has(f))
        .map(|f| f.to_string())
        .collect();
    let index = crate::checkpoint::INDEX_FILE;
    let single = crate::checkpoint::SINGLE_FILE;
    let plan = if has(index) {
        first.push(index.to_string());
        FilePlan {
            first,
            index: Some(index.to_string()),
        }
    } else if has(single) {
        first.push(single.to_string());
        FilePlan { first, index: None }
    } else {
        let torch: Vec<&&str> = names
            .iter()
            .filter(|n| n.ends_with(".bin") || n.ends_with(".pth") || n.ends_with(".pt"))
            .collect();
        if torch.is_empty() {
            bail!("{id}: the repo has no {single} or {index}; qlora reads safetensors weights");
        }
        bail!(
            "{id}: the repo has only PyTorch weights ({}); qlora reads safetensors. Convert them \
             (transformers: `AutoModelForCausalLM.from_pretrained(...).save_pretrained(dir, \
             safe_serialization=True)`) and pass the directory, or pick a repo with .safetensors",
            torch
                .iter()
                .take(3)
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    Ok(plan)
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Where a repo's files go: its kind and id, its cache folder, the snapshot of one commit.
pub(crate) struct Place<'a> {
    pub kind: RepoKind,
    pub id: &'a str,
    pub repo: &'a Path,
    pub snapshot: &'a Path,
    pub commit: &'a str,
}

/// One file into the snapshot (nothing to do when it is there).
pub(crate) fn fetch_file(
    client: &Client<'_>,
    at: &Place<'_>,
    file: &str,
    progress: &super::progress::Progress,
) -> Result<()> {
    let Place {
        kind,
        id,
        repo,
        snapshot,
        commit,
    } = *at;
    let pointer = crate::pathsafe::join_under(snapshot, file)
        .with_context(|| format!("{id}: a file of the repo"))?;
    let blobs = repo.join("blobs");
    match super::snapshot_entry(&pointer, &blobs, snapshot) {
        super::Entry::Complete => return Ok(()),
        super::Entry::Absent => {}
        super::Entry::Outside(why) => bail!(
            "{}: {why}, so it is not taken as downloaded; remove it and run the command again \
             (qlora fetches the file into {})",
            pointer.display(),
            blobs.display()
        ),
    }
    let url = format!(
        "{}/{}{id}/resolve/{commit}/{file}",
        client.env.endpoint,
        kind.url_prefix()
    );
    let meta = client.retrying(file, || metadata(client, &url, file, id))?;
    std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let blob = blobs.join(&meta.etag);
    if !blob.exists() {
        // One process per blob; another one downloading it makes this one wait, then find it.
        // The lock files live where huggingface_hub keeps its own (`<cache>/.locks/<repo>/`) and
        // stay: removing one while another process waits on it would let a third take a new one.
        let locks = repo
            .parent()
            .unwrap_or(repo)
            .join(".locks")
            .join(repo.file_name().unwrap_or_default());
        std::fs::create_dir_all(&locks).with_context(|| format!("creating {}", locks.display()))?;
        let lock_path = locks.join(format!("{}.lock", meta.etag));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("creating {}", lock_path.display()))?;
        lock.lock()
            .with_context(|| format!("locking {}", lock_path.display()))?;
        if !blob.exists() {
            let part = blobs.join(format!("{}.part", meta.etag));
            // What cannot fit is never started: the rest of the file against the free space.
            let have = std::fs::metadata(&part)
                .map_or(0, |m| m.len())
                .min(meta.size);
            if let Some(free) = crate::fsx::disk::free_bytes(&blobs)
                && free < meta.size - have
            {
                return Err(crate::fsx::disk::DiskError::Full {
                    path: part,
                    needed_bytes: Some(meta.size - have),
                    written_bytes: have,
                    free_bytes: Some(free),
                })
                .with_context(|| format!("{id}: downloading {file}"));
            }
            let bar = progress.file(file, meta.size);
            client.retrying(file, || body(client, &url, &part, &meta, file, id, &bar))?;
            bar.done();
            verify(&part, &meta, file)?;
            std::fs::rename(&part, &blob)
                .with_context(|| format!("moving {} into place", part.display()))?;
        }
        drop(lock);
    }
    link(&blob, &pointer)
}

/// The etag and size of a file (the resolve endpoint's own answer, its redirect not followed).
fn metadata(client: &Client<'_>, url: &str, file: &str, id: &str) -> Attempt<FileMeta> {
    let mut url = url.to_string();
    let mut resp = client.call(
        client.get(&client.direct, &url).set("Range", "bytes=0-0"),
        file,
        id,
    )?;
    // A relative redirect (a renamed repo) stays on the Hub and is followed; an absolute one (the
    // CDN of an LFS file) is not: its headers are the answer.
    for _ in 0..5 {
        let Some(loc) = resp
            .header("location")
            .filter(|l| (300..400).contains(&resp.status()) && l.starts_with('/'))
        else {
            break;
        };
        url = format!("{}{loc}", client.env.endpoint);
        resp = client.call(
            client.get(&client.direct, &url).set("Range", "bytes=0-0"),
            file,
            id,
        )?;
    }
    let header = |k: &str| {
        resp.header(k)
            .map(|v| v.trim().trim_matches('"').to_string())
    };
    let etag = header("x-linked-etag")
        .or_else(|| header("etag"))
        .ok_or_else(|| Failure::Fatal(anyhow::anyhow!("{file}: the Hub sent no ETag")))?;
    let etag = etag.trim_start_matches("W/").trim_matches('"').to_string();
    // The etag names the blob file.
    if crate::pathsafe::file_name(&etag).is_err() || etag.contains('.') {
        return Err(Failure::Fatal(anyhow::anyhow!(
            "{file}: unusable ETag `{etag}`"
        )));
    }
    let size = match header("x-linked-size") {
        Some(s) => s.parse().ok(),
        None => header("content-range")
            .and_then(|r| r.rsplit('/').next().map(str::to_string))
            .and_then(|t| t.parse().ok())
            .or_else(|| header("content-length").and_then(|l| l.parse().ok())),
    }
    .ok_or_else(|| Failure::Fatal(anyhow::anyhow!("{file}: the Hub sent no size")))?;
    Ok(FileMeta { etag, size })
}

/// Downloads the rest of `part` (from its length on) to `meta.size` bytes.
fn body(
    client: &Client<'_>,
    url: &str,
    part: &Path,
    meta: &FileMeta,
    file: &str,
    id: &str,
    bar: &super::progress::FileBar,
) -> Attempt<()> {
    // A full disk or a read-only cache is named with the path and the bytes (not retried).
    let io = |e: std::io::Error| {
        let have = std::fs::metadata(part).map_or(0, |m| m.len());
        Failure::Fatal(
            crate::fsx::disk::DiskError::classify(part, &e, Some(meta.size), have).into(),
        )
    };
    // Through the one writing helper (its errors classified, its faults injectable).
    let mut out = crate::fsx::disk::OutFile::open(
        part,
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true),
    )
    .map_err(|e| Failure::Fatal(e.into()))?;
    let mut start = out.file().metadata().map_err(io)?.len();
    if start > meta.size {
        // Not this file's beginning (another revision's bytes?): start over.
        out.file().set_len(0).map_err(io)?;
        start = 0;
    }
    if start == meta.size {
        return Ok(());
    }
    let mut req = client.get(&client.follow, url);
    if start > 0 {
        req = req.set("Range", &format!("bytes={start}-"));
    }
    let resp = client.call(req, file, id)?;
    if start > 0 && resp.status() != 206 {
        // The server ignored the range: the body is the whole file.
        out.file().set_len(0).map_err(io)?;
        start = 0;
    }
    out.seek(std::io::SeekFrom::Start(start)).map_err(io)?;
    bar.at(start);
    let mut reader = resp.into_reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = start;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                out.flush().map_err(io)?;
                return Err(Failure::Transient(anyhow::anyhow!(
                    "{file}: the connection broke after {at} of {} bytes: {e}",
                    meta.size
                )));
            }
        };
        out.write_all(&buf[..n]).map_err(io)?;
        at += n as u64;
        bar.at(at);
    }
    out.flush().map_err(io)?;
    if at != meta.size {
        return Err(Failure::Transient(anyhow::anyhow!(
            "{file}: the body ended after {at} of {} bytes",
            meta.size
        )));
    }
    Ok(())
}

/// An LFS file's content against its sha256 etag; a mismatch removes the `.part`.
fn verify(part: &Path, meta: &FileMeta, file: &str) -> Result<()> {
    if !is_sha256(&meta.etag) {
        return Ok(());
    }
    let mut f = std::fs::File::open(part)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    let got = format!("{:x}", h.finalize());
    if !got.eq_ignore_ascii_case(&meta.etag) {
        std::fs::remove_file(part).ok();
        bail!(
            "{file}: the downloaded bytes have sha256 {got}, not the Hub's {}; the file was \
             discarded (a proxy or the network corrupted it); run the command again",
            meta.etag
        );
    }
    Ok(())
}

/// `pointer` → `blob`: a relative symlink as huggingface_hub makes (a copy where links fail).
fn link(blob: &Path, pointer: &Path) -> Result<()> {
    let dir = pointer.parent().context("a snapshot file has a parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let repo = blob.parent().and_then(Path::parent).unwrap_or(blob);
    if !crate::pathsafe::resolves_under(dir, repo) {
        bail!(
            "{}: resolves outside the cache's repo directory {}; remove the link in its path",
            dir.display(),
            repo.display()
        );
    }
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        pointer.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    #[cfg(unix)]
    {
        // snapshots/<commit>/<dirs…>/file → ../../(../…)blobs/<etag>
        let rel = relative_to(blob, dir);
        if std::os::unix::fs::symlink(&rel, &tmp).is_ok() {
            return std::fs::rename(&tmp, pointer)
                .with_context(|| format!("linking {}", pointer.display()));
        }
    }
    std::fs::copy(blob, &tmp).with_context(|| format!("copying into {}", tmp.display()))?;
    std::fs::rename(&tmp, pointer).with_context(|| format!("placing {}", pointer.display()))
}

/// `target` as a path relative to `from` (both absolute or both relative to the same base).
fn relative_to(target: &Path, from: &Path) -> PathBuf {
    let t: Vec<_> = target.components().collect();
    let f: Vec<_> = from.components().collect();
    let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..f.len() {
        rel.push("..");
    }
    for c in &t[common..] {
        rel.push(c);
    }
    rel
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_files_a_checkpoint_needs_are_fetched() {
        let names = [
            "config.json",
            "tokenizer.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "original/consolidated.pth",
            "model-q4.gguf",
            "README.md",
        ];
        let p = select_files(&names, "o/n").unwrap();
        assert_eq!(
            p.first,
            [
                "config.json",
                "tokenizer.json",
                "model.safetensors.index.json"
            ]
        );
        assert_eq!(p.index.as_deref(), Some("model.safetensors.index.json"));
        let e = select_files(&["config.json", "pytorch_model.bin"], "o/n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("only PyTorch weights") && e.contains("pytorch_model.bin"),
            "{e}"
        );
        assert!(select_files(&["model.safetensors"], "o/n").is_err());
    }

    #[test]
    fn relative_links_climb_to_the_blobs() {
        assert_eq!(
            relative_to(
                Path::new("/c/models--a--b/blobs/e1"),
                Path::new("/c/models--a--b/snapshots/abc")
            ),
            PathBuf::from("../../blobs/e1")
        );
        assert!(is_sha256(&"a".repeat(64)) && !is_sha256("abc"));
        assert_eq!(urlencode("refs/pr/1"), "refs%2Fpr%2F1");
    }
}
