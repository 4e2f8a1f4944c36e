//! A hostile Hub (the loopback server of `hub.rs`): names with `../` components, absolute names, a
//! `../` commit id, links planted in a snapshot, a server that echoes the token. Each gets one
//! clear error; nothing is created, changed or read outside the cache; the token never shows.

use crate::hub::{COMMIT, FakeHub, Fault, repo_of, sharded_repo, single_repo};
use qlora::hub::{download, missing_files, resolve_with};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Every file under `dir` but those under `skip`, with its bytes.
fn files_outside(dir: &Path, skip: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.starts_with(skip) {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    out
}

/// The sharded repo of `hub.rs` with its second shard renamed `shard` in the index, the file list
/// and the files served.
fn repo_naming(shard: &str) -> HashMap<String, Vec<u8>> {
    let mut files = sharded_repo();
    let second = files.remove("model-00002-of-00002.safetensors").unwrap();
    files.insert(shard.to_string(), second);
    let index = serde_json::json!({
        "metadata": {},
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": shard,
        }
    });
    files.insert(
        "model.safetensors.index.json".into(),
        index.to_string().into_bytes(),
    );
    files
}

#[test]
fn hostile_shard_names_are_refused_and_nothing_leaves_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    // Local files a hostile name aims at: one to be read as the model, one to be replaced.
    let local = tmp.path().join("local");
    std::fs::create_dir(&local).unwrap();
    std::fs::write(local.join("secret.safetensors"), b"local secret").unwrap();
    std::fs::write(tmp.path().join("existing.safetensors"), b"keep me").unwrap();
    let absolute = local.join("secret.safetensors").display().to_string();
    // From snapshots/<commit>/: four levels up is `tmp`.
    let cases = [
        ("../../../../escape.safetensors", ".."),
        ("../../../../existing.safetensors", ".."),
        ("sub/../../../../../existing.safetensors", ".."),
        (absolute.as_str(), "absolute"),
        ("C:\\model.safetensors", "backslash"),
    ];
    for (shard, why) in cases {
        let _ = std::fs::remove_dir_all(&cache);
        let before = files_outside(tmp.path(), &cache);
        let hub = FakeHub::start(repo_naming(shard));
        let e = format!("{:#}", download("o/m", &hub.env(&cache)).unwrap_err());
        assert!(
            e.contains("names a shard") && e.contains(&format!("{shard:?}")) && e.contains(why),
            "{shard}: {e}"
        );
        assert_eq!(
            files_outside(tmp.path(), &cache),
            before,
            "{shard}: something outside the cache changed"
        );
        // No request ever asked for the hostile name, and the offline resolve refuses the
        // snapshot, naming the shard and why.
        assert!(
            !hub.log().iter().any(|(p, _)| p.contains("escape")
                || p.contains("existing")
                || p.contains("secret")),
            "{shard}: {:?}",
            hub.log()
        );
        let snap = repo_of(&cache).join("snapshots").join(COMMIT);
        let missing = missing_files(&snap);
        assert!(
            missing
                .iter()
                .any(|m| m.starts_with(shard) && m.contains('(')),
            "{shard}: {missing:?}"
        );
        let mut off = hub.env(&cache);
        off.offline = true;
        let e = format!("{:#}", resolve_with("o/m", &off).unwrap_err());
        assert!(e.contains("incomplete") && e.contains(shard), "{e}");
    }
    assert_eq!(
        std::fs::read(tmp.path().join("existing.safetensors")).unwrap(),
        b"keep me"
    );
}

#[test]
fn a_hostile_commit_id_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    for commit in ["../../../../evil", "/abs", "a/b", ".."] {
        let hub = FakeHub::start(single_repo());
        hub.state.lock().unwrap().commit = Some(commit.into());
        let e = format!("{:#}", download("o/m", &hub.env(&cache)).unwrap_err());
        assert!(
            e.contains("commit id") && e.contains(&format!("{commit:?}")),
            "{commit}: {e}"
        );
        assert_eq!(
            files_outside(tmp.path(), &cache),
            BTreeMap::new(),
            "{commit}"
        );
        assert!(!tmp.path().join("evil").exists());
    }
}

#[cfg(unix)]
#[test]
fn a_link_planted_in_a_snapshot_is_never_taken_as_downloaded() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let secret = tmp.path().join("secret.safetensors");
    std::fs::write(&secret, b"local secret").unwrap();
    let hub = FakeHub::start(single_repo());
    let snap = repo_of(&cache).join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    std::os::unix::fs::symlink(&secret, snap.join("model.safetensors")).unwrap();
    // Offline, the snapshot is incomplete, and says why.
    let mut off = hub.env(&cache);
    off.offline = true;
    let e = format!("{:#}", resolve_with("o/m", &off).unwrap_err());
    assert!(
        e.contains("model.safetensors") && e.contains("outside the repo's blobs"),
        "{e}"
    );
    // Online, the download stops at the link instead of reading or replacing what it points to.
    let e = format!("{:#}", download("o/m", &hub.env(&cache)).unwrap_err());
    assert!(
        e.contains("model.safetensors")
            && e.contains("outside the repo's blobs")
            && e.contains("remove it"),
        "{e}"
    );
    assert_eq!(std::fs::read(&secret).unwrap(), b"local secret");
    // A directory link inside the snapshot cannot carry a shard out either.
    std::fs::remove_file(snap.join("model.safetensors")).unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, snap.join("sub")).unwrap();
    let hub = FakeHub::start(repo_naming("sub/model-00002.safetensors"));
    let e = format!("{:#}", download("o/m", &hub.env(&cache)).unwrap_err());
    assert!(e.contains("directory link"), "{e}");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    // Once the planted links are gone, the same cache downloads cleanly.
    std::fs::remove_file(snap.join("sub")).unwrap();
    std::fs::remove_file(snap.join("model.safetensors.index.json")).unwrap();
    let hub = FakeHub::start(single_repo());
    let got = download("o/m", &hub.env(&cache)).unwrap();
    assert!(missing_files(&got).is_empty());
}

#[test]
fn the_token_never_shows_in_errors_logs_or_run_files() {
    let token = "hf_TESTtoken0123456789secret";
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    // A real (tiny) checkpoint on the Hub: the built-in model's files.
    let model = tmp.path().join("model");
    qlora::builtin::materialize(&model).unwrap();
    let files: HashMap<String, Vec<u8>> = std::fs::read_dir(&model)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    let hub = FakeHub::start(files);
    // The server echoes the Authorization header in 5xx bodies: twice for the config (retried,
    // logged), then forever for the tokenizer config of a second repo (the final error).
    hub.fault(
        "config.json",
        Fault {
            echo_auth: 2,
            ..Default::default()
        },
    );
    let out = tmp.path().join("run");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_qlora"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["train", "--config", "configs/demo.toml", "--model", "o/m"])
        .args(["--max-steps", "2", "--output"])
        .arg(&out)
        .args(["--set", "training.save_every=1"])
        .env("HF_ENDPOINT", &hub.addr)
        .env("HF_HUB_CACHE", &cache)
        .env("HF_TOKEN", token)
        .env("QLORA_HUB_RETRIES", "3")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
    );
    assert!(run.status.success(), "{stdout}{stderr}");
    // The echo happened, and was redacted in the retry lines.
    assert!(stderr.contains("Bearer hf_***"), "{stderr}");
    assert!(!stdout.contains(token) && !stderr.contains(token));
    let written = files_outside(&out, &tmp.path().join("none"));
    assert!(written.keys().any(|p| p.ends_with("config.resolved.toml")));
    assert!(written.keys().any(|p| p.ends_with("metrics.jsonl")));
    for (p, bytes) in &written {
        assert!(
            !String::from_utf8_lossy(bytes).contains(token),
            "{} holds the token",
            p.display()
        );
    }
    // A final error quoting a body that echoes the token.
    hub.fault(
        "tokenizer_config.json",
        Fault {
            echo_auth: usize::MAX,
            ..Default::default()
        },
    );
    let cache2 = tmp.path().join("cache2");
    let mut env = hub.env(&cache2);
    env.token = Some(token.into());
    env.retries = 1;
    let e = format!("{:?}", download("o/m", &env).unwrap_err());
    assert!(e.contains("hf_***") && !e.contains(token), "{e}");
}

#[test]
fn a_download_that_cannot_fit_is_not_started_and_says_what_it_needs() {
    let hub = FakeHub::start(single_repo());
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let run = |free: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_qlora"))
            .args(["download", "o/m"])
            .env("HF_ENDPOINT", &hub.addr)
            .env("HF_HUB_CACHE", &cache)
            .env("QLORA_FAULT_FREE_BYTES", free)
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_TOKEN")
            .output()
            .unwrap()
    };
    // 1000 bytes free: the small files fit, the 3 MB weights do not.
    let out = run("1000");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(74), "{stderr}");
    assert!(
        stderr.contains("downloading model.safetensors")
            && stderr.contains("no space left on device; the file needs 3000000 bytes")
            && stderr.contains("has 1000 bytes (1.0 KiB) free"),
        "{stderr}"
    );
    // No body request was made for it, and nothing partial is in the snapshot.
    assert!(
        !hub.log()
            .iter()
            .any(|(p, r)| p == "/cdn/model.safetensors" && r.as_deref() != Some("bytes=0-0"))
    );
    let snap = repo_of(&cache).join("snapshots").join(COMMIT);
    assert!(!snap.join("model.safetensors").exists());
    // With room, the same command finishes the snapshot.
    let out = run("100000000000");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(missing_files(&snap).is_empty());
}
