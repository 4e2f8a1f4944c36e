//! Launches of quant/kernels/attention.cu: one warp per row (query rows for the forward, the
//! statistics and dq; key rows for dk | dv), `launch::WARPS_PER_BLOCK` warps per block.

use super::{AttentionBwd, Geom, Part};
use crate::cuda::view;
use crate::fused::args::GeomArg;
use crate::fused::cuda::{input, output};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
use candle_core::{Layout, Result, Tensor};

/// PTX of quant/kernels/attention.cu.
pub const ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
const MODULE: &str = "qlora_quant_attention";

// SAFETY: a plain #[repr(C)] struct of 4-byte scalars, laid out as the C struct it mirrors.
unsafe impl DeviceRepr for GeomArg {}

fn warps_cfg(rows: usize) -> Result<LaunchConfig> {
    Ok(crate::launch::warps(rows)?.into())
}

type Input<'a> = (&'a CudaStorage, &'a Layout);

pub(super) fn forward(
    q: Input<'_>,
    k: Input<'_>,
    v: Input<'_>,
    mask: Option<&Tensor>,
    g: Geom,
) -> Result<CudaStorage> {
    by_dtype!(q.0.dtype(), "attention", T, sfx => forward_typed::<T>(q, k, v, mask, g, sfx))
}

// SAFETY (every launch below): the arguments match the kernel's signature in attention.cu
// (pointers, then the AttnGeom struct bound to a local); q/o/do hold B·H·T·D elements, k/v
// B·Hk·Tk·D, the mask the [Bm, 1, T, Tk] its geometry describes, stats 2·B·H·T f32, and outputs
// are allocated for every element their kernel writes (one warp per row).

fn forward_typed<T: CudaDType + DeviceRepr>(
    (qs, ql): Input<'_>,
    (ks, kl): Input<'_>,
    (vs, vl): Input<'_>,
    mask: Option<&Tensor>,
    g: Geom,
    sfx: &str,
) -> Result<CudaStorage> {
    let dev = &qs.device;
    let (q, k, v) = (
        input::<T>(qs, ql)?,
        input::<T>(ks, kl)?,
        input::<T>(vs, vl)?,
    );
    let guard = mask.map(|m| m.storage_and_layout());
    // Without a mask the kernel never reads it: pass q.
    let m = match &guard {
        Some((mg, ml)) => view::<T>(mg, ml, dev, "the attention mask")?,
        None => input::<T>(qs, ql)?,
    };
    let arg = GeomArg::new(g, guard.is_some())?;
    let rows = g.b * g.h * g.t;
    let mut o = output::<T>(dev, rows * g.d)?;
    let name = format!("attn_fwd_{sfx}");
    let f = dev.get_or_load_custom_func(&name, MODULE, ATTENTION_PTX)?;
    let mut b = f.builder();
    b.arg(&q).arg(&k).arg(&v).arg(&m).arg(&mut o).arg(&arg);
    unsafe { b.launch(warps_cfg(rows)?) }.w()?;
    Ok(CudaStorage::wrap_cuda_slice(o, dev.clone()))
}

/// One part of the backward, applied to `do` (`s`, `l`).
pub(super) fn backward(s: &CudaStorage, l: &Layout, op: &AttentionBwd) -> Result<CudaStorage> {
    by_dtype!(s.dtype(), "attention backward", T, sfx => backward_typed::<T>(s, l, op, sfx))
}

fn backward_typed<T: CudaDType + DeviceRepr>(
    s: &CudaStorage,
    l: &Layout,
    op: &AttentionBwd,
    sfx: &str,
) -> Result<CudaStorage> {
    let dev = &s.device;
    let g = op.geom;
    let dout = input::<T>(s, l)?;
    let guard = op.mask.as_ref().map(|m| m.storage_and_layout());
    let m = match &guard {
        Some((mg, ml)) => view::<T>(mg, ml, dev, "the attention mask")?,
        None => input::<T>(s, l)?,
    };
    let arg = GeomArg::new(g, guard.is_some())?;
    let (q_rows, k_rows) = (g.b * g.h * g.t, g.b * g.hk * g.tk);
    match &op.part {
        Part::Stats { q, k, o } => {
            let (qg, ql) = q.storage_and_layout();
            let (kg, kl) = k.storage_and_layout();
            let (og, ol) = o.storage_and_layout();
            let q = view::<T>(&qg, ql, dev, "q")?;
            let k = view::<T>(&kg, kl, dev, "k")?;
            let o = view::<T>(&og, ol, dev, "the attention output")?;
            let mut stats = output::<f32>(dev, 2 * q_rows)?;
            let f =
                dev.get_or_load_custom_func(&format!("attn_stats_{sfx}"), MODULE, ATTENTION_PTX)?;
            let mut b = f.builder();
            b.arg(&q)
                .arg(&k)
                .arg(&m)
                .arg(&o)
                .arg(&dout)
                .arg(&mut stats)
                .arg(&arg);
            unsafe { b.launch(warps_cfg(q_rows)?) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(stats, dev.clone()))
        }
        Part::Dq { q, k, v, stats } | Part::Dkv { q, k, v, stats } => {
            let dkv = matches!(op.part, Part::Dkv { .. });
            let (qg, ql) = q.storage_and_layout();
            let (kg, kl) = k.storage_and_layout();
            let (vg, vl) = v.storage_and_layout();
            let (sg, sl) = stats.storage_and_layout();
            let q = view::<T>(&qg, ql, dev, "q")?;
            let k = view::<T>(&kg, kl, dev, "k")?;
            let v = view::<T>(&vg, vl, dev, "v")?;
            let st = view::<f32>(&sg, sl, dev, "the attention statistics")?;
            let (kind, rows, n) = if dkv {
                ("dkv", k_rows, k_rows * 2 * g.d)
            } else {
                ("dq", q_rows, q_rows * g.d)
            };
            let mut out = output::<T>(dev, n)?;
            let name = format!("attn_{kind}_{sfx}");
            let f = dev.get_or_load_custom_func(&name, MODULE, ATTENTION_PTX)?;
            let mut b = f.builder();
            b.arg(&q)
                .arg(&k)
                .arg(&v)
                .arg(&m)
                .arg(&dout)
                .arg(&st)
                .arg(&mut out)
                .arg(&arg);
            unsafe { b.launch(warps_cfg(rows)?) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
    }
}
