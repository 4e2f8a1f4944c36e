//! The fused ops as candle custom ops: forward on each device (`cpu.rs` loops, `cuda.rs` kernels),
//! backward as a second op (`*Bwd`, or the transposed rotation for RoPE). The tensors an op carries
//! are constants of the graph. Formulas: see [`super`].

use super::cpu;
#[cfg(feature = "cuda")]
use super::cuda;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

// ----- RMSNorm ------------------------------------------------------------------------------------
#[derive(Debug, Clone)]
pub(super) struct RmsNorm {
    pub(super) weight: Tensor,
    pub(super) eps: f32,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "qlora-rms-norm"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((
            cpu::rms_norm_fwd(s, l, &self.weight, self.eps)?,
            l.shape().clone(),
        ))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            cuda::rms_norm_fwd(s, l, &self.weight, self.eps)?,
            l.shape().clone(),
        ))
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &dy.contiguous()?,
            &RmsNormBwd(self.clone()),
        )?))
    }
}

/// `(x, dy) → dx` of [`RmsNorm`].
#[derive(Debug, Clone)]
pub(super) struct RmsNormBwd(RmsNorm);

impl CustomOp2 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "qlora-rms-norm-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dx = cpu::rms_norm_bwd(s1, l1, s2, l2, &self.0.weight, self.0.eps)?;
        Ok((dx, l1.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dx = cuda::rms_norm_bwd(s1, l1, s2, l2, &self.0.weight, self.0.eps)?;
        Ok((dx, l1.shape().clone()))
    }
}

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
    fn geometry(&self, l: &Layout) -> Result<(usize, usize, usize, usize, usize)> {
        let (_, heads, t, d) = l.shape().dims4()?;
        let (cb, _, _, r) = self.cos.dims4()?;
        Ok((heads, t, d, r, if cb == 1 { 0 } else { t * r }))
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        if self.backward {
            "qlora-rope-bwd"
        } else {
            "qlora-rope"
        }
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(l)?;
        let y = cpu::rope(s, l, &self.cos, &self.sin, g, self.backward)?;
        Ok((y, l.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = self.geometry(l)?;
        let y = cuda::rope(s, l, &self.cos, &self.sin, g, self.backward)?;
        Ok((y, l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let transpose = Self {
            backward: !self.backward,
            ..self.clone()
        };
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&transpose)?))
    }
}

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

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "qlora-swiglu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((cpu::swiglu_fwd(s, l)?, half_last(l)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::swiglu_fwd(s, l)?, half_last(l)))
    }
    fn bwd(&self, gu: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gu.apply_op2_no_bwd(&dy.contiguous()?, &SwiGluBwd)?))
    }
}

/// `(gu, dy) → dgu` of [`SwiGlu`].
#[derive(Debug, Clone, Copy)]
pub(super) struct SwiGluBwd;

impl CustomOp2 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "qlora-swiglu-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((cpu::swiglu_bwd(s1, l1, s2, l2)?, l1.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::swiglu_bwd(s1, l1, s2, l2)?, l1.shape().clone()))
    }
}

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

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "qlora-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = cpu::softmax_fwd(s, l, self.mask.as_ref(), self.rows(l)?)?;
        Ok((y, l.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = cuda::softmax_fwd(s, l, self.mask.as_ref(), self.rows(l)?)?;
        Ok((y, l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &dy.contiguous()?,
            &SoftmaxBwd(self.clone()),
        )?))
    }
}

/// `(x, dy) → dx` of [`Softmax`].
#[derive(Debug, Clone)]
pub(super) struct SoftmaxBwd(Softmax);

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "qlora-softmax-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let rows = self.0.rows(l1)?;
        let dx = cpu::softmax_bwd(s1, l1, s2, l2, self.0.mask.as_ref(), rows)?;
        Ok((dx, l1.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let rows = self.0.rows(l1)?;
        let dx = cuda::softmax_bwd(s1, l1, s2, l2, self.0.mask.as_ref(), rows)?;
        Ok((dx, l1.shape().clone()))
    }
}

// ----- Cross-entropy ------------------------------------------------------------------------------
#[derive(Debug, Clone)]
pub(super) struct CrossEntropy {
    pub(super) targets: Tensor,
}

fn rows_shape(l: &Layout) -> Result<Shape> {
    Ok(Shape::from(l.shape().dims2()?.0))
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "qlora-cross-entropy"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((cpu::xent_fwd(s, l, &self.targets)?, rows_shape(l)?))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::xent_fwd(s, l, &self.targets)?, rows_shape(l)?))
    }
    fn bwd(&self, logits: &Tensor, _loss: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        Ok(Some(
            logits.apply_op2_no_bwd(&g, &CrossEntropyBwd(self.clone()))?,
        ))
    }
}

/// `(logits, g) → dlogits` of [`CrossEntropy`], `g` the f32 gradient of each row's loss.
#[derive(Debug, Clone)]
pub(super) struct CrossEntropyBwd(CrossEntropy);

impl CustomOp2 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "qlora-cross-entropy-bwd"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((
            cpu::xent_bwd(s1, l1, s2, l2, &self.0.targets)?,
            l1.shape().clone(),
        ))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dx = cuda::xent_bwd(s1, l1, s2, l2, &self.0.targets)?;
        Ok((dx, l1.shape().clone()))
    }
}

// ----- Dropout ------------------------------------------------------------------------------------
/// Inverted dropout with the counter-based mask of [`super`]; its own backward (it is linear and
/// the mask depends on `(seed, index, p)` alone).
#[derive(Debug, Clone, Copy)]
pub(super) struct Dropout {
    pub(super) seed: u64,
    /// Element `i` is kept iff the top 24 bits of its hash are below this.
    pub(super) threshold: u32,
    /// `1 / keep` in f32, the factor of the kept elements.
    pub(super) scale: f32,
}

impl Dropout {
    /// The op for drop probability `p ∈ [0, 1)`.
    pub(super) fn new(p: f32, seed: u64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("dropout: p = {p} is outside [0, 1); use 0 for no dropout");
        }
        let keep = 1.0f32 - p;
        Ok(Self {
            seed,
            threshold: (keep * (1u32 << 24) as f32).round() as u32,
            scale: 1.0f32 / keep,
        })
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "qlora-dropout"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((cpu::dropout(s, l, *self)?, l.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((cuda::dropout(s, l, *self)?, l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(self)?))
    }
}
