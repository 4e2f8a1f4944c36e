//! `qlora train`'s settings: a TOML file with `[training]`, `[lora]`, `[quant]` and `[data]`, every
//! key known (unknown keys are errors), every CLI flag a `--set section.key=value` on top.

use crate::lora::LoraConfig;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Learning-rate schedule after the linear warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Training {
    /// A checkpoint directory, a Hugging Face Hub id (the local HF cache, else downloaded), or
    /// `builtin:tiny-phi3` (a tiny random Phi-3 with the real Phi-3 tokenizer, built from a seed).
    pub model: String,
    /// Output directory: adapter/, checkpoints/, metrics.jsonl, loss.svg, config.resolved.toml.
    pub output: String,
    /// Quantize the base to 4 bits (QLoRA); false trains plain LoRA on a dense base.
    pub four_bit: bool,
    pub learning_rate: f64,
    pub lr_schedule: Schedule,
    pub warmup_steps: u64,
    /// Passes over the training data (ignored when max_steps > 0).
    pub epochs: u64,
    /// Optimizer steps; 0 means as many as `epochs` take.
    pub max_steps: u64,
    /// Rows per micro-batch.
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Tokens per row; longer conversations are truncated (and counted).
    pub max_seq_len: usize,
    /// Global gradient-norm clipping; 0 disables.
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    /// The learning rate of `lora.modules_to_save` copies (Unsloth's knob for continued
    /// pretraining; the same schedule); 0 means `learning_rate`.
    #[serde(default)]
    pub embedding_learning_rate: f64,
    /// `adamw` (f32 moments) or `adamw_8bit` (bitsandbytes' block-wise 8-bit moments).
    pub optimizer: String,
    pub seed: u64,
    /// Log every N steps.
    pub log_every: u64,
    /// Evaluate every N steps (0: only at the end).
    pub eval_every: u64,
    /// Checkpoint every N steps (0: only the final adapter).
    pub save_every: u64,
    /// Checkpoints kept.
    pub keep_last: usize,
    /// Compute dtype: auto (bf16 on CUDA, f32 on the CPU), f32, bf16 (GPU only) or f16.
    pub dtype: String,
    /// Where to train: auto (CUDA device 0 when built with the cuda feature and one opens, else
    /// the CPU), cpu, cuda or cuda:N.
    pub device: String,
    /// What each block keeps for the backward: "auto" (per block, the fewest recomputed FLOPs
    /// whose predicted peak fits the budget), true (only its input: recompute the block), false
    /// (everything) or "selective" (its input, attention and gate/up outputs).
    #[serde(default)]
    pub gradient_checkpointing: crate::train::policy::Setting,
    /// What to optimize: sft (chat data), or dpo, ipo, orpo, simpo (preference pairs).
    #[serde(default)]
    pub objective: crate::train::objective::Kind,
    /// The preference objectives' β (ORPO's λ; TRL's `beta`).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// SimPO's target reward margin γ.
    #[serde(default = "default_simpo_gamma")]
    pub simpo_gamma: f64,
    /// DPO, IPO: compute the reference's log-probs once before training (cached in the output
    /// directory, reused on resume) instead of a reference pass each step.
    #[serde(default)]
    pub precompute_ref: bool,
    /// Preference objectives: no dropout (TRL's `disable_dropout`, on by default), so the
    /// policy's log-probs compare with the reference's; false keeps lora.dropout.
    #[serde(default = "default_true")]
    pub disable_dropout: bool,
    /// A PEFT adapter to start from (its LoRA settings replace `[lora]`'s); for DPO and IPO its
    /// frozen copy is the reference, as TRL's. "" for a fresh adapter.
    #[serde(default)]
    pub init_adapter: String,
}

fn default_true() -> bool {
    true
}

fn default_beta() -> f64 {
    0.1
}

fn default_simpo_gamma() -> f64 {
    0.5
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quant {
    /// nf4 or fp4.
    pub quant_type: String,
    pub blocksize: usize,
    pub double_quant: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Data {
    /// Training data: a file (JSONL, JSON array, gzip or zstd of those, Parquet), a directory, a
    /// glob, or a Hub dataset `hf://datasets/owner/name[@revision][/config]`.
    pub train: String,
    /// Evaluation data, as `train` ("" for none).
    pub eval: String,
    /// The split of a Hub dataset `train` reads.
    #[serde(default = "default_split")]
    pub split: String,
    /// The split evaluation reads: of `eval` when it is a Hub dataset (default `test`), else of
    /// `train` ("" for none).
    #[serde(default)]
    pub eval_split: String,
    /// Hold out this fraction of the training examples for evaluation (0: none), chosen by
    /// `training.seed`; instead of `eval` / `eval_split`.
    #[serde(default)]
    pub eval_fraction: f64,
    /// Keep the tokenized examples in qlora's cache (`~/.cache/qlora/data`), keyed by the data's
    /// content, the tokenizer, the template and the reading settings, so a second run, a resume
    /// or `qlora plan` reads them instead of tokenizing again.
    #[serde(default = "default_true")]
    pub cache: bool,
    /// New tokens, put in the checkpoint's unused embedding rows and trained there (as trainable
    /// token rows, or inside an embedding copy); the extended tokenizer is saved beside the
    /// adapter and every export carries it.
    #[serde(default)]
    pub add_tokens: Vec<String>,
    /// Pack several conversations per row (no attention across them).
    pub pack: bool,
    /// Skip (and count) bad lines instead of stopping.
    pub skip_bad_lines: bool,
    /// The records' format: auto (detected from each record's keys), messages,
    /// prompt_completion, sharegpt, alpaca or text.
    #[serde(default)]
    pub format: crate::data::formats::Format,
    /// The dataset's column for each name a format reads, e.g. { output = "answer" }.
    #[serde(default)]
    pub columns: crate::data::formats::Columns,
    /// Preference pairs longer than max_seq_len: keep_start (TRL's default; a pair whose prompt
    /// alone fills it is skipped) or keep_end.
    #[serde(default)]
    pub truncation_mode: crate::data::pairs::Truncation,
}

fn default_split() -> String {
    "train".into()
}

impl Data {
    fn check(&self) -> Result<()> {
        use crate::data::source::is_hub;
        if self.split.is_empty() {
            bail!("data.split is empty: name a split (train, validation, test, …)");
        }
        if self.split != "train" && !self.train.is_empty() && !is_hub(&self.train) {
            bail!(
                "data.split = `{}` names a split of a Hub dataset, and data.train `{}` is local: name the split's files in data.train",
                self.split,
                self.train
            );
        }
        if !self.eval_split.is_empty() {
            let of = if self.eval.is_empty() {
                &self.train
            } else {
                &self.eval
            };
            if !of.is_empty() && !is_hub(of) {
                bail!(
                    "data.eval_split = `{}` names a split of a Hub dataset, and `{of}` is local: set data.eval to the evaluation files instead",
                    self.eval_split
                );
            }
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            bail!(
                "data.eval_fraction = {}: use a fraction in [0, 1), e.g. 0.05",
                self.eval_fraction
            );
        }
        if self.eval_fraction > 0.0 && (!self.eval.is_empty() || !self.eval_split.is_empty()) {
            bail!(
                "data.eval_fraction holds out part of data.train for evaluation: set it or data.eval / data.eval_split, not both"
            );
        }
        Ok(())
    }

    /// Where training reads.
    pub fn train_spec(&self) -> crate::data::source::Spec {
        crate::data::source::Spec::new(&self.train, &self.split)
    }

    /// Where evaluation reads, if anywhere (not counting `eval_fraction`).
    pub fn eval_spec(&self) -> Option<crate::data::source::Spec> {
        use crate::data::source::Spec;
        if !self.eval.is_empty() {
            let split = if self.eval_split.is_empty() {
                "test"
            } else {
                &self.eval_split
            };
            return Some(Spec::new(&self.eval, split));
        }
        (!self.eval_split.is_empty()).then(|| Spec::new(&self.train, &self.eval_split))
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub training: Training,
    pub lora: LoraConfig,
    pub quant: Quant,
    pub data: Data,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            training: Training {
                model: "builtin:tiny-phi3".into(),
                output: "runs/qlora".into(),
                four_bit: false,
                learning_rate: 2e-4,
                lr_schedule: Schedule::Cosine,
                warmup_steps: 0,
                epochs: 1,
                max_steps: 0,
                micro_batch_size: 1,
                grad_accum: 1,
                max_seq_len: 2048,
                max_grad_norm: 1.0,
                weight_decay: 0.0,
                embedding_learning_rate: 0.0,
                optimizer: "adamw".into(),
                seed: 42,
                log_every: 1,
                eval_every: 0,
                save_every: 0,
                keep_last: 2,
                dtype: "auto".into(),
                device: "auto".into(),
                gradient_checkpointing: crate::train::policy::Setting::Auto,
                objective: crate::train::objective::Kind::Sft,
                beta: default_beta(),
                simpo_gamma: default_simpo_gamma(),
                precompute_ref: false,
                disable_dropout: true,
                init_adapter: String::new(),
            },
            lora: LoraConfig::default(),
            quant: Quant {
                quant_type: "nf4".into(),
                blocksize: 64,
                double_quant: true,
            },
            data: Data {
                train: String::new(),
                eval: String::new(),
                split: default_split(),
                eval_split: String::new(),
                eval_fraction: 0.0,
                cache: true,
                pack: true,
                skip_bad_lines: false,
                add_tokens: Vec::new(),
                truncation_mode: crate::data::pairs::Truncation::KeepStart,
                format: crate::data::formats::Format::Auto,
                columns: Default::default(),
            },
        }
    }
}

impl TrainConfig {
    /// Reads a TOML file over the defaults (a file may set only some keys).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the config", crate::fsx::shown(path)))?;
        let file: toml::Table =
            toml::from_str(&text).with_context(|| format!("{}: invalid TOML", path.display()))?;
        let mut base = toml::Table::try_from(Self::default()).expect("defaults serialize");
        merge(&mut base, file);
        Self::from_table(base).with_context(|| format!("{}: invalid config", path.display()))
    }

    fn from_table(t: toml::Table) -> Result<Self> {
        let cfg: Self = toml::Value::Table(t)
            .try_into()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("{}", e.message()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Applies `section.key=value` (the value parsed as TOML, else taken as a string).
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let (key, value) = assignment
            .split_once('=')
            .with_context(|| format!("--set `{assignment}`: expected section.key=value"))?;
        let (section, field) = key.trim().split_once('.').with_context(|| {
            format!("--set `{assignment}`: the key needs a section, e.g. training.{key}")
        })?;
        let value = value.trim();
        let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        let mut t = toml::Table::try_from(&*self).expect("config serializes");
        let sec = t.get_mut(section).and_then(|s| s.as_table_mut()).with_context(|| format!("--set `{assignment}`: no section [{section}] (sections: training, lora, quant, data)"))?;
        if !sec.contains_key(field) {
            bail!("--set `{assignment}`: [{section}] has no key `{field}`");
        }
        sec.insert(field.to_string(), parsed);
        *self = Self::from_table(t).with_context(|| format!("--set `{assignment}`"))?;
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        let t = &self.training;
        if t.micro_batch_size == 0 || t.grad_accum == 0 || t.max_seq_len < 2 {
            bail!("training.micro_batch_size and grad_accum must be ≥ 1 and max_seq_len ≥ 2");
        }
        if !(t.learning_rate > 0.0 && t.learning_rate.is_finite()) {
            bail!("training.learning_rate must be a positive number");
        }
        if !(t.embedding_learning_rate >= 0.0 && t.embedding_learning_rate.is_finite()) {
            bail!(
                "training.embedding_learning_rate must be 0 (the learning_rate) or a positive number"
            );
        }
        if t.epochs == 0 && t.max_steps == 0 {
            bail!("set training.epochs or training.max_steps");
        }
        t.optimizer.parse::<crate::train::optim::OptimizerKind>()?;
        if !(t.beta > 0.0 && t.beta.is_finite()) {
            bail!("training.beta must be a positive number (TRL's default is 0.1)");
        }
        if !t.simpo_gamma.is_finite() {
            bail!("training.simpo_gamma must be a number (TRL's default is 0.5)");
        }
        if t.precompute_ref && !t.objective.has_reference() {
            bail!(
                "training.precompute_ref: the {} objective has no reference model (only dpo and ipo do)",
                t.objective
            );
        }
        if !matches!(t.dtype.as_str(), "auto" | "f32" | "bf16" | "f16") {
            bail!("training.dtype `{}`: use auto, f32, bf16 or f16", t.dtype);
        }
        t.device
            .parse::<crate::device::DeviceSpec>()
            .context("training.device")?;
        self.lora.check_targets()?;
        crate::data::formats::check_columns(&self.data.columns)?;
        self.data.check()?;
        self.quant.quant_type.parse::<qlora_quant::QuantType>()?;
        qlora_quant::Blocksize::new(self.quant.blocksize)?;
        Ok(())
    }

    /// The resolved config as TOML (saved beside the run).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }
}

/// Deep-merges `over` into `base`.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_splits_and_held_out_evaluation_are_checked() {
        let with = |sets: &[&str]| {
            let mut c = TrainConfig::default();
            for s in sets {
                c.set(s)?;
            }
            c.validate().map(|()| c)
        };
        let hub = "data.train=\"hf://datasets/o/n\"";
        let c = with(&[hub, "data.eval_split=\"test\""]).unwrap();
        assert_eq!(c.data.train_spec().split, "train");
        assert_eq!(c.data.eval_spec().unwrap().path, "hf://datasets/o/n");
        assert_eq!(c.data.eval_spec().unwrap().split, "test");
        // A Hub eval set without a split reads its test split.
        let c = with(&[hub, "data.eval=\"hf://datasets/o/e\""]).unwrap();
        assert_eq!(c.data.eval_spec().unwrap().split, "test");
        let local = "data.train=\"a.jsonl\"";
        let err = |sets: &[&str]| format!("{:#}", with(sets).unwrap_err());
        assert!(err(&[local, "data.split=\"test\""]).contains("is local"));
        assert!(err(&[local, "data.eval_split=\"test\""]).contains("is local"));
        assert!(err(&[local, "data.eval_fraction=1.5"]).contains("[0, 1)"));
        assert!(
            err(&[local, "data.eval_fraction=0.1", "data.eval=\"b.jsonl\""]).contains("not both")
        );
        assert!(
            with(&[local, "data.eval_fraction=0.1"])
                .unwrap()
                .data
                .eval_spec()
                .is_none()
        );
    }

    #[test]
    fn set_parses_values_and_rejects_unknown_keys() {
        let mut c = TrainConfig::default();
        c.set("training.learning_rate=1e-3").unwrap();
        c.set("lora.targets=[\"qkv_proj\"]").unwrap();
        c.set("training.lr_schedule=linear").unwrap();
        assert_eq!(
            (c.training.learning_rate, c.training.lr_schedule),
            (1e-3, Schedule::Linear)
        );
        assert_eq!(c.lora.targets, vec!["qkv_proj".to_string()]);
        assert!(
            c.set("training.learning_rat=1")
                .unwrap_err()
                .to_string()
                .contains("no key `learning_rat`")
        );
        assert!(
            c.set("train.x=1")
                .unwrap_err()
                .to_string()
                .contains("no section [train]")
        );
        assert!(
            format!("{:#}", c.set("training.dtype=f64").unwrap_err())
                .contains("use auto, f32, bf16 or f16")
        );
    }
}
