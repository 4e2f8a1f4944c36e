//! Throughput of 4-bit quantization and dequantization (bytes of f32 weights per second), and the
//! NF4 linear forward on a Phi-3-mini-sized weight (gate/up half: 8192 × 3072) against candle's
//! dense f32 matmul on the same shape.
//!
//! Run: `cargo bench -p qlora-quant --bench quant` (RAYON_NUM_THREADS sets the thread count; the
//! medians measured with the command are in docs/measurements.md, "The 4-bit kernels").

use candle_core::{Device, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use qlora_quant::{Blocksize, BnbBackend, Nf4Tensor, QuantType, cpu, nf4_linear};
use std::hint::black_box;
use std::time::Duration;

/// Phi-3-mini: hidden 3072, intermediate 8192.
const OUT: usize = 8192;
const IN: usize = 3072;

fn weights(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as f32 / (1u64 << 24) as f32)
                - 0.5
        })
        .collect()
}

fn quantize(c: &mut Criterion) {
    let x = weights(OUT * IN);
    let mut g = c.benchmark_group("quantize");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Bytes((x.len() * 4) as u64));
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        g.bench_function(BenchmarkId::new("fast", qt), |b| {
            b.iter(|| {
                cpu::quantize(black_box(&x), qt, Blocksize::DEFAULT, BnbBackend::Cuda).unwrap()
            })
        });
    }
    g.bench_function("ref/nf4", |b| {
        b.iter(|| {
            cpu::quantize_ref(
                black_box(&x),
                QuantType::Nf4,
                Blocksize::DEFAULT,
                BnbBackend::Cuda,
            )
            .unwrap()
        })
    });
    g.finish();
}

fn dequantize(c: &mut Criterion) {
    let x = weights(OUT * IN);
    let q = cpu::quantize(&x, QuantType::Nf4, Blocksize::DEFAULT, BnbBackend::Cuda).unwrap();
    let mut g = c.benchmark_group("dequantize");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Bytes((x.len() * 4) as u64));
    let mut out32 = vec![0f32; x.len()];
    g.bench_function("fast/f32", |b| {
        b.iter(|| {
            cpu::dequantize_into(
                &q.packed,
                &q.absmax,
                QuantType::Nf4,
                Blocksize::DEFAULT,
                black_box(&mut out32),
            )
            .unwrap()
        })
    });
    let mut out16 = vec![half::bf16::ZERO; x.len()];
    g.bench_function("fast/bf16", |b| {
        b.iter(|| {
            cpu::dequantize_into(
                &q.packed,
                &q.absmax,
                QuantType::Nf4,
                Blocksize::DEFAULT,
                black_box(&mut out16),
            )
            .unwrap()
        })
    });
    g.bench_function("ref/f32", |b| {
        b.iter(|| {
            cpu::dequantize_ref::<f32>(
                &q.packed,
                &q.absmax,
                QuantType::Nf4,
                Blocksize::DEFAULT,
                x.len(),
            )
        })
    });
    g.finish();
}

fn linear(c: &mut Criterion) {
    let dev = Device::Cpu;
    let w = Tensor::from_vec(weights(OUT * IN), (OUT, IN), &dev).unwrap();
    let q = Nf4Tensor::quantize(&w, QuantType::Nf4, Blocksize::DEFAULT, true).unwrap();
    let wt = w.t().unwrap();
    let mut g = c.benchmark_group("linear_8192x3072");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    for tokens in [1usize, 128] {
        let x = Tensor::from_vec(weights(tokens * IN), (tokens, IN), &dev).unwrap();
        g.throughput(Throughput::Elements((tokens * OUT * IN) as u64));
        g.bench_function(BenchmarkId::new("nf4", tokens), |b| {
            b.iter(|| nf4_linear(black_box(&x), &q).unwrap())
        });
        g.bench_function(BenchmarkId::new("dense_f32", tokens), |b| {
            b.iter(|| black_box(&x).matmul(&wt).unwrap())
        });
        let dy = Tensor::from_vec(weights(tokens * OUT), (tokens, OUT), &dev).unwrap();
        g.bench_function(BenchmarkId::new("nf4_backward_dx", tokens), |b| {
            b.iter(|| qlora_quant::nf4_matmul(black_box(&dy), &q).unwrap())
        });
        g.bench_function(BenchmarkId::new("dense_f32_backward_dx", tokens), |b| {
            b.iter(|| black_box(&dy).matmul(&w).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, quantize, dequantize, linear);

fn main() {
    // As the qlora binary runs: one pool, candle's spinning pool off (qlora_quant::runtime).
    // SAFETY: no other thread has started yet.
    unsafe { qlora_quant::runtime::init() };
    qlora_quant::runtime::run(|| {
        benches();
        Criterion::default().configure_from_args().final_summary();
    });
}
