//! Runs that end early lose nothing: the real `qlora train` binary on the built-in model is
//! stopped by signals at random moments of its steps (each stop: exit 75, a checkpoint, the
//! resume command) and resumed, or made to fail its n-th artifact write (`QLORA_FAULT_WRITE`:
//! exit 74, the path, no partial file, the earlier checkpoints whole) and resumed; either way the
//! final adapter is byte-identical to an uninterrupted run's. A disk too small for the run's disk
//! plan is refused before training (`QLORA_FAULT_FREE_BYTES`).

use rand::{Rng, SeedableRng};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_qlora");

/// `qlora train` on the demo: 8 steps of grad_accum 2, a checkpoint every 3 steps (the stops fall
/// between them too), an eval every 4, a log line every step.
pub fn train_args(out: &Path) -> Vec<String> {
    [
        "train",
        "--4bit",
        "--config",
        "configs/demo.toml",
        "--rank",
        "4",
        "--max-steps",
        "8",
        "--grad-accum",
        "2",
        "--set",
        "training.save_every=3",
        "--set",
        "training.eval_every=4",
        "--set",
        "training.log_every=1",
        "--output",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([out.display().to_string()])
    .collect()
}

pub fn resume_args(out: &Path) -> Vec<String> {
    vec!["train".into(), "--resume".into(), out.display().to_string()]
}

pub fn command(args: &[String], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .envs(env.iter().copied());
    c
}

pub fn text(o: &Output) -> String {
    format!(
        "{:?}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// An uninterrupted run's output (once per test binary).
pub fn reference() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let o = command(&train_args(&dir.path().join("run")), &[])
            .output()
            .unwrap();
        assert!(o.status.success(), "reference run: {}", text(&o));
        dir
    })
    .path()
}

pub fn adapter_bytes(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap()
}

/// Spawns `train` with stderr read line by line on a thread; returns the child and a receiver of
/// the lines.
fn spawn(args: &[String]) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = command(args, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

fn kill(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

#[test]
fn signals_at_random_moments_stop_cleanly_and_the_resumed_adapter_is_byte_identical() {
    let want = adapter_bytes(&reference().join("run"));
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let signals = [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1];
    let mut stops = 0;
    for round in 0.. {
        assert!(round < 12, "the run never finished (seed {seed})");
        let args = if round == 0 {
            train_args(&out)
        } else {
            resume_args(&out)
        };
        let (mut child, lines) = spawn(&args);
        let mut log = Vec::new();
        // Signal once a step has been logged (the handlers are in), at a random moment of the
        // steps that follow; three stops in all, then the run finishes.
        if stops < 3 {
            let t0 = Instant::now();
            while let Ok(l) = lines.recv_timeout(Duration::from_secs(120)) {
                let step = l.starts_with("step ");
                log.push(l);
                if step {
                    break;
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "no step logged: {log:?}"
            );
            std::thread::sleep(Duration::from_millis(rng.random_range(0..150)));
            kill(&child, signals[stops % 3]);
        }
        let status = child.wait().unwrap();
        log.extend(lines.iter());
        let log = log.join("\n");
        match status.code() {
            Some(0) => break,
            Some(75) => {
                stops += 1;
                let cmd = format!("train --resume {}", out.display());
                assert!(
                    log.contains("stopped by SIG") && log.contains(&cmd),
                    "the stop says how to resume: {log}"
                );
                let step: u64 = log
                    .split("after step ")
                    .nth(1)
                    .and_then(|s| s.split_whitespace().next())
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("{log}"));
                let ck = out.join(format!("checkpoints/step-{step:06}"));
                assert!(ck.join("state.json").exists(), "{}", ck.display());
            }
            other => panic!("exit {other:?} (seed {seed}): {log}"),
        }
    }
    assert!(stops >= 1, "no signal landed inside the run (seed {seed})");
    assert!(
        adapter_bytes(&out) == want,
        "the resumed adapter differs (seed {seed})"
    );
    assert_eq!(
        crate::trainer::train_losses(&out),
        crate::trainer::train_losses(&reference().join("run")),
        "loss curves (seed {seed})"
    );
}

#[test]
fn a_second_ctrl_c_exits_at_once_without_a_checkpoint() {
    // A long run (steps of 8 micro-batches, no periodic checkpoints): the second SIGINT lands
    // while the first one's step is still running. On a machine so loaded that the first lands
    // at a step's very end, that step's stop completes first (exit 75): tried again, up to 3 times.
    let tmp = tempfile::tempdir().unwrap();
    for attempt in 0..3 {
        let out = tmp.path().join(format!("run{attempt}"));
        let mut args = train_args(&out);
        for (flag, value) in [("--max-steps", "1000"), ("--grad-accum", "8")] {
            let at = args.iter().position(|a| a == flag).unwrap();
            args[at + 1] = value.into();
        }
        args.extend(["--set", "training.save_every=0"].map(String::from));
        let (mut child, lines) = spawn(&args);
        let mut log = Vec::new();
        for l in lines.iter() {
            let step = l.starts_with("step ");
            log.push(l);
            if step {
                break;
            }
        }
        // Into step 2 (about 0.6 s of 8 micro-batches here), then twice 20 ms apart.
        std::thread::sleep(Duration::from_millis(100));
        kill(&child, libc::SIGINT);
        std::thread::sleep(Duration::from_millis(20));
        kill(&child, libc::SIGINT);
        let status = child.wait().unwrap();
        log.extend(lines.iter());
        let log = log.join("\n");
        match status.code() {
            Some(130) => {
                assert!(
                    qlora::train::trainer::list_checkpoints(&out)
                        .unwrap()
                        .is_empty(),
                    "no checkpoint after a forced exit"
                );
                assert!(!log.contains("stopped by"), "{log}");
                return;
            }
            Some(75) => eprintln!("attempt {attempt}: the first SIGINT's stop finished first"),
            other => panic!("exit {other:?}: {log}"),
        }
    }
    panic!("a second SIGINT never exited at once");
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            all.extend(files(&p));
        }
        all.push(p);
    }
    all
}

/// What a failed write may leave: whole files only, under their final names, and whole
/// checkpoints.
fn assert_nothing_partial(out: &Path, what: &str) {
    for p in files(out) {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            !name.contains(".tmp-"),
            "{what}: a temporary remains: {}",
            p.display()
        );
        if name.ends_with(".safetensors") {
            let bytes = std::fs::read(&p).unwrap();
            safetensors::SafeTensors::deserialize(&bytes)
                .unwrap_or_else(|e| panic!("{what}: {} is not whole: {e}", p.display()));
        }
        if name.ends_with(".json") {
            serde_json::from_slice::<serde_json::Value>(&std::fs::read(&p).unwrap())
                .unwrap_or_else(|e| panic!("{what}: {} is not whole: {e}", p.display()));
        }
    }
    if let Ok(text) = std::fs::read_to_string(out.join("metrics.jsonl")) {
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{what}: a partial metrics line"
        );
        for l in text.lines() {
            serde_json::from_str::<serde_json::Value>(l).unwrap();
        }
    }
    for ck in qlora::train::trainer::list_checkpoints(out).unwrap() {
        for f in [
            "state.json",
            "optimizer.safetensors",
            "adapter/adapter_model.safetensors",
            "adapter/adapter_config.json",
        ] {
            assert!(ck.join(f).exists(), "{what}: {} lacks {f}", ck.display());
        }
    }
}

/// Finishes the run in `out` (resuming its checkpoint, or afresh when none was written) and
/// returns the final adapter's bytes.
pub fn finish(out: &Path) -> Vec<u8> {
    let args = if qlora::train::trainer::list_checkpoints(out)
        .unwrap()
        .is_empty()
    {
        train_args(out)
    } else {
        resume_args(out)
    };
    let o = command(&args, &[]).output().unwrap();
    assert!(
        o.status.success(),
        "finishing {}: {}",
        out.display(),
        text(&o)
    );
    adapter_bytes(out)
}

#[test]
fn a_failed_write_anywhere_names_the_file_leaves_nothing_partial_and_resumes() {
    let want = adapter_bytes(&reference().join("run"));
    let tmp = tempfile::tempdir().unwrap();
    // The run writes 22 times: the config (1), a metrics line per step and eval (2-4, 9-12,
    // 17-19), a checkpoint at steps 3 and 6 (adapter weights, adapter config, optimizer, state:
    // 5-8, 13-16), the final adapter (20-21) and the plot (22). Write n fails, and every later
    // one (as on a disk that stays full), as ENOSPC or as a read-only filesystem.
    let faults = [
        (1, "enospc", "config.resolved.toml"),
        (3, "erofs", "metrics.jsonl"),
        (5, "enospc", "adapter_model.safetensors"),
        (7, "erofs", "optimizer.safetensors"),
        (10, "enospc", "metrics.jsonl"),
        (15, "enospc", "optimizer.safetensors"),
        (16, "erofs", "state.json"),
        (20, "enospc", "adapter_model.safetensors"),
        (22, "erofs", "loss.svg"),
    ];
    for (n, kind, file) in faults {
        let out = tmp.path().join(format!("run{n}"));
        let fault = format!("{n}:{kind}");
        let o = command(&train_args(&out), &[("QLORA_FAULT_WRITE", &fault)])
            .output()
            .unwrap();
        let msg = text(&o);
        assert_eq!(o.status.code(), Some(74), "write {n}: {msg}");
        let said = if kind == "enospc" {
            "no space left on device"
        } else {
            "the filesystem is read-only"
        };
        assert!(
            msg.contains(&format!("/{file}: {said}")),
            "write {n}, {file}: {msg}"
        );
        assert!(msg.contains(&out.display().to_string()), "the path: {msg}");
        if kind == "enospc" {
            assert!(msg.contains("the file needs"), "the bytes: {msg}");
        }
        if !qlora::train::trainer::list_checkpoints(&out)
            .unwrap()
            .is_empty()
        {
            assert!(msg.contains("resume with:"), "write {n}: {msg}");
        }
        assert_nothing_partial(&out, &format!("write {n}"));
        assert!(
            finish(&out) == want,
            "write {n}: the finished adapter differs"
        );
    }
    // 22 writes in all: the 23rd is never reached.
    let o = command(
        &train_args(&tmp.path().join("all")),
        &[("QLORA_FAULT_WRITE", "23")],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_disk_too_small_for_the_plan_is_refused_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let small = [("QLORA_FAULT_FREE_BYTES", "100000")];
    let o = command(&train_args(&out), &small).output().unwrap();
    let msg = text(&o);
    assert_eq!(o.status.code(), Some(2), "{msg}");
    assert!(
        msg.contains("does not fit on disk")
            && msg.contains("--force")
            && msg.contains("100000 bytes")
            && msg.contains("checkpoints of"),
        "{msg}"
    );
    assert!(
        !out.join("metrics.jsonl").exists(),
        "refused before training"
    );
    // `qlora plan` says the same, exit 1.
    let mut plan = train_args(&out);
    plan[0] = "plan".into();
    plan.push("--json".into());
    let o = command(&plan, &small).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["disk_fits"], false);
    assert_eq!(v["disk_free_bytes"], 100000);
    // Forced, it trains (this disk has the room).
    let mut forced = train_args(&out);
    forced.push("--force".into());
    let o = command(&forced, &small).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // The prediction bounds what was written, and the exact parts (the safetensors files) keep
    // it close: one checkpoint within the JSON files' allowance of the plan.
    let peak = v["disk"]["peak_bytes"].as_u64().unwrap();
    let ck = v["disk"]["checkpoint_bytes"].as_u64().unwrap();
    let wrote = qlora::fsx::disk::tree_bytes(&out);
    assert!(wrote <= peak, "wrote {wrote} > planned {peak}");
    let one = qlora::fsx::disk::tree_bytes(&out.join("checkpoints/step-000006"));
    let slack = 2 * qlora::plan::disk::JSON_BYTES;
    assert!(
        one <= ck && ck - one <= slack,
        "checkpoint {one} vs planned {ck}"
    );
}

/// `qlora export` of `adapter` merged as `format` into `out`, without the quick verify.
fn export_args(adapter: &str, format: &str, out: &Path) -> Vec<String> {
    [
        "export",
        "--adapter",
        adapter,
        "--format",
        format,
        "--no-verify",
        "--out",
        out.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn a_failed_export_write_names_the_file_and_leaves_nothing_behind() {
    let adapter = reference().join("run/adapter").display().to_string();
    let tmp = tempfile::tempdir().unwrap();
    for (format, out, fault) in [
        ("safetensors", "merged", "2"),
        ("gguf", "merged.gguf", "1:erofs"),
    ] {
        let path = tmp.path().join(out);
        let args = export_args(&adapter, format, &path);
        let o = command(&args, &[("QLORA_FAULT_WRITE", fault)])
            .output()
            .unwrap();
        let msg = text(&o);
        assert_eq!(o.status.code(), Some(74), "{format}: {msg}");
        assert!(
            msg.contains(&tmp.path().display().to_string())
                && (msg.contains("no space left on device; the file needs")
                    || msg.contains("the filesystem is read-only")),
            "{format}: {msg}"
        );
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().collect();
        assert!(left.is_empty(), "{format}: {left:?} left behind");
    }
}

/// An export its filesystem has no room for is refused before anything is written, with the
/// exact size the file would have had: the size of the same export written with room.
#[test]
fn an_export_that_cannot_fit_is_not_started_and_names_its_exact_size() {
    let adapter = reference().join("run/adapter").display().to_string();
    let tmp = tempfile::tempdir().unwrap();
    for (format, out) in [("safetensors", "merged"), ("gguf", "merged.gguf")] {
        let path = tmp.path().join(out);
        let args = |p: &Path| export_args(&adapter, format, p);
        let o = command(&args(&path), &[("QLORA_FAULT_FREE_BYTES", "1000")])
            .output()
            .unwrap();
        let msg = text(&o);
        assert_eq!(o.status.code(), Some(74), "{format}: {msg}");
        assert!(
            std::fs::read_dir(tmp.path()).unwrap().next().is_none(),
            "{format}: something was written"
        );
        let o = command(&args(&path), &[]).output().unwrap();
        assert!(o.status.success(), "{format}: {}", text(&o));
        // The weights' bytes: the whole GGUF, or the merged directory's safetensors files.
        let written: u64 = if path.is_dir() {
            std::fs::read_dir(&path)
                .unwrap()
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .map(|e| e.metadata().unwrap().len())
                .sum()
        } else {
            std::fs::metadata(&path).unwrap().len()
        };
        assert!(
            msg.contains(&format!(
                "no space left on device; the file needs {written} bytes"
            )) && msg.contains("has 1000 bytes (1.0 KiB) free"),
            "{format}: wrote {written}: {msg}"
        );
        std::fs::remove_dir_all(&path)
            .or_else(|_| std::fs::remove_file(&path))
            .unwrap();
    }
}
