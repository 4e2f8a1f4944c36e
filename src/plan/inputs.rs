//! A plan's [`Inputs`] from a run's settings: the model's config and its checkpoint's tensor
//! headers (nothing loaded), the tokenizer's measured heap
//! ([`crate::data::TokenizerBundle::load_measured`]) and the data (encoded as the trainer encodes
//! it).

use super::{Inputs, LoadKind, LoadTensor, Target};
use crate::checkpoint::Checkpoint;
use crate::config::TrainConfig;
use crate::model::Phi3Config;
use crate::model::names;
use crate::model::phi3::memory::Step;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::Path;

/// Bytes of the rows the trainer keeps: ids, positions, segments (u32) and targets (i64) per
/// token, and each row's four vectors.
pub fn rows_bytes(rows: &[crate::data::batch::Row]) -> u64 {
    rows.iter()
        .map(|r| {
            (r.ids.capacity() * 4
                + r.positions.capacity() * 4
                + r.segments.capacity() * 4
                + r.targets.capacity() * 8
                + std::mem::size_of::<crate::data::batch::Row>()) as u64
        })
        .sum()
}

/// The checkpoint's tensors in the order [`crate::model::load`] reads them, with their sizes.
pub fn load_order(ck: &Checkpoint, cfg: &Phi3Config, four_bit: bool) -> Result<Vec<LoadTensor>> {
    let headers = ck.tensors()?;
    let mut sizes: HashMap<String, (u64, u64)> = HashMap::new();
    for st in &headers {
        for (name, view) in st.tensors() {
            let n: u64 = view.shape().iter().map(|&d| d as u64).product();
            sizes.insert(name, (n, view.data().len() as u64));
        }
    }
    let bnb = cfg.quantization_config.is_some();
    let linear_kind = match (bnb, four_bit) {
        (true, true) => LoadKind::Bnb4,
        (true, false) => LoadKind::Bnb4Dense,
        (false, true) => LoadKind::Quantize,
        (false, false) => LoadKind::Dense,
    };
    let dense = |name: String| {
        let (n, bytes) = sizes.get(&name).copied().unwrap_or((0, 0));
        LoadTensor {
            name,
            elements: n,
            file_bytes: bytes,
            kind: LoadKind::Dense,
        }
    };
    let linear = |prefix: &str, target: &str| {
        let suffix = cfg.layout().suffix(target).expect("a target of the layout");
        let name = format!("{prefix}.{suffix}.weight");
        let [o, i] = cfg.any_linear_shape(target).expect("a linear of the model");
        // A 4-bit weight comes with its quantization state tensors (`name.absmax`, …).
        let file_bytes = if bnb {
            sizes
                .iter()
                .filter(|(k, _)| k.starts_with(&name))
                .map(|(_, &(_, b))| b)
                .sum()
        } else {
            sizes.get(&name).map_or(0, |&(_, b)| b)
        };
        LoadTensor {
            name,
            elements: (o * i) as u64,
            file_bytes,
            kind: linear_kind,
        }
    };
    let targets = cfg.layout().targets();
    // Attention's linears come before the post-attention norm, the MLP's after it.
    let split = targets
        .iter()
        .position(|t| *t == "o_proj")
        .expect("every layout has o_proj")
        + 1;
    let mut out = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        let p = format!("{}{l}", names::LAYER_PREFIX);
        out.push(dense(format!("{p}.input_layernorm.weight")));
        out.extend(targets[..split].iter().map(|t| linear(&p, t)));
        out.push(dense(format!("{p}.post_attention_layernorm.weight")));
        out.extend(targets[split..].iter().map(|t| linear(&p, t)));
    }
    out.push(dense(super::EMBED.to_string()));
    if !cfg.tie_word_embeddings && sizes.contains_key(super::LM_HEAD) {
        out.push(dense(super::LM_HEAD.to_string()));
    }
    out.push(dense("model.norm.weight".to_string()));
    Ok(out)
}

/// What the encoded data contributes to a plan.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rows {
    /// Bytes the trainer keeps for them.
    pub bytes: u64,
    /// The longest row (a micro-batch is padded to its longest row); `None` when unknown (no
    /// data given: then `max_seq_len`).
    pub longest: Option<usize>,
    /// How many rows there are (a micro-batch holds at most that many); `None` when unknown.
    pub count: Option<usize>,
}

impl Rows {
    pub fn of(rows: &[crate::data::batch::Row]) -> Self {
        Self {
            bytes: rows_bytes(rows),
            longest: Some(rows.iter().map(|r| r.ids.len()).max().unwrap_or(0)),
            count: Some(rows.len()),
        }
    }

    /// Training and evaluation rows together.
    pub fn and(self, other: Self) -> Self {
        Self {
            bytes: self.bytes + other.bytes,
            longest: self.longest.max(other.longest),
            count: self.count.max(other.count),
        }
    }
}

/// The tensors a bf16 checkpoint of `cfg` would hold, in load order, without reading one (for
/// models built in memory: the benches).
pub fn synthetic_load_order(cfg: &Phi3Config, four_bit: bool) -> Vec<LoadTensor> {
    let dense = |name: String, n: usize| LoadTensor {
        name,
        elements: n as u64,
        file_bytes: 2 * n as u64,
        kind: LoadKind::Dense,
    };
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut out = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        let p = format!("{}{l}", names::LAYER_PREFIX);
        out.push(dense(format!("{p}.input_layernorm.weight"), h));
        for t in cfg.layout().targets() {
            let [o, i] = cfg.any_linear_shape(t).expect("a linear of the model");
            let mut w = dense(format!("{p}.{t}.weight"), o * i);
            if four_bit {
                w.kind = LoadKind::Quantize;
            }
            out.push(w);
        }
        out.push(dense(format!("{p}.post_attention_layernorm.weight"), h));
    }
    out.push(dense(super::EMBED.to_string(), v * h));
    if !cfg.tie_word_embeddings {
        out.push(dense(super::LM_HEAD.to_string(), v * h));
    }
    out.push(dense("model.norm.weight".to_string(), h));
    out
}

/// The plan of the run `cfg` describes on the model in `model_dir`, with the tokenizer's heap
/// and the rows as measured by the caller.
pub fn for_run(
    cfg: &TrainConfig,
    model_dir: &Path,
    target: Target,
    tokenizer: u64,
    rows: Rows,
    baseline: u64,
) -> Result<Inputs> {
    let ck = Checkpoint::open(model_dir)?;
    let origin = model_dir.join(crate::checkpoint::CONFIG_FILE);
    let model = Phi3Config::from_value(&ck.config, &origin.display().to_string())?;
    let targets = cfg.lora.target_names(model.layout())?;
    let elem = match target {
        Target::Cpu { .. } => match cfg.training.dtype.as_str() {
            "f16" => 2,
            _ => 4,
        },
        Target::Cuda => match cfg.training.dtype.as_str() {
            "f32" => 4,
            _ => 2,
        },
    };
    let objective = cfg.training.objective;
    let rows_per_batch = cfg.training.micro_batch_size.max(1)
        * if objective == crate::train::objective::Kind::Sft {
            1
        } else {
            2
        };
    let tensors = load_order(&ck, &model, cfg.training.four_bit)
        .with_context(|| format!("{}: reading the tensor headers", model_dir.display()))?;
    Ok(Inputs {
        step: Step {
            // A preference micro-batch of B pairs is 2B rows.
            batch: rows
                .count
                .map_or(rows_per_batch, |n| n.clamp(1, rows_per_batch)),
            seq: rows.longest.map_or(cfg.training.max_seq_len, |l| {
                l.min(cfg.training.max_seq_len)
            }),
            elem,
            cpu_threads: match target {
                Target::Cpu { threads } => Some(threads),
                Target::Cuda => None,
            },
            nf4: cfg.training.four_bit,
            adapted: targets.into_iter().map(|t| (t, cfg.lora.r)).collect(),
            dropout: cfg.lora.dropout > 0.0,
            dora: cfg.lora.use_dora,
        },
        cfg: model,
        target,
        checkpointing: cfg
            .training
            .gradient_checkpointing
            .fixed()
            .unwrap_or_else(|| true.into()),
        auto_checkpointing: cfg.training.gradient_checkpointing.fixed().is_none(),
        grad_accum: cfg.training.grad_accum,
        optimizer: cfg.training.optimizer.parse()?,
        tensors,
        double_quant: cfg.quant.double_quant,
        blocksize: cfg.quant.blocksize,
        baseline,
        tokenizer,
        copies: super::Copies::of(&cfg.lora),
        rows: rows.bytes,
        eval: !cfg.data.eval.is_empty(),
        objective,
        reference_values: objective.has_reference() && !cfg.training.precompute_ref,
    })
}
