//! Bandwidth of the CUDA dequantization kernel against a device-to-device copy, measured in the
//! same process on the same GPU.
//!
//! ```sh
//! cargo run --release -p qlora-quant --features cuda --example dequant_bw -- [ROWS COLS]
//! ```
//!
//! The weight (default 32768 × 8192, 268 M values: 128 MiB of NF4 codes, 512 MiB as bf16) is
//! dequantized `ITERS` times between two synchronisations, `REPEATS` times; the median per call is
//! reported. Bytes moved by a dequantization = packed codes + absmax state read + output written;
//! by a copy = 2 × its size (read + write), the copy being of the bf16 output's size, into a
//! buffer allocated once (cuMemcpyDtoD). One JSON line per measurement, then a table.

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
        _ => anyhow::bail!("usage: dequant_bw [ROWS COLS]"),
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
