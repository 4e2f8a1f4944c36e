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
use qlora::lora::ForwardCtx;
use qlora::model::linear::BaseWeight;
use qlora::model::phi3::{FusedAttention, OpPath, Phi3};
use qlora::model::random::{self, Shape};
use qlora::train::loss_and_grads;
use qlora::train::optim::{AdamW, AdamWConfig};
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
    /// Key/value heads (default: as many as heads).
    #[arg(long)]
    kv_heads: Option<usize>,
    /// The head shares the embedding matrix.
    #[arg(long)]
    tied: bool,
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

fn build_model(a: &Args, dtype: DType, dev: &Device) -> Result<Phi3> {
    let shape = Shape {
        hidden: a.hidden,
        layers: a.layers,
        heads: a.heads,
        kv_heads: a.kv_heads.unwrap_or(a.heads),
        intermediate: a.intermediate,
        vocab: a.vocab,
        tied: a.tied,
    };
    let ops = match a.ops.as_str() {
        "auto" => OpPath::for_device(dev, dtype),
        "composed" => OpPath::Composed,
        "blocked" => OpPath::Fused(FusedAttention::Blocked),
        "streaming" => OpPath::Fused(FusedAttention::Streaming),
        other => bail!("--ops {other}: use auto, composed, blocked or streaming"),
    };
    random::qlora_model(&shape, a.rank, a.seq, dtype, dev, ops)
}

fn main() -> Result<()> {
    // SAFETY: no other thread has started yet.
    unsafe { qlora_quant::runtime::init() };
    qlora_quant::runtime::run(bench)
}

fn bench() -> Result<()> {
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

    let batch = random::batch(a.seq, a.vocab, &dev)?;
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
        let grads: Vec<Tensor> = lg.grads;
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
    // `qlora plan`'s prediction for this step (the phases after loading: the model here is built
    // in memory, not read from a checkpoint).
    let plan = qlora::plan::Inputs {
        step: qlora::model::phi3::memory::Step {
            batch: 1,
            seq: a.seq,
            elem: dtype.size_in_bytes(),
            cpu_threads: dev.is_cpu().then(rayon::current_num_threads),
            nf4: true,
            adapted: model
                .cfg
                .layout()
                .targets()
                .into_iter()
                .map(|t| (t, a.rank))
                .collect(),
            dropout: false,
            dora: false,
        },
        target: qlora::plan::Target::of(&dev),
        checkpointing: (!a.no_checkpointing).into(),
        auto_checkpointing: false,
        grad_accum: 1,
        optimizer: qlora::train::optim::OptimizerKind::AdamW,
        tensors: qlora::plan::inputs::synthetic_load_order(&model.cfg, true),
        double_quant: true,
        blocksize: 64,
        baseline: 0,
        tokenizer: 0,
        rows: 0,
        eval: false,
        copies: Default::default(),
        objective: qlora::train::objective::Kind::Sft,
        reference_values: false,
        cfg: model.cfg.clone(),
    }
    .plan();
    let plan_step_mib = plan
        .phases
        .iter()
        .filter(|p| p.phase != qlora::plan::Phase::Load)
        .map(|p| p.bytes)
        .max()
        .unwrap_or(0) as f64
        / (1 << 20) as f64;
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
            "plan_step_peak_mib": plan_step_mib,
        })
    );
    Ok(())
}
