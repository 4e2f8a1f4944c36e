//! DoRA, weight-decomposed LoRA (Liu et al. 2024), as PEFT computes it (`tuners/lora/dora.py`,
//! `DoraLinearLayer`; `tuners/lora/layer.py`, `Linear.forward`; facts and sources in
//! docs/formats.md). Each adapted linear gains a trained magnitude `m: [out]` that starts at the row
//! norms of the frozen base, `m_j = ‖W_j,:‖₂` (B = 0 at init), and the layer computes
//!
//! ```text
//! g = m / ‖W + s·B·A‖_row                (the norm detached: no gradient flows through it)
//! y = g ⊙ (W x + s·B·A x)                (no dropout, or evaluation)
//! y = W x + (g − 1) ⊙ (W·drop(x)) + g ⊙ s·B·A·drop(x)     (dropout in training: a second base product)
//! ```
//!
//! The row norms never need the dense `W`: with `P = A·Wᵀ` (`[r, out]`, the base's own product with
//! `A` as its input: NF4 tiles dequantized by the same op, CPU fast path or CUDA kernel, as any
//! activation) and `G = A·Aᵀ` (`[r, r]`),
//!
//! ```text
//! ‖W_j + s·(BA)_j‖² = ‖W_j‖² + 2s·Σ_k B_jk P_kj + s²·Σ_k (B·G)_jk B_jk
//! ```
//!
//! where `‖W_j‖²` is a constant of the frozen base, summed once in f64 from the dequantized rows
//! ([`qlora_quant::Nf4Tensor::row_sq_norms`]). The merge (`export`) is PEFT's `merge_safe`:
//! `W' = diag(m / ‖W + ΔW‖_row)·(W + ΔW)`, the norm taken over the merged dense rows.

use super::Adapter;
use crate::model::linear::BaseWeight;
use candle_core::{DType, Result, Tensor, Var};

/// A DoRA layer's own state beside its adapter's `A` and `B`.
#[derive(Debug, Clone)]
pub struct Dora {
    /// `m`, `[out]`, trained, in master precision.
    pub magnitude: Var,
    /// `‖W_j,:‖²` of the frozen (dequantized) base, `[out]`, master precision: a constant.
    pub base_sq_norms: Tensor,
}

impl Dora {
    /// A fresh magnitude for `base` (B = 0, so `m = ‖W_j‖`), in `master` precision.
    pub fn fresh(base: &BaseWeight, master: DType) -> Result<Self> {
        let sq = base_sq_norms(base, master)?;
        let m = sq.sqrt()?;
        Ok(Self {
            magnitude: Var::from_tensor(&m)?,
            base_sq_norms: sq,
        })
    }

    /// A saved magnitude `m: [out]` on `base`.
    pub fn with_magnitude(base: &BaseWeight, m: &Tensor, master: DType) -> Result<Self> {
        let (out, _) = base.dims()?;
        if m.dims() != [out] {
            candle_core::bail!(
                "a DoRA magnitude of shape {:?} does not fit a linear of {out} rows",
                m.dims()
            );
        }
        Ok(Self {
            magnitude: Var::from_tensor(&m.to_device(&base_device(base))?.to_dtype(master)?)?,
            base_sq_norms: base_sq_norms(base, master)?,
        })
    }
}

fn base_device(base: &BaseWeight) -> candle_core::Device {
    match base {
        BaseWeight::Dense(w) => w.device().clone(),
        BaseWeight::Nf4(w) => w.device().clone(),
    }
}

/// `‖W_j,:‖²` per row of the base, summed in f64, as a `[out]` tensor in `dtype` on the base's
/// device.
pub fn base_sq_norms(base: &BaseWeight, dtype: DType) -> Result<Tensor> {
    let device = base_device(base);
    let sq: Vec<f64> = match base {
        BaseWeight::Dense(w) => w.to_dtype(DType::F64)?.sqr()?.sum(1)?.to_vec1()?,
        BaseWeight::Nf4(w) => w.row_sq_norms().map_err(candle_core::Error::wrap)?,
    };
    let n = sq.len();
    Tensor::from_vec(sq, n, &device)?.to_dtype(dtype)
}

impl Adapter {
    /// `‖W + s·B·A‖` per row (`[out]`, master precision, detached), with `P = A·Wᵀ` taken through
    /// `base`'s product in `compute` precision (as PEFT casts the weight to the input's dtype).
    pub fn dora_weight_norm(&self, base: &BaseWeight, compute: DType) -> Result<Tensor> {
        let Some(d) = &self.dora else {
            candle_core::bail!("dora_weight_norm: `{}` is not a DoRA adapter", self.module)
        };
        let a = self.a.as_tensor().detach();
        let b = self.b.as_tensor().detach();
        let master = a.dtype();
        let p = base.forward(&a.to_dtype(compute)?)?.to_dtype(master)?; // [r, out]
        let cross = (&b * p.t()?)?.sum(1)?;
        let gram = a.matmul(&a.t()?)?; // [r, r]
        let quad = (b.matmul(&gram)? * &b)?.sum(1)?;
        let s = self.scale;
        let sq = ((&d.base_sq_norms + (cross * (2.0 * s))?)? + (quad * (s * s))?)?;
        sq.relu()?.sqrt()
    }

    /// DoRA's row factor `g = m / ‖W + s·B·A‖` in `dtype` (`m` tracked, the norm not), or `None`
    /// for a plain LoRA adapter.
    pub fn dora_scale(&self, base: &BaseWeight, dtype: DType) -> Result<Option<Tensor>> {
        let Some(d) = &self.dora else {
            return Ok(None);
        };
        let norm = self.dora_weight_norm(base, dtype)?;
        Ok(Some((d.magnitude.as_tensor() / norm)?.to_dtype(dtype)?))
    }
}

/// PEFT's DoRA merge of a dense `W + ΔW` (`[out, in]`, f32) with magnitude `m`:
/// `diag(m / ‖W + ΔW‖_row)·(W + ΔW)`.
pub fn merge(w_plus_delta: &Tensor, magnitude: &Tensor) -> Result<Tensor> {
    let norm = w_plus_delta.sqr()?.sum_keepdim(1)?.sqrt()?;
    let m = magnitude
        .to_dtype(w_plus_delta.dtype())?
        .reshape((norm.dim(0)?, 1))?;
    w_plus_delta.broadcast_mul(&(m / norm)?)
}
