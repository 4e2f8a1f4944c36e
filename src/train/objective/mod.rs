//! What a run optimizes, beside the loop that optimizes it ([`super::trainer`]): each objective
//! owns its data and turns a micro-batch of its units (conversations' rows, preference pairs) into
//! gradient sums and scalar sums; the loop adds them over micro-batches and ranks and asks the
//! objective what they mean.
//!
//! - [`sft::Sft`]: cross-entropy on the assistant tokens of chat rows.
//! - [`pref::Preference`]: DPO, IPO, ORPO and SimPO on preference pairs, number for number with
//!   TRL ([`math`] holds the per-pair formulas).

pub mod math;
pub mod pref;
pub mod sft;

pub use math::{Kind, Params};

use crate::lora::ForwardCtx;
use crate::model::Phi3;
use anyhow::Result;
use candle_core::Tensor;
use std::collections::BTreeMap;

/// One micro-batch's sums: the gradients (aligned with [`Phi3::trainable_vars`]) and the
/// objective's scalars (its own layout, [`Objective::n_scalars`] long).
#[derive(Debug)]
pub struct Contribution {
    pub grads: Vec<Tensor>,
    pub scalars: Vec<f64>,
}

/// What a step's summed scalars mean.
#[derive(Debug, Clone, PartialEq)]
pub struct StepValues {
    /// The gradient sums are divided by this.
    pub divisor: f64,
    pub loss: f64,
    /// Tokens the loss was taken on.
    pub trained_tokens: u64,
    /// The objective's own metrics, named as TRL names them.
    pub metrics: BTreeMap<String, f64>,
}

/// An objective over its data. Units are numbered `0..units()`; the loop draws the order.
pub trait Objective {
    fn kind(&self) -> Kind;
    /// Training units (rows or pairs).
    fn units(&self) -> usize;
    /// Evaluation units.
    fn eval_units(&self) -> usize;
    /// Input tokens of training unit `i` (padding excluded).
    fn input_tokens(&self, i: usize) -> usize;
    /// Bytes that identify the training data (every rank must train the same).
    fn fingerprint(&self) -> Vec<u8>;
    /// The data, in a line for the log.
    fn describe(&self) -> String;
    fn n_scalars(&self) -> usize;
    /// Called before a step with the units of all its micro-batches on every rank: objectives
    /// whose normalisers are global (pairs, tokens) take them here.
    fn begin_step(&mut self, units: &[usize]);
    /// This rank's share of a micro-batch of training units.
    fn micro_batch(
        &mut self,
        model: &Phi3,
        units: &[usize],
        ctx: &ForwardCtx,
        checkpointing: &crate::train::policy::Checkpointing,
    ) -> Result<Contribution>;
    /// The step's values from its scalars summed over micro-batches and ranks.
    fn finish(&self, scalars: &[f64]) -> StepValues;
    /// Scalar sums of evaluation units, without gradients.
    fn eval_batch(&mut self, model: &Phi3, units: &[usize]) -> Result<Vec<f64>>;
    /// The evaluation loss and metrics from the summed scalars.
    fn finish_eval(&self, scalars: &[f64]) -> (f64, BTreeMap<String, f64>);
    /// The data's rows for the memory plan: their count, longest and bytes.
    fn plan_rows(&self) -> crate::plan::inputs::Rows;
}
