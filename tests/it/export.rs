//! `qlora export --format safetensors`: the merged model against PEFT's logits, merge = base +
//! scale·B·A, the NF4 merge base, a 4-bit checkpoint converted alone, and bad input.

use crate::common::fixtures;
use crate::model::{load_f32, load_path_f32, max_abs_diff as max_abs};
use candle_core::{DType, Device, Tensor};
use indicatif::ProgressBar;
use qlora::export::{MergeBase, safetensors::export};
use qlora::lora::{attach, peft};
use qlora::model::load::BaseFormat;

fn golden(dir: &str, file: &str) -> (Tensor, Tensor) {
    crate::model::golden(dir, file, "input_ids", "logits")
}

fn adapter() -> peft::PeftAdapter {
    peft::load(&fixtures().join("phi3/peft/adapter"), &Device::Cpu).unwrap()
}

#[test]
fn merged_checkpoint_reproduces_peft_logits_and_is_base_plus_scaled_ba() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let a = adapter();
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
    let merged = load_path_f32(&out, BaseFormat::Dense);
    let (ids, want) = golden("peft", "logits.safetensors");
    let d = max_abs(&merged.forward(&ids).unwrap(), &want);
    assert!(d <= 1e-4, "merged vs PEFT logits: {d:e}");
    // Entrywise: W' = W + (α/r)·B·A, f32 (one rounding of the sum).
    let base = load_f32("gqa", BaseFormat::Dense);
    let mw = &a.weights["model.layers.1.self_attn.qkv_proj"];
    let (aa, bb) = (&mw.a, &mw.b);
    let want = (base.layers[1].qkv[0].1.base.to_dense(DType::F32).unwrap()
        + (bb.matmul(aa).unwrap() * 2.0).unwrap())
    .unwrap();
    assert!(
        max_abs(
            &merged.layers[1].qkv[0].1.base.to_dense(DType::F32).unwrap(),
            &want
        ) <= 1e-7
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "float32");
}

#[test]
fn nf4_merge_base_is_the_model_the_adapter_saw() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged-nf4");
    let nf4 = MergeBase::Nf4 {
        quant_type: qlora_quant::QuantType::Nf4,
        blocksize: qlora_quant::Blocksize::DEFAULT,
        double_quant: true,
    };
    export(
        &fixtures().join("phi3/gqa"),
        Some(&adapter()),
        &out,
        DType::F32,
        nf4,
        false,
        false,
        &ProgressBar::hidden(),
    )
    .unwrap();
    let merged = load_path_f32(&out, BaseFormat::Dense);
    let mut trained = load_f32("gqa", BaseFormat::NF4);
    attach::load_adapters(&mut trained, &adapter()).unwrap();
    let (ids, _) = golden("peft", "logits.safetensors");
    let d = max_abs(
        &merged.forward(&ids).unwrap(),
        &trained.forward(&ids).unwrap(),
    );
    assert!(d <= 1e-4, "NF4-merged vs NF4 + adapter: {d:e}");
}

#[test]
fn a_4bit_checkpoint_converts_to_a_dense_one() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dense");
    export(
        &fixtures().join("phi3/gqa-bnb"),
        None,
        &out,
        DType::F32,
        MergeBase::Original,
        false,
        false,
        &ProgressBar::hidden(),
    )
    .unwrap();
    let m = load_path_f32(&out, BaseFormat::Dense);
    let (ids, want) = golden("gqa-bnb", "logits.safetensors");
    assert!(max_abs(&m.forward(&ids).unwrap(), &want) <= 1e-4);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert!(cfg.get("quantization_config").is_none());
}

#[test]
fn mismatched_adapters_and_existing_outputs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    // The gqa adapter's qkv_proj B is [128, r]; mha's qkv_proj is [192, 64].
    let e = export(
        &fixtures().join("phi3/mha"),
        Some(&adapter()),
        &out,
        DType::BF16,
        MergeBase::Original,
        false,
        false,
        &ProgressBar::hidden(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("qkv_proj") && e.contains("do not fit the base"),
        "{e}"
    );
    assert!(!out.exists());
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), b"x").unwrap();
    let e = export(
        &fixtures().join("phi3/gqa"),
        None,
        &out,
        DType::BF16,
        MergeBase::Original,
        false,
        false,
        &ProgressBar::hidden(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--force"), "{e}");
    export(
        &fixtures().join("phi3/gqa"),
        None,
        &out,
        DType::BF16,
        MergeBase::Original,
        true,
        false,
        &ProgressBar::hidden(),
    )
    .unwrap();
    assert!(!out.join("keep").exists() && out.join("model.safetensors").exists());
    let entries: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries.len(), 1, "no temporary leftovers: {entries:?}");
}
