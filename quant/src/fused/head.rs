//! The language-model head and its cross-entropy on the CPU, forward and gradient in one pass over
//! the logits, outside autograd: for normed hidden rows `h: [n, H]`, the head `W: [V, H]` and
//! targets `t`, the summed loss `Σ_i lse(z_i) − z_i,t_i` of `z = h · Wᵀ` and `∂/∂h = (softmax(z) −
//! onehot(t)) · W`. The composition ([`super::cross_entropy_fused`] under candle's autograd) takes
//! three `exp` per logit (the forward's sum, the backward's sum and its probabilities) and keeps
//! `[n, V]` logits, their gradient and the autograd's zero-filled accumulators alive together; here
//! each block of 64 rows is multiplied into one reused buffer, exponentiated once in place (the
//! probabilities overwrite the logits), and multiplied back, so the head costs its two gemms plus one
//! `exp` per logit, and 64·V floats of memory.

use super::cpu::exp_sum_in_place;
use super::gemm::{Threads, mm, rm};
use candle_core::{DType, Device, Result, Tensor, bail};
use rayon::prelude::*;

/// Rows of the head multiplied per block (the logits buffer is `BLOCK_ROWS × V` f32).
const BLOCK_ROWS: usize = 64;

/// `(Σ loss, d Σ loss / d h)` of the head `w: [V, H]` on rows `h: [n, H]` against `targets`
/// (each `< V`), f32 on the CPU. The loss is summed in f64.
pub fn head_cross_entropy_cpu(h: &Tensor, w: &Tensor, targets: &[u32]) -> Result<(f64, Tensor)> {
    let (loss, dh, _) = head_cross_entropy_cpu_with(h, w, targets, false)?;
    Ok((loss, dh))
}

/// [`head_cross_entropy_cpu`], and with `want_dw` also the head's own gradient
/// `d Σ loss / d w = Σ_blocks (softmax(z) − onehot)ᵀ · h_block` (`[V, H]`, accumulated block by
/// block from the same probabilities: one gemm more per block), for a trainable head.
pub fn head_cross_entropy_cpu_with(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    want_dw: bool,
) -> Result<(f64, Tensor, Option<Tensor>)> {
    let (loss, dh, dw, _) = head_cross_entropy_cpu_lora(h, w, targets, want_dw, None)?;
    Ok((loss, dh, dw))
}

/// A LoRA on the head for [`head_cross_entropy_cpu_lora`]: its input rows `hd: [n, H]` (the head's
/// input after the adapter's dropout), `a: [r, H]`, `b: [V, r]` and the scale.
#[derive(Debug, Clone, Copy)]
pub struct HeadLora<'a> {
    pub hd: &'a Tensor,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f32,
}

/// The gradients of a [`HeadLora`]: `(d hd [n, H], dA [r, H], dB [V, r])`.
pub type HeadLoraGrads = (Tensor, Tensor, Tensor);

/// [`head_cross_entropy_cpu_with`] with a LoRA on the head: `z = h·Wᵀ + s·(hd·Aᵀ)·Bᵀ` block by
/// block (`u = hd·Aᵀ` once), and from each block's `dz` also `t = dz·B`, `d hd = s·t·A`,
/// `dA += s·tᵀ·hd`, `dB += s·dzᵀ·u`: four thin gemms more per block.
pub fn head_cross_entropy_cpu_lora(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    want_dw: bool,
    lora: Option<HeadLora<'_>>,
) -> Result<(f64, Tensor, Option<Tensor>, Option<HeadLoraGrads>)> {
    let out = head_cpu(
        h,
        w,
        targets,
        HeadOptions {
            want_grad: true,
            want_dw,
            lora,
            weights: None,
        },
    )?;
    Ok((
        out.loss,
        out.dh.expect("asked for the gradient"),
        out.dw,
        out.lora,
    ))
}

/// What [`head_cpu`] computes beyond the loss.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeadOptions<'a> {
    /// `d loss / d h` (and the LoRA's gradients); without it, only the per-row values.
    pub want_grad: bool,
    /// The head's own gradient (a trainable head), with `want_grad`.
    pub want_dw: bool,
    pub lora: Option<HeadLora<'a>>,
    /// Per-row weights `c_i` of the loss `Σ_i c_i · nll_i` (all 1 when `None`): a sequence-level
    /// objective's `−∂L/∂ log p` per scored token.
    pub weights: Option<&'a [f32]>,
}

/// [`head_cpu`]'s results: the weighted summed loss, each row's `nll_i = lse(z_i) − z_i,t_i` and
/// `Σ_v z_i,v` (unweighted, f64), and the gradients that were asked for.
#[derive(Debug)]
pub struct HeadOutput {
    pub loss: f64,
    pub row_nll: Vec<f64>,
    pub row_logit_sum: Vec<f64>,
    pub dh: Option<Tensor>,
    pub dw: Option<Tensor>,
    pub lora: Option<HeadLoraGrads>,
}

/// The fused head with per-row weights and per-row values: [`head_cross_entropy_cpu_lora`] is its
/// unweighted, gradient-taking case. The gradient of a weighted row is its unweighted gradient
/// times the weight (`c_i · (softmax(z_i) − onehot(t_i))`), so a weight costs one multiply per
/// logit.
pub fn head_cpu(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    opts: HeadOptions<'_>,
) -> Result<HeadOutput> {
    let HeadOptions {
        want_grad,
        want_dw,
        lora,
        weights,
    } = opts;
    let want_dw = want_dw && want_grad;
    let (n, hd) = h.dims2()?;
    if weights.is_some_and(|c| c.len() != n) {
        bail!(
            "head_cpu: {} weights for {n} rows",
            weights.map_or(0, <[f32]>::len)
        );
    }
    let (v, w_h) = w.dims2()?;
    if !h.device().is_cpu() || h.dtype() != DType::F32 || w.dtype() != DType::F32 {
        bail!("head_cross_entropy_cpu: h and w must be f32 on the CPU");
    }
    if w_h != hd || targets.len() != n {
        bail!(
            "head_cross_entropy_cpu: h [{n}, {hd}], w [{v}, {w_h}] and {} targets do not fit",
            targets.len()
        );
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= v) {
        bail!("head_cross_entropy_cpu: target {t} is not below the vocabulary size {v}");
    }
    let h = h.contiguous()?;
    let w = w.contiguous()?;
    let hv = h.flatten_all()?.to_vec1::<f32>()?;
    let (wg, wl) = w.storage_and_layout();
    let wv: &[f32] = match &*wg {
        candle_core::Storage::Cpu(s) => {
            let (a, b) = wl.contiguous_offsets().expect("made contiguous above");
            &s.as_slice::<f32>()?[a..b]
        }
        _ => bail!("head_cross_entropy_cpu: w is not on the CPU"),
    };
    let mut dh = if want_grad {
        vec![0f32; n * hd]
    } else {
        Vec::new()
    };
    let mut dw = if want_dw {
        vec![0f32; v * hd]
    } else {
        Vec::new()
    };
    let host = |t: &Tensor| -> Result<Vec<f32>> {
        if !t.device().is_cpu() || t.dtype() != DType::F32 {
            bail!("head_cross_entropy_cpu: the head's LoRA tensors must be f32 on the CPU");
        }
        t.flatten_all()?.to_vec1::<f32>()
    };
    // The LoRA's host data, `u = hd·Aᵀ` and its gradients' buffers.
    let lo = match &lora {
        None => None,
        Some(l) => {
            let (r, a_h) = l.a.dims2()?;
            let (b_v, b_r) = l.b.dims2()?;
            if a_h != hd || b_v != v || b_r != r || l.hd.dims() != [n, hd] {
                bail!(
                    "head_cross_entropy_cpu: the head's LoRA A {:?}, B {:?}, input {:?} do not fit h [{n}, {hd}] and V {v}",
                    l.a.dims(),
                    l.b.dims(),
                    l.hd.dims()
                );
            }
            let (hdv, av, bv) = (host(l.hd)?, host(l.a)?, host(l.b)?);
            let mut u = vec![0f32; n * r];
            mm(
                (n, r, hd),
                &mut u,
                false,
                rm(&hdv, hd, false),
                rm(&av, hd, true),
                1.0,
                Threads::Pool,
            );
            Some((r, l.scale, hdv, av, bv, u))
        }
    };
    let (mut dhd, mut da, mut db) = match &lo {
        Some((r, ..)) if want_grad => (vec![0f32; n * hd], vec![0f32; r * hd], vec![0f32; v * r]),
        _ => (Vec::new(), Vec::new(), Vec::new()),
    };
    let mut z = vec![0f32; BLOCK_ROWS.min(n.max(1)) * v];
    let mut loss = 0f64;
    let (mut row_nll, mut row_logit_sum) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for start in (0..n).step_by(BLOCK_ROWS) {
        let rows = BLOCK_ROWS.min(n - start);
        let z = &mut z[..rows * v];
        mm(
            (rows, v, hd),
            z,
            false,
            rm(&hv[start * hd..], hd, false),
            rm(wv, hd, true),
            1.0,
            Threads::Pool,
        );
        if let Some((r, s, _, _, bv, u)) = &lo {
            mm(
                (rows, v, *r),
                z,
                true,
                rm(&u[start * r..], *r, false),
                rm(bv, *r, true),
                *s,
                Threads::Pool,
            );
        }
        // Per row: Σ z, max, Σ exp (each exp written in place), loss; then c·(p − onehot) in
        // place.
        let block_weights = weights.map(|c| &c[start..start + rows]);
        let row_loss: Vec<(f64, f64)> = z
            .par_chunks_mut(v)
            .enumerate()
            .zip(targets[start..start + rows].par_iter())
            .map(|((i, row), &t)| {
                let t = t as usize;
                let zt = row[t];
                let zsum: f64 = row.iter().map(|&x| f64::from(x)).sum();
                let (m, sum) = exp_sum_in_place(row);
                let lse = sum.ln() + m;
                if want_grad {
                    match block_weights {
                        None => {
                            for x in row.iter_mut() {
                                *x /= sum;
                            }
                            row[t] -= 1.0;
                        }
                        Some(c) => {
                            let c = c[i];
                            for x in row.iter_mut() {
                                *x = *x / sum * c;
                            }
                            row[t] -= c;
                        }
                    }
                }
                (f64::from(lse - zt), zsum)
            })
            .collect();
        for (i, (nll, zsum)) in row_loss.into_iter().enumerate() {
            loss += block_weights.map_or(1.0, |c| f64::from(c[i])) * nll;
            row_nll.push(nll);
            row_logit_sum.push(zsum);
        }
        if !want_grad {
            continue;
        }
        mm(
            (rows, hd, v),
            &mut dh[start * hd..],
            false,
            rm(z, v, false),
            rm(wv, hd, false),
            1.0,
            Threads::Pool,
        );
        if want_dw {
            mm(
                (v, hd, rows),
                &mut dw,
                true,
                rm(z, v, true),
                rm(&hv[start * hd..], hd, false),
                1.0,
                Threads::Pool,
            );
        }
        if let Some((r, s, hdv, av, bv, u)) = &lo {
            let r = *r;
            let mut t = vec![0f32; rows * r];
            mm(
                (rows, r, v),
                &mut t,
                false,
                rm(z, v, false),
                rm(bv, r, false),
                1.0,
                Threads::Pool,
            );
            mm(
                (rows, hd, r),
                &mut dhd[start * hd..],
                false,
                rm(&t, r, false),
                rm(av, hd, false),
                *s,
                Threads::Pool,
            );
            mm(
                (r, hd, rows),
                &mut da,
                true,
                rm(&t, r, true),
                rm(&hdv[start * hd..], hd, false),
                *s,
                Threads::Pool,
            );
            mm(
                (v, r, rows),
                &mut db,
                true,
                rm(z, v, true),
                rm(&u[start * r..], r, false),
                *s,
                Threads::Pool,
            );
        }
    }
    let dw = if want_dw {
        Some(Tensor::from_vec(dw, (v, hd), &Device::Cpu)?)
    } else {
        None
    };
    let lora_grads = match lo {
        Some((r, ..)) if want_grad => Some((
            Tensor::from_vec(dhd, (n, hd), &Device::Cpu)?,
            Tensor::from_vec(da, (r, hd), &Device::Cpu)?,
            Tensor::from_vec(db, (v, r), &Device::Cpu)?,
        )),
        _ => None,
    };
    let dh = if want_grad {
        Some(Tensor::from_vec(dh, (n, hd), &Device::Cpu)?)
    } else {
        None
    };
    Ok(HeadOutput {
        loss,
        row_nll,
        row_logit_sum,
        dh,
        dw,
        lora: lora_grads,
    })
}
