//! Fused, differentiable versions of the ops a Phi-3 QLoRA step runs besides its linears, for the
//! GPU. candle-nn 0.11's fast `rms_norm`, `rope`, `softmax_last_dim` and `sdpa` have no backward
//! (training through them silently drops gradient terms), so the model composes them from
//! primitive ops, which on a GPU costs one kernel and one saved intermediate per primitive.
//!
//! Each op comes as two functions: `*_ref`, the plain candle composition (what the model computes
//! on the CPU, differentiated by candle), and `*_fused`, a `CustomOp` whose forward and backward are
//! kernels of `quant/kernels/fused.cu` on CUDA and the same loops in Rust on the CPU (`fused/cpu.rs`;
//! the ops are in `fused/ops.rs`), so their backward formulas are tested against candle's autograd
//! of the composition everywhere. The caller picks (the model through its `OpPath`). Tensors an op carries (norm weight, rotary tables,
//! targets) are constants of the graph: they receive no gradient, and a trainable one is refused.
//!
//! All arithmetic is f32; a half-precision value is rounded where the composition rounds it.
//! Shapes and derivations (`n` rows, `·` elementwise):
//!
//! - [`rms_norm_fused`]: `x [.., H]`, `w [H]`: `den = √(mean(x²) + eps)`, `y = T(T(x / den) · w)`.
//!   `dx = (g − n · mean(g · n)) / den` with `n = x / den`, `g = T(dy · w)` (since
//!   `∂den/∂x_j = x_j / (H · den)`).
//! - [`rope_fused`]: rotate-half on `x [B, heads, T, D]` with `cos, sin [B or 1, 1, T, R]`, `R ≤ D` even:
//!   `y = x · cos + rot(x) · sin` on the first `R` dims, `rot(x) = [−x₂, x₁]`; the rest passes.
//!   The rotation's transpose gives `dx₁ = dy₁ · cos₁ + dy₂ · sin₂`, `dx₂ = dy₂ · cos₂ − dy₁ · sin₁`.
//! - [`swiglu_fused`]: `gu [.., 2I]` = gate | up (Phi-3's fused `gate_up_proj`): `y = up · silu(gate)`;
//!   `d_up = dy · silu(gate)`, `d_gate = dy · up · s · (1 + gate · (1 − s))`, `s = σ(gate)`.
//! - [`softmax_last_dim_fused`]: `y = exp(x − max) / Σ`, computed in f32 for half types;
//!   `dx = y · (dy − Σ dy · y)` (y recomputed in f32 from x). [`attention_softmax_fused`] is the same on
//!   `x · scale + mask` (`[B, heads, T, Tk]` scores, a constant `[B or 1, 1, T, Tk]` mask), with
//!   `dx = scale · y · (dy − Σ dy · y)`.
//! - [`attention_fused`]: `softmax(q·kᵀ · scale + mask) · v` in O(T) memory, grouped-query heads included;
//!   derivation in its module.
//! - [`cross_entropy_fused`]: per-row loss of `logits [N, V]` against u32 `targets [N]`:
//!   `log Σ exp(x − max) + max − x_t`; `dx = g · (softmax(x) − onehot(t))`.
//! - [`dropout`]: inverted dropout with a counter-based mask, the same on every device (below);
//!   linear in `x`, so `dx = dropout(dy)` with the same `p` and seed. [`dropout_rows`] numbers
//!   the mask by global row, so a row's mask does not depend on its batch, its place in it or
//!   its padding (data-parallel ranks draw the masks one process would).
//!
//! ## The dropout mask (a contract: the model relies on it, every device computes it bit-exactly)
//!
//! Element `i` (its row-major index in `x`, as u64) of `dropout(x, p, seed)` is kept iff
//! `u < threshold`, where
//!
//! ```text
//! h = splitmix64(seed ^ c.wrapping_mul(0x9E3779B97F4A7C15))     c = i for `dropout`
//! u = (h >> 40) as u32                                   (the top 24 bits)
//! keep = 1 − p (f32),  threshold = (keep · 2^24).round() as u32
//! splitmix64(z): z += 0x9E3779B97F4A7C15; z = (z ^ (z >> 30)) · 0xBF58476D1CE4E5B9;
//!                z = (z ^ (z >> 27)) · 0x94D049BB133111EB; z ^ (z >> 31)     (wrapping u64)
//! ```
//!
//! A kept element is `x · (1.0f32 / keep)`, multiplied in f32 (f64 for f64 `x`) and rounded to
//! `x`'s dtype once; a dropped one is `+0`. The mask depends on `(seed, c, p)` alone, so the caller
//! picks a fresh seed per application (per step, layer and adapter) and the backward replays it.
//!
//! `dropout_rows(x, p, seed, MaskRows { first, step })` splits `x` along its first dimension into
//! rows of `len = x.elem_count() / x.dim(0)` elements; element `j` of row `b` (`i = b·len + j`)
//! belongs to global row `g = first + b·step` and takes the counter
//!
//! ```text
//! c = (g << 40) + j                                                  (wrapping u64)
//! ```
//!
//! so rows up to 2⁴⁰ elements long never share a counter, and a single row starting at global row
//! 0 is exactly `dropout`'s mask (`c = i`).

#[macro_use]
mod macros;
#[cfg(any(feature = "cuda", feature = "emulate"))]
mod args;
mod attention;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "emulate")]
mod emu;
mod gemm;
mod head;
mod known;
mod lora;
mod ops;

pub use attention::{
    BlockedMemory, Blocking, CHUNK_BYTES, CPU_CHUNK_BYTES, MAX_HEAD_DIM, WAVE_BYTES,
    attention_blocked, attention_blocked_known, attention_fused, attention_fused_known,
    attention_ref,
};
use candle_core::{D, DType, Result, Tensor, bail};
pub use head::{
    HeadLora, HeadLoraGrads, HeadOptions, HeadOutput, head_cpu, head_cross_entropy_cpu,
    head_cross_entropy_cpu_lora, head_cross_entropy_cpu_with,
};
pub use lora::{lora_nf4_linear, lora_nf4_linear_known, lora_nf4_linear_memory};

fn check_float(what: &str, x: &Tensor) -> Result<()> {
    if !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        bail!(
            "{what}: unsupported dtype {:?}; use f32, bf16 or f16",
            x.dtype()
        );
    }
    Ok(())
}

/// A carried tensor: same dtype as `x`, on its device, and not trainable.
fn check_constant(what: &str, x: &Tensor, c: &Tensor, dtype: DType) -> Result<()> {
    if c.is_variable() {
        bail!(
            "{what}: the tensor is trainable, but fused ops treat it as a constant; use the _ref composition"
        );
    }
    if c.dtype() != dtype || !c.device().same_device(x.device()) {
        bail!(
            "{what}: {:?} on {:?}, want {dtype:?} on x's device",
            c.dtype(),
            c.device()
        );
    }
    Ok(())
}

/// `scale` as candle's affine applies it to a tensor of `dtype`: rounded to the dtype first.
fn affine_scale(dtype: DType, scale: f64) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f64(scale).to_f32(),
        DType::F16 => half::f16::from_f64(scale).to_f32(),
        _ => scale as f32,
    }
}

/// The dtype reductions run in: f32 for half types, else the dtype itself.
fn reduce_dtype(dtype: DType) -> DType {
    if matches!(dtype, DType::BF16 | DType::F16) {
        DType::F32
    } else {
        dtype
    }
}

// ----- RMSNorm ------------------------------------------------------------------------------------

/// The composition: normalised in f32 (for half types), cast back, times the weight.
pub fn rms_norm_ref(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(reduce_dtype(dtype))?;
    let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}

/// [`rms_norm_fused`] through the fused op on any device.
pub fn rms_norm_fused(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    check_float("rms_norm", x)?;
    check_constant("rms_norm weight", x, weight, x.dtype())?;
    let h = x.dim(D::Minus1)?;
    if h == 0 || weight.dims() != [h] {
        bail!("rms_norm: weight {:?} for rows of {h}", weight.dims());
    }
    x.contiguous()?.apply_op1(ops::RmsNorm {
        weight: weight.contiguous()?,
        eps: eps as f32,
    })
}

// ----- Rotary embedding ---------------------------------------------------------------------------

/// The composition: `x · cos + rotate_half(x) · sin` on the first `R` dims, the rest passed.
pub fn rope_ref(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let r = cos.dim(D::Minus1)?;
    let rotate = |x: &Tensor| -> Result<Tensor> {
        let x1 = x.narrow(D::Minus1, 0, r / 2)?;
        let x2 = x.narrow(D::Minus1, r / 2, r - r / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
    };
    if r == d {
        return rotate(x);
    }
    let rotated = rotate(&x.narrow(D::Minus1, 0, r)?)?;
    Tensor::cat(&[&rotated, &x.narrow(D::Minus1, r, d - r)?], D::Minus1)
}

/// [`rope_fused`] through the fused op on any device.
pub fn rope_fused(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    check_float("rope", x)?;
    check_constant("rope cos", x, cos, x.dtype())?;
    check_constant("rope sin", x, sin, x.dtype())?;
    let (b, _, t, d) = x.dims4()?;
    let (cb, one, ct, r) = cos.dims4()?;
    let tables_fit = sin.dims() == cos.dims() && one == 1 && ct == t && r <= d && r % 2 == 0;
    if d == 0 || !tables_fit || !(cb == 1 || cb == b) {
        bail!(
            "rope: x {:?} needs cos/sin [{b} or 1, 1, {t}, R ≤ {d}, R even], got {:?} / {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    x.contiguous()?.apply_op1(ops::Rope {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        backward: false,
    })
}

// ----- SwiGLU -------------------------------------------------------------------------------------

/// The composition.
pub fn swiglu_ref(gu: &Tensor) -> Result<Tensor> {
    let i = gu.dim(D::Minus1)? / 2;
    let gate = gu.narrow(D::Minus1, 0, i)?;
    let up = gu.narrow(D::Minus1, i, i)?;
    up * gate.silu()?
}

/// [`swiglu_fused`] through the fused op on any device.
pub fn swiglu_fused(gu: &Tensor) -> Result<Tensor> {
    check_float("swiglu", gu)?;
    let last = gu.dim(D::Minus1)?;
    if last == 0 || last % 2 == 1 {
        bail!("swiglu: the last dim of {:?} is not gate | up", gu.dims());
    }
    gu.contiguous()?.apply_op1(ops::SwiGlu)
}

// ----- Softmax ------------------------------------------------------------------------------------

/// The composition (max-subtracted, candle-nn's `softmax`), in f32 for half types.
pub fn softmax_last_dim_ref(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(reduce_dtype(dtype))?;
    let max = x32.max_keepdim(D::Minus1)?;
    let num = x32.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)?.to_dtype(dtype)
}

/// [`softmax_last_dim_fused`] through the fused op on any device.
pub fn softmax_last_dim_fused(x: &Tensor) -> Result<Tensor> {
    check_float("softmax", x)?;
    if x.dim(D::Minus1)? == 0 {
        bail!("softmax: empty rows in {:?}", x.dims());
    }
    x.contiguous()?.apply_op1(ops::Softmax {
        mask: None,
        scale: 1.0,
    })
}

/// The composition: scaled (candle's affine, the scale rounded to the dtype), masked, softmax.
pub fn attention_softmax_ref(scores: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let scaled = (scores * scale)?;
    let masked = match mask {
        Some(m) => scaled.broadcast_add(m)?,
        None => scaled,
    };
    softmax_last_dim_ref(&masked)
}

/// [`attention_softmax_fused`] through the fused op on any device.
pub fn attention_softmax_fused(
    scores: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    check_float("attention_softmax", scores)?;
    let (b, _, t, tk) = scores.dims4()?;
    if tk == 0 {
        bail!("attention_softmax: no keys in {:?}", scores.dims());
    }
    if let Some(m) = mask {
        check_constant("attention_softmax mask", scores, m, scores.dtype())?;
        let (mb, one, mt, mk) = m.dims4()?;
        if one != 1 || mt != t || mk != tk || !(mb == 1 || mb == b) {
            bail!(
                "attention_softmax: mask {:?} for scores {:?}; want [{b} or 1, 1, {t}, {tk}]",
                m.dims(),
                scores.dims()
            );
        }
    }
    scores.contiguous()?.apply_op1(ops::Softmax {
        mask: mask.map(Tensor::contiguous).transpose()?,
        scale: affine_scale(scores.dtype(), scale),
    })
}

// ----- Dropout ------------------------------------------------------------------------------------

/// Inverted dropout of `x` (f32, bf16, f16; f64 on the CPU) with the counter-based mask of the
/// module docs: differentiable, identical on every device. `p == 0` returns `x` itself; `p` must
/// lie in `[0, 1)`.
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    let n = x.elem_count() as u64;
    dropout_with(x, ops::Dropout::new(p, seed, n, MaskRows::default())?)
}

/// Where the rows of [`dropout_rows`] sit among the global rows: row `b` of `x` is global row
/// `first + b·step` (a data-parallel rank `r` of `w` taking every `w`-th row: `first = r`,
/// `step = w`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskRows {
    pub first: u64,
    pub step: u64,
}

impl Default for MaskRows {
    /// Row `b` is global row `b`.
    fn default() -> Self {
        Self { first: 0, step: 1 }
    }
}

/// A dropout as the fused ops take it: drop probability, mask seed and where `x`'s rows sit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropoutSpec {
    pub p: f32,
    pub seed: u64,
    pub rows: MaskRows,
}

/// [`dropout`] with the mask numbered by global row (the module docs): rows are `x`'s first
/// dimension, and a row's mask depends on the seed, its global row and the position in it alone.
pub fn dropout_rows(x: &Tensor, p: f32, seed: u64, rows: MaskRows) -> Result<Tensor> {
    let b = x.dims().first().copied().unwrap_or(1).max(1);
    let len = (x.elem_count() / b).max(1) as u64;
    dropout_with(x, ops::Dropout::new(p, seed, len, rows)?)
}

fn dropout_with(x: &Tensor, op: ops::Dropout) -> Result<Tensor> {
    let dtypes: &[DType] = if x.device().is_cpu() {
        &[DType::F32, DType::BF16, DType::F16, DType::F64]
    } else {
        &[DType::F32, DType::BF16, DType::F16]
    };
    if !dtypes.contains(&x.dtype()) {
        bail!(
            "dropout: unsupported dtype {:?} on {:?}; use one of {dtypes:?}",
            x.dtype(),
            x.device()
        );
    }
    if op.p == 0.0 || x.elem_count() == 0 {
        return Ok(x.clone());
    }
    x.contiguous()?.apply_op1(op)
}

/// The keep mask of [`dropout`] for a tensor of `shape`: u8, 1 where an element is kept, computed
/// on `device` by the op itself (for tests and inspection).
pub fn dropout_mask(
    shape: impl Into<candle_core::Shape>,
    p: f32,
    seed: u64,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let ones = Tensor::ones(shape, DType::F32, device)?;
    dropout(&ones, p, seed)?.ne(0f32)
}

/// The keep mask of [`dropout_rows`] (as [`dropout_mask`]).
pub fn dropout_rows_mask(
    shape: impl Into<candle_core::Shape>,
    p: f32,
    seed: u64,
    rows: MaskRows,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let ones = Tensor::ones(shape, DType::F32, device)?;
    dropout_rows(&ones, p, seed, rows)?.ne(0f32)
}

// ----- Cross-entropy ------------------------------------------------------------------------------

/// The composition: `−log_softmax(f32 logits)` gathered at the targets (f64 logits stay f64).
pub fn cross_entropy_ref(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let dtype = if logits.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let logp = log_softmax_ref(&logits.to_dtype(dtype)?)?;
    logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}

/// candle-nn's `log_softmax` over the last dim, from the same primitive ops (this crate does not
/// depend on candle-nn).
fn log_softmax_ref(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let diff = x.broadcast_sub(&max)?;
    let sum_exp = diff.exp()?.sum_keepdim(D::Minus1)?;
    diff.broadcast_sub(&sum_exp.log()?)
}

/// [`cross_entropy_fused`] through the fused op on any device. Targets must be below `V`.
pub fn cross_entropy_fused(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    check_float("cross_entropy", logits)?;
    let (n, v) = logits.dims2()?;
    if v == 0 {
        bail!("cross_entropy: empty vocabulary");
    }
    if targets.dtype() != DType::U32 || targets.dims() != [n] {
        bail!(
            "cross_entropy: targets must be u32 [{n}], got {:?} {:?}",
            targets.dtype(),
            targets.dims()
        );
    }
    if !targets.device().same_device(logits.device()) {
        bail!("cross_entropy: targets live on another device than the logits");
    }
    if n > 0 {
        let max = targets.max(0)?.to_scalar::<u32>()? as usize;
        if max >= v {
            bail!("cross_entropy: target {max} is outside the vocabulary of {v}");
        }
    }
    logits.contiguous()?.apply_op1(ops::CrossEntropy {
        targets: targets.contiguous()?,
    })
}
