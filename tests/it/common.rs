//! Test helpers: tiny Phi-3 checkpoints built on the spot, and paths to committed fixtures.

use half::bf16;
use safetensors::Dtype;
use std::path::{Path, PathBuf};

/// The repository: `QLORA_REPO_DIR` when set (a test binary carried to another machine, as
/// scripts/gpu_check.sh does), else where it was built.
pub fn repo_dir() -> PathBuf {
    std::env::var_os("QLORA_REPO_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// `t` in f32 on the CPU.
pub fn host(t: &candle_core::Tensor) -> candle_core::Tensor {
    t.to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_device(&candle_core::Device::Cpu)
        .unwrap()
}

/// max |t| (f32).
pub fn max_abs(t: &candle_core::Tensor) -> f32 {
    host(t)
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts that LoRA gradients `(dA, dB)` (any device) match `want` within `rel` of each
/// gradient's largest entry, and that the summed losses agree within `loss_rel`.
pub fn assert_grads_close(
    got: &qlora::train::LossAndGrads,
    want: &qlora::train::LossAndGrads,
    loss_rel: f64,
    rel: f32,
    what: &str,
) {
    assert_eq!(got.n_tokens, want.n_tokens, "{what}: tokens");
    let d = (got.loss_sum - want.loss_sum).abs();
    assert!(
        d <= loss_rel * want.loss_sum.abs(),
        "{what}: loss {} vs {}",
        got.loss_sum,
        want.loss_sum
    );
    assert_eq!(got.grads.len(), want.grads.len(), "{what}: gradient count");
    for (i, (g, w)) in got.grads.iter().zip(&want.grads).enumerate() {
        let scale = max_abs(w).max(1e-12);
        let d = max_abs(&(host(g) - host(w)).unwrap());
        assert!(
            d <= rel * scale,
            "{what}, variable {i}: max |Δgrad| {d:e} (scale {scale:e})"
        );
    }
}

/// tests/fixtures.
pub fn fixtures() -> PathBuf {
    repo_dir().join("tests/fixtures")
}

/// A tiny Phi-3 config.json (hidden 64, 2 layers, 4 heads, GQA 2 kv heads, vocab 96).
pub fn tiny_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 96,
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "rope_scaling": null, "max_position_embeddings": 128,
        "original_max_position_embeddings": 128, "sliding_window": null,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "torch_dtype": "bfloat16"
    })
}

/// Deterministic pseudo-random values in [-scale, scale).
pub fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
            (((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
        })
        .collect()
}

/// A raw tensor for safetensors.
#[derive(Debug)]
pub struct Raw {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Raw {
    pub fn bf16(shape: &[usize], seed: u64) -> Self {
        let n = shape.iter().product();
        let data = values(n, seed, 0.05)
            .into_iter()
            .flat_map(|v| bf16::from_f32(v).to_le_bytes())
            .collect();
        Self {
            dtype: Dtype::BF16,
            shape: shape.to_vec(),
            data,
        }
    }
}

impl safetensors::View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The tensors of a checkpoint for `config` (bf16, fused Phi-3 names).
pub fn tiny_tensors(config: &serde_json::Value) -> Vec<(String, Raw)> {
    let g = |k: &str| config[k].as_u64().unwrap() as usize;
    let (h, i, v, l) = (
        g("hidden_size"),
        g("intermediate_size"),
        g("vocab_size"),
        g("num_hidden_layers"),
    );
    let (heads, kv) = (g("num_attention_heads"), g("num_key_value_heads"));
    let hd = h / heads;
    let mut t = vec![
        (
            "model.embed_tokens.weight".to_string(),
            Raw::bf16(&[v, h], 1),
        ),
        ("model.norm.weight".to_string(), Raw::bf16(&[h], 2)),
        ("lm_head.weight".to_string(), Raw::bf16(&[v, h], 3)),
    ];
    for layer in 0..l {
        let p = format!("model.layers.{layer}");
        let s = 100 * (layer as u64 + 1);
        t.push((format!("{p}.input_layernorm.weight"), Raw::bf16(&[h], s)));
        t.push((
            format!("{p}.post_attention_layernorm.weight"),
            Raw::bf16(&[h], s + 1),
        ));
        t.push((
            format!("{p}.self_attn.qkv_proj.weight"),
            Raw::bf16(&[(heads + 2 * kv) * hd, h], s + 2),
        ));
        t.push((
            format!("{p}.self_attn.o_proj.weight"),
            Raw::bf16(&[h, h], s + 3),
        ));
        t.push((
            format!("{p}.mlp.gate_up_proj.weight"),
            Raw::bf16(&[2 * i, h], s + 4),
        ));
        t.push((
            format!("{p}.mlp.down_proj.weight"),
            Raw::bf16(&[h, i], s + 5),
        ));
    }
    t
}

/// Writes a checkpoint dir: config.json, tensors split into `n_shards` files (with an index when
/// more than one), and a tokenizer.json placeholder to see that extra files are carried over.
pub fn write_checkpoint(
    dir: &Path,
    config: &serde_json::Value,
    tensors: &[(String, Raw)],
    n_shards: usize,
) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(config).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), b"{\"placeholder\": true}").unwrap();
    let mut weight_map = serde_json::Map::new();
    let per = tensors.len().div_ceil(n_shards);
    for (s, chunk) in tensors.chunks(per).enumerate() {
        let file = if n_shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n_shards:05}.safetensors", s + 1)
        };
        for (n, _) in chunk {
            weight_map.insert(n.clone(), file.clone().into());
        }
        safetensors::serialize_to_file(
            chunk.iter().map(|(n, r)| (n.clone(), r)),
            None,
            &dir.join(&file),
        )
        .unwrap();
    }
    if n_shards > 1 {
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }
}

/// Runs the `qlora` binary in the repository: `(exit code, stdout, stderr)`.
pub fn qlora(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qlora"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}
