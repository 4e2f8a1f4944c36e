//! Preference tuning: DPO, IPO, ORPO and SimPO over pairs, as TRL computes them.
//!
//! A micro-batch of `B` pairs is one batch of `2B` rows (the chosen sequences, then the rejected,
//! right-padded), scored in one forward: each row's log-probs of its completion tokens are summed
//! (or averaged) into the pair's scores, [`math::pair_loss`] gives the pair's loss and its
//! derivatives by the scores, and those become a weight per scored token
//! ([`crate::train::grads::Weigh`]): the gradient pass is the head's weighted cross-entropy,
//! backpropagated through the trunk once. The loss is the mean over the step's pairs (and, for
//! ORPO, the chosen rows' NLL over their tokens), both normalisers counted over the whole step
//! before it runs, so accumulation and ranks change nothing.
//!
//! The reference (DPO, IPO) is the model with the trainable variables at their starting values:
//! a fresh adapter's (`B = 0`: the base with the adapter off, TRL's rule for a new adapter), or
//! those of the adapter training started from (TRL's frozen "ref" copy). Its pass swaps those
//! values in, runs without gradients, dropout or kept activations, and swaps back; or its scores
//! are computed once before training (`training.precompute_ref`).

use super::math::{self, Kind, PairLoss, PairScores, Params};
use super::{Contribution, Objective, StepValues};
use crate::data::batch::{Row, collate};
use crate::data::pairs::{PairRows, PairStats, Seq};
use crate::lora::ForwardCtx;
use crate::model::Phi3;
use crate::train::Batch;
use crate::train::grads::{IGNORE_INDEX, Scores, loss_and_grads_with, scores};
use anyhow::{Result, bail};
use candle_core::{Tensor, Var};
use std::collections::BTreeMap;

/// The trainable variables' values at the start of training: the DPO and IPO reference. Values
/// only: a resumed run's variables are the checkpoint's (new [`Var`]s), so each pass swaps into
/// the model's variables of the moment, in [`Phi3::trainable_vars`] order.
pub struct Reference {
    values: Vec<Tensor>,
}

impl std::fmt::Debug for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reference")
            .field("tensors", &self.values.len())
            .finish()
    }
}

impl Reference {
    /// The model's trainable values now, copied.
    pub fn snapshot(model: &Phi3) -> Result<Self> {
        let values = model
            .trainable_vars()
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { values })
    }

    /// Runs `f` with the reference values in `model`'s variables, then puts the current ones
    /// back (also when `f` fails).
    pub fn with<T>(&self, model: &Phi3, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let vars: Vec<Var> = model.trainable_vars();
        if vars.len() != self.values.len() {
            bail!(
                "the reference holds {} tensors, the model trains {}",
                self.values.len(),
                vars.len()
            );
        }
        let current = vars
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<candle_core::Result<Vec<_>>>()?;
        for (v, r) in vars.iter().zip(&self.values) {
            v.set(r)?;
        }
        let out = f();
        for (v, c) in vars.iter().zip(&current) {
            v.set(c)?;
        }
        out
    }
}

/// The reference's `[chosen, rejected]` completion log-prob sums, pair by pair.
pub type RefScores = Vec<[f64; 2]>;

/// Which pair and side a scored position belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tag {
    /// The sequence: `0..B` the pairs' chosen ones, `B..2B` their rejected.
    seq: usize,
    /// Whether it predicts a completion token (else a prompt token of a chosen row, scored for
    /// ORPO's NLL).
    completion: bool,
}

// The scalar sums of a micro-batch.
const LOSS: usize = 0; // Σ pair losses
const REWARD_C: usize = 1;
const REWARD_R: usize = 2;
const ACCURACY: usize = 3;
const MARGIN: usize = 4;
const LOGPS_C: usize = 5;
const LOGPS_R: usize = 6;
const LOGITS_C: usize = 7; // Σ mean logit over the chosen completions' scored positions
const LOGITS_C_N: usize = 8;
const LOGITS_R: usize = 9;
const LOGITS_R_N: usize = 10;
const NLL: usize = 11; // ORPO: Σ nll over the chosen rows' positions
const NLL_N: usize = 12;
const RATIO: usize = 13;
const LOG_ODDS: usize = 14;
const PAIRS: usize = 15;
const TRAINED: usize = 16;
const N_SCALARS: usize = 17;

/// Preference pairs and the objective over them.
pub struct Preference {
    pub kind: Kind,
    pub params: Params,
    pub pairs: Vec<PairRows>,
    pub eval_pairs: Vec<PairRows>,
    pub stats: PairStats,
    pub pad_id: u32,
    /// The reference's values (DPO, IPO), unless its scores are precomputed.
    pub reference: Option<Reference>,
    /// Precomputed reference scores `[chosen, rejected]` per training and evaluation pair.
    pub precomputed: Option<(RefScores, RefScores)>,
    /// Sequences share rows (`pair_batch`): only without dropout, whose masks are drawn per
    /// row (so the layout of rows, which depends on the micro-batch, changes nothing).
    pub pack: bool,
    /// The step's normalisers: its pairs, and (ORPO) its chosen rows' scored tokens.
    norm: (f64, f64),
}

impl std::fmt::Debug for Preference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preference")
            .field("kind", &self.kind)
            .field("pairs", &self.pairs.len())
            .finish()
    }
}

/// The sequences of `pairs` (the chosen ones, then the rejected) as a batch, and each scored
/// position's tag. A sequence scores the positions predicting its completion tokens; ORPO's chosen
/// ones score every position (its NLL spans the prompt, as TRL's). Each sequence is a row, or with
/// `pack` the sequences share rows first-fit by decreasing length, no row longer than the longest
/// sequence (positions restarting, each sequence its own segment of the block-diagonal mask): the
/// padding goes and no row grows, so the attention does no more work than padded rows do.
fn pair_batch(
    kind: Kind,
    pairs: &[&PairRows],
    pad_id: u32,
    pack: bool,
    device: &candle_core::Device,
) -> Result<(Batch, Vec<Tag>)> {
    let seqs: Vec<(&Seq, bool)> = pairs
        .iter()
        .map(|p| (&p.chosen, true))
        .chain(pairs.iter().map(|p| (&p.rejected, false)))
        .collect();
    let len = |i: usize| seqs[i].0.ids.len();
    let longest = (0..seqs.len()).map(len).max().unwrap_or(0);
    // Rows as lists of sequences, with their lengths.
    let mut bins: Vec<(usize, Vec<usize>)> = Vec::new();
    if pack {
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(len(i)));
        for i in order {
            match bins.iter_mut().find(|b| b.0 + len(i) <= longest) {
                Some(b) => {
                    b.0 += len(i);
                    b.1.push(i);
                }
                None => bins.push((len(i), vec![i])),
            }
        }
    } else {
        bins = (0..seqs.len()).map(|i| (len(i), vec![i])).collect();
    }
    let scored = |s: &Seq, chosen: bool, t: usize| {
        t + 1 < s.ids.len() && (s.completion[t + 1] || (chosen && kind.chosen_nll()))
    };
    let mut tags = Vec::new();
    let rows: Vec<Row> = bins
        .iter()
        .map(|(_, members)| {
            let mut r = Row {
                ids: Vec::new(),
                targets: Vec::new(),
                positions: Vec::new(),
                segments: Vec::new(),
            };
            for (k, &i) in members.iter().enumerate() {
                let (s, chosen) = seqs[i];
                let n = s.ids.len();
                r.ids.extend_from_slice(&s.ids);
                for t in 0..n {
                    if scored(s, chosen, t) {
                        r.targets.push(i64::from(s.ids[t + 1]));
                        // Row-major order, as the batch's scored positions are.
                        tags.push(Tag {
                            seq: i,
                            completion: s.completion[t + 1],
                        });
                    } else {
                        r.targets.push(IGNORE_INDEX);
                    }
                }
                r.positions.extend(0..n as u32);
                r.segments.extend(std::iter::repeat_n(k as u32 + 1, n));
            }
            r
        })
        .collect();
    let refs: Vec<&Row> = rows.iter().collect();
    Ok((collate(&refs, pad_id, device)?, tags))
}

/// Summed log-probs of each sequence's completion positions, and their counts.
fn row_sums(sc: &Scores, tags: &[Tag], seqs: usize) -> (Vec<f64>, Vec<usize>) {
    let (mut sum, mut n) = (vec![0f64; seqs], vec![0usize; seqs]);
    for (lp, tag) in sc.logp.iter().zip(tags) {
        if tag.completion {
            sum[tag.seq] += lp;
            n[tag.seq] += 1;
        }
    }
    (sum, n)
}

/// The per-pair losses of a scored micro-batch, its scalar sums and, given the step's
/// normalisers, each scored position's weight `−∂L/∂ log p`.
struct Scored {
    scalars: Vec<f64>,
    weights: Vec<f32>,
}

fn score(
    kind: Kind,
    params: Params,
    pairs: &[&PairRows],
    sc: &Scores,
    tags: &[Tag],
    refs: &[[f64; 2]],
    norm: (f64, f64),
) -> Scored {
    let b = pairs.len();
    let (sum, n) = row_sums(sc, tags, 2 * b);
    let mut s = vec![0f64; N_SCALARS];
    let losses: Vec<PairLoss> = (0..b)
        .map(|i| {
            math::pair_loss(
                kind,
                params,
                &PairScores {
                    chosen: sum[i],
                    rejected: sum[b + i],
                    n_chosen: n[i],
                    n_rejected: n[b + i],
                    len_chosen: pairs[i].chosen.completion_len(),
                    len_rejected: pairs[i].rejected.completion_len(),
                    ref_chosen: refs[i][0],
                    ref_rejected: refs[i][1],
                },
            )
        })
        .collect();
    for l in &losses {
        s[LOSS] += l.loss;
        s[REWARD_C] += l.reward_chosen;
        s[REWARD_R] += l.reward_rejected;
        s[ACCURACY] += f64::from(u8::from(l.reward_chosen > l.reward_rejected));
        s[MARGIN] += l.reward_chosen - l.reward_rejected;
        s[LOGPS_C] += l.logps_chosen;
        s[LOGPS_R] += l.logps_rejected;
        s[RATIO] += l.ratio;
        s[LOG_ODDS] += l.log_odds;
    }
    s[PAIRS] = b as f64;
    let (pairs_norm, nll_norm) = norm;
    let mut weights = Vec::with_capacity(tags.len());
    for ((lp, ml), tag) in sc.logp.iter().zip(&sc.mean_logit).zip(tags) {
        let chosen = tag.seq < b;
        let pair = tag.seq % b;
        let mut c = 0f64;
        if tag.completion {
            s[TRAINED] += 1.0;
            let (d, at, at_n) = if chosen {
                (losses[pair].d_chosen, LOGITS_C, LOGITS_C_N)
            } else {
                (losses[pair].d_rejected, LOGITS_R, LOGITS_R_N)
            };
            s[at] += ml;
            s[at_n] += 1.0;
            c -= d / pairs_norm;
        }
        if chosen && kind.chosen_nll() {
            s[NLL] -= lp;
            s[NLL_N] += 1.0;
            c += 1.0 / nll_norm;
        }
        weights.push(c as f32);
    }
    Scored {
        scalars: s,
        weights,
    }
}

fn values(kind: Kind, s: &[f64]) -> (f64, BTreeMap<String, f64>) {
    let p = s[PAIRS].max(1.0);
    let nll = s[NLL] / s[NLL_N].max(1.0);
    let loss = s[LOSS] / p + if kind.chosen_nll() { nll } else { 0.0 };
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: f64| {
        m.insert(k.to_string(), v);
    };
    put("rewards/chosen", s[REWARD_C] / p);
    put("rewards/rejected", s[REWARD_R] / p);
    put("rewards/accuracies", s[ACCURACY] / p);
    put("rewards/margins", s[MARGIN] / p);
    put("logps/chosen", s[LOGPS_C] / p);
    put("logps/rejected", s[LOGPS_R] / p);
    put("logits/chosen", s[LOGITS_C] / s[LOGITS_C_N].max(1.0));
    put("logits/rejected", s[LOGITS_R] / s[LOGITS_R_N].max(1.0));
    if kind.chosen_nll() {
        put("nll_loss", nll);
        put("log_odds_ratio", s[RATIO] / p);
        put("log_odds_chosen", s[LOG_ODDS] / p);
    }
    (loss, m)
}

impl Preference {
    /// The reference's `[chosen, rejected]` completion sums for each pair of a batch.
    fn reference_scores(
        &self,
        model: &Phi3,
        batch: &Batch,
        tags: &[Tag],
        pairs: usize,
    ) -> Result<Vec<[f64; 2]>> {
        let Some(r) = &self.reference else {
            bail!("the {} objective has no reference model", self.kind);
        };
        let sc = r.with(model, || Ok(scores(model, batch)?))?;
        let (sum, _) = row_sums(&sc, tags, 2 * pairs);
        Ok((0..pairs).map(|i| [sum[i], sum[pairs + i]]).collect())
    }

    fn refs_for(
        &self,
        model: &Phi3,
        batch: &Batch,
        tags: &[Tag],
        units: &[usize],
        eval: bool,
    ) -> Result<Vec<[f64; 2]>> {
        if !self.kind.has_reference() {
            return Ok(vec![[0.0; 2]; units.len()]);
        }
        if let Some((train, ev)) = &self.precomputed {
            let table = if eval { ev } else { train };
            return Ok(units.iter().map(|&i| table[i]).collect());
        }
        self.reference_scores(model, batch, tags, units.len())
    }

    /// Every training and evaluation pair's reference scores, in micro-batches of `batch` pairs
    /// (`training.precompute_ref`): the model must hold the reference values.
    pub fn precompute(&self, model: &Phi3, batch: usize) -> Result<(RefScores, RefScores)> {
        let run = |pairs: &[PairRows]| -> Result<Vec<[f64; 2]>> {
            let mut out = Vec::with_capacity(pairs.len());
            for chunk in pairs.chunks(batch.max(1)) {
                let refs: Vec<&PairRows> = chunk.iter().collect();
                let (b, tags) =
                    pair_batch(self.kind, &refs, self.pad_id, self.pack, &model.device)?;
                let sc = match &self.reference {
                    Some(r) => r.with(model, || Ok(scores(model, &b)?))?,
                    None => scores(model, &b)?,
                };
                let (sum, _) = row_sums(&sc, &tags, 2 * chunk.len());
                out.extend((0..chunk.len()).map(|i| [sum[i], sum[chunk.len() + i]]));
            }
            Ok(out)
        };
        Ok((run(&self.pairs)?, run(&self.eval_pairs)?))
    }

    /// New, with the step normalisers unset.
    pub fn new(
        kind: Kind,
        params: Params,
        pairs: Vec<PairRows>,
        eval_pairs: Vec<PairRows>,
        stats: PairStats,
        pad_id: u32,
    ) -> Self {
        Self {
            kind,
            params,
            pairs,
            eval_pairs,
            stats,
            pad_id,
            reference: None,
            precomputed: None,
            pack: false,
            norm: (1.0, 1.0),
        }
    }

    /// The rows a micro-batch of training pairs `units` takes (2 per pair, fewer when packed).
    pub fn batch_rows(&self, units: &[usize], device: &candle_core::Device) -> Result<usize> {
        let pairs: Vec<&PairRows> = units.iter().map(|&i| &self.pairs[i]).collect();
        Ok(
            pair_batch(self.kind, &pairs, self.pad_id, self.pack, device)?
                .0
                .input_ids
                .dim(0)?,
        )
    }
}

/// Scored ORPO NLL positions of a pair's chosen row (every next token).
fn nll_tokens(p: &PairRows) -> usize {
    p.chosen.ids.len().saturating_sub(1)
}

impl Objective for Preference {
    fn kind(&self) -> Kind {
        self.kind
    }

    fn units(&self) -> usize {
        self.pairs.len()
    }

    fn eval_units(&self) -> usize {
        self.eval_pairs.len()
    }

    fn input_tokens(&self, i: usize) -> usize {
        self.pairs[i].tokens()
    }

    fn fingerprint(&self) -> Vec<u8> {
        self.pairs
            .iter()
            .flat_map(|p| {
                [&p.chosen, &p.rejected].into_iter().flat_map(|s| {
                    s.ids
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .chain(s.completion.iter().map(|c| u8::from(*c)))
                        .collect::<Vec<u8>>()
                })
            })
            .collect()
    }

    fn describe(&self) -> String {
        let s = &self.stats;
        let mut line = format!(
            "{} {} pairs of {} read ({} tokens, {} completion tokens; {} truncated, {} bad lines skipped)",
            self.pairs.len(),
            self.kind.to_string().to_uppercase(),
            s.pairs,
            s.tokens,
            s.completion_tokens,
            s.truncated,
            s.bad_lines.len()
        );
        for n in s.skip_notes() {
            line.push_str("\n  ");
            line.push_str(&n);
        }
        line
    }

    fn n_scalars(&self) -> usize {
        N_SCALARS
    }

    fn begin_step(&mut self, units: &[usize]) {
        let nll: usize = units.iter().map(|&i| nll_tokens(&self.pairs[i])).sum();
        self.norm = (units.len().max(1) as f64, nll.max(1) as f64);
    }

    fn micro_batch(
        &mut self,
        model: &Phi3,
        units: &[usize],
        ctx: &ForwardCtx,
        checkpointing: &crate::train::policy::Checkpointing,
    ) -> Result<Contribution> {
        let pairs: Vec<&PairRows> = units.iter().map(|&i| &self.pairs[i]).collect();
        let (batch, tags) = pair_batch(self.kind, &pairs, self.pad_id, self.pack, &model.device)?;
        let refs = self.refs_for(model, &batch, &tags, units, false)?;
        let (kind, params, norm) = (self.kind, self.params, self.norm);
        let mut scalars = Vec::new();
        let mut weigh = |sc: &Scores| -> candle_core::Result<Vec<f32>> {
            let s = score(kind, params, &pairs, sc, &tags, &refs, norm);
            scalars = s.scalars;
            Ok(s.weights)
        };
        let (lg, _) = loss_and_grads_with(model, &batch, ctx, checkpointing, Some(&mut weigh))?;
        Ok(Contribution {
            grads: lg.grads,
            scalars,
        })
    }

    fn finish(&self, s: &[f64]) -> StepValues {
        let (loss, metrics) = values(self.kind, s);
        StepValues {
            divisor: 1.0,
            loss,
            trained_tokens: s[TRAINED] as u64,
            metrics,
        }
    }

    fn eval_batch(&mut self, model: &Phi3, units: &[usize]) -> Result<Vec<f64>> {
        let pairs: Vec<&PairRows> = units.iter().map(|&i| &self.eval_pairs[i]).collect();
        let (batch, tags) = pair_batch(self.kind, &pairs, self.pad_id, self.pack, &model.device)?;
        let refs = self.refs_for(model, &batch, &tags, units, true)?;
        let sc = scores(model, &batch)?;
        Ok(score(
            self.kind,
            self.params,
            &pairs,
            &sc,
            &tags,
            &refs,
            (1.0, 1.0),
        )
        .scalars)
    }

    fn finish_eval(&self, s: &[f64]) -> (f64, BTreeMap<String, f64>) {
        values(self.kind, s)
    }

    fn plan_rows(&self) -> crate::plan::inputs::Rows {
        let rows = |pairs: &[PairRows]| crate::plan::inputs::Rows {
            bytes: pairs
                .iter()
                .map(|p| (p.tokens() * 4 + p.tokens()) as u64)
                .sum(),
            longest: Some(
                pairs
                    .iter()
                    .map(|p| p.chosen.ids.len().max(p.rejected.ids.len()))
                    .max()
                    .unwrap_or(0),
            ),
            count: Some(2 * pairs.len()),
        };
        rows(&self.pairs).and(rows(&self.eval_pairs))
    }
}
