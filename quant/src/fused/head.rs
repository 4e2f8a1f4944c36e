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
use super::gemm::{mm, rm};
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
    let (n, hd) = h.dims2()?;
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
    let mut dh = vec![0f32; n * hd];
    let mut dw = if want_dw {
        vec![0f32; v * hd]
    } else {
        Vec::new()
    };
    let mut z = vec![0f32; BLOCK_ROWS.min(n.max(1)) * v];
    let mut loss = 0f64;
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
        );
        // Per row: max, Σ exp (each exp written in place), loss; then p − onehot in place.
        let row_loss: Vec<f64> = z
            .par_chunks_mut(v)
            .zip(targets[start..start + rows].par_iter())
            .map(|(row, &t)| {
                let t = t as usize;
                let zt = row[t];
                let (m, sum) = exp_sum_in_place(row);
                let lse = sum.ln() + m;
                for x in row.iter_mut() {
                    *x /= sum;
                }
                row[t] -= 1.0;
                f64::from(lse - zt)
            })
            .collect();
        loss += row_loss.iter().sum::<f64>();
        mm(
            (rows, hd, v),
            &mut dh[start * hd..],
            false,
            rm(z, v, false),
            rm(wv, hd, false),
            1.0,
        );
        if want_dw {
            mm(
                (v, hd, rows),
                &mut dw,
                true,
                rm(z, v, true),
                rm(&hv[start * hd..], hd, false),
                1.0,
            );
        }
    }
    let dw = if want_dw {
        Some(Tensor::from_vec(dw, (v, hd), &Device::Cpu)?)
    } else {
        None
    };
    Ok((loss, Tensor::from_vec(dh, (n, hd), &Device::Cpu)?, dw))
}
