//! The blocked attention on the CPU in f32, computed on the tensors' slices. A chunk is one
//! key/value head and about [`ROWS`] stacked query rows (`ROWS / rep` positions `i0..i0 + n` of
//! each of its `rep` query heads), seeing keys `0..keys`; its products are single-threaded gemm
//! calls on `[rows, D] · [D, keys]` operands read in place (keys and values are never copied,
//! queries only to stack heads), with the softmax's elementwise passes fused between them:
//!
//! ```text
//! forward   x = S · scale + mask, m = max_j x  (one pass over S = q kᵀ)
//!           e = exp(x − m), l = Σ_j e           (one pass)
//!           o = (e v) / l,  L = m + ln l        (the row statistic the backward reads)
//! backward  P = exp(S · scale + mask − L)       (one pass over the recomputed S)
//!           dP = do vᵀ,  Δ = do · o  (per row; = Σ_j P ⊙ dP as o = P v)
//!           dS = P ⊙ (dP − Δ) · scale           (one pass)
//!           dq = dS k,  dk += dSᵀ q,  dv += Pᵀ do
//! ```
//!
//! `L` comes from the forward that computed the output; given an output computed earlier
//! (selective recomputation), the backward recomputes `L` with the forward's own passes, so the
//! gradients are the same bits either way. The backward runs in [`tasks`]: runs of a head's
//! consecutive chunks, each accumulating its key/value gradients in its own buffer, summed over a
//! head's tasks in task order afterwards; the cut depends on the shapes only, so the bits do not
//! depend on the thread count. Scores live in per-thread scratch buffers reused across calls
//! (nothing `[rows, keys]`-sized is allocated, zeroed or faulted in per chunk).
//!
//! Why not candle's ops per chunk: at 4096 tokens the 128 KiB chunks they were sized for hold 8
//! query rows, so every product was an 8-row gemm behind a dozen tensor allocations, and every
//! chunk's key/value gradients were a fresh allocation (18 GB of pages per step of the 135M model).

use super::super::gemm::{Threads, mm, rm};
use super::Shapes;
use crate::vmath;
use std::cell::RefCell;

/// Stacked query rows a chunk aims for (its rows are `max(1, ROWS / rep)` positions of each of
/// its `rep` query heads).
pub const ROWS: usize = 64;

/// Work units the backward aims for: each key/value head's chunks are cut into
/// `ceil(UNITS / Hk)` tasks (at most one per chunk), so a call has about `UNITS` of them or one
/// per head. Fixed, not the thread count, so that the sums' order is.
pub const UNITS: usize = 32;

/// Query positions per chunk for `rep` query heads per key/value head.
pub(super) fn positions(t: usize, rep: usize) -> usize {
    (ROWS / rep.max(1)).clamp(1, t.max(1))
}

/// One chunk: key/value head `g`, query positions `i0..i0 + n`, keys `0..keys` (every batch).
#[derive(Debug, Clone, Copy)]
pub(super) struct Rows {
    pub g: usize,
    pub i0: usize,
    pub n: usize,
    pub keys: usize,
}

/// Consecutive chunks of one head, `[first, first + len)` of the call's chunk list, cut so that
/// each head's tasks have about equal work (keys × rows).
pub(super) fn tasks(all: &[Rows], hk: usize) -> Vec<std::ops::Range<usize>> {
    let per_head = UNITS.div_ceil(hk.max(1)).max(1) as u64;
    let work = |c: &Rows| (c.keys * c.n) as u64;
    let mut out = Vec::new();
    let mut start = 0;
    while start < all.len() {
        let g = all[start].g;
        let end = start + all[start..].iter().take_while(|c| c.g == g).count();
        let total: u64 = all[start..end].iter().map(work).sum();
        let parts = per_head.min((end - start) as u64);
        // Task k closes at the first chunk where the head's work so far reaches k+1 shares.
        let (mut from, mut done, mut k) = (start, 0u64, 0u64);
        for (i, c) in all[start..end].iter().enumerate() {
            done += work(c);
            if done * parts >= (k + 1) * total {
                out.push(from..start + i + 1);
                from = start + i + 1;
                k += 1;
            }
        }
        if from < end {
            out.push(from..end);
        }
        start = end;
    }
    out
}

/// A call's inputs as f32 slices: `q [B, H, T, D]`, `k, v [B, Hk, Tk, D]`, `mask [B or 1, 1, T,
/// Tk]` (`mask_batch_stride` elements between batches, 0 for one mask).
pub(super) struct Slices<'a> {
    pub s: Shapes,
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub mask: Option<&'a [f32]>,
    pub mask_batch_stride: usize,
    pub scale: f32,
}

/// A task's backward: `dq` rows `[B, rep, n, D]` of its positions, and its key and value
/// gradients `[B, keys, D]` (summed over its chunks' rows and query heads; `keys`: its last
/// chunk's).
pub(super) struct Grads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
}

thread_local! {
    /// Per-thread scratch: scores, their gradients, stacked rows (grown, never shrunk).
    static SCRATCH: RefCell<[Vec<f32>; 5]> = const { RefCell::new([const { Vec::new() }; 5]) };
}

/// `f` with this thread's scratch buffers, each at least the given length (contents arbitrary).
fn with_scratch<R>(lens: [usize; 5], f: impl FnOnce(&mut [Vec<f32>; 5]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        for (v, &n) in s.iter_mut().zip(&lens) {
            if v.len() < n {
                v.resize(n, 0.0);
            }
        }
        f(&mut s)
    })
}

impl Slices<'_> {
    fn rep(&self) -> usize {
        self.s.h / self.s.hk
    }

    /// The chunk's rows of `x [B, H, T, D]` in batch `b`, stacked `[rep·n, D]` into `out`.
    fn stack(&self, x: &[f32], b: usize, c: Rows, out: &mut [f32]) {
        let (s, rep) = (self.s, self.rep());
        let len = c.n * s.d;
        for r in 0..rep {
            let start = ((b * s.h + c.g * rep + r) * s.t + c.i0) * s.d;
            out[r * len..(r + 1) * len].copy_from_slice(&x[start..start + len]);
        }
    }

    /// The chunk's keys or values `[keys, D]` in batch `b`, in place.
    fn heads<'x>(&self, x: &'x [f32], b: usize, c: Rows) -> &'x [f32] {
        let start = (b * self.s.hk + c.g) * self.s.tk * self.s.d;
        &x[start..start + c.keys * self.s.d]
    }

    /// The mask row of query position `i` in batch `b`, its first `keys` values.
    fn mask_row(&self, b: usize, i: usize, keys: usize) -> Option<&[f32]> {
        self.mask.map(|m| {
            let start = b * self.mask_batch_stride + i * self.s.tk;
            &m[start..start + keys]
        })
    }

    /// `S = qs kᵀ [rep·n, keys]` into `s`.
    fn scores(&self, qs: &[f32], kc: &[f32], c: Rows, s: &mut [f32]) {
        let (d, rows) = (self.s.d, self.rep() * c.n);
        mm(
            (rows, c.keys, d),
            s,
            false,
            rm(qs, d, false),
            rm(kc, d, true),
            1.0,
            Threads::Caller,
        );
    }

    /// The forward's passes over `S` in place, row `r` of `rep·n`: `e = exp(S · scale + mask − m)`;
    /// returns each row's `(m, l = Σ e)`.
    fn exp_rows(&self, b: usize, c: Rows, s: &mut [f32], stats: &mut Vec<(f32, f32)>) {
        stats.clear();
        for (r, row) in s[..self.rep() * c.n * c.keys]
            .chunks_exact_mut(c.keys)
            .enumerate()
        {
            let m =
                vmath::scale_mask_max(row, self.scale, self.mask_row(b, c.i0 + r % c.n, c.keys));
            stats.push((m, vmath::exp_sub_sum(row, m)));
        }
    }

    /// The chunk's output rows `[B, rep, n, D]` and their row statistics `L [B, rep, n]`.
    pub fn forward(&self, c: Rows) -> (Vec<f32>, Vec<f32>) {
        let (d, rows) = (self.s.d, self.rep() * c.n);
        let mut out = vec![0f32; self.s.b * rows * d];
        let mut lse = Vec::with_capacity(self.s.b * rows);
        let mut stats = Vec::with_capacity(rows);
        with_scratch([rows * c.keys, rows * d, 0, 0, 0], |[s, qs, ..]| {
            for (b, o) in out.chunks_exact_mut(rows * d).enumerate() {
                self.stack(self.q, b, c, qs);
                self.scores(qs, self.heads(self.k, b, c), c, s);
                self.exp_rows(b, c, s, &mut stats);
                let vc = self.heads(self.v, b, c);
                mm(
                    (rows, d, c.keys),
                    o,
                    false,
                    rm(s, c.keys, false),
                    rm(vc, d, false),
                    1.0,
                    Threads::Caller,
                );
                for (orow, &(m, l)) in o.chunks_exact_mut(d).zip(&stats) {
                    orow.iter_mut().for_each(|x| *x /= l);
                    lse.push(m + l.ln());
                }
            }
        });
        (out, lse)
    }

    /// A task's gradients (its chunks `cs`, consecutive positions of one head) for the output
    /// gradient `dout` and the output `o` (`[B, H, T, D]` both), with the forward's row
    /// statistics `lse [B, H, T]` if it kept them.
    pub fn backward(&self, dout: &[f32], o: &[f32], lse: Option<&[f32]>, cs: &[Rows]) -> Grads {
        let (s, d, rep) = (self.s, self.s.d, self.rep());
        let (first, last) = (cs[0], cs[cs.len() - 1]);
        let n_all = last.i0 + last.n - first.i0;
        let keys_all = cs.iter().map(|c| c.keys).max().unwrap_or(0);
        let mut g = Grads {
            dq: vec![0f32; s.b * rep * n_all * d],
            dk: vec![0f32; s.b * keys_all * d],
            dv: vec![0f32; s.b * keys_all * d],
        };
        let max_rows = cs.iter().map(|c| rep * c.n).max().unwrap_or(0);
        let lens = [
            max_rows * keys_all,
            max_rows * keys_all,
            max_rows * d,
            max_rows * d,
            max_rows * d,
        ];
        let mut stats = Vec::with_capacity(max_rows);
        with_scratch(lens, |[p, ds, qs, dos, dq]| {
            for b in 0..s.b {
                for (ci, &c) in cs.iter().enumerate() {
                    let rows = rep * c.n;
                    let (kc, vc) = (self.heads(self.k, b, c), self.heads(self.v, b, c));
                    self.stack(self.q, b, c, qs);
                    self.stack(dout, b, c, dos);
                    self.scores(qs, kc, c, p);
                    // The row statistic L of row r (head g·rep + r / n, position i0 + r % n).
                    let row_at = |r: usize| (b * s.h + c.g * rep + r / c.n) * s.t + c.i0 + r % c.n;
                    match lse {
                        Some(lse) => {
                            for (r, row) in p[..rows * c.keys].chunks_exact_mut(c.keys).enumerate()
                            {
                                let m = self.mask_row(b, c.i0 + r % c.n, c.keys);
                                vmath::scale_mask_exp(row, self.scale, m, lse[row_at(r)]);
                            }
                        }
                        None => {
                            // L as the forward computes it (its passes leave e in p), then S
                            // again for P = exp(x − L): the same bits as the forward's L gives.
                            self.exp_rows(b, c, p, &mut stats);
                            self.scores(qs, kc, c, p);
                            for (r, row) in p[..rows * c.keys].chunks_exact_mut(c.keys).enumerate()
                            {
                                let (m, l) = stats[r];
                                let mrow = self.mask_row(b, c.i0 + r % c.n, c.keys);
                                vmath::scale_mask_exp(row, self.scale, mrow, m + l.ln());
                            }
                        }
                    }
                    mm(
                        (rows, c.keys, d),
                        ds,
                        false,
                        rm(dos, d, false),
                        rm(vc, d, true),
                        1.0,
                        Threads::Caller,
                    );
                    for (r, (pr, dr)) in p[..rows * c.keys]
                        .chunks_exact(c.keys)
                        .zip(ds.chunks_exact_mut(c.keys))
                        .enumerate()
                    {
                        let at = row_at(r) * d;
                        let delta = vmath::dot(&dout[at..at + d], &o[at..at + d]);
                        vmath::softmax_grad(pr, dr, delta, self.scale);
                    }
                    mm(
                        (rows, d, c.keys),
                        dq,
                        false,
                        rm(ds, c.keys, false),
                        rm(kc, d, false),
                        1.0,
                        Threads::Caller,
                    );
                    // dq rows into the task's [B, rep, n_all, D].
                    for r in 0..rep {
                        let dst = ((b * rep + r) * n_all + c.i0 - first.i0) * d;
                        let src = r * c.n * d;
                        g.dq[dst..dst + c.n * d].copy_from_slice(&dq[src..src + c.n * d]);
                    }
                    let kv = b * keys_all * d..b * keys_all * d + c.keys * d;
                    let acc = ci > 0;
                    mm(
                        (c.keys, d, rows),
                        &mut g.dk[kv.clone()],
                        acc,
                        rm(ds, c.keys, true),
                        rm(qs, d, false),
                        1.0,
                        Threads::Caller,
                    );
                    mm(
                        (c.keys, d, rows),
                        &mut g.dv[kv],
                        acc,
                        rm(p, c.keys, true),
                        rm(dos, d, false),
                        1.0,
                        Threads::Caller,
                    );
                }
            }
        });
        g
    }

    /// Writes rows `[B, rep, n, D]` of head `g`'s positions `i0..i0 + n` into `dst [B, H, T, D]`
    /// (or `[B, H, T]` with `d = 1`).
    pub fn scatter(
        &self,
        rows: &[f32],
        (g, i0, n): (usize, usize, usize),
        d: usize,
        dst: &mut [f32],
    ) {
        let (s, rep) = (self.s, self.rep());
        let len = n * d;
        for b in 0..s.b {
            for r in 0..rep {
                let start = ((b * s.h + g * rep + r) * s.t + i0) * d;
                let src = (b * rep + r) * len;
                dst[start..start + len].copy_from_slice(&rows[src..src + len]);
            }
        }
    }

    /// Adds a task's key or value gradient `[B, keys, D]` into `acc [B, Hk, Tk, D]` (copies it
    /// when `first`, the head's first task, into the zeros `acc` starts as).
    pub fn add_keys(&self, part: &[f32], g: usize, keys: usize, first: bool, acc: &mut [f32]) {
        let s = self.s;
        let len = keys * s.d;
        for b in 0..s.b {
            let start = (b * s.hk + g) * s.tk * s.d;
            let dst = &mut acc[start..start + len];
            let src = &part[b * len..(b + 1) * len];
            if first {
                dst.copy_from_slice(src);
            } else {
                dst.iter_mut().zip(src).for_each(|(a, x)| *a += x);
            }
        }
    }
}
