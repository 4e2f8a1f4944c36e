//! LoRA on the head (`--targets lm_head,…`) against PEFT (goldens:
//! tests/fixtures/gen_head_lora_goldens.py): the forward, every gradient with and without dropout
//! (the head's dropout drawn over the `[B, T, H]` rows PEFT's head sees), both op paths, with and
//! without checkpointing; the saved keys, the merge, and the LoRA GGUF's `output.weight` pair,
//! checked by `qlora verify`.

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
    crate::peft_goldens::goldens("head-lora")
}

fn adapter_dir() -> std::path::PathBuf {
    fixtures().join("head-lora/adapter")
}

fn with_head_lora(ops: OpPath) -> Phi3 {
    let mut m = load_f32("gqa", BaseFormat::Dense);
    m.ops = ops;
    let a = peft::load(&adapter_dir(), &Device::Cpu).unwrap();
    attach::load_adapters(&mut m, &a).unwrap();
    assert_eq!(m.saved.head_lora.as_ref().unwrap().dropout_stream, 9);
    m
}

#[test]
fn the_forward_and_every_gradient_equal_peft_with_and_without_dropout() {
    let g = goldens();
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let seed = g["drop_seed"].to_scalar::<i64>().unwrap() as u64;
    for (ops, what) in [
        (OpPath::for_device(&Device::Cpu, DType::F32), "fused"),
        (OpPath::Composed, "composed"),
    ] {
        let m = with_head_lora(ops);
        let d = max_abs_diff(&m.forward(&ids).unwrap(), &g["logits"]);
        assert!(d <= 2e-5, "{what}: logits vs PEFT {d:e}");
        for (ctx, loss_key, prefix) in [
            (ForwardCtx::default(), "loss_sum", "grad"),
            (
                ForwardCtx {
                    dropout_seed: Some(seed),
                    ..Default::default()
                },
                "loss_sum_drop",
                "grad_drop",
            ),
        ] {
            let mut keys = crate::peft_goldens::adapter_keys(&m, prefix);
            keys.push(format!("{prefix}.lm_head.lora_A"));
            keys.push(format!("{prefix}.lm_head.lora_B"));
            for checkpointing in [false, true] {
                let lg = loss_and_grads(&m, &batch(&g), &ctx, checkpointing).unwrap();
                let what = format!("{what}, {prefix}, checkpointing {checkpointing}");
                crate::peft_goldens::assert_matches(&lg, &g, loss_key, &keys, &what);
            }
        }
    }
}

#[test]
fn saved_keys_merge_and_lora_gguf_are_peft_and_llama_cpp_s() {
    let m = with_head_lora(OpPath::Composed);
    let a = peft::load(&adapter_dir(), &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let h = attach::head_lora_weights(&m).unwrap();
    peft::save_every(
        tmp.path(),
        &a.config,
        "x",
        &attach::adapter_weights(&m),
        &peft::Extras {
            head_lora: Some((&h.0, &h.1)),
            ..Default::default()
        },
    )
    .unwrap();
    crate::peft_goldens::assert_same_tensors(tmp.path(), &adapter_dir());
    let out = tmp.path().join("merged");
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
    let want = candle_core::safetensors::load(
        fixtures().join("head-lora/merged.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let merged = load_path_f32(&out, BaseFormat::Dense);
    let w = &want["lm_head.weight"];
    assert!(max_abs_diff(&merged.lm_head, w) <= 2e-6 * max_abs(w));
    let g = goldens();
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    assert!(max_abs_diff(&merged.forward(&ids).unwrap(), &g["logits"]) <= 2e-5);

    // The LoRA GGUF on the built-in model: output.weight's pair, applied as llama.cpp applies it.
    let dir = qlora::hub::resolve(qlora::builtin::TINY_PHI3).unwrap();
    let mut bm = load_path_f32(&dir, BaseFormat::Dense);
    let lora = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: vec!["lm_head".into(), "down_proj".into()],
        ..LoraConfig::default()
    };
    attach::init_adapters(&mut bm, &lora, 3).unwrap();
    crate::train::randomize_b(&bm, 11);
    let hb = &bm.saved.head_lora.as_ref().unwrap().b;
    let noise = crate::common::values(hb.elem_count(), 78, 0.05);
    hb.set(&Tensor::from_vec(noise, hb.shape(), hb.device()).unwrap())
        .unwrap();
    let ad = tmp.path().join("adapter-head");
    let h = attach::head_lora_weights(&bm).unwrap();
    peft::save_every(
        &ad,
        &lora,
        &dir.display().to_string(),
        &attach::adapter_weights(&bm),
        &peft::Extras {
            head_lora: Some((&h.0, &h.1)),
            ..Default::default()
        },
    )
    .unwrap();
    let gguf_lora = tmp.path().join("lora.gguf");
    qlora::export::gguf_lora::export(
        &dir,
        &peft::load(&ad, &Device::Cpu).unwrap(),
        &gguf_lora,
        qlora::export::gguf::GgmlType::parse("f32").unwrap(),
        false,
    )
    .unwrap();
    let mut f = std::fs::File::open(&gguf_lora).unwrap();
    let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let (v, hid) = (bm.cfg.vocab_size, bm.cfg.hidden_size);
    assert_eq!(
        c.tensor_infos["output.weight.lora_a"].shape.dims(),
        [8, hid]
    );
    assert_eq!(c.tensor_infos["output.weight.lora_b"].shape.dims(), [v, 8]);
    let base = tmp.path().join("base.gguf");
    crate::verify::gguf(&dir, None, &base, "f32", MergeBase::Original);
    let r = crate::verify::run(
        &dir,
        Some(&ad),
        MergeBase::Original,
        &gguf_lora,
        Some(&base),
    );
    crate::verify::assert_faithful(&r, "lm_head LoRA gguf");
    let merged_gguf = tmp.path().join("merged.gguf");
    crate::verify::gguf(&dir, Some(&ad), &merged_gguf, "q8_0", MergeBase::Original);
    let r = crate::verify::run(&dir, Some(&ad), MergeBase::Original, &merged_gguf, None);
    crate::verify::assert_faithful(&r, "lm_head LoRA merged gguf");
}

#[test]
fn bad_head_settings_name_the_problem() {
    let cfg = |targets: &[&str], modules: &[&str], dora: bool| LoraConfig {
        targets: targets.iter().map(|t| t.to_string()).collect(),
        modules_to_save: modules.iter().map(|m| m.to_string()).collect(),
        use_dora: dora,
        ..LoraConfig::default()
    };
    let e = cfg(&["lm_head"], &["lm_head"], false)
        .check_targets()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lm_head") && e.contains("modules_to_save"),
        "{e}"
    );
    let e = cfg(&["lm_head"], &[], true)
        .check_targets()
        .unwrap_err()
        .to_string();
    assert!(e.contains("DoRA on lm_head"), "{e}");
    let mut tied = load_f32("partial", BaseFormat::Dense);
    let e = attach::init_adapters(&mut tied, &cfg(&["lm_head"], &[], false), 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("tie_word_embeddings"), "{e}");
}
