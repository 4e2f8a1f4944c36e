//! The loss and the LoRA gradients of one batch, in one place, with per-block gradient
//! checkpointing behind a switch.
//!
//! The loss is the summed cross-entropy over target positions (`targets[t]` is the token position
//! `t` must predict, or −100). Only those positions are projected to the vocabulary, in chunks of
//! rows: the head's gradient `dh` is computed chunk by chunk on detached hidden states, so the full
//! `[tokens, V]` logits and their gradient never coexist; then `sum(h · dh)` is backpropagated
//! through the trunk, which seeds the trunk's output gradient with exactly `dh`.
//!
//! With checkpointing, each block follows its [`BlockPolicy`]: `Recompute` keeps only the block's
//! (detached) input, `Selective` also the outputs of its attention and gate/up ops
//! (`model::phi3::Tap`), `Keep` its whole graph over its input made a variable. The backward walks
//! the blocks in reverse, recomputes block `l` on its saved input made a variable (handing the kept
//! outputs back to their ops, which then run only their backward), backpropagates `sum(out · g)`
//! (seeding the block output's gradient with `g`), keeps the LoRA gradients of that block and takes
//! the input's gradient as the next `g`; each block's saved values are freed as it is done.
//! Dropout masks are drawn from seeds, so the recomputed forward is the same forward.

use crate::lora::ForwardCtx;
use crate::model::Phi3;
use crate::model::phi3::{Kept, OpPath, Tap};
use crate::train::policy::{BlockPolicy, Checkpointing};
use candle_core::{D, DType, Result, Tensor, Var};

/// Rows of the vocabulary projection per chunk.
pub const HEAD_CHUNK_ROWS: usize = 256;
/// Targets equal to this are ignored (the Hugging Face convention).
pub const IGNORE_INDEX: i64 = -100;

/// One batch: `[B, T]` token ids, positions and optional packing segments, and the target of every
/// position (`IGNORE_INDEX` where no loss is taken).
#[derive(Debug, Clone)]
pub struct Batch {
    pub input_ids: Tensor,
    pub positions: Tensor,
    pub segments: Option<Tensor>,
    /// Row-major `[B · T]`.
    pub targets: Vec<i64>,
}

impl Batch {
    /// A causal-LM batch from token rows: position `t` predicts token `t + 1` where `labels[t + 1]`
    /// is not ignored (the shift transformers applies), positions `0..T`.
    pub fn causal(
        ids: &[Vec<u32>],
        labels: &[Vec<i64>],
        device: &candle_core::Device,
    ) -> Result<Self> {
        let (b, t) = (ids.len(), ids.first().map_or(0, Vec::len));
        let input_ids = Tensor::from_vec(ids.concat(), (b, t), device)?;
        let positions = crate::model::phi3::default_positions(&input_ids)?;
        let targets = labels
            .iter()
            .flat_map(|row| (0..t).map(move |i| if i + 1 < t { row[i + 1] } else { IGNORE_INDEX }))
            .collect();
        Ok(Self {
            input_ids,
            positions,
            segments: None,
            targets,
        })
    }

    /// Flat indices of the positions that carry a target, and their target ids.
    fn selected(&self) -> (Vec<u32>, Vec<u32>) {
        self.targets
            .iter()
            .enumerate()
            .filter(|(_, t)| **t != IGNORE_INDEX)
            .map(|(i, t)| (i as u32, *t as u32))
            .unzip()
    }
}

/// What the checkpointed forward keeps of a block for its backward ([`BlockPolicy`]).
enum Saved {
    /// The block's input and the outputs its ops take back (`Selective`; none for `Recompute`).
    Input(Tensor, Kept),
    /// The input as a variable and the block's output with its whole graph (`Keep`).
    Graph(Var, Tensor),
}

/// The summed loss, its token count, and the gradient of the summed loss for each trainable
/// variable (aligned with [`Phi3::trainable_vars`]: `dA`, `dB`, DoRA's `dm`, adapter by adapter).
#[derive(Debug)]
pub struct LossAndGrads {
    pub loss_sum: f64,
    pub n_tokens: usize,
    pub grads: Vec<Tensor>,
}

/// The head's loss pass: the summed (weighted) loss, `d loss_sum / d h` when asked, the trainable
/// head copy's gradient ([`crate::model::phi3::SavedModules::head`]) when there is one, and each
/// row's values when asked.
struct HeadPass {
    loss: f64,
    dh: Option<Tensor>,
    dw: Option<Tensor>,
    /// The head LoRA's `(d hd, dA, dB)`, when it has one and gradients were asked for.
    lora: Option<(Tensor, Tensor, Tensor)>,
    /// Per row: `−log p(target)` and `Σ_v z_v` (empty unless asked).
    row_nll: Vec<f64>,
    row_logit_sum: Vec<f64>,
}

/// What a [`head`] pass computes.
#[derive(Debug, Clone, Copy, Default)]
struct HeadAsk<'a> {
    grad: bool,
    /// Each row's values ([`HeadPass::row_nll`], [`HeadPass::row_logit_sum`]).
    rows: bool,
    /// The loss `Σ_i c_i · nll_i` instead of `Σ_i nll_i` (with `grad`).
    weights: Option<&'a [f32]>,
}

/// Summed cross-entropy of `h: [M, H]` (normed hidden states of the target positions) against
/// `targets`, chunk by chunk; with `ask.grad`, also `d loss_sum / d h` and a trainable head's
/// own gradient.
fn head(
    model: &Phi3,
    h: &Tensor,
    hd: Option<&Tensor>,
    targets: &[u32],
    ask: HeadAsk<'_>,
) -> Result<HeadPass> {
    let want_grad = ask.grad;
    let weight = model.head_weight()?;
    let trainable = want_grad && model.saved.head.is_some();
    let lora = model.saved.head_lora.as_ref();
    // A head LoRA's input differs from `h` only under dropout.
    let own_hd = hd.is_some();
    let hd = hd.unwrap_or(h);
    if (want_grad || ask.rows)
        && h.device().is_cpu()
        && h.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && model.ops != OpPath::Composed
        && lora.is_none_or(|l| l.a.dtype() == DType::F32)
    {
        // The CPU's head: logits, loss and gradients in one pass, outside autograd.
        let out = qlora_quant::fused::head_cpu(
            h,
            &weight,
            targets,
            qlora_quant::fused::HeadOptions {
                want_grad,
                want_dw: trainable,
                lora: lora.map(|l| qlora_quant::fused::HeadLora {
                    hd,
                    a: l.a.as_tensor(),
                    b: l.b.as_tensor(),
                    scale: l.scale as f32,
                }),
                weights: ask.weights,
            },
        )?;
        let rows = ask.rows;
        return Ok(HeadPass {
            loss: out.loss,
            dh: out.dh,
            dw: out.dw,
            lora: out.lora,
            row_nll: if rows { out.row_nll } else { Vec::new() },
            row_logit_sum: if rows { out.row_logit_sum } else { Vec::new() },
        });
    }
    let lora = lora.filter(|_| want_grad);
    let lora_fwd = model.saved.head_lora.as_ref();
    let mut dhd = Vec::new();
    let (mut da, mut db): (Option<Tensor>, Option<Tensor>) = (None, None);
    let head_var = if trainable {
        model.saved.head.as_ref()
    } else {
        None
    };
    let mut dw: Option<Tensor> = None;
    let m = h.dim(0)?;
    // Per-chunk sums, read back once at the end (one device synchronisation, not one per chunk).
    let mut nlls = Vec::new();
    let mut row_nll = Vec::new();
    let mut row_logit_sum = Vec::new();
    let mut dh = Vec::new();
    for start in (0..m).step_by(HEAD_CHUNK_ROWS) {
        let n = HEAD_CHUNK_ROWS.min(m - start);
        let rows = h.narrow(0, start, n)?;
        let hv = if want_grad {
            Some(Var::from_tensor(&rows)?)
        } else {
            None
        };
        let x = hv.as_ref().map_or(&rows, |v| v.as_tensor());
        // The head LoRA's input rows (after its dropout), a variable of their own when it trains.
        let hdv = match lora_fwd {
            Some(_) if want_grad => Some(Var::from_tensor(&hd.narrow(0, start, n)?)?),
            _ => None,
        };
        // Cross-entropy in f32 for half types (f64 models keep f64: gradient checks need it); on
        // CUDA one fused kernel per direction over the chunk's [n, V] logits.
        let logits = match (lora_fwd, &hdv) {
            (Some(l), Some(v)) => (model.lm_head_base(x)? + l.product(v.as_tensor())?)?,
            (Some(l), None) if own_hd => {
                (model.lm_head_base(x)? + l.product(&hd.narrow(0, start, n)?)?)?
            }
            _ => model.lm_head(x)?,
        };
        let t = Tensor::from_slice(&targets[start..start + n], n, h.device())?;
        let ce = model.ops.cross_entropy(&logits, &t)?;
        if ask.rows {
            row_nll.push(ce.detach());
            row_logit_sum.push(logits.detach().to_dtype(DType::F32)?.sum(1)?);
        }
        let nll = match ask.weights {
            Some(c) => {
                let c = Tensor::from_slice(&c[start..start + n], n, h.device())?
                    .to_dtype(ce.dtype())?;
                (ce * c)?.sum_all()?
            }
            None => ce.sum_all()?,
        };
        // Detached: the chunk's graph (its [n, V] logits) must not outlive the chunk.
        nlls.push(nll.detach());
        if let Some(hv) = hv {
            let g = nll.backward()?;
            dh.push(
                g.get(hv.as_tensor())
                    .expect("the head depends on its input")
                    .clone(),
            );
            if let Some(w) = head_var.and_then(|v| g.get(v.as_tensor())) {
                dw = Some(match dw.take() {
                    Some(prev) => (prev + w)?,
                    None => w.clone(),
                });
            }
            if let (Some(l), Some(v)) = (lora, &hdv) {
                dhd.push(
                    g.get(v.as_tensor())
                        .expect("the head's LoRA depends on its input")
                        .clone(),
                );
                let add = |acc: &mut Option<Tensor>, t: Option<&Tensor>| -> Result<()> {
                    if let Some(t) = t {
                        *acc = Some(match acc.take() {
                            Some(prev) => (prev + t)?,
                            None => t.clone(),
                        });
                    }
                    Ok(())
                };
                add(&mut da, g.get(l.a.as_tensor()))?;
                add(&mut db, g.get(l.b.as_tensor()))?;
            }
        }
    }
    let lora = match lora {
        Some(l) => Some((
            if dhd.is_empty() {
                hd.zeros_like()?
            } else {
                Tensor::cat(&dhd, 0)?
            },
            match da {
                Some(t) => t,
                None => l.a.as_tensor().zeros_like()?,
            },
            match db {
                Some(t) => t,
                None => l.b.as_tensor().zeros_like()?,
            },
        )),
        None => None,
    };
    let dh = if want_grad {
        Some(if dh.is_empty() {
            h.zeros_like()?
        } else {
            Tensor::cat(&dh, 0)?
        })
    } else {
        None
    };
    let host = |parts: Vec<Tensor>| -> Result<Vec<f64>> {
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        Tensor::cat(&parts, 0)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()
    };
    let loss = if nlls.is_empty() {
        0.0
    } else {
        Tensor::stack(&nlls, 0)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
            .into_iter()
            .sum()
    };
    Ok(HeadPass {
        loss,
        dh,
        dw,
        lora,
        row_nll: host(row_nll)?,
        row_logit_sum: host(row_logit_sum)?,
    })
}

/// The head LoRA's input rows: the normed trunk after the adapter's dropout, drawn over the
/// `[B, T, H]` rows (what transformers' `lm_head` sees, so the masks are the ones the batch's rows
/// would get anywhere), then the target positions `idx`; `h` itself without dropout. `None`
/// without a head LoRA.
fn head_lora_input(
    model: &Phi3,
    x: &Tensor,
    idx: &[u32],
    h: &Tensor,
    ctx: &ForwardCtx,
) -> Result<Option<Tensor>> {
    let Some(l) = &model.saved.head_lora else {
        return Ok(None);
    };
    match l.dropout_for(ctx) {
        None => Ok(Some(h.clone())),
        Some(d) => {
            let xn = model.final_norm(x)?;
            let xd = qlora_quant::fused::dropout_rows(&xn, d.p, d.seed, d.rows)?;
            let hid = xd.dim(D::Minus1)?;
            let rows = Tensor::from_slice(idx, idx.len(), x.device())?;
            Ok(Some(xd.reshape(((), hid))?.index_select(&rows, 0)?))
        }
    }
}

/// `sum(h · dh)` plus, with a head LoRA, `sum(hd · d hd)`: backpropagated, it seeds the trunk's
/// output gradient with both.
fn head_objective(
    h: Tensor,
    dh: Tensor,
    hd: Option<Tensor>,
    pass_lora: Option<&Tensor>,
) -> Result<Tensor> {
    let obj = (h * dh)?.sum_all()?;
    match (hd, pass_lora) {
        (Some(hd), Some(dhd)) => obj + (hd * dhd)?.sum_all()?,
        _ => Ok(obj),
    }
}

/// The embedding LoRA's `(dA [r, V], dB [H, r])` from the trunk input's `g: [B, T, H]`: with
/// `u = Aᵀ[ids]` (`[N, r]`) and `du = scale · g · B`, `dB = scale · gᵀ · u` and `dAᵀ` gathers `du`
/// by token (the padding token's column never: `F.embedding(…, padding_idx)`).
fn embed_lora_grad(model: &Phi3, ids: &Tensor, g: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
    let Some(e) = &model.saved.embed_lora else {
        return Ok(None);
    };
    // Detached: gradients computed from the variables themselves must not record ops on them
    // (the optimizer's moments would then hold every step's graph).
    let (a, b) = (&e.a.as_tensor().detach(), &e.b.as_tensor().detach());
    let g = &g.detach();
    let (r, v) = a.dims2()?;
    let h = b.dim(0)?;
    let flat = ids.flatten_all()?;
    let g = g.reshape(((), h))?.to_dtype(a.dtype())?;
    let u = a.t()?.contiguous()?.index_select(&flat, 0)?; // [N, r]
    let db = (g.t()?.matmul(&u)? * e.scale)?;
    let du = (g.matmul(b)? * e.scale)?; // [N, r]
    let ids_v: Vec<u32> = flat.to_vec1()?;
    let pad = model.cfg.pad_token_id;
    let keep: Vec<u32> = (0..ids_v.len() as u32)
        .filter(|&i| Some(ids_v[i as usize]) != pad)
        .collect();
    let zeros = Tensor::zeros((v, r), a.dtype(), a.device())?;
    let dat = if keep.is_empty() {
        zeros
    } else {
        let k = Tensor::from_slice(&keep, keep.len(), g.device())?;
        let kept: Vec<u32> = keep.iter().map(|&i| ids_v[i as usize]).collect();
        let kept = Tensor::from_vec(kept, keep.len(), g.device())?;
        zeros.index_add(&kept, &du.index_select(&k, 0)?, 0)?
    };
    Ok(Some((dat.t()?.contiguous()?, db)))
}

/// Where the embedding's trainable variable (its copy, or its trained rows) sits among `n`
/// trainable variables (before the head's).
fn embed_index(model: &Phi3, n: usize) -> Option<usize> {
    if model.saved.embed.is_none() && model.saved.tokens.is_none() {
        return None;
    }
    Some(n - 1 - usize::from(model.saved.head.is_some()))
}

/// The embedding copy's gradient from the trunk input's `g: [B, T, H]`: each position's row added
/// into its token's row of a zero `[V, H]` (the backward of the lookup), in the copy's precision,
/// skipping the padding token (`pad_token_id`), whose row torch's `nn.Embedding(padding_idx)`,
/// and so PEFT's copy, never trains. One `[V, H]` result and its zeros, no autograd.
fn embedding_grad(model: &Phi3, ids: &Tensor, g: &Tensor) -> Result<Tensor> {
    if let Some(tt) = &model.saved.tokens {
        return token_rows_grad(model, tt, ids, g);
    }
    let table = model.saved.embed.as_ref().expect("a trainable embedding");
    let (v, h) = table.dims2()?;
    let ids_v: Vec<u32> = ids.flatten_all()?.to_vec1()?;
    let pad = model.cfg.pad_token_id;
    let keep: Vec<u32> = (0..ids_v.len() as u32)
        .filter(|&i| Some(ids_v[i as usize]) != pad)
        .collect();
    let zeros = Tensor::zeros((v, h), table.dtype(), table.device())?;
    if keep.is_empty() {
        return Ok(zeros);
    }
    let rows = g.reshape(((), h))?.to_dtype(table.dtype())?;
    let (sel_ids, sel_rows) = if keep.len() == ids_v.len() {
        (ids.flatten_all()?, rows)
    } else {
        let k = Tensor::from_slice(&keep, keep.len(), g.device())?;
        let kept_ids: Vec<u32> = keep.iter().map(|&i| ids_v[i as usize]).collect();
        (
            Tensor::from_vec(kept_ids, keep.len(), g.device())?,
            rows.index_select(&k, 0)?,
        )
    };
    zeros.index_add(&sel_ids, &sel_rows, 0)
}

/// The trained token rows' gradient `[n, H]`: each position of a trained token adds its row of
/// `g` into its delta row; the padding token's never trains (as [`embedding_grad`]).
fn token_rows_grad(
    model: &Phi3,
    tt: &crate::model::phi3::TrainableTokens,
    ids: &Tensor,
    g: &Tensor,
) -> Result<Tensor> {
    let delta = tt.delta.as_tensor();
    let (n, h) = delta.dims2()?;
    let ids_v: Vec<u32> = ids.flatten_all()?.to_vec1()?;
    let pad = model.cfg.pad_token_id;
    let (pos, k): (Vec<u32>, Vec<u32>) = tt
        .rows_of(&ids_v)
        .into_iter()
        .enumerate()
        .filter(|(p, w)| w.is_some() && Some(ids_v[*p]) != pad)
        .map(|(p, w)| (p as u32, w.expect("filtered")))
        .unzip();
    let zeros = Tensor::zeros((n, h), delta.dtype(), delta.device())?;
    if pos.is_empty() {
        return Ok(zeros);
    }
    let rows = g
        .reshape(((), h))?
        .to_dtype(delta.dtype())?
        .index_select(&Tensor::from_vec(pos.clone(), pos.len(), g.device())?, 0)?;
    zeros.index_add(&Tensor::from_vec(k, pos.len(), g.device())?, &rows, 0)
}

/// Normed hidden states of the target positions: `final_norm(x)` rows `idx`.
fn select(model: &Phi3, x: &Tensor, idx: &[u32]) -> Result<Tensor> {
    let h = x.dim(D::Minus1)?;
    let flat = x.reshape(((), h))?;
    let idx = Tensor::from_slice(idx, idx.len(), x.device())?;
    model.final_norm(&flat.index_select(&idx, 0)?)
}

/// The loss of a batch without gradients (evaluation): `(loss_sum, n_tokens)`.
pub fn loss(model: &Phi3, batch: &Batch) -> Result<(f64, usize)> {
    let (idx, targets) = batch.selected();
    let x = trunk(model, batch)?;
    let pass = head(
        model,
        &select(model, &x, &idx)?,
        None,
        &targets,
        HeadAsk::default(),
    )?;
    Ok((pass.loss, idx.len()))
}

/// The trunk's output without gradients and without dropout, each block's activations dropped as
/// it ends.
fn trunk(model: &Phi3, batch: &Batch) -> Result<Tensor> {
    let prep = model.prepare(&batch.positions, batch.segments.as_ref(), 0)?;
    let ctx = ForwardCtx::default();
    let mut x = model.embed(&batch.input_ids)?;
    for layer in 0..model.layers.len() {
        x = model.block(layer, &x, &prep, &ctx, None)?.detach();
    }
    Ok(x)
}

/// Per scored position of a batch (the positions with a target, in row-major order): the log-prob
/// of its target and its mean logit over the vocabulary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scores {
    pub logp: Vec<f64>,
    pub mean_logit: Vec<f64>,
}

impl Scores {
    fn of(pass: &HeadPass, vocab: usize) -> Self {
        Self {
            logp: pass.row_nll.iter().map(|n| -n).collect(),
            mean_logit: pass
                .row_logit_sum
                .iter()
                .map(|s| s / vocab as f64)
                .collect(),
        }
    }
}

/// A sequence-level objective inside [`loss_and_grads_with`]: from the policy's [`Scores`] of the
/// batch, each scored position's weight `c_t = −∂L/∂ log p_t`; the gradients returned are then
/// those of `L` (to first order: `Σ_t c_t · nll_t` has `L`'s gradient).
pub type Weigh<'s, 'a> = &'s mut (dyn FnMut(&Scores) -> Result<Vec<f32>> + 'a);

/// The [`Scores`] of a batch without gradients and without dropout: a reference model's pass (and
/// evaluation), which keeps no activations.
pub fn scores(model: &Phi3, batch: &Batch) -> Result<Scores> {
    let (idx, targets) = batch.selected();
    let x = trunk(model, batch)?;
    let pass = head(
        model,
        &select(model, &x, &idx)?,
        None,
        &targets,
        HeadAsk {
            rows: true,
            ..Default::default()
        },
    )?;
    Ok(Scores::of(&pass, model.cfg.vocab_size))
}

/// The head pass of a training step: plain (every scored position weighs 1) without `weigh`;
/// with it, a pass for the [`Scores`] first, then the weighted gradient pass (the head twice,
/// the trunk once).
fn scored_head(
    model: &Phi3,
    h: &Tensor,
    hd: Option<&Tensor>,
    targets: &[u32],
    weigh: Option<Weigh<'_, '_>>,
) -> Result<(HeadPass, Option<Scores>)> {
    let Some(weigh) = weigh else {
        let ask = HeadAsk {
            grad: true,
            ..Default::default()
        };
        return Ok((head(model, h, hd, targets, ask)?, None));
    };
    let first = head(
        model,
        h,
        hd,
        targets,
        HeadAsk {
            rows: true,
            ..Default::default()
        },
    )?;
    let sc = Scores::of(&first, model.cfg.vocab_size);
    drop(first);
    let c = weigh(&sc)?;
    let pass = head(
        model,
        h,
        hd,
        targets,
        HeadAsk {
            grad: true,
            rows: false,
            weights: Some(&c),
        },
    )?;
    Ok((pass, Some(sc)))
}

/// The summed loss and the LoRA gradients of a batch; `checkpointing` says what each block keeps
/// for the backward (`true`: only its input; `false`: everything; or per block).
pub fn loss_and_grads(
    model: &Phi3,
    batch: &Batch,
    ctx: &ForwardCtx,
    checkpointing: impl Into<Checkpointing>,
) -> Result<LossAndGrads> {
    Ok(loss_and_grads_with(model, batch, ctx, checkpointing, None)?.0)
}

/// [`loss_and_grads`] for any objective over the scored positions: `weigh` (a sequence-level
/// objective) turns the policy's scores into per-position weights ([`Weigh`]), and the scores
/// come back with the gradients. `loss_sum` is then the weighted sum, which only the plain
/// objective means as its loss.
pub fn loss_and_grads_with(
    model: &Phi3,
    batch: &Batch,
    ctx: &ForwardCtx,
    checkpointing: impl Into<Checkpointing>,
    mut weigh: Option<Weigh<'_, '_>>,
) -> Result<(LossAndGrads, Option<Scores>)> {
    let checkpointing: Checkpointing = checkpointing.into();
    let scores;
    let (idx, targets) = batch.selected();
    let prep = model.prepare(&batch.positions, batch.segments.as_ref(), 0)?;
    let vars = model.trainable_vars();
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    let mut keep = |store: &candle_core::backprop::GradStore| -> Result<()> {
        for (slot, v) in grads.iter_mut().zip(&vars) {
            let Some(g) = store.get(v.as_tensor()) else {
                continue;
            };
            *slot = Some(match slot.take() {
                Some(prev) => (prev + g)?,
                None => g.clone(),
            });
        }
        Ok(())
    };
    // A trainable embedding copy takes the first block's input gradient, scattered to its rows
    // ([`embedding_grad`]); the embedding itself stays out of the graph.
    let embed_trainable = model.saved.embed.is_some()
        || model.saved.tokens.is_some()
        || model.saved.embed_lora.is_some();
    let x0 = model.embed(&batch.input_ids)?.detach();
    let mut embed_dw = None;
    let mut embed_lora_dw = None;
    let head_lora_dw: Option<(Tensor, Tensor)>;
    let head_dw;
    let loss_sum = if checkpointing.recomputes(model.layers.len()) {
        let mut saved = Vec::with_capacity(model.layers.len());
        let mut x = x0;
        for layer in 0..model.layers.len() {
            let (out, s) = match checkpointing.of(layer) {
                BlockPolicy::Recompute => {
                    let out = model.block(layer, &x, &prep, ctx, None)?.detach();
                    (out, Saved::Input(x, Kept::default()))
                }
                BlockPolicy::Selective => {
                    let mut kept = Kept::default();
                    let out = model
                        .block_with(layer, &x, &prep, ctx, Tap::Record(&mut kept))?
                        .detach();
                    (out, Saved::Input(x, kept))
                }
                BlockPolicy::Keep => {
                    let xin = Var::from_tensor(&x)?;
                    drop(x);
                    let out = model.block(layer, xin.as_tensor(), &prep, ctx, None)?;
                    (out.detach(), Saved::Graph(xin, out))
                }
            };
            saved.push(s);
            x = out;
        }
        let xv = Var::from_tensor(&x)?;
        drop(x);
        let h = select(model, xv.as_tensor(), &idx)?;
        let hd = head_lora_input(model, xv.as_tensor(), &idx, &h, ctx)?;
        let (pass, sc) = scored_head(
            model,
            &h.detach(),
            hd.as_ref().map(|t| t.detach()).as_ref(),
            &targets,
            weigh.as_mut().map(|w| &mut **w as Weigh<'_, '_>),
        )?;
        scores = sc;
        head_dw = pass.dw;
        head_lora_dw = pass.lora.as_ref().map(|(_, a, b)| (a.clone(), b.clone()));
        let store = head_objective(
            h,
            pass.dh.expect("asked for the gradient"),
            hd,
            pass.lora.as_ref().map(|l| &l.0),
        )?
        .backward()?;
        let mut g = store
            .get(xv.as_tensor())
            .expect("the head depends on the trunk")
            .clone();
        // Only g is needed from here: the store also holds dh's gradient and, through the op
        // candle recorded for it, h and the selected rows (`plan` counts what stays).
        drop(store);
        drop(xv);
        for layer in (0..model.layers.len()).rev() {
            let (xin, out) = match saved.pop().expect("one saved entry a block") {
                // Nothing kept (Recompute) replays as a plain recomputation.
                Saved::Input(x, kept) => {
                    let xin = Var::from_tensor(&x)?;
                    drop(x);
                    let out =
                        model.block_with(layer, xin.as_tensor(), &prep, ctx, Tap::Replay(&kept))?;
                    (xin, out)
                }
                Saved::Graph(xin, out) => (xin, out),
            };
            let store = (out * &g)?.sum_all()?.backward()?;
            keep(&store)?;
            if layer > 0 || embed_trainable {
                g = store
                    .get(xin.as_tensor())
                    .expect("a block depends on its input")
                    .clone();
            }
        }
        if embed_trainable {
            embed_lora_dw = embed_lora_grad(model, &batch.input_ids, &g)?;
            if model.saved.embed.is_some() || model.saved.tokens.is_some() {
                embed_dw = Some(embedding_grad(model, &batch.input_ids, &g)?);
            }
        }
        pass.loss
    } else {
        let x0v = if embed_trainable {
            Some(Var::from_tensor(&x0)?)
        } else {
            None
        };
        let mut x = x0v.as_ref().map_or(x0.clone(), |v| v.as_tensor().clone());
        for layer in 0..model.layers.len() {
            x = model.block(layer, &x, &prep, ctx, None)?;
        }
        let h = select(model, &x, &idx)?;
        let hd = head_lora_input(model, &x, &idx, &h, ctx)?;
        let (pass, sc) = scored_head(
            model,
            &h.detach(),
            hd.as_ref().map(|t| t.detach()).as_ref(),
            &targets,
            weigh.as_mut().map(|w| &mut **w as Weigh<'_, '_>),
        )?;
        scores = sc;
        head_dw = pass.dw;
        head_lora_dw = pass.lora.as_ref().map(|(_, a, b)| (a.clone(), b.clone()));
        let store = head_objective(
            h,
            pass.dh.expect("asked for the gradient"),
            hd,
            pass.lora.as_ref().map(|l| &l.0),
        )?
        .backward()?;
        keep(&store)?;
        if let Some(v) = &x0v {
            let g = store
                .get(v.as_tensor())
                .expect("the trunk depends on its input");
            embed_lora_dw = embed_lora_grad(model, &batch.input_ids, g)?;
            if model.saved.embed.is_some() || model.saved.tokens.is_some() {
                embed_dw = Some(embedding_grad(model, &batch.input_ids, g)?);
            }
        }
        pass.loss
    };
    if let (Some(dw), Some(i)) = (embed_dw, embed_index(model, vars.len())) {
        grads[i] = Some(dw);
    }
    if let (Some((da, db)), Some(l)) = (head_lora_dw, &model.saved.head_lora) {
        let i = vars
            .iter()
            .position(|v| v.as_tensor().id() == l.a.as_tensor().id())
            .expect("the head LoRA's A is a trainable variable");
        grads[i] = Some(da);
        grads[i + 1] = Some(db);
    }
    if let Some((da, db)) = embed_lora_dw {
        let i = vars.len()
            - 2
            - usize::from(model.saved.embed.is_some() || model.saved.tokens.is_some())
            - usize::from(model.saved.head.is_some());
        grads[i] = Some(da);
        grads[i + 1] = Some(db);
    }
    if let (Some(dw), Some(slot)) = (head_dw, grads.last_mut())
        && model.saved.head.is_some()
    {
        *slot = Some(match slot.take() {
            Some(prev) => (prev + dw)?,
            None => dw,
        });
    }
    let grads: Vec<Tensor> = grads
        .into_iter()
        .zip(&vars)
        .map(|(g, v)| match g {
            Some(g) => Ok(g),
            None => v.as_tensor().zeros_like(),
        })
        .collect::<Result<_>>()?;
    Ok((
        LossAndGrads {
            loss_sum,
            n_tokens: idx.len(),
            grads,
        },
        scores,
    ))
}
