//! The CUDA kernels measured on the GPU at hand, in one process:
//!
//! 1. the dequantization kernel's bandwidth against a device-to-device copy. The weight (default
//!    32768 × 8192, 268 M values: 128 MiB of NF4 codes, 512 MiB as bf16) is dequantized `ITERS`
//!    times between two synchronisations, `REPEATS` times; the median per call is reported. Bytes
//!    moved by a dequantization = packed codes + absmax state read + output written; by a copy =
//!    2 × its size (read + write), the copy being of the bf16 output's size, into a buffer
//!    allocated once (cuMemcpyDtoD);
//! 2. forward + backward of each fused op against the candle composition it replaces, at
//!    Phi-3-mini's shapes for one 2048-token sequence in bf16 (`qlora_quant::fused`).
//!
//! ```sh
//! cargo run --release -p qlora-quant --features cuda --example kernel_bench -- [ROWS COLS]
//! ```
//!
//! One JSON line per measurement, then tables.

use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::{DType, Device, Storage, Tensor};
use qlora_quant::{Blocksize, Nf4Tensor, QuantType, Quantized};
use std::time::Instant;

const ITERS: usize = 20;
const REPEATS: usize = 15;
const GB: f64 = 1e9;

/// Median seconds per call of `f` (after one untimed batch).
fn time(dev: &Device, mut f: impl FnMut() -> candle_core::Result<()>) -> anyhow::Result<f64> {
    for _ in 0..ITERS {
        f()?;
    }
    dev.synchronize()?;
    let mut per_call = Vec::with_capacity(REPEATS);
    for _ in 0..REPEATS {
        let t0 = Instant::now();
        for _ in 0..ITERS {
            f()?;
        }
        dev.synchronize()?;
        per_call.push(t0.elapsed().as_secs_f64() / ITERS as f64);
    }
    per_call.sort_by(f64::total_cmp);
    Ok(per_call[REPEATS / 2])
}

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let (rows, cols) = match args.as_slice() {
        [] => (32768, 8192),
        [r, c] => (*r, *c),
        _ => anyhow::bail!("usage: kernel_bench [ROWS COLS]"),
    };
    let dev = Device::new_cuda(0)?;
    let n = rows * cols;
    // Quantize a smaller random block on the host and tile its codes: the kernel's speed does not
    // depend on the values, and quantizing 268 M values on the CPU would dominate the run.
    let tile_elems = (1 << 20).min(n);
    let tile: Vec<f32> = (0..tile_elems)
        .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 0.04)
        .collect();
    let mut results = Vec::new();
    for double_quant in [true, false] {
        let t = Quantized::quantize(
            &tile,
            &[tile_elems],
            DType::F32,
            QuantType::Nf4,
            Blocksize::DEFAULT,
            double_quant,
        )?;
        let q = tiled(&t, n, &[rows, cols])?;
        let w = Nf4Tensor::new(&q, &dev)?;
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let secs = time(&dev, || w.dequantize(dtype).map(drop).map_err(to_candle))?;
            let bytes = w.storage_bytes() + n * dtype.size_in_bytes();
            results.push((
                format!("dequant nf4 dq={double_quant} → {dtype:?}"),
                bytes,
                secs,
            ));
        }
    }
    let copy_bytes = n * DType::BF16.size_in_bytes();
    let src = Tensor::zeros(copy_bytes, DType::U8, &dev)?;
    let (guard, _) = src.storage_and_layout();
    let Storage::Cuda(cs) = &*guard else {
        anyhow::bail!("the copy source is not on the GPU")
    };
    let src_slice = cs.as_cuda_slice::<u8>()?;
    let stream = cs.device.cuda_stream();
    let mut dst: CudaSlice<u8> = stream.alloc_zeros(copy_bytes)?;
    let secs = time(&dev, || {
        stream
            .memcpy_dtod(src_slice, &mut dst)
            .map_err(candle_core::Error::wrap)
    })?;
    let copy_gbs = 2.0 * copy_bytes as f64 / secs / GB;
    results.push(("device-to-device copy".into(), 2 * copy_bytes, secs));

    for (what, bytes, secs) in &results {
        let gbs = *bytes as f64 / secs / GB;
        println!(
            "{}",
            serde_json::json!({"bench": "dequant_bw", "what": what, "rows": rows, "cols": cols,
                "bytes": bytes, "us": secs * 1e6, "gb_per_s": gbs, "of_copy": gbs / copy_gbs})
        );
    }
    println!(
        "\n{:<34} {:>10} {:>10} {:>9}",
        "kernel", "µs", "GB/s", "of copy"
    );
    for (what, bytes, secs) in &results {
        let gbs = *bytes as f64 / secs / GB;
        println!(
            "{what:<34} {:>10.1} {gbs:>10.0} {:>8.1}%",
            secs * 1e6,
            100.0 * gbs / copy_gbs
        );
    }
    drop(guard);
    fused_vs_composition(&dev)
}

/// Median milliseconds of forward + backward (`Σ y ⊙ r`, gradients of every float input) of `f`.
fn fwd_bwd_ms(
    dev: &Device,
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) -> anyhow::Result<f64> {
    use candle_core::Var;
    let vars: Vec<Var> = inputs
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<_>>()?;
    let args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&args)?;
    let r = y.ones_like()?;
    let step = || -> candle_core::Result<()> {
        let y = f(&args)?;
        (y * &r)?.sum_all()?.backward().map(drop)
    };
    let mut ms = Vec::new();
    step()?;
    for _ in 0..7 {
        dev.synchronize()?;
        let t0 = Instant::now();
        step()?;
        dev.synchronize()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

/// A forward to time.
type OpFn = Box<dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>>;

/// The fused ops against their compositions at Phi-3-mini's shapes (bf16, 2048 tokens).
fn fused_vs_composition(dev: &Device) -> anyhow::Result<()> {
    use qlora_quant::fused;
    let (t, h, heads, d, inter, vocab) = (2048, 3072, 32, 96, 8192, 32064);
    let bf = |shape: &[usize], lo: f64, hi: f64| -> candle_core::Result<Tensor> {
        Tensor::rand(lo as f32, hi as f32, shape, dev)?.to_dtype(DType::BF16)
    };
    let mask: Vec<f32> = (0..t * t)
        .map(|k| {
            if k % t <= k / t {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (1, 1, t, t), dev)?.to_dtype(DType::BF16)?;
    let scale = 1.0 / (d as f64).sqrt();
    let angles = Tensor::rand(0f32, std::f32::consts::TAU, (1, 1, t, d), dev)?;
    let (cos, sin) = (
        angles.cos()?.to_dtype(DType::BF16)?,
        angles.sin()?.to_dtype(DType::BF16)?,
    );
    let targets = Tensor::rand(0f32, vocab as f32 - 1.0, 256, dev)?.to_dtype(DType::U32)?;
    let x = bf(&[1, t, h], -2.0, 2.0)?;
    let w = bf(&[h], 0.5, 1.5)?;
    let qkv = [
        bf(&[1, heads, t, d], -1.0, 1.0)?,
        bf(&[1, heads, t, d], -1.0, 1.0)?,
        bf(&[1, heads, t, d], -1.0, 1.0)?,
    ];
    let cases: Vec<(&str, Vec<Tensor>, OpFn, OpFn)> = vec![
        (
            "rms_norm [2048, 3072]",
            vec![x.clone()],
            Box::new({
                let w = w.clone();
                move |a| fused::rms_norm_ref(&a[0], &w, 1e-5)
            }),
            Box::new({
                let w = w.clone();
                move |a| fused::rms_norm_fused(&a[0], &w, 1e-5)
            }),
        ),
        (
            "rope q [32, 2048, 96]",
            vec![qkv[0].clone()],
            Box::new({
                let (c, s) = (cos.clone(), sin.clone());
                move |a| fused::rope_ref(&a[0], &c, &s)
            }),
            Box::new({
                let (c, s) = (cos.clone(), sin.clone());
                move |a| fused::rope_fused(&a[0], &c, &s)
            }),
        ),
        (
            "swiglu [2048, 2×8192]",
            vec![bf(&[1, t, 2 * inter], -4.0, 4.0)?],
            Box::new(|a| fused::swiglu_ref(&a[0])),
            Box::new(|a| fused::swiglu_fused(&a[0])),
        ),
        (
            "attention probs [32, 2048, 2048]",
            vec![bf(&[1, heads, t, t], -8.0, 8.0)?],
            Box::new({
                let m = mask.clone();
                move |a| fused::attention_softmax_ref(&a[0], Some(&m), scale)
            }),
            Box::new({
                let m = mask.clone();
                move |a| fused::attention_softmax_fused(&a[0], Some(&m), scale)
            }),
        ),
        (
            "attention, streaming kernel",
            qkv.to_vec(),
            Box::new({
                let m = mask.clone();
                move |a| fused::attention_ref(&a[0], &a[1], &a[2], Some(&m), scale)
            }),
            Box::new({
                let m = mask.clone();
                move |a| fused::attention_fused(&a[0], &a[1], &a[2], Some(&m), scale)
            }),
        ),
        (
            "attention, blocked (causal matmul chunks)",
            qkv.to_vec(),
            Box::new({
                let m = mask.clone();
                move |a| fused::attention_ref(&a[0], &a[1], &a[2], Some(&m), scale)
            }),
            Box::new({
                let m = mask.clone();
                move |a| {
                    fused::attention_blocked(
                        &a[0],
                        &a[1],
                        &a[2],
                        Some(&m),
                        scale,
                        fused::Blocking::new(true),
                    )
                }
            }),
        ),
        (
            "cross-entropy [256, 32064]",
            vec![bf(&[256, vocab], -5.0, 5.0)?],
            Box::new({
                let tg = targets.clone();
                move |a| fused::cross_entropy_ref(&a[0], &tg)
            }),
            Box::new({
                let tg = targets.clone();
                move |a| fused::cross_entropy_fused(&a[0], &tg)
            }),
        ),
    ];
    println!(
        "\n{:<34} {:>16} {:>10} {:>8}",
        "fwd + bwd, bf16", "composition ms", "fused ms", "speedup"
    );
    for (what, inputs, reference, fused_op) in &cases {
        let composition = fwd_bwd_ms(dev, inputs, reference.as_ref())?;
        let fused_ms = fwd_bwd_ms(dev, inputs, fused_op.as_ref())?;
        println!(
            "{}",
            serde_json::json!({"bench": "fused", "what": what, "composition_ms": composition,
                "fused_ms": fused_ms})
        );
        println!(
            "{what:<34} {composition:>16.2} {fused_ms:>10.2} {:>7.1}x",
            composition / fused_ms
        );
    }
    Ok(())
}

/// `tile`'s codes and absmax repeated to `n` elements (`n` a multiple of the block size).
fn tiled(tile: &Quantized, n: usize, shape: &[usize]) -> anyhow::Result<Quantized> {
    use qlora_quant::{Absmax, NestedAbsmax};
    let rep = |v: &[u8], len: usize| v.iter().copied().cycle().take(len).collect::<Vec<u8>>();
    let n_blocks = n.div_ceil(tile.blocksize.elems());
    let absmax = match &tile.absmax {
        Absmax::Plain(a) => Absmax::Plain(a.iter().copied().cycle().take(n_blocks).collect()),
        Absmax::Nested(nested) => Absmax::Nested(NestedAbsmax {
            codes: rep(&nested.codes, n_blocks),
            nested_absmax: nested
                .nested_absmax
                .iter()
                .copied()
                .cycle()
                .take(n_blocks.div_ceil(256))
                .collect(),
            offset: nested.offset,
        }),
    };
    let q = Quantized {
        shape: shape.to_vec(),
        packed: rep(&tile.packed, n.div_ceil(2)),
        absmax,
        ..tile.clone()
    };
    q.validate()?;
    Ok(q)
}

fn to_candle(e: qlora_quant::QuantError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}
