//! Training throughput and peak memory of QLoRA steps on a randomly initialised Phi-3, on the CPU
//! or a CUDA GPU: NF4 frozen base (double-quantized, blocksize 64), LoRA r = 16 on qkv_proj,
//! o_proj, gate_up_proj and down_proj, per-block gradient checkpointing, one sequence per step.
//! The defaults are Phi-3-mini's shape (hidden 3072, 32 layers, 32 heads, intermediate 8192,
//! vocab 32064) at 2048 tokens; `scripts/gpu_check.sh` runs it next to the same workload in
//! PyTorch + PEFT.
//!
//! ```sh
//! cargo run --release --features cuda --example train_bench -- --device cuda --dtype bf16
//! cargo run --release --example train_bench -- --hidden 256 --layers 2 --heads 4 \
//!     --intermediate 512 --seq 128      # the CPU (f32)
//! ```
//!
//! A step is `loss_and_grads` (forward, head, backward with recomputation) plus an AdamW update of
//! the adapters; tokens/s is the median over the timed steps after `--warmup` untimed ones. On
//! CUDA, peak memory is the device's used memory (cuMemGetInfo: total − free, which includes the
//! CUDA context and the allocator's pool) sampled every 2 ms on a separate thread, also reported
//! net of what was used right after the context was created.
//!
//! The four weight matrices are quantized once on the host and uploaded separately for every layer
//! (so device memory is that of 32 distinct layers; the values repeat, which changes no timing).
//! Output: one JSON line.

use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use qlora::device::{DeviceSpec, MemorySampler};
use qlora::lora::{ForwardCtx, LoraConfig, LoraLinear, attach};
use qlora::model::Phi3Config;
use qlora::model::linear::BaseWeight;
use qlora::model::phi3::{Block, FusedAttention, OpPath, Phi3};
use qlora::train::optim::{AdamW, AdamWConfig};
use qlora::train::{Batch, loss_and_grads};
use qlora_quant::{Blocksize, Nf4Tensor, QuantType, Quantized};
use std::time::Instant;

/// QLoRA training-step benchmark on a random Phi-3.
#[derive(Debug, Parser)]
struct Args {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: f32, bf16 (GPU) or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value_t = 3072)]
    hidden: usize,
    #[arg(long, default_value_t = 32)]
    layers: usize,
    #[arg(long, default_value_t = 32)]
    heads: usize,
    #[arg(long, default_value_t = 8192)]
    intermediate: usize,
    #[arg(long, default_value_t = 32064)]
    vocab: usize,
    /// Tokens per sequence (one sequence per step).
    #[arg(long, default_value_t = 2048)]
    seq: usize,
    /// LoRA rank (α = 2r).
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Untimed steps first (kernel loading, JIT, allocator warm-up).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Ops between the linears: auto (fused with blocked attention on CUDA, composed on the
    /// CPU), composed, blocked (fused ops, attention through matmul chunks) or streaming (fused
    /// ops, attention in the online-softmax kernel).
    #[arg(long, default_value = "auto")]
    ops: String,
    /// Keep every block's activations instead of recomputing them in the backward.
    #[arg(long)]
    no_checkpointing: bool,
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

fn quantize(out: usize, inp: usize, seed: u64) -> Result<Quantized> {
    Ok(Quantized::quantize(
        &uniform(out * inp, 0.02, seed),
        &[out, inp],
        DType::F32,
        QuantType::Nf4,
        Blocksize::DEFAULT,
        true,
    )?)
}

fn dense(shape: (usize, usize), seed: u64, dtype: DType, dev: &Device) -> Result<Tensor> {
    let v = uniform(shape.0 * shape.1, 0.02, seed);
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(dev)?)
}

fn build_model(a: &Args, dtype: DType, dev: &Device) -> Result<Phi3> {
    let (h, i) = (a.hidden, a.intermediate);
    let cfg = Phi3Config::from_value(
        &serde_json::json!({
            "model_type": "phi3", "vocab_size": a.vocab, "hidden_size": h, "intermediate_size": i,
            "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
            "num_key_value_heads": a.heads, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": a.seq.max(4096)
        }),
        "train_bench",
    )?;
    let shapes = [(3 * h, h), (h, h), (2 * i, h), (h, i)];
    let host: Vec<Quantized> = shapes
        .iter()
        .enumerate()
        .map(|(k, &(o, n))| quantize(o, n, k as u64 + 1))
        .collect::<Result<_>>()?;
    let lin = |k: usize| -> Result<LoraLinear> {
        Ok(LoraLinear {
            base: BaseWeight::Nf4(Nf4Tensor::new(&host[k], dev)?),
            adapter: None,
        })
    };
    let ones = Tensor::ones(h, dtype, dev)?;
    let layers = (0..a.layers)
        .map(|_| {
            Ok(Block {
                input_layernorm: ones.clone(),
                qkv_proj: lin(0)?,
                o_proj: lin(1)?,
                post_attention_layernorm: ones.clone(),
                gate_up_proj: lin(2)?,
                down_proj: lin(3)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let rope = cfg.rope()?;
    let mut model = Phi3 {
        embed_tokens: dense((a.vocab, h), 11, dtype, dev)?,
        lm_head: dense((a.vocab, h), 12, dtype, dev)?,
        norm: ones,
        layers,
        rope,
        cfg,
        dtype,
        device: dev.clone(),
        ops: match a.ops.as_str() {
            "auto" => OpPath::for_device(dev),
            "composed" => OpPath::Composed,
            "blocked" => OpPath::Fused(FusedAttention::Blocked),
            "streaming" => OpPath::Fused(FusedAttention::Streaming),
            other => bail!("--ops {other}: use auto, composed, blocked or streaming"),
        },
    };
    attach::init_adapters(
        &mut model,
        &LoraConfig {
            r: a.rank,
            alpha: 2.0 * a.rank as f64,
            dropout: 0.0,
            targets: vec!["all-linear".into()],
            rslora: false,
        },
        0,
    )?;
    Ok(model)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let dtype = match a.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => bail!("--dtype {other}: use f32, bf16 or f16"),
    };
    let dev = a.device.parse::<DeviceSpec>()?.open()?;
    let mem = MemorySampler::start(&dev)?;
    let t_build = Instant::now();
    let model = build_model(&a, dtype, &dev)?;
    dev.synchronize()?;
    let build_s = t_build.elapsed().as_secs_f64();
    let nf4_bytes: usize = model
        .layers
        .iter()
        .flat_map(|l| l.linears())
        .map(|(_, lin)| match &lin.base {
            BaseWeight::Nf4(w) => w.storage_bytes(),
            BaseWeight::Dense(_) => 0,
        })
        .sum();

    let ids: Vec<u32> = (0..a.seq as u32)
        .map(|t| (t * 7919 + 13) % a.vocab as u32)
        .collect();
    let labels: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    let batch = Batch::causal(&[ids], &[labels], &dev)?;
    let params = model
        .adapters()
        .iter()
        .flat_map(|ad| [ad.a.clone(), ad.b.clone()])
        .collect();
    let mut opt = AdamW::new(params, AdamWConfig::default())?;
    let ctx = ForwardCtx::default();
    let mut step_s = Vec::new();
    let mut loss = f64::NAN;
    for step in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        let lg = loss_and_grads(&model, &batch, &ctx, !a.no_checkpointing)?;
        let grads: Vec<Tensor> = lg.grads.into_iter().flat_map(|(ga, gb)| [ga, gb]).collect();
        opt.step(&grads, 1e-4)?;
        dev.synchronize()?;
        let secs = t0.elapsed().as_secs_f64();
        loss = lg.loss_sum / lg.n_tokens.max(1) as f64;
        eprintln!("step {step}: {secs:.3} s, loss {loss:.4}");
        if step >= a.warmup {
            step_s.push(secs);
        }
    }
    step_s.sort_by(f64::total_cmp);
    let median = step_s.get(step_s.len() / 2).copied().unwrap_or(f64::NAN);
    let (peak_used_mib, context_used_mib) = mem.peak_mib().unwrap_or((f64::NAN, f64::NAN));
    println!(
        "{}",
        serde_json::json!({
            "impl": "qlora (candle + qlora-quant kernels)",
            "device": a.device, "dtype": a.dtype, "ops": format!("{:?}", model.ops), "hidden": a.hidden, "layers": a.layers,
            "heads": a.heads, "intermediate": a.intermediate, "vocab": a.vocab, "seq": a.seq,
            "rank": a.rank, "checkpointing": !a.no_checkpointing,
            "nf4_weight_mib": nf4_bytes as f64 / (1 << 20) as f64,
            "build_s": build_s, "step_s": step_s, "median_step_s": median,
            "tokens_per_s": a.seq as f64 / median, "loss": loss,
            "peak_used_mib": peak_used_mib, "context_used_mib": context_used_mib,
            "peak_net_mib": peak_used_mib - context_used_mib,
        })
    );
    Ok(())
}
