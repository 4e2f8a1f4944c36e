//! Data-parallel training under `mpirun` (cargo feature `mpi`; Debian's OpenMPI): two ranks of
//! batch 1 against one process of batch 2 on the built-in demo (dropout on, so the masks' global
//! numbering is exercised), a rank killed mid-run, and a 2-rank checkpoint resumed by one process.
//!
//! The bound: one process sums a micro-batch's two rows inside each op, two ranks sum them in one
//! all-reduce, so losses and adapters agree to float summation order, not bit for bit. Measured
//! here (6 steps): per-step losses within 7e-8 relative (train and eval), adapter weights within
//! 1.5e-5 of each tensor's largest entry (AdamW's normalization magnifies the last bits of tiny
//! gradients). The tests allow 1e-6 and 1e-4. Dropout (p = 0.1) moves the loss of step 2 by 1e-5
//! relative, so masks drawn for the wrong rows would fail the loss bound.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_qlora");

/// `qlora train` on the demo config into `out`, with `extra` flags.
fn train_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--4bit",
        "--config",
        "configs/demo.toml",
        "--rank",
        "4",
        "--dropout",
        "0.1",
        "--set",
        "training.eval_every=3",
        "--set",
        "training.save_every=1",
        "--set",
        "training.keep_last=10",
        "--output",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(out.display().to_string());
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// One process.
fn single(args: &[String]) -> Output {
    Command::new(BIN)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap()
}

/// `mpirun -np 2 qlora …`.
fn mpirun_cmd(args: &[String]) -> Command {
    mpirun_np(2, args)
}

/// `mpirun -np N qlora …` (as root in CI containers: --allow-run-as-root; ranks on however many
/// cores: --oversubscribe, no binding; one thread each).
fn mpirun_np(np: u32, args: &[String]) -> Command {
    let mut c = Command::new("mpirun");
    c.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "--bind-to",
            "none",
            "-x",
            "RAYON_NUM_THREADS=1",
            "-np",
            &np.to_string(),
            BIN,
        ])
        .args(args);
    c
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {:?}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `(step, loss)` of the train lines of a run's metrics.jsonl.
fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|m| m["kind"] == "train")
        .map(|m| (m["step"].as_u64().unwrap(), m["loss"].as_f64().unwrap()))
        .collect()
}

fn assert_curves_close(got: &[(u64, f64)], want: &[(u64, f64)], what: &str) {
    assert_eq!(
        got.iter().map(|m| m.0).collect::<Vec<_>>(),
        want.iter().map(|m| m.0).collect::<Vec<_>>(),
        "{what}: steps"
    );
    for (g, w) in got.iter().zip(want) {
        let rel = (g.1 - w.1).abs() / w.1.abs();
        assert!(
            rel < 1e-6,
            "{what}: step {} loss {} vs {} ({rel:e})",
            g.0,
            g.1,
            w.1
        );
    }
}

/// The adapter tensors of `dir/adapter_model.safetensors`, by name.
fn adapter(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let data: Vec<f32> = match t.dtype() {
                safetensors::Dtype::F32 => t
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                d => panic!("{name}: {d:?}"),
            };
            (name, data)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn assert_adapters_close(got: &Path, want: &Path) {
    let (g, w) = (adapter(got), adapter(want));
    assert_eq!(g.len(), w.len());
    for ((gn, gv), (wn, wv)) in g.iter().zip(&w) {
        assert_eq!(gn, wn);
        let scale = wv.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        let d = gv
            .iter()
            .zip(wv)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(d <= 1e-4 * scale, "{gn}: max |Δ| {d:e} of {scale:e}");
    }
}

/// Trains `extra` on one process of batch `one_batch` and on 2 ranks of `rank_batch` each, and
/// asserts that both give the same loss curve and adapter (to summation order); returns the two
/// outputs and mpirun's output.
fn two_ranks_against_one(
    tmp: &Path,
    one_batch: &str,
    rank_batch: &str,
    extra: &[&str],
) -> (PathBuf, PathBuf, Output) {
    let (one, two) = (tmp.join("one"), tmp.join("two"));
    let args = |out: &Path, b: &str, dist: &str| {
        let mut v = vec!["--batch-size", b, "--dist", dist];
        v.extend_from_slice(extra);
        train_args(out, &v)
    };
    ok(&single(&args(&one, one_batch, "none")), "1 process");
    let o = mpirun_cmd(&args(&two, rank_batch, "mpi")).output().unwrap();
    ok(&o, "2 ranks");
    let (a, b) = (losses(&one), losses(&two));
    assert_curves_close(&b, &a, "2 ranks vs 1 process");
    assert_adapters_close(&two.join("adapter"), &one.join("adapter"));
    (one, two, o)
}

#[test]
fn two_ranks_of_batch_one_train_what_one_process_of_batch_two_does() {
    let tmp = tempfile::tempdir().unwrap();
    // Dropout is on (train_args): masks drawn for the wrong rows would fail the loss bound.
    let (one, two, o) = two_ranks_against_one(tmp.path(), "2", "1", &["--max-steps", "6"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        stdout.matches("done: 6 steps").count(),
        1,
        "rank 0 alone reports: {stdout}"
    );
    let a = losses(&one);
    assert_eq!(a.len(), 6);
    // One rank under mpirun runs every collective of the step and changes no bit: a sum over one
    // rank is the value itself.
    let solo = tmp.path().join("solo");
    let solo_args = train_args(
        &solo,
        &["--batch-size", "2", "--max-steps", "6", "--dist", "mpi"],
    );
    ok(
        &mpirun_np(1, &solo_args).output().unwrap(),
        "1 rank under mpirun",
    );
    assert_eq!(losses(&solo), a, "1 rank under mpirun vs 1 process");
    // Rank 0 alone wrote; every file is where one process puts it.
    for f in [
        "adapter/adapter_config.json",
        "loss.svg",
        "config.resolved.toml",
    ] {
        assert!(two.join(f).exists(), "{f}");
    }
}

#[test]
fn a_two_rank_checkpoint_resumes_on_one_process_along_the_same_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let (full, split) = (tmp.path().join("full"), tmp.path().join("split"));
    ok(
        &mpirun_cmd(&train_args(
            &full,
            &["--batch-size", "1", "--max-steps", "6", "--dist", "mpi"],
        ))
        .output()
        .unwrap(),
        "2 ranks, uninterrupted",
    );
    ok(
        &mpirun_cmd(&train_args(
            &split,
            &[
                "--batch-size",
                "1",
                "--max-steps",
                "6",
                "--dist",
                "mpi",
                "--stop-after-steps",
                "3",
            ],
        ))
        .output()
        .unwrap(),
        "2 ranks, stopped after step 3",
    );
    // One process takes the checkpoint's global micro-batch of 2 rows whole.
    let o = single(&[
        "train".to_string(),
        "--resume".into(),
        split.display().to_string(),
        "--dist".into(),
        "none".into(),
    ]);
    ok(&o, "resumed on 1 process");
    assert_curves_close(&losses(&split), &losses(&full), "resumed vs uninterrupted");
    assert_adapters_close(&split.join("adapter"), &full.join("adapter"));
}

/// The pid of the process whose environment says it is MPI rank `rank` and whose command line
/// names `out`.
fn rank_pid(out: &Path, rank: u32) -> Option<u32> {
    let needle = out.display().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let env = std::fs::read(e.path().join("environ")).ok()?;
        let has = |hay: &[u8], s: &str| hay.windows(s.len()).any(|w| w == s.as_bytes());
        (has(&cmd, &needle)
            && !has(&cmd, "mpirun")
            && has(&env, &format!("OMPI_COMM_WORLD_RANK={rank}\0")))
        .then_some(pid)
    })
}

#[test]
fn killing_a_rank_ends_the_job_with_an_error_and_no_corrupt_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut child = mpirun_cmd(&train_args(
        &out,
        &[
            "--batch-size",
            "1",
            "--max-steps",
            "100000",
            "--dist",
            "mpi",
        ],
    ))
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let t0 = Instant::now();
    let ckpts = out.join("checkpoints");
    while std::fs::read_dir(&ckpts).map_or(0, |d| d.count()) < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoints after 120 s"
        );
        assert!(child.try_wait().unwrap().is_none(), "the job ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = rank_pid(&out, 1).expect("rank 1's process");
    // SAFETY: kill(2) on a pid this test found.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let t1 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(60),
            "the job still runs 60 s after rank 1 was killed"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let o = child.wait_with_output().unwrap();
    assert!(!status.success(), "the job must fail when a rank dies");
    let msg = String::from_utf8_lossy(&o.stderr) + String::from_utf8_lossy(&o.stdout);
    assert!(
        msg.contains("rank 1") || msg.contains("signal 9") || msg.contains("Killed"),
        "the error names the rank or its signal: {msg}"
    );
    // Every checkpoint is whole (written to a temp dir and renamed), so the run resumes.
    let mut all: Vec<PathBuf> = std::fs::read_dir(&ckpts)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("step-")
        })
        .collect();
    all.sort();
    assert!(!all.is_empty());
    for ck in &all {
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(ck.join("state.json")).unwrap()).unwrap();
        assert_eq!(state["global_micro_batch"], 2, "{}", ck.display());
        assert!(ck.join("optimizer.safetensors").exists());
        assert!(ck.join("adapter/adapter_model.safetensors").exists());
    }
    let step: u64 = all.last().unwrap().file_name().unwrap().to_str().unwrap()[5..]
        .parse()
        .unwrap();
    let o = single(&[
        "train".into(),
        "--resume".into(),
        out.display().to_string(),
        "--dist".into(),
        "none".into(),
        "--stop-after-steps".into(),
        (step + 1).to_string(),
    ]);
    ok(&o, "resume after the kill");
}

#[test]
fn a_rank_that_fails_ends_every_rank_with_a_message_naming_it() {
    // MPMD: rank 1 gets other training data (so another config), which the start-up check refuses
    // on rank 1; its
    // error must end rank 0 too (MPI_Abort), not leave it waiting in a collective.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let demo = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/demo/train.jsonl"),
    )
    .unwrap();
    let other = tmp.path().join("other.jsonl");
    let lines: Vec<&str> = demo.lines().collect();
    std::fs::write(&other, lines[..lines.len() - 1].join("\n")).unwrap();
    let base = train_args(
        &out,
        &["--batch-size", "1", "--max-steps", "4", "--dist", "mpi"],
    );
    let mut c = Command::new("mpirun");
    c.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "--bind-to",
            "none",
        ])
        .args(["-np", "1", BIN])
        .args(&base)
        .args([":", "-np", "1", BIN])
        .args(&base)
        .args(["--data", other.to_str().unwrap()]);
    let t0 = Instant::now();
    let o = c.output().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(120));
    assert!(!o.status.success());
    let msg = String::from_utf8_lossy(&o.stderr) + String::from_utf8_lossy(&o.stdout);
    assert!(
        msg.contains("rank 1 of 2 (mpi): error") && msg.contains("config differs from rank 0's"),
        "{msg}"
    );
    assert!(!out.join("adapter").exists());
}

#[test]
fn accumulation_and_an_epochs_short_last_batch_match_too() {
    // The demo packed at 48 tokens is 29 rows, in global micro-batches of 4: each epoch's last one
    // has a single row, so rank 1 has none and adds zeros; two micro-batches per step.
    let tmp = tempfile::tempdir().unwrap();
    let (one, _, _) = two_ranks_against_one(
        tmp.path(),
        "4",
        "2",
        &[
            "--grad-accum",
            "2",
            "--max-steps",
            "8",
            "--max-seq-len",
            "48",
        ],
    );
    assert_eq!(losses(&one).len(), 8);
}

#[test]
fn dora_trains_the_same_on_two_ranks() {
    // The magnitudes' gradients ride the same all-reduce as A's and B's; dropout on, so each
    // rank's DoRA takes PEFT's second base product on its own rows' masks.
    let tmp = tempfile::tempdir().unwrap();
    let (one, _, _) =
        two_ranks_against_one(tmp.path(), "2", "1", &["--max-steps", "4", "--use-dora"]);
    let names: Vec<String> = adapter(&one.join("adapter"))
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(
        names.iter().any(|n| n.ends_with(".lora_magnitude_vector")),
        "{names:?}"
    );
}

#[test]
fn embedding_and_head_training_trains_the_same_on_two_ranks() {
    // An embedding LoRA and a head copy: their gradients (scattered by token, and from the fused
    // head pass) ride the same all-reduce as the block adapters'.
    let tmp = tempfile::tempdir().unwrap();
    let (one, _, _) = two_ranks_against_one(
        tmp.path(),
        "2",
        "1",
        &[
            "--max-steps",
            "4",
            "--targets",
            "embed_tokens,all-linear",
            "--modules-to-save",
            "lm_head",
        ],
    );
    let names: Vec<String> = adapter(&one.join("adapter"))
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for key in ["lora_embedding_A", "lm_head.weight"] {
        assert!(names.iter().any(|n| n.contains(key)), "{key}: {names:?}");
    }
}

#[test]
fn new_tokens_and_trained_rows_train_the_same_on_two_ranks() {
    // Two tokens added into unused rows, and two existing ones trained as rows: their gradients
    // are gathered by token on each rank and summed in the all-reduce.
    let tmp = tempfile::tempdir().unwrap();
    let (one, _, _) = two_ranks_against_one(
        tmp.path(),
        "2",
        "1",
        &[
            "--max-steps",
            "4",
            "--set",
            "data.add_tokens=[\"<tool_call>\", \"</tool_call>\"]",
            "--set",
            "lora.trainable_token_indices=[32001, 32007]",
        ],
    );
    let names: Vec<String> = adapter(&one.join("adapter"))
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(
        names.iter().any(|n| n.ends_with("trainable_tokens_delta")),
        "{names:?}"
    );
    assert!(one.join("adapter/tokenizer.json").is_file());
}

#[test]
fn a_head_lora_with_dropout_trains_the_same_on_two_ranks() {
    // The head LoRA's dropout masks follow the global rows, as the block adapters' do.
    let tmp = tempfile::tempdir().unwrap();
    let (one, _, _) = two_ranks_against_one(
        tmp.path(),
        "2",
        "1",
        &["--max-steps", "4", "--targets", "lm_head,qkv_proj"],
    );
    let names: Vec<String> = adapter(&one.join("adapter"))
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(
        names.iter().any(|n| n.contains("lm_head.lora_A")),
        "{names:?}"
    );
}

#[test]
fn eight_bit_adamw_trains_the_same_on_two_ranks() {
    // Every rank runs the same 8-bit update on the same all-reduced gradients. Against one
    // process (the gradient summed in another order) a moment within rounding of a
    // midpoint between two codes may round to the other: that element then moves by up to one
    // code step (1.4% of the map's range at the top) times lr in that step. Rank 32: the adapter
    // matrices reach 4096 elements, so most moments are 8-bit.
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let args = |out: &Path, b: &str, dist: &str| {
        let extra = ["--batch-size", b, "--dist", dist, "--max-steps", "6"];
        let mut a = train_args(out, &extra);
        a.extend(
            [
                "--set",
                "training.optimizer=\"adamw_8bit\"",
                "--set",
                "lora.r=32",
            ]
            .map(String::from),
        );
        a
    };
    ok(&single(&args(&one, "2", "none")), "1 process");
    ok(
        &mpirun_cmd(&args(&two, "1", "mpi")).output().unwrap(),
        "2 ranks",
    );
    assert_curves_close(&losses(&two), &losses(&one), "2 ranks vs 1 process");
    let lr = 3e-3; // configs/demo.toml
    for ((gn, gv), (wn, wv)) in adapter(&two.join("adapter"))
        .iter()
        .zip(&adapter(&one.join("adapter")))
    {
        assert_eq!(gn, wn);
        let d = gv
            .iter()
            .zip(wv)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(d <= 0.1 * lr, "{gn}: max |Δ| {d:e} (lr {lr})");
    }
    let state = |d: &Path| {
        let ck = d.join("checkpoints/step-000006/optimizer.safetensors");
        candle_core::safetensors::load(ck, &candle_core::Device::Cpu).unwrap()
    };
    let (a, b) = (state(&one), state(&two));
    assert!(a.keys().any(|k| k.starts_with("m8.")), "{:?}", a.keys());
    assert_eq!(a.len(), b.len());
}

#[test]
fn a_signal_to_one_rank_stops_every_rank_after_the_same_step_and_the_job_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let (full, cut) = (tmp.path().join("full"), tmp.path().join("cut"));
    // No periodic checkpoint: the one the signal writes is the only one.
    let extra = [
        "--batch-size",
        "1",
        "--max-steps",
        "10",
        "--dist",
        "mpi",
        "--set",
        "training.save_every=0",
        "--set",
        "training.log_every=1",
    ];
    ok(
        &mpirun_cmd(&train_args(&full, &extra)).output().unwrap(),
        "2 ranks, uninterrupted",
    );
    let mut child = mpirun_cmd(&train_args(&cut, &extra))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let _ = tx.send(line.unwrap_or_default());
        }
    });
    let mut log: Vec<String> = Vec::new();
    while !log.iter().any(|l| l.starts_with("step 2/")) {
        let l = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("no step 2 logged: {log:?}"));
        log.push(l);
    }
    // Rank 1 alone is signalled (as Slurm's --signal may reach one task first).
    let pid = rank_pid(&cut, 1).expect("rank 1's process");
    // SAFETY: kill(2) on a pid this test found.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGUSR1) }, 0);
    let status = child.wait().unwrap();
    log.extend(rx.iter());
    let log = log.join("\n");
    assert_eq!(status.code(), Some(75), "{log}");
    let step_of = |needle: &str| -> u64 {
        let at = log
            .find(needle)
            .unwrap_or_else(|| panic!("{needle}: {log}"));
        log[at + needle.len()..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{log}"))
    };
    // Rank 0 learned of rank 1's signal through the step's all-reduce; both stopped after it.
    let step0 = step_of("stopped by a signal to another rank after step ");
    let step1 = step_of("rank 1 of 2: stopped by SIGUSR1 after step ");
    assert_eq!(step0, step1, "{log}");
    assert!((2..10).contains(&step0), "{log}");
    assert!(log.contains("resume with: mpirun -np 2 "), "{log}");
    assert!(
        cut.join(format!("checkpoints/step-{step0:06}/state.json"))
            .exists()
    );
    let mut resume = vec![
        "train".to_string(),
        "--resume".into(),
        cut.display().to_string(),
    ];
    resume.extend(["--dist".to_string(), "mpi".into()]);
    ok(&mpirun_cmd(&resume).output().unwrap(), "resumed on 2 ranks");
    assert_curves_close(&losses(&cut), &losses(&full), "resumed vs uninterrupted");
    assert_adapters_close(&cut.join("adapter"), &full.join("adapter"));
}

#[test]
fn preference_objectives_train_the_same_on_two_ranks() {
    // DPO (each rank's reference pass on its own pairs) and ORPO (its NLL over the step's chosen
    // tokens): both normalisers are counted over the whole step before it runs, so each rank's
    // sums are already its share of the mean. Dropout on in the policy's pass.
    for objective in ["dpo", "orpo"] {
        let tmp = tempfile::tempdir().unwrap();
        two_ranks_against_one(
            tmp.path(),
            "2",
            "1",
            &[
                "--max-steps",
                "4",
                "--grad-accum",
                "2",
                "--objective",
                objective,
                "--data",
                "data/prefs/train.jsonl",
                "--eval-data",
                "data/prefs/eval.jsonl",
                "--set",
                "training.disable_dropout=false",
            ],
        );
    }
}
