//! DoRA against PEFT over a bitsandbytes NF4 base (goldens: tests/fixtures/gen_dora_goldens.py):
//! the fresh magnitude, the forward, every gradient (A, B, m) with and without dropout, on both op
//! paths and with and without checkpointing; the saved adapter's keys as PEFT writes them; the merge
//! as PEFT's `merge_and_unload`; and the LoRA GGUF refusal.

use crate::common::{fixtures, max_abs};
use crate::model::{load_f32, load_path_f32, max_abs_diff};
use crate::peft_goldens::batch;
use candle_core::{DType, Device, Tensor};
use indicatif::ProgressBar;
use qlora::export::{MergeBase, safetensors::export};
use qlora::lora::{ForwardCtx, LoraConfig, attach, peft};
use qlora::model::Phi3;
use qlora::model::load::BaseFormat;
use qlora::model::phi3::OpPath;
use qlora::train::loss_and_grads;
use std::collections::HashMap;

fn goldens() -> HashMap<String, Tensor> {
    crate::peft_goldens::goldens("dora")
}

fn adapter_dir() -> std::path::PathBuf {
    fixtures().join("dora/adapter")
}

/// The NF4 base: gqa as bitsandbytes quantized it on the CPU (phi3/gqa-bnb, the same bytes the
/// generator's in-process 4-bit model has; quantizing gqa here would follow bitsandbytes' CUDA
/// rounding, which differs from its CPU table in one double-quantized absmax code of this model).
fn nf4_base() -> Phi3 {
    load_f32("gqa-bnb", BaseFormat::NF4)
}

/// The NF4 base with PEFT's DoRA adapter, on op path `ops`.
fn dora_model(ops: OpPath) -> Phi3 {
    let mut m = nf4_base();
    m.ops = ops;
    let a = peft::load(&adapter_dir(), &Device::Cpu).unwrap();
    assert!(a.config.use_dora);
    attach::load_adapters(&mut m, &a).unwrap();
    m
}

fn paths() -> [(OpPath, &'static str); 2] {
    [
        (OpPath::for_device(&Device::Cpu, DType::F32), "fused"),
        (OpPath::Composed, "composed"),
    ]
}

#[test]
fn a_fresh_magnitude_is_peft_init_the_row_norms_of_the_nf4_base() {
    let g = goldens();
    let mut m = nf4_base();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        use_dora: true,
        ..LoraConfig::default()
    };
    attach::init_adapters(&mut m, &cfg, 1).unwrap();
    let adapters = m.adapters();
    assert_eq!(adapters.len(), 8);
    for a in adapters {
        let got = a.dora.as_ref().unwrap().magnitude.as_tensor();
        let want = &g[&format!("init_magnitude.{}", a.module)];
        let d = max_abs_diff(got, want);
        assert!(d <= 1e-6 * max_abs(want), "{}: {d:e}", a.module);
    }
}

#[test]
fn the_forward_equals_peft_dora_over_the_nf4_base() {
    let g = goldens();
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    for (ops, what) in paths() {
        let m = dora_model(ops);
        let d = max_abs_diff(&m.forward(&ids).unwrap(), &g["logits"]);
        assert!(d <= 2e-5, "{what}: logits vs PEFT {d:e}");
    }
    // The magnitude matters: a plain LoRA view of the same A and B is far off.
    let mut m = dora_model(OpPath::Composed);
    for blk in &mut m.layers {
        for (_, lin) in blk.linears_mut() {
            lin.adapter.as_mut().unwrap().dora = None;
        }
    }
    assert!(max_abs_diff(&m.forward(&ids).unwrap(), &g["logits"]) > 1e-2);
}

fn check_grads(
    m: &Phi3,
    g: &HashMap<String, Tensor>,
    ctx: &ForwardCtx,
    (loss_key, prefix): (&str, &str),
    what: &str,
) {
    let keys: Vec<String> = m
        .adapters()
        .iter()
        .flat_map(|a| {
            ["lora_A", "lora_B", "lora_magnitude_vector"]
                .map(|name| format!("{prefix}.{}.{name}", a.module))
        })
        .collect();
    for checkpointing in [false, true] {
        let lg = loss_and_grads(m, &batch(g), ctx, checkpointing).unwrap();
        crate::peft_goldens::assert_matches(
            &lg,
            g,
            loss_key,
            &keys,
            &format!("{what} (checkpointing {checkpointing})"),
        );
    }
}

#[test]
fn every_gradient_equals_peft_without_dropout() {
    let g = goldens();
    for (ops, what) in paths() {
        check_grads(
            &dora_model(ops),
            &g,
            &ForwardCtx::default(),
            ("loss_sum", "grad"),
            what,
        );
    }
}

#[test]
fn every_gradient_equals_peft_with_dropout_and_its_second_base_product() {
    let g = goldens();
    let seed = g["drop_seed"].to_scalar::<i64>().unwrap() as u64;
    let p = g["drop_p"].to_scalar::<f32>().unwrap();
    let ctx = ForwardCtx {
        dropout_seed: Some(seed),
        ..Default::default()
    };
    for (ops, what) in paths() {
        let m = dora_model(ops);
        assert!(m.adapters().iter().all(|a| a.dropout == p));
        check_grads(&m, &g, &ctx, ("loss_sum_drop", "grad_drop"), what);
    }
}

#[test]
fn a_saved_dora_adapter_has_peft_keys_shapes_and_dtypes_and_loads_back() {
    let m = dora_model(OpPath::Composed);
    let tmp = tempfile::tempdir().unwrap();
    let a = peft::load(&adapter_dir(), &Device::Cpu).unwrap();
    peft::save(tmp.path(), &a.config, "x", &attach::adapter_weights(&m)).unwrap();
    // The same keys, shapes, dtypes, and the same bytes (the values went through f32 unchanged).
    crate::peft_goldens::assert_same_tensors(tmp.path(), &adapter_dir());
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join(peft::CONFIG_FILE)).unwrap())
            .unwrap();
    assert_eq!(cfg["use_dora"], true);
}

#[test]
fn the_merge_equals_peft_merge_and_unload_and_gguf_lora_refuses_dora() {
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
        candle_core::safetensors::load(fixtures().join("dora/merged.safetensors"), &Device::Cpu)
            .unwrap();
    let merged = load_path_f32(&out, BaseFormat::Dense);
    let mut checked = 0;
    for (l, blk) in merged.layers.iter().enumerate() {
        for (name, lin) in blk.linears() {
            let group = if matches!(name, "qkv_proj" | "o_proj") {
                "self_attn"
            } else {
                "mlp"
            };
            let w = &want[&format!("model.layers.{l}.{group}.{name}.weight")];
            let got = lin.base.to_dense(DType::F32).unwrap();
            let d = max_abs_diff(&got, w);
            assert!(d <= 2e-6 * max_abs(w), "{name} of layer {l}: {d:e}");
            checked += 1;
        }
    }
    assert_eq!(checked, 8);
    // The in-memory merge (LoraLinear::merged, as `verify` uses) on the dense base agrees too.
    let mut dense = load_f32("gqa", BaseFormat::Dense);
    attach::load_adapters(&mut dense, &a).unwrap();
    let w = &want["model.layers.0.mlp.gate_up_proj.weight"];
    let d = max_abs_diff(&dense.layers[0].gate_up[0].1.merged().unwrap(), w);
    assert!(d <= 2e-6 * max_abs(w), "LoraLinear::merged: {d:e}");

    let e = qlora::export::gguf_lora::export(
        &fixtures().join("phi3/gqa"),
        &a,
        &tmp.path().join("a.gguf"),
        qlora::export::gguf::GgmlType::parse("f32").unwrap(),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("DoRA") && e.contains("--format gguf"), "{e}");
    assert!(!tmp.path().join("a.gguf").exists());
}
