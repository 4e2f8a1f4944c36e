//! `qlora-quant`: bitsandbytes-compatible 4-bit block quantization (NF4 and FP4), its candle ops
//! and CUDA kernels, and the fused differentiable ops a QLoRA step needs on the GPU; nothing about
//! model architectures or checkpoints beyond the bitsandbytes layout.
//!
//! - [`format`](mod@format): code tables, rounding midpoints, nibble order, block sizes, the 8-bit dynamic map.
//! - [`backend`]: which bitsandbytes backend's rounding (CUDA or CPU) a quantization reproduces.
//! - [`cpu`]: scalar `_ref` references and the fast multithreaded paths, tested bit-identical.
//! - [`nested`]: double quantization of the absmax (offset + 8-bit codes + one scale per 256).
//! - [`quantized`]: a quantized tensor on the host ([`Quantized`]), as bitsandbytes' `QuantState`.
//! - [`bnb`]: the serialized bitsandbytes-4bit layout in safetensors checkpoints, read and write.
//! - [`tensor`], [`op`]: the candle side: [`Nf4Tensor`] on a device, the dequantize op and the NF4
//!   linear op whose backward re-dequantizes (no dense weight kept, no weight gradient).
//! - [`fused`]: differentiable RMSNorm, RoPE, SwiGLU, softmax, attention and cross-entropy for
//!   training on the GPU (the candle composition on the CPU, fused kernels with a backward on
//!   CUDA), and dropout with a counter-based mask that is the same on every device.
//! - [`launch`]: the kernels' grid and block sizes, as pure functions of the shapes.
//! - `cuda` (feature `cuda`): the dequantization kernels (quant/kernels/*.cu, PTX built by build.rs)
//!   and the GPU paths of the ops.
//! - `emu` (feature `emulate`): the same kernels run on the CPU device in the emulation harness
//!   (quant/emu), for testing them without a GPU.

pub mod backend;
pub mod bnb;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "emulate")]
pub mod emu;
pub mod format;
pub mod fused;
pub mod isa;
pub mod launch;
pub mod nested;
pub mod op;
pub mod quantized;
pub mod runtime;
pub mod tensor;
pub mod vmath;

pub use backend::BnbBackend;
pub use format::{Blocksize, QuantType};
pub use nested::NestedAbsmax;
pub use op::{nf4_linear, nf4_matmul};
pub use quantized::{Absmax, Quantized};
pub use tensor::Nf4Tensor;

/// Errors of this crate; each says what was wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("invalid blocksize {0}: use a power of two from 32 to 4096 (64 is the default)")]
    InvalidBlocksize(usize),
    #[error("unknown quant type `{0}`: use `nf4` or `fp4`")]
    UnknownQuantType(String),
    #[error("block {block} holds a NaN or infinite value; 4-bit quantization needs finite weights")]
    NonFinite { block: usize },
    #[error(
        "buffer sizes do not fit {n_elems} elements: {packed} packed bytes (want {want_packed}), \
         {absmax} absmax values (want {want_absmax})"
    )]
    Length {
        n_elems: usize,
        packed: usize,
        want_packed: usize,
        absmax: usize,
        want_absmax: usize,
    },
    #[error("shape {shape:?} does not hold {n_values} values")]
    Shape { shape: Vec<usize>, n_values: usize },
    #[error("unsupported dtype {0:?}: 4-bit quantization reads f32, bf16 or f16 weights")]
    UnsupportedDtype(candle_core::DType),
    #[error("bitsandbytes checkpoint, tensor `{name}`: {msg}")]
    Bnb { name: String, msg: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result of this crate.
pub type Result<T, E = QuantError> = std::result::Result<T, E>;
