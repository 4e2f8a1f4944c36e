//! `lora.modules_to_save = ["embed_tokens", "lm_head"]` against PEFT (goldens:
//! tests/fixtures/gen_modules_goldens.py): the forward, the copies' and the adapters' gradients on
//! both op paths with and without checkpointing, the saved keys as PEFT writes them, the merge as
//! PEFT's `merge_and_unload`, the refusals (LoRA GGUF, tied embeddings), and parameter groups.

use crate::common::{fixtures, max_abs};
use crate::model::{load_f32, load_path_f32, max_abs_diff};
use crate::peft_goldens::batch;
use candle_core::{DType, Device, Tensor, Var};
use indicatif::ProgressBar;
use qlora::export::{MergeBase, safetensors::export};
use qlora::lora::{ForwardCtx, LoraConfig, attach, peft};
use qlora::model::Phi3;
use qlora::model::load::BaseFormat;
use qlora::model::phi3::OpPath;
use qlora::train::loss_and_grads;
use qlora::train::optim::{AdamW, AdamWConfig};
use std::collections::HashMap;

fn goldens() -> HashMap<String, Tensor> {
    crate::peft_goldens::goldens("modules")
}

fn adapter_dir() -> std::path::PathBuf {
    fixtures().join("modules/adapter")
}

fn with_copies(ops: OpPath) -> Phi3 {
    let mut m = load_f32("gqa", BaseFormat::Dense);
    m.ops = ops;
    let a = peft::load(&adapter_dir(), &Device::Cpu).unwrap();
    assert_eq!(a.config.modules_to_save, ["embed_tokens", "lm_head"]);
    attach::load_adapters(&mut m, &a).unwrap();
    assert!(m.saved.embed.is_some() && m.saved.head.is_some());
    m
}

fn paths() -> [(OpPath, &'static str); 2] {
    [
        (OpPath::for_device(&Device::Cpu, DType::F32), "fused"),
        (OpPath::Composed, "composed"),
    ]
}

#[test]
fn the_copies_replace_the_embedding_and_head_in_the_forward_as_in_peft() {
    let g = goldens();
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    for (ops, what) in paths() {
        let d = max_abs_diff(&with_copies(ops).forward(&ids).unwrap(), &g["logits"]);
        assert!(d <= 2e-5, "{what}: logits vs PEFT {d:e}");
    }
}

#[test]
fn the_copies_and_adapters_gradients_equal_peft() {
    let g = goldens();
    for (ops, what) in paths() {
        let m = with_copies(ops);
        let mut keys = crate::peft_goldens::adapter_keys(&m, "grad");
        keys.extend(["grad.embed_tokens".into(), "grad.lm_head".into()]);
        for checkpointing in [false, true] {
            let lg = loss_and_grads(&m, &batch(&g), &ForwardCtx::default(), checkpointing).unwrap();
            let what = format!("{what}, checkpointing {checkpointing}");
            crate::peft_goldens::assert_matches(&lg, &g, "loss_sum", &keys, &what);
        }
    }
}

#[test]
fn the_padding_row_of_the_embedding_copy_is_never_trained() {
    // gqa's pad_token_id is 0: a batch that feeds token 0 gives its row no gradient, as torch's
    // nn.Embedding(padding_idx) (kept by PEFT's copy) does.
    let m = with_copies(OpPath::Composed);
    assert_eq!(m.cfg.pad_token_id, Some(0));
    let rows = vec![vec![5u32, 0, 9, 0, 17, 3]];
    let labels = vec![rows[0].iter().map(|&t| t as i64).collect::<Vec<_>>()];
    let b = qlora::train::Batch::causal(&rows, &labels, &Device::Cpu).unwrap();
    let lg = loss_and_grads(&m, &b, &ForwardCtx::default(), true).unwrap();
    let ge = &lg.grads[lg.grads.len() - 2];
    let row = |i: usize| max_abs(&ge.get(i).unwrap());
    assert_eq!(row(0), 0.0);
    assert!(row(5) > 0.0 && row(9) > 0.0);
}

#[test]
fn saved_copies_have_peft_keys_shapes_and_dtypes() {
    let m = with_copies(OpPath::Composed);
    let a = peft::load(&adapter_dir(), &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    peft::save_with_modules(
        tmp.path(),
        &a.config,
        "x",
        &attach::adapter_weights(&m),
        &attach::module_weights(&m),
    )
    .unwrap();
    crate::peft_goldens::assert_same_tensors(tmp.path(), &adapter_dir());
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join(peft::CONFIG_FILE)).unwrap())
            .unwrap();
    assert_eq!(
        cfg["modules_to_save"],
        serde_json::json!(["embed_tokens", "lm_head"])
    );
}

#[test]
fn the_merge_equals_peft_and_refusals_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let a = peft::load(&adapter_dir(), &Device::Cpu).unwrap();
    export(
        &fixtures().join("phi3/gqa"),
        Some(&a),
        &out,
        DType::F32,
        MergeBase::Original,
        false,
        false,
        &ProgressBar::hidden(),
    )
    .unwrap();
    let want =
        candle_core::safetensors::load(fixtures().join("modules/merged.safetensors"), &Device::Cpu)
            .unwrap();
    let merged = load_path_f32(&out, BaseFormat::Dense);
    for (got, key) in [
        (&merged.embed_tokens, "model.embed_tokens.weight"),
        (&merged.lm_head, "lm_head.weight"),
    ] {
        assert_eq!(max_abs_diff(got, &want[key]), 0.0, "{key}");
    }
    let w = &want["model.layers.1.mlp.down_proj.weight"];
    let d = max_abs_diff(
        &merged.layers[1]
            .down_proj
            .base
            .to_dense(DType::F32)
            .unwrap(),
        w,
    );
    assert!(d <= 2e-6 * max_abs(w), "down_proj: {d:e}");
    // The merged model gives PEFT's logits.
    let g = goldens();
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    assert!(max_abs_diff(&merged.forward(&ids).unwrap(), &g["logits"]) <= 2e-5);

    let e = qlora::export::gguf_lora::export(
        &fixtures().join("phi3/gqa"),
        &a,
        &tmp.path().join("a.gguf"),
        qlora::export::gguf::GgmlType::parse("f32").unwrap(),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("modules_to_save") && e.contains("--format gguf"),
        "{e}"
    );
    // A model whose head is its embedding (Phi-4-mini's tie) cannot hold two copies.
    let mut tied = load_f32("partial", BaseFormat::Dense);
    let cfg = LoraConfig {
        modules_to_save: vec!["lm_head".into()],
        ..LoraConfig::default()
    };
    let e = attach::init_modules(&mut tied, &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("tie_word_embeddings"), "{e}");
    // An unknown module is named with the choices.
    let bad = LoraConfig {
        modules_to_save: vec!["norm".into()],
        ..LoraConfig::default()
    };
    let e = bad.check_targets().unwrap_err().to_string();
    assert!(e.contains("`norm`") && e.contains("embed_tokens"), "{e}");
}

#[test]
fn parameter_groups_scale_each_learning_rate() {
    // Adam's first step moves every element by lr · m̂ / (√v̂ + ε) = lr · g / (|g| + ε): ±lr for
    // gradients far above ε. Two parameters with the same gradient and scales 1 and 0.1 move by
    // lr and lr / 10.
    let p = Var::from_tensor(&Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let q = Var::from_tensor(&Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let mut opt = AdamW::new(vec![p.clone(), q.clone()], AdamWConfig::default()).unwrap();
    let g = Tensor::ones(8, DType::F32, &Device::Cpu).unwrap();
    opt.step_scaled(&[g.clone(), g], 1e-2, &[1.0, 0.1]).unwrap();
    let (dp, dq) = (max_abs(p.as_tensor()) as f64, max_abs(q.as_tensor()) as f64);
    assert!(
        (dp - 1e-2).abs() < 1e-8 && (dq - 1e-3).abs() < 1e-8,
        "{dp} {dq}"
    );
}
