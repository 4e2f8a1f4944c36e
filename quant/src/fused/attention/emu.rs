//! The attention kernels of quant/kernels/attention.cu in the emulation harness (feature
//! `emulate`), launched as `cuda.rs` launches them: one warp per row, `crate::launch::warps`.

use super::{AttentionBwd, Geom, Part};
use crate::emu::{Arg, Elem, elems_of, input, launch, output, tensor_input};
use crate::fused::args::GeomArg;
use crate::fused::cpu::data;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Tensor, WithDType};

type Input<'a> = (&'a CpuStorage, &'a Layout);

fn arg<T: Elem + WithDType>((s, l): Input<'_>) -> Result<Arg> {
    Ok(input(data::<T>(s, l)?, l))
}

/// The mask, or (never read by the kernels) `fallback` again.
fn mask_or<T: Elem + WithDType>(mask: Option<&Tensor>, fallback: Input<'_>) -> Result<Arg> {
    match mask {
        Some(m) => tensor_input::<T>(m, "the attention mask"),
        None => arg::<T>(fallback),
    }
}

fn geom(g: Geom, mask: Option<&Tensor>) -> Result<Arg> {
    Ok(Arg::Struct(GeomArg::new(g, mask.is_some())?.to_bytes()))
}

/// The forward: `o [B, H, T, D]`.
pub(super) fn forward(
    q: Input<'_>,
    k: Input<'_>,
    v: Input<'_>,
    mask: Option<&Tensor>,
    g: Geom,
) -> Result<CpuStorage> {
    let rows = g.b * g.h * g.t;
    by_dtype!(q.0.dtype(), "attention", T, sfx => {
        let args = [
            arg::<T>(q)?,
            arg::<T>(k)?,
            arg::<T>(v)?,
            mask_or::<T>(mask, q)?,
            output::<T>(rows * g.d),
            geom(g, mask)?,
        ];
        let outs = launch(&format!("attn_fwd_{sfx}"), crate::launch::warps(rows)?, &args)?;
        Ok(T::to_cpu_storage_owned(elems_of::<T>(&outs[0])))
    })
}

/// One part of the backward, applied to `do` (`s`, `l`).
pub(super) fn backward(s: &CpuStorage, l: &Layout, op: &AttentionBwd) -> Result<CpuStorage> {
    let g = op.geom;
    let mask = op.mask.as_ref();
    let (q_rows, k_rows) = (g.b * g.h * g.t, g.b * g.hk * g.tk);
    by_dtype!(s.dtype(), "attention backward", T, sfx => {
        let dout = arg::<T>((s, l))?;
        match &op.part {
            Part::Stats { q, k, o } => {
                let args = [
                    tensor_input::<T>(q, "q")?,
                    tensor_input::<T>(k, "k")?,
                    mask_or::<T>(mask, (s, l))?,
                    tensor_input::<T>(o, "the attention output")?,
                    dout,
                    output::<f32>(2 * q_rows),
                    geom(g, mask)?,
                ];
                let dims = crate::launch::warps(q_rows)?;
                let outs = launch(&format!("attn_stats_{sfx}"), dims, &args)?;
                Ok(CpuStorage::F32(elems_of::<f32>(&outs[0])))
            }
            Part::Dq { q, k, v, stats } | Part::Dkv { q, k, v, stats } => {
                let dkv = matches!(op.part, Part::Dkv { .. });
                let (kind, rows, n) = if dkv {
                    ("dkv", k_rows, k_rows * 2 * g.d)
                } else {
                    ("dq", q_rows, q_rows * g.d)
                };
                let args = [
                    tensor_input::<T>(q, "q")?,
                    tensor_input::<T>(k, "k")?,
                    tensor_input::<T>(v, "v")?,
                    mask_or::<T>(mask, (s, l))?,
                    dout,
                    tensor_input::<f32>(stats, "the attention statistics")?,
                    output::<T>(n),
                    geom(g, mask)?,
                ];
                let dims = crate::launch::warps(rows)?;
                let outs = launch(&format!("attn_{kind}_{sfx}"), dims, &args)?;
                Ok(T::to_cpu_storage_owned(elems_of::<T>(&outs[0])))
            }
        }
    })
}
