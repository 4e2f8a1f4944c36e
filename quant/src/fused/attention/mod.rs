//! Fused attention for training: `o = softmax(q·kᵀ · scale + mask) · v`, differentiable in q, k
//! and v, in O(T) memory (no `[T, Tk]` scores or probabilities are stored; the backward recomputes
//! them from per-row statistics). Grouped-query attention is handled inside (query head `h` reads
//! key/value head `h / (H / Hk)`), so k and v need no expansion.
//!
//! Shapes: `q [B, H, T, D]`, `k, v [B, Hk, Tk, D]`, `mask [B or 1, 1, T, Tk]` additive (0 or −∞,
//! a constant), `o [B, H, T, D]`, `D ≤ 256`. Derivation (rows i of q, j of k), with
//! `s_ij = scale · q_i·k_j + mask_ij`, `p_ij = softmax_j(s_ij)`, `o_i = Σ_j p_ij v_j`:
//!
//! ```text
//! dv_j = Σ_i p_ij do_i        dp_ij = do_i·v_j        ds_ij = p_ij (dp_ij − Δ_i),  Δ_i = do_i·o_i
//! dq_i = scale Σ_j ds_ij k_j  dk_j = scale Σ_i ds_ij q_i
//! ```
//! (`Δ_i = Σ_j p_ij dp_ij` because `o_i = Σ_j p_ij v_j`.) The backward runs three ops on `do`: the
//! row statistics `(L_i = log Σ_j exp s_ij, Δ_i)`, then `dq` (a pass over keys per query row) and
//! `dk | dv` (a pass over queries per key row). All arithmetic is f32.
//!
//! [`attention_ref`] is the composition; [`attention_fused`] runs the kernels on CUDA and their
//! loops on the CPU; [`attention_blocked`] computes the same function chunk by chunk through the
//! device's matmul.

mod blocked;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "emulate")]
mod emu;
mod slices;

pub use blocked::{BlockedMemory, Blocking, CHUNK_BYTES, CPU_CHUNK_BYTES, WAVE_BYTES};

use super::{check_constant, check_float, softmax_last_dim_ref};
use crate::cpu::DequantOut;
use candle_core::{CpuStorage, CustomOp3, D, Layout, Result, Shape, Tensor, bail};

/// Largest head dimension the kernels take (8 values per lane of a warp).
pub const MAX_HEAD_DIM: usize = 256;

/// The composition: k and v repeated over the query heads of their group, scores, scale (candle's
/// affine), mask, softmax in f32 for half types, times v.
pub fn attention_ref(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, _, d) = q.dims4()?;
    let (_, hk, tk, _) = k.dims4()?;
    let rep = h / hk.max(1);
    let expand = |x: &Tensor| -> Result<Tensor> {
        if rep == 1 {
            Ok(x.clone())
        } else {
            x.unsqueeze(2)?
                .broadcast_as((b, hk, rep, tk, d))?
                .reshape((b, h, tk, d))
        }
    };
    let (k, v) = (expand(k)?, expand(v)?);
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    softmax_last_dim_ref(&scores)?.matmul(&v)
}

/// `softmax(q·kᵀ · scale + mask) · v` through the fused ops (kernels on CUDA, their loops on the
/// CPU); see the module docs for shapes.
pub fn attention_fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    attention_fused_known(q, k, v, mask, scale, None)
}

/// [`attention_fused`] whose output `known` an earlier forward of the same inputs computed: it is
/// handed over instead of computed, and the backward is the op's (selective recomputation).
pub fn attention_fused_known(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    known: Option<&Tensor>,
) -> Result<Tensor> {
    let s = check(q, k, v, mask, Some(MAX_HEAD_DIM))?;
    let mask_batch_stride = match mask {
        Some(m) if m.dim(0)? != 1 => s.t * s.tk,
        _ => 0,
    };
    let geom = Geom {
        b: s.b,
        h: s.h,
        hk: s.hk,
        t: s.t,
        tk: s.tk,
        d: s.d,
        mask_batch_stride,
        scale: scale as f32,
    };
    let op = Attention {
        mask: mask.map(Tensor::contiguous).transpose()?,
        geom,
    };
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    match known {
        None => q.contiguous()?.apply_op3(&k, &v, op),
        Some(out) => {
            let out = super::known::known_output("attention", out, q, q.dims())?;
            q.contiguous()?
                .apply_op3(&k, &v, super::known::Known { op, out })
        }
    }
}

/// `softmax(q·kᵀ · scale + mask) · v` computed in chunks of heads and query rows with the device's
/// matmul (tensor cores on CUDA) and the fused masked softmax between the products (see
/// `attention/blocked.rs`): O(chunk) memory, no head-dimension limit. `blocking.causal` promises
/// that the mask hides key `j` from query `i` whenever `j > i + (Tk − T)` (it may hide more), so
/// whole key blocks can be skipped.
pub fn attention_blocked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    blocking: Blocking,
) -> Result<Tensor> {
    blocked::attention(q, k, v, mask, scale, blocking, None)
}

/// [`attention_blocked`] whose output `known` an earlier forward of the same inputs computed: it
/// is handed over instead of computed, and the backward is the op's (selective recomputation).
pub fn attention_blocked_known(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    blocking: Blocking,
    known: Option<&Tensor>,
) -> Result<Tensor> {
    blocked::attention(q, k, v, mask, scale, blocking, known)
}

/// The sizes of an attention call.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shapes {
    pub b: usize,
    pub h: usize,
    pub hk: usize,
    pub t: usize,
    pub tk: usize,
    pub d: usize,
}

/// Checks q `[B, H, T, D]`, k and v `[B, Hk, Tk, D]` (Hk dividing H, D ≤ `max_d`), one float
/// dtype, and a constant mask `[B or 1, 1, T, Tk]`.
fn check(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    max_d: Option<usize>,
) -> Result<Shapes> {
    check_float("attention", q)?;
    let (b, h, t, d) = q.dims4()?;
    let (kb, hk, tk, kd) = k.dims4()?;
    let fits = kb == b && kd == d && v.dims() == k.dims() && hk > 0 && h % hk == 0;
    let max_d = max_d.unwrap_or(usize::MAX);
    if !fits || d == 0 || d > max_d || tk == 0 || t == 0 {
        bail!(
            "attention: q {:?}, k {:?}, v {:?}: want q [B, H, T, D], k and v [B, Hk, Tk, D] with \
             Hk dividing H, 0 < D{}",
            q.dims(),
            k.dims(),
            v.dims(),
            if max_d == usize::MAX {
                String::new()
            } else {
                format!(" ≤ {max_d}")
            }
        );
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        bail!("attention: q, k and v must share a dtype");
    }
    if let Some(m) = mask {
        check_constant("attention mask", q, m, q.dtype())?;
        let (mb, one, mt, mk) = m.dims4()?;
        if one != 1 || mt != t || mk != tk || !(mb == 1 || mb == b) {
            bail!(
                "attention: mask {:?}; want [{b} or 1, 1, {t}, {tk}]",
                m.dims()
            );
        }
    }
    Ok(Shapes { b, h, hk, t, tk, d })
}

/// Sizes of one attention call (`AttnGeom` in attention.cu, less `has_mask`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Geom {
    pub b: usize,
    pub h: usize,
    pub hk: usize,
    pub t: usize,
    pub tk: usize,
    pub d: usize,
    pub mask_batch_stride: usize,
    pub scale: f32,
}

impl Geom {
    fn rep(&self) -> usize {
        self.h / self.hk
    }
    fn mask_at<T: DequantOut>(&self, mask: Option<&[T]>, b: usize, i: usize, j: usize) -> f32 {
        mask.map_or(0.0, |m| {
            m[b * self.mask_batch_stride + i * self.tk + j].to_f32()
        })
    }
    /// Rows of `[B, Hk, Tk]` → `(b, kh, j)`; of `[B, H, T]` → `(b, h, i)`.
    fn split(&self, row: usize, heads: usize, len: usize) -> (usize, usize, usize) {
        (row / len / heads, (row / len) % heads, row % len)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    mask: Option<Tensor>,
    geom: Geom,
}

/// The parts of the backward, each applied to `do` and carrying what it reads.
#[derive(Debug, Clone)]
enum Part {
    /// f32 `[B·H·T, 2]`: `(L_i, Δ_i)`.
    Stats { q: Tensor, k: Tensor, o: Tensor },
    /// `dq [B, H, T, D]`.
    Dq {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        stats: Tensor,
    },
    /// `dk | dv [B, Hk, Tk, 2D]`.
    Dkv {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        stats: Tensor,
    },
}

#[derive(Debug, Clone)]
struct AttentionBwd {
    part: Part,
    mask: Option<Tensor>,
    geom: Geom,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "qlora-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        #[cfg(feature = "emulate")]
        if crate::emu::active() {
            let o = emu::forward((s1, l1), (s2, l2), (s3, l3), self.mask.as_ref(), self.geom)?;
            return Ok((o, l1.shape().clone()));
        }
        let o = cpu::forward((s1, l1), (s2, l2), (s3, l3), self.mask.as_ref(), self.geom)?;
        Ok((o, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let o = cuda::forward((s1, l1), (s2, l2), (s3, l3), self.mask.as_ref(), self.geom)?;
        Ok((o, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dout = dout.contiguous()?;
        let part = |part: Part| AttentionBwd {
            part,
            mask: self.mask.clone(),
            geom: self.geom,
        };
        let (q, k, v) = (q.clone(), k.clone(), v.clone());
        let stats = dout.apply_op1_no_bwd(&part(Part::Stats {
            q: q.clone(),
            k: k.clone(),
            o: o.contiguous()?,
        }))?;
        let dq = dout.apply_op1_no_bwd(&part(Part::Dq {
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            stats: stats.clone(),
        }))?;
        let dkv = dout.apply_op1_no_bwd(&part(Part::Dkv { q, k, v, stats }))?;
        let d = self.geom.d;
        let dk = dkv.narrow(D::Minus1, 0, d)?.contiguous()?;
        let dv = dkv.narrow(D::Minus1, d, d)?.contiguous()?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl AttentionBwd {
    fn out_shape(&self) -> Shape {
        let g = self.geom;
        match self.part {
            Part::Stats { .. } => Shape::from((g.b * g.h * g.t, 2)),
            Part::Dq { .. } => Shape::from((g.b, g.h, g.t, g.d)),
            Part::Dkv { .. } => Shape::from((g.b, g.hk, g.tk, 2 * g.d)),
        }
    }
}

custom_op1!(AttentionBwd, |self, l| {
    name: match self.part {
        Part::Stats { .. } => "qlora-attention-stats",
        Part::Dq { .. } => "qlora-attention-dq",
        Part::Dkv { .. } => "qlora-attention-dkv",
    },
    fwd: backward(self),
    shape: self.out_shape(),
});
