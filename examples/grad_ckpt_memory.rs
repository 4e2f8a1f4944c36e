//! Peak memory of one training step (loss + LoRA gradients) with and without per-block gradient
//! checkpointing, on a random NF4 Phi-3 of hidden 1024, 8 layers, 16 heads, intermediate 2816,
//! vocab 32064, one sequence of 1024 tokens, r = 16 on all four targets.
//!
//! Run one mode per process (peak RSS is per process): `scripts/grad_ckpt_memory.sh` runs both and
//! prints the ratio. Usage: `cargo run --release --example grad_ckpt_memory -- plain|checkpointing`.

use candle_core::{DType, Device, Tensor};
use qlora::lora::{ForwardCtx, LoraConfig, LoraLinear, attach};
use qlora::model::Phi3Config;
use qlora::model::linear::BaseWeight;
use qlora::model::phi3::{Block, OpPath, Phi3};
use qlora::train::{Batch, loss_and_grads};
use qlora_quant::{Blocksize, Nf4Tensor, QuantType};

const HIDDEN: usize = 1024;
const LAYERS: usize = 8;
const HEADS: usize = 16;
const INTERMEDIATE: usize = 2816;
const VOCAB: usize = 32064;
const SEQ: usize = 1024;

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(f64::NAN)
        / 1024.0
}

/// Seeded uniform weights with standard deviation `std` (the same model in both processes).
fn randn(shape: (usize, usize), std: f64) -> candle_core::Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64((shape.0 * 31 + shape.1) as u64);
    let half_width = (std * 3f64.sqrt()) as f32;
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rng.random_range(-half_width..half_width))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn nf4(shape: (usize, usize)) -> anyhow::Result<LoraLinear> {
    let w = randn(shape, 0.02)?;
    Ok(LoraLinear {
        base: BaseWeight::Nf4(Nf4Tensor::quantize(
            &w,
            QuantType::Nf4,
            Blocksize::DEFAULT,
            true,
        )?),
        adapter: None,
    })
}

fn main() -> anyhow::Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let checkpointing = match mode.as_str() {
        "plain" => false,
        "checkpointing" => true,
        _ => anyhow::bail!("usage: grad_ckpt_memory plain|checkpointing"),
    };
    let cfg = Phi3Config::from_value(
        &serde_json::json!({
            "model_type": "phi3", "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096
        }),
        "grad_ckpt_memory",
    )?;
    let ones = Tensor::ones(HIDDEN, DType::F32, &Device::Cpu)?;
    let layers = (0..LAYERS)
        .map(|_| {
            Ok(Block {
                input_layernorm: ones.clone(),
                qkv: vec![("qkv_proj", nf4((3 * HIDDEN, HIDDEN))?)],
                o_proj: nf4((HIDDEN, HIDDEN))?,
                post_attention_layernorm: ones.clone(),
                gate_up: vec![("gate_up_proj", nf4((2 * INTERMEDIATE, HIDDEN))?)],
                down_proj: nf4((HIDDEN, INTERMEDIATE))?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rope = cfg.rope()?;
    let mut model = Phi3 {
        embed_tokens: randn((VOCAB, HIDDEN), 0.02)?,
        lm_head: randn((VOCAB, HIDDEN), 0.02)?,
        norm: ones,
        layers,
        rope,
        cfg,
        dtype: DType::F32,
        device: Device::Cpu,
        ops: OpPath::Composed,
        saved: Default::default(),
    };
    attach::init_adapters(
        &mut model,
        &LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: vec!["all-linear".into()],
            rslora: false,
            use_dora: false,
            modules_to_save: Vec::new(),
            trainable_token_indices: Default::default(),
        },
        0,
    )?;
    let ids: Vec<u32> = (0..SEQ as u32).map(|i| (i * 7919) % VOCAB as u32).collect();
    let labels: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    let batch = Batch::causal(&[ids], &[labels], &Device::Cpu)?;
    let before = peak_rss_mib();
    let t0 = std::time::Instant::now();
    let lg = loss_and_grads(&model, &batch, &ForwardCtx::default(), checkpointing)?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "mode={mode} peak_rss_mib={:.0} model_rss_mib={before:.0} step_s={secs:.2} loss={:.4}",
        peak_rss_mib(),
        lg.loss_sum / lg.n_tokens as f64
    );
    Ok(())
}
