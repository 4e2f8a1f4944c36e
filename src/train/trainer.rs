//! The training loop, top to bottom: setup (config, model, adapters, the objective with its data)
//! → optimizer → steps (the objective's micro-batches accumulated, global-norm clipping, schedule,
//! AdamW) → evaluation → checkpoints → the final adapter, metrics and loss plot. What is optimized
//! lives in [`super::objective`], the data-parallel plumbing in [`super::ranks`], what a run is
//! built from in `build`.
//!
//! Determinism: the data order of epoch `e` is a permutation drawn from `seed` and `e`; the dropout
//! seed of a micro-batch is drawn from `seed`, the step and the micro-batch index. So the whole RNG
//! state is the data cursor, and a checkpoint (adapter + AdamW moments + step + cursor) resumes into
//! exactly the loss curve an uninterrupted run produces. Rank 0 alone writes files.

use super::build::{ObjectiveData, add_tokens};
pub use super::build::{REF_CACHE, encode_rows, plan_data};
use super::objective::{Kind, Objective};
use super::optim::{AdamWConfig, Optimizer, OptimizerKind};
use super::ranks::{self, rank_micro_batch, resume_cursor};
use super::stop::Stop;
use crate::config::{Schedule, TrainConfig};
use crate::data::TokenizerBundle;
use crate::device::{DeviceSpec, MemorySampler, compute_dtype};
use crate::dist::{self, Backend, Communicator};
use crate::fsx::disk::AppendLog;
use crate::fsx::{AtomicDir, write_atomic};
use crate::lora::{ForwardCtx, MaskRows, attach, mix_seed, peft};
use crate::model::Phi3;
use crate::model::load::{BaseFormat, LoadOptions, load};
use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

/// Consecutive non-finite steps after which training stops.
pub const MAX_NONFINITE_STREAK: u64 = 5;

/// Where the data cursor and counters stand after `step` optimizer steps.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub step: u64,
    pub epoch: u64,
    /// Micro-batches consumed in `epoch`.
    pub cursor: usize,
    pub nonfinite_skipped: u64,
    pub nonfinite_streak: u64,
    /// Input tokens of the steps taken (padding excluded).
    pub tokens_seen: u64,
    /// Rows per global micro-batch (`world × micro_batch_size`) that `cursor` counts in; 0 in
    /// checkpoints written before data parallelism (then `micro_batch_size`).
    #[serde(default)]
    pub global_micro_batch: usize,
}

/// One line of metrics.jsonl.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub kind: String,
    pub step: u64,
    pub loss: f64,
    #[serde(default)]
    pub lr: f64,
    #[serde(default)]
    pub grad_norm: f64,
    /// Input tokens of the step (every token of its rows, padding excluded).
    #[serde(default)]
    pub tokens: u64,
    /// Input tokens per second, as other trainers report throughput.
    #[serde(default)]
    pub tokens_per_s: f64,
    /// Tokens the loss was taken on (assistant tokens).
    #[serde(default)]
    pub trained_tokens: u64,
    #[serde(default)]
    pub trained_tokens_per_s: f64,
    /// Wall time of the step (forward, backward, optimizer), seconds.
    #[serde(default)]
    pub seconds: f64,
    #[serde(default)]
    pub peak_rss_mib: f64,
    /// Peak memory in use on the CUDA device (context and allocator pool included); absent on the
    /// CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_device_mib: Option<f64>,
    /// The objective's own metrics, named as TRL names them (`rewards/margins`, …): numbers
    /// (JSON values, as a flattened map must hold them; read them with [`Metric::value`]).
    #[serde(flatten, default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Metric {
    /// The objective's metric `name`, when logged.
    pub fn value(&self, name: &str) -> Option<f64> {
        self.extra.get(name).and_then(serde_json::Value::as_f64)
    }
}

fn json_metrics(m: BTreeMap<String, f64>) -> BTreeMap<String, serde_json::Value> {
    m.into_iter()
        .map(|(k, v)| (k, serde_json::Value::from(v)))
        .collect()
}

/// Peak resident memory of this process (Linux `VmHWM`), MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Learning rate before optimizer step `step` (0-based) of `total`.
pub fn learning_rate(cfg: &TrainConfig, step: u64, total: u64) -> f64 {
    let t = &cfg.training;
    if step < t.warmup_steps {
        return t.learning_rate * (step + 1) as f64 / t.warmup_steps as f64;
    }
    let progress =
        (step - t.warmup_steps) as f64 / (total.saturating_sub(t.warmup_steps)).max(1) as f64;
    match t.lr_schedule {
        Schedule::Constant => t.learning_rate,
        Schedule::Linear => t.learning_rate * (1.0 - progress),
        Schedule::Cosine => t.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

/// A prepared run.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub output: PathBuf,
    pub model_dir: PathBuf,
    pub model_ref: String,
    pub model: Phi3,
    pub tok: TokenizerBundle,
    /// What is optimized, with its data.
    pub objective: Box<dyn Objective>,
    pub opt: Optimizer,
    pub state: TrainState,
    pub total_steps: u64,
    /// `(epoch, permutation)`: the data order, drawn once per epoch.
    order: (u64, Vec<usize>),
    memory: MemorySampler,
    comm: Rc<dyn Communicator>,
    /// Set by a signal ([`Stop`]): the run checkpoints and returns after the step it is in.
    pub stop: Stop,
    /// tokenizer.json and tokenizer_config.json with `data.add_tokens`, saved beside every
    /// adapter.
    tokenizer_files: Option<(Vec<u8>, Vec<u8>)>,
    /// What each block keeps for the backward (`training.gradient_checkpointing`, resolved).
    pub checkpointing: crate::train::policy::Checkpointing,
    /// What `"auto"` chose, and why.
    pub choice: Option<crate::plan::Choice>,
}

/// The data order of `epoch`: a permutation drawn from the seed and the epoch alone, so a resumed
/// run draws the same one.
fn epoch_order(n_rows: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n_rows).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(mix_seed(
        seed, epoch,
    )));
    order
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("output", &self.output)
            .field("state", &self.state)
            .finish()
    }
}

/// Whether [`Trainer::with_plan`] refuses a run its memory plan says does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanCheck {
    /// Against this many bytes, or (`None`) the device's free memory / the machine's available
    /// RAM.
    Enforce(Option<u64>),
    /// Not enforced; `"auto"` checkpointing still plans under this budget (`None`: the device's
    /// free memory less [`crate::plan::auto_margin`]).
    Skip(Option<u64>),
}

impl PlanCheck {
    /// The budget given (`--budget`), if any.
    fn budget(self) -> Option<u64> {
        match self {
            Self::Enforce(b) | Self::Skip(b) => b,
        }
    }
}

impl Trainer {
    /// Sets up a run: a fresh one, or the continuation of the latest checkpoint in `output`.
    pub fn new(cfg: TrainConfig, resume: bool) -> Result<Self> {
        Self::with_plan(cfg, resume, PlanCheck::Skip(None))
    }

    /// [`Self::new`], with the memory plan made after the data is read and before the model is
    /// loaded: [`PlanCheck::Enforce`] stops with the plan and advice when the run does not fit.
    pub fn with_plan(cfg: TrainConfig, resume: bool, check: PlanCheck) -> Result<Self> {
        Self::launch(cfg, resume, check, Backend::None)
    }

    /// [`Self::with_plan`] as one rank of a data-parallel job over `backend` (`Backend::None`: a
    /// single process). Past the communicator's start, an error on any rank ends every rank
    /// ([`dist::fail`]).
    pub fn launch(
        mut cfg: TrainConfig,
        resume: bool,
        check: PlanCheck,
        backend: Backend,
    ) -> Result<Self> {
        let baseline = crate::memstat::resident_bytes();
        if backend == Backend::Nccl {
            // One GPU per rank: the launcher's LOCAL_RANK.
            cfg.training.device = dist::rank_device(&cfg.training.device)?;
        }
        let device = cfg
            .training
            .device
            .parse::<DeviceSpec>()
            .context("training.device")?
            .open()?;
        let comm: Rc<dyn Communicator> = Rc::from(dist::open(
            backend,
            &device,
            Path::new(&cfg.training.output),
        )?);
        Self::setup(cfg, resume, check, device, comm.clone(), baseline)
            .map_err(|e| dist::fail(&*comm, e))
    }

    fn setup(
        mut cfg: TrainConfig,
        resume: bool,
        check: PlanCheck,
        device: candle_core::Device,
        comm: Rc<dyn Communicator>,
        baseline: u64,
    ) -> Result<Self> {
        if resume {
            // Another world size continues the same curve: the global micro-batch stays, each
            // rank's share changes.
            let output = Path::new(&cfg.training.output);
            if let Some(ck) = latest_checkpoint(output)? {
                let state = read_state(&ck.join("state.json"))?;
                cfg.training.micro_batch_size =
                    rank_micro_batch(&state, cfg.training.micro_batch_size, comm.world())?;
            }
        }
        let output = PathBuf::from(&cfg.training.output);
        let model_dir = crate::hub::resolve(&cfg.training.model)?;
        let base = if cfg.training.four_bit {
            BaseFormat::Quantized {
                quant_type: cfg.quant.quant_type.parse()?,
                blocksize: qlora_quant::Blocksize::new(cfg.quant.blocksize)?,
                double_quant: cfg.quant.double_quant,
            }
        } else {
            BaseFormat::Dense
        };
        let dtype = compute_dtype(&cfg.training.dtype, &device).context("training.dtype")?;
        let memory = MemorySampler::start(&device)?;
        // The adapter training starts from: its LoRA settings are the run's.
        let mut start = if cfg.training.init_adapter.is_empty() {
            None
        } else {
            let a = peft::load(Path::new(&cfg.training.init_adapter), &device)
                .with_context(|| format!("training.init_adapter {}", cfg.training.init_adapter))?;
            cfg.lora = a.config.clone();
            Some(a)
        };
        if cfg.training.objective != Kind::Sft && cfg.training.disable_dropout {
            // TRL's disable_dropout: the policy's log-probs are the reference's kind.
            cfg.lora.dropout = 0.0;
        }
        if let Some(a) = &mut start {
            // The adapters take their dropout from the adapter's config.
            a.config.dropout = cfg.lora.dropout;
        }
        let (mut tok, tokenizer_bytes) = crate::data::TokenizerBundle::load_measured(&model_dir)?;
        let tokenizer_files = add_tokens(&mut cfg, &mut tok, &model_dir, comm.rank() == 0)?;
        let pad_id = tok.pad_id.or(tok.eos_id).unwrap_or(0);
        let mut data = ObjectiveData::read(&cfg, &tok, pad_id)?;
        let units = data.as_dyn().units();
        // The plan where it is enforced or picks the checkpointing (it reads the checkpoint's
        // headers once more).
        let fixed = cfg.training.gradient_checkpointing.fixed();
        let mut checkpointing = fixed.clone().unwrap_or_else(|| true.into());
        let mut choice = None;
        if matches!(check, PlanCheck::Enforce(_)) || fixed.is_none() {
            let mut plan = crate::plan::inputs::for_run(
                &cfg,
                &model_dir,
                crate::plan::Target::of(&device),
                tokenizer_bytes,
                data.as_dyn().plan_rows(),
                baseline,
            )?;
            let budget = check.budget().or_else(|| crate::plan::budget(&device));
            if fixed.is_none() {
                // Under the given budget, else what is free less a margin.
                let auto_budget = check
                    .budget()
                    .or_else(|| budget.map(|b| b - crate::plan::auto_margin(b)));
                let c = plan.choose(auto_budget);
                checkpointing =
                    crate::train::policy::Checkpointing::Blocks(c.chosen.policies.clone());
                plan.checkpointing = checkpointing.clone();
                choice = Some(c);
            }
            if let PlanCheck::Enforce(_) = check {
                let verdict = plan.verdict(budget);
                if !verdict.fits {
                    bail!(
                        "{}: this run does not fit in memory; --force trains anyway\n{}",
                        model_dir.display(),
                        crate::plan::explain(&plan, &verdict)
                    );
                }
                if comm.rank() == 0 {
                    let steps = crate::plan::disk::total_steps(&cfg, units, comm.world());
                    crate::plan::disk::check(
                        &cfg,
                        &plan.cfg,
                        steps,
                        Path::new(&cfg.training.output),
                    )?;
                }
            }
        }
        let mut model = load(
            &model_dir,
            &LoadOptions {
                dtype,
                device: device.clone(),
                base,
            },
        )?;
        if let Some(w) = model.cfg.context_warning(cfg.training.max_seq_len)
            && comm.rank() == 0
        {
            eprintln!("warning: {w}");
        }
        let global_micro_batch = comm.world() * cfg.training.micro_batch_size;
        let total_steps = crate::plan::disk::total_steps(&cfg, units, comm.world());
        attach::init_adapters(&mut model, &cfg.lora, cfg.training.seed)?;
        attach::init_modules(&mut model, &cfg.lora)?;
        attach::init_tokens(&mut model, &cfg.lora)?;
        if let Some(a) = &start {
            attach::load_adapters(&mut model, a)
                .with_context(|| format!("training.init_adapter {}", cfg.training.init_adapter))?;
        }
        // The reference of DPO and IPO: the trainable values now, before a checkpoint's.
        data.attach_reference(&cfg, &model, &model_dir, &output, comm.rank() == 0)?;
        let objective = data.into_dyn();
        let params: Vec<Var> = model.trainable_vars();
        let kind: OptimizerKind = cfg.training.optimizer.parse()?;
        let mut opt = Optimizer::new(
            kind,
            params,
            AdamWConfig {
                weight_decay: cfg.training.weight_decay,
                ..Default::default()
            },
        )?;
        let mut state = TrainState::default();
        if resume {
            let ck = latest_checkpoint(&output)?
                .with_context(|| format!("{}: no checkpoint to resume from", output.display()))?;
            let adapter = peft::load(&ck.join("adapter"), &device)?;
            attach::load_adapters(&mut model, &adapter)?;
            let params: Vec<Var> = model.trainable_vars();
            opt = Optimizer::new(kind, params, opt.cfg())?;
            let opt_path = ck.join("optimizer.safetensors");
            let mut saved = crate::checkpoint::load_safetensors(&opt_path, &device)?;
            opt.load_state(&mut saved)
                .with_context(|| opt_path.display().to_string())?;
            state = read_state(&ck.join("state.json"))?;
            opt.set_step(state.step);
            state.cursor = resume_cursor(&state, cfg.training.micro_batch_size, global_micro_batch)
                .with_context(|| format!("resuming {}", ck.display()))?;
            if comm.rank() == 0 {
                truncate_metrics(&output.join("metrics.jsonl"), state.step)?;
                crate::fsx::remove_temps(&output.join("checkpoints"))?;
            }
        } else if latest_checkpoint(&output)?.is_some() || output.join("adapter").exists() {
            bail!(
                "{} already holds a run; pass --resume {} to continue it, or choose another --output",
                output.display(),
                output.display()
            );
        } else if comm.rank() == 0 {
            // A run that failed before its first checkpoint starts over: its metrics go.
            truncate_metrics(&output.join("metrics.jsonl"), 0)?;
        }
        state.global_micro_batch = global_micro_batch;
        ranks::check_same_run(
            &*comm,
            &cfg.to_toml(),
            objective.fingerprint(),
            opt.params(),
        )?;
        if comm.rank() == 0 {
            crate::fsx::disk::create_dir_all(&output)?;
            write_atomic(
                &output.join("config.resolved.toml"),
                cfg.to_toml().as_bytes(),
            )?;
        }
        Ok(Self {
            model_ref: cfg.training.model.clone(),
            cfg,
            output,
            model_dir,
            model,
            tok,
            objective,
            opt,
            state,
            total_steps,
            order: (0, Vec::new()),
            memory,
            comm,
            stop: Stop::never(),
            tokenizer_files,
            checkpointing,
            choice,
        })
    }

    /// Whether the last run stopped because a signal asked it to ([`Stop`]).
    pub fn stopped(&self) -> bool {
        self.stop.now(self.comm.is_single())
    }

    /// This process's rank and the world size.
    pub fn rank_world(&self) -> (usize, usize) {
        (self.comm.rank(), self.comm.world())
    }

    /// The units of the next global micro-batch (every rank's), advancing the cursor (and the
    /// epoch).
    fn next_units(&mut self) -> Vec<usize> {
        let world = self.comm.world();
        let mb = world * self.cfg.training.micro_batch_size;
        let n = self.objective.units();
        let per_epoch = n.div_ceil(mb);
        if self.state.cursor >= per_epoch {
            self.state.epoch += 1;
            self.state.cursor = 0;
        }
        if self.order.0 != self.state.epoch || self.order.1.is_empty() {
            self.order = (
                self.state.epoch,
                epoch_order(n, self.cfg.training.seed, self.state.epoch),
            );
        }
        let order = &self.order.1;
        let start = self.state.cursor * mb;
        self.state.cursor += 1;
        order[start..(start + mb).min(order.len())].to_vec()
    }

    /// The evaluation loss and the objective's metrics over the eval data.
    pub fn evaluate(&mut self) -> Result<Option<(f64, BTreeMap<String, f64>)>> {
        let n = self.objective.eval_units();
        if n == 0 {
            return Ok(None);
        }
        let (rank, world) = (self.comm.rank(), self.comm.world());
        let mut sums = vec![0f64; self.objective.n_scalars()];
        let all: Vec<usize> = (0..n).collect();
        // Rank r evaluates chunks r, r + world, …; the sums are then summed over ranks.
        for chunk in all
            .chunks(self.cfg.training.micro_batch_size)
            .skip(rank)
            .step_by(world)
        {
            let s = self.objective.eval_batch(&self.model, chunk)?;
            for (a, b) in sums.iter_mut().zip(s) {
                *a += b;
            }
        }
        if !self.comm.is_single() {
            self.comm.all_reduce_scalars(&mut sums)?;
        }
        Ok(Some(self.objective.finish_eval(&sums)))
    }

    /// One optimizer step; `None` when it was skipped for non-finite values.
    fn step(&mut self) -> Result<Option<Metric>> {
        let t0 = Instant::now();
        let step = self.state.step;
        let mut sums: Option<Vec<Tensor>> = None;
        let mut scalars = vec![0f64; self.objective.n_scalars()];
        let mut n_input = 0usize;
        let (rank, world) = (self.comm.rank(), self.comm.world());
        let micro_batches: Vec<Vec<usize>> = (0..self.cfg.training.grad_accum)
            .map(|_| self.next_units())
            .collect();
        self.objective.begin_step(&micro_batches.concat());
        for (micro, global) in micro_batches.iter().enumerate() {
            // Local unit b is global unit rank + b·world of the global micro-batch.
            let mine = ranks::share(global, rank, world);
            n_input += mine
                .iter()
                .map(|&i| self.objective.input_tokens(i))
                .sum::<usize>();
            if mine.is_empty() {
                continue;
            }
            let ctx = ForwardCtx {
                dropout_seed: Some(mix_seed(
                    mix_seed(self.cfg.training.seed, step),
                    micro as u64,
                )),
                mask_rows: MaskRows {
                    first: rank as u64,
                    step: world as u64,
                },
            };
            let c = self
                .objective
                .micro_batch(&self.model, &mine, &ctx, &self.checkpointing)?;
            for (a, b) in scalars.iter_mut().zip(&c.scalars) {
                *a += b;
            }
            sums = Some(match sums {
                None => c.grads,
                Some(prev) => prev
                    .iter()
                    .zip(&c.grads)
                    .map(|(p, g)| p + g)
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        let sums = match sums {
            Some(s) => s,
            // No row of this step fell to this rank: it adds zeros.
            None => self
                .opt
                .params()
                .iter()
                .map(|p| p.as_tensor().zeros_like())
                .collect::<candle_core::Result<_>>()?,
        };
        let sums = ranks::reduce_step(&*self.comm, sums, &mut scalars, &mut n_input, &self.stop)?;
        let values = self.objective.finish(&scalars);
        let n_tokens = values.trained_tokens as usize;
        let n = values.divisor;
        // Each sum is dropped as its mean is made (and each mean as its clipped copy is): one set
        // of gradients alive, plus one tensor's worth in turn (full embedding and head copies
        // make these hundreds of MiB each).
        let grads: Vec<Tensor> = sums
            .into_iter()
            .map(|g| g / n)
            .collect::<candle_core::Result<_>>()?;
        let loss = values.loss;
        // Σ‖g‖² per parameter on the device, read back in one transfer.
        let per_param = grads
            .iter()
            .map(|g| g.sqr()?.sum_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let sq: f64 = if per_param.is_empty() {
            0.0
        } else {
            Tensor::stack(&per_param, 0)?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?
                .into_iter()
                .sum()
        };
        let norm = sq.sqrt();
        if !loss.is_finite() || !norm.is_finite() {
            self.state.nonfinite_skipped += 1;
            self.state.nonfinite_streak += 1;
            self.state.step += 1;
            if self.state.nonfinite_streak >= MAX_NONFINITE_STREAK {
                bail!(
                    "loss or gradients were NaN/inf for {MAX_NONFINITE_STREAK} steps in a row (step {step}); lower training.learning_rate or check the data"
                );
            }
            return Ok(None);
        }
        self.state.nonfinite_streak = 0;
        let clip = self.cfg.training.max_grad_norm;
        let grads = if clip > 0.0 && norm > clip {
            grads
                .into_iter()
                .map(|g| g * (clip / norm))
                .collect::<candle_core::Result<_>>()?
        } else {
            grads
        };
        let lr = learning_rate(&self.cfg, step, self.total_steps);
        self.opt.step_scaled(&grads, lr, &self.lr_scales())?;
        self.state.step += 1;
        self.state.tokens_seen += n_input as u64;
        let seconds = t0.elapsed().as_secs_f64();
        Ok(Some(Metric {
            kind: "train".into(),
            step: self.state.step,
            loss,
            lr,
            grad_norm: norm,
            tokens: n_input as u64,
            tokens_per_s: n_input as f64 / seconds,
            trained_tokens: n_tokens as u64,
            trained_tokens_per_s: n_tokens as f64 / seconds,
            seconds,
            peak_rss_mib: peak_rss_mib(),
            peak_device_mib: self.memory.peak_mib().map(|(peak, _)| peak),
            extra: json_metrics(values.metrics),
        }))
    }

    fn eval_metric(&self, step: u64, loss: f64, extra: BTreeMap<String, f64>) -> Metric {
        Metric {
            kind: "eval".into(),
            step,
            loss,
            lr: 0.0,
            grad_norm: 0.0,
            tokens: 0,
            tokens_per_s: 0.0,
            trained_tokens: 0,
            trained_tokens_per_s: 0.0,
            seconds: 0.0,
            peak_rss_mib: peak_rss_mib(),
            peak_device_mib: self.memory.peak_mib().map(|(peak, _)| peak),
            extra: json_metrics(extra),
        }
    }

    /// Writes a checkpoint of the current state (atomically) and prunes old ones.
    fn save_checkpoint(&self) -> Result<()> {
        let dir = self
            .output
            .join("checkpoints")
            .join(format!("step-{:06}", self.state.step));
        if dir.exists() {
            return Ok(());
        }
        let write = || {
            let tmp = AtomicDir::create(&dir)?;
            self.save_adapter(&tmp.path().join("adapter"))?;
            let moments = self.opt.state_tensors();
            crate::fsx::st::save(&tmp.path().join("optimizer.safetensors"), moments, None)?;
            write_atomic(
                &tmp.path().join("state.json"),
                &serde_json::to_vec_pretty(&self.state)?,
            )?;
            tmp.commit()
        };
        write().with_context(|| {
            format!(
                "writing the checkpoint {} (the earlier checkpoints are intact)",
                dir.display()
            )
        })?;
        let mut all = list_checkpoints(&self.output)?;
        while all.len() > self.cfg.training.keep_last.max(1) {
            std::fs::remove_dir_all(all.remove(0))?;
        }
        Ok(())
    }

    fn save_adapter(&self, dir: &Path) -> Result<()> {
        let base =
            std::fs::canonicalize(&self.model_dir).unwrap_or_else(|_| self.model_dir.clone());
        let base_name =
            if Path::new(&self.model_ref).is_dir() || self.model_ref.starts_with("builtin:") {
                base.display().to_string()
            } else {
                self.model_ref.clone()
            };
        let tokens = attach::token_rows(&self.model);
        let embed = attach::embed_lora_weights(&self.model);
        let head = attach::head_lora_weights(&self.model);
        let modules = attach::module_weights(&self.model);
        peft::save_every(
            dir,
            &self.cfg.lora,
            &base_name,
            &attach::adapter_weights(&self.model),
            &peft::Extras {
                modules: &modules,
                tokens: tokens.as_ref().map(|(ids, rows)| (ids.as_slice(), rows)),
                embed_lora: embed.as_ref().map(|(a, b)| (a, b)),
                head_lora: head.as_ref().map(|(a, b)| (a, b)),
            },
        )?;
        // The extended tokenizer (data.add_tokens), which exports take from here.
        if let Some((json, cfg)) = &self.tokenizer_files {
            write_atomic(&dir.join("tokenizer.json"), json)?;
            write_atomic(&dir.join("tokenizer_config.json"), cfg)?;
        }
        Ok(())
    }

    /// Each parameter's learning rate relative to `training.learning_rate`: the
    /// `modules_to_save` copies and the trained token rows (the last parameters) take
    /// `training.embedding_learning_rate` when it is set, on the same schedule.
    fn lr_scales(&self) -> Vec<f64> {
        let n = self.opt.params().len();
        let copies = usize::from(self.model.saved.embed.is_some())
            + usize::from(self.model.saved.tokens.is_some())
            + usize::from(self.model.saved.head.is_some());
        let t = &self.cfg.training;
        let copy_scale = if t.embedding_learning_rate > 0.0 {
            t.embedding_learning_rate / t.learning_rate
        } else {
            1.0
        };
        (0..n)
            .map(|i| if i + copies >= n { copy_scale } else { 1.0 })
            .collect()
    }

    /// Runs to the end (or to `stop_after` steps, as if killed right after that step's checkpoint).
    /// On a data-parallel job, an error on any rank ends every rank ([`dist::fail`]).
    pub fn run(&mut self, stop_after: Option<u64>) -> Result<RunSummary> {
        let comm = self.comm.clone();
        self.run_rank(stop_after).map_err(|e| dist::fail(&*comm, e))
    }

    /// Writes a checkpoint (rank 0), then waits for every rank.
    fn checkpoint_all(&self) -> Result<()> {
        if self.comm.rank() == 0 {
            self.save_checkpoint()?;
        }
        self.comm.barrier()
    }

    fn run_rank(&mut self, stop_after: Option<u64>) -> Result<RunSummary> {
        let lead = self.comm.rank() == 0;
        let metrics_path = self.output.join("metrics.jsonl");
        // Rank 0 alone writes: the others' metrics go nowhere and their progress is hidden.
        let mut metrics = lead.then(|| AppendLog::open(&metrics_path)).transpose()?;
        let mut log = |m: &Metric| -> Result<()> {
            if let Some(log) = &mut metrics {
                log.line(&serde_json::to_string(m)?)?;
            }
            Ok(())
        };
        let bar = if lead {
            ProgressBar::new(self.total_steps)
        } else {
            ProgressBar::hidden()
        }
        .with_style(
            ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_position(self.state.step);
        let t0 = Instant::now();
        let tokens_at_start = self.state.tokens_seen;
        let mut trained_tokens = 0u64;
        let mut last_loss = f64::NAN;
        while self.state.step < self.total_steps {
            if let Some(m) = self.step()? {
                last_loss = m.loss;
                trained_tokens += m.trained_tokens;
                log(&m)?;
                let device_peak = m
                    .peak_device_mib
                    .map(|p| {
                        format!(
                            " ({p:.0} MiB on {})",
                            crate::device::name(&self.model.device)
                        )
                    })
                    .unwrap_or_default();
                let prefs = match (m.value("rewards/margins"), m.value("rewards/accuracies")) {
                    (Some(margin), Some(acc)) => format!(" margin {margin:.4} acc {acc:.2}"),
                    _ => String::new(),
                };
                let line = format!(
                    "loss {:.4}{prefs} lr {:.2e} tok/s {:.0} ({:.0} trained) peak {:.0} MiB{device_peak}",
                    m.loss, m.lr, m.tokens_per_s, m.trained_tokens_per_s, m.peak_rss_mib
                );
                bar.set_message(line.clone());
                if lead
                    && bar.is_hidden()
                    && (m.step % self.cfg.training.log_every.max(1) == 0 || m.step == 1)
                {
                    eprintln!("step {}/{} {line}", m.step, self.total_steps);
                }
            }
            bar.set_position(self.state.step);
            let every = self.cfg.training.eval_every;
            if every > 0
                && self.state.step.is_multiple_of(every)
                && self.state.step < self.total_steps
                && let Some((l, extra)) = self.evaluate()?
            {
                log(&self.eval_metric(self.state.step, l, extra))?;
            }
            let save = self.cfg.training.save_every;
            let stopping =
                self.stop.now(self.comm.is_single()) && self.state.step < self.total_steps;
            if stopping || (save > 0 && self.state.step.is_multiple_of(save)) {
                self.checkpoint_all()?;
            }
            if stopping || stop_after.is_some_and(|s| self.state.step >= s) {
                bar.finish_and_clear();
                return Ok(RunSummary {
                    finished: false,
                    last_loss,
                    eval_loss: None,
                    peak_rss_mib: peak_rss_mib(),
                    peak_device_mib: self.memory.peak_mib().map(|(peak, _)| peak),
                    seconds: t0.elapsed().as_secs_f64(),
                    tokens: self.state.tokens_seen - tokens_at_start,
                    trained_tokens,
                });
            }
        }
        bar.finish_and_clear();
        let eval = self.evaluate()?;
        let eval_loss = eval.as_ref().map(|e| e.0);
        if let Some((l, extra)) = eval {
            log(&self.eval_metric(self.state.step, l, extra))?;
        }
        if lead {
            self.save_adapter(&self.output.join("adapter"))?;
            crate::plot::loss_curve(&metrics_path, &self.output.join("loss.svg"))?;
        }
        self.comm.barrier()?;
        Ok(RunSummary {
            finished: true,
            last_loss,
            eval_loss,
            peak_rss_mib: peak_rss_mib(),
            peak_device_mib: self.memory.peak_mib().map(|(peak, _)| peak),
            seconds: t0.elapsed().as_secs_f64(),
            tokens: self.state.tokens_seen - tokens_at_start,
            trained_tokens,
        })
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub finished: bool,
    pub last_loss: f64,
    pub eval_loss: Option<f64>,
    pub peak_rss_mib: f64,
    /// Peak memory in use on the CUDA device (None on the CPU).
    pub peak_device_mib: Option<f64>,
    pub seconds: f64,
    /// Input tokens of the steps run (padding excluded).
    pub tokens: u64,
    /// Tokens the loss was taken on.
    pub trained_tokens: u64,
}

fn read_state(path: &Path) -> Result<TrainState> {
    std::fs::read(path)
        .map_err(anyhow::Error::from)
        .and_then(|b| Ok(serde_json::from_slice(&b)?))
        .with_context(|| format!("{}: cannot read the training state", path.display()))
}

/// Checkpoint directories of a run, oldest first.
pub fn list_checkpoints(output: &Path) -> Result<Vec<PathBuf>> {
    let dir = output.join("checkpoints");
    let mut all: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(d) => d
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    all.sort();
    Ok(all)
}

fn latest_checkpoint(output: &Path) -> Result<Option<PathBuf>> {
    Ok(list_checkpoints(output)?.pop())
}

/// Drops metrics logged after `step` (they belong to the part of the run being redone).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| serde_json::from_str::<Metric>(l).is_ok_and(|m| m.step <= step))
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    write_atomic(path, out.as_bytes())
}
