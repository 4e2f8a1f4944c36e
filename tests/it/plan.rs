//! `qlora plan` and the plan `qlora train` runs first: the verdict, the advice, the refusal before
//! anything is loaded, `--force`, and the prediction against the peak the OS reports for the run.

use crate::common::qlora;

/// The demo's data packed into rows of up to 512 tokens, 4 a micro-batch (the activations, not
/// the runtime and the weights, make most of the peak).
const DEMO: [&str; 8] = [
    "--4bit",
    "--config",
    "configs/demo.toml",
    "--max-seq-len",
    "512",
    "--batch-size",
    "4",
    "--no-gradient-checkpointing",
];

#[test]
fn plan_predicts_the_peak_train_then_measures() {
    let (code, stdout, stderr) = qlora(&[&["plan", "--json"][..], &DEMO[..]].concat());
    assert_eq!(code, 0, "{stdout}{stderr}");
    let plan: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(plan["fits"], true);
    let predicted = plan["peak_bytes"].as_u64().unwrap() as f64 / (1 << 20) as f64;
    let phases: Vec<&str> = plan["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["load", "head", "backward", "eval", "optimizer"]);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (code, stdout, stderr) = qlora(
        &[
            &[
                "train",
                "--max-steps",
                "4",
                "--output",
                out.to_str().unwrap(),
            ][..],
            &DEMO[..],
            &[
                "--set",
                "training.save_every=0",
                "--set",
                "training.eval_every=0",
            ][..],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    // The process's own VmHWM after each step, as the kernel reports it.
    let measured = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|m| m["peak_rss_mib"].as_f64())
        .fold(0f64, f64::max);
    assert!(
        (predicted - measured).abs() <= 0.10 * measured,
        "predicted {predicted:.1} MiB, measured {measured:.1} MiB"
    );
}

#[test]
fn a_run_that_does_not_fit_is_refused_before_loading_with_advice() {
    let (code, stdout, stderr) = qlora(&[&["plan", "--budget", "30MiB"][..], &DEMO[..]].concat());
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.contains("does NOT fit"), "{stdout}");
    assert!(stdout.contains("most helpful:"), "{stdout}");
    let (code, stdout, _) =
        qlora(&[&["plan", "--json", "--budget", "30MiB"][..], &DEMO[..]].concat());
    assert_eq!(code, 1);
    let plan: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(plan["fits"], false);
    assert_eq!(plan["budget_bytes"], 30 << 20);

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let train = |extra: &[&str]| {
        qlora(
            &[
                &[
                    "train",
                    "--max-steps",
                    "1",
                    "--output",
                    out.to_str().unwrap(),
                ][..],
                &DEMO[..],
                &["--budget", "30MiB", "--set", "training.save_every=0"][..],
                extra,
            ]
            .concat(),
        )
    };
    let (code, stdout, stderr) = train(&[]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(
        stderr.contains("does not fit")
            && stderr.contains("--force")
            && stderr.contains("predicted peak"),
        "{stderr}"
    );
    assert!(!out.exists(), "nothing is written for a refused run");
    let (code, stdout, stderr) = train(&["--force"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

#[test]
fn a_bad_budget_names_itself() {
    let (code, _, stderr) = qlora(&[&["plan", "--budget", "lots"][..], &DEMO[..]].concat());
    assert_eq!(code, 2);
    assert!(stderr.contains("budget `lots`"), "{stderr}");
}

#[test]
fn auto_checkpointing_mixes_policies_under_a_budget_and_trains_the_same_curve() {
    // The demo at 4 × 512 with "auto" (the default).
    let demo = &[&DEMO[..7], &["--gradient-checkpointing", "auto"][..]].concat();
    let plan = |budget: &str| {
        let (code, stdout, stderr) =
            qlora(&[&["plan", "--json", "--budget", budget][..], &demo[..]].concat());
        assert_eq!(code, 0, "{stdout}{stderr}");
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap()
    };
    let policies = |p: &serde_json::Value| -> Vec<String> {
        p["checkpointing"]["policies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    // Plenty: nothing recomputed.
    let roomy = plan("8GiB");
    assert!(policies(&roomy).iter().all(|p| p == "keep"), "{roomy}");
    assert_eq!(roomy["checkpointing"]["recompute_flops"], 0.0);
    // Between what recomputing everything and keeping everything need: a mix that fits.
    let least = {
        let (_, stdout, _) = qlora(
            &[
                &["plan", "--json"][..],
                &DEMO[..7],
                &["--gradient-checkpointing", "true"][..],
            ]
            .concat(),
        );
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["peak_bytes"]
            .as_u64()
            .unwrap()
    };
    let most = roomy["peak_bytes"].as_u64().unwrap();
    let budget = (least + most) / 2;
    let mixed = plan(&format!("{budget}"));
    let kinds: std::collections::BTreeSet<String> = policies(&mixed).into_iter().collect();
    assert!(kinds.len() > 1, "{mixed}");
    assert!(mixed["peak_bytes"].as_u64().unwrap() <= budget);
    let auto = &mixed["checkpointing"]["auto"];
    assert_eq!(auto["fits"], true);
    assert!(auto["next_cheaper"]["peak_bytes"].as_u64().unwrap() > budget);
    // Trained under that budget, and with every block kept or recomputed: the same losses, bit
    // for bit.
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let (code, stdout, stderr) = qlora(
            &[
                &[
                    "train",
                    "--max-steps",
                    "3",
                    "--output",
                    out.to_str().unwrap(),
                ][..],
                &DEMO[..7],
                &[
                    "--set",
                    "training.save_every=0",
                    "--set",
                    "training.eval_every=0",
                ][..],
                extra,
            ]
            .concat(),
        );
        assert_eq!(code, 0, "{stdout}{stderr}");
        let losses: Vec<String> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|m| m["kind"] == "train")
            .map(|m| format!("{} {}", m["loss"], m["grad_norm"]))
            .collect();
        assert_eq!(losses.len(), 3, "{stderr}");
        (losses, stderr)
    };
    let (auto_losses, stderr) = run(
        "auto",
        &[
            "--gradient-checkpointing",
            "auto",
            "--budget",
            &budget.to_string(),
        ],
    );
    assert!(
        stderr.contains("gradient checkpointing (auto under") && stderr.contains("keep all"),
        "{stderr}"
    );
    let (kept, _) = run("kept", &["--gradient-checkpointing", "false"]);
    let (recomputed, _) = run("recomputed", &["--gradient-checkpointing", "true"]);
    assert_eq!(auto_losses, kept);
    assert_eq!(auto_losses, recomputed);
}
