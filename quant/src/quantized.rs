//! [`Quantized`]: one 4-bit tensor on the host, holding what bitsandbytes' `Params4bit` and
//! `QuantState` hold (packed codes, absmax plain or double-quantized, block size, type, the original
//! shape and dtype).

use crate::backend::BnbBackend;
use crate::cpu::{self, DequantOut};
use crate::format::{Blocksize, QuantType, n_blocks, packed_len};
use crate::nested::{self, NestedAbsmax};
use crate::{QuantError, Result};
use candle_core::DType;
use std::borrow::Cow;

/// Per-block absmax: plain f32, or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Nested(NestedAbsmax),
}

impl Absmax {
    /// Number of 4-bit blocks described.
    pub fn n_blocks(&self) -> usize {
        match self {
            Self::Plain(a) => a.len(),
            Self::Nested(n) => n.codes.len(),
        }
    }

    /// The f32 absmax of every block (decoded when nested).
    pub fn decoded(&self) -> Cow<'_, [f32]> {
        match self {
            Self::Plain(a) => Cow::Borrowed(a),
            Self::Nested(n) => Cow::Owned(n.decode()),
        }
    }
}

/// A 4-bit quantized tensor on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    pub quant_type: QuantType,
    pub blocksize: Blocksize,
    /// The original shape, e.g. `[out, in]` for a linear weight.
    pub shape: Vec<usize>,
    /// The dtype the tensor was quantized from and dequantizes to by default.
    pub dtype: DType,
    /// `packed_len(n_elems)` bytes, element `2i` in the high nibble.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

impl Quantized {
    /// Quantizes the row-major values `x` (already widened losslessly to f32 from `dtype`) to the
    /// bytes bitsandbytes' CUDA kernels write (the default [`BnbBackend`]).
    pub fn quantize(
        x: &[f32],
        shape: &[usize],
        dtype: DType,
        quant_type: QuantType,
        blocksize: Blocksize,
        double_quant: bool,
    ) -> Result<Self> {
        let backend = BnbBackend::default();
        Self::quantize_as(
            x,
            shape,
            dtype,
            quant_type,
            blocksize,
            double_quant,
            backend,
        )
    }

    /// [`Self::quantize`] reproducing `backend`'s bytes.
    pub fn quantize_as(
        x: &[f32],
        shape: &[usize],
        dtype: DType,
        quant_type: QuantType,
        blocksize: Blocksize,
        double_quant: bool,
        backend: BnbBackend,
    ) -> Result<Self> {
        check_source_dtype(dtype)?;
        let n_elems: usize = shape.iter().product();
        if n_elems != x.len() {
            return Err(QuantError::Shape {
                shape: shape.to_vec(),
                n_values: x.len(),
            });
        }
        let q = cpu::quantize(x, quant_type, blocksize, backend)?;
        let absmax = if double_quant {
            Absmax::Nested(nested::double_quant(&q.absmax, backend))
        } else {
            Absmax::Plain(q.absmax)
        };
        Ok(Self {
            quant_type,
            blocksize,
            shape: shape.to_vec(),
            dtype,
            packed: q.packed,
            absmax,
        })
    }

    /// Number of elements of the original tensor.
    /// Saturates at `usize::MAX` (a shape read from a damaged file can overflow), which no
    /// buffer fits, so [`Quantized::validate`] rejects such a shape.
    pub fn n_elems(&self) -> usize {
        self.shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .unwrap_or(usize::MAX)
    }

    /// Checks that the buffers fit the shape and block size.
    pub fn validate(&self) -> Result<()> {
        let n = self.n_elems();
        cpu::check_lengths(&self.packed, self.absmax.n_blocks(), self.blocksize, n)?;
        if let Absmax::Nested(nested) = &self.absmax {
            let want = n_blocks(nested.codes.len(), crate::format::NESTED_BLOCK_ELEMS);
            if nested.nested_absmax.len() != want {
                return Err(QuantError::Length {
                    n_elems: n,
                    packed: self.packed.len(),
                    want_packed: packed_len(n),
                    absmax: nested.nested_absmax.len(),
                    want_absmax: want,
                });
            }
        }
        Ok(())
    }

    /// Dequantizes every element (fast path).
    pub fn dequantize<T: DequantOut>(&self) -> Result<Vec<T>> {
        cpu::dequantize(
            &self.packed,
            &self.absmax.decoded(),
            self.quant_type,
            self.blocksize,
            self.n_elems(),
        )
    }
}

/// The dtypes bitsandbytes quantizes from (`quantize_4bit` accepts f32, bf16, f16).
pub fn check_source_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 => Ok(()),
        other => Err(QuantError::UnsupportedDtype(other)),
    }
}
