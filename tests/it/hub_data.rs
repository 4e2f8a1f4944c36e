//! Hub datasets against the loopback Hub of hub.rs: a split's Parquet shards found in the repo's
//! file list and downloaded into the Hugging Face cache's dataset layout, the Parquet conversion
//! branch for a repo without data files, the cache read offline, a missing split named with the
//! ones there are, and `qlora train --data hf://datasets/…` killed mid-file, resumed and trained.

use super::hub::{COMMIT, CONVERT_COMMIT, FakeHub, Fault};
use qlora::hub::HubEnv;
use qlora::hub::dataset::{DatasetRef, resolve};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn sample(name: &str) -> Vec<u8> {
    std::fs::read(crate::common::repo_dir().join("data/formats").join(name)).unwrap()
}

/// A dataset pushed the way `push_to_hub` lays it out: two train shards (ShareGPT and Alpaca
/// rows, written by pyarrow) and a test shard.
fn pushed() -> HashMap<String, Vec<u8>> {
    HashMap::from([
        ("README.md".into(), b"---\nlicense: mit\n---\n".to_vec()),
        (
            "data/train-00000-of-00002.parquet".into(),
            sample("sharegpt.parquet"),
        ),
        (
            "data/train-00001-of-00002.parquet".into(),
            sample("alpaca.parquet"),
        ),
        (
            "data/test-00000-of-00001.parquet".into(),
            sample("sharegpt.parquet"),
        ),
        (".gitattributes".into(), b"*.parquet filter=lfs".to_vec()),
    ])
}

fn dataset(spec: &str) -> DatasetRef {
    DatasetRef::parse(spec).unwrap().unwrap()
}

fn repo(cache: &Path) -> PathBuf {
    cache.join("datasets--o--d")
}

#[test]
fn a_split_downloads_into_the_dataset_layout_and_reads_offline_after() {
    let hub = FakeHub::start(pushed());
    let cache = tempfile::tempdir().unwrap();
    let env = hub.env(cache.path());
    let d = dataset("hf://datasets/o/d");
    let files = resolve(&d, "train", &env).unwrap();
    let snap = repo(cache.path()).join("snapshots").join(COMMIT);
    assert_eq!(
        files,
        [
            snap.join("data/train-00000-of-00002.parquet"),
            snap.join("data/train-00001-of-00002.parquet")
        ]
    );
    for f in &files {
        let name = f.strip_prefix(&snap).unwrap().to_string_lossy().to_string();
        assert_eq!(std::fs::read(f).unwrap(), hub.files[&name], "{name}");
        // huggingface_hub's layout: a relative link into blobs/, named by the sha256.
        let target = std::fs::read_link(f).unwrap();
        assert!(target.starts_with("../../../blobs"), "{}", target.display());
        let sha = format!("{:x}", Sha256::digest(&hub.files[&name]));
        assert!(repo(cache.path()).join("blobs").join(sha).is_file());
    }
    assert_eq!(
        std::fs::read_to_string(repo(cache.path()).join("refs/main")).unwrap(),
        COMMIT
    );
    // Only the split asked for went over the wire.
    assert!(!hub.log().iter().any(|(p, _)| p.contains("test-00000")));
    // Offline: the cache answers, and a split not there is named.
    let offline = HubEnv::offline_at(cache.path());
    let before = hub.log().len();
    assert_eq!(resolve(&d, "train", &offline).unwrap(), files);
    assert_eq!(hub.log().len(), before, "offline went online");
    let e = format!("{:#}", resolve(&d, "test", &offline).unwrap_err());
    assert!(
        e.contains("split `test`") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
    // Online, the test split joins the same snapshot; a split the dataset lacks lists those it has.
    let test = resolve(&d, "test", &env).unwrap();
    assert_eq!(test, [snap.join("data/test-00000-of-00001.parquet")]);
    let e = format!("{:#}", resolve(&d, "validation", &env).unwrap_err());
    assert!(
        e.contains("no split `validation`") && e.contains("its splits: test, train"),
        "{e}"
    );
    // A shard missing from the cache sends the next run online (it is fetched again).
    std::fs::remove_file(&files[1]).unwrap();
    let e = format!("{:#}", resolve(&d, "train", &offline).unwrap_err());
    assert!(e.contains("not (all) in the Hugging Face cache"), "{e}");
    assert_eq!(resolve(&d, "train", &env).unwrap(), files);
}

#[test]
fn a_repo_without_data_files_is_read_through_its_parquet_conversion() {
    let hub = FakeHub::start(HashMap::from([
        ("README.md".into(), b"# a dataset with a script".to_vec()),
        ("d.py".into(), b"import datasets".to_vec()),
        (
            "convert:default/train/0000.parquet".into(),
            sample("alpaca.parquet"),
        ),
        (
            "convert:default/validation/0000.parquet".into(),
            sample("sharegpt.parquet"),
        ),
    ]));
    let cache = tempfile::tempdir().unwrap();
    let env = hub.env(cache.path());
    let d = dataset("hf://datasets/o/d");
    let files = resolve(&d, "validation", &env).unwrap();
    let snap = repo(cache.path()).join("snapshots").join(CONVERT_COMMIT);
    assert_eq!(files, [snap.join("default/validation/0000.parquet")]);
    assert_eq!(
        std::fs::read(&files[0]).unwrap(),
        sample("sharegpt.parquet")
    );
    // huggingface_hub keeps a revision's ref at refs/<revision>: refs/refs/convert/parquet.
    assert_eq!(
        std::fs::read_to_string(repo(cache.path()).join("refs/refs/convert/parquet")).unwrap(),
        CONVERT_COMMIT
    );
    assert_eq!(
        resolve(&d, "validation", &HubEnv::offline_at(cache.path())).unwrap(),
        files
    );
    let e = format!(
        "{:#}",
        resolve(&dataset("hf://datasets/o/d/fr"), "train", &env).unwrap_err()
    );
    assert!(e.contains("its configs: default"), "{e}");
}

#[test]
fn train_on_a_hub_dataset_killed_mid_download_resumes_and_trains() {
    let hub = FakeHub::start(pushed());
    let shard = "data/train-00001-of-00002.parquet";
    let cut = 700;
    hub.fault(
        shard,
        Fault {
            stall_after: Some((cut, 1)),
            ..Default::default()
        },
    );
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hf");
    let run = |out: &str, offline: bool| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_qlora"));
        c.current_dir(env!("CARGO_MANIFEST_DIR"))
            .args([
                "train",
                "--data",
                "hf://datasets/o/d",
                "--eval-split",
                "test",
                "--max-steps",
                "2",
                "--max-seq-len",
                "256",
                "--output",
            ])
            .arg(tmp.path().join(out))
            .env("HF_ENDPOINT", &hub.addr)
            .env("HF_HUB_CACHE", &cache)
            .env_remove("HF_TOKEN")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if offline {
            c.env("HF_HUB_OFFLINE", "1");
        } else {
            c.env_remove("HF_HUB_OFFLINE");
        }
        c
    };
    let sha = format!("{:x}", Sha256::digest(&hub.files[shard]));
    let part = repo(&cache).join("blobs").join(format!("{sha}.part"));
    let mut child = run("a", false).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while std::fs::metadata(&part).map_or(0, |m| m.len()) < cut as u64 {
        assert!(
            t0.elapsed().as_secs() < 120,
            "the download never reached the stall"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let snap = repo(&cache).join("snapshots").join(COMMIT);
    assert!(
        !snap.join(shard).exists(),
        "a cut file reached the snapshot"
    );
    assert!(!repo(&cache).join("refs/main").exists());
    // Run again: the cut file resumes from its last byte, and training runs.
    let out = run("a", false).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        hub.log()
            .iter()
            .any(|(p, r)| p.ends_with(shard) && r.as_deref() == Some(&format!("bytes={cut}-"))),
        "no resumed request: {:?}",
        hub.log()
    );
    assert_eq!(std::fs::read(snap.join(shard)).unwrap(), hub.files[shard]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("done: 2 steps"), "{stdout}");
    assert!(stdout.contains("eval loss"), "{stdout}");
    // Offline afterwards: the cache is enough.
    let before = hub.log().len();
    let out = run("b", true).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(hub.log().len(), before);
}
