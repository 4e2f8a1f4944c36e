//! The frozen base weight of a linear layer: dense in the compute dtype, or 4-bit NF4/FP4 that is
//! dequantized on the fly by `qlora-quant`'s op (whose backward dequantizes again).

use candle_core::{DType, Result, Tensor};
use qlora_quant::Nf4Tensor;

/// A frozen `[out, in]` weight.
#[derive(Debug, Clone)]
pub enum BaseWeight {
    Dense(Tensor),
    Nf4(Nf4Tensor),
}

impl BaseWeight {
    /// `x · Wᵀ` for `x: [.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) => {
                let dims = x.dims().to_vec();
                let (out, inp) = w.dims2()?;
                let x2 = x.reshape(((), inp))?;
                let mut out_dims = dims;
                *out_dims.last_mut().expect("x has dims") = out;
                x2.matmul(&w.t()?)?.reshape(out_dims)
            }
            Self::Nf4(w) => qlora_quant::nf4_linear(x, w).map_err(candle_core::Error::wrap),
        }
    }

    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense(w) => w.dims2(),
            Self::Nf4(w) => w.dims2().map_err(candle_core::Error::wrap),
        }
    }

    /// The weight as a dense tensor in `dtype` (a fresh dequantization for NF4).
    pub fn to_dense(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Dense(w) => w.to_dtype(dtype),
            Self::Nf4(w) => w
                .dequantize(DType::F32)
                .map_err(candle_core::Error::wrap)?
                .to_dtype(dtype),
        }
    }
}
