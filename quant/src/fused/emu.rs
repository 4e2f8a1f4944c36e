//! The fused kernels of quant/kernels/fused.cu in the emulation harness (feature `emulate`),
//! launched as `cuda.rs` launches them: the same kernels, arguments and `crate::launch` grids.

use super::args::{SoftmaxRowsArg, u32_of};
use super::cpu::{RopeGeometry, SoftmaxRows, data};
use super::ops::Dropout;
use crate::emu::{Arg, elems_of, input, launch, output, tensor_input};
use crate::launch::{self as cfg, LaunchDims};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Tensor, WithDType};

/// Runs `{name}_{sfx}` and returns its one output as `T`s.
fn run<T: crate::emu::Elem>(
    name: &str,
    sfx: &str,
    dims: LaunchDims,
    args: &[Arg],
) -> Result<Vec<T>> {
    let outs = launch(&format!("{name}_{sfx}"), dims, args)?;
    Ok(elems_of(&outs[0]))
}

/// The op's input `s`/`l` as an argument.
fn arg<T: crate::emu::Elem + WithDType>(s: &CpuStorage, l: &Layout) -> Result<Arg> {
    Ok(input(data::<T>(s, l)?, l))
}

/// The mask, or (never read by the kernel) the input again.
fn mask_or<T: crate::emu::Elem + WithDType>(
    mask: Option<&Tensor>,
    s: &CpuStorage,
    l: &Layout,
) -> Result<Arg> {
    match mask {
        Some(m) => tensor_input::<T>(m, "the attention mask"),
        None => arg::<T>(s, l),
    }
}

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

pub(super) fn rms_norm_fwd(s: &CpuStorage, l: &Layout, w: &Tensor, eps: f32) -> Result<CpuStorage> {
    let (n, h) = (l.shape().elem_count(), last_dim(l));
    by_dtype!(s.dtype(), "rms_norm", T, sfx => {
        let args = [
            arg::<T>(s, l)?,
            tensor_input::<T>(w, "the rms_norm weight")?,
            output::<T>(n),
            Arg::U32(u32_of(h, "row length")?),
            Arg::F32(eps),
        ];
        Ok(T::to_cpu_storage_owned(run::<T>("rmsnorm_fwd", sfx, cfg::rows(n / h)?, &args)?))
    })
}

pub(super) fn rms_norm_bwd(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    w: &Tensor,
    eps: f32,
) -> Result<CpuStorage> {
    let (n, h) = (l1.shape().elem_count(), last_dim(l1));
    by_dtype!(s1.dtype(), "rms_norm backward", T, sfx => {
        let args = [
            arg::<T>(s1, l1)?,
            tensor_input::<T>(w, "the rms_norm weight")?,
            arg::<T>(s2, l2)?,
            output::<T>(n),
            Arg::U32(u32_of(h, "row length")?),
            Arg::F32(eps),
        ];
        Ok(T::to_cpu_storage_owned(run::<T>("rmsnorm_bwd", sfx, cfg::rows(n / h)?, &args)?))
    })
}

pub(super) fn rope(
    s: &CpuStorage,
    l: &Layout,
    cos: &Tensor,
    sin: &Tensor,
    (heads, t_len, d, r, table_stride): RopeGeometry,
    backward: bool,
) -> Result<CpuStorage> {
    let n = l.shape().elem_count();
    let name = if backward { "rope_bwd" } else { "rope_fwd" };
    by_dtype!(s.dtype(), "rope", T, sfx => {
        let args = [
            arg::<T>(s, l)?,
            tensor_input::<T>(cos, "the rope cos table")?,
            tensor_input::<T>(sin, "the rope sin table")?,
            output::<T>(n),
            Arg::U64(n as u64),
            Arg::U32(u32_of(heads, "heads")?),
            Arg::U32(u32_of(t_len, "tokens")?),
            Arg::U32(u32_of(d, "head dim")?),
            Arg::U32(u32_of(r, "rotary dim")?),
            Arg::U32(u32_of(table_stride, "table stride")?),
        ];
        Ok(T::to_cpu_storage_owned(run::<T>(name, sfx, cfg::elems(n)?, &args)?))
    })
}

pub(super) fn swiglu_fwd(s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
    let (n, inter) = (l.shape().elem_count() / 2, last_dim(l) / 2);
    by_dtype!(s.dtype(), "swiglu", T, sfx => {
        let args = [
            arg::<T>(s, l)?,
            output::<T>(n),
            Arg::U64(n as u64),
            Arg::U32(u32_of(inter, "intermediate size")?),
        ];
        Ok(T::to_cpu_storage_owned(run::<T>("swiglu_fwd", sfx, cfg::elems(n)?, &args)?))
    })
}

pub(super) fn swiglu_bwd(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<CpuStorage> {
    let (n, inter) = (l1.shape().elem_count() / 2, last_dim(l1) / 2);
    by_dtype!(s1.dtype(), "swiglu backward", T, sfx => {
        let args = [
            arg::<T>(s1, l1)?,
            arg::<T>(s2, l2)?,
            output::<T>(2 * n),
            Arg::U64(n as u64),
            Arg::U32(u32_of(inter, "intermediate size")?),
        ];
        Ok(T::to_cpu_storage_owned(run::<T>("swiglu_bwd", sfx, cfg::elems(n)?, &args)?))
    })
}

pub(super) fn softmax_fwd(
    s: &CpuStorage,
    l: &Layout,
    mask: Option<&Tensor>,
    g: SoftmaxRows,
) -> Result<CpuStorage> {
    let n = l.shape().elem_count();
    by_dtype!(s.dtype(), "softmax", T, sfx => {
        let args = [
            arg::<T>(s, l)?,
            mask_or::<T>(mask, s, l)?,
            output::<T>(n),
            Arg::Struct(SoftmaxRowsArg::new(g, mask.is_some())?.to_bytes()),
        ];
        Ok(T::to_cpu_storage_owned(run::<T>("softmax_fwd", sfx, cfg::rows(n / g.len)?, &args)?))
    })
}

pub(super) fn softmax_bwd(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    mask: Option<&Tensor>,
    g: SoftmaxRows,
) -> Result<CpuStorage> {
    let n = l1.shape().elem_count();
    by_dtype!(s1.dtype(), "softmax backward", T, sfx => {
        let args = [
            arg::<T>(s1, l1)?,
            mask_or::<T>(mask, s1, l1)?,
            arg::<T>(s2, l2)?,
            output::<T>(n),
            Arg::Struct(SoftmaxRowsArg::new(g, mask.is_some())?.to_bytes()),
        ];
        Ok(T::to_cpu_storage_owned(run::<T>("softmax_bwd", sfx, cfg::rows(n / g.len)?, &args)?))
    })
}

pub(super) fn xent_fwd(s: &CpuStorage, l: &Layout, targets: &Tensor) -> Result<CpuStorage> {
    let (rows, vocab) = l.shape().dims2()?;
    by_dtype!(s.dtype(), "cross_entropy", T, sfx => {
        let args = [
            arg::<T>(s, l)?,
            tensor_input::<u32>(targets, "the targets")?,
            output::<f32>(rows),
            Arg::U32(u32_of(vocab, "vocabulary")?),
        ];
        Ok(CpuStorage::F32(run::<f32>("xent_fwd", sfx, cfg::rows(rows)?, &args)?))
    })
}

pub(super) fn xent_bwd(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    targets: &Tensor,
) -> Result<CpuStorage> {
    let (rows, vocab) = l1.shape().dims2()?;
    by_dtype!(s1.dtype(), "cross_entropy backward", T, sfx => {
        let args = [
            arg::<T>(s1, l1)?,
            tensor_input::<u32>(targets, "the targets")?,
            arg::<f32>(s2, l2)?,
            output::<T>(rows * vocab),
            Arg::U32(u32_of(vocab, "vocabulary")?),
        ];
        Ok(T::to_cpu_storage_owned(run::<T>("xent_bwd", sfx, cfg::rows(rows)?, &args)?))
    })
}

pub(super) fn dropout(s: &CpuStorage, l: &Layout, op: Dropout) -> Result<CpuStorage> {
    if s.dtype() == candle_core::DType::F64 {
        // No kernel takes f64 (CUDA refuses it); the CPU loop serves it.
        return super::cpu::dropout(s, l, op);
    }
    let n = l.shape().elem_count();
    by_dtype!(s.dtype(), "dropout", T, sfx => {
        let args = [
            arg::<T>(s, l)?,
            output::<T>(n),
            Arg::U64(n as u64),
            Arg::U64(op.seed),
            Arg::U32(op.threshold),
            Arg::F32(op.scale),
            Arg::U64(op.len),
            Arg::U64(op.rows.first),
            Arg::U64(op.rows.step),
        ];
        let dims = cfg::grid_stride(n, cfg::MAX_STRIDE_BLOCKS)?;
        Ok(T::to_cpu_storage_owned(run::<T>("dropout", sfx, dims, &args)?))
    })
}
