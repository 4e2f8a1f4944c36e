//! Hub downloads against a loopback Hub written for these tests (std only, 127.0.0.1): the
//! revision-info API and the resolve endpoint with `Range`, `X-Repo-Commit`, `ETag` (the sha256 of
//! LFS files), `X-Linked-Etag`/`X-Linked-Size` on a redirect to a "CDN" path, `Content-Range`, and
//! injected faults: a connection dropped after N bytes, a corrupted body, a status for the first N
//! requests, a slow body.

use qlora::hub::{HubEnv, download, missing_files, resolve_with};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub(crate) const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
/// The commit of the `refs/convert/parquet` branch, whose files are the map's `convert:` keys.
pub(crate) const CONVERT_COMMIT: &str = "c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0";

/// What the server does to one file's requests.
#[derive(Debug, Clone, Default)]
pub(crate) struct Fault {
    /// Close the connection after this many body bytes, for the next `times` body requests.
    pub drop_after: Option<(usize, usize)>,
    /// Flip a byte of the body, for the next `times` body requests.
    pub corrupt: usize,
    /// Answer this status, for the next `times` requests of any kind.
    pub status: Option<(u16, usize)>,
    /// Sleep this long per 64 KiB of body.
    pub slow_ms: u64,
    /// Send this many body bytes, then stall (a minute) before the rest, for the next `times`
    /// body requests: a download a test kills mid-file.
    pub stall_after: Option<(usize, usize)>,
    /// Answer 500 with the request's Authorization header in the body, for the next `times`
    /// requests (a server that echoes the token).
    pub echo_auth: usize,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    faults: HashMap<String, Fault>,
    /// Every request: (path, Range header).
    log: Vec<(String, Option<String>)>,
    /// A status for every request (401 for a gated repo).
    all: Option<u16>,
    /// `http://127.0.0.1:<port>`: the "CDN" of the redirects is an absolute URL, as the Hub's.
    base: String,
    /// The commit the revision API answers (default [`COMMIT`]).
    pub commit: Option<String>,
}

/// A repo's files, and the server.
pub(crate) struct FakeHub {
    pub addr: String,
    pub files: Arc<HashMap<String, Vec<u8>>>,
    pub state: Arc<Mutex<State>>,
}

fn is_lfs(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name.ends_with(".bin")
        || name.ends_with(".model")
        || name.ends_with(".parquet")
}

fn etag(name: &str, data: &[u8]) -> String {
    if is_lfs(name) {
        format!("{:x}", Sha256::digest(data))
    } else {
        // A git blob id stands in for the non-LFS etag (40 hex digits).
        format!("{:x}", Sha256::digest(data))[..40].to_string()
    }
}

impl FakeHub {
    pub(crate) fn start(files: HashMap<String, Vec<u8>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let files = Arc::new(files);
        let state = Arc::new(Mutex::new(State {
            base: addr.clone(),
            ..Default::default()
        }));
        let (f, s) = (files.clone(), state.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (f, s) = (f.clone(), s.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &f, &s);
                });
            }
        });
        Self { addr, files, state }
    }

    pub(crate) fn fault(&self, file: &str, f: Fault) {
        self.state.lock().unwrap().faults.insert(file.into(), f);
    }

    pub(crate) fn log(&self) -> Vec<(String, Option<String>)> {
        self.state.lock().unwrap().log.clone()
    }

    pub(crate) fn env(&self, cache: &Path) -> HubEnv {
        HubEnv {
            cache: Some(cache.to_path_buf()),
            offline: false,
            endpoint: self.addr.clone(),
            token: None,
            retries: 3,
            backoff_ms: 10,
        }
    }
}

fn respond(mut c: &TcpStream, code: u16, headers: &[(&str, String)], body: &[u8]) {
    let mut h = format!("HTTP/1.1 {code} X\r\nConnection: close\r\n");
    for (k, v) in headers {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let _ = c.write_all(h.as_bytes());
    let _ = c.write_all(body);
}

fn serve(
    c: TcpStream,
    files: &HashMap<String, Vec<u8>>,
    state: &Mutex<State>,
) -> std::io::Result<()> {
    let mut r = BufReader::new(c.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    let mut auth = String::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            } else if k.eq_ignore_ascii_case("authorization") {
                auth = v.trim().to_string();
            }
        }
    }
    let mut st = state.lock().unwrap();
    st.log.push((path.clone(), range.clone()));
    if let Some(code) = st.all {
        drop(st);
        respond(&c, code, &[], b"{\"error\":\"gated\"}");
        return Ok(());
    }
    // A renamed repo: `old/m` answers with a relative redirect to `o/m`, as the Hub does.
    for (from, to) in [
        ("/old/m/", "/o/m/"),
        ("/api/models/old/m/", "/api/models/o/m/"),
    ] {
        if let Some(rest) = path.strip_prefix(from) {
            drop(st);
            respond(&c, 307, &[("Location", format!("{to}{rest}"))], b"");
            return Ok(());
        }
    }
    // /api/{models,datasets}/<o>/<n>/revision/<rev>; the convert branch lists the `convert:`
    // files.
    if path.starts_with("/api/models/") || path.starts_with("/api/datasets/") {
        let convert = path.ends_with("/revision/refs%2Fconvert%2Fparquet");
        let siblings: Vec<serde_json::Value> = files
            .keys()
            .filter_map(|k| match (k.strip_prefix("convert:"), convert) {
                (Some(c), true) => Some(c.to_string()),
                (None, false) => Some(k.clone()),
                _ => None,
            })
            .map(|k| serde_json::json!({ "rfilename": k }))
            .collect();
        let commit = if convert {
            CONVERT_COMMIT.into()
        } else {
            st.commit.clone().unwrap_or_else(|| COMMIT.into())
        };
        drop(st);
        let body = serde_json::json!({ "sha": commit, "siblings": siblings }).to_string();
        respond(&c, 200, &[], body.as_bytes());
        return Ok(());
    }
    // /<o>/<n>/resolve/<rev>/<file>, and the "CDN": /cdn/<file>
    let (file, cdn) = if let Some(f) = path.strip_prefix("/cdn/") {
        (f.to_string(), true)
    } else {
        match path
            .split_once("/resolve/")
            .and_then(|(_, r)| r.split_once('/'))
        {
            Some((CONVERT_COMMIT, f)) => (format!("convert:{f}"), false),
            Some((_, f)) => (f.to_string(), false),
            None => (String::new(), false),
        }
    };
    let fault = st.faults.entry(file.clone()).or_default();
    if fault.echo_auth > 0 {
        fault.echo_auth -= 1;
        drop(st);
        respond(
            &c,
            500,
            &[],
            format!("bad request from `{auth}`").as_bytes(),
        );
        return Ok(());
    }
    if let Some((code, n)) = fault.status
        && n > 0
    {
        fault.status = Some((code, n - 1));
        drop(st);
        respond(&c, code, &[], b"injected");
        return Ok(());
    }
    let Some(data) = files.get(&file) else {
        drop(st);
        respond(
            &c,
            404,
            &[("X-Error-Code", "EntryNotFound".into())],
            b"not found",
        );
        return Ok(());
    };
    let tag = etag(&file, data);
    let total = data.len();
    let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap();
            let a: usize = a.parse().unwrap();
            let b: usize = if b.is_empty() {
                total - 1
            } else {
                b.parse().unwrap()
            };
            (a, b.min(total - 1))
        }
        None => (0, total - 1),
    };
    let is_probe = range.as_deref() == Some("bytes=0-0");
    // LFS files redirect to the CDN, as the Hub does, with their etag and size on the redirect.
    if is_lfs(&file) && !cdn {
        let base = st.base.clone();
        drop(st);
        respond(
            &c,
            302,
            &[
                ("Location", format!("{base}/cdn/{file}")),
                ("X-Repo-Commit", COMMIT.into()),
                ("X-Linked-Etag", format!("\"{tag}\"")),
                ("X-Linked-Size", total.to_string()),
                ("ETag", "\"redirect-etag\"".into()),
            ],
            b"",
        );
        return Ok(());
    }
    let mut body = data[start..=end].to_vec();
    let mut cut = None;
    let mut slow = 0;
    let mut stall = None;
    if !is_probe {
        if let Some((n, times)) = fault.stall_after
            && times > 0
        {
            fault.stall_after = Some((n, times - 1));
            stall = Some(n);
        }
        if let Some((n, times)) = fault.drop_after
            && times > 0
        {
            fault.drop_after = Some((n, times - 1));
            cut = Some(n);
        }
        if fault.corrupt > 0 {
            fault.corrupt -= 1;
            let mid = body.len() / 2;
            body[mid] ^= 0x5a;
        }
        slow = fault.slow_ms;
    }
    drop(st);
    let code = if range.is_some() { 206 } else { 200 };
    let mut h = format!(
        "HTTP/1.1 {code} X\r\nConnection: close\r\nX-Repo-Commit: {COMMIT}\r\nETag: \"{tag}\"\r\nContent-Length: {}\r\n",
        body.len()
    );
    if range.is_some() {
        h.push_str(&format!("Content-Range: bytes {start}-{end}/{total}\r\n"));
    }
    h.push_str("\r\n");
    let mut w = &c;
    w.write_all(h.as_bytes())?;
    let send = cut.map_or(body.len(), |n| n.min(body.len()));
    if let Some(n) = stall {
        let n = n.min(send);
        w.write_all(&body[..n])?;
        w.flush()?;
        std::thread::sleep(std::time::Duration::from_secs(60));
        w.write_all(&body[n..send])?;
        return Ok(());
    }
    for chunk in body[..send].chunks(64 << 10) {
        w.write_all(chunk)?;
        if slow > 0 {
            std::thread::sleep(std::time::Duration::from_millis(slow));
        }
    }
    if cut.is_some() {
        let _ = c.shutdown(std::net::Shutdown::Both);
    }
    Ok(())
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A single-file repo: config, tokenizer, model.safetensors (3 MB), plus files never fetched.
pub(crate) fn single_repo() -> HashMap<String, Vec<u8>> {
    HashMap::from([
        ("config.json".into(), br#"{"model_type":"phi3"}"#.to_vec()),
        ("tokenizer.json".into(), br#"{"version":"1.0"}"#.to_vec()),
        ("tokenizer_config.json".into(), b"{}".to_vec()),
        ("model.safetensors".into(), random_bytes(3_000_000, 1)),
        ("pytorch_model.bin".into(), random_bytes(1000, 9)),
        ("original/consolidated.pth".into(), random_bytes(1000, 8)),
        ("README.md".into(), b"# a model".to_vec()),
    ])
}

/// A sharded repo: the index and two shards.
pub(crate) fn sharded_repo() -> HashMap<String, Vec<u8>> {
    let index = serde_json::json!({
        "metadata": {"total_size": 4_000_000},
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors"
        }
    });
    HashMap::from([
        ("config.json".into(), br#"{"model_type":"phi3"}"#.to_vec()),
        ("tokenizer.json".into(), br#"{"version":"1.0"}"#.to_vec()),
        (
            "model.safetensors.index.json".into(),
            index.to_string().into_bytes(),
        ),
        (
            "model-00001-of-00002.safetensors".into(),
            random_bytes(2_500_000, 2),
        ),
        (
            "model-00002-of-00002.safetensors".into(),
            random_bytes(1_500_000, 3),
        ),
    ])
}

/// Asserts that every fetchable file of `hub` sits in `snapshot` with the same bytes.
fn assert_files(snapshot: &Path, hub: &FakeHub, names: &[&str]) {
    for n in names {
        let got = std::fs::read(snapshot.join(n)).unwrap_or_else(|e| panic!("{n}: {e}"));
        assert!(got == hub.files[*n], "{n}: bytes differ");
    }
}

pub(crate) fn repo_of(cache: &Path) -> PathBuf {
    cache.join("models--o--m")
}

#[test]
fn a_clean_download_lands_in_the_hf_cache_layout_single_and_sharded() {
    for (files, names) in [
        (
            single_repo(),
            vec![
                "config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "model.safetensors",
            ],
        ),
        (
            sharded_repo(),
            vec![
                "config.json",
                "tokenizer.json",
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
            ],
        ),
    ] {
        let hub = FakeHub::start(files);
        let cache = tempfile::tempdir().unwrap();
        let snap = resolve_with("o/m", &hub.env(cache.path())).unwrap();
        assert_eq!(snap, repo_of(cache.path()).join("snapshots").join(COMMIT));
        assert_files(&snap, &hub, &names);
        assert_eq!(
            std::fs::read_to_string(repo_of(cache.path()).join("refs/main")).unwrap(),
            COMMIT
        );
        // Snapshot files are links into blobs/<etag>; LFS blobs are named by their sha256.
        let link = std::fs::read_link(snap.join(names[names.len() - 1])).unwrap();
        assert!(link.starts_with("../../blobs"), "{link:?}");
        // Nothing else was fetched: no .bin, .pth, README.
        for skipped in [
            "pytorch_model.bin",
            "original/consolidated.pth",
            "README.md",
        ] {
            assert!(!snap.join(skipped).exists(), "{skipped}");
            assert!(
                !hub.log().iter().any(|(p, _)| p.ends_with(skipped)),
                "{skipped} requested"
            );
        }
        assert!(missing_files(&snap).is_empty());
        // A second resolve is offline-complete: no request.
        let n = hub.log().len();
        assert_eq!(resolve_with("o/m", &hub.env(cache.path())).unwrap(), snap);
        assert_eq!(hub.log().len(), n);
    }
}

#[test]
fn a_dropped_connection_resumes_to_identical_bytes_and_offline_names_what_is_missing() {
    let hub = FakeHub::start(single_repo());
    let cache = tempfile::tempdir().unwrap();
    hub.fault(
        "model.safetensors",
        Fault {
            drop_after: Some((1_000_000, 1)),
            ..Default::default()
        },
    );
    // No retries: the first run fails, leaving the .part and a snapshot without the weights.
    let mut env = hub.env(cache.path());
    env.retries = 0;
    let e = format!("{:#}", resolve_with("o/m", &env).unwrap_err());
    assert!(
        e.contains("model.safetensors") && e.contains("1000000"),
        "{e}"
    );
    let snap = repo_of(cache.path()).join("snapshots").join(COMMIT);
    assert!(snap.join("config.json").exists());
    assert!(
        !repo_of(cache.path()).join("refs/main").exists(),
        "a ref before completion"
    );
    // Offline, the partial snapshot is refused with the missing file named.
    let mut off = hub.env(cache.path());
    off.offline = true;
    let e = resolve_with("o/m", &off).unwrap_err().to_string();
    assert!(
        e.contains("incomplete") && e.contains("model.safetensors") && e.contains("qlora download"),
        "{e}"
    );
    // The next run resumes from the 1 MB already on disk.
    let snap2 = resolve_with("o/m", &hub.env(cache.path())).unwrap();
    assert_eq!(snap2, snap);
    assert_files(&snap, &hub, &["model.safetensors"]);
    assert!(
        hub.log()
            .iter()
            .any(|(p, r)| p == "/cdn/model.safetensors" && r.as_deref() == Some("bytes=1000000-")),
        "no resumed range request: {:?}",
        hub.log()
    );
    // With retries, a drop within one run resumes by itself.
    let cache2 = tempfile::tempdir().unwrap();
    hub.fault(
        "model.safetensors",
        Fault {
            drop_after: Some((700_000, 2)),
            ..Default::default()
        },
    );
    let snap3 = resolve_with("o/m", &hub.env(cache2.path())).unwrap();
    assert_files(&snap3, &hub, &["model.safetensors"]);
}

#[test]
fn a_corrupted_body_fails_its_checksum_and_never_reaches_the_snapshot() {
    let hub = FakeHub::start(single_repo());
    let cache = tempfile::tempdir().unwrap();
    hub.fault(
        "model.safetensors",
        Fault {
            corrupt: 1,
            ..Default::default()
        },
    );
    let e = format!(
        "{:#}",
        resolve_with("o/m", &hub.env(cache.path())).unwrap_err()
    );
    assert!(
        e.contains("sha256") && e.contains("model.safetensors"),
        "{e}"
    );
    let snap = repo_of(cache.path()).join("snapshots").join(COMMIT);
    assert!(!snap.join("model.safetensors").exists());
    let blobs: Vec<String> = std::fs::read_dir(repo_of(cache.path()).join("blobs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let lfs = etag("model.safetensors", &hub.files["model.safetensors"]);
    assert!(
        !blobs.iter().any(|b| b.starts_with(&lfs)),
        "corrupt bytes left in blobs: {blobs:?}"
    );
    // The next run gets the right bytes.
    let snap = resolve_with("o/m", &hub.env(cache.path())).unwrap();
    assert_files(&snap, &hub, &["model.safetensors"]);
}

#[test]
fn http_errors_say_what_to_do_and_5xx_is_retried() {
    // 500 twice, then the file: retried with backoff.
    let hub = FakeHub::start(single_repo());
    let cache = tempfile::tempdir().unwrap();
    hub.fault(
        "model.safetensors",
        Fault {
            status: Some((500, 2)),
            ..Default::default()
        },
    );
    let snap = resolve_with("o/m", &hub.env(cache.path())).unwrap();
    assert_files(&snap, &hub, &["model.safetensors"]);
    let tries = hub
        .log()
        .iter()
        .filter(|(p, _)| p.ends_with(&format!("resolve/{COMMIT}/model.safetensors")))
        .count();
    assert!(tries >= 3, "{tries} requests");

    // 404 on a shard the index names: the file and the repo, no retry.
    let mut files = sharded_repo();
    files.remove("model-00002-of-00002.safetensors");
    let hub = FakeHub::start(files);
    let cache = tempfile::tempdir().unwrap();
    let e = format!(
        "{:#}",
        resolve_with("o/m", &hub.env(cache.path())).unwrap_err()
    );
    assert!(
        e.contains("model-00002-of-00002.safetensors") && e.contains("o/m"),
        "{e}"
    );

    // 404 on the repo itself.
    let hub = FakeHub::start(single_repo());
    hub.state.lock().unwrap().all = Some(404);
    let e = format!(
        "{:#}",
        resolve_with("o/m", &hub.env(cache.path())).unwrap_err()
    );
    assert!(e.contains("not found") && e.contains("o/m"), "{e}");
    assert_eq!(hub.log().len(), 1, "a 404 is not retried");

    // 401: gated or private, how to log in; not retried.
    let hub = FakeHub::start(single_repo());
    hub.state.lock().unwrap().all = Some(401);
    let e = format!(
        "{:#}",
        resolve_with("o/m", &hub.env(cache.path())).unwrap_err()
    );
    assert!(
        e.contains("gated or private") && e.contains("HF_TOKEN"),
        "{e}"
    );
    assert_eq!(hub.log().len(), 1, "a 401 is not retried");

    // A repo with PyTorch weights only.
    let hub = FakeHub::start(HashMap::from([
        ("config.json".into(), b"{}".to_vec()),
        ("pytorch_model.bin".into(), random_bytes(100, 4)),
    ]));
    let e = format!(
        "{:#}",
        resolve_with("o/m", &hub.env(cache.path())).unwrap_err()
    );
    assert!(e.contains("only PyTorch weights"), "{e}");
}

#[test]
fn two_processes_download_the_same_model_at_once() {
    let hub = FakeHub::start(sharded_repo());
    for f in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        hub.fault(
            f,
            Fault {
                slow_ms: 5,
                ..Default::default()
            },
        );
    }
    let cache = tempfile::tempdir().unwrap();
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_qlora"))
            .args(["download", "o/m"])
            .env("HF_ENDPOINT", &hub.addr)
            .env("HF_HUB_CACHE", cache.path())
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_TOKEN")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    for o in [&a, &b] {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let snap = repo_of(cache.path()).join("snapshots").join(COMMIT);
    assert_eq!(
        String::from_utf8_lossy(&a.stdout).trim(),
        snap.display().to_string()
    );
    assert_eq!(a.stdout, b.stdout);
    assert_files(
        &snap,
        &hub,
        &[
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ],
    );
    // Each shard's body went over the wire once (the second process waited on the lock).
    let bodies = hub
        .log()
        .iter()
        .filter(|(p, r)| {
            p == "/cdn/model-00001-of-00002.safetensors" && r.as_deref() != Some("bytes=0-0")
        })
        .count();
    assert_eq!(bodies, 1);
}

#[test]
fn a_renamed_repo_is_followed_through_its_relative_redirects() {
    let hub = FakeHub::start(single_repo());
    let cache = tempfile::tempdir().unwrap();
    let snap = resolve_with("old/m", &hub.env(cache.path())).unwrap();
    assert_files(&snap, &hub, &["config.json", "model.safetensors"]);
    assert!(
        hub.log()
            .iter()
            .any(|(p, _)| p.starts_with("/old/m/resolve/"))
    );
}

#[test]
fn download_takes_a_revision() {
    let hub = FakeHub::start(single_repo());
    let cache = tempfile::tempdir().unwrap();
    let snap = download("o/m@v1.0", &hub.env(cache.path())).unwrap();
    assert_eq!(
        std::fs::read_to_string(repo_of(cache.path()).join("refs/v1.0")).unwrap(),
        COMMIT
    );
    assert!(
        hub.log()
            .iter()
            .any(|(p, _)| p == "/api/models/o/m/revision/v1.0")
    );
    // The revision's snapshot answers offline; main was never fetched.
    let mut off = hub.env(cache.path());
    off.offline = true;
    assert_eq!(resolve_with("o/m@v1.0", &off).unwrap(), snap);
    let mut buf = String::new();
    let _ = std::fs::File::open(snap.join("config.json"))
        .unwrap()
        .read_to_string(&mut buf);
    assert!(buf.contains("phi3"));
}
