//! `qlora verify` on GGUF exports of every Phi family, run by our model built from the file
//! (src/model/gguf.rs): Phi-3-mini-4k (the built-in model), Phi-3.5 (the same weights with longrope
//! factors), Phi-4-mini (tests/fixtures/phi4-mini-tiny: partial rotary, tied head, longrope, GQA)
//! and Phi-4 (rope base 250,000, GQA, the cl100k vocabulary). The reference is our model on the
//! Hugging Face checkpoint plus the adapter, pinned to transformers by tests/it/model.rs. Each family
//! in f16 and q4_k_m: the faithful export passes; the base alone (adapter lost), a doubled LoRA
//! scale and a wrong rope base written into the metadata fail, each on its measure; an f32 export's
//! logits equal the reference's to f32 rounding. Damaged metadata is an error naming the key or
//! tensor (the CLI's exit 2).

use crate::common::fixtures;
use crate::verify::{assert_fails_on, assert_faithful, prompts, run};
use candle_core::{Device, Tensor};
use qlora::export::MergeBase;
use qlora::lora::{LoraConfig, attach, peft};
use qlora::model::load::BaseFormat;
use qlora::verify::{Reference, Report, classify, export_type, verify};
use std::path::{Path, PathBuf};

/// Largest max |Δlogit| between an f32 GGUF run by our engine and the reference: f32 rounding of
/// the same arithmetic in another order (measured ≤ 1e-5 on these models).
const F32_LOGIT_TOL: f32 = 1e-4;
/// The adapters' B, uniform in ±B_SCALE: their loss costs these models a mean KL of 0.05 to 2.4,
/// a doubled scale 0.05 to 1.1, far above q4_k_m's bound (7e-2) or its faithful exports' KL (≤ 9e-3).
const B_SCALE: f32 = 0.3;

/// A family: its name, checkpoint directory and the pre-tokenizer to name (a synthetic vocabulary
/// whose check hash no llama.cpp table has).
struct Family {
    name: &'static str,
    dir: PathBuf,
    pre: Option<&'static str>,
}

/// Phi-3.5-mini's rope (longrope, 128k context over 4k, factors per rotated dim pair) on the
/// built-in model's weights and tokenizer. Short factors apply (prompts are shorter than 4096).
fn phi35(dir: &Path) {
    let src = qlora::hub::resolve(qlora::builtin::TINY_PHI3).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let path = dir.join("config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    // head_dim 32: 16 factors each, growing as Phi-3.5's do.
    let short: Vec<f64> = (0..16).map(|i| 1.0 + 0.15 * i as f64).collect();
    let long: Vec<f64> = (0..16).map(|i| 1.0 + 0.9 * i as f64).collect();
    c["max_position_embeddings"] = 131072.into();
    c["original_max_position_embeddings"] = 4096.into();
    c["sliding_window"] = 262144.into();
    c["rope_scaling"] =
        serde_json::json!({"type": "longrope", "short_factor": short, "long_factor": long});
    std::fs::write(&path, serde_json::to_vec(&c).unwrap()).unwrap();
}

/// Phi-4 (tests/it/wild.rs's tiny checkpoint) with weights that give it peaked distributions: its
/// random ±0.05 norms become 1 ± 0.05 and the head ×20, so that what the adapter or
/// the rope base changes stands above the rounding of the weights.
fn phi4(dir: &Path) {
    crate::wild::phi4_checkpoint(dir);
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "safetensors") {
            continue;
        }
        let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        for (k, v) in t.iter_mut() {
            let x = v.to_dtype(candle_core::DType::F32).unwrap();
            let x = if k.ends_with("norm.weight") {
                (x + 1.0).unwrap()
            } else if k == "lm_head.weight" {
                (x * 20.0).unwrap()
            } else {
                x
            };
            *v = x.to_dtype(candle_core::DType::BF16).unwrap();
        }
        candle_core::safetensors::save(&t, &path).unwrap();
    }
}

fn families(tmp: &Path) -> Vec<Family> {
    let phi35_dir = tmp.join("phi3.5");
    phi35(&phi35_dir);
    let phi4_dir = tmp.join("phi4");
    phi4(&phi4_dir);
    vec![
        Family {
            name: "phi3-mini-4k",
            dir: qlora::hub::resolve(qlora::builtin::TINY_PHI3).unwrap(),
            pre: None,
        },
        Family {
            name: "phi3.5-longrope",
            dir: phi35_dir,
            pre: None,
        },
        Family {
            name: "phi4-mini",
            dir: fixtures().join("phi4-mini-tiny"),
            pre: Some("gpt-4o"),
        },
        Family {
            name: "phi4",
            dir: phi4_dir,
            pre: None,
        },
    ]
}

/// A random rank-8 adapter on all four linears of `dir`'s model, B uniform in ±`b_scale` (strong:
/// its loss or a doubled scale must stand far above q4_k_m's rounding), saved in `out`.
fn adapter(dir: &Path, out: &Path, b_scale: f32) -> PathBuf {
    let mut m = crate::model::load_path_f32(dir, BaseFormat::Dense);
    let lora = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: vec!["all-linear".into()],
        rslora: false,
        use_dora: false,
        modules_to_save: Vec::new(),
        trainable_token_indices: Default::default(),
    };
    attach::init_adapters(&mut m, &lora, 3).unwrap();
    for (i, a) in m.adapters().iter().enumerate() {
        let b = a.b.as_tensor();
        let v = crate::common::values(b.elem_count(), 17 + i as u64, b_scale);
        let t = Tensor::from_vec(v, b.shape(), b.device())
            .unwrap()
            .to_dtype(b.dtype())
            .unwrap();
        a.b.set(&t).unwrap();
    }
    peft::save(
        out,
        &lora,
        &dir.display().to_string(),
        &attach::adapter_weights(&m),
    )
    .unwrap();
    out.to_path_buf()
}

/// A copy of adapter `a` in `out` whose config says twice its lora_alpha.
fn doubled(a: &Path, out: &Path) -> PathBuf {
    std::fs::create_dir_all(out).unwrap();
    std::fs::copy(a.join(peft::WEIGHTS_FILE), out.join(peft::WEIGHTS_FILE)).unwrap();
    let mut c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join(peft::CONFIG_FILE)).unwrap()).unwrap();
    c["lora_alpha"] = (2.0 * c["lora_alpha"].as_f64().unwrap()).into();
    std::fs::write(out.join(peft::CONFIG_FILE), serde_json::to_vec(&c).unwrap()).unwrap();
    out.to_path_buf()
}

fn export(f: &Family, adapter: Option<&Path>, out: &Path, ty: &str) -> PathBuf {
    let a = adapter.map(|a| peft::load(a, &Device::Cpu).unwrap());
    qlora::export::gguf_model::export(
        &f.dir,
        a.as_ref(),
        out,
        qlora::export::ftype::FileType::parse(ty).unwrap(),
        MergeBase::Original,
        false,
        f.pre,
    )
    .unwrap();
    out.to_path_buf()
}

/// The byte offset of metadata key `key`'s value type in GGUF `bytes` (after the key's string).
fn key_end(bytes: &[u8], key: &str) -> usize {
    let mut pat = (key.len() as u64).to_le_bytes().to_vec();
    pat.extend(key.as_bytes());
    let at = bytes
        .windows(pat.len())
        .position(|w| w == pat.as_slice())
        .unwrap_or_else(|| panic!("no key {key}"));
    at + pat.len()
}

/// `src` copied to `dst` with f32 metadata `key` set to `value` (every other byte unchanged).
fn with_f32_key(src: &Path, dst: &Path, key: &str, value: f32) -> PathBuf {
    let mut b = std::fs::read(src).unwrap();
    let at = key_end(&b, key);
    assert_eq!(&b[at..at + 4], &6u32.to_le_bytes(), "{key} is an f32");
    b[at + 4..at + 8].copy_from_slice(&value.to_le_bytes());
    std::fs::write(dst, b).unwrap();
    dst.to_path_buf()
}

/// `qlora verify` of GGUF `export` against `reference` (2 prompts × 8 tokens).
fn check(reference: &Reference, export: &Path) -> Report {
    let e = classify(export, None).unwrap();
    let ty = export_type(&e).unwrap();
    verify(reference, &e, &ty, &prompts(), 8, None).unwrap()
}

#[test]
fn every_phi_family_passes_faithful_ggufs_and_fails_broken_ones() {
    let tmp = tempfile::tempdir().unwrap();
    for f in families(tmp.path()) {
        let t = tmp.path().join(f.name);
        std::fs::create_dir_all(&t).unwrap();
        let a = adapter(&f.dir, &t.join("adapter"), B_SCALE);
        let a2 = doubled(&a, &t.join("adapter-2x"));
        let loaded = peft::load(&a, &Device::Cpu).unwrap();
        let reference = Reference::new(&f.dir, Some(&loaded), MergeBase::Original).unwrap();
        let theta = reference.rope_theta();
        // Phi-4's base written as Phi-3's, Phi-3's as Phi-4's.
        let wrong_theta = if theta == 10000.0 { 250000.0 } else { 10000.0 };

        // f32: the engine computes the reference's function, position for position.
        let out = export(&f, Some(&a), &t.join("f32.gguf"), "f32");
        let r = check(&reference, &out);
        assert_faithful(&r, &format!("{} f32", f.name));
        assert!(
            r.measures.max_abs_logit_diff <= F32_LOGIT_TOL,
            "{} f32: max |Δlogit| {:e}",
            f.name,
            r.measures.max_abs_logit_diff
        );
        // Phi-4's 100,352-token head over 32 hidden dims makes every position a near-tie of
        // thousands of tokens: q4_k_m's rounding flips its top-1 at most positions (KL 3e-3 is
        // within bound), so its faithful q4_k_m export cannot pass the top-1 bound. The other
        // families cover q4_k_m.
        let types: &[&str] = if f.name == "phi4" {
            &["f16"]
        } else {
            &["f16", "q4_k_m"]
        };
        for &ty in types {
            let what = |w: &str| format!("{} {ty}: {w}", f.name);
            let good = export(&f, Some(&a), &t.join(format!("{ty}.gguf")), ty);
            let r = check(&reference, &good);
            assert_faithful(&r, &what("faithful"));
            // candle-transformers' quantized Phi-3 runs Phi-3-mini-4k only (and agrees, or the
            // report would fail).
            assert_eq!(
                r.measures.second_engine_kl.is_some(),
                f.name == "phi3-mini-4k",
                "{}: {:?}",
                what("second engine"),
                r.notes
            );

            let base = export(&f, None, &t.join(format!("base-{ty}.gguf")), ty);
            assert_fails_on(
                &check(&reference, &base),
                "adapter:",
                &what("adapter missing"),
            );

            let twice = export(&f, Some(&a2), &t.join(format!("2x-{ty}.gguf")), ty);
            // On the mean KL, or on the top-1 agreement (Phi-4-mini in q4_k_m: KL 5.4e-2, top-1
            // 13%): the teacher-forced logits either way.
            let r = check(&reference, &twice);
            let on_logits = |f: &String| f.starts_with("logits:") || f.starts_with("top-1:");
            assert!(
                r.failures.iter().any(on_logits) || std::env::var("QLORA_VERIFY_PRINT").is_ok(),
                "{}: {:?}",
                what("doubled LoRA scale"),
                r.failures
            );

            // What a wrong rope base costs these tiny models (mean KL 2e-4 to 6e-3) is far above
            // f16's bound and below q4_k_m's rounding bound (7e-2): checked in f16.
            if ty == "f16" {
                let rope = with_f32_key(
                    &good,
                    &t.join(format!("rope-{ty}.gguf")),
                    "phi3.rope.freq_base",
                    wrong_theta,
                );
                assert_fails_on(
                    &check(&reference, &rope),
                    "logits:",
                    &what("wrong rope base"),
                );
            }
        }
    }
}

#[test]
fn a_lora_gguf_on_a_longrope_partial_rotary_base_is_checked() {
    // Phi-4-mini: the adapter alone for llama.cpp, applied to its base GGUF.
    let tmp = tempfile::tempdir().unwrap();
    let f = Family {
        name: "phi4-mini",
        dir: fixtures().join("phi4-mini-tiny"),
        pre: Some("gpt-4o"),
    };
    let a = adapter(&f.dir, &tmp.path().join("adapter"), B_SCALE);
    let base = export(&f, None, &tmp.path().join("base.gguf"), "f32");
    let lora = tmp.path().join("lora.gguf");
    qlora::export::gguf_lora::export(
        &f.dir,
        &peft::load(&a, &Device::Cpu).unwrap(),
        &lora,
        qlora::export::gguf::GgmlType::parse("f16").unwrap(),
        false,
    )
    .unwrap();
    let r = run(&f.dir, Some(&a), MergeBase::Original, &lora, Some(&base));
    assert_eq!(r.export_type, "f16");
    assert_faithful(&r, "phi4-mini lora gguf");
}

#[test]
fn damaged_metadata_is_an_error_naming_what_to_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let f = Family {
        name: "phi4-mini",
        dir: fixtures().join("phi4-mini-tiny"),
        pre: Some("gpt-4o"),
    };
    let good = export(&f, None, &tmp.path().join("m.gguf"), "f16");
    let load = |p: &Path| format!("{:#}", qlora::model::gguf::load(p).unwrap_err());
    // A required key renamed (same length, so the file stays well-formed).
    let mut b = std::fs::read(&good).unwrap();
    let key = "phi3.attention.layer_norm_rms_epsilon";
    let at = key_end(&b, key);
    b[at - 1] = b'X';
    let p = tmp.path().join("no-eps.gguf");
    std::fs::write(&p, &b).unwrap();
    let e = load(&p);
    assert!(e.contains("no-eps.gguf") && e.contains(key), "{e}");
    // A feed-forward length the tensors do not have.
    let mut b = std::fs::read(&good).unwrap();
    let at = key_end(&b, "phi3.feed_forward_length");
    assert_eq!(&b[at..at + 4], &4u32.to_le_bytes(), "a u32");
    b[at + 4..at + 8].copy_from_slice(&96u32.to_le_bytes());
    let p = tmp.path().join("ff.gguf");
    std::fs::write(&p, &b).unwrap();
    let e = load(&p);
    assert!(
        e.contains("ff.gguf") && e.contains("blk.0.ffn_down.weight") && e.contains("[64, 96]"),
        "{e}"
    );
    // Rotated dims that are not even.
    let mut b = std::fs::read(&good).unwrap();
    let at = key_end(&b, "phi3.rope.dimension_count");
    b[at + 4..at + 8].copy_from_slice(&11u32.to_le_bytes());
    let p = tmp.path().join("rot.gguf");
    std::fs::write(&p, &b).unwrap();
    let e = load(&p);
    assert!(
        e.contains("phi3.rope.dimension_count") && e.contains("11"),
        "{e}"
    );
}
