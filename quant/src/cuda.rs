//! The CUDA side of the ops (the `cuda` feature): launches the dequantization kernels of
//! `quant/kernels/dequant.cu` on candle's stream, and runs the 4-bit matmul as "dequantize into a
//! temporary of `x`'s dtype, one cuBLAS gemm (candle's own `matmul`), free the temporary", so no
//! dense weight outlives the call, in either orientation (the backward's too).
//!
//! The kernels read the code table (and, for double-quantized absmax, the 8-bit dynamic map) from
//! a small device buffer uploaded once per device and quant type from [`QuantType::code`] and
//! [`dynamic_map`]: each format fact stays defined once, in `format.rs`.

use crate::format::{QuantType, dynamic_map};
use crate::tensor::{AbsmaxTensor, Nf4Tensor};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, DeviceId, WrapErr};
use candle_core::{DType, Layout, Result, Storage, bail};
use half::{bf16, f16};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// PTX of quant/kernels/dequant.cu (compiled by build.rs for compute_80, JIT-compiled by the driver).
pub const DEQUANT_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dequant.ptx"));
/// Module name under which candle caches the loaded PTX.
const DEQUANT_MODULE: &str = "qlora_quant_dequant";
/// Elements per thread (16 packed bytes = one 16-byte load); `RUN_ELEMS` in dequant.cu.
pub const RUN_ELEMS: usize = crate::launch::DEQUANT_RUN_ELEMS;
/// Entries of the kernels' table buffer: 16 code values, then the 256-entry dynamic map.
const TABLE_LEN: usize = 16 + 256;

impl From<crate::launch::LaunchDims> for LaunchConfig {
    fn from(d: crate::launch::LaunchDims) -> Self {
        LaunchConfig {
            grid_dim: d.grid,
            block_dim: d.block,
            shared_mem_bytes: d.shared_mem_bytes,
        }
    }
}

/// The device buffer of code values + dynamic map for `qt`, uploaded once per device.
fn tables(dev: &CudaDevice, qt: QuantType) -> Result<Arc<CudaSlice<f32>>> {
    type Cache = Mutex<HashMap<(DeviceId, QuantType), Arc<CudaSlice<f32>>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Cache::default)
        .lock()
        .map_err(|_| candle_core::Error::Msg("qlora-quant: table cache lock poisoned".into()))?;
    if let Some(t) = cache.get(&(dev.id(), qt)) {
        return Ok(t.clone());
    }
    let mut host = Vec::with_capacity(TABLE_LEN);
    host.extend_from_slice(qt.code());
    host.extend_from_slice(dynamic_map());
    let slice = Arc::new(dev.clone_htod(&host)?);
    cache.insert((dev.id(), qt), slice.clone());
    Ok(slice)
}

/// The typed elements a contiguous layout covers in a CUDA storage, checked to live on `dev`.
pub(crate) fn view<'a, T: CudaDType>(
    storage: &'a Storage,
    layout: &Layout,
    dev: &CudaDevice,
    what: &str,
) -> Result<CudaView<'a, T>> {
    match storage {
        Storage::Cuda(s) if s.device.id() == dev.id() => match layout.contiguous_offsets() {
            Some((start, end)) => Ok(s.as_cuda_slice::<T>()?.slice(start..end)),
            None => bail!("qlora-quant: {what} is not a contiguous view"),
        },
        Storage::Cuda(_) => {
            bail!("qlora-quant: {what} lives on another CUDA device than the input")
        }
        _ => bail!(
            "qlora-quant: {what} is not on the CUDA device of the input; move the Nf4Tensor with \
             Nf4Tensor::new(&q, &device)"
        ),
    }
}

/// Dequantizes `w` (whose packed codes are `packed`, a view of its u8 storage) into a new CUDA
/// buffer of `dtype` (f32, bf16 or f16), bit-identical to [`crate::cpu::dequantize_ref`].
pub(crate) fn dequantize_packed(
    w: &Nf4Tensor,
    packed: &CudaView<'_, u8>,
    dtype: DType,
    dev: &CudaDevice,
) -> Result<CudaStorage> {
    match dtype {
        DType::F32 => launch::<f32>(w, packed, "f32", dev),
        DType::BF16 => launch::<bf16>(w, packed, "bf16", dev),
        DType::F16 => launch::<f16>(w, packed, "f16", dev),
        other => bail!("qlora-quant: cannot dequantize to {other:?}; use f32, bf16 or f16"),
    }
}

/// [`dequantize_packed`] locking `w`'s packed codes itself.
pub(crate) fn dequantize(w: &Nf4Tensor, dtype: DType, dev: &CudaDevice) -> Result<CudaStorage> {
    let (guard, layout) = w.packed().storage_and_layout();
    let packed = view::<u8>(&guard, layout, dev, "the packed weight")?;
    dequantize_packed(w, &packed, dtype, dev)
}

fn launch<T: CudaDType + DeviceRepr>(
    w: &Nf4Tensor,
    packed: &CudaView<'_, u8>,
    suffix: &str,
    dev: &CudaDevice,
) -> Result<CudaStorage> {
    let n_elems = w.n_elems();
    let cfg: LaunchConfig = crate::launch::dequant(n_elems)?.into();
    if packed.len() < n_elems.div_ceil(2) {
        bail!(
            "qlora-quant: {} packed bytes cannot hold {n_elems} elements",
            packed.len()
        );
    }
    let n_blocks = crate::format::n_blocks(n_elems, w.blocksize().elems());
    let tables = tables(dev, w.quant_type())?;
    let block_shift = w.blocksize().elems().trailing_zeros();
    let stream = dev.cuda_stream();
    // SAFETY: every element of `out` is written by the kernel before anyone reads it (each of the
    // ceil(n / 32) runs writes its elements, the last one only up to n).
    let mut out = unsafe { dev.alloc::<T>(n_elems)? };
    let vec_ok = {
        let (p, _sync) = packed.device_ptr(&stream);
        let (o, _sync) = out.device_ptr(&stream);
        u32::from(p % 16 == 0 && o % 16 == 0)
    };
    let n = n_elems as u64;
    let (absmax_guard, absmax_layout);
    let (codes_guard, codes_layout, nested_guard, nested_layout);
    let (absmax, codes, nested, offset, kind) = match w.absmax() {
        AbsmaxTensor::Plain(a) => {
            (absmax_guard, absmax_layout) = a.storage_and_layout();
            let a = view::<f32>(&absmax_guard, absmax_layout, dev, "the absmax")?;
            if a.len() < n_blocks {
                bail!(
                    "qlora-quant: {} absmax values for {n_blocks} blocks",
                    a.len()
                );
            }
            // The nested pointers are never read by the plain kernel: pass the absmax again.
            let unused = view::<f32>(&absmax_guard, absmax_layout, dev, "the absmax")?;
            (a, None, unused, 0f32, "plain")
        }
        AbsmaxTensor::Nested {
            codes,
            nested_absmax,
            offset,
        } => {
            (codes_guard, codes_layout) = codes.storage_and_layout();
            (nested_guard, nested_layout) = nested_absmax.storage_and_layout();
            let c = view::<u8>(&codes_guard, codes_layout, dev, "the absmax codes")?;
            let s = view::<f32>(&nested_guard, nested_layout, dev, "the nested absmax")?;
            let want_scales = n_blocks.div_ceil(crate::format::NESTED_BLOCK_ELEMS);
            if c.len() < n_blocks || s.len() < want_scales {
                bail!(
                    "qlora-quant: {} absmax codes and {} nested scales for {} blocks",
                    c.len(),
                    s.len(),
                    n_blocks
                );
            }
            // The plain-absmax pointer is never read by the nested kernel: pass the scales.
            let unused = view::<f32>(&nested_guard, nested_layout, dev, "the nested absmax")?;
            (unused, Some(c), s, *offset, "nested")
        }
    };
    let name = format!("dequant_{kind}_{suffix}");
    let func = dev.get_or_load_custom_func(&name, DEQUANT_MODULE, DEQUANT_PTX)?;
    let mut builder = func.builder();
    builder.arg(packed);
    builder.arg(&absmax);
    match &codes {
        Some(c) => builder.arg(c),
        None => builder.arg(packed),
    };
    builder.arg(&nested);
    builder.arg(&offset);
    builder.arg(tables.as_ref());
    builder.arg(&mut out);
    builder.arg(&n);
    builder.arg(&block_shift);
    builder.arg(&vec_ok);
    // SAFETY: the argument list matches `DEQUANT_KERNEL` in dequant.cu (pointers, f32, u64, u32,
    // u32); packed holds ≥ ceil(n/2) bytes, absmax/codes ≥ n_blocks entries and the nested scales
    // ≥ ceil(n_blocks/256) (checked above); `out` holds n elements; the kernel reads only those.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `x · dequant(W)ᵀ` (`transposed`) or `x · dequant(W)` for a contiguous `x` of `m` rows of `k`
/// values, into `m × n`: W dequantized into a temporary of `x`'s dtype, then one gemm.
pub(crate) fn nf4_matmul(
    w: &Nf4Tensor,
    transposed: bool,
    x: &CudaStorage,
    x_layout: &Layout,
    (m, k, n): (usize, usize, usize),
) -> Result<CudaStorage> {
    if m == 0 {
        bail!("qlora-quant: empty input to the 4-bit matmul on CUDA");
    }
    let dense = dequantize(w, x.dtype(), &x.device)?;
    let (out, inp) = w.dims2().map_err(crate::op::to_candle)?;
    let w_layout = Layout::contiguous((out, inp));
    // rhs [k, n]: Wᵀ (a transposed view of [out, in]) or W itself.
    let rhs_layout = if transposed {
        w_layout.transpose(0, 1)?
    } else {
        w_layout
    };
    let lhs_layout = Layout::contiguous_with_offset((m, k), x_layout.start_offset());
    x.matmul(&dense, (1, m, n, k), &lhs_layout, &rhs_layout)
}
