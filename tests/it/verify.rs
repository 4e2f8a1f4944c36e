//! `qlora verify`: faithful exports of every type pass; deliberately broken ones fail, each on the
//! measure it should fail. The model is the built-in one with a random adapter (B nonzero).

use candle_core::Device;
use qlora::export::MergeBase;
use qlora::export::gguf::GgmlType;
use qlora::lora::{LoraConfig, attach, peft};
use qlora::model::load::BaseFormat;
use qlora::verify::{Export, PROMPTS, Reference, Report, classify, export_type, verify};
use std::path::{Path, PathBuf};

const NF4: MergeBase = MergeBase::Nf4 {
    quant_type: qlora_quant::QuantType::Nf4,
    blocksize: qlora_quant::Blocksize::DEFAULT,
    double_quant: true,
};

/// The built-in model and a random rank-8 adapter on all four linears, saved in `tmp`.
fn model_and_adapter(tmp: &Path, rslora: bool) -> (PathBuf, PathBuf) {
    model_and_adapter_with(tmp, rslora, false)
}

/// [`model_and_adapter`], DoRA (magnitudes moved off the base's row norms) when `dora`.
fn model_and_adapter_with(tmp: &Path, rslora: bool, dora: bool) -> (PathBuf, PathBuf) {
    let dir = qlora::hub::resolve(qlora::builtin::TINY_PHI3).unwrap();
    let mut m = crate::model::load_path_f32(&dir, BaseFormat::Dense);
    let lora = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: vec!["all-linear".into()],
        rslora,
        use_dora: dora,
        modules_to_save: Vec::new(),
        trainable_token_indices: Default::default(),
    };
    attach::init_adapters(&mut m, &lora, 3).unwrap();
    crate::train::randomize_b(&m, 11);
    if dora {
        crate::train::randomize_magnitudes(&m, 12);
    }
    let a = tmp.join(match (rslora, dora) {
        (_, true) => "adapter-dora",
        (true, _) => "adapter-rs",
        _ => "adapter",
    });
    peft::save(
        &a,
        &lora,
        &dir.display().to_string(),
        &attach::adapter_weights(&m),
    )
    .unwrap();
    (dir, a)
}

pub fn prompts() -> Vec<String> {
    PROMPTS[..2].iter().map(|p| p.to_string()).collect()
}

pub fn run(
    dir: &Path,
    adapter: Option<&Path>,
    base: MergeBase,
    export: &Path,
    base_gguf: Option<&Path>,
) -> Report {
    let a = adapter.map(|a| peft::load(a, &Device::Cpu).unwrap());
    let reference = Reference::new(dir, a.as_ref(), base).unwrap();
    let e = classify(export, base_gguf).unwrap();
    let ea = match &e {
        Export::Adapter(p) => Some(peft::load(p, &Device::Cpu).unwrap()),
        _ => None,
    };
    let ty = export_type(&e).unwrap();
    verify(&reference, &e, &ty, &prompts(), 8, ea.as_ref()).unwrap()
}

pub fn gguf(dir: &Path, adapter: Option<&Path>, out: &Path, ty: &str, base: MergeBase) {
    let a = adapter.map(|a| peft::load(a, &Device::Cpu).unwrap());
    qlora::export::gguf_model::export(
        dir,
        a.as_ref(),
        out,
        qlora::export::ftype::FileType::parse(ty).unwrap(),
        base,
        false,
        None,
    )
    .unwrap();
}

fn merged(dir: &Path, adapter: &Path, out: &Path, dtype: candle_core::DType, base: MergeBase) {
    let a = peft::load(adapter, &Device::Cpu).unwrap();
    qlora::export::safetensors::export(
        dir,
        Some(&a),
        out,
        dtype,
        base,
        false,
        false,
        &indicatif::ProgressBar::hidden(),
    )
    .unwrap();
}

/// With `QLORA_VERIFY_PRINT` set, prints the measures of `r` and returns true (the caller then
/// asserts nothing: the thresholds' calibration mode).
fn print_measures(r: &Report, what: &str) -> bool {
    if std::env::var("QLORA_VERIFY_PRINT").is_err() {
        return false;
    }
    let m = &r.measures;
    eprintln!(
        "MEASURE {what}: kl {:.3e} top1 {:.3} greedy {:.3} maxabs {:.3e} kl_base {:?} second {:?}",
        m.mean_kl,
        m.top1_agreement,
        m.greedy_agreement,
        m.max_abs_logit_diff,
        m.mean_kl_to_base,
        m.second_engine_kl
    );
    true
}

pub fn assert_faithful(r: &Report, what: &str) {
    if print_measures(r, what) {
        return;
    }
    assert!(r.faithful(), "{what}: {r:#?}");
}

/// Fails, and only on checks whose line starts with `measure`.
pub fn assert_fails_on(r: &Report, measure: &str, what: &str) {
    if print_measures(r, what) {
        return;
    }
    assert!(!r.faithful(), "{what} passed: {r:#?}");
    assert!(
        r.failures.iter().any(|f| f.starts_with(measure)),
        "{what}: expected a `{measure}` failure, got {:?}",
        r.failures
    );
}

#[test]
fn faithful_exports_of_every_type_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, a) = model_and_adapter(tmp.path(), false);
    for (dtype, name) in [
        (candle_core::DType::F32, "f32"),
        (candle_core::DType::F16, "f16"),
        (candle_core::DType::BF16, "bf16"),
    ] {
        let out = tmp.path().join(format!("merged-{name}"));
        merged(&dir, &a, &out, dtype, MergeBase::Original);
        let r = run(&dir, Some(&a), MergeBase::Original, &out, None);
        assert_eq!(r.export_type, name);
        assert_faithful(&r, name);
    }
    for ty in [
        "f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k",
    ] {
        let out = tmp.path().join(format!("m-{ty}.gguf"));
        gguf(&dir, Some(&a), &out, ty, MergeBase::Original);
        let r = run(&dir, Some(&a), MergeBase::Original, &out, None);
        assert_faithful(&r, ty);
    }
    // The adapter alone for llama.cpp, on its base GGUF.
    let base = tmp.path().join("base.gguf");
    gguf(&dir, None, &base, "f32", MergeBase::Original);
    let lora = tmp.path().join("lora.gguf");
    qlora::export::gguf_lora::export(
        &dir,
        &peft::load(&a, &Device::Cpu).unwrap(),
        &lora,
        GgmlType::parse("f32").unwrap(),
        false,
    )
    .unwrap();
    assert_faithful(
        &run(&dir, Some(&a), MergeBase::Original, &lora, Some(&base)),
        "lora gguf",
    );
    // An f16 LoRA on the f32 base is held to f16's bounds.
    let lora16 = tmp.path().join("lora16.gguf");
    qlora::export::gguf_lora::export(
        &dir,
        &peft::load(&a, &Device::Cpu).unwrap(),
        &lora16,
        GgmlType::parse("f16").unwrap(),
        false,
    )
    .unwrap();
    let r = run(&dir, Some(&a), MergeBase::Original, &lora16, Some(&base));
    assert_eq!(r.export_type, "f16");
    assert_faithful(&r, "f16 lora gguf");
    // An adapter written back (as `export --format peft` does) is the same adapter.
    let copy = tmp.path().join("adapter-copy");
    let loaded = peft::load(&a, &Device::Cpu).unwrap();
    let w: Vec<_> = loaded
        .weights
        .iter()
        .map(|(m, w)| (m.clone(), w.clone()))
        .collect();
    peft::save(&copy, &loaded.config, "x", &w).unwrap();
    assert_faithful(
        &run(&dir, Some(&a), MergeBase::Original, &copy, None),
        "peft",
    );
    // The base alone, converted.
    assert_faithful(
        &run(&dir, None, MergeBase::Original, &base, None),
        "base gguf",
    );
}

#[test]
fn dora_exports_verify_as_faithful() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, a) = model_and_adapter_with(tmp.path(), false, true);
    let out = tmp.path().join("merged-f32");
    merged(&dir, &a, &out, candle_core::DType::F32, MergeBase::Original);
    assert_faithful(
        &run(&dir, Some(&a), MergeBase::Original, &out, None),
        "DoRA merged f32",
    );
    for ty in ["f16", "q8_0"] {
        let out = tmp.path().join(format!("dora-{ty}.gguf"));
        gguf(&dir, Some(&a), &out, ty, MergeBase::Original);
        assert_faithful(
            &run(&dir, Some(&a), MergeBase::Original, &out, None),
            &format!("DoRA gguf {ty}"),
        );
    }
    // Merged into the NF4 base the adapter trained on, against that reference.
    let out = tmp.path().join("dora-nf4.gguf");
    gguf(&dir, Some(&a), &out, "f32", NF4);
    assert_faithful(&run(&dir, Some(&a), NF4, &out, None), "DoRA gguf on NF4");
    // The magnitude matters: the same A and B merged as plain LoRA fail against the DoRA reference.
    let loaded = peft::load(&a, &Device::Cpu).unwrap();
    let mut plain = loaded.clone();
    plain.config.use_dora = false;
    for w in plain.weights.values_mut() {
        w.magnitude = None;
    }
    let p = tmp.path().join("plain");
    let pw: Vec<_> = plain
        .weights
        .iter()
        .map(|(m, w)| (m.clone(), w.clone()))
        .collect();
    peft::save(&p, &plain.config, &dir.display().to_string(), &pw).unwrap();
    let out = tmp.path().join("plain.gguf");
    gguf(&dir, Some(&p), &out, "f32", MergeBase::Original);
    assert_fails_on(
        &run(&dir, Some(&a), MergeBase::Original, &out, None),
        "logits:",
        "DoRA adapter merged without its magnitude",
    );
}

#[test]
fn exports_with_embedding_and_head_copies_verify_as_faithful() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = qlora::hub::resolve(qlora::builtin::TINY_PHI3).unwrap();
    let mut m = crate::model::load_path_f32(&dir, BaseFormat::Dense);
    let lora = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        modules_to_save: vec!["embed_tokens".into(), "lm_head".into()],
        ..LoraConfig::default()
    };
    attach::init_adapters(&mut m, &lora, 3).unwrap();
    attach::init_modules(&mut m, &lora).unwrap();
    crate::train::randomize_b(&m, 11);
    for (i, v) in [&m.saved.embed, &m.saved.head].into_iter().enumerate() {
        let v = v.as_ref().unwrap();
        let t = v.as_tensor();
        let noise = crate::common::values(t.elem_count(), 40 + i as u64, 0.05);
        let noise = candle_core::Tensor::from_vec(noise, t.shape(), t.device()).unwrap();
        v.set(&(t + noise).unwrap()).unwrap();
    }
    let a = tmp.path().join("adapter-copies");
    peft::save_with_modules(
        &a,
        &lora,
        &dir.display().to_string(),
        &attach::adapter_weights(&m),
        &attach::module_weights(&m),
    )
    .unwrap();
    let out = tmp.path().join("merged-f32");
    merged(&dir, &a, &out, candle_core::DType::F32, MergeBase::Original);
    assert_faithful(
        &run(&dir, Some(&a), MergeBase::Original, &out, None),
        "copies merged f32",
    );
    let out = tmp.path().join("copies-q8_0.gguf");
    gguf(&dir, Some(&a), &out, "q8_0", MergeBase::Original);
    assert_faithful(
        &run(&dir, Some(&a), MergeBase::Original, &out, None),
        "copies gguf q8_0",
    );
    // The base's own embedding and head in place of the copies fail.
    let mut without = peft::load(&a, &Device::Cpu).unwrap();
    without.modules.clear();
    without.config.modules_to_save.clear();
    let p = tmp.path().join("no-copies");
    let w: Vec<_> = without
        .weights
        .iter()
        .map(|(k, w)| (k.clone(), w.clone()))
        .collect();
    peft::save(&p, &without.config, &dir.display().to_string(), &w).unwrap();
    let out = tmp.path().join("no-copies.gguf");
    gguf(&dir, Some(&p), &out, "f32", MergeBase::Original);
    assert_fails_on(
        &run(&dir, Some(&a), MergeBase::Original, &out, None),
        "logits:",
        "the adapter merged without its copies",
    );
}

#[test]
fn a_base_only_gguf_passed_off_as_merged_fails_on_the_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, a) = model_and_adapter(tmp.path(), false);
    let out = tmp.path().join("base.gguf");
    gguf(&dir, None, &out, "f16", MergeBase::Original);
    assert_fails_on(
        &run(&dir, Some(&a), MergeBase::Original, &out, None),
        "adapter:",
        "base-only gguf",
    );
}

#[test]
fn the_wrong_lora_scale_fails_on_the_logits() {
    // Merged with α/√r (rsLoRA) where the adapter says α/r.
    let tmp = tempfile::tempdir().unwrap();
    let (dir, a) = model_and_adapter(tmp.path(), false);
    let rs = tmp.path().join("as-rslora");
    std::fs::create_dir_all(&rs).unwrap();
    std::fs::copy(a.join(peft::WEIGHTS_FILE), rs.join(peft::WEIGHTS_FILE)).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join(peft::CONFIG_FILE)).unwrap()).unwrap();
    cfg["use_rslora"] = true.into();
    std::fs::write(
        rs.join(peft::CONFIG_FILE),
        serde_json::to_vec(&cfg).unwrap(),
    )
    .unwrap();
    let out = tmp.path().join("merged");
    merged(
        &dir,
        &rs,
        &out,
        candle_core::DType::F32,
        MergeBase::Original,
    );
    assert_fails_on(
        &run(&dir, Some(&a), MergeBase::Original, &out, None),
        "logits:",
        "rsLoRA scale",
    );
}

#[test]
fn a_transposed_tensor_fails_on_the_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, a) = model_and_adapter(tmp.path(), false);
    let out = tmp.path().join("merged");
    merged(&dir, &a, &out, candle_core::DType::F32, MergeBase::Original);
    // o_proj of layer 1 (square) transposed.
    let path = out.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let k = "model.layers.1.self_attn.o_proj.weight";
    let w = t[k].t().unwrap().contiguous().unwrap();
    t.insert(k.to_string(), w);
    candle_core::safetensors::save(&t, &path).unwrap();
    assert_fails_on(
        &run(&dir, Some(&a), MergeBase::Original, &out, None),
        "logits:",
        "transposed o_proj",
    );
}

#[test]
fn a_wrong_eos_fails_on_the_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, a) = model_and_adapter(tmp.path(), false);
    // The same weights exported from a copy whose config names another eos.
    let wrong = tmp.path().join("wrong-eos");
    std::fs::create_dir_all(&wrong).unwrap();
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), wrong.join(e.file_name())).unwrap();
    }
    // <|end|> as eos (a mistake seen in the wild: unsloth #3899), in config.json and in
    // tokenizer_config.json (where the GGUF converter reads it).
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(wrong.join("config.json")).unwrap()).unwrap();
    cfg["eos_token_id"] = 32007.into();
    std::fs::write(wrong.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    let mut tc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(wrong.join("tokenizer_config.json")).unwrap())
            .unwrap();
    tc["eos_token"] = "<|end|>".into();
    std::fs::write(
        wrong.join("tokenizer_config.json"),
        serde_json::to_vec(&tc).unwrap(),
    )
    .unwrap();
    let _ = std::fs::remove_file(wrong.join("generation_config.json"));
    let out = tmp.path().join("m.gguf");
    gguf(&wrong, Some(&a), &out, "f16", MergeBase::Original);
    let r = run(&dir, Some(&a), MergeBase::Original, &out, None);
    assert_fails_on(&r, "tokenizer: tokenizer.ggml.eos_token_id", "wrong eos");
    // In a merged checkpoint too.
    let out = tmp.path().join("merged");
    merged(
        &wrong,
        &a,
        &out,
        candle_core::DType::F32,
        MergeBase::Original,
    );
    let r = run(&dir, Some(&a), MergeBase::Original, &out, None);
    assert_fails_on(
        &r,
        "tokenizer: config.json eos_token_id",
        "wrong eos, merged",
    );
}

#[test]
fn a_wrong_pre_tokenizer_fails_on_the_tokenizer() {
    // A cl100k vocabulary (tests/fixtures/bpe): llama.cpp names it dbrx.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cl100k");
    crate::gguf_bpe::tiny_checkpoint(&dir, "cl100k");
    let out = tmp.path().join("right.gguf");
    qlora::export::gguf_model::export(
        &dir,
        None,
        &out,
        GgmlType::parse("f32").unwrap(),
        MergeBase::Original,
        false,
        None,
    )
    .unwrap();
    let r = run(&dir, None, MergeBase::Original, &out, None);
    assert!(r.failures.is_empty(), "{r:#?}");
    let out = tmp.path().join("wrong.gguf");
    qlora::export::gguf_model::export(
        &dir,
        None,
        &out,
        GgmlType::parse("f32").unwrap(),
        MergeBase::Original,
        false,
        Some("gpt-4o"),
    )
    .unwrap();
    let r = run(&dir, None, MergeBase::Original, &out, None);
    assert_fails_on(&r, "tokenizer: tokenizer.ggml.pre", "gpt-4o for cl100k");
}

#[test]
fn the_wrong_merge_base_is_a_small_nonzero_difference() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, a) = model_and_adapter(tmp.path(), false);
    let into_nf4 = tmp.path().join("into-nf4");
    merged(&dir, &a, &into_nf4, candle_core::DType::F32, NF4);
    let into_orig = tmp.path().join("into-orig");
    merged(
        &dir,
        &a,
        &into_orig,
        candle_core::DType::F32,
        MergeBase::Original,
    );
    // Each is faithful to what it says it is...
    assert_faithful(&run(&dir, Some(&a), NF4, &into_nf4, None), "nf4 as nf4");
    // ...and the other way round fails on the logits, by a small KL (the quantization error of
    // the weights: far below what losing the adapter costs).
    for (export, base, what) in [
        (
            &into_nf4,
            MergeBase::Original,
            "nf4 merge where the original was expected",
        ),
        (&into_orig, NF4, "original merge where nf4 was expected"),
    ] {
        let r = run(&dir, Some(&a), base, export, None);
        assert_fails_on(&r, "logits:", what);
        let m = &r.measures;
        assert!(
            m.mean_kl > 0.0 && m.mean_kl < m.mean_kl_to_base.unwrap(),
            "{what}: {m:?}"
        );
        assert!(
            r.failures.iter().all(|f| !f.starts_with("adapter:")),
            "{what}: {:?}",
            r.failures
        );
    }
}
