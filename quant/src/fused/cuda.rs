//! Launches of the fused kernels of `quant/kernels/fused.cu` on candle's stream: one block of
//! [`launch::ROW_THREADS`] per row for the row ops (RMSNorm, softmax, cross-entropy), one thread
//! per element for the elementwise ones (RoPE, SwiGLU), a grid-stride loop for dropout (the
//! configurations are `crate::launch`'s).

use super::args::SoftmaxRowsArg;
use super::args::u32_of;
use super::cpu::{RopeGeometry, SoftmaxRows};
use super::ops::Dropout;
use crate::cuda::view;
use crate::launch;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{Layout, Result, Tensor, bail};

/// PTX of quant/kernels/fused.cu.
pub const FUSED_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "qlora_quant_fused";

/// The contiguous data of an op input.
pub(super) fn input<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(s.as_cuda_slice::<T>()?.slice(start..end)),
        None => bail!("fused op: input is not contiguous"),
    }
}

/// The kernel `{name}_{suffix}` (candle caches the loaded module per device).
macro_rules! func {
    ($dev:expr, $name:expr, $suffix:expr) => {
        $dev.get_or_load_custom_func(&format!("{}_{}", $name, $suffix), MODULE, FUSED_PTX)
    };
}

/// One block per row.
fn rows_cfg(rows: usize) -> Result<LaunchConfig> {
    Ok(launch::rows(rows)?.into())
}

/// One thread per element.
fn elems_cfg(n: usize) -> Result<LaunchConfig> {
    Ok(launch::elems(n)?.into())
}

/// A new device buffer of `n` elements, every one written by the kernel that follows.
pub(super) fn output<T: DeviceRepr>(
    dev: &CudaDevice,
    n: usize,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<T>> {
    if n == 0 {
        bail!("fused op: empty output");
    }
    // SAFETY: the kernel launched next writes every element (one thread or row per element).
    unsafe { dev.alloc::<T>(n) }
}

// SAFETY (every launch below): the arguments match the kernel's signature in fused.cu (pointers,
// then u32/u64/f32 scalars bound to locals that outlive the launch); inputs hold the elements the
// kernel reads (rows × row length from the same layouts), outputs were allocated for every element
// the kernel writes.

pub(super) fn rms_norm_fwd(
    s: &CudaStorage,
    l: &Layout,
    w: &Tensor,
    eps: f32,
) -> Result<CudaStorage> {
    let dev = &s.device;
    let n = l.shape().elem_count();
    let h = l.dims().last().copied().unwrap_or(1);
    let (wg, wl) = w.storage_and_layout();
    by_dtype!(s.dtype(), "rms_norm", T, sfx => {
        let x = input::<T>(s, l)?;
        let w = view::<T>(&wg, wl, dev, "the rms_norm weight")?;
        let mut y = output::<T>(dev, n)?;
        let h32 = u32_of(h, "row length")?;
        let f = func!(dev, "rmsnorm_fwd", sfx)?;
        let mut b = f.builder();
        b.arg(&x).arg(&w).arg(&mut y).arg(&h32).arg(&eps);
        unsafe { b.launch(rows_cfg(n / h)?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    })
}

pub(super) fn rms_norm_bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    w: &Tensor,
    eps: f32,
) -> Result<CudaStorage> {
    let dev = &s1.device;
    let n = l1.shape().elem_count();
    let h = l1.dims().last().copied().unwrap_or(1);
    let (wg, wl) = w.storage_and_layout();
    by_dtype!(s1.dtype(), "rms_norm backward", T, sfx => {
        let (x, dy) = (input::<T>(s1, l1)?, input::<T>(s2, l2)?);
        let w = view::<T>(&wg, wl, dev, "the rms_norm weight")?;
        let mut dx = output::<T>(dev, n)?;
        let h32 = u32_of(h, "row length")?;
        let f = func!(dev, "rmsnorm_bwd", sfx)?;
        let mut b = f.builder();
        b.arg(&x).arg(&w).arg(&dy).arg(&mut dx).arg(&h32).arg(&eps);
        unsafe { b.launch(rows_cfg(n / h)?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
    })
}

pub(super) fn rope(
    s: &CudaStorage,
    l: &Layout,
    cos: &Tensor,
    sin: &Tensor,
    (heads, t_len, d, r, table_stride): RopeGeometry,
    backward: bool,
) -> Result<CudaStorage> {
    let dev = &s.device;
    let n = l.shape().elem_count();
    let (cg, cl) = cos.storage_and_layout();
    let (sg, sl) = sin.storage_and_layout();
    let name = if backward { "rope_bwd" } else { "rope_fwd" };
    by_dtype!(s.dtype(), "rope", T, sfx => {
        let x = input::<T>(s, l)?;
        let c = view::<T>(&cg, cl, dev, "the rope cos table")?;
        let sn = view::<T>(&sg, sl, dev, "the rope sin table")?;
        let mut y = output::<T>(dev, n)?;
        let n64 = n as u64;
        let (heads, t_len) = (u32_of(heads, "heads")?, u32_of(t_len, "tokens")?);
        let (d, r, cbs) = (u32_of(d, "head dim")?, u32_of(r, "rotary dim")?, u32_of(table_stride, "table stride")?);
        let f = func!(dev, name, sfx)?;
        let mut b = f.builder();
        b.arg(&x).arg(&c).arg(&sn).arg(&mut y);
        b.arg(&n64).arg(&heads).arg(&t_len).arg(&d).arg(&r).arg(&cbs);
        unsafe { b.launch(elems_cfg(n)?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    })
}

pub(super) fn swiglu_fwd(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    let dev = &s.device;
    let n = l.shape().elem_count() / 2;
    let inter = l.dims().last().copied().unwrap_or(0) / 2;
    by_dtype!(s.dtype(), "swiglu", T, sfx => {
        let gu = input::<T>(s, l)?;
        let mut y = output::<T>(dev, n)?;
        let (n64, inter) = (n as u64, u32_of(inter, "intermediate size")?);
        let f = func!(dev, "swiglu_fwd", sfx)?;
        let mut b = f.builder();
        b.arg(&gu).arg(&mut y).arg(&n64).arg(&inter);
        unsafe { b.launch(elems_cfg(n)?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    })
}

pub(super) fn swiglu_bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
) -> Result<CudaStorage> {
    let dev = &s1.device;
    let n = l1.shape().elem_count() / 2;
    let inter = l1.dims().last().copied().unwrap_or(0) / 2;
    by_dtype!(s1.dtype(), "swiglu backward", T, sfx => {
        let (gu, dy) = (input::<T>(s1, l1)?, input::<T>(s2, l2)?);
        let mut dgu = output::<T>(dev, 2 * n)?;
        let (n64, inter) = (n as u64, u32_of(inter, "intermediate size")?);
        let f = func!(dev, "swiglu_bwd", sfx)?;
        let mut b = f.builder();
        b.arg(&gu).arg(&dy).arg(&mut dgu).arg(&n64).arg(&inter);
        unsafe { b.launch(elems_cfg(n)?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dgu, dev.clone()))
    })
}

// SAFETY: a plain #[repr(C)] struct of 4-byte scalars, laid out as the C struct it mirrors.
unsafe impl DeviceRepr for SoftmaxRowsArg {}

pub(super) fn softmax_fwd(
    s: &CudaStorage,
    l: &Layout,
    mask: Option<&Tensor>,
    g: SoftmaxRows,
) -> Result<CudaStorage> {
    let dev = &s.device;
    let n = l.shape().elem_count();
    let guard = mask.map(|m| m.storage_and_layout());
    by_dtype!(s.dtype(), "softmax", T, sfx => {
        let x = input::<T>(s, l)?;
        // Without a mask the kernel never reads it: pass x.
        let m = match &guard {
            Some((mg, ml)) => view::<T>(mg, ml, dev, "the attention mask")?,
            None => input::<T>(s, l)?,
        };
        let mut y = output::<T>(dev, n)?;
        let arg = SoftmaxRowsArg::new(g, guard.is_some())?;
        let f = func!(dev, "softmax_fwd", sfx)?;
        let mut b = f.builder();
        b.arg(&x).arg(&m).arg(&mut y).arg(&arg);
        unsafe { b.launch(rows_cfg(n / g.len)?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    })
}

pub(super) fn softmax_bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    mask: Option<&Tensor>,
    g: SoftmaxRows,
) -> Result<CudaStorage> {
    let dev = &s1.device;
    let n = l1.shape().elem_count();
    let guard = mask.map(|m| m.storage_and_layout());
    by_dtype!(s1.dtype(), "softmax backward", T, sfx => {
        let (x, dy) = (input::<T>(s1, l1)?, input::<T>(s2, l2)?);
        let m = match &guard {
            Some((mg, ml)) => view::<T>(mg, ml, dev, "the attention mask")?,
            None => input::<T>(s1, l1)?,
        };
        let mut dx = output::<T>(dev, n)?;
        let arg = SoftmaxRowsArg::new(g, guard.is_some())?;
        let f = func!(dev, "softmax_bwd", sfx)?;
        let mut b = f.builder();
        b.arg(&x).arg(&m).arg(&dy).arg(&mut dx).arg(&arg);
        unsafe { b.launch(rows_cfg(n / g.len)?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
    })
}

pub(super) fn xent_fwd(s: &CudaStorage, l: &Layout, targets: &Tensor) -> Result<CudaStorage> {
    let dev = &s.device;
    let (rows, vocab) = l.shape().dims2()?;
    let (tg, tl) = targets.storage_and_layout();
    by_dtype!(s.dtype(), "cross_entropy", T, sfx => {
        let x = input::<T>(s, l)?;
        let t = view::<u32>(&tg, tl, dev, "the targets")?;
        let mut loss = output::<f32>(dev, rows)?;
        let v32 = u32_of(vocab, "vocabulary")?;
        let f = func!(dev, "xent_fwd", sfx)?;
        let mut b = f.builder();
        b.arg(&x).arg(&t).arg(&mut loss).arg(&v32);
        unsafe { b.launch(rows_cfg(rows)?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(loss, dev.clone()))
    })
}

pub(super) fn xent_bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    targets: &Tensor,
) -> Result<CudaStorage> {
    let dev = &s1.device;
    let (rows, vocab) = l1.shape().dims2()?;
    let (tg, tl) = targets.storage_and_layout();
    let g = input::<f32>(s2, l2)?;
    by_dtype!(s1.dtype(), "cross_entropy backward", T, sfx => {
        let x = input::<T>(s1, l1)?;
        let t = view::<u32>(&tg, tl, dev, "the targets")?;
        let mut dx = output::<T>(dev, rows * vocab)?;
        let v32 = u32_of(vocab, "vocabulary")?;
        let f = func!(dev, "xent_bwd", sfx)?;
        let mut b = f.builder();
        b.arg(&x).arg(&t).arg(&g).arg(&mut dx).arg(&v32);
        unsafe { b.launch(rows_cfg(rows)?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
    })
}

/// A grid-stride loop over `n` elements.
fn grid_stride_cfg(n: usize) -> Result<LaunchConfig> {
    Ok(launch::grid_stride(n, launch::MAX_STRIDE_BLOCKS)?.into())
}

pub(super) fn dropout(s: &CudaStorage, l: &Layout, op: Dropout) -> Result<CudaStorage> {
    let dev = &s.device;
    let n = l.shape().elem_count();
    by_dtype!(s.dtype(), "dropout", T, sfx => {
        let x = input::<T>(s, l)?;
        let mut y = output::<T>(dev, n)?;
        let n64 = n as u64;
        let f = func!(dev, "dropout", sfx)?;
        let mut b = f.builder();
        b.arg(&x).arg(&mut y).arg(&n64).arg(&op.seed).arg(&op.threshold).arg(&op.scale);
        b.arg(&op.len).arg(&op.rows.first).arg(&op.rows.step);
        unsafe { b.launch(grid_stride_cfg(n)?) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    })
}
