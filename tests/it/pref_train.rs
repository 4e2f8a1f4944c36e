//! Preference tuning through the trainer: every objective resumes bit for bit (the reference, and
//! precomputed reference scores, included); a learning test: on the sample pairs (data/prefs), DPO
//! from an SFT adapter that refuses (greedy "No.") raises held-out reward accuracy to ≥ 0.9 and
//! switches the greedy answer to the chosen style ("Sure, …").

use crate::common::qlora;
use crate::trainer::run_and_resume;
use qlora::config::TrainConfig;
use qlora::train::objective::Kind;
use qlora::train::trainer::{Metric, REF_CACHE, Trainer};
use std::path::Path;

fn repo(p: &str) -> String {
    crate::common::repo_dir().join(p).display().to_string()
}

fn prefs(output: &Path, kind: Kind) -> TrainConfig {
    let mut c = TrainConfig::from_file(Path::new(&repo("configs/dpo.toml"))).unwrap();
    c.training.output = output.display().to_string();
    c.training.objective = kind;
    c.training.four_bit = true;
    c.training.max_steps = 6;
    c.training.save_every = 2;
    c.training.eval_every = 0;
    c.training.micro_batch_size = 2;
    c.training.grad_accum = 2;
    // Dropout on in the policy's pass (the reference never has it): its masks must resume too.
    c.lora.dropout = 0.1;
    c.training.disable_dropout = false;
    c.lora.r = 4;
    c.data.train = repo("data/prefs/train.jsonl");
    c.data.eval = repo("data/prefs/eval.jsonl");
    c
}

fn metrics(output: &Path) -> Vec<Metric> {
    std::fs::read_to_string(output.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn every_preference_objective_resumes_bit_for_bit() {
    for kind in [Kind::Dpo, Kind::Ipo, Kind::Orpo, Kind::Simpo] {
        let tmp = tempfile::tempdir().unwrap();
        let (a, _) = run_and_resume(tmp.path(), |o| prefs(o, kind), 3);
        let m = metrics(&a);
        let first = &m[0];
        assert_eq!(first.kind, "train");
        for name in [
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logits/rejected",
        ] {
            assert!(first.value(name).is_some(), "{kind}: no {name}");
        }
        if kind == Kind::Dpo {
            // From a fresh adapter the policy is the reference: ln 2 and zero rewards.
            assert!(
                (first.loss - std::f64::consts::LN_2).abs() < 1e-6,
                "{}",
                first.loss
            );
            assert_eq!(first.value("rewards/chosen"), Some(0.0));
        }
        if kind == Kind::Orpo {
            assert!(first.value("nll_loss").is_some());
        }
        let eval = m.iter().rfind(|m| m.kind == "eval").expect("an eval line");
        assert!(eval.value("rewards/accuracies").is_some());
        // The plot's second panel: the reward margin.
        let svg = std::fs::read_to_string(a.join("loss.svg")).unwrap();
        assert!(svg.contains("reward margin"), "{kind}: no margin panel");
    }
}

#[test]
fn precomputed_reference_scores_train_as_the_reference_pass_and_are_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let pre = |o: &Path| {
        let mut c = prefs(o, Kind::Dpo);
        c.lora.dropout = 0.0;
        c.training.precompute_ref = true;
        c
    };
    let (a, _) = run_and_resume(tmp.path(), pre, 3);
    assert!(a.join(REF_CACHE).exists());
    let live = tmp.path().join("live");
    let mut c = pre(&live);
    c.training.precompute_ref = false;
    Trainer::new(c, false).unwrap().run(None).unwrap();
    let (x, y) = (metrics(&a), metrics(&live));
    assert_eq!(x.len(), y.len());
    for (p, q) in x.iter().zip(&y) {
        // The same reference scores, summed in another order.
        assert!(
            (p.loss - q.loss).abs() <= 1e-5 * (1.0 + q.loss.abs()),
            "{} {}",
            p.loss,
            q.loss
        );
    }
}

fn greedy(adapter: &Path, prompt: &str) -> String {
    let (code, out, err) = qlora(&[
        "generate",
        "--4bit",
        "--adapter",
        &adapter.display().to_string(),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "6",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    v["text"].as_str().unwrap().to_string()
}

#[test]
fn dpo_from_an_sft_adapter_learns_the_chosen_style() {
    let tmp = tempfile::tempdir().unwrap();
    let sft = tmp.path().join("sft");
    let mut c = TrainConfig::from_file(Path::new(&repo("configs/demo.toml"))).unwrap();
    c.training.output = sft.display().to_string();
    c.training.four_bit = true;
    c.training.epochs = 8;
    c.training.save_every = 0;
    c.training.eval_every = 0;
    c.data.train = repo("data/prefs/sft.jsonl");
    c.data.eval = String::new();
    Trainer::new(c, false).unwrap().run(None).unwrap();
    // Held-out prompts (data/prefs/eval.jsonl's).
    let prompts = [
        "Can you help me with sewing a button?",
        "Please help me with a cover letter.",
    ];
    for p in prompts {
        assert!(
            greedy(&sft.join("adapter"), p).starts_with("No"),
            "the SFT adapter refuses"
        );
    }
    let dpo = tmp.path().join("dpo");
    let mut c = TrainConfig::from_file(Path::new(&repo("configs/dpo.toml"))).unwrap();
    c.training.output = dpo.display().to_string();
    c.training.four_bit = true;
    c.training.learning_rate = 1e-3;
    c.training.init_adapter = sft.join("adapter").display().to_string();
    c.training.save_every = 0;
    c.data.train = repo("data/prefs/train.jsonl");
    c.data.eval = repo("data/prefs/eval.jsonl");
    Trainer::new(c, false).unwrap().run(None).unwrap();
    let m = metrics(&dpo);
    // The reference is the SFT adapter: the first step starts at ln 2.
    assert!(
        (m[0].loss - std::f64::consts::LN_2).abs() < 1e-6,
        "{}",
        m[0].loss
    );
    let eval = m.iter().rfind(|m| m.kind == "eval").unwrap();
    assert!(
        eval.value("rewards/accuracies").unwrap() >= 0.9,
        "{:?}",
        eval.extra
    );
    assert!(eval.value("rewards/margins").unwrap() > 0.0);
    for p in prompts {
        let text = greedy(&dpo.join("adapter"), p);
        assert!(text.starts_with("Sure"), "after DPO: {text:?}");
    }
    // A PEFT adapter like any other: it merges (and the export's own verify passes).
    let merged = tmp.path().join("merged");
    let (code, _, err) = qlora(&[
        "export",
        "--adapter",
        &dpo.join("adapter").display().to_string(),
        "--out",
        &merged.display().to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(merged.join("config.json").exists());
}

#[test]
fn data_inspect_shows_a_pairs_scored_tokens_and_lints_what_training_skips() {
    let (code, out, err) = qlora(&[
        "data",
        "inspect",
        "--model",
        "builtin:tiny-phi3",
        "--data",
        "tests/fixtures/pref/pairs_text.jsonl",
        "--index",
        "3",
        "--max-seq-len",
        "24",
    ]);
    assert_eq!(code, 0, "{err}");
    // TRL's split: "hap" + "py" tokenize as "▁happy", so the completion is that token and eos.
    assert!(
        out.contains("Complete the word:⟦ happy<|endoftext|>⟧"),
        "{out}"
    );
    assert!(out.contains("5 pairs, 4 kept"), "{out}");
    assert!(
        out.contains("line 4: the prompt's last 2 token(s) merge"),
        "{out}"
    );
    assert!(
        out.contains("line 5: the prompt alone (29 tokens) fills max_seq_len 24"),
        "{out}"
    );
}

#[test]
fn pairs_training_skips_cannot_become_nan_and_bad_lines_name_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("pairs.jsonl");
    std::fs::write(
        &data,
        concat!(
            r#"{"prompt": "Hi", "chosen": " same", "rejected": " same"}"#,
            "\n",
            r#"{"prompt": "Hi", "chosen": " yes", "rejected": " no"}"#,
            "\n",
            r#"{"prompt": "Hi", "chosen": " yes"}"#,
            "\n"
        ),
    )
    .unwrap();
    let out = tmp.path().join("run");
    let args = |extra: &[&str]| {
        let mut a = vec![
            "train".to_string(),
            "--4bit".into(),
            "--config".into(),
            "configs/dpo.toml".into(),
            "--data".into(),
            data.display().to_string(),
            "--eval-data".into(),
            String::new(),
            "--max-steps".into(),
            "2".into(),
            "--output".into(),
            out.display().to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let a = args(&[]);
    let (code, _, err) = qlora(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_ne!(code, 0);
    assert!(err.contains("pairs.jsonl:3: expected"), "{err}");
    let a = args(&["--skip-bad-lines"]);
    let (code, _, err) = qlora(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("1 DPO pairs of 2 read"), "{err}");
    assert!(
        err.contains("chosen equals rejected, nothing to prefer (lines 1)"),
        "{err}"
    );
    for m in metrics(&out) {
        assert!(m.loss.is_finite());
    }
}
