//! CPU implementations of the fused ops: the loops of `quant/kernels/fused.cu` in Rust (f32
//! arithmetic, rounding to the element type where the kernels round), rows in parallel on rayon
//! (each row's arithmetic is serial, so the result does not depend on the thread count). They are
//! tested against candle's autograd of the compositions they replace, and the model runs them on
//! the CPU too (`OpPath::for_device`): one pass per op instead of one per candle primitive, on the
//! same rayon pool as the matmuls.

use super::ops::Dropout;
use crate::cpu::DequantOut;
use crate::vmath;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Result, Storage, Tensor, WithDType, bail};
use rayon::prelude::*;

/// The contiguous data of an op input.
pub(super) fn data<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<T>()?[start..end]),
        None => bail!("fused op: input is not contiguous"),
    }
}

/// Runs `f` on the host data of a tensor an op carries.
pub(super) fn with_host<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let (guard, layout) = t.storage_and_layout();
    match &*guard {
        Storage::Cpu(s) => Ok(f(data::<T>(s, layout)?)),
        _ => bail!("fused op: a tensor it carries is not on the CPU"),
    }
}

fn round<T: DequantOut>(v: f32) -> f32 {
    T::from_f32(v).to_f32()
}

fn last_dim(l: &Layout) -> usize {
    l.shape().dims().last().copied().unwrap_or(1).max(1)
}

/// Elements per rayon task of the row loops: enough work to amortize a task, small enough to
/// balance two to a few dozen threads.
const TASK_ELEMS: usize = 16 * 1024;

/// `out` (rows of `width`) filled by `f(row index, row)`, rows in parallel.
fn par_rows<T: Send>(out: &mut [T], width: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let width = width.max(1);
    let per = (TASK_ELEMS / width).max(1);
    out.par_chunks_mut(per * width)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (i, row) in chunk.chunks_exact_mut(width).enumerate() {
                f(c * per + i, row);
            }
        });
}

/// A `rows × width` output computed row by row in parallel.
fn map_rows<T: WithDType>(rows: usize, width: usize, f: impl Fn(usize, &mut [T]) + Sync) -> Vec<T> {
    let mut y = vec![T::zero(); rows * width];
    par_rows(&mut y, width, f);
    y
}

fn sum_sq<T: DequantOut>(row: &[T]) -> f32 {
    row.iter().map(|v| v.to_f32() * v.to_f32()).sum()
}

pub(super) fn rms_norm_fwd(s: &CpuStorage, l: &Layout, w: &Tensor, eps: f32) -> Result<CpuStorage> {
    let h = last_dim(l);
    by_dtype!(s.dtype(), "rms_norm", T => {
        let x = data::<T>(s, l)?;
        with_host::<T, _>(w, |w| {
            let y = map_rows(x.len() / h, h, |r, out: &mut [T]| {
                let row = &x[r * h..(r + 1) * h];
                let den = (sum_sq(row) / h as f32 + eps).sqrt();
                for ((o, v), w) in out.iter_mut().zip(row).zip(w) {
                    *o = T::from_f32(round::<T>(v.to_f32() / den) * w.to_f32());
                }
            });
            T::to_cpu_storage_owned(y)
        })
    })
}

pub(super) fn rms_norm_bwd(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    w: &Tensor,
    eps: f32,
) -> Result<CpuStorage> {
    let h = last_dim(l1);
    by_dtype!(s1.dtype(), "rms_norm backward", T => {
        let (x, dy) = (data::<T>(s1, l1)?, data::<T>(s2, l2)?);
        with_host::<T, _>(w, |w| {
            let dx = map_rows(x.len() / h, h, |r, out: &mut [T]| {
                let (row, drow) = (&x[r * h..(r + 1) * h], &dy[r * h..(r + 1) * h]);
                let den = (sum_sq(row) / h as f32 + eps).sqrt();
                let g = |i: usize| round::<T>(drow[i].to_f32() * w[i].to_f32());
                let gn: f32 = (0..h).map(|i| g(i) * (row[i].to_f32() / den)).sum();
                let mean_gn = gn / h as f32;
                for (i, o) in out.iter_mut().enumerate() {
                    let n = row[i].to_f32() / den;
                    *o = T::from_f32((g(i) - n * mean_gn) / den);
                }
            });
            T::to_cpu_storage_owned(dx)
        })
    })
}

/// `(heads, T, D, R, batch stride of the tables)`.
pub(super) type RopeGeometry = (usize, usize, usize, usize, usize);

pub(super) fn rope(
    s: &CpuStorage,
    l: &Layout,
    cos: &Tensor,
    sin: &Tensor,
    (heads, t_len, d, r, table_stride): RopeGeometry,
    backward: bool,
) -> Result<CpuStorage> {
    let half = r / 2;
    by_dtype!(s.dtype(), "rope", T => {
        let x = data::<T>(s, l)?;
        with_host::<T, _>(cos, |cos| {
            with_host::<T, _>(sin, |sin| {
                let y = map_rows(x.len() / d, d, |row, out: &mut [T]| {
                    let xr = &x[row * d..(row + 1) * d];
                    let (t, b) = (row % t_len, row / t_len / heads);
                    let tab = b * table_stride + t * r;
                    let (c, s) = (&cos[tab..tab + r], &sin[tab..tab + r]);
                    for (j, o) in out.iter_mut().enumerate() {
                        if j >= r {
                            *o = xr[j];
                            continue;
                        }
                        let a = round::<T>(xr[j].to_f32() * c[j].to_f32());
                        let rot = if !backward {
                            let v = if j < half { -xr[j + half].to_f32() } else { xr[j - half].to_f32() };
                            round::<T>(v * s[j].to_f32())
                        } else {
                            let k = if j < half { j + half } else { j - half };
                            let p = round::<T>(xr[k].to_f32() * s[k].to_f32());
                            if j < half { p } else { -p }
                        };
                        *o = T::from_f32(a + rot);
                    }
                });
                T::to_cpu_storage_owned(y)
            })
        })?
    })
}

fn silu_parts(gate: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + vmath::exp(-gate));
    (s, gate * s)
}

pub(super) fn swiglu_fwd(s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
    let inter = last_dim(l) / 2;
    by_dtype!(s.dtype(), "swiglu", T => {
        let gu = data::<T>(s, l)?;
        let y = map_rows(gu.len() / (2 * inter).max(1), inter, |r, out: &mut [T]| {
            let (gate, up) = gu[2 * r * inter..2 * (r + 1) * inter].split_at(inter);
            if let (Some(gate), Some(up)) = (T::as_f32(gate), T::as_f32(up)) {
                let out = T::as_f32_mut(out).expect("T is f32");
                return vmath::silu_mul_row(gate, up, out);
            }
            for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
                let g = g.to_f32();
                *o = T::from_f32(u.to_f32() * round::<T>(g / (1.0 + vmath::exp(-g))));
            }
        });
        Ok(T::to_cpu_storage_owned(y))
    })
}

pub(super) fn swiglu_bwd(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<CpuStorage> {
    let inter = last_dim(l1) / 2;
    by_dtype!(s1.dtype(), "swiglu backward", T => {
        let (gu, dy) = (data::<T>(s1, l1)?, data::<T>(s2, l2)?);
        let dgu = map_rows(gu.len() / (2 * inter).max(1), 2 * inter, |r, out: &mut [T]| {
            let (gate, up) = gu[2 * r * inter..2 * (r + 1) * inter].split_at(inter);
            let drow = &dy[r * inter..(r + 1) * inter];
            if let (Some(gate), Some(up), Some(drow), Some(out)) =
                (T::as_f32(gate), T::as_f32(up), T::as_f32(drow), T::as_f32_mut(out))
            {
                let (d_gate, d_up) = out.split_at_mut(inter);
                return vmath::silu_mul_bwd_row(gate, up, drow, d_gate, d_up);
            }
            let (d_gate, d_up) = out.split_at_mut(inter);
            for i in 0..inter {
                let (g, u, grad) = (gate[i].to_f32(), up[i].to_f32(), drow[i].to_f32());
                let (s, silu) = silu_parts(g);
                let silu = round::<T>(silu);
                let dsilu = round::<T>(grad * u);
                d_up[i] = T::from_f32(grad * silu);
                d_gate[i] = T::from_f32(dsilu * (s * (1.0 + g * (1.0 - s))));
            }
        });
        Ok(T::to_cpu_storage_owned(dgu))
    })
}

/// `(max, Σ exp(x − max))` of a row, in f32, and the `exp(x − max)` (as [`exp_sum_in_place`]).
fn max_sum<T: DequantOut>(row: &[T]) -> (f32, f32, Vec<f32>) {
    let mut e: Vec<f32> = row.iter().map(|v| v.to_f32()).collect();
    let (m, sum) = exp_sum_in_place(&mut e);
    (m, sum, e)
}

/// Rows of a (scaled, masked) softmax: `x [.., len]` whose rows are `(b, head, t)` when masked.
#[derive(Debug, Clone, Copy)]
pub(super) struct SoftmaxRows {
    pub len: usize,
    pub t_len: usize,
    pub heads: usize,
    /// Elements between the mask's batches (0: one mask for every batch).
    pub mask_batch_stride: usize,
    pub scale: f32,
}

/// The softmax inputs of row `row`: `T(T(x · scale) + mask)` in f32.
fn softmax_inputs<T: DequantOut>(
    x: &[T],
    mask: Option<&[T]>,
    g: SoftmaxRows,
    row: usize,
) -> Vec<f32> {
    let xr = &x[row * g.len..(row + 1) * g.len];
    let scaled = xr.iter().map(|v| round::<T>(v.to_f32() * g.scale));
    match mask {
        Some(mask) => {
            let (b, t) = (row / g.t_len / g.heads, row % g.t_len);
            let start = b * g.mask_batch_stride + t * g.len;
            let mr = &mask[start..start + g.len];
            scaled
                .zip(mr)
                .map(|(v, m)| round::<T>(v + m.to_f32()))
                .collect()
        }
        None => scaled.collect(),
    }
}

pub(super) use crate::vmath::exp_sum_in_place;

/// Runs `f` on the host data of an optional mask.
pub(super) fn with_mask<T: WithDType, R>(
    mask: Option<&Tensor>,
    f: impl FnOnce(Option<&[T]>) -> R,
) -> Result<R> {
    match mask {
        Some(m) => with_host::<T, _>(m, |m| f(Some(m))),
        None => Ok(f(None)),
    }
}

pub(super) fn softmax_fwd(
    s: &CpuStorage,
    l: &Layout,
    mask: Option<&Tensor>,
    g: SoftmaxRows,
) -> Result<CpuStorage> {
    by_dtype!(s.dtype(), "softmax", T => {
        let x = data::<T>(s, l)?;
        with_mask::<T, _>(mask, |mask| {
            let y = map_rows(x.len() / g.len, g.len, |row, out: &mut [T]| {
                let mut e = softmax_inputs(x, mask, g, row);
                let (_, sum) = exp_sum_in_place(&mut e);
                for (o, e) in out.iter_mut().zip(&e) {
                    *o = T::from_f32(e / sum);
                }
            });
            T::to_cpu_storage_owned(y)
        })
    })
}

pub(super) fn softmax_bwd(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    mask: Option<&Tensor>,
    g: SoftmaxRows,
) -> Result<CpuStorage> {
    by_dtype!(s1.dtype(), "softmax backward", T => {
        let (x, dy) = (data::<T>(s1, l1)?, data::<T>(s2, l2)?);
        with_mask::<T, _>(mask, |mask| {
            let dx = map_rows(dy.len() / g.len, g.len, |row, out: &mut [T]| {
                let drow = &dy[row * g.len..(row + 1) * g.len];
                let mut p = softmax_inputs(x, mask, g, row);
                let (_, sum) = exp_sum_in_place(&mut p);
                p.iter_mut().for_each(|e| *e /= sum);
                let dot: f32 = p.iter().zip(drow).map(|(p, d)| d.to_f32() * p).sum();
                for ((o, p), d) in out.iter_mut().zip(&p).zip(drow) {
                    *o = T::from_f32(round::<T>(p * (d.to_f32() - dot)) * g.scale);
                }
            });
            T::to_cpu_storage_owned(dx)
        })
    })
}

pub(super) fn xent_fwd(s: &CpuStorage, l: &Layout, targets: &Tensor) -> Result<CpuStorage> {
    let vocab = last_dim(l);
    by_dtype!(s.dtype(), "cross_entropy", T => {
        let x = data::<T>(s, l)?;
        with_host::<u32, _>(targets, |targets| {
            let loss: Vec<f32> = x
                .par_chunks_exact(vocab)
                .zip(targets.par_iter())
                .map(|(row, &t)| {
                    let (m, sum, _) = max_sum(row);
                    match row.get(t as usize) {
                        Some(xt) => sum.ln() + m - xt.to_f32(),
                        None => f32::NAN,
                    }
                })
                .collect();
            CpuStorage::F32(loss)
        })
    })
}

pub(super) fn xent_bwd(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    targets: &Tensor,
) -> Result<CpuStorage> {
    let vocab = last_dim(l1);
    let g = data::<f32>(s2, l2)?;
    by_dtype!(s1.dtype(), "cross_entropy backward", T => {
        let x = data::<T>(s1, l1)?;
        with_host::<u32, _>(targets, |targets| {
            let dx = map_rows(x.len() / vocab, vocab, |r, out: &mut [T]| {
                let (row, t, gr) = (&x[r * vocab..(r + 1) * vocab], targets[r] as usize, g[r]);
                let (_, sum, e) = max_sum(row);
                for (i, (o, e)) in out.iter_mut().zip(e).enumerate() {
                    let p = e / sum;
                    let onehot = if i == t { 1.0 } else { 0.0 };
                    *o = T::from_f32(gr * (p - onehot));
                }
            });
            T::to_cpu_storage_owned(dx)
        })
    })
}

/// The splitmix64 finalizer (wrapping u64 arithmetic), as the dropout contract of [`super`] and
/// `fused.cu` define it.
pub(super) fn splitmix64(z: u64) -> u64 {
    let z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Whether the element with mask counter `c` survives [`Dropout`] (the mask of [`super`]).
pub(super) fn dropout_keeps(op: Dropout, c: u64) -> bool {
    let h = splitmix64(op.seed ^ c.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    ((h >> 40) as u32) < op.threshold
}

/// Elements per rayon task of the dropout loop.
const DROPOUT_CHUNK: usize = 1 << 16;

pub(super) fn dropout_slice<T: WithDType>(
    x: &[T],
    op: Dropout,
    kept: impl Fn(T) -> T + Sync,
) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(DROPOUT_CHUNK)
        .zip(x.par_chunks(DROPOUT_CHUNK))
        .enumerate()
        .for_each(|(chunk, (ys, xs))| {
            // Counters stepped along the chunk: a division at the chunk's start and at each row
            // start, not per element.
            let mut i = (chunk * DROPOUT_CHUNK) as u64;
            let (mut c, mut j) = (op.counter(i), i % op.len);
            for (y, &x) in ys.iter_mut().zip(xs) {
                if dropout_keeps(op, c) {
                    *y = kept(x);
                }
                (i, j) = (i + 1, j + 1);
                if j == op.len {
                    (c, j) = (op.counter(i), 0);
                } else {
                    c = c.wrapping_add(1);
                }
            }
        });
    y
}

pub(super) fn dropout(s: &CpuStorage, l: &Layout, op: Dropout) -> Result<CpuStorage> {
    if s.dtype() == DType::F64 {
        let scale = f64::from(op.scale);
        let y = dropout_slice(data::<f64>(s, l)?, op, |v| v * scale);
        return Ok(CpuStorage::F64(y));
    }
    by_dtype!(s.dtype(), "dropout", T => {
        let y = dropout_slice(data::<T>(s, l)?, op, |v| T::from_f32(v.to_f32() * op.scale));
        Ok(T::to_cpu_storage_owned(y))
    })
}
