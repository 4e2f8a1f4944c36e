//! candle custom ops over an [`Nf4Tensor`]: dequantization, and the 4-bit matmul that QLoRA's
//! frozen linears run.
//!
//! The linear `y = x · dequant(W)ᵀ` is a `CustomOp1` on `x` that carries the packed weight. Its
//! backward is the other orientation of the same op, `dx = dy · dequant(W)`, which dequantizes the
//! weight again: no dense `W` is kept between forward and backward and `W` gets no gradient
//! (it is not an input of the graph). Derivation: `y_mj = Σ_k x_mk W_jk`, so
//! `∂L/∂x_mk = Σ_j (∂L/∂y_mj) W_jk`, i.e. `dx = dy · W`; symmetrically the backward of `x · W` is
//! `dy · Wᵀ`.
//!
//! CPU: the weight is dequantized one tile at a time (rows of `W` for `x · Wᵀ`, columns for
//! `x · W`) into a per-task f32 buffer of at most [`TILE_ELEMS`] (or [`TILE_COLS_ELEMS`]) values and
//! multiplied with `gemm`,
//! tiles in parallel on rayon; peak extra memory is one tile per thread, never the dense matrix.
//! The tiles are as large as that allows and their count a multiple of the pool's threads: every
//! task re-packs `x` for gemm, so few large tiles cost less than many small ones (64-row tiles
//! spent 6 % of a training step packing), and equal shares keep every thread busy to the end.
//!
//! CUDA (`cuda` feature, `qlora_quant::cuda`): the weight is dequantized by our kernel into a temporary
//! of `x`'s dtype (f32, bf16 or f16), multiplied with one cuBLAS gemm, and freed; the backward runs
//! the same path in the other orientation. Half-precision `x` therefore meets a weight rounded to
//! its own dtype (cuBLAS accumulates in f32), where the CPU path multiplies in f32 throughout.

use crate::tensor::{CpuView, Nf4Tensor};
use crate::{QuantError, Result};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Most values of a dequantized row tile of `x · Wᵀ` (768 KiB of f32 per thread: the tile stays
/// in a core's L2 between its dequantization and its gemm; at one token, 4 MiB tiles made the
/// Phi-3-mini gate/up forward 1.5× slower).
pub const TILE_ELEMS: usize = 3 << 16;
/// Most values of a dequantized column tile of `x · W` (4 MiB of f32 per thread: each row segment
/// is a separate dequantization call and each tile re-packs `x`, so wider tiles pay off: 26 ms
/// instead of 34 ms for the Phi-3-mini gate/up backward at 128 tokens).
pub const TILE_COLS_ELEMS: usize = 1 << 20;
/// Most rows (or columns) of a tile.
const TILE_MAX: usize = 512;
/// Tile sizes are multiples of this (even starts keep each tile on a byte of packed codes).
const TILE_ALIGN: usize = 16;

/// The tile size along a dimension of `n`, whose tiles span `across` values each: at most
/// `TILE_MAX` and `elems / across`, a multiple of `TILE_ALIGN`, and as many tiles as a multiple
/// of the pool's threads allows.
pub(crate) fn tile_len(n: usize, across: usize, elems: usize) -> usize {
    tile_len_for(n, across, elems, rayon::current_num_threads())
}

/// [`tile_len`] for a pool of `threads`.
fn tile_len_for(n: usize, across: usize, elems: usize, threads: usize) -> usize {
    let threads = threads.max(1);
    let max = (elems / across.max(1)).clamp(TILE_ALIGN, TILE_MAX);
    let count = threads * n.div_ceil(threads * max).max(1);
    n.div_ceil(count).next_multiple_of(TILE_ALIGN)
}

/// Bytes of dequantized `W [out, in]` tiles that `x_wt` (`transposed`: the forward's
/// `x · Wᵀ`) or `x_w` (the backward's `dy · W`) hold at once on a pool of `threads`: one tile
/// buffer per worker (`for_each_init`), each `tile × across` f32 values. (`qlora plan` counts it.)
pub fn nf4_tile_bytes(out: usize, inp: usize, transposed: bool, threads: usize) -> u64 {
    let (n, across, elems) = if transposed {
        (out, inp, TILE_ELEMS)
    } else {
        (inp, out, TILE_COLS_ELEMS)
    };
    let tile = tile_len_for(n, across, elems, threads).min(n);
    let tasks = n.div_ceil(tile.max(1));
    (threads.max(1).min(tasks) * tile * across * 4) as u64
}

/// `y = x · dequant(W)ᵀ` for `x: [.., in]`, `W: [out, in]` → `y: [.., out]`, differentiable in `x`.
pub fn nf4_linear(x: &Tensor, w: &Nf4Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Nf4Matmul {
        w: w.clone(),
        transposed: true,
    })?)
}

/// `y = x · dequant(W)` for `x: [.., out]`, `W: [out, in]` → `y: [.., in]`, differentiable in `x`.
pub fn nf4_matmul(x: &Tensor, w: &Nf4Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Nf4Matmul {
        w: w.clone(),
        transposed: false,
    })?)
}

/// The 4-bit matmul op: `x · dequant(W)ᵀ` when `transposed`, else `x · dequant(W)`.
#[derive(Debug, Clone)]
pub struct Nf4Matmul {
    pub w: Nf4Tensor,
    pub transposed: bool,
}

impl Nf4Matmul {
    /// `(k, n)`: the inner dimension `x` must end with, and the output's last dimension.
    fn dims(&self) -> candle_core::Result<(usize, usize)> {
        let (out, inp) = self.w.dims2().map_err(to_candle)?;
        Ok(if self.transposed {
            (inp, out)
        } else {
            (out, inp)
        })
    }

    /// `((m, k, n), y's shape)` for `x` of `layout` (`[.., k]`, m rows): `x` must be contiguous
    /// and end with `k`.
    fn plan(&self, layout: &Layout) -> candle_core::Result<((usize, usize, usize), Shape)> {
        let (k, n) = self.dims()?;
        let dims = layout.shape().dims();
        if dims.last() != Some(&k) || !layout.is_contiguous() {
            candle_core::bail!(
                "{}: x {:?} must be contiguous and end with {k}",
                self.name(),
                dims
            );
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("x has a last dim") = n;
        let m = layout.shape().elem_count() / k;
        Ok(((m, k, n), Shape::from_dims(&out_dims)))
    }

    /// Half-precision input: widened to f32, computed in f32, rounded once at the end.
    fn compute_half<T: crate::cpu::DequantOut>(
        &self,
        x: &[T],
        m: usize,
    ) -> candle_core::Result<Vec<T>> {
        let x: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        Ok(self.compute(&x, m)?.into_iter().map(T::from_f32).collect())
    }

    fn compute(&self, x: &[f32], m: usize) -> candle_core::Result<Vec<f32>> {
        let (out, inp) = self.w.dims2().map_err(to_candle)?;
        self.w
            .with_cpu(|view| {
                if inp % 2 == 1 {
                    dense_fallback(&view, x, m, out, inp, self.transposed)
                } else if self.transposed {
                    x_wt(&view, x, m, out, inp)
                } else {
                    x_w(&view, x, m, out, inp)
                }
            })
            .map_err(to_candle)
    }
}

impl CustomOp1 for Nf4Matmul {
    fn name(&self) -> &'static str {
        if self.transposed {
            "nf4-linear"
        } else {
            "nf4-matmul"
        }
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ((m, k, _), shape) = self.plan(layout)?;
        let range = layout.start_offset()..layout.start_offset() + m * k;
        let y = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.compute(&v[range], m)?),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.compute_half(&v[range], m)?),
            CpuStorage::F16(v) => CpuStorage::F16(self.compute_half(&v[range], m)?),
            other => {
                let dtype = candle_core::backend::BackendStorage::dtype(other);
                candle_core::bail!("{}: unsupported dtype {dtype:?}", self.name())
            }
        };
        Ok((y, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (mkn, shape) = self.plan(layout)?;
        let y = crate::cuda::nf4_matmul(&self.w, self.transposed, storage, layout, mkn)?;
        Ok((y, shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let other = Self {
            w: self.w.clone(),
            transposed: !self.transposed,
        };
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&other)?))
    }
}

/// Raw output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of columns of the output.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer `offset` elements in (taking `self` whole, so closures capture the Send wrapper).
    ///
    /// # Safety
    /// `offset` must lie inside the output buffer.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: the caller keeps `offset` inside the buffer.
        unsafe { self.0.add(offset) }
    }
}

/// `y[m, out] = x[m, in] · Wᵀ`: tasks over row tiles of W, each writing its columns of y.
pub(crate) fn x_wt(view: &CpuView<'_>, x: &[f32], m: usize, out: usize, inp: usize) -> Vec<f32> {
    if inp == 0 {
        return vec![0f32; m * out];
    }
    // Not zero-filled: the tiles' gemms (read_dst = false) write every element before set_len.
    let mut y = Vec::<f32>::with_capacity(m * out);
    let y_ptr = OutPtr(y.as_mut_ptr());
    let tile = tile_len(out, inp, TILE_ELEMS);
    (0..out.div_ceil(tile))
        .into_par_iter()
        .for_each_init(Vec::new, |buf, t| {
            let (r0, rows) = (t * tile, tile.min(out - t * tile));
            buf.resize(rows * inp, 0f32);
            view.dequantize_slice(r0 * inp, buf);
            // SAFETY: dst covers rows 0..m, columns [r0, r0 + rows) of y (row stride `out`),
            // disjoint across tasks; lhs is x [m, inp]; rhs is bufᵀ [inp, rows].
            unsafe {
                gemm::gemm(
                    m,
                    rows,
                    inp,
                    y_ptr.at(r0),
                    1,
                    out as isize,
                    false,
                    x.as_ptr(),
                    1,
                    inp as isize,
                    buf.as_ptr(),
                    inp as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    // SAFETY: the tiles cover all m × out elements (disjoint columns, every row), each written
    // by its gemm.
    unsafe { y.set_len(m * out) };
    y
}

/// `y[m, in] = x[m, out] · W`: tasks over column tiles of W (each row's segment dequantized),
/// each writing its columns of y.
pub(crate) fn x_w(view: &CpuView<'_>, x: &[f32], m: usize, out: usize, inp: usize) -> Vec<f32> {
    if out == 0 {
        return vec![0f32; m * inp];
    }
    // Not zero-filled: the tiles' gemms (read_dst = false) write every element before set_len.
    let mut y = Vec::<f32>::with_capacity(m * inp);
    let y_ptr = OutPtr(y.as_mut_ptr());
    let tile = tile_len(inp, out, TILE_COLS_ELEMS);
    (0..inp.div_ceil(tile))
        .into_par_iter()
        .for_each_init(Vec::new, |buf, t| {
            let (c0, cols) = (t * tile, tile.min(inp - t * tile));
            buf.resize(out * cols, 0f32);
            for (r, row) in buf.chunks_exact_mut(cols).enumerate() {
                view.dequantize_slice(r * inp + c0, row);
            }
            // SAFETY: dst covers rows 0..m, columns [c0, c0 + cols) of y (row stride `inp`), disjoint
            // across tasks; lhs is x [m, out]; rhs is buf [out, cols].
            unsafe {
                gemm::gemm(
                    m,
                    cols,
                    out,
                    y_ptr.at(c0),
                    1,
                    inp as isize,
                    false,
                    x.as_ptr(),
                    1,
                    out as isize,
                    buf.as_ptr(),
                    1,
                    cols as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    // SAFETY: the tiles cover all m × inp elements (disjoint columns, every row), each written
    // by its gemm.
    unsafe { y.set_len(m * inp) };
    y
}

/// Odd inner dimensions (rows not starting on a byte): dequantize the whole weight for this call.
fn dense_fallback(
    view: &CpuView<'_>,
    x: &[f32],
    m: usize,
    out: usize,
    inp: usize,
    transposed: bool,
) -> Vec<f32> {
    let mut w = vec![0f32; out * inp];
    view.dequantize_slice(0, &mut w);
    let (n, k) = if transposed { (out, inp) } else { (inp, out) };
    // rhs[k, n]: Wᵀ (strides cs = inp, rs = 1) or W (cs = 1, rs = inp).
    let (rhs_cs, rhs_rs) = if transposed {
        (inp as isize, 1)
    } else {
        (1, inp as isize)
    };
    let mut y = vec![0f32; m * n];
    // SAFETY: all pointers cover their full matrices with the strides given.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            rhs_cs,
            rhs_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
    y
}

/// Dequantization as a candle op (applied to the packed codes; no backward).
#[derive(Debug, Clone)]
pub struct Dequantize {
    pub w: Nf4Tensor,
    pub dtype: DType,
}

impl CustomOp1 for Dequantize {
    fn name(&self) -> &'static str {
        "nf4-dequantize"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        #[cfg(feature = "emulate")]
        if crate::emu::active() {
            let out = crate::emu::dequant::dequantize(&self.w, self.dtype)?;
            return Ok((out, self.w.shape().clone()));
        }
        let storage = self
            .w
            .with_cpu(|view| match self.dtype {
                DType::F32 => view.dequantize().map(CpuStorage::F32),
                DType::BF16 => view.dequantize().map(CpuStorage::BF16),
                DType::F16 => view.dequantize().map(CpuStorage::F16),
                other => Err(QuantError::UnsupportedDtype(other)),
            })
            .and_then(|r| r)
            .map_err(to_candle)?;
        Ok((storage, self.w.shape().clone()))
    }

    /// Applied to the packed codes themselves, so `storage` is the u8 code buffer.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let packed = storage
            .as_cuda_slice::<u8>()?
            .slice(layout.start_offset()..);
        let out = crate::cuda::dequantize_packed(&self.w, &packed, self.dtype, &storage.device)?;
        Ok((out, self.w.shape().clone()))
    }
}

pub(crate) fn to_candle(e: QuantError) -> candle_core::Error {
    match e {
        QuantError::Candle(e) => e,
        other => candle_core::Error::Msg(other.to_string()),
    }
}
