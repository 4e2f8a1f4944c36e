//! `qlora plan`: the peak memory of a training run, predicted before anything is loaded, from the
//! model's config, the checkpoint's tensor headers, the settings and what this implementation
//! allocates, term by term, with the phase each peak falls in.
//!
//! Each term is derived from the code it describes, not fitted: the block's activations and the
//! peak of candle's backward over them come from [`crate::model::phi3::memory`] (the block's ops,
//! beside the block) simulated by [`tape`] (candle 0.11's backward rules); the attention's chunks,
//! the NF4 dequantization tiles and the fused LoRA linear's buffers from the functions beside
//! those ops in `qlora-quant`; the loading transients from the order and conversions of
//! [`crate::model::load`]; the step's bookkeeping from [`crate::train::grads`] and
//! [`crate::train::trainer`] (which tensors each keeps while the next phase runs). Two terms are
//! measured instead, in this process, because they belong to other code: the resident size of the
//! running binary (`baseline`) and the tokenizer's heap.
//!
//! On the CPU the prediction is the process's peak resident set (`VmHWM`). On a GPU it is the
//! device's peak use: the CUDA context, the same terms in the compute dtype, and the caching
//! allocator's slack.

pub mod disk;
pub mod inputs;
pub mod tape;

/// The embedding's and the head's tensor names.
pub const EMBED: &str = "model.embed_tokens.weight";
pub const LM_HEAD: &str = "lm_head.weight";

use crate::model::Phi3Config;
use crate::model::phi3::memory::{self, Step};
use crate::train::optim::OptimizerKind;
use crate::train::optim8;
use crate::train::policy::{BlockPolicy, Checkpointing};
use tape::{Id, Kind, Memory, Tape};

/// Where the run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The CPU with this many pool threads.
    Cpu { threads: usize },
    /// A CUDA GPU.
    Cuda,
}

impl Target {
    /// Where `device` trains: the CPU with the compute pool's threads, or a GPU.
    pub fn of(device: &candle_core::Device) -> Self {
        if device.is_cpu() {
            Self::Cpu {
                threads: rayon::current_num_threads(),
            }
        } else {
            Self::Cuda
        }
    }
}

/// How a checkpoint tensor is loaded ([`crate::model::load`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadKind {
    /// Copied, converted to the compute dtype (norms, embeddings, head, dense linears).
    Dense,
    /// A dense linear quantized to NF4 while loading.
    Quantize,
    /// A bitsandbytes 4-bit linear kept in 4 bits (its codes and state copied).
    Bnb4,
    /// A bitsandbytes 4-bit linear dequantized (a dense run on a 4-bit checkpoint).
    Bnb4Dense,
}

/// One tensor of the load, in load order.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadTensor {
    pub name: String,
    /// Values of the (logical) weight.
    pub elements: u64,
    /// Bytes of the tensor in the file (for 4-bit: its packed codes and state).
    pub file_bytes: u64,
    pub kind: LoadKind,
}

/// Everything a plan depends on.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub cfg: Phi3Config,
    pub step: Step,
    pub target: Target,
    /// What each block keeps for the backward (under `"auto"`, what [`Inputs::choose`] picked).
    pub checkpointing: Checkpointing,
    /// `training.gradient_checkpointing` is `"auto"`: the trainer and `qlora plan` pick the
    /// policies ([`Inputs::choose`]).
    pub auto_checkpointing: bool,
    pub grad_accum: usize,
    /// `training.optimizer`: its state and its step's temporaries.
    pub optimizer: OptimizerKind,
    /// The checkpoint's tensors in the order [`crate::model::load`] reads them.
    pub tensors: Vec<LoadTensor>,
    /// NF4 double quantization (absmax in 8 bits) and block size.
    pub double_quant: bool,
    pub blocksize: usize,
    /// Resident bytes of the process before it loads anything (binary, libraries, thread stacks).
    pub baseline: u64,
    /// Heap of the loaded tokenizer.
    pub tokenizer: u64,
    /// Bytes of the encoded training and evaluation rows the trainer keeps.
    pub rows: u64,
    /// The run evaluates (`data.eval` is set).
    pub eval: bool,
    /// `lora.modules_to_save` copies trained (f32 `[V, H]` each).
    pub copies: Copies,
    /// The objective: a preference one scores pairs (its rows are in `step.batch`), and DPO and
    /// IPO keep the reference's values unless its scores are precomputed.
    pub objective: crate::train::objective::Kind,
    pub reference_values: bool,
}

/// Tensors of a parameter's size alive at once in [`crate::train::optim::AdamW::step`]: the new
/// moment beside the old and its two terms, then the update's quotient chain (`m / c1`, `v / c2`,
/// its root, `+ ε`, the quotient) beside the decayed parameter.
const ADAMW_TEMPS: u64 = 6;

/// Which full copies a run trains (`lora.modules_to_save`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Copies {
    pub embed: bool,
    pub head: bool,
    /// Trained embedding rows (`lora.trainable_token_indices`).
    pub token_rows: usize,
    /// The rank of the embedding's LoRA (`embed_tokens` among the targets), 0 for none.
    pub embed_lora_rank: usize,
    /// The rank of the head's LoRA (`lm_head` among the targets), 0 for none.
    pub head_lora_rank: usize,
}

impl Copies {
    pub fn of(lora: &crate::lora::LoraConfig) -> Self {
        let modules = &lora.modules_to_save;
        Self {
            embed: modules.iter().any(|m| m == "embed_tokens"),
            head: modules.iter().any(|m| m == "lm_head"),
            token_rows: lora
                .trainable_token_indices
                .embedding_rows()
                .map_or(0, |r| r.len()),
            embed_lora_rank: if lora.embedding_targeted() { lora.r } else { 0 },
            head_lora_rank: if lora.head_targeted() { lora.r } else { 0 },
        }
    }

    pub fn count(self) -> u64 {
        u64::from(self.embed) + u64::from(self.head)
    }
}

/// The phases of a run whose peaks are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Load,
    Forward,
    Head,
    Backward,
    Optimizer,
    Eval,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Self::Load => "load",
            Self::Forward => "forward",
            Self::Head => "head",
            Self::Backward => "backward",
            Self::Optimizer => "optimizer",
            Self::Eval => "eval",
        }
    }
}

/// One term of a phase's peak.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Term {
    pub name: String,
    pub bytes: u64,
}

/// A phase's peak and what it consists of.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PhasePeak {
    pub phase: Phase,
    pub bytes: u64,
    pub terms: Vec<Term>,
}

impl PhasePeak {
    /// A phase of these terms (its total is summed once every phase is listed).
    fn of(phase: Phase, terms: Vec<Term>) -> Self {
        Self {
            phase,
            bytes: 0,
            terms,
        }
    }
}

/// The prediction.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Plan {
    /// The whole process's peak (CPU: resident set; GPU: device memory).
    pub peak_bytes: u64,
    pub peak_phase: Phase,
    pub phases: Vec<PhasePeak>,
}

/// glibc's heap: the chunk header of each allocation and the top of the heap it grows (measured
/// per allocation, not fitted: 16 bytes of header, and the arena's pad at every growth).
const HEAP_PAD: u64 = 128 << 10;

/// What the CUDA context and cuBLAS workspace take on the device before the first tensor (the
/// figure gpu_check.sh measures on the first GPU run).
pub const CUDA_CONTEXT: u64 = 600 << 20;

fn f32b(n: usize) -> u64 {
    (n * 4) as u64
}

/// Bytes of a Phi-3's weights as trained, by term.
struct Weights {
    codes: u64,
    absmax: u64,
    dense_linears: u64,
    embed: u64,
    head: u64,
    norms: u64,
}

impl Inputs {
    fn elem(&self) -> u64 {
        self.step.elem as u64
    }

    fn hidden(&self) -> u64 {
        self.cfg.hidden_size as u64
    }

    /// `[batch · seq, width]` in the compute dtype.
    fn act(&self, width: u64) -> u64 {
        (self.step.batch * self.step.seq) as u64 * width * self.elem()
    }

    /// Bytes of an NF4 weight of `n` values: packed codes and absmax.
    fn nf4_bytes(&self, n: u64) -> u64 {
        n.div_ceil(2) + self.absmax_bytes(n)
    }

    /// Bytes of the absmax of `n` values: u8 codes plus an f32 per 256 blocks and its offset with
    /// double quantization, else an f32 per block.
    fn absmax_bytes(&self, n: u64) -> u64 {
        let blocks = n.div_ceil(self.blocksize as u64);
        if self.double_quant {
            blocks + 4 * blocks.div_ceil(256) + 4
        } else {
            4 * blocks
        }
    }

    fn weights(&self) -> Weights {
        let mut w = Weights {
            codes: 0,
            absmax: 0,
            dense_linears: 0,
            embed: 0,
            head: 0,
            norms: 0,
        };
        for t in &self.tensors {
            let dense = t.elements * self.elem();
            match t.kind {
                LoadKind::Quantize | LoadKind::Bnb4 => {
                    w.codes += t.elements.div_ceil(2);
                    w.absmax += self.absmax_bytes(t.elements);
                }
                LoadKind::Bnb4Dense => w.dense_linears += dense,
                LoadKind::Dense if t.name == EMBED => w.embed += dense,
                LoadKind::Dense if t.name == LM_HEAD => w.head += dense,
                LoadKind::Dense if t.name.ends_with("norm.weight") => w.norms += dense,
                LoadKind::Dense => w.dense_linears += dense,
            }
        }
        w
    }

    /// Bytes held after loading `t`, and the extra its loading holds at its peak.
    fn load_step(&self, t: &LoadTensor) -> (u64, u64) {
        let e = self.elem();
        let n = t.elements;
        let cpu = matches!(self.target, Target::Cpu { .. });
        match t.kind {
            // The file's pages and a copy of them; the copy converted (the pages dropped first).
            LoadKind::Dense => {
                let kept = n * e;
                let file = t.file_bytes;
                let peak = if cpu {
                    (2 * file).max(file + kept)
                } else {
                    kept
                };
                (kept, peak.saturating_sub(kept))
            }
            // The file's pages while the values are read into f32, then the codes.
            LoadKind::Quantize => {
                let kept = self.nf4_bytes(n);
                let values = 4 * n;
                (kept, (t.file_bytes + values).max(values + 2 * kept) - kept)
            }
            // Codes and state copied out of the file, then into the weight.
            LoadKind::Bnb4 => {
                let kept = self.nf4_bytes(n);
                (kept, t.file_bytes + kept)
            }
            LoadKind::Bnb4Dense => {
                let kept = n * e;
                (kept, t.file_bytes + 4 * n)
            }
        }
    }

    fn adapter_bytes(&self) -> u64 {
        let mut total = 0u64;
        for (target, r) in &self.step.adapted {
            let Some([out, inp]) = self.cfg.any_linear_shape(target) else {
                continue;
            };
            total += f32b(r * inp) + f32b(out * r);
            if self.step.dora {
                total += f32b(out);
            }
        }
        total * self.cfg.num_hidden_layers as u64
    }

    /// The optimizer's state over every adapter matrix, and its step's temporaries for the
    /// largest ([`optim8::step_temporaries`]; AdamW: five f32 copies, its tensor ops' results).
    fn optimizer_bytes(&self) -> (u64, u64) {
        let (mut state, mut temps) = (0u64, 0u64);
        let on_host = matches!(self.target, Target::Cpu { .. });
        for (target, r) in &self.step.adapted {
            let Some([out, inp]) = self.cfg.any_linear_shape(target) else {
                continue;
            };
            let magnitude = if self.step.dora { Some(out) } else { None };
            for n in [r * inp, out * r].into_iter().chain(magnitude) {
                let (s, t) = match self.optimizer {
                    OptimizerKind::AdamW => (2 * f32b(n), ADAMW_TEMPS * f32b(n)),
                    OptimizerKind::AdamW8bit => {
                        (optim8::state_bytes(n), optim8::step_temporaries(n, on_host))
                    }
                };
                state += s * self.cfg.num_hidden_layers as u64;
                temps = temps.max(t);
            }
        }
        let copy = self.cfg.vocab_size * self.cfg.hidden_size;
        for _ in 0..self.copies.count() {
            let (s, t) = match self.optimizer {
                OptimizerKind::AdamW => (2 * f32b(copy), ADAMW_TEMPS * f32b(copy)),
                OptimizerKind::AdamW8bit => (
                    optim8::state_bytes(copy),
                    optim8::step_temporaries(copy, on_host),
                ),
            };
            state += s;
            temps = temps.max(t);
        }
        let (er, hr) = (self.copies.embed_lora_rank, self.copies.head_lora_rank);
        for n in [
            er * self.cfg.vocab_size,
            er * self.cfg.hidden_size,
            hr * self.cfg.vocab_size,
            hr * self.cfg.hidden_size,
        ] {
            if n == 0 {
                continue;
            }
            let (s, t) = match self.optimizer {
                OptimizerKind::AdamW => (2 * f32b(n), ADAMW_TEMPS * f32b(n)),
                OptimizerKind::AdamW8bit => {
                    (optim8::state_bytes(n), optim8::step_temporaries(n, on_host))
                }
            };
            state += s;
            temps = temps.max(t);
        }
        let rows = self.copies.token_rows * self.cfg.hidden_size;
        if rows > 0 {
            let (s, t) = match self.optimizer {
                OptimizerKind::AdamW => (2 * f32b(rows), ADAMW_TEMPS * f32b(rows)),
                OptimizerKind::AdamW8bit => (
                    optim8::state_bytes(rows),
                    optim8::step_temporaries(rows, on_host),
                ),
            };
            state += s;
            temps = temps.max(t);
        }
        (state, temps)
    }

    /// Bytes of the largest trainable tensor (f32).
    fn largest_param_bytes(&self) -> u64 {
        let mut largest = 0u64;
        for (target, r) in &self.step.adapted {
            if let Some([out, inp]) = self.cfg.any_linear_shape(target) {
                largest = largest.max(f32b(r * inp)).max(f32b(out * r));
            }
        }
        if self.copies.count() > 0 {
            largest = largest.max(self.copy_bytes());
        }
        largest
    }

    /// Bytes of the trained token rows (f32 `[n, H]`) and of the embedding's LoRA (`[r, V]` and
    /// `[H, r]`).
    fn token_rows_bytes(&self) -> u64 {
        f32b(self.copies.token_rows * self.cfg.hidden_size)
            + f32b(
                (self.copies.embed_lora_rank + self.copies.head_lora_rank)
                    * (self.cfg.vocab_size + self.cfg.hidden_size),
            )
    }

    /// Bytes of one `[V, H]` f32 copy.
    fn copy_bytes(&self) -> u64 {
        f32b(self.cfg.vocab_size * self.cfg.hidden_size)
    }

    /// The head's loss on `m` selected rows: its chunk buffers beyond the selected rows.
    fn head_transient(&self, m: u64) -> u64 {
        let v = self.cfg.vocab_size as u64;
        match self.target {
            // head_cross_entropy_cpu: a copy of h, dh, and 64 rows of logits.
            Target::Cpu { .. } if self.elem() == 4 => 2 * m * self.hidden() * 4 + 64 * v * 4,
            // grads::head: per chunk of 256 rows its logits, f32 loss pass and gradient, the
            // per-chunk dh collected and concatenated.
            _ => {
                let rows = m.min(crate::train::grads::HEAD_CHUNK_ROWS as u64);
                3 * rows * v * 4 + 2 * m * self.hidden() * self.elem()
            }
        }
    }

    /// The head's graph on the trunk's output `x`: select, final norm, `h · dh`.
    fn head_tape(&self, t: &mut Tape, x: Id, m: u64) -> Id {
        let h = self.hidden() * self.elem();
        let flat = t.view(Kind::Pass, x, self.act(self.hidden()));
        let sel = t.op(Kind::Pass, &[flat], m * h);
        let norm = t.op(
            Kind::Custom {
                grads: vec![Some(m * h)],
                bwd_transient: 0,
                fwd_transient: 0,
            },
            &[sel],
            m * h,
        );
        let dh = t.constant(m * h);
        let prod = t.op(Kind::MulConst, &[norm, dh], m * h);
        t.op(Kind::Pass, &[prod], self.elem())
    }

    /// The prediction.
    pub fn plan(&self) -> Plan {
        let cpu = matches!(self.target, Target::Cpu { .. });
        let n_layers = self.cfg.num_hidden_layers as u64;
        let (b, s) = (self.step.batch as u64, self.step.seq as u64);
        let nh = self.act(self.hidden());
        // Every position is a target at worst (the plan cannot know the data's mask).
        let m = b * s;
        let w = self.weights();
        let adapters = self.adapter_bytes();
        let copies = self.copies.count() * self.copy_bytes() + self.token_rows_bytes();
        // Every trainable parameter (the gradients' size).
        let trainable = adapters + copies;
        let (opt_state, opt_temps) = self.optimizer_bytes();
        let mut common: Vec<Term> = Vec::new();
        let add = |v: &mut Vec<Term>, name: &str, bytes: u64| {
            if bytes > 0 {
                v.push(Term {
                    name: name.to_string(),
                    bytes,
                })
            }
        };
        if cpu {
            add(
                &mut common,
                "runtime: binary, libraries, threads",
                self.baseline + RUNTIME_PAGES,
            );
            add(&mut common, "tokenizer", self.tokenizer);
            add(&mut common, "encoded data rows", self.rows);
        } else {
            add(
                &mut common,
                "CUDA context and cuBLAS workspace",
                CUDA_CONTEXT,
            );
        }
        let mut load_terms = common.clone();
        // Load: the weights so far plus the tensor being loaded.
        let (mut held, mut worst, mut worst_at) = (0u64, 0u64, String::new());
        for t in &self.tensors {
            let (kept, extra) = self.load_step(t);
            if held + extra > worst {
                worst = held + extra;
                worst_at = t.name.clone();
            }
            held += kept;
        }
        let loaded_before_worst = worst.saturating_sub(
            self.tensors
                .iter()
                .find(|t| t.name == worst_at)
                .map_or(0, |t| self.load_step(t).1),
        );
        add(
            &mut load_terms,
            "weights loaded before the largest transient",
            loaded_before_worst,
        );
        add(
            &mut load_terms,
            &format!("loading `{worst_at}` (file pages, copy, conversion)"),
            worst - loaded_before_worst,
        );

        // Resident through training.
        add(&mut common, "NF4 codes (4 bits a weight)", w.codes);
        add(&mut common, "NF4 absmax (double-quantized)", w.absmax);
        add(&mut common, "dense linear weights", w.dense_linears);
        add(&mut common, "token embeddings", w.embed);
        add(&mut common, "lm_head", w.head);
        add(&mut common, "norm weights", w.norms);
        add(&mut common, "adapters A, B (f32)", adapters);
        add(&mut common, "modules_to_save copies (f32)", copies);
        if self.reference_values {
            add(
                &mut common,
                "reference: the starting trainable values (DPO, IPO)",
                trainable,
            );
        }
        let state_name = match self.optimizer {
            OptimizerKind::AdamW => "AdamW moments (2 × f32)",
            OptimizerKind::AdamW8bit => {
                "8-bit AdamW state (2 codes a weight + 2 f32 absmax a 256-block; f32 under 4096)"
            }
        };
        add(&mut common, state_name, opt_state);
        // The batch: ids, positions, segments (u32) and targets (i64) on the host; the mask
        // [B, 1, T, T] and the rotary tables.
        let rot = self.cfg.head_dim() as u64;
        let prep = b * s * s * self.elem()
            + 2 * b * s * rot * self.elem()
            + if cpu { 0 } else { b * s * s * 4 };
        add(&mut common, "batch: mask, rotary tables", prep);
        if cpu {
            add(
                &mut common,
                "batch: ids, positions, targets",
                b * s * 20 + m * 12,
            );
        }
        if self.objective != crate::train::objective::Kind::Sft {
            // Per scored position: log-prob and mean logit (f64), weight (f32), pair tag.
            add(&mut common, "preference scores, weights, tags", m * 36);
        }

        let mut phases = vec![PhasePeak::of(Phase::Load, load_terms)];
        let block_tape = |x_var: bool| -> (Tape, Id, Memory) {
            let mut t = Tape::new();
            let x = if x_var { t.var(nh) } else { t.constant(nh) };
            let out = memory::block(&mut t, &self.step, &self.cfg, x);
            let g = t.constant(nh);
            let prod = t.op(Kind::MulConst, &[out, g], nh);
            let root = t.op(Kind::Pass, &[prod], self.elem());
            let mem = t.simulate(root);
            (t, out, mem)
        };
        // The step's gradients: the accumulated per-adapter gradients while the last block's
        // backward runs, then the step's copies (the sum, its mean, the clipped copy).
        let accum = if self.grad_accum > 1 { trainable } else { 0 };
        // The head copy's gradient, accumulated while the head's loss pass runs and kept until the
        // step's sum; the embedding copy's, computed last (zeros, then the scattered rows).
        let head_dw = if self.copies.head {
            self.copy_bytes()
        } else {
            0
        };
        let embed_dw = if self.copies.embed {
            2 * self.copy_bytes()
        } else {
            0
        };
        if self.checkpointing.recomputes(n_layers as usize) {
            let (_, _, blk) = block_tape(true);
            let work = memory::work(&self.step, &self.cfg);
            let layers = n_layers as usize;
            // What blocks 0..upto hold from their forward until their backward (grads::Saved).
            let kept_name = |v: &mut Vec<Term>, upto: usize| {
                let n = |p| (0..upto).filter(|&l| self.checkpointing.of(l) == p).count() as u64;
                add(v, "block inputs kept (checkpoints)", upto as u64 * nh);
                add(
                    v,
                    "attention and gate/up outputs kept (selective blocks)",
                    n(BlockPolicy::Selective) * work.selective_bytes,
                );
                add(
                    v,
                    "activations of blocks that keep everything",
                    n(BlockPolicy::Keep) * blk.kept,
                );
            };
            // The forward: the earlier blocks' saved values and one block's forward (a block
            // that keeps everything holds its graph past its forward's peak).
            let mut fwd = common.clone();
            let last = layers.saturating_sub(1);
            kept_name(&mut fwd, last);
            add(&mut fwd, "the last block's input", nh);
            add(&mut fwd, "one block's forward", blk.forward_peak);
            add(&mut fwd, "gradients of earlier micro-batches", accum);
            phases.push(PhasePeak::of(Phase::Forward, fwd));
            let mut ht = Tape::new();
            let xv = ht.var(nh);
            let root = self.head_tape(&mut ht, xv, m);
            let head = ht.simulate(root);
            let mut hd = common.clone();
            kept_name(&mut hd, layers);
            add(&mut hd, "the trunk's output and its variable copy", 2 * nh);
            add(
                &mut hd,
                "head: selected rows, loss chunks",
                head.kept + self.head_transient(m).max(head.backward_peak),
            );
            add(&mut hd, "head copy's gradient", head_dw);
            add(&mut hd, "gradients of earlier micro-batches", accum);
            phases.push(PhasePeak::of(Phase::Head, hd));
            // grads::loss_and_grads walks the blocks down, each block's saved values freed once
            // it is done: block l's backward runs beside blocks 0..l's saved values, the running
            // gradient `g`, its input's variable copy and the later blocks' adapter gradients
            // (which grow as the saved values shrink): the largest of every block's.
            let mut worst: Option<(u64, Vec<Term>)> = None;
            for l in 0..layers {
                let mut bw = common.clone();
                kept_name(&mut bw, l);
                add(
                    &mut bw,
                    "running gradient, the block input's variable copy",
                    2 * nh,
                );
                let (graph, peak) = match self.checkpointing.of(l) {
                    BlockPolicy::Recompute => (blk.kept, blk.backward_peak),
                    BlockPolicy::Selective => (
                        blk.kept + work.selective_held,
                        blk.backward_peak.max(
                            (work.selective_bytes + blk.forward_peak)
                                .saturating_sub(blk.kept + work.selective_held),
                        ),
                    ),
                    BlockPolicy::Keep => (blk.kept, blk.backward_peak),
                };
                add(
                    &mut bw,
                    &format!("block {l}'s graph ({})", self.checkpointing.of(l).name()),
                    graph,
                );
                add(
                    &mut bw,
                    "one block's backward (gradients, attention waves, dequantized tiles)",
                    peak,
                );
                add(
                    &mut bw,
                    "adapter gradients of later blocks",
                    adapters * (n_layers - 1 - l as u64) / n_layers.max(1) + accum,
                );
                add(&mut bw, "head copy's gradient", head_dw);
                let total: u64 = bw.iter().map(|t| t.bytes).sum();
                if worst.as_ref().is_none_or(|(w, _)| total > *w) {
                    worst = Some((total, bw));
                }
            }
            let (_, bw) = worst.expect("a model has blocks");
            phases.push(PhasePeak::of(Phase::Backward, bw));
            if embed_dw > 0 {
                let mut em = common.clone();
                add(&mut em, "running gradient", nh);
                add(
                    &mut em,
                    "adapter and head copy gradients",
                    adapters + head_dw + accum,
                );
                add(
                    &mut em,
                    "embedding copy's gradient (zeros, then the rows added)",
                    embed_dw,
                );
                phases.push(PhasePeak::of(Phase::Backward, em));
            }
        } else {
            // One graph over every block and the head.
            let mut t = Tape::new();
            let mut x = t.constant(nh);
            for _ in 0..n_layers {
                x = memory::block(&mut t, &self.step, &self.cfg, x);
            }
            let root = self.head_tape(&mut t, x, m);
            let all = t.simulate(root);
            let mut hd = common.clone();
            add(&mut hd, "embeddings' output", nh);
            add(
                &mut hd,
                "every block's activations and the head's",
                all.kept,
            );
            add(&mut hd, "head: loss chunks", self.head_transient(m));
            add(&mut hd, "head copy's gradient", head_dw);
            add(&mut hd, "gradients of earlier micro-batches", accum);
            phases.push(PhasePeak::of(Phase::Head, hd));
            let mut bw = common.clone();
            add(&mut bw, "embeddings' output", nh);
            add(
                &mut bw,
                "every block's activations and the head's",
                all.kept,
            );
            add(
                &mut bw,
                "backward (gradients, attention waves, dequantized tiles)",
                all.backward_peak,
            );
            add(
                &mut bw,
                "modules_to_save copies' gradients",
                head_dw + embed_dw,
            );
            add(&mut bw, "gradients of earlier micro-batches", accum);
            phases.push(PhasePeak::of(Phase::Backward, bw));
        }
        if self.eval {
            // grads::loss: each block's forward (its graph, over the adapters' variables, kept
            // until its output is detached), then the head without gradients: the selected rows,
            // their norm, and 256 rows of logits at a time.
            let (_, _, blk) = block_tape(false);
            let rows = m.min(crate::train::grads::HEAD_CHUNK_ROWS as u64);
            let head = 2 * m * self.hidden() * self.elem()
                + rows * self.cfg.vocab_size as u64 * self.elem();
            let mut ev = common.clone();
            add(&mut ev, "trunk activations", nh);
            add(
                &mut ev,
                "one block's forward, or the head's 256-row logits",
                blk.forward_peak.max(head),
            );
            phases.push(PhasePeak::of(Phase::Eval, ev));
        }
        let mut opt = common.clone();
        // The step's gradients (each sum replaced by its mean, each mean by its clipped copy, in
        // turn: one set and one tensor more).
        add(
            &mut opt,
            "gradients (sum → mean → clipped, one tensor at a time)",
            trainable + self.largest_param_bytes(),
        );
        let temps_name = match self.optimizer {
            OptimizerKind::AdamW => "AdamW update temporaries",
            OptimizerKind::AdamW8bit => "8-bit AdamW step: the largest matrix's copies",
        };
        add(&mut opt, temps_name, opt_temps);
        phases.push(PhasePeak::of(Phase::Optimizer, opt));
        for p in &mut phases {
            let sum: u64 = p.terms.iter().map(|t| t.bytes).sum();
            let slack = if cpu {
                HEAP_PAD
            } else {
                // The caching allocator rounds every block up (2 MiB segments for large ones)
                // and keeps freed blocks: an eighth of what the phase allocates.
                sum / 8
            };
            p.terms.push(Term {
                name: if cpu {
                    "heap headers and top pad".into()
                } else {
                    "caching allocator slack".into()
                },
                bytes: slack,
            });
            p.bytes = sum + slack;
        }
        let top = phases
            .iter()
            .max_by_key(|p| p.bytes)
            .expect("phases are never empty");
        Plan {
            peak_bytes: top.bytes,
            peak_phase: top.phase,
            phases,
        }
    }
}

/// Code and library pages a training run touches beyond those resident when the plan is made
/// (measured on Linux x86-64: `RssFile` 4 MiB at the start of `qlora train`, 11 MiB at the end of
/// a step: candle's, gemm's and the kernels' code).
pub const RUNTIME_PAGES: u64 = 8 << 20;

/// Whether a plan fits its budget, and what would fit when it does not.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verdict {
    pub peak_bytes: u64,
    /// `None` when the budget is unknown (a GPU this build cannot query).
    pub budget_bytes: Option<u64>,
    pub fits: bool,
    /// Where it does not fit: the largest `max_seq_len` (multiple of 64) with this batch size,
    /// and the largest batch size with this length, that fit (0: none).
    pub max_seq_len_that_fits: Option<usize>,
    pub batch_size_that_fits: Option<usize>,
    /// The switches that lower the peak, the most helpful first, with their peaks.
    pub switches: Vec<(String, u64)>,
}

impl Inputs {
    /// These inputs with `max_seq_len = seq` and `micro_batch_size = batch`.
    fn with_shape(&self, batch: usize, seq: usize) -> Self {
        let mut i = self.clone();
        i.step.batch = batch;
        i.step.seq = seq;
        i
    }

    /// The plan's verdict against `budget`, with advice when it does not fit.
    pub fn verdict(&self, budget: Option<u64>) -> Verdict {
        let peak = self.plan().peak_bytes;
        let fits = budget.is_none_or(|b| peak <= b);
        let mut v = Verdict {
            peak_bytes: peak,
            budget_bytes: budget,
            fits,
            max_seq_len_that_fits: None,
            batch_size_that_fits: None,
            switches: Vec::new(),
        };
        let Some(budget) = budget else { return v };
        if fits {
            return v;
        }
        let fit = |i: &Inputs| i.plan().peak_bytes <= budget;
        // Peaks grow with the length: the largest multiple of 64 below it that fits.
        let (mut lo, mut hi) = (0usize, self.step.seq / 64);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if fit(&self.with_shape(self.step.batch, mid * 64)) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        v.max_seq_len_that_fits = Some(lo * 64);
        v.batch_size_that_fits = Some(
            (1..self.step.batch)
                .rev()
                .find(|&b| fit(&self.with_shape(b, self.step.seq)))
                .unwrap_or(0),
        );
        let mut switches: Vec<(String, Inputs)> = Vec::new();
        let all_recomputed = Checkpointing::from(true);
        if (0..self.cfg.num_hidden_layers)
            .any(|l| self.checkpointing.of(l) != BlockPolicy::Recompute)
        {
            let mut i = self.clone();
            i.checkpointing = all_recomputed;
            switches.push((
                "--gradient-checkpointing true (every block recomputed from its input)".into(),
                i,
            ));
        }
        if !self.step.nf4 {
            let mut i = self.clone();
            i.step.nf4 = true;
            for t in &mut i.tensors {
                if t.kind == LoadKind::Dense
                    && t.name.starts_with(crate::model::names::LAYER_PREFIX)
                    && !t.name.ends_with("norm.weight")
                {
                    t.kind = LoadKind::Quantize;
                }
                if t.kind == LoadKind::Bnb4Dense {
                    t.kind = LoadKind::Bnb4;
                }
            }
            switches.push(("--4bit (an NF4 base)".into(), i));
        }
        if self.step.batch > 1 {
            let mut i = self.with_shape(1, self.step.seq);
            i.grad_accum = self.grad_accum * self.step.batch;
            switches.push((
                format!(
                    "--batch-size 1 --grad-accum {} (the same batch per step)",
                    self.grad_accum * self.step.batch
                ),
                i,
            ));
        }
        if self.step.seq > 64 {
            let half = (self.step.seq / 2)
                .next_multiple_of(64)
                .min(self.step.seq - 1);
            switches.push((
                format!("--max-seq-len {half}"),
                self.with_shape(self.step.batch, half),
            ));
        }
        if self.optimizer == OptimizerKind::AdamW {
            let mut i = self.clone();
            i.optimizer = OptimizerKind::AdamW8bit;
            switches.push((
                "--set training.optimizer=adamw_8bit (8-bit optimizer state)".into(),
                i,
            ));
        }
        let r = self.step.adapted.first().map_or(0, |a| a.1);
        if r > 1 {
            let mut i = self.clone();
            for a in &mut i.step.adapted {
                a.1 = (a.1 / 2).max(1);
            }
            switches.push((format!("--rank {}", r / 2), i));
        }
        let mut scored: Vec<(String, u64)> = switches
            .into_iter()
            .map(|(s, i)| (s, i.plan().peak_bytes))
            .filter(|(_, p)| *p < peak)
            .collect();
        scored.sort_by_key(|(_, p)| *p);
        v.switches = scored;
        v
    }
}

/// One assignment of checkpointing policies and what it costs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PolicyCost {
    /// Block 0 first.
    pub policies: Vec<BlockPolicy>,
    pub peak_bytes: u64,
    /// FLOPs the backward spends recomputing forwards, a step.
    pub recompute_flops: f64,
}

/// What `training.gradient_checkpointing = "auto"` picked under a budget.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Choice {
    pub chosen: PolicyCost,
    /// The chosen policies fit the budget (else they are the ones that need the least memory).
    pub fits: bool,
    pub budget_bytes: Option<u64>,
    /// The assignment with the next fewer recomputed FLOPs, which does not fit (none when the
    /// chosen one recomputes nothing).
    pub next_cheaper: Option<PolicyCost>,
    /// FLOPs of the trunk's forward, a step (what "recompute everything" costs).
    pub forward_flops: f64,
}

/// What `auto` leaves free of the device's memory when no `--budget` is given: a sixteenth, at
/// least 256 MiB (other processes, the page cache the run reads through, allocator growth).
pub fn auto_margin(budget: u64) -> u64 {
    (budget / 16).max(256 << 20).min(budget / 2)
}

impl Inputs {
    /// FLOPs the backward recomputes with these inputs' policies, a step (micro-batches included).
    pub fn recompute_flops(&self) -> f64 {
        let w = memory::work(&self.step, &self.cfg);
        let per_block = |p: BlockPolicy| match p {
            BlockPolicy::Keep => 0.0,
            BlockPolicy::Selective => w.forward_flops - w.selective_skips,
            BlockPolicy::Recompute => w.forward_flops,
        };
        let blocks: f64 = (0..self.cfg.num_hidden_layers)
            .map(|l| per_block(self.checkpointing.of(l)))
            .sum();
        blocks * self.grad_accum.max(1) as f64
    }

    /// The trunk's forward FLOPs a step.
    pub fn forward_flops(&self) -> f64 {
        memory::work(&self.step, &self.cfg).forward_flops
            * self.cfg.num_hidden_layers as f64
            * self.grad_accum.max(1) as f64
    }

    /// The checkpointing policies with the fewest recomputed FLOPs whose predicted peak fits
    /// `budget` (ties: the lower peak). Blocks are identical, so an assignment is how many of the
    /// last blocks keep everything and how many below them keep their attention and gate/up
    /// outputs, the rest recomputing from their input: the backward reaches the last blocks first,
    /// so what they keep is freed before any recomputed block's graph is built. Every such
    /// assignment is planned. Without a budget (a GPU this build cannot query), or when none fits,
    /// every block recomputes (the least memory).
    pub fn choose(&self, budget: Option<u64>) -> Choice {
        let layers = self.cfg.num_hidden_layers;
        let work = memory::work(&self.step, &self.cfg);
        let cost = |policies: Vec<BlockPolicy>| {
            let mut i = self.clone();
            i.checkpointing = Checkpointing::Blocks(policies.clone());
            PolicyCost {
                peak_bytes: i.plan().peak_bytes,
                recompute_flops: i.recompute_flops(),
                policies,
            }
        };
        let assignment = |keep: usize, selective: usize| {
            let mut v = vec![BlockPolicy::Recompute; layers - keep - selective];
            v.extend(std::iter::repeat_n(BlockPolicy::Selective, selective));
            v.extend(std::iter::repeat_n(BlockPolicy::Keep, keep));
            v
        };
        let least = cost(assignment(0, 0));
        let Some(budget_bytes) = budget else {
            return Choice {
                fits: true,
                budget_bytes: None,
                next_cheaper: None,
                forward_flops: self.forward_flops(),
                chosen: least,
            };
        };
        // Selective recomputation only where it skips work (a composed path replays nothing).
        let max_selective = if work.selective_skips > 0.0 {
            layers
        } else {
            0
        };
        let mut all = Vec::new();
        for keep in 0..=layers {
            for selective in 0..=max_selective.min(layers - keep) {
                all.push(cost(assignment(keep, selective)));
            }
        }
        let better = |a: &PolicyCost, b: &PolicyCost| {
            (a.recompute_flops, a.peak_bytes) < (b.recompute_flops, b.peak_bytes)
        };
        let mut chosen: Option<&PolicyCost> = None;
        for c in all.iter().filter(|c| c.peak_bytes <= budget_bytes) {
            if chosen.is_none_or(|b| better(c, b)) {
                chosen = Some(c);
            }
        }
        let fits = chosen.is_some();
        let chosen = chosen.cloned().unwrap_or(least);
        let next_cheaper = all
            .iter()
            .filter(|c| c.recompute_flops < chosen.recompute_flops)
            .min_by(|a, b| {
                b.recompute_flops
                    .total_cmp(&a.recompute_flops)
                    .then(a.peak_bytes.cmp(&b.peak_bytes))
            })
            .cloned();
        Choice {
            chosen,
            fits,
            budget_bytes: Some(budget_bytes),
            next_cheaper,
            forward_flops: self.forward_flops(),
        }
    }
}

impl Choice {
    /// For people: the policies by runs of blocks, the peak, the recompute cost and the next
    /// cheaper assignment.
    pub fn explain(&self) -> String {
        let layers = self.chosen.policies.len();
        let gflop = |f: f64| f / 1e9;
        let share = |f: f64| {
            if self.forward_flops > 0.0 {
                100.0 * f / self.forward_flops
            } else {
                0.0
            }
        };
        let mut s = format!(
            "gradient checkpointing (auto{}): {}\n  peak {}, recomputes {:.1} GFLOP a step ({:.0}% of the trunk's forward)\n",
            match self.budget_bytes {
                Some(b) => format!(" under {}", human(b)),
                None => ", budget unknown: every block recomputed".into(),
            },
            Checkpointing::Blocks(self.chosen.policies.clone()).describe(layers),
            human(self.chosen.peak_bytes),
            gflop(self.chosen.recompute_flops),
            share(self.chosen.recompute_flops),
        );
        if !self.fits {
            s.push_str("  (nothing fits the budget: the least memory is shown)\n");
        }
        if let Some(n) = &self.next_cheaper {
            s.push_str(&format!(
                "  next cheaper, does not fit: {}: peak {}, recomputes {:.1} GFLOP ({:.0}%)\n",
                Checkpointing::Blocks(n.policies.clone()).describe(layers),
                human(n.peak_bytes),
                gflop(n.recompute_flops),
                share(n.recompute_flops),
            ));
        }
        s
    }
}

/// The memory a run may use on the CPU: what the kernel says is available (`MemAvailable`) plus
/// what this process already holds (which the plan counts).
pub fn cpu_budget() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024 + crate::memstat::resident_bytes())
}

/// `8GiB`, `512MiB`, `1.5GB`, `2000000000` as bytes.
pub fn parse_bytes(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.trim().parse().map_err(|_| {
        anyhow::anyhow!("budget `{s}`: not a size; write it like 8GiB, 512MiB or 16GB")
    })?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => (1u64 << 20) as f64,
        "gib" => (1u64 << 30) as f64,
        "tib" => (1u64 << 40) as f64,
        other => anyhow::bail!(
            "budget `{s}`: unknown unit `{other}`; use B, KiB, MiB, GiB, KB, MB or GB"
        ),
    };
    if !(value >= 0.0 && value.is_finite()) {
        anyhow::bail!("budget `{s}`: must be a non-negative size, like 8GiB or 512MiB");
    }
    Ok((value * scale) as u64)
}

/// `bytes` as MiB or GiB for people.
pub fn human(bytes: u64) -> String {
    let mib = bytes as f64 / (1u64 << 20) as f64;
    if mib >= 10240.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else {
        format!("{mib:.0} MiB")
    }
}

impl Plan {
    /// The plan as a table: the peak phase's terms, then every phase's total.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let top = self
            .phases
            .iter()
            .find(|p| p.phase == self.peak_phase)
            .expect("the peak phase is a phase");
        let _ = writeln!(
            s,
            "predicted peak: {} in the {} phase",
            human(self.peak_bytes),
            self.peak_phase.name()
        );
        let shown = |t: &&Term| t.bytes >= 1 << 19;
        for t in top.terms.iter().filter(shown) {
            let _ = writeln!(s, "  {:>10}  {}", human(t.bytes), t.name);
        }
        let hidden = top.terms.iter().filter(|t| !shown(t)).count();
        if hidden > 0 {
            let _ = writeln!(
                s,
                "  (and {hidden} terms under 1 MiB; --json lists them all)"
            );
        }
        let others: Vec<String> = self
            .phases
            .iter()
            .map(|p| format!("{} {}", p.phase.name(), human(p.bytes)))
            .collect();
        let _ = writeln!(s, "phases: {}", others.join(", "));
        s
    }
}

/// The memory a run on `device` may use: [`cpu_budget`] on the CPU; on a GPU its free memory
/// plus the context this process already made there (which the plan counts).
pub fn budget(device: &candle_core::Device) -> Option<u64> {
    if device.is_cpu() {
        cpu_budget()
    } else {
        crate::device::free_bytes(device).map(|free| free + CUDA_CONTEXT)
    }
}

/// The plan and the verdict for people: the table, the budget and what would fit.
pub fn explain(plan: &Inputs, v: &Verdict) -> String {
    use std::fmt::Write;
    let p = plan.plan();
    let mut s = p.render();
    match v.budget_bytes {
        Some(b) => {
            let _ = writeln!(
                s,
                "budget: {} ({})",
                human(b),
                if v.fits { "fits" } else { "does NOT fit" }
            );
        }
        None => {
            let _ = writeln!(s, "budget: unknown (pass --budget)");
        }
    }
    if !v.fits {
        let shape = |what: &str, n: Option<usize>| match n {
            Some(0) | None => format!("no {what} fits"),
            Some(n) => format!("{what} {n} fits"),
        };
        let _ = writeln!(
            s,
            "with {} rows a micro-batch: {}; with {} tokens a row: {}",
            plan.step.batch,
            shape("max_seq_len", v.max_seq_len_that_fits),
            plan.step.seq,
            shape("batch size", v.batch_size_that_fits)
        );
        for (i, (switch, peak)) in v.switches.iter().enumerate() {
            let _ = writeln!(
                s,
                "{} {switch}: peak {}",
                if i == 0 {
                    "most helpful:"
                } else {
                    "          or:"
                },
                human(*peak)
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Phi-3 of `layers` × hidden 512 (8 heads, intermediate 1536, vocab 32064) loaded from bf16,
    /// r = 16 on every linear.
    fn inputs(layers: usize, batch: usize, seq: usize, nf4: bool, ckpt: bool) -> Inputs {
        let cfg = Phi3Config::from_value(
            &serde_json::json!({
                "model_type": "phi3", "vocab_size": 32064, "hidden_size": 512,
                "intermediate_size": 1536, "num_hidden_layers": layers,
                "num_attention_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                "max_position_embeddings": 4096
            }),
            "test",
        )
        .unwrap();
        let mut tensors = Vec::new();
        let dense = |name: String, n: u64| LoadTensor {
            name,
            elements: n,
            file_bytes: 2 * n,
            kind: LoadKind::Dense,
        };
        for l in 0..layers {
            let p = format!("model.layers.{l}");
            tensors.push(dense(format!("{p}.input_layernorm.weight"), 512));
            for t in cfg.layout().targets() {
                let [o, i] = cfg.any_linear_shape(t).unwrap();
                let n = (o * i) as u64;
                tensors.push(LoadTensor {
                    name: format!("{p}.{t}.weight"),
                    elements: n,
                    file_bytes: 2 * n,
                    kind: if nf4 {
                        LoadKind::Quantize
                    } else {
                        LoadKind::Dense
                    },
                });
            }
        }
        tensors.push(dense(EMBED.into(), 32064 * 512));
        tensors.push(dense(LM_HEAD.into(), 32064 * 512));
        Inputs {
            step: Step {
                batch,
                seq,
                elem: 4,
                cpu_threads: Some(2),
                nf4,
                adapted: cfg
                    .layout()
                    .targets()
                    .into_iter()
                    .map(|t| (t, 16))
                    .collect(),
                dropout: false,
                dora: false,
            },
            cfg,
            target: Target::Cpu { threads: 2 },
            checkpointing: ckpt.into(),
            auto_checkpointing: false,
            grad_accum: 1,
            optimizer: OptimizerKind::AdamW,
            tensors,
            double_quant: true,
            blocksize: 64,
            baseline: 4 << 20,
            tokenizer: 8 << 20,
            rows: 0,
            eval: false,
            copies: Copies::default(),
            objective: crate::train::objective::Kind::Sft,
            reference_values: false,
        }
    }

    #[test]
    fn the_peak_grows_with_tokens_and_checkpointing_and_nf4_lower_it() {
        let base = inputs(8, 1, 1024, true, true).plan().peak_bytes;
        assert!(inputs(8, 1, 2048, true, true).plan().peak_bytes > base);
        assert!(inputs(8, 2, 1024, true, true).plan().peak_bytes > base);
        // Without checkpointing every block's activations stay: 8 blocks of ~60 MiB at 1024.
        let plain = inputs(8, 1, 1024, true, false).plan();
        assert!(plain.peak_bytes > base + (300 << 20), "{}", plain.render());
        // Dense f32 linears: 3.4M values a layer, 4 bytes instead of ~0.53.
        let dense = inputs(8, 1, 1024, false, true).plan().peak_bytes;
        assert!(dense > base + 8 * 3_400_000 * 3, "{dense} vs {base}");
    }

    #[test]
    fn auto_checkpointing_recomputes_the_least_that_fits() {
        use BlockPolicy::*;
        let i = inputs(4, 1, 1024, true, true);
        let least = i.plan().peak_bytes;
        let most = inputs(4, 1, 1024, true, false).plan().peak_bytes;
        assert!(most > least);
        // Room for everything: nothing recomputed, the plain plan's peak.
        let c = i.choose(Some(u64::MAX));
        assert!(c.fits && c.next_cheaper.is_none());
        assert_eq!(c.chosen.policies, vec![Keep; 4]);
        assert_eq!((c.chosen.recompute_flops, c.chosen.peak_bytes), (0.0, most));
        // Below what recomputing everything needs: nothing fits; the least memory is shown.
        let c = i.choose(Some(least - 1));
        assert!(!c.fits);
        assert_eq!(c.chosen.policies, vec![Recompute; 4]);
        assert_eq!(c.chosen.recompute_flops, i.forward_flops());
        // Every assignment of the 3 policies to the 4 blocks (any order, not only the ordered
        // ones `choose` plans): the chosen one fits, and each that recomputes less does not.
        let all: Vec<Vec<BlockPolicy>> = (0..81)
            .map(|n: usize| {
                (0..4)
                    .map(|b| [Keep, Selective, Recompute][(n / 3usize.pow(b)) % 3])
                    .collect()
            })
            .collect();
        for budget in [least + (most - least) / 5, (least + most) / 2, most - 1] {
            let c = i.choose(Some(budget));
            assert!(c.fits && c.chosen.peak_bytes <= budget, "{}", c.explain());
            assert!(c.chosen.recompute_flops > 0.0);
            for p in &all {
                let mut j = i.clone();
                j.checkpointing = Checkpointing::Blocks(p.clone());
                if j.recompute_flops() < c.chosen.recompute_flops {
                    assert!(
                        j.plan().peak_bytes > budget,
                        "{p:?} fits {budget} and recomputes less"
                    );
                }
            }
            let n = c.next_cheaper.as_ref().expect("something recomputes less");
            assert!(n.peak_bytes > budget && n.recompute_flops < c.chosen.recompute_flops);
        }
        // What a selective block skips on this path (NF4, f32 on the CPU): the attention's two
        // products over half the scores and the gate/up projection with its adapter.
        let w = memory::work(&i.step, &i.cfg);
        let (m, h, inter, r) = (1024.0, 512.0, 1536.0, 16.0);
        let attention = 2.0 * 1024.0 * 512.0 * 1024.0;
        let gate_up = 2.0 * m * (2.0 * inter * h + r * (h + 2.0 * inter));
        assert_eq!(w.selective_skips, attention + gate_up);
        assert_eq!(w.selective_bytes, 4 * 1024 * (512 + 2 * 1536));
    }

    #[test]
    fn the_nf4_term_is_codes_and_double_quantized_absmax() {
        let i = inputs(1, 1, 128, true, true);
        // 4096 values: 2048 bytes of codes, 64 u8 absmax codes, one f32 scale per 256 blocks
        // and the offset.
        assert_eq!(i.nf4_bytes(4096), 2048 + 64 + 4 + 4);
        let mut single = i.clone();
        single.double_quant = false;
        assert_eq!(single.nf4_bytes(4096), 2048 + 64 * 4);
    }

    #[test]
    fn advice_names_the_largest_shapes_that_fit() {
        let i = inputs(8, 4, 1024, true, true);
        let peak = i.plan().peak_bytes;
        let small = i.with_shape(1, 256).plan().peak_bytes;
        let budget = (peak + small) / 2;
        let v = i.verdict(Some(budget));
        assert!(!v.fits);
        let seq = v.max_seq_len_that_fits.unwrap();
        assert!(seq > 0 && seq < 1024 && seq.is_multiple_of(64), "{seq}");
        assert!(i.with_shape(4, seq).plan().peak_bytes <= budget);
        assert!(i.with_shape(4, seq + 64).plan().peak_bytes > budget);
        let b = v.batch_size_that_fits.unwrap();
        assert!(i.with_shape(b.max(1), 1024).plan().peak_bytes <= budget || b == 0);
        assert!(!v.switches.is_empty());
        assert!(v.switches.windows(2).all(|w| w[0].1 <= w[1].1));
        assert!(i.verdict(Some(peak)).fits);
        assert!(i.verdict(None).fits);
    }

    /// The 8-bit state term is bitsandbytes' layout over every adapter matrix (here hidden 512,
    /// r 16: A [16, 512] and every B ≥ 4096 elements, 8-bit), the rest of the plan unchanged but
    /// the step's temporaries; and the advice offers the switch.
    #[test]
    fn eight_bit_adamw_state_is_codes_and_block_absmax() {
        let a = inputs(2, 1, 256, true, true);
        let mut b = a.clone();
        b.optimizer = OptimizerKind::AdamW8bit;
        let term = |i: &Inputs, prefix: &str| -> u64 {
            let p = i.plan();
            let t = p.phases[1]
                .terms
                .iter()
                .find(|t| t.name.starts_with(prefix));
            t.map_or(0, |t| t.bytes)
        };
        let (mut n_f32, mut n_8bit) = (0u64, 0u64);
        for t in a.cfg.layout().targets() {
            let [out, inp] = a.cfg.any_linear_shape(t).unwrap();
            for n in [16 * inp as u64, out as u64 * 16] {
                n_f32 += 8 * n;
                n_8bit += 2 * n + 8 * n.div_ceil(256);
            }
        }
        assert_eq!(term(&a, "AdamW moments"), 2 * n_f32);
        assert_eq!(term(&b, "8-bit AdamW state"), 2 * n_8bit);
        assert!(b.plan().peak_bytes < a.plan().peak_bytes);
        let v = a.verdict(Some(b.plan().peak_bytes));
        assert!(
            v.switches.iter().any(|(s, _)| s.contains("adamw_8bit")),
            "{:?}",
            v.switches
        );
    }

    #[test]
    fn budgets_parse_with_units_and_bad_ones_say_how_to_write_them() {
        assert_eq!(parse_bytes("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_bytes("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        for bad in ["lots", "8XB", "-1GB"] {
            let e = parse_bytes(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("GiB"), "{e}");
        }
    }
}
