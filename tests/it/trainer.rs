//! The trainer: resume reproduces the uninterrupted loss curve bit for bit, configs parse,
//! non-finite steps stop the run with a message, the output is a PEFT adapter.

use qlora::config::TrainConfig;
use qlora::train::trainer::{Metric, Trainer};
use std::collections::HashMap;
use std::path::Path;

fn repo(p: &str) -> String {
    crate::common::repo_dir().join(p).display().to_string()
}

pub fn small(output: &Path) -> TrainConfig {
    let mut c = TrainConfig::from_file(Path::new(&repo("configs/demo.toml"))).unwrap();
    c.training.output = output.display().to_string();
    c.training.max_steps = 9;
    c.training.save_every = 3;
    c.training.eval_every = 0;
    c.training.grad_accum = 2;
    c.training.four_bit = true;
    c.data.train = repo("data/demo/train.jsonl");
    c.data.eval = String::new();
    c
}

pub fn train_losses(output: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(output.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Metric>(l).unwrap())
        .filter(|m| m.kind == "train")
        .map(|m| (m.step, m.loss.to_bits()))
        .collect()
}

/// Trains `cfg` into `tmp/a` uninterrupted and into `tmp/b` stopped after `stop` steps and
/// resumed from its resolved config; asserts that both give the same loss curve and bit-identical
/// adapter tensors, and returns `a` with its adapter's tensors.
pub fn run_and_resume(
    tmp: &Path,
    cfg: impl Fn(&Path) -> TrainConfig,
    stop: u64,
) -> (std::path::PathBuf, HashMap<String, candle_core::Tensor>) {
    let (a, b) = (tmp.join("a"), tmp.join("b"));
    Trainer::new(cfg(&a), false).unwrap().run(None).unwrap();
    Trainer::new(cfg(&b), false)
        .unwrap()
        .run(Some(stop))
        .unwrap();
    let resumed = TrainConfig::from_file(&b.join("config.resolved.toml")).unwrap();
    assert!(
        Trainer::new(resumed, true)
            .unwrap()
            .run(None)
            .unwrap()
            .finished
    );
    assert_eq!(train_losses(&a), train_losses(&b), "loss curves differ");
    let (wa, wb) = (adapter_tensors(&a), adapter_tensors(&b));
    assert_eq!(wa.len(), wb.len());
    for (k, v) in &wa {
        assert_eq!(
            v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            wb[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{k}"
        );
    }
    (a, wa)
}

/// The tensors of a run's final adapter.
fn adapter_tensors(out: &Path) -> HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(
        out.join("adapter/adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

#[test]
fn resume_reproduces_the_uninterrupted_loss_curve_bit_for_bit() {
    resume_check(false);
}

#[test]
fn a_dora_run_resumes_bit_for_bit_with_its_magnitudes() {
    resume_check(true);
}

#[test]
fn a_run_with_embedding_and_head_copies_resumes_bit_for_bit() {
    // modules_to_save with their own learning rate, under 8-bit AdamW (the copies' states are
    // 8-bit blocks): the copies are saved with the adapter, in every checkpoint, and resume.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = |out: &Path| {
        let mut c = small(out);
        c.lora.modules_to_save = vec!["embed_tokens".into(), "lm_head".into()];
        c.training.embedding_learning_rate = 1e-12;
        c.training.optimizer = "adamw_8bit".into();
        c.training.max_steps = 6;
        c
    };
    let (a, wa) = run_and_resume(tmp.path(), cfg, 4);
    let resumed = TrainConfig::from_file(&a.join("config.resolved.toml")).unwrap();
    assert_eq!(resumed.training.embedding_learning_rate, 1e-12);
    assert_eq!(
        wa.len(),
        18,
        "A and B of 4 targets in 2 layers, and the two copies"
    );
    // The copies took their own learning rate (1e-12: they stay where they started, within
    // what 8-bit Adam's largest step at that rate can move) while the adapters (3e-3) trained.
    let base = crate::model::load_path_f32(
        &qlora::hub::resolve(qlora::builtin::TINY_PHI3).unwrap(),
        qlora::model::load::BaseFormat::Dense,
    );
    for (key, t) in [
        (
            "base_model.model.model.embed_tokens.weight",
            &base.embed_tokens,
        ),
        ("base_model.model.lm_head.weight", &base.lm_head),
    ] {
        let d = crate::model::max_abs_diff(&wa[key], t);
        assert!(d <= 1e-6, "{key} moved by {d:e} at lr 1e-12");
    }
    let b = &wa["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"];
    assert!(crate::common::max_abs(b) > 1e-3, "the adapters trained");
    assert_disk_plan_holds(&cfg(&a), &base.cfg, &a.join("checkpoints/step-000006"));
}

#[test]
fn a_run_training_token_rows_resumes_bit_for_bit_and_trains_only_seen_rows() {
    // <|assistant|>, <|end|> and <|user|> occur in the demo data; 32015 (an unused special
    // token) never does, so its row keeps the base's values.
    let rows = vec![32001u32, 32007, 32010, 32015];
    let tmp = tempfile::tempdir().unwrap();
    let cfg = |out: &Path| {
        let mut c = small(out);
        c.lora.trainable_token_indices = qlora::lora::TokenIndices::List(rows.clone());
        c.training.max_steps = 6;
        c
    };
    let (a, wa) = run_and_resume(tmp.path(), cfg, 4);
    let da = &wa[qlora::lora::peft::TOKENS_KEY];
    let base = crate::model::load_path_f32(
        &qlora::hub::resolve(qlora::builtin::TINY_PHI3).unwrap(),
        qlora::model::load::BaseFormat::Dense,
    );
    for (k, &t) in rows.iter().enumerate() {
        let d = crate::model::max_abs_diff(
            &da.get(k).unwrap(),
            &base.embed_tokens.get(t as usize).unwrap(),
        );
        if t == 32015 {
            assert_eq!(d, 0.0, "token {t} never occurs but moved");
        } else {
            assert!(d > 1e-4, "token {t} did not train ({d:e})");
        }
    }
    assert_disk_plan_holds(&cfg(&a), &base.cfg, &a.join("checkpoints/step-000006"));
}

#[test]
fn a_run_with_embedding_and_head_loras_resumes_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = |out: &Path| {
        let mut c = small(out);
        c.lora.targets = vec!["embed_tokens".into(), "lm_head".into(), "all-linear".into()];
        c.training.max_steps = 6;
        c
    };
    let (a, wa) = run_and_resume(tmp.path(), cfg, 4);
    assert_eq!(
        wa.len(),
        20,
        "A and B of 4 targets in 2 layers, the embedding's and the head's"
    );
    // The embedding's A started at zero and trained, the head's B too.
    assert!(crate::common::max_abs(&wa[qlora::lora::peft::EMBED_A_KEY]) > 0.0);
    assert!(crate::common::max_abs(&wa[qlora::lora::peft::HEAD_B_KEY]) > 0.0);
    let m = crate::model::load_path_f32(
        &qlora::hub::resolve(qlora::builtin::TINY_PHI3).unwrap(),
        qlora::model::load::BaseFormat::Dense,
    );
    assert_disk_plan_holds(&cfg(&a), &m.cfg, &a.join("checkpoints/step-000006"));
}

/// The disk plan's checkpoint size is what the run wrote, within its JSON allowance.
fn assert_disk_plan_holds(cfg: &TrainConfig, model: &qlora::model::Phi3Config, ck: &Path) {
    let p = qlora::plan::disk::plan(cfg, model, cfg.training.max_steps).unwrap();
    let one = qlora::fsx::disk::tree_bytes(ck);
    let slack = 2 * qlora::plan::disk::JSON_BYTES;
    assert!(
        one <= p.checkpoint_bytes && p.checkpoint_bytes - one <= slack,
        "checkpoint {one} vs planned {}",
        p.checkpoint_bytes
    );
}

fn resume_check(dora: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let cfg = |out: &Path| {
        let mut c = small(out);
        c.lora.use_dora = dora;
        c
    };
    Trainer::new(cfg(&a), false).unwrap().run(None).unwrap();
    // Interrupted after step 5: the latest checkpoint is step 3, steps 4-5 are redone on resume.
    let s = Trainer::new(cfg(&b), false).unwrap().run(Some(5)).unwrap();
    assert!(!s.finished);
    let resumed_cfg = TrainConfig::from_file(&b.join("config.resolved.toml")).unwrap();
    let mut t = Trainer::new(resumed_cfg, true).unwrap();
    assert_eq!(t.state.step, 3);
    assert!(t.run(None).unwrap().finished);
    let (la, lb) = (train_losses(&a), train_losses(&b));
    assert_eq!(la.len(), 9);
    assert_eq!(la, lb, "loss curves differ");
    // The final adapters are identical too, and in PEFT's format.
    let (wa, wb) = (adapter_tensors(&a), adapter_tensors(&b));
    if dora {
        assert_eq!(
            wa.len(),
            24,
            "A, B and the magnitude of 4 targets in 2 layers"
        );
        // The magnitudes trained: none is still the base's row norms.
        let mut m = crate::model::load_path_f32(
            &qlora::hub::resolve(qlora::builtin::TINY_PHI3).unwrap(),
            qlora::model::load::BaseFormat::NF4,
        );
        qlora::lora::attach::init_adapters(&mut m, &cfg(&a).lora, 0).unwrap();
        assert_disk_plan_holds(&cfg(&a), &m.cfg, &a.join("checkpoints/step-000009"));
        for ad in m.adapters() {
            let init = ad.dora.as_ref().unwrap().magnitude.as_tensor();
            let key = format!("base_model.model.{}.lora_magnitude_vector", ad.module);
            let d = crate::model::max_abs_diff(&wa[&key], init);
            assert!(d > 1e-4, "{key} did not move ({d:e})");
        }
    } else {
        assert_eq!(wa.len(), 16, "A and B of 4 targets in 2 layers");
    }
    for (k, v) in &wa {
        assert!(
            k.starts_with("base_model.model.model.layers.")
                && (k.ends_with(".weight") || (dora && k.ends_with(".lora_magnitude_vector")))
                && !k.contains(".default."),
            "{k}"
        );
        assert_eq!(
            v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            wb[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{k}"
        );
    }
    assert!(a.join("loss.svg").exists() && a.join("config.resolved.toml").exists());
    // Only keep_last checkpoints remain.
    assert_eq!(
        qlora::train::trainer::list_checkpoints(&a).unwrap().len(),
        2
    );
    // A second fresh run into the same output is refused instead of mixing runs.
    let e = Trainer::new(small(&a), false).unwrap_err().to_string();
    assert!(
        e.contains("already holds a run") && e.contains("--resume"),
        "{e}"
    );
}

#[test]
fn every_config_parses() {
    let mut n = 0;
    for entry in std::fs::read_dir(repo("configs")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&p).unwrap();
            assert!(
                text.starts_with('#'),
                "{}: opens with how to run it",
                p.display()
            );
            TrainConfig::from_file(&p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 2);
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.toml");
    std::fs::write(&bad, "[training]\nlearning_rat = 1.0\n").unwrap();
    let e = format!("{:#}", TrainConfig::from_file(&bad).unwrap_err());
    assert!(e.contains("bad.toml") && e.contains("learning_rat"), "{e}");
}

#[test]
fn repeated_non_finite_steps_stop_the_run_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = small(&tmp.path().join("nan"));
    c.training.learning_rate = 1e38;
    c.training.max_grad_norm = 0.0;
    c.training.warmup_steps = 0;
    c.training.lr_schedule = qlora::config::Schedule::Constant;
    c.training.save_every = 0;
    c.training.max_steps = 20;
    let e = Trainer::new(c, false)
        .unwrap()
        .run(None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("NaN/inf for 5 steps in a row"), "{e}");
}
