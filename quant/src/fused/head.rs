//! The language-model head and its cross-entropy on the CPU, forward and gradient in one pass over
//! the logits, outside autograd: for normed hidden rows `h: [n, H]`, the head `W: [V, H]` and
//! targets `t`, the summed loss `Σ_i lse(z_i) − z_i,t_i` of `z = h · Wᵀ` and `∂/∂h = (softmax(z) −
//! onehot(t)) · W`. The composition ([`super::cross_entropy_fused`] under candle's autograd) takes
//! three `exp` per logit (the forward's sum, the backward's sum and its probabilities) and keeps
//! `[n, V]` logits, their gradient and the autograd's zero-filled accumulators alive together; here
//! each block of 64 rows is multiplied into one reused buffer, exponentiated once in place (the
//! probabilities overwrite the logits), and multiplied back, so the head costs its two gemms plus one
//! `exp` per logit, and 64·V floats of memory.

use candle_core::{DType, Device, Result, Tensor, bail};
use rayon::prelude::*;

/// Rows of the head multiplied per block (the logits buffer is `BLOCK_ROWS × V` f32).
const BLOCK_ROWS: usize = 64;

/// `(Σ loss, d Σ loss / d h)` of the head `w: [V, H]` on rows `h: [n, H]` against `targets`
/// (each `< V`), f32 on the CPU. The loss is summed in f64.
pub fn head_cross_entropy_cpu(h: &Tensor, w: &Tensor, targets: &[u32]) -> Result<(f64, Tensor)> {
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
    let threads = gemm::Parallelism::Rayon(rayon::current_num_threads());
    let mut dh = vec![0f32; n * hd];
    let mut z = vec![0f32; BLOCK_ROWS.min(n.max(1)) * v];
    let mut loss = 0f64;
    for start in (0..n).step_by(BLOCK_ROWS) {
        let rows = BLOCK_ROWS.min(n - start);
        let z = &mut z[..rows * v];
        // SAFETY: z is [rows, V] (row stride V); lhs is h's rows [rows, H]; rhs is Wᵀ [H, V]
        // (element (k, j) = W[j, k]: column stride H, row stride 1).
        unsafe {
            gemm::gemm(
                rows,
                v,
                hd,
                z.as_mut_ptr(),
                1,
                v as isize,
                false,
                hv[start * hd..].as_ptr(),
                1,
                hd as isize,
                wv.as_ptr(),
                hd as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                threads,
            );
        }
        // Per row: max, Σ exp (each exp written in place), loss; then p − onehot in place.
        let row_loss: Vec<f64> = z
            .par_chunks_mut(v)
            .zip(targets[start..start + rows].par_iter())
            .map(|(row, &t)| {
                let t = t as usize;
                let m = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let zt = row[t];
                let mut sum = 0f32;
                for x in row.iter_mut() {
                    *x = (*x - m).exp();
                    sum += *x;
                }
                let lse = sum.ln() + m;
                for x in row.iter_mut() {
                    *x /= sum;
                }
                row[t] -= 1.0;
                f64::from(lse - zt)
            })
            .collect();
        loss += row_loss.iter().sum::<f64>();
        // SAFETY: dst is dh's rows [rows, H]; lhs is z [rows, V]; rhs is W [V, H].
        unsafe {
            gemm::gemm(
                rows,
                hd,
                v,
                dh[start * hd..].as_mut_ptr(),
                1,
                hd as isize,
                false,
                z.as_ptr(),
                1,
                v as isize,
                wv.as_ptr(),
                1,
                hd as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                threads,
            );
        }
    }
    Ok((loss, Tensor::from_vec(dh, (n, hd), &Device::Cpu)?))
}
