//! The merged GGUF against llama.cpp's own converter (tests/fixtures/gen_gguf_goldens.py): read back
//! with a second implementation (gguf-rs), every metadata key, tensor name, type, ggml shape and the
//! bytes of every tensor (by sha256) equal what convert_hf_to_gguf.py writes for the same model.

use crate::common::fixtures;
use qlora::export::MergeBase;
use qlora::export::gguf::GgmlType;
use sha2::{Digest, Sha256};

/// Keys that only name the file (llama.cpp derives them from the directory name).
const NAMING_KEYS: [&str; 4] = [
    "general.name",
    "general.basename",
    "general.version",
    "general.size_label",
];
const GGML_TYPE_NAMES: [(u32, &str); 10] = [
    (0, "F32"),
    (1, "F16"),
    (2, "Q4_0"),
    (6, "Q5_0"),
    (7, "Q5_1"),
    (8, "Q8_0"),
    (12, "Q4_K"),
    (13, "Q5_K"),
    (14, "Q6_K"),
    (30, "BF16"),
];

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// gguf-py's view of an array item: the bytes of a string, or the little-endian bytes of a number.
fn item_bytes(v: &serde_json::Value, elem: &str) -> Vec<u8> {
    match elem {
        "STRING" => v.as_str().unwrap().as_bytes().to_vec(),
        "FLOAT32" => (v.as_f64().unwrap() as f32).to_le_bytes().to_vec(),
        "INT32" => (v.as_i64().unwrap() as i32).to_le_bytes().to_vec(),
        other => panic!("array of {other}"),
    }
}

fn check(ty: &str) {
    let model = qlora::hub::resolve(qlora::builtin::TINY_PHI3).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.gguf");
    qlora::export::gguf_model::export(
        &model,
        None,
        &out,
        GgmlType::parse(ty).unwrap(),
        MergeBase::Original,
        false,
        None,
    )
    .unwrap();
    compare(&out, &format!("tiny-phi3-{ty}.json"));
}

/// Every key of `golden` (gguf-py's description: type, value or array length and sha256), naming
/// keys aside, has the same type and contents in `ours`.
pub(crate) fn compare_metadata(
    ty: &str,
    ours: &std::collections::BTreeMap<String, serde_json::Value>,
    golden: &serde_json::Map<String, serde_json::Value>,
) {
    for (key, want) in golden {
        if NAMING_KEYS.contains(&key.as_str()) {
            continue;
        }
        let got = ours
            .get(key)
            .unwrap_or_else(|| panic!("{ty}: missing key {key}"));
        let types: Vec<&str> = want["type"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        if types[0] == "ARRAY" {
            let items: Vec<Vec<u8>> = got
                .as_array()
                .unwrap()
                .iter()
                .map(|v| item_bytes(v, types[1]))
                .collect();
            assert_eq!(
                items.len() as u64,
                want["len"].as_u64().unwrap(),
                "{key}: length"
            );
            assert_eq!(
                hex(&items.join(&0u8)),
                want["sha256"].as_str().unwrap(),
                "{key}: contents"
            );
        } else if types[0] == "STRING" {
            assert_eq!(got.as_str(), want["value"].as_str(), "{key}");
        } else {
            // Numbers compared at the f32 precision GGUF stores (gguf-rs widens f32 through text).
            assert_eq!(
                got.as_f64().map(|v| v as f32),
                want["value"].as_f64().map(|v| v as f32),
                "{key}"
            );
        }
    }
}

/// Our file read back by gguf-rs against a golden description of llama.cpp's output.
pub(crate) fn compare(out: &std::path::Path, golden_file: &str) {
    let ty = golden_file;
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("gguf").join(golden_file)).unwrap())
            .unwrap();

    let file = gguf_rs::mmap::MmapGGUF::open(out).unwrap();
    let m = file.model();
    assert_eq!(m.alignment(), 32);
    let ours = m.metadata();
    compare_metadata(ty, ours, golden["metadata"].as_object().unwrap());
    let extra: Vec<_> = ours
        .keys()
        .filter(|k| {
            !golden["metadata"].as_object().unwrap().contains_key(*k) && !k.starts_with("GGUF.")
        })
        .collect();
    assert!(
        extra
            .iter()
            .all(|k| ["general.type", "general.alignment"].contains(&k.as_str())),
        "{ty}: keys llama.cpp does not write: {extra:?}"
    );

    let bytes = file.as_slice();
    let data = m.data_offset() as usize;
    let want: Vec<&serde_json::Value> = golden["tensors"].as_array().unwrap().iter().collect();
    assert_eq!(m.tensors().len(), want.len());
    for w in want {
        let name = w["name"].as_str().unwrap();
        let t = m
            .tensors()
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("{ty}: no tensor {name}"));
        let kind = GGML_TYPE_NAMES
            .iter()
            .find(|(id, _)| *id == t.kind)
            .map(|(_, n)| *n)
            .unwrap_or("?");
        assert_eq!(kind, w["type"].as_str().unwrap(), "{name}: type");
        let shape: Vec<u64> = w["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(t.shape, shape, "{name}: ggml shape");
        let start = data + t.offset as usize;
        assert_eq!(
            hex(&bytes[start..start + t.size as usize]),
            w["sha256"].as_str().unwrap(),
            "{ty} {name}: bytes"
        );
    }
}

#[test]
fn f16_gguf_equals_llama_cpp_converter_output() {
    check("f16");
}

#[test]
fn q8_0_gguf_equals_llama_cpp_converter_output() {
    check("q8_0");
}

#[test]
fn lora_gguf_equals_llama_cpp_convert_lora_to_gguf_output() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lora.gguf");
    let adapter = qlora::lora::peft::load(
        &fixtures().join("phi3/peft/adapter"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    qlora::export::gguf_lora::export(
        &fixtures().join("phi3/gqa"),
        &adapter,
        &out,
        GgmlType::parse("f32").unwrap(),
        false,
    )
    .unwrap();
    compare(&out, "lora-f32.json");
}

#[test]
fn rslora_alpha_is_folded_so_llama_cpp_scales_like_peft() {
    // llama.cpp scales by alpha / r; rsLoRA's scale is alpha / sqrt(r), so we write scale · r.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lora.gguf");
    let adapter = qlora::lora::peft::load(
        &fixtures().join("phi3/peft/adapter-rslora"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    qlora::export::gguf_lora::export(
        &fixtures().join("phi3/gqa"),
        &adapter,
        &out,
        GgmlType::parse("f32").unwrap(),
        false,
    )
    .unwrap();
    let file = gguf_rs::mmap::MmapGGUF::open(&out).unwrap();
    let alpha = file.model().metadata()["adapter.lora.alpha"]
        .as_f64()
        .unwrap() as f32;
    assert_eq!(
        alpha,
        (4.0 / 8f64.sqrt() * 8.0) as f32,
        "r = 8, alpha = 4, rsLoRA scale 4/√8"
    );
}

#[test]
fn unsupported_types_and_existing_files_are_refused() {
    assert!(
        GgmlType::parse("q4_k_m")
            .unwrap_err()
            .to_string()
            .contains("not supported")
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.gguf");
    std::fs::write(&out, b"keep").unwrap();
    let model = qlora::hub::resolve(qlora::builtin::TINY_PHI3).unwrap();
    let e = qlora::export::gguf_model::export(
        &model,
        None,
        &out,
        GgmlType::parse("f16").unwrap(),
        MergeBase::Original,
        false,
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("--force"));
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
}

#[test]
fn longrope_models_carry_their_factors_and_attention_factor() {
    // The built-in model with 128k-style longrope settings (as gen_gguf_goldens.py's LONGROPE).
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("longrope");
    std::fs::create_dir(&dir).unwrap();
    let model = qlora::hub::resolve(qlora::builtin::TINY_PHI3).unwrap();
    for e in std::fs::read_dir(&model).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    cfg["max_position_embeddings"] = 131072.into();
    cfg["original_max_position_embeddings"] = 4096.into();
    let short: Vec<f64> = (0..16).map(|i| 1.0 + 0.05 * i as f64).collect();
    let long: Vec<f64> = (0..16).map(|i| 1.0 + 0.5 * i as f64).collect();
    cfg["rope_scaling"] =
        serde_json::json!({"type": "longrope", "short_factor": short, "long_factor": long});
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    let out = tmp.path().join("lr.gguf");
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
    compare(&out, "tiny-phi3-longrope-f32.json");
}
