//! Preference tuning against TRL 1.16 (goldens: tests/fixtures/gen_pref_goldens.py):
//! - the pairs' token ids, completion masks, truncation and drops, as `DPOTrainer` prepares and
//!   collates them with the real Phi-3 tokenizer (strings, conversations, implicit prompts);
//! - over the NF4 gqa base with a PEFT LoRA, for DPO (fresh adapter: reference = adapter off;
//!   starting adapter: reference = its frozen copy), IPO, ORPO and SimPO: the loss, every metric
//!   TRL logs, every LoRA gradient, and the loss and metrics after one AdamW step.

use crate::common::{fixtures, max_abs, repo_dir};
use crate::model::{load_f32, max_abs_diff};
use candle_core::{Device, Tensor};
use qlora::data::TokenizerBundle;
use qlora::data::pairs::{PairIds, PairRows, Skip, Truncation, cut_pair, encode_pair, read_pairs};
use qlora::lora::{ForwardCtx, attach, peft};
use qlora::model::Phi3;
use qlora::model::load::BaseFormat;
use qlora::train::objective::pref::{Preference, Reference};
use qlora::train::objective::{Kind, Objective, Params};
use qlora::train::optim::{AdamWConfig, Optimizer, OptimizerKind};
use serde_json::Value;
use std::collections::HashMap;

fn dir() -> std::path::PathBuf {
    fixtures().join("pref")
}

fn json(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(dir().join(name)).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn mask(v: &Value) -> Vec<bool> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() == 1)
        .collect()
}

#[test]
fn pairs_tokenize_truncate_and_drop_as_trl_dpo_trainer() {
    let t = json("tokenized.json");
    let tok = TokenizerBundle::from_dir(&repo_dir().join("assets/phi3-tokenizer")).unwrap();
    let small = t["max_length_small"].as_u64().unwrap() as usize;
    let mut checked = 0;
    for (file, cases) in t["files"].as_object().unwrap() {
        let (raw, bad) = read_pairs(
            &qlora::data::source::Spec::local(&dir().join(file).to_string_lossy()),
            false,
        )
        .unwrap();
        assert!(bad.is_empty());
        let cases = cases.as_array().unwrap();
        assert_eq!(raw.len(), cases.len(), "{file}");
        for (r, c) in raw.iter().zip(cases) {
            let what = format!("{file}:{}", r.line);
            assert_eq!(r.line as u64, c["line"].as_u64().unwrap());
            let p = encode_pair(&tok, r).unwrap();
            assert_eq!(p.prompt, ids(&c["prompt_ids"]), "{what} prompt");
            assert_eq!(p.chosen, ids(&c["chosen_ids"]), "{what} chosen");
            assert_eq!(p.rejected, ids(&c["rejected_ids"]), "{what} rejected");
            for (key, max_length, mode) in [
                ("none", usize::MAX, Truncation::KeepStart),
                ("keep_start", small, Truncation::KeepStart),
                ("keep_end", small, Truncation::KeepEnd),
            ] {
                let want = &c["collated"][key];
                match cut_pair(&p, max_length, mode) {
                    Err(Skip::LongPrompt) => assert_eq!(want, "dropped", "{what} {key}"),
                    Err(e) => panic!("{what} {key}: skipped ({e:?}) where TRL keeps it"),
                    Ok(rows) => {
                        assert_ne!(want, "dropped", "{what} {key}: TRL drops it");
                        assert_eq!(
                            rows.chosen.ids,
                            ids(&want["chosen_input_ids"]),
                            "{what} {key}"
                        );
                        assert_eq!(
                            rows.chosen.completion,
                            mask(&want["chosen_completion_mask"]),
                            "{what} {key}"
                        );
                        assert_eq!(
                            rows.rejected.ids,
                            ids(&want["rejected_input_ids"]),
                            "{what} {key}"
                        );
                        assert_eq!(
                            rows.rejected.completion,
                            mask(&want["rejected_completion_mask"]),
                            "{what} {key}"
                        );
                    }
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 30, "{checked} cases");
}

/// The goldens' two pairs, as the collator sees them.
fn golden_pairs(n: &Value) -> Vec<PairRows> {
    n["batch"]["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, p)| {
            cut_pair(
                &PairIds {
                    prompt: ids(&p["prompt_ids"]),
                    chosen: ids(&p["chosen_ids"]),
                    rejected: ids(&p["rejected_ids"]),
                    line: i + 1,
                },
                usize::MAX,
                Truncation::KeepStart,
            )
            .unwrap()
        })
        .collect()
}

fn case_kind(case: &str) -> Kind {
    case.split('_').next().unwrap().parse().unwrap()
}

/// The NF4 base (gqa as bitsandbytes quantized it) with `adapter`, and the objective of `case`.
fn setup(case: &str, n: &Value) -> (Phi3, Preference) {
    let c = &n["cases"][case];
    let mut m = load_f32("gqa-bnb", BaseFormat::NF4);
    let a = peft::load(&dir().join(c["adapter"].as_str().unwrap()), &Device::Cpu).unwrap();
    attach::load_adapters(&mut m, &a).unwrap();
    let kind = case_kind(case);
    let s = &n["settings"];
    let beta = match kind {
        Kind::Orpo => s["orpo_beta"].as_f64().unwrap(),
        Kind::Simpo => s["simpo"]["beta"].as_f64().unwrap(),
        _ => c["beta"].as_f64().unwrap(),
    };
    let mut p = Preference::new(
        kind,
        Params {
            beta,
            gamma: s["simpo"]["simpo_gamma"].as_f64().unwrap(),
        },
        golden_pairs(n),
        Vec::new(),
        Default::default(),
        s["pad_token_id"].as_u64().unwrap() as u32,
    );
    if kind.has_reference() {
        p.reference = Some(Reference::snapshot(&m).unwrap());
    }
    (m, p)
}

fn close(got: f64, want: f64, tol: f64, what: &str) {
    assert!(
        (got - want).abs() <= tol * (1.0 + want.abs()),
        "{what}: {got} vs TRL {want}"
    );
}

/// Our step values against the case's TRL values `c` (`logits/*` as DPOTrainer defines them:
/// the generator's `logits_completion/*`).
fn check_values(kind: Kind, v: &qlora::train::objective::StepValues, c: &Value, what: &str) {
    close(
        v.loss,
        c["loss"].as_f64().unwrap(),
        2e-6,
        &format!("{what} loss"),
    );
    let mut names = vec![
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ];
    if kind == Kind::Orpo {
        names.extend(["nll_loss", "log_odds_ratio", "log_odds_chosen"]);
    }
    for name in names {
        let want = c["metrics"][name]
            .as_f64()
            .unwrap_or_else(|| panic!("{what}: {name}"));
        close(v.metrics[name], want, 2e-6, &format!("{what} {name}"));
    }
    for side in ["chosen", "rejected"] {
        let want = c[format!("logits_completion/{side}")].as_f64().unwrap();
        close(
            v.metrics[&format!("logits/{side}")],
            want,
            2e-6,
            &format!("{what} logits/{side}"),
        );
    }
}

fn check_case(case: &str, checkpointing: bool) {
    let n = json("numerics.json");
    let g: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir().join("numerics.safetensors"), &Device::Cpu).unwrap();
    let (model, mut obj) = setup(case, &n);
    let kind = obj.kind;
    let c = &n["cases"][case];
    let what = format!("{case} (checkpointing {checkpointing})");
    let units = [0, 1];
    obj.begin_step(&units);
    let out = obj
        .micro_batch(
            &model,
            &units,
            &ForwardCtx::default(),
            &checkpointing.into(),
        )
        .unwrap();
    let v = obj.finish(&out.scalars);
    assert_eq!(v.divisor, 1.0);
    check_values(kind, &v, c, &what);
    if kind == Kind::Dpo {
        // The first step of DPO: policy = reference.
        close(
            v.loss,
            std::f64::consts::LN_2,
            1e-7,
            &format!("{what} ln 2"),
        );
    }
    // Every LoRA gradient, adapter by adapter (A, B).
    let names: Vec<String> = model
        .adapters()
        .iter()
        .flat_map(|a| {
            ["lora_A", "lora_B"]
                .map(|w| format!("{case}.grad.base_model.model.{}.{w}.weight", a.module))
        })
        .collect();
    assert_eq!(out.grads.len(), names.len());
    for (got, key) in out.grads.iter().zip(&names) {
        let want = &g[key];
        let d = max_abs_diff(got, want);
        assert!(
            d <= 1e-4 * max_abs(want).max(1e-6),
            "{what}: {key} |Δ| {d:e} of {:e}",
            max_abs(want)
        );
    }
    // One AdamW step (torch's settings in the generator), then the same batch again: the
    // reference stays where it was.
    let o = &n["settings"]["optimizer"];
    let mut opt = Optimizer::new(
        OptimizerKind::AdamW,
        model.trainable_vars(),
        AdamWConfig {
            weight_decay: o["weight_decay"].as_f64().unwrap(),
            eps: o["eps"].as_f64().unwrap(),
            ..Default::default()
        },
    )
    .unwrap();
    opt.step(&out.grads, o["lr"].as_f64().unwrap()).unwrap();
    obj.begin_step(&units);
    let out = obj
        .micro_batch(
            &model,
            &units,
            &ForwardCtx::default(),
            &checkpointing.into(),
        )
        .unwrap();
    let v = obj.finish(&out.scalars);
    let step2 = &c["step2"];
    close(
        v.loss,
        step2["loss"].as_f64().unwrap(),
        1e-4,
        &format!("{what} step 2 loss"),
    );
    for name in ["rewards/margins", "logps/chosen", "logps/rejected"] {
        close(
            v.metrics[name],
            step2["metrics"][name].as_f64().unwrap(),
            1e-4,
            &format!("{what} step 2 {name}"),
        );
    }
}

#[test]
fn dpo_from_a_fresh_adapter_equals_trl_with_the_adapter_off_as_reference() {
    check_case("dpo_fresh", true);
}

#[test]
fn dpo_from_an_adapter_equals_trl_with_its_frozen_copy_as_reference() {
    check_case("dpo_start", true);
    check_case("dpo_start", false);
}

#[test]
fn ipo_equals_trl_length_normalised_ipo() {
    check_case("ipo_start", true);
}

#[test]
fn orpo_equals_trl_orpo_with_the_nll_over_the_whole_chosen_row() {
    check_case("orpo_start", true);
    check_case("orpo_start", false);
}

#[test]
fn simpo_equals_trl_cpo_simpo() {
    check_case("simpo_start", true);
}

#[test]
fn packing_a_micro_batchs_sequences_changes_no_number() {
    // The goldens' pairs (sequences of 9, 10, 11 and 6 tokens) and one of 2 + 2: packed within
    // the longest (11), the six sequences take 4 rows (11, 10, 9 + 2, 6 + 2) instead of 6.
    let n = json("numerics.json");
    let extra = cut_pair(
        &PairIds {
            prompt: vec![10],
            chosen: vec![11],
            rejected: vec![12],
            line: 3,
        },
        usize::MAX,
        Truncation::KeepStart,
    )
    .unwrap();
    let units = [0, 1, 2];
    for case in ["dpo_start", "orpo_start"] {
        let run = |pack: bool| {
            let (model, mut obj) = setup(case, &n);
            obj.pairs.push(extra.clone());
            obj.pack = pack;
            let rows = obj.batch_rows(&units, &Device::Cpu).unwrap();
            obj.begin_step(&units);
            let out = obj
                .micro_batch(&model, &units, &ForwardCtx::default(), &true.into())
                .unwrap();
            (rows, obj.finish(&out.scalars), out.grads)
        };
        let ((ra, a, ga), (rb, b, gb)) = (run(false), run(true));
        assert_eq!((ra, rb), (6, 4), "{case}: rows unpacked, packed");
        close(b.loss, a.loss, 1e-6, &format!("{case} packed loss"));
        for (k, v) in &a.metrics {
            close(b.metrics[k], *v, 1e-6, &format!("{case} packed {k}"));
        }
        for (x, y) in ga.iter().zip(&gb) {
            let d = max_abs_diff(x, y);
            assert!(
                d <= 1e-5 * max_abs(x).max(1e-6),
                "{case}: packed gradient |Δ| {d:e}"
            );
        }
    }
}
