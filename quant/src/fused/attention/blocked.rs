//! Blocked attention: the same function as [`super::attention_fused`], `o = softmax(q·kᵀ · scale
//! + mask) · v`, computed chunk by chunk with the device's matmul (cuBLAS on tensor cores on CUDA)
//! and the fused masked-softmax op and its backward between the two products. A chunk is a group
//! of whole key/value heads (with their `rep` query heads) and a range of query rows, sized so its
//! `[B, heads, rows, Tk]` scores take at most `chunk_bytes`; nothing of a chunk outlives it. The
//! backward recomputes each chunk's scores (as flash attention does) instead of keeping
//! `[T, Tk]` probabilities per head, so memory stays O(chunk) at any sequence length.
//!
//! With `causal` (the caller's promise that its mask hides key `j` from query `i` whenever
//! `j > i + (Tk − T)`, as every causal mask does, whatever else it hides), query rows go in blocks
//! of at most a quarter of T and each block multiplies only the keys its last row can see: at
//! 2048 tokens the products cover 5/8 of `[T, Tk]` instead of all of it.
//!
//! Per chunk, with query heads of one key head stacked as rows (`[B, g, rep·rows, D]`, so k and v
//! are never expanded):
//!
//! ```text
//! forward   S = q kᵀ,  P = softmax(S · scale + mask),  o = P v
//! backward  S, P recomputed;  dP = do vᵀ;  dS = scale · P ⊙ (dP − Σ_j dP ⊙ P)  (the softmax op's
//!           backward);  dq = dS k;  dk += dSᵀ q;  dv += Pᵀ do   (summed over the chunk's rows and
//!           query heads)
//! ```
//!
//! Products run in the inputs' dtype (as the composition's do); the softmax and its backward in
//! f32 inside the fused op, rounded where the composition rounds.
//!
//! On the CPU in f32 (the CPU's training dtype) the same chunks run on the tensors' slices
//! instead of through candle's ops, with the softmax's passes fused and the forward's log-sum-exp
//! kept for the backward ([`super::slices`]); on CUDA and for half types on the CPU, the ops
//! above.

use super::super::cpu::{with_host, with_mask};
use super::super::known::{Known, known_output};
use super::super::ops::{Softmax, SoftmaxBwd};
use super::Shapes;
use super::slices::{self, Rows, Slices};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use std::sync::Arc;

/// Default bytes of one chunk's scores: 8 heads of 2048 × 2048 in bf16; the backward holds about
/// four such tensors (S, P, dP, dS) at once.
pub const CHUNK_BYTES: usize = 64 << 20;
/// On the CPU for half types (f32 runs on `attention/slices.rs`, whose chunks are rows, not bytes):
/// chunks that stay in a core's cache, many of them, run in parallel on rayon (the chunks of a
/// causal mask differ in work, so many small ones balance the threads).
pub const CPU_CHUNK_BYTES: usize = 128 << 10;

/// Bytes of the partial key/value gradients of one backward wave on the CPU (see
/// `Ctx::backward`).
pub const WAVE_BYTES: usize = 64 << 20;

/// How a call is cut into chunks.
#[derive(Debug, Clone, Copy)]
pub struct Blocking {
    /// Bytes of one chunk's scores at most (one row of one key/value group at least).
    pub chunk_bytes: usize,
    /// The mask is causal: query `i` never sees key `j > i + (Tk − T)`.
    pub causal: bool,
    /// Bytes of partial key/value gradients a CPU backward wave may hold ([`WAVE_BYTES`]; 0: one
    /// chunk per wave). Any value gives the same bits: the partials are summed in chunk order.
    pub wave_bytes: usize,
}

impl Blocking {
    /// [`CHUNK_BYTES`], causal or not.
    pub fn new(causal: bool) -> Self {
        Self {
            chunk_bytes: CHUNK_BYTES,
            causal,
            wave_bytes: WAVE_BYTES,
        }
    }

    /// [`CPU_CHUNK_BYTES`] on the CPU, [`CHUNK_BYTES`] elsewhere.
    pub fn for_device(device: &candle_core::Device, causal: bool) -> Self {
        Self {
            chunk_bytes: if device.is_cpu() {
                CPU_CHUNK_BYTES
            } else {
                CHUNK_BYTES
            },
            causal,
            wave_bytes: WAVE_BYTES,
        }
    }
}

/// `f` over the chunks in order: in parallel on rayon on the CPU (candle's CPU ops may run on any
/// thread), one after the other elsewhere (one device stream).
fn map_chunks<R: Send>(
    all: &[Chunk],
    cpu: bool,
    f: impl Fn(Chunk) -> Result<R> + Sync + Send,
) -> Result<Vec<R>> {
    if cpu {
        use rayon::prelude::*;
        all.par_iter().with_max_len(1).map(|&c| f(c)).collect()
    } else {
        all.iter().map(|&c| f(c)).collect()
    }
}

/// `(key/value heads, query rows)` per chunk.
fn plan(s: &Shapes, elem: usize, blocking: Blocking) -> (usize, usize) {
    let rep = s.h / s.hk;
    // Causal: blocks of at most a quarter of the rows, so that keys can be cut per block.
    let max_rows = if blocking.causal {
        s.t.div_ceil(4).max(1)
    } else {
        s.t
    };
    let per_row = s.b * rep * s.tk * elem;
    let per_group = per_row * max_rows;
    if per_group <= blocking.chunk_bytes {
        ((blocking.chunk_bytes / per_group).clamp(1, s.hk), max_rows)
    } else {
        (1, (blocking.chunk_bytes / per_row).clamp(1, max_rows))
    }
}

/// Bytes a blocked attention call holds beyond its inputs, its output (and the copy of it the op
/// keeps for the backward) and the gradients it returns, at its peak (`qlora plan` counts them;
/// each term is what `Ctx::forward` and `Ctx::backward` allocate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockedMemory {
    pub forward: u64,
    pub backward: u64,
    /// Kept by the op for its backward besides its output: the row statistics on the CPU in f32.
    pub held: u64,
}

impl Blocking {
    /// The peak extra memory of a call on `q [b, h, t, d]`, `k, v [b, hk, tk, d]` of `elem`-byte
    /// values, with `workers` chunks in flight at once (the CPU's pool; 1 on a GPU stream).
    #[allow(clippy::too_many_arguments)]
    pub fn memory(
        self,
        (b, h, hk, t, tk, d): (usize, usize, usize, usize, usize, usize),
        elem: usize,
        cpu: bool,
        workers: usize,
    ) -> BlockedMemory {
        let s = Shapes { b, h, hk, t, tk, d };
        let all = chunks(&s, elem, self, cpu);
        let Some(first) = all.first() else {
            return BlockedMemory {
                forward: 0,
                backward: 0,
                held: 0,
            };
        };
        if on_slices(cpu, elem) {
            return slices_memory(&s, &all, workers);
        }
        let rep = h / hk.max(1);
        let inflight = if cpu { workers.max(1) } else { 1 }.min(all.len()) as u64;
        let (g, n, keys) = (first.g as u64, first.n as u64, first.keys as u64);
        let (b, d, tk, rep) = (b as u64, d as u64, tk as u64, rep as u64);
        let e = elem as u64;
        let queries = b * g * rep * n * d * e;
        let kv_chunk = b * g * keys * d * e;
        let scores = b * g * rep * n * keys * e;
        let out = (b * h as u64 * t as u64 * d) * e;
        let kv = (b * hk as u64 * tk * d) * e;
        // Forward: per chunk in flight its stacked queries, keys and values, scores, probabilities
        // and output; all chunk outputs (one output's worth) are collected, then concatenated per
        // group and over groups (two outputs' worth at the last concatenation, which the op's
        // kept output and copy match).
        let fwd_chunk = 2 * queries + 2 * kv_chunk + 2 * scores;
        let forward = (out + inflight * fwd_chunk).saturating_sub(2 * out);
        // Backward: a wave's partial key/value gradients (each padded to all keys, except on the
        // CPU in f32) with its query rows, the running sums (one more pair while a sum is formed,
        // except when added in place), the query-gradient rows and
        // per-group results so far (at most a whole dq, dk, dv), and per chunk in flight its
        // scores, probabilities, their gradients, stacked inputs and unpadded partials; or, at the
        // end, the per-group results with their concatenations.
        let pad = b * g * tk * d * e;
        let per_chunk = 2 * b as usize * first.g * tk as usize * d as usize * elem;
        let wave = if cpu {
            (self.wave_bytes / per_chunk.max(1)).max(1)
        } else {
            1
        };
        let bwd_chunk = 4 * scores + 2 * queries + 4 * kv_chunk;
        // On the CPU in f32 the partials stay unpadded (each its chunk's keys) and are added in
        // place into one pair of sums (`Ctx::backward`): the largest wave's partials.
        let in_place = cpu && elem == 4;
        let waves = if in_place {
            all.chunks(wave)
                .map(|w| {
                    w.iter()
                        .map(|c| queries + 2 * b * g * c.keys as u64 * d * e)
                        .sum::<u64>()
                })
                .max()
                .unwrap_or(0)
                + 2 * pad
        } else {
            wave.min(all.len()) as u64 * (queries + 2 * pad) + 4 * pad
        };
        let during = waves + out + 2 * kv + inflight * bwd_chunk;
        let end = 2 * out + 4 * kv;
        let backward = during.max(end).saturating_sub(out + 2 * kv);
        BlockedMemory {
            forward,
            backward,
            held: 0,
        }
    }
}

/// [`Blocking::memory`] on [`slices`] (f32), each term what [`Ctx::forward`] and
/// [`Ctx::backward_slices`] allocate.
fn slices_memory(s: &Shapes, all: &[Chunk], workers: usize) -> BlockedMemory {
    let f = 4u64;
    let (b, h, t, d) = (s.b as u64, s.h as u64, s.t as u64, s.d as u64);
    let rep = (s.h / s.hk) as u64;
    let inflight = workers.clamp(1, all.len()) as u64;
    let rows = all.iter().map(|c| rep * c.n as u64).max().unwrap_or(0);
    let keys = all.iter().map(|c| c.keys as u64).max().unwrap_or(0);
    let out = b * h * t * d * f;
    let lse = b * h * t * f;
    // Forward: per worker its scratch (scores, stacked queries); every chunk's output rows and
    // statistics collected (an output and L), then the output and L assembled (the output and
    // the op's copy of it are the caller's).
    let forward = inflight * (rows * keys + rows * d) * f + 2 * lse;
    // Backward: the output gradient made contiguous (a transposed view's), every task's dq rows
    // (a dq's worth) and key/value partials, per worker its scratch (probabilities, their
    // gradients, three stacked row blocks); dq, dk and dv are the caller's.
    let rows_of: Vec<slices::Rows> = all.iter().map(|c| c.rows()).collect();
    let partials: u64 = slices::tasks(&rows_of, s.hk)
        .iter()
        .map(|r| {
            let keys = rows_of[r.clone()].iter().map(|c| c.keys).max().unwrap_or(0) as u64;
            2 * b * keys * d * f
        })
        .sum();
    let scratch = inflight * (2 * rows * keys + 3 * rows * d) * f;
    BlockedMemory {
        forward,
        backward: 2 * out + partials + scratch,
        held: lse,
    }
}

/// One chunk: key/value heads `g0..g0 + g`, query rows `i0..i0 + n`, keys `0..keys`.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    g0: usize,
    g: usize,
    i0: usize,
    n: usize,
    keys: usize,
}

impl Chunk {
    /// The chunk on [`slices`] (one key/value head there).
    fn rows(self) -> Rows {
        debug_assert_eq!(self.g, 1);
        Rows {
            g: self.g0,
            i0: self.i0,
            n: self.n,
            keys: self.keys,
        }
    }
}

/// Whether a call runs on [`slices`]: on the CPU in f32.
fn on_slices(cpu: bool, elem: usize) -> bool {
    cpu && elem == 4
}

fn chunks(s: &Shapes, elem: usize, blocking: Blocking, cpu: bool) -> Vec<Chunk> {
    let (g, n) = if on_slices(cpu, elem) {
        (1, slices::positions(s.t, s.h / s.hk))
    } else {
        plan(s, elem, blocking)
    };
    let past = s.tk.saturating_sub(s.t);
    let mut out = Vec::new();
    for g0 in (0..s.hk).step_by(g) {
        for i0 in (0..s.t).step_by(n) {
            let n = n.min(s.t - i0);
            out.push(Chunk {
                g0,
                g: g.min(s.hk - g0),
                i0,
                n,
                keys: if blocking.causal {
                    (i0 + n + past).min(s.tk)
                } else {
                    s.tk
                },
            });
        }
    }
    out
}

/// What every chunk reads.
#[derive(Debug, Clone)]
struct Ctx {
    s: Shapes,
    mask: Option<Tensor>,
    /// Rounded to the dtype, as the composition's affine rounds it.
    scale: f32,
    blocking: Blocking,
}

impl Ctx {
    fn rep(&self) -> usize {
        self.s.h / self.s.hk
    }

    /// Rows `[B, h, T, D]` of the chunk's query heads as `[B, g, rep·n, D]`.
    fn stack(&self, x: &Tensor, c: Chunk) -> Result<Tensor> {
        let rep = self.rep();
        x.narrow(1, c.g0 * rep, c.g * rep)?
            .narrow(2, c.i0, c.n)?
            .contiguous()?
            .reshape((self.s.b, c.g, rep * c.n, self.s.d))
    }

    /// `[B, g, rep·n, D]` back to `[B, g·rep, n, D]`.
    fn unstack(&self, x: &Tensor, c: Chunk) -> Result<Tensor> {
        x.reshape((self.s.b, c.g * self.rep(), c.n, self.s.d))
    }

    /// The keys or values the chunk sees, `[B, g, keys, D]`.
    fn heads(&self, x: &Tensor, c: Chunk) -> Result<Tensor> {
        x.narrow(1, c.g0, c.g)?.narrow(2, 0, c.keys)?.contiguous()
    }

    /// The softmax op of the chunk (its mask's rows and visible keys).
    fn softmax(&self, c: Chunk) -> Result<Softmax> {
        let mask = match &self.mask {
            Some(m) => Some(m.narrow(2, c.i0, c.n)?.narrow(3, 0, c.keys)?.contiguous()?),
            None => None,
        };
        Ok(Softmax {
            mask,
            scale: self.scale,
        })
    }

    /// `(S, P)` of the chunk, both `[B, g·rep, n, keys]`, from its stacked queries `qs`.
    fn scores(&self, qs: &Tensor, kc: &Tensor, c: Chunk) -> Result<(Tensor, Tensor, Softmax)> {
        let s = qs
            .matmul(&kc.t()?)?
            .reshape((self.s.b, c.g * self.rep(), c.n, c.keys))?;
        let op = self.softmax(c)?;
        let p = s.apply_op1_no_bwd(&op)?;
        Ok((s, p, op))
    }

    /// `[B, g·rep, n, keys]` as `[B, g, rep·n, keys]`.
    fn stack_scores(&self, x: &Tensor, c: Chunk) -> Result<Tensor> {
        x.reshape((self.s.b, c.g, self.rep() * c.n, c.keys))
    }

    /// A chunk's `[B, g, keys, D]` key or value gradient, zero beyond its keys, `[B, g, Tk, D]`.
    fn pad_keys(&self, x: Tensor, c: Chunk) -> Result<Tensor> {
        if c.keys == self.s.tk {
            Ok(x)
        } else {
            x.pad_with_zeros(2, 0, self.s.tk - c.keys)
        }
    }

    /// Runs `f` on the call's f32 slices ([`slices`]).
    fn with_slices<R>(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        f: impl FnOnce(&Slices<'_>) -> Result<R>,
    ) -> Result<R> {
        let mask_batch_stride = match &self.mask {
            Some(m) if m.dim(0)? != 1 => self.s.t * self.s.tk,
            _ => 0,
        };
        with_host::<f32, _>(q, |q| {
            with_host::<f32, _>(k, |k| {
                with_host::<f32, _>(v, |v| {
                    with_mask::<f32, _>(self.mask.as_ref(), |mask| {
                        f(&Slices {
                            s: self.s,
                            q,
                            k,
                            v,
                            mask,
                            mask_batch_stride,
                            scale: self.scale,
                        })
                    })?
                })?
            })?
        })?
    }

    /// The output, with its row statistics `L [B, H, T]` on [`slices`] (for the backward).
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Option<Lse>)> {
        let elem = q.dtype().size_in_bytes();
        let cpu = q.device().is_cpu();
        let all = chunks(&self.s, elem, self.blocking, cpu);
        if on_slices(cpu, elem) {
            let s = self.s;
            let (out, lse) = self.with_slices((q, k, v), |sl| {
                let outs = map_chunks(&all, true, |c| Ok(sl.forward(c.rows())))?;
                let mut out = vec![0f32; s.b * s.h * s.t * s.d];
                let mut lse = vec![0f32; s.b * s.h * s.t];
                for (c, (o, l)) in all.iter().zip(&outs) {
                    let at = (c.g0, c.i0, c.n);
                    sl.scatter(o, at, s.d, &mut out);
                    sl.scatter(l, at, 1, &mut lse);
                }
                Ok((out, lse))
            })?;
            let out = Tensor::from_vec(out, (s.b, s.h, s.t, s.d), q.device())?;
            return Ok((out, Some(Arc::new(lse))));
        }
        let mut heads = Vec::new();
        let mut rows = Vec::new();
        let outs = map_chunks(&all, cpu, |c| {
            let (_, p, _) = self.scores(&self.stack(q, c)?, &self.heads(k, c)?, c)?;
            let o = self.stack_scores(&p, c)?.matmul(&self.heads(v, c)?)?;
            self.unstack(&o, c)
        })?;
        for ((idx, &c), o) in all.iter().enumerate().zip(outs) {
            rows.push(o);
            let group_done = all.get(idx + 1).is_none_or(|next| next.g0 != c.g0);
            if group_done {
                heads.push(Tensor::cat(&rows, 2)?);
                rows.clear();
            }
        }
        Ok((Tensor::cat(&heads, 1)?, None))
    }

    /// The chunks' partial key/value gradients each `[B, g, Tk, D]` per chunk in a wave of at
    /// most `wave_bytes` (at least one chunk; one on a GPU stream).
    fn wave(&self, all: &[Chunk], elem: usize, cpu: bool) -> usize {
        let per_chunk = 2 * self.s.b * all.first().map_or(1, |c| c.g) * self.s.tk * self.s.d * elem;
        if cpu {
            (self.blocking.wave_bytes / per_chunk.max(1)).max(1)
        } else {
            1
        }
    }

    /// The backward on [`slices`]: its tasks' dq rows, dk and dv (`[B, keys, D]`) in parallel,
    /// then dq rows written into dq and dk, dv added in place into the `[B, Hk, Tk, D]` sums in
    /// task order, row by row up to each task's keys.
    fn backward_slices(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        (o, dout): (&Tensor, &Tensor),
        lse: Option<&[f32]>,
        all: &[Chunk],
    ) -> Result<(Tensor, Tensor, Tensor)> {
        use rayon::prelude::*;
        let s = self.s;
        let rows: Vec<Rows> = all.iter().map(|c| c.rows()).collect();
        let tasks = slices::tasks(&rows, s.hk);
        let (dq, dk, dv) = self.with_slices((q, k, v), |sl| {
            with_host::<f32, _>(dout, |dout| {
                with_host::<f32, _>(o, |o| {
                    let grads: Vec<slices::Grads> = tasks
                        .par_iter()
                        .with_max_len(1)
                        .map(|r| sl.backward(dout, o, lse, &rows[r.clone()]))
                        .collect();
                    let mut dq = vec![0f32; s.b * s.h * s.t * s.d];
                    let mut dk = vec![0f32; s.b * s.hk * s.tk * s.d];
                    let mut dv = vec![0f32; s.b * s.hk * s.tk * s.d];
                    for (i, (r, g)) in tasks.iter().zip(&grads).enumerate() {
                        let cs = &rows[r.clone()];
                        let (c0, last) = (cs[0], cs[cs.len() - 1]);
                        let keys = cs.iter().map(|c| c.keys).max().unwrap_or(0);
                        sl.scatter(&g.dq, (c0.g, c0.i0, last.i0 + last.n - c0.i0), s.d, &mut dq);
                        let first = i == 0 || rows[tasks[i - 1].start].g != c0.g;
                        sl.add_keys(&g.dk, c0.g, keys, first, &mut dk);
                        sl.add_keys(&g.dv, c0.g, keys, first, &mut dv);
                    }
                    (dq, dk, dv)
                })
            })?
        })?;
        let dev = q.device();
        Ok((
            Tensor::from_vec(dq, (s.b, s.h, s.t, s.d), dev)?,
            Tensor::from_vec(dk, (s.b, s.hk, s.tk, s.d), dev)?,
            Tensor::from_vec(dv, (s.b, s.hk, s.tk, s.d), dev)?,
        ))
    }

    fn backward(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        o: &Tensor,
        dout: &Tensor,
        lse: Option<&[f32]>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let elem = q.dtype().size_in_bytes();
        let cpu = q.device().is_cpu();
        let all = chunks(&self.s, elem, self.blocking, cpu);
        if on_slices(cpu, elem) {
            let (o, dout) = (o.contiguous()?, dout.contiguous()?);
            return self.backward_slices((q, k, v), (&o, &dout), lse, &all);
        }
        let (mut dq_heads, mut dk_heads, mut dv_heads) = (Vec::new(), Vec::new(), Vec::new());
        let mut dq_rows = Vec::new();
        let mut dkv: Option<(Tensor, Tensor)> = None;
        // Each chunk's (dq rows, dk, dv) in parallel on the CPU; dk and dv are then summed over a
        // group's chunks in chunk order, so the result does not depend on the thread count. The
        // chunks go in waves whose partial dk and dv (each `[B, g, Tk, D]`) take at most
        // WAVE_BYTES, and each wave is summed before the next: collecting every chunk's partials
        // first would hold O(chunks × Tk × D), 1 GB for one layer at 2048 tokens.
        let wave = self.wave(&all, elem, cpu);
        for (w, part) in all.chunks(wave).enumerate() {
            let parts = map_chunks(part, cpu, |c| {
                let (qs, kc, vc) = (self.stack(q, c)?, self.heads(k, c)?, self.heads(v, c)?);
                let (s, p, op) = self.scores(&qs, &kc, c)?;
                let dos = self.stack(dout, c)?;
                let dp =
                    dos.matmul(&vc.t()?)?
                        .reshape((self.s.b, c.g * self.rep(), c.n, c.keys))?;
                let ds = s.apply_op2_no_bwd(&dp, &SoftmaxBwd(op))?;
                let (ds, p) = (self.stack_scores(&ds, c)?, self.stack_scores(&p, c)?);
                let dq = self.unstack(&ds.matmul(&kc)?, c)?;
                let (dk, dv) = (ds.t()?.matmul(&qs)?, p.t()?.matmul(&dos)?);
                Ok((dq, self.pad_keys(dk, c)?, self.pad_keys(dv, c)?))
            })?;
            for (i, (&c, (dq, dk, dv))) in part.iter().zip(parts).enumerate() {
                let idx = w * wave + i;
                dq_rows.push(dq);
                dkv = Some(match dkv {
                    Some((pk, pv)) => ((pk + dk)?, (pv + dv)?),
                    None => (dk, dv),
                });
                let group_done = all.get(idx + 1).is_none_or(|next| next.g0 != c.g0);
                if group_done {
                    dq_heads.push(Tensor::cat(&dq_rows, 2)?);
                    dq_rows.clear();
                    let (dk, dv) = dkv.take().expect("a group has chunks");
                    dk_heads.push(dk);
                    dv_heads.push(dv);
                }
            }
        }
        Ok((
            Tensor::cat(&dq_heads, 1)?,
            Tensor::cat(&dk_heads, 1)?,
            Tensor::cat(&dv_heads, 1)?,
        ))
    }
}

/// The op's backward: the chunked one. Its output is computed chunk by chunk outside the graph
/// (or kept from an earlier forward) and handed over by [`Known`], so the op has no forward.
#[derive(Debug, Clone)]
struct Blocked {
    ctx: Ctx,
    /// The forward's row statistics on [`slices`] (none for an output computed earlier: the
    /// backward recomputes them).
    lse: Option<Lse>,
}

/// Row statistics `L [B, H, T]` of a forward on [`slices`].
type Lse = Arc<Vec<f32>>;

impl CustomOp3 for Blocked {
    fn name(&self) -> &'static str {
        "qlora-attention-blocked"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("blocked attention: the output is computed outside the op and handed over by Known")
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = self.ctx.backward(
            (&q.detach(), &k.detach(), &v.detach()),
            &o.detach(),
            &dout.detach(),
            self.lse.as_deref().map(Vec::as_slice),
        )?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// See the module docs.
pub(super) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    blocking: Blocking,
    known: Option<&Tensor>,
) -> Result<Tensor> {
    let s = super::check(q, k, v, mask, None)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let ctx = Ctx {
        s,
        mask: mask.map(Tensor::contiguous).transpose()?,
        scale: super::super::affine_scale(q.dtype(), scale),
        blocking,
    };
    let (out, lse) = match known {
        Some(out) => (out.clone(), None),
        None => ctx.forward(&q.detach(), &k.detach(), &v.detach())?,
    };
    // The op hands over out's whole buffer: exactly the output, copied only if it is a view.
    let out = known_output("attention", &out, &q, q.dims())?;
    q.apply_op3(
        &k,
        &v,
        Known {
            op: Blocked { ctx, lse },
            out,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(b: usize, h: usize, hk: usize, t: usize, tk: usize) -> Shapes {
        Shapes {
            b,
            h,
            hk,
            t,
            tk,
            d: 8,
        }
    }

    #[test]
    fn chunks_cover_every_head_and_row_once_within_the_budget() {
        for causal in [false, true] {
            for (s, budget) in [
                (shapes(2, 8, 2, 5, 7), 1 << 20),
                (shapes(2, 8, 2, 5, 7), 2 * 4 * 7 * 4 * 5),
                (shapes(2, 8, 2, 5, 7), 2 * 4 * 7 * 4 * 2),
                (shapes(1, 4, 4, 9, 9), 1),
                (shapes(1, 32, 32, 2048, 2048), CHUNK_BYTES),
            ] {
                let elem = 4;
                let blocking = Blocking {
                    chunk_bytes: budget,
                    causal,
                    wave_bytes: WAVE_BYTES,
                };
                let mut seen = vec![0u32; s.hk * s.t];
                for c in chunks(&s, elem, blocking, false) {
                    let bytes = s.b * c.g * (s.h / s.hk) * c.n * s.tk * elem;
                    assert!(bytes <= budget.max(s.b * (s.h / s.hk) * s.tk * elem));
                    // Causal: the block's last row sees keys up to its index + (Tk − T).
                    let want_keys = if causal {
                        c.i0 + c.n + (s.tk - s.t)
                    } else {
                        s.tk
                    };
                    assert_eq!(c.keys, want_keys, "{s:?} {c:?}");
                    for g in c.g0..c.g0 + c.g {
                        for i in c.i0..c.i0 + c.n {
                            seen[g * s.t + i] += 1;
                        }
                    }
                }
                assert!(seen.iter().all(|&n| n == 1), "{s:?} {budget} {causal}");
            }
        }
        // Phi-3-mini at 2048 tokens in bf16: 8 heads of full rows per chunk; causal, all 32 heads
        // in blocks of 512 rows seeing 512, 1024, 1536 and 2048 keys.
        let s = shapes(1, 32, 32, 2048, 2048);
        assert_eq!(plan(&s, 2, Blocking::new(false)), (8, 2048));
        assert_eq!(plan(&s, 2, Blocking::new(true)), (32, 512));
        let keys: Vec<usize> = chunks(&s, 2, Blocking::new(true), false)
            .iter()
            .map(|c| c.keys)
            .collect();
        assert_eq!(keys, [512, 1024, 1536, 2048]);
    }
}
