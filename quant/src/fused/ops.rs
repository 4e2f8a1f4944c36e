//! The fused ops as candle custom ops: forward on each device (`cpu.rs` loops, `cuda.rs` kernels,
//! wired by `custom_op1!` / `custom_op2!` of `macros.rs`), backward as a second op (`*Bwd`, or the transposed
//! rotation for RoPE, or dropout itself). The tensors an op carries are constants of the graph.
//! Formulas: see [`super`].

use super::cpu;
#[cfg(feature = "cuda")]
use super::cuda;
#[cfg(feature = "emulate")]
use super::emu;
use candle_core::{CustomOp2, DType, Layout, Result, Shape, Tensor};

/// `dx` of a forward op: `op` applied to `(x, dy)`.
fn grad_by(x: &Tensor, dy: &Tensor, op: impl CustomOp2) -> Result<Option<Tensor>> {
    Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &op)?))
}

// ----- RMSNorm ------------------------------------------------------------------------------------
#[derive(Debug, Clone)]
pub(super) struct RmsNorm {
    pub(super) weight: Tensor,
    pub(super) eps: f32,
}

custom_op1!(RmsNorm, |self, l| {
    name: "qlora-rms-norm",
    fwd: rms_norm_fwd(&self.weight, self.eps),
    shape: l.shape().clone(),
    bwd(x, _y, dy): grad_by(x, dy, RmsNormBwd(self.clone())),
});

/// `(x, dy) → dx` of [`RmsNorm`].
#[derive(Debug, Clone)]
pub(super) struct RmsNormBwd(RmsNorm);

custom_op2!(RmsNormBwd, |self, l1| {
    name: "qlora-rms-norm-bwd",
    fwd: rms_norm_bwd(&self.0.weight, self.0.eps),
});

// ----- Rotary embedding ---------------------------------------------------------------------------
/// The rotation (`backward = false`) or its transpose, applied to the last dim.
#[derive(Debug, Clone)]
pub(super) struct Rope {
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    pub(super) backward: bool,
}

impl Rope {
    /// `(heads, T, D, R, batch stride of the tables)`.
    fn geometry(&self, l: &Layout) -> Result<cpu::RopeGeometry> {
        let (_, heads, t, d) = l.shape().dims4()?;
        let (cb, _, _, r) = self.cos.dims4()?;
        Ok((heads, t, d, r, if cb == 1 { 0 } else { t * r }))
    }
}

custom_op1!(Rope, |self, l| {
    name: if self.backward { "qlora-rope-bwd" } else { "qlora-rope" },
    fwd: rope(&self.cos, &self.sin, self.geometry(l)?, self.backward),
    shape: l.shape().clone(),
    bwd(_x, _y, dy): {
        let transpose = Self {
            backward: !self.backward,
            ..self.clone()
        };
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&transpose)?))
    },
});

// ----- SwiGLU -------------------------------------------------------------------------------------
#[derive(Debug, Clone, Copy)]
pub(super) struct SwiGlu;

fn half_last(l: &Layout) -> Shape {
    let mut dims = l.shape().dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last /= 2;
    }
    Shape::from_dims(&dims)
}

custom_op1!(SwiGlu, |self, l| {
    name: "qlora-swiglu",
    fwd: swiglu_fwd(),
    shape: half_last(l),
    bwd(gu, _y, dy): grad_by(gu, dy, SwiGluBwd),
});

/// `(gu, dy) → dgu` of [`SwiGlu`].
#[derive(Debug, Clone, Copy)]
pub(super) struct SwiGluBwd;

custom_op2!(SwiGluBwd, |self, l1| {
    name: "qlora-swiglu-bwd",
    fwd: swiglu_bwd(),
});

// ----- Softmax ------------------------------------------------------------------------------------
/// Softmax over the last dim of `x · scale + mask` (see [`super::attention_softmax`]).
#[derive(Debug, Clone)]
pub(super) struct Softmax {
    /// `[B or 1, 1, T, len]` for `x [B, heads, T, len]`, or none.
    pub(super) mask: Option<Tensor>,
    /// Already rounded to `x`'s dtype, as the composition's affine rounds it.
    pub(super) scale: f32,
}

impl Softmax {
    fn rows(&self, l: &Layout) -> Result<cpu::SoftmaxRows> {
        let len = l.shape().dims().last().copied().unwrap_or(1);
        let (t_len, heads, mask_batch_stride) = match &self.mask {
            Some(mask) => {
                let (_, heads, t, _) = l.shape().dims4()?;
                let stride = if mask.dim(0)? == 1 { 0 } else { t * len };
                (t, heads, stride)
            }
            None => (1, 1, 0),
        };
        Ok(cpu::SoftmaxRows {
            len,
            t_len,
            heads,
            mask_batch_stride,
            scale: self.scale,
        })
    }
}

custom_op1!(Softmax, |self, l| {
    name: "qlora-softmax",
    fwd: softmax_fwd(self.mask.as_ref(), self.rows(l)?),
    shape: l.shape().clone(),
    bwd(x, _y, dy): grad_by(x, dy, SoftmaxBwd(self.clone())),
});

/// `(x, dy) → dx` of [`Softmax`].
#[derive(Debug, Clone)]
pub(super) struct SoftmaxBwd(pub(super) Softmax);

custom_op2!(SoftmaxBwd, |self, l1| {
    name: "qlora-softmax-bwd",
    fwd: softmax_bwd(self.0.mask.as_ref(), self.0.rows(l1)?),
});

// ----- Cross-entropy ------------------------------------------------------------------------------
#[derive(Debug, Clone)]
pub(super) struct CrossEntropy {
    pub(super) targets: Tensor,
}

custom_op1!(CrossEntropy, |self, l| {
    name: "qlora-cross-entropy",
    fwd: xent_fwd(&self.targets),
    shape: Shape::from(l.shape().dims2()?.0),
    bwd(logits, _loss, g): grad_by(logits, &g.to_dtype(DType::F32)?, CrossEntropyBwd(self.clone())),
});

/// `(logits, g) → dlogits` of [`CrossEntropy`], `g` the f32 gradient of each row's loss.
#[derive(Debug, Clone)]
pub(super) struct CrossEntropyBwd(CrossEntropy);

custom_op2!(CrossEntropyBwd, |self, l1| {
    name: "qlora-cross-entropy-bwd",
    fwd: xent_bwd(&self.0.targets),
});

// ----- Dropout ------------------------------------------------------------------------------------
/// Inverted dropout with the counter-based mask of [`super`]; its own backward (it is linear and
/// the mask depends on `(seed, counter, p)` alone).
#[derive(Debug, Clone, Copy)]
pub(super) struct Dropout {
    pub(super) p: f32,
    pub(super) seed: u64,
    /// Element `i` is kept iff the top 24 bits of its counter's hash are below this.
    pub(super) threshold: u32,
    /// `1 / keep` in f32, the factor of the kept elements.
    pub(super) scale: f32,
    /// Elements per row (the counter of element `j` of row `b` is `(first + b·step) << 40 + j`).
    pub(super) len: u64,
    pub(super) rows: super::MaskRows,
}

impl Dropout {
    /// The op for drop probability `p ∈ [0, 1)` on rows of `len` elements placed at `rows`.
    pub(super) fn new(p: f32, seed: u64, len: u64, rows: super::MaskRows) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("dropout: p = {p} is outside [0, 1); use 0 for no dropout");
        }
        if len >= 1 << 40 {
            candle_core::bail!("dropout: rows of {len} elements exceed the mask's 2^40 per row");
        }
        let keep = 1.0f32 - p;
        Ok(Self {
            p,
            seed,
            threshold: (keep * (1u32 << 24) as f32).round() as u32,
            scale: 1.0f32 / keep,
            len: len.max(1),
            rows,
        })
    }

    /// The mask counter of element `i` (the contract of [`super`]).
    #[inline(always)]
    pub(super) fn counter(&self, i: u64) -> u64 {
        let (b, j) = (i / self.len, i % self.len);
        (self.rows.first.wrapping_add(b.wrapping_mul(self.rows.step)) << 40).wrapping_add(j)
    }
}

custom_op1!(Dropout, |self, l| {
    name: "qlora-dropout",
    fwd: dropout(*self),
    shape: l.shape().clone(),
    bwd(_x, _y, dy): Ok(Some(dy.contiguous()?.apply_op1_no_bwd(self)?)),
});
