//! k-quant GGUF exports (`q4_k_m`, `q5_k_m`, `q6_k`) against llama.cpp's own quantizer
//! (tests/fixtures/gen_kquant_goldens.py: convert_hf_to_gguf.py to f32, then
//! `llama_model_quantize`): every key, every tensor's type (llama.cpp's per-tensor mix, including
//! the `use_more_bits` layers and the fallbacks for rows that are not a multiple of 256) and every
//! tensor's bytes must match. The decoded values are also checked with a second implementation
//! (candle's GGUF reader and ggml dequantizers) against the model's weights.

use crate::gguf::compare;
use half::bf16;
use qlora::export::MergeBase;
use qlora::export::ftype::FileType;
use std::path::Path;

// The pattern model of gen_kquant_goldens.py.
const HIDDEN: usize = 256;
const INTERMEDIATE: usize = 512;
const LAYERS: usize = 8;
const HEADS: usize = 4;
const VOCAB: usize = 32064;

/// gen_kquant_goldens.py's `pattern_value`: a counter hash mapped to [-1, 1) in steps of 2⁻²³,
/// scaled by `std · (1 + row mod 4)`, shifted by `mean`, all in f32.
fn pattern_value(t: usize, i: usize, ncols: usize, std: f32, mean: f32) -> f32 {
    let mut h = (i as u64)
        .wrapping_mul(0x9E37_79B1)
        .wrapping_add((t as u64 + 1) * 0x85EB_CA77) as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7FEB_352D);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846C_A68B);
    h ^= h >> 16;
    let u = (h >> 8) as f32 * 2f32.powi(-24);
    let row = ((i / ncols) % 4) as f32;
    (2.0 * u - 1.0) * std * (1.0 + row) + mean
}

fn pattern_tensors() -> Vec<(String, Vec<usize>, f32, f32)> {
    let mut out = vec![
        (
            "model.embed_tokens.weight".into(),
            vec![VOCAB, HIDDEN],
            1.0,
            0.0,
        ),
        ("lm_head.weight".into(), vec![VOCAB, HIDDEN], 0.1, 0.0),
        ("model.norm.weight".into(), vec![HIDDEN], 0.1, 1.0),
    ];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        out.extend([
            (
                format!("{p}.input_layernorm.weight"),
                vec![HIDDEN],
                0.1,
                1.0,
            ),
            (
                format!("{p}.post_attention_layernorm.weight"),
                vec![HIDDEN],
                0.1,
                1.0,
            ),
            (
                format!("{p}.self_attn.qkv_proj.weight"),
                vec![3 * HIDDEN, HIDDEN],
                0.02,
                0.0,
            ),
            (
                format!("{p}.self_attn.o_proj.weight"),
                vec![HIDDEN, HIDDEN],
                0.02,
                0.0,
            ),
            (
                format!("{p}.mlp.gate_up_proj.weight"),
                vec![2 * INTERMEDIATE, HIDDEN],
                0.02,
                0.0,
            ),
            (
                format!("{p}.mlp.down_proj.weight"),
                vec![HIDDEN, INTERMEDIATE],
                0.02,
                0.0,
            ),
        ]);
    }
    out
}

/// The pattern model as a checkpoint dir (bf16 weights, the Phi-3 tokenizer); returns each
/// tensor's values as stored (bf16 widened to f32), by HF name.
fn write_pattern_model(dir: &Path) -> Vec<(String, Vec<f32>)> {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": null,
        "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
        "sliding_window": 2047, "tie_word_embeddings": false, "bos_token_id": 1,
        "eos_token_id": 32000, "pad_token_id": 32000, "torch_dtype": "bfloat16"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let assets = crate::common::repo_dir().join("assets/phi3-tokenizer");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
    ] {
        std::fs::copy(assets.join(f), dir.join(f)).unwrap();
    }
    let specs = pattern_tensors();
    /// Name, shape, bf16 bytes, values.
    type Stored = (String, Vec<usize>, Vec<u8>, Vec<f32>);
    let data: Vec<Stored> = specs
        .into_iter()
        .enumerate()
        .map(|(t, (name, shape, std, mean))| {
            let n: usize = shape.iter().product();
            let ncols = *shape.last().unwrap();
            let values: Vec<bf16> = (0..n)
                .map(|i| bf16::from_f32(pattern_value(t, i, ncols, std, mean)))
                .collect();
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (
                name,
                shape,
                bytes,
                values.iter().map(|v| v.to_f32()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, shape, bytes, _)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::BF16,
                shape.clone(),
                bytes,
            )
            .unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    data.into_iter().map(|(n, _, _, v)| (n, v)).collect()
}

fn export(model: &Path, mix: &str, out: &Path) {
    // The Phi-4-mini-like fixture's vocabulary is synthetic (its check hash is in no table): named
    // gpt-4o, as its golden's converter run was told.
    let pre = model.ends_with("phi4-mini-tiny").then_some("gpt-4o");
    qlora::export::gguf_model::export(
        model,
        None,
        out,
        FileType::parse(mix).unwrap(),
        MergeBase::Original,
        false,
        pre,
    )
    .unwrap();
}

/// A uniform quantizer with `2^b - 1` steps over a block of uniformly distributed values (range
/// `2√3σ`) has RMS error `step/√12 = σ/(2^b - 1)`; the k-quants' fitted scales do better, so that is
/// the bound. (Relative to the RMS of the weights.)
fn uniform_bound(bits: i32) -> f64 {
    1.0 / (2f64.powi(bits) - 1.0)
}

/// Relative RMS error of candle's decoding of our k-quant tensors against the weights.
fn decoded_error(gguf: &Path, values: &[(String, Vec<f32>)], name: &str, hf: &str) -> f64 {
    let mut f = std::fs::File::open(gguf).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let q = content
        .tensor(&mut f, name, &candle_core::Device::Cpu)
        .unwrap();
    let got: Vec<f32> = q
        .dequantize(&candle_core::Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want = &values.iter().find(|(n, _)| n == hf).unwrap().1;
    assert_eq!(got.len(), want.len());
    let (mut err, mut norm) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        err += (*g as f64 - *w as f64).powi(2);
        norm += (*w as f64).powi(2);
    }
    (err / norm).sqrt()
}

fn check_pattern(mix: &str) -> (tempfile::TempDir, Vec<(String, Vec<f32>)>) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("pattern-phi3");
    let values = write_pattern_model(&model);
    let out = tmp.path().join("m.gguf");
    export(&model, mix, &out);
    compare(&out, &format!("pattern-phi3-{mix}.json"));
    (tmp, values)
}

#[test]
fn q4_k_m_equals_llama_quantize() {
    let (tmp, values) = check_pattern("q4_k_m");
    let out = tmp.path().join("m.gguf");
    // A q4_K tensor and a q6_K one (layer 0 is a use_more_bits layer), decoded by candle.
    let q4 = decoded_error(
        &out,
        &values,
        "blk.1.attn_output.weight",
        "model.layers.1.self_attn.o_proj.weight",
    );
    let q6 = decoded_error(
        &out,
        &values,
        "blk.0.attn_qkv.weight",
        "model.layers.0.self_attn.qkv_proj.weight",
    );
    eprintln!("decoded relative RMS error: q4_K {q4:.4}, q6_K {q6:.4}");
    assert!(q4 < uniform_bound(4), "q4_K relative RMS error {q4}");
    assert!(q6 < uniform_bound(6), "q6_K relative RMS error {q6}");
    assert!(q6 < q4 / 3.0, "6 bits beat 4: {q6} vs {q4}");
}

#[test]
fn q5_k_m_equals_llama_quantize() {
    let (tmp, values) = check_pattern("q5_k_m");
    let out = tmp.path().join("m.gguf");
    let q5 = decoded_error(
        &out,
        &values,
        "blk.1.ffn_up.weight",
        "model.layers.1.mlp.gate_up_proj.weight",
    );
    eprintln!("decoded relative RMS error: q5_K {q5:.4}");
    assert!(q5 < uniform_bound(5), "q5_K relative RMS error {q5}");
}

#[test]
fn q6_k_equals_llama_quantize() {
    check_pattern("q6_k");
}

#[test]
fn k_quant_mixes_fall_back_like_llama_quantize_when_rows_are_not_256_multiples() {
    // The built-in model's rows of 128: q4_K → q5_0, q5_K → q5_1, q6_K (and the head) → q8_0.
    let model = qlora::hub::resolve(qlora::builtin::TINY_PHI3).unwrap();
    for mix in ["q4_k_m", "q5_k_m"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m.gguf");
        export(&model, mix, &out);
        compare(&out, &format!("tiny-phi3-{mix}.json"));
    }
}

#[test]
fn a_tied_head_is_quantized_as_the_output_tensor() {
    // No output.weight: llama-quantize treats token_embd as the head (q6_K, here q8_0 for rows of 64).
    let model = crate::common::fixtures().join("phi4-mini-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.gguf");
    export(&model, "q4_k_m", &out);
    compare(&out, "phi4-mini-tiny-q4_k_m.json");
}

#[test]
fn unknown_mixes_and_k_quant_lora_types_are_refused() {
    let e = FileType::parse("q3_k_m").unwrap_err().to_string();
    assert!(e.contains("not supported") && e.contains("q4_k_m"), "{e}");
    let e = qlora::export::ftype::parse_lora_type("q4_k")
        .unwrap_err()
        .to_string();
    assert!(e.contains("LoRA") && e.contains("q8_0"), "{e}");
}
