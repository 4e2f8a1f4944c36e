//! `qlora train`.

use crate::config::TrainConfig;
use crate::train::stop;
use crate::train::trainer::{PlanCheck, Trainer};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

/// Fine-tune a Phi-3 with LoRA (QLoRA with --4bit) on chat data (SFT) or preference pairs (DPO,
/// IPO, ORPO, SimPO); writes a PEFT adapter, metrics, a loss plot and checkpoints to the output
/// directory.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Quantize the frozen base to 4 bits (NF4 by default): QLoRA. Without it the base stays dense.
    #[arg(long = "4bit")]
    four_bit: bool,
    /// Checkpoint dir, Hub id (HF cache, else downloaded) or builtin:tiny-phi3 [training.model].
    #[arg(long)]
    model: Option<String>,
    /// Training data: a file (.jsonl, .json, .jsonl.gz/.zst, .parquet), a directory, a glob, or
    /// a Hub dataset hf://datasets/owner/name[@revision][/config] [data.train].
    #[arg(long)]
    data: Option<String>,
    /// The split of a Hub dataset to train on (train, validation, test, train_sft, …)
    /// [data.split, default train].
    #[arg(long)]
    data_split: Option<String>,
    /// Evaluation data, as --data [data.eval].
    #[arg(long)]
    eval_data: Option<String>,
    /// The split to evaluate on: of --eval-data when it is a Hub dataset, else of --data
    /// [data.eval_split].
    #[arg(long)]
    eval_split: Option<String>,
    /// Hold out this fraction of the training examples for evaluation, e.g. 0.05
    /// [data.eval_fraction].
    #[arg(long)]
    eval_fraction: Option<f64>,
    /// Tokenize the data again instead of reading (and writing) qlora's cache of tokenized
    /// examples [data.cache = false].
    #[arg(long)]
    no_data_cache: bool,
    /// TOML config (see configs/); flags and --set apply on top.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output directory [training.output].
    #[arg(long)]
    output: Option<String>,
    /// Any config key: --set training.lr_schedule=linear (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue the run in this output directory from its latest checkpoint, with its saved config.
    #[arg(long, value_name = "OUTPUT")]
    resume: Option<PathBuf>,
    /// [training.epochs]
    #[arg(long)]
    epochs: Option<u64>,
    /// The Hub revision of --model (a branch, tag or commit; `owner/name@rev` says the same).
    #[arg(long)]
    revision: Option<String>,
    /// [training.max_steps]
    #[arg(long)]
    max_steps: Option<u64>,
    /// [training.learning_rate]
    #[arg(long, allow_hyphen_values = true)]
    lr: Option<f64>,
    /// [training.micro_batch_size]
    #[arg(long)]
    batch_size: Option<usize>,
    /// [training.grad_accum]
    #[arg(long)]
    grad_accum: Option<usize>,
    /// [training.max_seq_len]
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// [lora.r]
    #[arg(long)]
    rank: Option<usize>,
    /// [lora.alpha]
    #[arg(long, allow_hyphen_values = true)]
    alpha: Option<f64>,
    /// [lora.dropout]
    #[arg(long, allow_hyphen_values = true)]
    dropout: Option<f32>,
    /// Comma-separated LoRA targets or all-linear [lora.targets].
    #[arg(long)]
    targets: Option<String>,
    /// DoRA: a trained magnitude per output row on top of LoRA, as PEFT's use_dora
    /// [lora.use_dora = true].
    #[arg(long)]
    use_dora: bool,
    /// Full trainable copies, comma-separated: embed_tokens, lm_head [lora.modules_to_save].
    #[arg(long)]
    modules_to_save: Option<String>,
    /// Learning rate of the modules_to_save copies [training.embedding_learning_rate].
    #[arg(long)]
    embedding_lr: Option<f64>,
    /// [training.seed]
    #[arg(long)]
    seed: Option<u64>,
    /// sft (chat data, the default), or dpo, ipo, orpo, simpo (preference pairs: prompt, chosen,
    /// rejected) [training.objective].
    #[arg(long)]
    objective: Option<String>,
    /// The preference objectives' β (ORPO's λ) [training.beta, default 0.1].
    #[arg(long)]
    beta: Option<f64>,
    /// SimPO's target margin γ [training.simpo_gamma, default 0.5].
    #[arg(long)]
    simpo_gamma: Option<f64>,
    /// Start from this PEFT adapter (its LoRA settings replace [lora]'s); for DPO and IPO its
    /// frozen copy is the reference [training.init_adapter].
    #[arg(long)]
    adapter: Option<String>,
    /// DPO, IPO: the reference's log-probs once before training, cached in the output directory
    /// [training.precompute_ref = true].
    #[arg(long)]
    precompute_ref: bool,
    /// auto, f32, bf16 or f16 [training.dtype].
    #[arg(long)]
    dtype: Option<String>,
    /// auto, cpu, cuda or cuda:N [training.device].
    #[arg(long)]
    device: Option<String>,
    /// [training.gradient_checkpointing = false]
    #[arg(long, conflicts_with = "gradient_checkpointing")]
    no_gradient_checkpointing: bool,
    /// What each block keeps for the backward: auto (fewest recomputed FLOPs that fit the
    /// budget), true (its input: recompute it), false (everything), selective (its input,
    /// attention and gate/up outputs) [training.gradient_checkpointing]
    #[arg(long, value_name = "auto|true|false|selective")]
    gradient_checkpointing: Option<String>,
    /// Skip and count bad data lines instead of stopping [data.skip_bad_lines].
    #[arg(long)]
    skip_bad_lines: bool,
    /// Train even when the memory or disk plan (`qlora plan`) says the run does not fit.
    #[arg(long)]
    pub force: bool,
    /// Memory the run may use (8GiB, 512MiB, 16GB) [default: the GPU's free memory, or the
    /// machine's available RAM].
    #[arg(long)]
    pub budget: Option<String>,
    /// Data-parallel backend: auto (from the launcher's environment: several ranks under mpirun →
    /// mpi, under torchrun → nccl, else none), none, mpi (CPU ranks under mpirun; build with
    /// --features mpi) or nccl (one GPU per rank; --features cuda,nccl).
    #[arg(long, default_value = "auto")]
    pub dist: String,
    /// Stop after this many steps, as if killed right after that step's checkpoint (for resume tests).
    #[arg(long, hide = true)]
    stop_after_steps: Option<u64>,
}

impl TrainArgs {
    /// The resolved config: defaults, then --config, then flags, then --set.
    pub fn resolve(&self) -> Result<TrainConfig> {
        let cfg = self.settings()?;
        if cfg.data.train.is_empty() {
            anyhow::bail!(
                "no training data: pass --data FILE.jsonl or set data.train in the config"
            );
        }
        Ok(cfg)
    }

    /// The flags a resumed run needs besides its saved config (`--dist`, `--force`, `--budget`).
    pub fn resume_flags(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.dist != "auto" {
            f.extend(["--dist".to_string(), self.dist.clone()]);
        }
        if self.force {
            f.push("--force".into());
        }
        if let Some(b) = &self.budget {
            f.extend(["--budget".to_string(), b.clone()]);
        }
        f
    }

    /// [`Self::resolve`] without requiring training data (`qlora plan`).
    pub fn settings(&self) -> Result<TrainConfig> {
        if let Some(dir) = &self.resume {
            let path = dir.join("config.resolved.toml");
            return TrainConfig::from_file(&path)
                .with_context(|| format!("--resume {}", dir.display()));
        }
        let mut cfg = match &self.config {
            Some(p) => TrainConfig::from_file(p)?,
            None => TrainConfig::default(),
        };
        let toml_str = |s: &str| toml::Value::String(s.to_string()).to_string();
        let mut sets: Vec<String> = Vec::new();
        let mut put = |k: &str, v: String| sets.push(format!("{k}={v}"));
        if self.four_bit {
            put("training.four_bit", "true".into());
        }
        if let Some(v) = &self.model {
            put("training.model", toml_str(v))
        }
        if let Some(v) = &self.data {
            put("data.train", toml_str(v))
        }
        if let Some(v) = &self.eval_data {
            put("data.eval", toml_str(v))
        }
        if let Some(v) = &self.data_split {
            put("data.split", toml_str(v))
        }
        if let Some(v) = &self.eval_split {
            put("data.eval_split", toml_str(v))
        }
        if let Some(v) = self.eval_fraction {
            put("data.eval_fraction", format!("{v:?}"))
        }
        if self.no_data_cache {
            put("data.cache", "false".into());
        }
        if let Some(v) = &self.output {
            put("training.output", toml_str(v))
        }
        if let Some(v) = self.epochs {
            put("training.epochs", v.to_string())
        }
        if let Some(v) = self.max_steps {
            put("training.max_steps", v.to_string())
        }
        if let Some(v) = self.lr {
            put("training.learning_rate", format!("{v:?}"))
        }
        if let Some(v) = self.batch_size {
            put("training.micro_batch_size", v.to_string())
        }
        if let Some(v) = self.grad_accum {
            put("training.grad_accum", v.to_string())
        }
        if let Some(v) = self.max_seq_len {
            put("training.max_seq_len", v.to_string())
        }
        if let Some(v) = self.rank {
            put("lora.r", v.to_string())
        }
        if let Some(v) = self.alpha {
            put("lora.alpha", format!("{v:?}"))
        }
        if let Some(v) = self.dropout {
            put("lora.dropout", format!("{v:?}"))
        }
        if let Some(v) = &self.targets {
            let list: Vec<String> = v.split(',').map(|t| toml_str(t.trim())).collect();
            put("lora.targets", format!("[{}]", list.join(", ")));
        }
        if self.use_dora {
            put("lora.use_dora", "true".into())
        }
        if let Some(v) = &self.modules_to_save {
            let list: Vec<String> = v
                .split(',')
                .filter(|t| !t.trim().is_empty())
                .map(|t| toml_str(t.trim()))
                .collect();
            put("lora.modules_to_save", format!("[{}]", list.join(", ")));
        }
        if let Some(v) = self.embedding_lr {
            put("training.embedding_learning_rate", format!("{v:?}"))
        }
        if let Some(v) = self.seed {
            put("training.seed", v.to_string())
        }
        if let Some(v) = &self.objective {
            put("training.objective", toml_str(v))
        }
        if let Some(v) = self.beta {
            put("training.beta", format!("{v:?}"))
        }
        if let Some(v) = self.simpo_gamma {
            put("training.simpo_gamma", format!("{v:?}"))
        }
        if let Some(v) = &self.adapter {
            put("training.init_adapter", toml_str(v))
        }
        if self.precompute_ref {
            put("training.precompute_ref", "true".into());
        }
        if let Some(v) = &self.dtype {
            put("training.dtype", toml_str(v))
        }
        if let Some(v) = &self.device {
            put("training.device", toml_str(v))
        }
        if self.no_gradient_checkpointing {
            put("training.gradient_checkpointing", "false".into());
        }
        if let Some(v) = &self.gradient_checkpointing {
            let setting: crate::train::policy::Setting =
                v.parse().context("--gradient-checkpointing")?;
            put(
                "training.gradient_checkpointing",
                toml::Value::try_from(setting)?.to_string(),
            );
        }
        if self.skip_bad_lines {
            put("data.skip_bad_lines", "true".into());
        }
        for s in sets.iter().chain(&self.sets) {
            cfg.set(s)?;
        }
        if let Some(r) = &self.revision {
            cfg.training.model = crate::hub::with_revision(&cfg.training.model, Some(r));
        }
        Ok(cfg)
    }
}

pub fn run(args: TrainArgs) -> Result<ExitCode> {
    let cfg = args.resolve()?;
    let budget = args
        .budget
        .as_deref()
        .map(crate::plan::parse_bytes)
        .transpose()?;
    let check = if args.force {
        PlanCheck::Skip(budget)
    } else {
        PlanCheck::Enforce(budget)
    };
    let backend: crate::dist::Backend = args.dist.parse().context("--dist")?;
    let mut trainer = Trainer::launch(cfg, args.resume.is_some(), check, backend)?;
    let (rank, world) = trainer.rank_world();
    if world > 1 && rank == 0 {
        eprintln!(
            "data-parallel: {world} ranks ({}), a global micro-batch of {} rows",
            args.dist,
            world * trainer.cfg.training.micro_batch_size
        );
    }
    if rank == 0 {
        eprintln!(
            "model {} ({}, {} on {}), {}, {} steps{}",
            trainer.model_dir.display(),
            if trainer.cfg.training.four_bit {
                "4-bit base"
            } else {
                "dense base"
            },
            trainer.model.dtype.as_str(),
            match &trainer.model.device {
                candle_core::Device::Cpu => format!("cpu, {} paths", qlora_quant::isa::class()),
                d => crate::device::name(d),
            },
            trainer.objective.describe(),
            trainer.total_steps,
            if trainer.state.step > 0 {
                format!(", resuming at step {}", trainer.state.step)
            } else {
                String::new()
            }
        );
        match &trainer.choice {
            Some(c) => eprint!("{}", c.explain()),
            None => eprintln!(
                "gradient checkpointing: {}",
                trainer
                    .checkpointing
                    .describe(trainer.model.cfg.num_hidden_layers)
            ),
        }
        let n_params: usize = trainer.opt.params().iter().map(|p| p.elem_count()).sum();
        let bytes = trainer.opt.state_bytes();
        eprintln!(
            "optimizer {}: {n_params} trainable parameters, {bytes} bytes of state ({:.3} per parameter)",
            trainer.opt.kind().as_str(),
            bytes as f64 / n_params.max(1) as f64
        );
    }
    trainer.stop = stop::Stop::on_signals()?;
    let flags = args.resume_flags();
    let summary = trainer
        .run(args.stop_after_steps)
        .map_err(|e| stop::with_resume_hint(e, &trainer, &flags))?;
    if !summary.finished && trainer.stopped() {
        eprintln!("{}", stop::stopped_message(&trainer, &flags));
        return Ok(ExitCode::from(stop::EXIT_STOPPED));
    }
    if rank > 0 {
        return Ok(ExitCode::SUCCESS);
    }
    let out = &trainer.output;
    if summary.finished {
        println!(
            "done: {} steps, final train loss {:.4}{}, {:.0} tokens/s ({:.0} trained tokens/s), peak memory {:.0} MiB (RSS){}, {} skipped non-finite steps",
            trainer.state.step,
            summary.last_loss,
            summary
                .eval_loss
                .map(|l| format!(", eval loss {l:.4}"))
                .unwrap_or_default(),
            summary.tokens as f64 / summary.seconds.max(1e-9),
            summary.trained_tokens as f64 / summary.seconds.max(1e-9),
            summary.peak_rss_mib,
            summary
                .peak_device_mib
                .map(|p| format!(
                    ", {p:.0} MiB on {}",
                    crate::device::name(&trainer.model.device)
                ))
                .unwrap_or_default(),
            trainer.state.nonfinite_skipped
        );
        println!(
            "adapter: {}  plot: {}  metrics: {}",
            out.join("adapter").display(),
            out.join("loss.svg").display(),
            out.join("metrics.jsonl").display()
        );
    } else {
        println!(
            "stopped after step {} (checkpoint in {})",
            trainer.state.step,
            out.join("checkpoints").display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
