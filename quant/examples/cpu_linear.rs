//! This CPU's f32 gemm throughput and the NF4 linear's, side by side: for the four linears of the
//! 135M comparison model (`scripts/compare_cpu_step.sh`) at 256 tokens, the NF4 linear forward
//! `x · dequant(W)ᵀ` and backward `dy · dequant(W)` against candle's dense f32 matmul on the same
//! shapes, and a 2048² square matmul as the machine's gemm ceiling. Medians of 15 runs, GFLOP/s
//! counted as 2·m·n·k.
//!
//! `cargo run --release -p qlora-quant --example cpu_linear [-- TOKENS]`

use candle_core::{Device, Tensor};
use qlora_quant::{Blocksize, Nf4Tensor, QuantType, nf4_linear, nf4_matmul};
use std::time::Instant;

/// Median wall time of 15 runs, ms.
fn median_ms(mut f: impl FnMut() -> candle_core::Result<Tensor>) -> candle_core::Result<f64> {
    let mut v = Vec::new();
    for _ in 0..15 {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

fn main() -> anyhow::Result<()> {
    // SAFETY: no other thread has started yet.
    unsafe { qlora_quant::runtime::init() };
    qlora_quant::runtime::run(measure)
}

fn measure() -> anyhow::Result<()> {
    let m: usize = match std::env::args().nth(1) {
        Some(s) => s.parse()?,
        None => 256,
    };
    let dev = Device::Cpu;
    println!(
        "threads {}; GFLOP/s = 2·m·n·k / time",
        qlora_quant::runtime::threads()
    );
    for (name, out, inp) in [
        ("qkv_proj", 960, 576),
        ("o_proj", 576, 576),
        ("gate_up_proj", 3072, 576),
        ("down_proj", 576, 1536),
    ] {
        let w = Tensor::randn(0f32, 0.02, (out, inp), &dev)?;
        let q = Nf4Tensor::quantize(&w, QuantType::Nf4, Blocksize::DEFAULT, true)?;
        let x = Tensor::randn(0f32, 1.0, (m, inp), &dev)?;
        let dy = Tensor::randn(0f32, 1.0, (m, out), &dev)?;
        let wt = w.t()?;
        let gf = 2.0 * (m * out * inp) as f64 / 1e6;
        let fwd = median_ms(|| nf4_linear(&x, &q).map_err(candle_core::Error::wrap))?;
        let fwd_dense = median_ms(|| x.matmul(&wt))?;
        let bwd = median_ms(|| nf4_matmul(&dy, &q).map_err(candle_core::Error::wrap))?;
        let bwd_dense = median_ms(|| dy.matmul(&w))?;
        println!(
            "{name:<13} [{out}x{inp}] m={m}: forward NF4 {fwd:.3} ms ({:.0} GFLOP/s), dense {fwd_dense:.3} ms ({:.0}); backward NF4 {bwd:.3} ms ({:.0}), dense {bwd_dense:.3} ms ({:.0})",
            gf / fwd,
            gf / fwd_dense,
            gf / bwd,
            gf / bwd_dense
        );
    }
    let n = 2048;
    let a = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
    let t = median_ms(|| a.matmul(&a))?;
    println!(
        "square f32 matmul {n}x{n}x{n}: {t:.1} ms = {:.0} GFLOP/s",
        2.0 * (n * n * n) as f64 / 1e6 / t
    );
    Ok(())
}
