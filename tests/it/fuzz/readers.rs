//! The six readers, each through the entry point the commands use, from seeds that are real files
//! where the repository has them (transformers' and bitsandbytes' checkpoints, PEFT's adapter,
//! Phi-3's tokenizer.model) and built here where it does not (a GGUF with every value type, a
//! small SentencePiece model, a safetensors file with every common dtype).

use super::seeds::{gguf_seed, sentencepiece_seed};
use super::{Kind, Tally, Target, fuzz};
use crate::common::{Raw, fixtures, repo_dir};
use candle_core::{DType, Device};
use qlora::model::load::{BaseFormat, LoadOptions, load};
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

pub(super) const JSON_TOKENS: &[&[u8]] = &[
    b"null",
    b"-1",
    b"1e400",
    b"18446744073709551616",
    b"\"\\ud800\"",
    b"[",
    b"{",
    b"]",
    b"}",
    b",",
    b":",
    b"\"",
    b"\\",
    b"NaN",
    b"0.5",
];
pub(super) const BINARY_TOKENS: &[&[u8]] = &[
    &[0xff; 8],
    &[0x80; 10],
    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
    &[0, 0, 0, 0],
    &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
    &[0x12, 0x7f],
    &[9, 0, 0, 0, 9, 0, 0, 0],
    &[0xff, 0xff, 0xff, 0x7f],
    b"GGUF",
];

pub(super) fn identity(b: &[u8]) -> Vec<u8> {
    b.to_vec()
}

/// Copies the files of `src` into `dst`.
fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

fn load_dense(dir: &Path) -> anyhow::Result<()> {
    let opts = LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        base: BaseFormat::Dense,
    };
    load(dir, &opts).map(drop)
}

fn load_nf4(dir: &Path) -> anyhow::Result<()> {
    let opts = LoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        base: BaseFormat::NF4,
    };
    load(dir, &opts).map(drop)
}

/// A safetensors file's header JSON and the data after it.
fn split_safetensors(bytes: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (bytes[8..8 + n].to_vec(), bytes[8 + n..].to_vec())
}

fn join_safetensors(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

pub(super) fn report(reader: &str, tallies: &[Tally]) {
    let mut total = Tally::default();
    for t in tallies {
        total += *t;
    }
    println!(
        "fuzz {reader}: {} inputs in all, 0 panics, {} accepted, {} rejected naming the file",
        total.tried, total.accepted, total.rejected
    );
}

#[test]
fn safetensors_headers_never_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tallies = Vec::new();

    // PEFT's own adapter file, read by `peft::load` (candle's tensor conversion behind our header
    // check): the whole file, then its header JSON.
    let adapter = tmp.path().join("adapter");
    copy_dir(&fixtures().join("phi3/peft/adapter"), &adapter);
    let file = adapter.join("adapter_model.safetensors");
    let seed = std::fs::read(&file).unwrap();
    let read = || qlora::lora::peft::load(&adapter, &Device::Cpu).map(drop);
    tallies.push(fuzz(&Target {
        name: "adapter_model.safetensors (peft::load)",
        file: file.clone(),
        seed: seed.clone(),
        kind: Kind::Bytes,
        dict: JSON_TOKENS,
        fields: vec![0],
        wrap: &identity,
        read: &read,
        divisor: 1,
    }));
    let (header, data) = split_safetensors(&seed);
    let wrap = |h: &[u8]| join_safetensors(h, &data);
    tallies.push(fuzz(&Target {
        name: "adapter_model.safetensors header JSON (peft::load)",
        file,
        seed: header,
        kind: Kind::Json,
        dict: JSON_TOKENS,
        fields: vec![],
        wrap: &wrap,
        read: &read,
        divisor: 1,
    }));

    // transformers' checkpoint, read by `model::load` (Checkpoint::open, every tensor).
    let model = tmp.path().join("model");
    copy_dir(&fixtures().join("bnb/tiny-phi3"), &model);
    let file = model.join("model.safetensors");
    let seed = std::fs::read(&file).unwrap();
    let read = || load_dense(&model);
    tallies.push(fuzz(&Target {
        name: "model.safetensors (model::load)",
        file: file.clone(),
        seed: seed.clone(),
        kind: Kind::Bytes,
        dict: JSON_TOKENS,
        fields: vec![0],
        wrap: &identity,
        read: &read,
        divisor: 2,
    }));
    let (header, data) = split_safetensors(&seed);
    let wrap = |h: &[u8]| join_safetensors(h, &data);
    tallies.push(fuzz(&Target {
        name: "model.safetensors header JSON (model::load)",
        file,
        seed: header,
        kind: Kind::Json,
        dict: JSON_TOKENS,
        fields: vec![],
        wrap: &wrap,
        read: &read,
        divisor: 1,
    }));

    // Every common dtype and a `__metadata__`, through `qlora inspect` and candle's loading.
    let file = tmp.path().join("any.safetensors");
    let raws = [
        ("f32", Dtype::F32, vec![2, 3], 4),
        ("bf16", Dtype::BF16, vec![4], 2),
        ("f16", Dtype::F16, vec![1, 1, 2], 2),
        ("u8", Dtype::U8, vec![5], 1),
        ("i64", Dtype::I64, vec![2], 8),
        ("f64", Dtype::F64, vec![], 8),
        ("empty", Dtype::F32, vec![0, 7], 4),
    ]
    .map(|(name, dtype, shape, size)| {
        let n: usize = shape.iter().product();
        let data = (0..n * size).map(|i| (i * 37 % 251) as u8).collect();
        (name.to_string(), Raw { dtype, shape, data })
    });
    let metadata = [("format".to_string(), "pt".to_string())].into();
    let seed =
        safetensors::serialize(raws.iter().map(|(n, r)| (n.clone(), r)), Some(metadata)).unwrap();
    let read = || {
        qlora::cli::inspect::describe(&file, true)?;
        qlora::checkpoint::load_safetensors(&file, &Device::Cpu).map(drop)
    };
    let (header, data) = split_safetensors(&seed);
    tallies.push(fuzz(&Target {
        name: "safetensors, every dtype (qlora inspect, load_safetensors)",
        file: file.clone(),
        seed: seed.clone(),
        kind: Kind::Bytes,
        dict: JSON_TOKENS,
        fields: vec![0],
        wrap: &identity,
        read: &read,
        divisor: 1,
    }));
    let wrap = |h: &[u8]| join_safetensors(h, &data);
    tallies.push(fuzz(&Target {
        name: "safetensors header JSON, every dtype (qlora inspect)",
        file: file.clone(),
        seed: header,
        kind: Kind::Json,
        dict: JSON_TOKENS,
        fields: vec![],
        wrap: &wrap,
        read: &read,
        divisor: 1,
    }));
    report("safetensors header", &tallies);
}

/// Inputs that crashed the readers before they were fixed, each now one error naming its file:
/// - safetensors: eight U8 tensors of 2^61 − 1 bytes end at 2^64 − 8, and the safetensors crate's
///   `buffer_end + 8 + header_len` overflows (a panic in debug builds; release wraps and rejects);
/// - GGUF: tensor type id 40 (ggml's `GGML_TYPE_COUNT`) hit gguf-rs's `unreachable!`;
/// - tokenizer.model: a length varint of 2^64 − 1 overflowed `at + len`;
/// - config.json: `num_hidden_layers` 2^60 overflowed the layer vector's capacity, and
///   `hidden_size` 2^63 with 2^62 heads overflowed the qkv_proj shape;
/// - quant state: `shape` [2^32, 2^32] overflowed the element count.
#[test]
fn former_crashers_are_one_error() {
    let tmp = tempfile::tempdir().unwrap();
    let named = |file: &Path, r: anyhow::Result<()>| {
        let msg = r.expect_err("rejected").to_string();
        assert!(msg.contains(&file.display().to_string()), "{msg}");
    };

    let file = tmp.path().join("wrap.safetensors");
    let step = (1u64 << 61) - 1;
    let header: serde_json::Map<String, serde_json::Value> = (0..8u64)
        .map(|i| {
            let info = serde_json::json!({"dtype": "U8", "shape": [step],
                                          "data_offsets": [i * step, (i + 1) * step]});
            (format!("t{i}"), info)
        })
        .collect();
    let header = serde_json::to_vec(&header).unwrap();
    std::fs::write(&file, join_safetensors(&header, &[0u8; 16])).unwrap();
    named(
        &file,
        qlora::checkpoint::load_safetensors(&file, &Device::Cpu).map(drop),
    );

    let file = tmp.path().join("count.gguf");
    let mut g = b"GGUF".to_vec();
    for x in [
        3u32.to_le_bytes().to_vec(),
        1u64.to_le_bytes().to_vec(),
        0u64.to_le_bytes().to_vec(),
    ] {
        g.extend(x);
    }
    g.extend(1u64.to_le_bytes());
    g.push(b'a');
    g.extend(1u32.to_le_bytes());
    g.extend(32u64.to_le_bytes());
    g.extend(40u32.to_le_bytes());
    g.extend(0u64.to_le_bytes());
    std::fs::write(&file, &g).unwrap();
    named(&file, qlora::cli::inspect::describe(&file, false).map(drop));

    let file = tmp.path().join("tokenizer.model");
    std::fs::write(
        &file,
        [
            0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ],
    )
    .unwrap();
    named(
        &file,
        qlora::export::vocab::phi3_vocab(tmp.path(), 64).map(drop),
    );

    let dir = tmp.path().join("model");
    copy_dir(&fixtures().join("bnb/tiny-phi3"), &dir);
    let file = dir.join("config.json");
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    for (key, value) in [
        ("num_hidden_layers", serde_json::json!(1u64 << 60)),
        ("hidden_size", serde_json::json!(1u64 << 63)),
    ] {
        let mut c = config.clone();
        c[key] = value;
        c["num_attention_heads"] = serde_json::json!(1u64 << 62);
        c.as_object_mut().unwrap().remove("num_key_value_heads");
        if key == "num_hidden_layers" {
            c["num_attention_heads"] = config["num_attention_heads"].clone();
        }
        std::fs::write(&file, serde_json::to_vec(&c).unwrap()).unwrap();
        named(&file, load_dense(&dir));
    }

    let dir = tmp.path().join("bnb");
    copy_dir(&fixtures().join("bnb/tiny-phi3-bnb"), &dir);
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let state = "model.layers.0.self_attn.qkv_proj.weight.quant_state.bitsandbytes__nf4";
    let mut json: serde_json::Value =
        serde_json::from_slice(st.tensor(state).unwrap().data()).unwrap();
    json["shape"] = serde_json::json!([1u64 << 32, 1u64 << 32]);
    let json = serde_json::to_vec(&json).unwrap();
    let replaced = Raw {
        dtype: Dtype::U8,
        shape: vec![json.len()],
        data: json,
    };
    let raws: Vec<(String, Raw)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let raw = Raw {
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                data: v.data().to_vec(),
            };
            (n, raw)
        })
        .collect();
    let all = raws
        .iter()
        .map(|(n, r)| (n.clone(), if n == state { &replaced } else { r }));
    let out = safetensors::serialize(all, None).unwrap();
    std::fs::write(&file, out).unwrap();
    named(&file, load_dense(&dir));
}

#[test]
fn gguf_never_crashes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tallies = Vec::new();
    let file = tmp.path().join("model.gguf");
    let (seed, fields) = gguf_seed();
    let read = || {
        qlora::export::gguf_read::read_header(&file)?;
        qlora::cli::inspect::describe(&file, false).map(drop)
    };
    let h = {
        std::fs::write(&file, &seed).unwrap();
        qlora::export::gguf_read::read_header(&file).unwrap()
    };
    assert_eq!((h.metadata.len(), h.tensors.len()), (16, 3));
    assert_eq!(h.tensors[2].n_bytes, 144);
    tallies.push(fuzz(&Target {
        name: "GGUF, every value type (gguf_read, qlora inspect)",
        file: file.clone(),
        seed,
        kind: Kind::Bytes,
        dict: BINARY_TOKENS,
        fields,
        wrap: &identity,
        read: &read,
        divisor: 1,
    }));

    // What our writer writes (a LoRA GGUF of the PEFT fixture), through `qlora inspect`.
    let lora = tmp.path().join("lora.gguf");
    let adapter = qlora::lora::peft::load(&fixtures().join("phi3/peft/adapter"), &Device::Cpu)
        .expect("fixture adapter");
    let ty = qlora::export::ftype::parse_lora_type("q8_0").unwrap();
    qlora::export::gguf_lora::export(&fixtures().join("phi3/gqa"), &adapter, &lora, ty, false)
        .expect("writing the LoRA GGUF");
    let seed = std::fs::read(&lora).unwrap();
    let read = || qlora::cli::inspect::describe(&lora, true).map(drop);
    tallies.push(fuzz(&Target {
        name: "GGUF from our LoRA export (qlora inspect)",
        file: lora.clone(),
        seed,
        kind: Kind::Bytes,
        dict: BINARY_TOKENS,
        fields: vec![8, 16],
        wrap: &identity,
        read: &read,
        divisor: 2,
    }));
    report("GGUF", &tallies);
}

#[test]
fn tokenizer_model_never_crashes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tallies = Vec::new();
    let file = tmp.path().join("tokenizer.model");
    let read = || qlora::export::vocab::phi3_vocab(tmp.path(), 64).map(drop);
    let (seed, fields) = sentencepiece_seed();
    std::fs::write(&file, &seed).unwrap();
    let v = qlora::export::vocab::read_sentencepiece(&file).unwrap();
    assert_eq!((v.tokens.len(), v.types[3]), (15, 6));
    tallies.push(fuzz(&Target {
        name: "tokenizer.model, small (export::vocab::phi3_vocab)",
        file: file.clone(),
        seed,
        kind: Kind::Bytes,
        dict: BINARY_TOKENS,
        fields,
        wrap: &identity,
        read: &read,
        divisor: 1,
    }));
    // Phi-3's own (32,000 pieces, 563 kB).
    let seed = std::fs::read(repo_dir().join("assets/phi3-tokenizer/tokenizer.model")).unwrap();
    let read = || qlora::export::vocab::phi3_vocab(tmp.path(), 32064).map(drop);
    tallies.push(fuzz(&Target {
        name: "tokenizer.model, Phi-3's (export::vocab::phi3_vocab)",
        file,
        seed,
        kind: Kind::Bytes,
        dict: BINARY_TOKENS,
        fields: vec![1],
        wrap: &identity,
        read: &read,
        divisor: 20,
    }));
    report("tokenizer.model", &tallies);
}

#[test]
fn adapter_config_never_crashes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tallies = Vec::new();
    for fixture in ["adapter", "adapter-rslora"] {
        let dir = tmp.path().join(fixture);
        copy_dir(&fixtures().join("phi3/peft").join(fixture), &dir);
        let file = dir.join("adapter_config.json");
        let read = || qlora::lora::peft::load(&dir, &Device::Cpu).map(drop);
        tallies.push(fuzz(&Target {
            name: if fixture == "adapter" {
                "adapter_config.json, PEFT's (peft::load)"
            } else {
                "adapter_config.json, PEFT's rsLoRA (peft::load)"
            },
            file: file.clone(),
            seed: std::fs::read(&file).unwrap(),
            kind: Kind::Json,
            dict: JSON_TOKENS,
            fields: vec![],
            wrap: &identity,
            read: &read,
            divisor: 1,
        }));
    }
    report("adapter_config.json", &tallies);
}

#[test]
fn config_json_never_crashes() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tallies = Vec::new();
    for (fixture, name) in [
        ("bnb/tiny-phi3", "config.json, transformers' (model::load)"),
        (
            "bnb/tiny-phi3-bnb",
            "config.json with quantization_config (model::load)",
        ),
        ("phi3/longrope", "config.json, longrope (model::load)"),
        ("phi3/partial", "config.json, partial rotary (model::load)"),
    ] {
        let dir = tmp.path().join(fixture);
        copy_dir(&fixtures().join(fixture), &dir);
        let file = dir.join("config.json");
        let read = || load_dense(&dir);
        tallies.push(fuzz(&Target {
            name,
            file: file.clone(),
            seed: std::fs::read(&file).unwrap(),
            kind: Kind::Json,
            dict: JSON_TOKENS,
            fields: vec![],
            wrap: &identity,
            read: &read,
            divisor: 2,
        }));
    }
    report("config.json", &tallies);
}

#[test]
fn bnb_quant_state_never_crashes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bnb");
    copy_dir(&fixtures().join("bnb/tiny-phi3-bnb"), &dir);
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, Raw)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let raw = Raw {
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                data: v.data().to_vec(),
            };
            (n, raw)
        })
        .collect();
    let mut tallies = Vec::new();
    for (weight, quant_type) in [
        ("model.layers.0.self_attn.qkv_proj.weight", "nf4"),
        ("model.layers.1.mlp.down_proj.weight", "nf4"),
    ] {
        let state = format!("{weight}.quant_state.bitsandbytes__{quant_type}");
        let seed = st.tensor(&state).unwrap().data().to_vec();
        // The checkpoint with `state` holding `json`.
        let wrap = |json: &[u8]| {
            let replaced = Raw {
                dtype: Dtype::U8,
                shape: vec![json.len()],
                data: json.to_vec(),
            };
            let all = tensors
                .iter()
                .map(|(n, r)| (n.clone(), if *n == state { &replaced } else { r }));
            safetensors::serialize(all, None).unwrap()
        };
        let read = || {
            load_dense(&dir)?;
            load_nf4(&dir)
        };
        tallies.push(fuzz(&Target {
            name: if weight.contains("qkv") {
                "quant_state JSON, qkv_proj (model::load, dense and nf4)"
            } else {
                "quant_state JSON, down_proj (model::load, dense and nf4)"
            },
            file: file.clone(),
            seed,
            kind: Kind::Json,
            dict: JSON_TOKENS,
            fields: vec![],
            wrap: &wrap,
            read: &read,
            divisor: 2,
        }));
    }
    report("bitsandbytes quant-state JSON", &tallies);
}
