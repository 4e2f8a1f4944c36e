//! Random QLoRA models of any Phi-3 shape, built in memory (no checkpoint on disk), for the
//! benchmarks (`benches/train_step.rs`, `examples/train_bench.rs`): every block linear NF4
//! (double-quantized, blocksize 64) from seeded uniform weights of standard deviation 0.02, norms
//! of ones, LoRA adapters on all four linears. The four weight matrices are quantized once and
//! uploaded for every layer (each layer holds its own copy; the values repeat across layers, which
//! changes no timing).

use super::config::Phi3Config;
use super::linear::BaseWeight;
use super::phi3::{Block, OpPath, Phi3};
use crate::lora::{LoraConfig, LoraLinear, attach};
use crate::train::Batch;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use qlora_quant::{Blocksize, Nf4Tensor, QuantType, Quantized};

/// A Phi-3 shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    /// The head shares the embedding matrix.
    pub tied: bool,
}

impl Shape {
    /// The 135M checkpoint of the CPU comparison (SmolLM-135M in Phi-3 layout): hidden 576,
    /// 30 layers, 9 heads / 3 kv heads, intermediate 1536, vocab 49152, tied head.
    pub const SMALL_135M: Self = Self {
        hidden: 576,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        intermediate: 1536,
        vocab: 49152,
        tied: true,
    };
    /// Phi-3-mini: hidden 3072, 32 layers, 32 heads, intermediate 8192, vocab 32064.
    pub const PHI3_MINI: Self = Self {
        hidden: 3072,
        layers: 32,
        heads: 32,
        kv_heads: 32,
        intermediate: 8192,
        vocab: 32064,
        tied: false,
    };
}

/// Seeded uniform values with standard deviation `std`.
fn uniform(n: usize, std: f64, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let half_width = (std * 3f64.sqrt()) as f32;
    (0..n)
        .map(|_| rng.random_range(-half_width..half_width))
        .collect()
}

/// A random NF4 Phi-3 of `shape` with rank-`rank` adapters (α = 2r, no dropout) on all four
/// linears, compute dtype `dtype` on `dev`, ops `ops`, positions up to `max_seq`.
pub fn qlora_model(
    shape: &Shape,
    rank: usize,
    max_seq: usize,
    dtype: DType,
    dev: &Device,
    ops: OpPath,
) -> Result<Phi3> {
    let (h, i) = (shape.hidden, shape.intermediate);
    let cfg = Phi3Config::from_value(
        &serde_json::json!({
            "model_type": "phi3", "vocab_size": shape.vocab, "hidden_size": h,
            "intermediate_size": i, "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": max_seq.max(4096),
            "tie_word_embeddings": shape.tied
        }),
        "random model",
    )?;
    let kv = shape.kv_heads * cfg.head_dim();
    let shapes = [(h + 2 * kv, h), (h, h), (2 * i, h), (h, i)];
    let host: Vec<Quantized> = shapes
        .iter()
        .enumerate()
        .map(|(k, &(o, n))| {
            Ok(Quantized::quantize(
                &uniform(o * n, 0.02, k as u64 + 1),
                &[o, n],
                DType::F32,
                QuantType::Nf4,
                Blocksize::DEFAULT,
                true,
            )?)
        })
        .collect::<Result<_>>()?;
    let lin = |k: usize| -> Result<LoraLinear> {
        Ok(LoraLinear {
            base: BaseWeight::Nf4(Nf4Tensor::new(&host[k], dev)?),
            adapter: None,
        })
    };
    let ones = Tensor::ones(h, dtype, dev)?;
    let layers = (0..shape.layers)
        .map(|_| {
            Ok(Block {
                input_layernorm: ones.clone(),
                qkv: vec![("qkv_proj", lin(0)?)],
                o_proj: lin(1)?,
                post_attention_layernorm: ones.clone(),
                gate_up: vec![("gate_up_proj", lin(2)?)],
                down_proj: lin(3)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let dense = |seed: u64| -> Result<Tensor> {
        Ok(Tensor::from_vec(
            uniform(shape.vocab * h, 0.02, seed),
            (shape.vocab, h),
            &Device::Cpu,
        )?
        .to_dtype(dtype)?
        .to_device(dev)?)
    };
    let embed_tokens = dense(11)?;
    let lm_head = if shape.tied {
        embed_tokens.clone()
    } else {
        dense(12)?
    };
    let rope = cfg.rope()?;
    let mut model = Phi3 {
        embed_tokens,
        lm_head,
        norm: ones,
        layers,
        rope,
        cfg,
        dtype,
        device: dev.clone(),
        ops,
        saved: Default::default(),
    };
    attach::init_adapters(
        &mut model,
        &LoraConfig {
            r: rank,
            alpha: 2.0 * rank as f64,
            dropout: 0.0,
            targets: vec!["all-linear".into()],
            rslora: false,
            use_dora: false,
            modules_to_save: Vec::new(),
            trainable_token_indices: Default::default(),
        },
        0,
    )?;
    Ok(model)
}

/// One row of `seq` tokens (a fixed pattern over the vocabulary) whose every next token is trained.
pub fn batch(seq: usize, vocab: usize, dev: &Device) -> Result<Batch> {
    let ids: Vec<u32> = (0..seq as u32)
        .map(|t| (t * 7919 + 13) % vocab as u32)
        .collect();
    let labels: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    Ok(Batch::causal(&[ids], &[labels], dev)?)
}
