//! The adapter on disk, in Hugging Face PEFT's format: `adapter_config.json` and
//! `adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` (`[r, in]`) and
//! `.lora_B.weight` (`[out, r]`), f32, never `.default.` (PEFT strips the adapter name on save and
//! re-inserts it on load). Loading is "strict = false" towards the base: the file holds adapters
//! only; but every adapter key must land on a module of the model, or loading fails.

use super::{LoraConfig, all_target_names};
use crate::fsx::write_atomic;
use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's prefix for a causal LM's modules.
pub const KEY_PREFIX: &str = "base_model.model.";

/// The `(A, B)` pair of each adapted module, by Hugging Face module path.
pub type AdapterWeights = BTreeMap<String, (Tensor, Tensor)>;

/// A PEFT adapter read from disk.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub config: LoraConfig,
    pub base_model_name_or_path: Option<String>,
    pub weights: AdapterWeights,
}

/// Writes `adapter_config.json` + `adapter_model.safetensors` into `dir` (created if needed), each
/// file atomically.
pub fn save(
    dir: &Path,
    cfg: &LoraConfig,
    base_model: &str,
    weights: &[(String, Tensor, Tensor)],
) -> Result<()> {
    crate::fsx::disk::create_dir_all(dir)?;
    let mut tensors = Vec::new();
    for (module, a, b) in weights {
        tensors.push((
            format!("{KEY_PREFIX}{module}.lora_A.weight"),
            a.to_dtype(candle_core::DType::F32)?,
        ));
        tensors.push((
            format!("{KEY_PREFIX}{module}.lora_B.weight"),
            b.to_dtype(candle_core::DType::F32)?,
        ));
    }
    // The targets the file really holds (a split checkpoint's names on one), in model order.
    let held: Vec<&str> = weights
        .iter()
        .filter_map(|(m, _, _)| crate::model::names::block_linear(&format!("{m}.weight")))
        .map(|(_, t)| t)
        .collect();
    cfg.check_targets()?;
    let targets: Vec<&str> = all_target_names()
        .into_iter()
        .filter(|t| held.contains(t))
        .collect();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "use_rslora": cfg.rslora,
        "use_dora": false,
        "bias": "none",
        "fan_in_fan_out": false,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": true,
        "init_lora_weights": true,
        "revision": null,
    });
    crate::fsx::st::save(&dir.join(WEIGHTS_FILE), tensors, None)?;
    write_atomic(&dir.join(CONFIG_FILE), &serde_json::to_vec_pretty(&config)?)
}

/// Reads a PEFT LoRA adapter directory.
pub fn load(dir: &Path, device: &Device) -> Result<PeftAdapter> {
    let cfg_path = dir.join(CONFIG_FILE);
    let origin = cfg_path.display().to_string();
    let bytes = std::fs::read(&cfg_path).with_context(|| {
        format!(
            "{origin}: cannot read; is {} a PEFT adapter dir?",
            dir.display()
        )
    })?;
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("{origin}: invalid JSON"))?;
    ensure!(v.is_object(), "{origin}: not a JSON object");
    let str_of = |k: &str| v.get(k).and_then(|x| x.as_str());
    ensure!(
        str_of("peft_type").is_none_or(|t| t == "LORA"),
        "{origin}: peft_type {:?} is not LORA",
        str_of("peft_type")
    );
    if v.get("use_dora").and_then(|x| x.as_bool()) == Some(true) {
        bail!("{origin}: DoRA adapters (use_dora) are not supported");
    }
    if v.get("fan_in_fan_out").and_then(|x| x.as_bool()) == Some(true) {
        bail!("{origin}: fan_in_fan_out adapters are not supported (Phi-3 linears are not Conv1D)");
    }
    if str_of("bias").is_some_and(|b| b != "none") {
        bail!(
            "{origin}: bias `{}` is not supported; only bias \"none\"",
            str_of("bias").unwrap_or_default()
        );
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if v.get(k)
            .and_then(|x| x.as_object())
            .is_some_and(|m| !m.is_empty())
        {
            bail!("{origin}: per-module `{k}` is not supported");
        }
    }
    if v.get("modules_to_save").is_some_and(|m| !m.is_null()) {
        bail!("{origin}: modules_to_save is not supported (only LoRA matrices are loaded)");
    }
    let r = v
        .get("r")
        .and_then(|x| x.as_u64())
        .with_context(|| format!("{origin}: no integer `r`"))? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(|x| x.as_f64())
        .with_context(|| format!("{origin}: no `lora_alpha`"))?;
    let targets: Option<Vec<String>> = match v.get("target_modules") {
        Some(serde_json::Value::Array(a)) => {
            a.iter().map(|t| t.as_str().map(str::to_string)).collect()
        }
        Some(serde_json::Value::String(s)) if s == "all-linear" => Some(vec!["all-linear".into()]),
        _ => None,
    };
    let targets = targets.with_context(|| {
        format!(
            "{origin}: target_modules {} is not a list of module names",
            v.get("target_modules").unwrap_or(&serde_json::Value::Null)
        )
    })?;
    let dropout = v
        .get("lora_dropout")
        .and_then(|x| x.as_f64())
        .unwrap_or(0.0);
    ensure!(
        (0.0..1.0).contains(&dropout),
        "{origin}: lora_dropout {dropout} is not in [0, 1)"
    );
    let config = LoraConfig {
        r,
        alpha,
        dropout: dropout as f32,
        targets,
        rslora: v
            .get("use_rslora")
            .and_then(|x| x.as_bool())
            .unwrap_or(false),
    };
    config
        .check_targets()
        .with_context(|| format!("{origin}: target_modules"))?;

    let weights_path = dir.join(WEIGHTS_FILE);
    let wfile = weights_path.display();
    let tensors = crate::checkpoint::load_safetensors(&weights_path, device)?;
    let mut pairs: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    for (key, t) in tensors {
        let rest = key
            .strip_prefix(KEY_PREFIX)
            .with_context(|| format!("{wfile}: key `{key}` does not start with `{KEY_PREFIX}`"))?;
        if rest.contains(".default.") {
            bail!(
                "{wfile}: key `{key}` contains the adapter name `.default.`; PEFT never saves it (this file would load as zeros in PEFT)"
            );
        }
        let (module, which) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            (m, 0)
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            (m, 1)
        } else {
            bail!(
                "{wfile}: key `{key}` is not a LoRA A/B weight (only LoRA matrices are supported)"
            );
        };
        ensure!(
            matches!(
                t.dtype(),
                DType::F32 | DType::BF16 | DType::F16 | DType::F64
            ) && t.rank() == 2,
            "{wfile}: `{key}` is {:?} {:?}; a LoRA matrix is a 2-d float tensor",
            t.dtype(),
            t.dims()
        );
        let t = t.to_dtype(candle_core::DType::F32)?;
        let slot = pairs.entry(module.to_string()).or_default();
        if which == 0 {
            slot.0 = Some(t)
        } else {
            slot.1 = Some(t)
        }
    }
    let mut weights = BTreeMap::new();
    for (module, (a, b)) in pairs {
        let (Some(a), Some(b)) = (a, b) else {
            bail!("{wfile}: module `{module}` lacks its lora_A or lora_B")
        };
        // Both are 2-d (checked above).
        let (a_rank, b_rank) = (a.dims()[0], b.dims()[1]);
        ensure!(
            a_rank == r && b_rank == r,
            "{wfile}: `{module}` has rank {a_rank}×{b_rank} but {origin} says r = {r}"
        );
        ensure!(
            all_target_names().iter().any(|t| module.ends_with(t)),
            "{wfile}: `{module}` is not a Phi-3 linear"
        );
        weights.insert(module, (a, b));
    }
    Ok(PeftAdapter {
        config,
        base_model_name_or_path: str_of("base_model_name_or_path").map(str::to_string),
        weights,
    })
}
