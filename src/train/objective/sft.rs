//! Supervised fine-tuning: the summed cross-entropy of the trained (assistant) tokens, divided by
//! their count over the whole step (every micro-batch and rank).

use super::{Contribution, Kind, Objective, StepValues};
use crate::data::batch::{Row, RowStats, collate};
use crate::lora::ForwardCtx;
use crate::model::Phi3;
use crate::train::grads::{loss, loss_and_grads};
use anyhow::Result;
use std::collections::BTreeMap;

/// Chat rows and their statistics.
#[derive(Debug)]
pub struct Sft {
    pub rows: Vec<Row>,
    pub eval_rows: Vec<Row>,
    pub stats: RowStats,
    pub skipped_lines: usize,
    pub pad_id: u32,
    /// The examples came from the data cache ([`crate::data::encode`]).
    pub cached: bool,
    /// Examples held out for evaluation (`data.eval_fraction`).
    pub held_out: usize,
}

impl Objective for Sft {
    fn kind(&self) -> Kind {
        Kind::Sft
    }

    fn units(&self) -> usize {
        self.rows.len()
    }

    fn eval_units(&self) -> usize {
        self.eval_rows.len()
    }

    fn input_tokens(&self, i: usize) -> usize {
        self.rows[i].ids.len()
    }

    fn fingerprint(&self) -> Vec<u8> {
        self.rows
            .iter()
            .flat_map(|r| {
                r.ids
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .chain(r.targets.iter().flat_map(|v| v.to_le_bytes()))
            })
            .collect()
    }

    fn describe(&self) -> String {
        let s = &self.stats;
        let mut notes = String::new();
        if self.held_out > 0 {
            notes.push_str(&format!("; {} held out for evaluation", self.held_out));
        }
        if self.cached {
            notes.push_str("; tokenized examples read from the data cache");
        }
        format!(
            "{} rows from {} examples ({} tokens, {} trained; {:.1}% of the rows' room padding; {} truncated to max_seq_len, {} dropped, {} bad lines skipped{notes})",
            self.rows.len(),
            s.conversations,
            s.tokens,
            s.trained_tokens,
            100.0 * s.padding_fraction(),
            s.truncated,
            s.dropped,
            self.skipped_lines
        )
    }

    fn n_scalars(&self) -> usize {
        2
    }

    fn begin_step(&mut self, _units: &[usize]) {}

    fn micro_batch(
        &mut self,
        model: &Phi3,
        units: &[usize],
        ctx: &ForwardCtx,
        checkpointing: &crate::train::policy::Checkpointing,
    ) -> Result<Contribution> {
        let rows: Vec<&Row> = units.iter().map(|&i| &self.rows[i]).collect();
        let batch = collate(&rows, self.pad_id, &model.device)?;
        let lg = loss_and_grads(model, &batch, ctx, checkpointing)?;
        Ok(Contribution {
            grads: lg.grads,
            scalars: vec![lg.loss_sum, lg.n_tokens as f64],
        })
    }

    fn finish(&self, s: &[f64]) -> StepValues {
        let n = s[1].max(1.0);
        StepValues {
            divisor: n,
            loss: s[0] / n,
            trained_tokens: s[1] as u64,
            metrics: BTreeMap::new(),
        }
    }

    fn eval_batch(&mut self, model: &Phi3, units: &[usize]) -> Result<Vec<f64>> {
        let rows: Vec<&Row> = units.iter().map(|&i| &self.eval_rows[i]).collect();
        let (s, k) = loss(model, &collate(&rows, self.pad_id, &model.device)?)?;
        Ok(vec![s, k as f64])
    }

    fn finish_eval(&self, s: &[f64]) -> (f64, BTreeMap<String, f64>) {
        (s[0] / s[1].max(1.0), BTreeMap::new())
    }

    fn plan_rows(&self) -> crate::plan::inputs::Rows {
        crate::plan::inputs::Rows::of(&self.rows)
            .and(crate::plan::inputs::Rows::of(&self.eval_rows))
    }
}
