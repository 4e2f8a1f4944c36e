//! The attention kernels' arithmetic as CPU loops (f32, serial): the reference the per-device
//! tests compare with the composition on any machine, and the ops' CPU path.

use super::{AttentionBwd, Geom, Part};
use crate::cpu::DequantOut;
use crate::fused::cpu::{data, with_host, with_mask};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Tensor, WithDType};

type Input<'a> = (&'a CpuStorage, &'a Layout);

/// The forward of [`super::Attention`]: `o [B, H, T, D]`.
pub(super) fn forward(
    (qs, ql): Input<'_>,
    (ks, kl): Input<'_>,
    (vs, vl): Input<'_>,
    mask: Option<&Tensor>,
    g: Geom,
) -> Result<CpuStorage> {
    by_dtype!(qs.dtype(), "attention", T => {
        let (q, k, v) = (data::<T>(qs, ql)?, data::<T>(ks, kl)?, data::<T>(vs, vl)?);
        with_mask::<T, _>(mask, |mask| T::to_cpu_storage_owned(cpu_fwd(q, k, v, mask, g)))
    })
}

/// One part of the backward, applied to `do` (`s`, `l`).
pub(super) fn backward(s: &CpuStorage, l: &Layout, op: &AttentionBwd) -> Result<CpuStorage> {
    let g = op.geom;
    by_dtype!(s.dtype(), "attention backward", T => {
        let dout = data::<T>(s, l)?;
        with_mask::<T, _>(op.mask.as_ref(), |mask| -> Result<CpuStorage> {
            Ok(match &op.part {
                Part::Stats { q, k, o } => with_host3::<T, T, T, _>(q, k, o, |q, k, o| {
                    CpuStorage::F32(cpu_stats(q, k, o, dout, mask, g))
                })?,
                Part::Dq { q, k, v, stats } => with_host3::<T, T, T, _>(q, k, v, |q, k, v| {
                    with_host::<f32, _>(stats, |st| {
                        T::to_cpu_storage_owned(cpu_dq(q, k, v, dout, st, mask, g))
                    })
                })??,
                Part::Dkv { q, k, v, stats } => with_host3::<T, T, T, _>(q, k, v, |q, k, v| {
                    with_host::<f32, _>(stats, |st| {
                        T::to_cpu_storage_owned(cpu_dkv(q, k, v, dout, st, mask, g))
                    })
                })??,
            })
        })?
    })
}

fn with_host3<A: WithDType, B: WithDType, C: WithDType, R>(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    f: impl FnOnce(&[A], &[B], &[C]) -> R,
) -> Result<R> {
    with_host::<A, _>(a, |a| {
        with_host::<B, _>(b, |b| with_host::<C, _>(c, |c| f(a, b, c)))
    })??
}

fn dot<T: DequantOut>(a: &[f32], b: &[T]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y.to_f32()).sum()
}

fn row_f32<T: DequantOut>(x: &[T], row: usize, d: usize) -> Vec<f32> {
    x[row * d..(row + 1) * d]
        .iter()
        .map(|v| v.to_f32())
        .collect()
}

/// `(m, l)` of query row `(b, h, i)` (online softmax over the unmasked keys).
fn stats_of<T: DequantOut>(
    qv: &[f32],
    k: &[T],
    mask: Option<&[T]>,
    g: Geom,
    b: usize,
    h: usize,
    i: usize,
) -> (f32, f32) {
    let kh = h / g.rep();
    let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
    for j in 0..g.tk {
        let mk = g.mask_at(mask, b, i, j);
        if mk == f32::NEG_INFINITY {
            continue;
        }
        let kj = &k[((b * g.hk + kh) * g.tk + j) * g.d..][..g.d];
        let s = dot(qv, kj) * g.scale + mk;
        let m_new = m.max(s);
        l = l * (m - m_new).exp() + (s - m_new).exp();
        m = m_new;
    }
    (m, l)
}

fn cpu_fwd<T: DequantOut>(q: &[T], k: &[T], v: &[T], mask: Option<&[T]>, g: Geom) -> Vec<T> {
    let mut o = Vec::with_capacity(q.len());
    for row in 0..g.b * g.h * g.t {
        let (b, h, i) = g.split(row, g.h, g.t);
        let kh = h / g.rep();
        let qv = row_f32(q, row, g.d);
        let (mut m, mut l, mut acc) = (f32::NEG_INFINITY, 0f32, vec![0f32; g.d]);
        for j in 0..g.tk {
            let mk = g.mask_at(mask, b, i, j);
            if mk == f32::NEG_INFINITY {
                continue;
            }
            let kv_row = ((b * g.hk + kh) * g.tk + j) * g.d;
            let s = dot(&qv, &k[kv_row..kv_row + g.d]) * g.scale + mk;
            let m_new = m.max(s);
            let (corr, p) = ((m - m_new).exp(), (s - m_new).exp());
            l = l * corr + p;
            for (a, x) in acc.iter_mut().zip(&v[kv_row..kv_row + g.d]) {
                *a = *a * corr + p * x.to_f32();
            }
            m = m_new;
        }
        o.extend(acc.iter().map(|a| T::from_f32(a / l)));
    }
    o
}

/// `[L_0, Δ_0, L_1, Δ_1, …]` per query row.
fn cpu_stats<T: DequantOut>(
    q: &[T],
    k: &[T],
    o: &[T],
    dout: &[T],
    mask: Option<&[T]>,
    g: Geom,
) -> Vec<f32> {
    let mut st = Vec::with_capacity(2 * g.b * g.h * g.t);
    for row in 0..g.b * g.h * g.t {
        let (b, h, i) = g.split(row, g.h, g.t);
        let (m, l) = stats_of(&row_f32(q, row, g.d), k, mask, g, b, h, i);
        st.push(m + l.ln());
        st.push(dot(
            &row_f32(o, row, g.d),
            &dout[row * g.d..(row + 1) * g.d],
        ));
    }
    st
}

fn cpu_dq<T: DequantOut>(
    q: &[T],
    k: &[T],
    v: &[T],
    dout: &[T],
    st: &[f32],
    mask: Option<&[T]>,
    g: Geom,
) -> Vec<T> {
    let mut dq = Vec::with_capacity(q.len());
    for row in 0..g.b * g.h * g.t {
        let (b, h, i) = g.split(row, g.h, g.t);
        let kh = h / g.rep();
        let (qv, dov) = (row_f32(q, row, g.d), row_f32(dout, row, g.d));
        let mut acc = vec![0f32; g.d];
        for j in 0..g.tk {
            let mk = g.mask_at(mask, b, i, j);
            if mk == f32::NEG_INFINITY {
                continue;
            }
            let kv_row = ((b * g.hk + kh) * g.tk + j) * g.d;
            let kj = &k[kv_row..kv_row + g.d];
            let p = (dot(&qv, kj) * g.scale + mk - st[2 * row]).exp();
            let ds = p * (dot(&dov, &v[kv_row..kv_row + g.d]) - st[2 * row + 1]);
            for (a, x) in acc.iter_mut().zip(kj) {
                *a += ds * x.to_f32();
            }
        }
        dq.extend(acc.iter().map(|a| T::from_f32(a * g.scale)));
    }
    dq
}

fn cpu_dkv<T: DequantOut>(
    q: &[T],
    k: &[T],
    v: &[T],
    dout: &[T],
    st: &[f32],
    mask: Option<&[T]>,
    g: Geom,
) -> Vec<T> {
    let mut dkv = Vec::with_capacity(2 * k.len());
    for row in 0..g.b * g.hk * g.tk {
        let (b, kh, j) = g.split(row, g.hk, g.tk);
        let (kv, vv) = (row_f32(k, row, g.d), row_f32(v, row, g.d));
        let (mut dk, mut dv) = (vec![0f32; g.d], vec![0f32; g.d]);
        for h in kh * g.rep()..(kh + 1) * g.rep() {
            for i in 0..g.t {
                let mk = g.mask_at(mask, b, i, j);
                if mk == f32::NEG_INFINITY {
                    continue;
                }
                let qrow = (b * g.h + h) * g.t + i;
                let (qi, doi) = (&q[qrow * g.d..][..g.d], &dout[qrow * g.d..][..g.d]);
                let p = (dot(&kv, qi) * g.scale + mk - st[2 * qrow]).exp();
                let ds = p * (dot(&vv, doi) - st[2 * qrow + 1]);
                for c in 0..g.d {
                    dv[c] += p * doi[c].to_f32();
                    dk[c] += ds * qi[c].to_f32();
                }
            }
        }
        dkv.extend(dk.iter().map(|x| T::from_f32(x * g.scale)));
        dkv.extend(dv.iter().map(|x| T::from_f32(*x)));
    }
    dkv
}
