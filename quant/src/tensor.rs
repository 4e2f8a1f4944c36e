//! [`Nf4Tensor`]: a 4-bit weight living on a candle [`Device`]: the packed codes and the quant state
//! as device tensors (u8 codes, f32 or nested absmax), plus the metadata that describes them.
//! The name says NF4 because that is what QLoRA uses; FP4 rides in the same type.

use crate::cpu::{self, DequantOut};
use crate::format::{Blocksize, NESTED_BLOCK_ELEMS, QuantType, n_blocks, packed_len};
use crate::nested::NestedAbsmax;
use crate::quantized::{Absmax, Quantized};
use crate::{QuantError, Result};
use candle_core::{CpuStorage, DType, Device, Layout, Shape, Storage, Tensor};
use std::borrow::Cow;

/// Absmax on the device.
#[derive(Debug, Clone)]
pub enum AbsmaxTensor {
    /// f32 `[n_blocks]`.
    Plain(Tensor),
    /// u8 codes `[n_blocks]`, f32 `nested_absmax` `[ceil(n_blocks / 256)]`, and the offset.
    Nested {
        codes: Tensor,
        nested_absmax: Tensor,
        offset: f32,
    },
}

/// A frozen 4-bit weight on a device. Cloning is cheap (candle tensors are reference counted).
#[derive(Debug, Clone)]
pub struct Nf4Tensor {
    /// u8 `[packed_len(n_elems)]`, element `2i` in the high nibble.
    packed: Tensor,
    absmax: AbsmaxTensor,
    quant_type: QuantType,
    blocksize: Blocksize,
    /// The original shape, `[out, in]` for a linear weight.
    shape: Shape,
    /// The dtype the weight was quantized from.
    dtype: DType,
}

impl Nf4Tensor {
    /// Moves a host [`Quantized`] onto `device`.
    pub fn new(q: &Quantized, device: &Device) -> Result<Self> {
        q.validate()?;
        let packed = Tensor::from_slice(&q.packed, q.packed.len(), device)?;
        let absmax = match &q.absmax {
            Absmax::Plain(a) => AbsmaxTensor::Plain(Tensor::from_slice(a, a.len(), device)?),
            Absmax::Nested(n) => AbsmaxTensor::Nested {
                codes: Tensor::from_slice(&n.codes, n.codes.len(), device)?,
                nested_absmax: Tensor::from_slice(&n.nested_absmax, n.nested_absmax.len(), device)?,
                offset: n.offset,
            },
        };
        Ok(Self {
            packed,
            absmax,
            quant_type: q.quant_type,
            blocksize: q.blocksize,
            shape: Shape::from_dims(&q.shape),
            dtype: q.dtype,
        })
    }

    /// Assembles a weight from tensors already on one device (e.g. read from a checkpoint): u8
    /// `packed` `[packed_len(n)]`, and the absmax state for `n = shape.elem_count()` elements at
    /// `blocksize`. Errors when a dtype, length or device does not fit.
    pub fn from_parts(
        packed: Tensor,
        absmax: AbsmaxTensor,
        quant_type: QuantType,
        blocksize: Blocksize,
        shape: impl Into<Shape>,
        dtype: DType,
    ) -> Result<Self> {
        let shape = shape.into();
        crate::quantized::check_source_dtype(dtype)?;
        let n_elems = shape.elem_count();
        let n_blocks = n_blocks(n_elems, blocksize.elems());
        let mut parts = vec![("packed", &packed, DType::U8, packed_len(n_elems))];
        match &absmax {
            AbsmaxTensor::Plain(a) => parts.push(("absmax", a, DType::F32, n_blocks)),
            AbsmaxTensor::Nested {
                codes,
                nested_absmax,
                ..
            } => {
                parts.push(("absmax codes", codes, DType::U8, n_blocks));
                let n_scales = n_blocks.div_ceil(NESTED_BLOCK_ELEMS);
                parts.push(("nested absmax", nested_absmax, DType::F32, n_scales));
            }
        }
        for (what, t, want_dtype, want_len) in parts {
            if t.dtype() != want_dtype || t.dims() != [want_len] {
                return Err(part_error(format!(
                    "{what} is {:?} {:?}; {n_elems} elements at blocksize {} need {want_dtype:?} \
                     [{want_len}]",
                    t.dtype(),
                    t.dims(),
                    blocksize.elems()
                )));
            }
            if !t.device().same_device(packed.device()) {
                return Err(part_error(format!(
                    "{what} lives on another device than the packed codes"
                )));
            }
        }
        Ok(Self {
            packed,
            absmax,
            quant_type,
            blocksize,
            shape,
            dtype,
        })
    }

    /// Quantizes a dense tensor (f32, bf16 or f16, any device) from its own values.
    pub fn quantize(
        w: &Tensor,
        quant_type: QuantType,
        blocksize: Blocksize,
        double_quant: bool,
    ) -> Result<Self> {
        crate::quantized::check_source_dtype(w.dtype())?;
        let values = w.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let q = Quantized::quantize(
            &values,
            w.dims(),
            w.dtype(),
            quant_type,
            blocksize,
            double_quant,
        )?;
        Self::new(&q, w.device())
    }

    /// Copies the weight back to the host.
    pub fn to_quantized(&self) -> Result<Quantized> {
        let absmax = match &self.absmax {
            AbsmaxTensor::Plain(a) => Absmax::Plain(a.to_vec1()?),
            AbsmaxTensor::Nested {
                codes,
                nested_absmax,
                offset,
            } => Absmax::Nested(NestedAbsmax {
                codes: codes.to_vec1()?,
                nested_absmax: nested_absmax.to_vec1()?,
                offset: *offset,
            }),
        };
        Ok(Quantized {
            quant_type: self.quant_type,
            blocksize: self.blocksize,
            shape: self.shape.dims().to_vec(),
            dtype: self.dtype,
            packed: self.packed.to_vec1()?,
            absmax,
        })
    }

    pub fn packed(&self) -> &Tensor {
        &self.packed
    }
    pub fn absmax(&self) -> &AbsmaxTensor {
        &self.absmax
    }
    pub fn quant_type(&self) -> QuantType {
        self.quant_type
    }
    pub fn blocksize(&self) -> Blocksize {
        self.blocksize
    }
    pub fn shape(&self) -> &Shape {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        self.packed.device()
    }
    pub fn n_elems(&self) -> usize {
        self.shape.elem_count()
    }

    /// `(out, in)` of a 2-D weight.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        Ok(self.shape.dims2()?)
    }

    /// Bytes held on the device (codes + absmax state).
    pub fn storage_bytes(&self) -> usize {
        let absmax = match &self.absmax {
            AbsmaxTensor::Plain(a) => a.elem_count() * 4,
            AbsmaxTensor::Nested {
                codes,
                nested_absmax,
                ..
            } => codes.elem_count() + nested_absmax.elem_count() * 4 + 4,
        };
        self.packed.elem_count() + absmax
    }

    /// Dense weight in `dtype` (f32, bf16 or f16), shaped like the original, with no gradient.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        Ok(self.packed.apply_op1_no_bwd(&crate::op::Dequantize {
            w: self.clone(),
            dtype,
        })?)
    }

    /// The squared L2 norm of each row of the dequantized `[out, in]` weight, summed in f64: the
    /// `‖W_j,:‖²` DoRA's magnitude starts from and its weight norm is built on. Rows are
    /// dequantized one (or, for odd `in`, two) at a time into a per-thread buffer by the same
    /// decoder as [`Self::dequantize`], never the dense weight; on another device the codes are
    /// read on the host (they are an eighth of the f32 weight).
    pub fn row_sq_norms(&self) -> Result<Vec<f64>> {
        use rayon::prelude::*;
        let (out, inp) = self.dims2()?;
        if !self.device().is_cpu() {
            return Self::new(&self.to_quantized()?, &Device::Cpu)?.row_sq_norms();
        }
        // Slices must start on a byte boundary: with an odd `in`, rows go in pairs.
        let rows_per = if inp % 2 == 0 { 1 } else { 2 };
        self.with_cpu(|view| {
            let chunks: Vec<Vec<f64>> = (0..out.div_ceil(rows_per))
                .into_par_iter()
                .map_init(
                    || vec![0f32; rows_per * inp],
                    |buf, c| {
                        let first = c * rows_per;
                        let rows = rows_per.min(out - first);
                        let buf = &mut buf[..rows * inp];
                        view.dequantize_slice(first * inp, buf);
                        buf.chunks(inp.max(1))
                            .map(|row| row.iter().map(|&v| f64::from(v) * f64::from(v)).sum())
                            .collect()
                    },
                )
                .collect();
            chunks.concat()
        })
    }

    /// Runs `f` with the CPU views of this weight: packed bytes and a per-block absmax decoder.
    /// Errors on a non-CPU device.
    pub(crate) fn with_cpu<R>(&self, f: impl FnOnce(CpuView<'_>) -> R) -> Result<R> {
        let (packed_guard, packed_layout) = self.packed.storage_and_layout();
        let packed = cpu_u8(&packed_guard, packed_layout)?;
        match &self.absmax {
            AbsmaxTensor::Plain(a) => {
                let (guard, layout) = a.storage_and_layout();
                let absmax = cpu_f32(&guard, layout)?;
                Ok(f(CpuView {
                    w: self,
                    packed,
                    absmax: Cow::Borrowed(absmax),
                }))
            }
            AbsmaxTensor::Nested {
                codes,
                nested_absmax,
                offset,
            } => {
                // Decoding is 1/blocksize of the work of dequantizing; done once per call.
                let (cg, cl) = codes.storage_and_layout();
                let (ng, nl) = nested_absmax.storage_and_layout();
                let absmax = crate::nested::decode(cpu_u8(&cg, cl)?, cpu_f32(&ng, nl)?, *offset);
                Ok(f(CpuView {
                    w: self,
                    packed,
                    absmax: Cow::Owned(absmax),
                }))
            }
        }
    }
}

/// Borrowed host data of a CPU [`Nf4Tensor`].
pub(crate) struct CpuView<'a> {
    pub w: &'a Nf4Tensor,
    pub packed: &'a [u8],
    pub absmax: Cow<'a, [f32]>,
}

impl CpuView<'_> {
    /// Dequantizes the whole weight (fast path, parallel).
    pub fn dequantize<T: DequantOut>(&self) -> Result<Vec<T>> {
        cpu::dequantize(
            self.packed,
            &self.absmax,
            self.w.quant_type,
            self.w.blocksize,
            self.w.n_elems(),
        )
    }

    /// Dequantizes elements `[first_elem, first_elem + out.len())` (`first_elem` even).
    pub fn dequantize_slice<T: DequantOut>(&self, first_elem: usize, out: &mut [T]) {
        let absmax = &self.absmax;
        cpu::dequantize_slice(
            self.packed,
            |b| absmax[b],
            self.w.quant_type,
            self.w.blocksize,
            first_elem,
            out,
        );
    }
}

fn part_error(msg: String) -> QuantError {
    QuantError::Candle(candle_core::Error::Msg(format!(
        "Nf4Tensor::from_parts: {msg}"
    )))
}

/// The elements a contiguous layout covers (parts may be views into larger buffers).
fn covered<'a, T>(v: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    l.contiguous_offsets()
        .and_then(|(start, end)| v.get(start..end))
        .ok_or_else(|| {
            QuantError::Candle(candle_core::Error::Msg(format!(
                "Nf4Tensor: the {what} are not a contiguous view"
            )))
        })
}

fn cpu_u8<'a>(s: &'a Storage, l: &Layout) -> Result<&'a [u8]> {
    match s {
        Storage::Cpu(CpuStorage::U8(v)) => covered(v, l, "u8 codes"),
        _ => Err(QuantError::Candle(candle_core::Error::Msg(
            "Nf4Tensor: expected u8 codes on the CPU".into(),
        ))),
    }
}

fn cpu_f32<'a>(s: &'a Storage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(CpuStorage::F32(v)) => covered(v, l, "f32 absmax values"),
        _ => Err(QuantError::Candle(candle_core::Error::Msg(
            "Nf4Tensor: expected f32 absmax on the CPU".into(),
        ))),
    }
}
