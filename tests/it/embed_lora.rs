//! LoRA on the embedding (`--targets embed_tokens`) against PEFT's `lora.Embedding` (goldens:
//! tests/fixtures/gen_embed_lora_goldens.py): the fresh init, the forward, the gradients of A and B
//! (the padding column's zero), the saved keys, the merge, and the LoRA GGUF as llama.cpp's
//! converter writes it (`token_embd.weight.lora_a` = Aᵀ), checked by `qlora verify`.

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
    crate::peft_goldens::goldens("embed-lora")
}

fn adapter_dir() -> std::path::PathBuf {
    fixtures().join("embed-lora/adapter")
}

fn with_embed_lora(ops: OpPath) -> Phi3 {
    let mut m = load_f32("gqa", BaseFormat::Dense);
    m.ops = ops;
    let a = peft::load(&adapter_dir(), &Device::Cpu).unwrap();
    attach::load_adapters(&mut m, &a).unwrap();
    assert!(m.saved.embed_lora.is_some());
    m
}

#[test]
fn a_fresh_embedding_adapter_is_peft_init() {
    let g = goldens();
    let mut m = load_f32("gqa", BaseFormat::Dense);
    let cfg = LoraConfig {
        targets: vec!["embed_tokens".into()],
        ..LoraConfig::default()
    };
    attach::init_adapters(&mut m, &cfg, 9).unwrap();
    let e = m.saved.embed_lora.as_ref().unwrap();
    assert_eq!(e.a.dims(), [16, 128]);
    assert_eq!(e.b.dims(), [64, 16]);
    assert_eq!(max_abs(e.a.as_tensor()), 0.0);
    assert_eq!(g["init_A_absmax"].to_scalar::<f32>().unwrap(), 0.0);
    // B ~ N(0, 1): PEFT's sample of 1024 had std 1.05; ours (another generator) within 10%.
    let b: Vec<f32> = e.b.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let n = b.len() as f64;
    let mean = b.iter().map(|&v| v as f64).sum::<f64>() / n;
    let std = (b.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    let peft_std = g["init_B_std"].to_scalar::<f32>().unwrap() as f64;
    assert!(
        (std - 1.0).abs() < 0.1 && (peft_std - 1.0).abs() < 0.1,
        "{std} {peft_std}"
    );
    // The block linears are not adapted: embed_tokens alone was named.
    assert!(m.adapters().is_empty());
    // all-linear keeps meaning the block linears, as PEFT's does.
    let all = LoraConfig {
        targets: vec!["all-linear".into()],
        ..LoraConfig::default()
    };
    attach::init_adapters(&mut m, &all, 9).unwrap();
    assert!(m.saved.embed_lora.is_none() && m.adapters().len() == 8);
}

#[test]
fn the_forward_and_gradients_equal_peft() {
    let g = goldens();
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    for (ops, what) in [
        (OpPath::for_device(&Device::Cpu, DType::F32), "fused"),
        (OpPath::Composed, "composed"),
    ] {
        let m = with_embed_lora(ops);
        let d = max_abs_diff(&m.forward(&ids).unwrap(), &g["logits"]);
        assert!(d <= 2e-5, "{what}: logits vs PEFT {d:e}");
        for checkpointing in [false, true] {
            let lg = loss_and_grads(&m, &batch(&g), &ForwardCtx::default(), checkpointing).unwrap();
            let mut keys = crate::peft_goldens::adapter_keys(&m, "grad");
            keys.push("grad.model.embed_tokens.lora_embedding_A".into());
            keys.push("grad.model.embed_tokens.lora_embedding_B".into());
            let what = format!("{what}, checkpointing {checkpointing}");
            crate::peft_goldens::assert_matches(&lg, &g, "loss_sum", &keys, &what);
        }
    }
}

#[test]
fn saved_keys_merge_and_lora_gguf_are_peft_and_llama_cpp_s() {
    let m = with_embed_lora(OpPath::Composed);
    let a = peft::load(&adapter_dir(), &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let e = attach::embed_lora_weights(&m).unwrap();
    peft::save_every(
        tmp.path(),
        &a.config,
        "x",
        &attach::adapter_weights(&m),
        &peft::Extras {
            embed_lora: Some((&e.0, &e.1)),
            ..Default::default()
        },
    )
    .unwrap();
    crate::peft_goldens::assert_same_tensors(tmp.path(), &adapter_dir());
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join(peft::CONFIG_FILE)).unwrap())
            .unwrap();
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["embed_tokens", "qkv_proj"])
    );

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
        fixtures().join("embed-lora/merged.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let merged = load_path_f32(&out, BaseFormat::Dense);
    let w = &want["model.embed_tokens.weight"];
    assert!(max_abs_diff(&merged.embed_tokens, w) <= 2e-6 * max_abs(w));
    let g = goldens();
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    assert!(max_abs_diff(&merged.forward(&ids).unwrap(), &g["logits"]) <= 2e-5);

    // The LoRA GGUF, on the built-in model (its GGUF has a vocabulary): token_embd's A
    // transposed, as llama.cpp's converter writes it; applied to the base GGUF as llama.cpp
    // applies it, it is the model with the adapter (`qlora verify`).
    let dir = qlora::hub::resolve(qlora::builtin::TINY_PHI3).unwrap();
    let mut bm = load_path_f32(&dir, BaseFormat::Dense);
    let lora = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: vec!["embed_tokens".into(), "qkv_proj".into()],
        ..LoraConfig::default()
    };
    attach::init_adapters(&mut bm, &lora, 3).unwrap();
    crate::train::randomize_b(&bm, 11);
    let ea = &bm.saved.embed_lora.as_ref().unwrap().a;
    let noise = crate::common::values(ea.elem_count(), 77, 0.05);
    ea.set(&Tensor::from_vec(noise, ea.shape(), ea.device()).unwrap())
        .unwrap();
    let ad = tmp.path().join("adapter-embed");
    let e = attach::embed_lora_weights(&bm).unwrap();
    peft::save_every(
        &ad,
        &lora,
        &dir.display().to_string(),
        &attach::adapter_weights(&bm),
        &peft::Extras {
            embed_lora: Some((&e.0, &e.1)),
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
    let v = bm.cfg.vocab_size;
    let h = bm.cfg.hidden_size;
    // ggml's ne order: Aᵀ [V, r] is ne [r, V]; B [H, r] is ne [r, H].
    assert_eq!(
        c.tensor_infos["token_embd.weight.lora_a"].shape.dims(),
        [v, 8]
    );
    assert_eq!(
        c.tensor_infos["token_embd.weight.lora_b"].shape.dims(),
        [h, 8]
    );
    let base = tmp.path().join("base.gguf");
    crate::verify::gguf(&dir, None, &base, "f32", MergeBase::Original);
    let r = crate::verify::run(
        &dir,
        Some(&ad),
        MergeBase::Original,
        &gguf_lora,
        Some(&base),
    );
    crate::verify::assert_faithful(&r, "embedding LoRA gguf");
    // And merged into a GGUF.
    let merged_gguf = tmp.path().join("merged.gguf");
    crate::verify::gguf(&dir, Some(&ad), &merged_gguf, "f32", MergeBase::Original);
    let r = crate::verify::run(&dir, Some(&ad), MergeBase::Original, &merged_gguf, None);
    crate::verify::assert_faithful(&r, "embedding LoRA merged gguf");
}
