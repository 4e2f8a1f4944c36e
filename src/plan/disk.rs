//! The disk a training run writes, predicted before it starts, and whether the output's
//! filesystem has it (`qlora plan` prints it; `qlora train` refuses a run that does not fit unless
//! `--force`).
//!
//! What [`crate::train::trainer`] writes into `training.output`, file by file:
//! - a checkpoint every `save_every` steps (and one when a signal stops the run): the adapter's
//!   safetensors (A `[r, in]` and B `[out, r]` per adapted linear, f32), the optimizer's
//!   (AdamW's two f32 moments per parameter, 8-bit AdamW's codes and absmax:
//!   [`checkpoint_layout`]) and `state.json`. The safetensors sizes are exact
//!   (their headers built as the writer builds them, [`crate::fsx::st`]); the JSON files are
//!   bounded. At most `keep_last` stay, and a new one is written before the oldest is removed, so
//!   the peak holds `min(keep_last, saves) + 1`.
//! - the final adapter (the same safetensors as a checkpoint's), `metrics.jsonl` (one line per
//!   step and evaluation, each at most [`METRIC_LINE_BYTES`]), `loss.svg` (bounded by
//!   [`PLOT_BYTES`] + [`PLOT_POINT_BYTES`] per point) and `config.resolved.toml`.
//!
//! Exports are not part of a run and not planned here; their writes go through the same door
//! ([`crate::fsx::disk`]), so a full disk stops them with the file and the bytes it needed.

use crate::config::TrainConfig;
use crate::fsx::disk::{bytes_text, free_bytes, tree_bytes};
use crate::lora::attach::module_path;
use crate::model::Phi3Config;
use crate::train::optim::{OptimizerKind, checkpoint_layout};
use anyhow::Result;
use safetensors::Dtype;
use std::path::Path;

/// A bound on one line of metrics.jsonl: 230 to 260 bytes measured; every field at its longest
/// (f64s of 17 significant digits and an exponent, counters of 20 digits) about 420.
pub const METRIC_LINE_BYTES: u64 = 512;
/// A bound on loss.svg's fixed part (axes, tick labels, caption): 17 to 23 KB measured on the
/// demo runs of 1, 8 and 40 steps (the tick labels, not the points, make the difference).
pub const PLOT_BYTES: u64 = 32 << 10;
/// A bound on each plotted point's share of loss.svg: a polyline vertex is about 12 bytes, an
/// eval marker (a `<circle …/>` element) about 90.
pub const PLOT_POINT_BYTES: u64 = 128;
/// A bound on adapter_config.json beside the base model's name, and on state.json.
pub const JSON_BYTES: u64 = 2 << 10;

/// The disk a run writes, by artifact.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DiskPlan {
    /// One checkpoint (adapter, optimizer, state).
    pub checkpoint_bytes: u64,
    /// Checkpoints on disk at the peak: `min(keep_last, saves) + 1`.
    pub checkpoints_at_peak: u64,
    pub adapter_bytes: u64,
    pub metrics_bytes: u64,
    pub plot_bytes: u64,
    pub config_bytes: u64,
    /// Everything at the peak.
    pub peak_bytes: u64,
}

/// What `cfg` writes over `total_steps` steps on `model`.
pub fn plan(cfg: &TrainConfig, model: &Phi3Config, total_steps: u64) -> Result<DiskPlan> {
    let r = cfg.lora.r;
    let optimizer: OptimizerKind = cfg.training.optimizer.parse()?;
    let mut adapter = Vec::new();
    let mut moments = Vec::new();
    for layer in 0..model.num_hidden_layers {
        for target in cfg.lora.target_names(model.layout())? {
            let [out, inp] = model.linear_shape(target).unwrap_or([0, 0]);
            let module = format!(
                "{}{}",
                crate::lora::peft::KEY_PREFIX,
                module_path(layer, target)
            );
            for (ab, shape) in [("A", vec![r, inp]), ("B", vec![out, r])] {
                moments.extend(checkpoint_layout(optimizer, adapter.len(), &shape));
                adapter.push((format!("{module}.lora_{ab}.weight"), Dtype::F32, shape));
            }
            if cfg.lora.use_dora {
                let shape = vec![out];
                moments.extend(checkpoint_layout(optimizer, adapter.len(), &shape));
                adapter.push((format!("{module}.lora_magnitude_vector"), Dtype::F32, shape));
            }
        }
    }
    // The modules_to_save copies and the trained token rows, after every adapter (the trainable
    // variables' order: embedding copy, token rows, head copy).
    let token_rows = cfg.lora.trainable_token_indices.embedding_rows()?.len();
    if cfg.lora.head_targeted() {
        for (key, shape) in [
            (crate::lora::peft::HEAD_A_KEY, vec![r, model.hidden_size]),
            (crate::lora::peft::HEAD_B_KEY, vec![model.vocab_size, r]),
        ] {
            moments.extend(checkpoint_layout(optimizer, adapter.len(), &shape));
            adapter.push((key.to_string(), Dtype::F32, shape));
        }
    }
    if cfg.lora.embedding_targeted() {
        for (key, shape) in [
            (crate::lora::peft::EMBED_A_KEY, vec![r, model.vocab_size]),
            (crate::lora::peft::EMBED_B_KEY, vec![model.hidden_size, r]),
        ] {
            moments.extend(checkpoint_layout(optimizer, adapter.len(), &shape));
            adapter.push((key.to_string(), Dtype::F32, shape));
        }
    }
    for m in crate::lora::SAVABLE_MODULES {
        if m == "lm_head" && token_rows > 0 {
            let shape = vec![token_rows, model.hidden_size];
            moments.extend(checkpoint_layout(optimizer, adapter.len(), &shape));
            adapter.push((crate::lora::peft::TOKENS_KEY.to_string(), Dtype::F32, shape));
        }
        if cfg.lora.modules_to_save.iter().any(|x| x == m) {
            let shape = vec![model.vocab_size, model.hidden_size];
            moments.extend(checkpoint_layout(optimizer, adapter.len(), &shape));
            let path = crate::lora::peft::module_to_save_path(m);
            adapter.push((
                format!("{}{path}.weight", crate::lora::peft::KEY_PREFIX),
                Dtype::F32,
                shape,
            ));
        }
    }
    let adapter_bytes = crate::fsx::st::file_bytes(&adapter)? + JSON_BYTES;
    let checkpoint_bytes = adapter_bytes + crate::fsx::st::file_bytes(&moments)? + JSON_BYTES;
    let t = &cfg.training;
    let saves = total_steps.checked_div(t.save_every).unwrap_or(0);
    let checkpoints_at_peak = saves.min(t.keep_last.max(1) as u64) + 1;
    let evals = if cfg.data.eval.is_empty() {
        0
    } else {
        total_steps.checked_div(t.eval_every).unwrap_or(0) + 1
    };
    let metrics_bytes = (total_steps + evals) * METRIC_LINE_BYTES;
    let plot_bytes = PLOT_BYTES + (total_steps + evals) * PLOT_POINT_BYTES;
    let config_bytes = cfg.to_toml().len() as u64;
    Ok(DiskPlan {
        checkpoint_bytes,
        checkpoints_at_peak,
        adapter_bytes,
        metrics_bytes,
        plot_bytes,
        config_bytes,
        peak_bytes: checkpoints_at_peak * checkpoint_bytes
            + metrics_bytes
            + plot_bytes
            + config_bytes,
    })
}

/// The plan against the filesystem of `output`: what it still needs beyond what the output
/// already holds (a resumed run's checkpoints and metrics count as written), and what is free.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DiskVerdict {
    pub needed_bytes: u64,
    /// `None` when the free space cannot be told.
    pub free_bytes: Option<u64>,
    pub fits: bool,
}

impl DiskPlan {
    pub fn verdict(&self, output: &Path) -> DiskVerdict {
        let needed_bytes = self.peak_bytes.saturating_sub(tree_bytes(output));
        let free = free_bytes(output);
        DiskVerdict {
            needed_bytes,
            free_bytes: free,
            fits: free.is_none_or(|f| needed_bytes <= f),
        }
    }

    /// Lines for people: the terms, then the verdict against `output`'s filesystem.
    pub fn explain(&self, output: &Path, v: &DiskVerdict) -> String {
        let mut s = format!(
            "disk: {} at the peak in {}: {} checkpoints of {} (keep_last + 1 while the next is written), metrics {}, plot {}, config {}\n",
            bytes_text(self.peak_bytes),
            output.display(),
            self.checkpoints_at_peak,
            bytes_text(self.checkpoint_bytes),
            bytes_text(self.metrics_bytes),
            bytes_text(self.plot_bytes),
            bytes_text(self.config_bytes),
        );
        match v.free_bytes {
            Some(free) if v.fits => {
                s += &format!(
                    "fits on disk: {} more needed, {} free\n",
                    bytes_text(v.needed_bytes),
                    bytes_text(free)
                )
            }
            Some(free) => {
                s += &format!(
                    "does NOT fit on disk: {} more needed, {} free on the filesystem of {}; free space there, choose another --output, or keep fewer checkpoints (training.keep_last)\n",
                    bytes_text(v.needed_bytes),
                    bytes_text(free),
                    output.display()
                )
            }
            None => s += "free disk space unknown\n",
        }
        s
    }
}

/// Refuses (with the plan and advice) a run whose disk plan does not fit the filesystem of
/// `output`.
pub fn check(cfg: &TrainConfig, model: &Phi3Config, total_steps: u64, output: &Path) -> Result<()> {
    let p = plan(cfg, model, total_steps)?;
    let v = p.verdict(output);
    if !v.fits {
        anyhow::bail!(
            "{}: this run does not fit on disk; --force trains anyway\n{}",
            output.display(),
            p.explain(output, &v).trim_end()
        );
    }
    Ok(())
}

/// Optimizer steps of a run of `n_rows` rows on `world` ranks (as the trainer counts them).
pub fn total_steps(cfg: &TrainConfig, n_rows: usize, world: usize) -> u64 {
    let t = &cfg.training;
    if t.max_steps > 0 {
        return t.max_steps;
    }
    let micro_per_epoch = n_rows.div_ceil((world * t.micro_batch_size).max(1)) as u64;
    (t.epochs * micro_per_epoch).div_ceil(t.grad_accum.max(1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Phi-3-mini (32 layers, hidden 3072, MLP 8192) with r = 16 on every linear: 786,432
    /// adapter values a layer (qkv 16·3072 + 9216·16, o 2·16·3072, gate_up 16·3072 + 16384·16,
    /// down 16·8192 + 3072·16), 25.2 M in all: 100.7 MB of f32 adapter, twice that of moments.
    #[test]
    fn phi3_minis_checkpoint_is_its_adapter_and_two_moments() {
        let model = Phi3Config::from_value(
            &serde_json::json!({
                "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 32064,
                "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "max_position_embeddings": 4096,
                "tie_word_embeddings": false
            }),
            "phi3-mini",
        )
        .unwrap();
        let mut cfg = TrainConfig::default();
        cfg.lora.r = 16;
        cfg.lora.targets = vec!["all-linear".into()];
        cfg.training.save_every = 100;
        cfg.training.keep_last = 2;
        cfg.data.eval = String::new();
        let p = plan(&cfg, &model, 1000).unwrap();
        let values = 786_432 * 32 * 4;
        let (adapter, ck) = (p.adapter_bytes, p.checkpoint_bytes);
        // The safetensors headers (256 tensors' names and offsets) are tens of KB.
        assert!((values..values + 64_000).contains(&adapter), "{adapter}");
        assert!((3 * values..3 * values + 128_000).contains(&ck), "{ck}");
        assert_eq!(
            p.checkpoints_at_peak, 3,
            "keep_last 2, and the next one written"
        );
        assert_eq!(p.metrics_bytes, 1000 * METRIC_LINE_BYTES);
        assert_eq!(
            p.peak_bytes,
            3 * ck + p.metrics_bytes + p.plot_bytes + p.config_bytes
        );
        // 8-bit AdamW: 2 bytes and 2/256 absmax a value instead of 8 bytes.
        cfg.training.optimizer = "adamw_8bit".into();
        let ck8 = plan(&cfg, &model, 1000).unwrap().checkpoint_bytes;
        let state8 = values / 4 * 2 + values / 4 / 256 * 8;
        let (lo, hi) = (values + state8, values + state8 + 128_000);
        assert!((lo..hi).contains(&ck8), "{ck8}");
        cfg.training.optimizer = "adamw".into();
        // No periodic checkpoint: room for the one a signal writes.
        cfg.training.save_every = 0;
        assert_eq!(plan(&cfg, &model, 1000).unwrap().checkpoints_at_peak, 1);
    }
}
