//! The adapter on disk, in Hugging Face PEFT's format: `adapter_config.json` and
//! `adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` (`[r, in]`) and
//! `.lora_B.weight` (`[out, r]`), with DoRA (`"use_dora": true`) also
//! `.lora_magnitude_vector` (`[out]`, no `.weight` suffix: PEFT's `lora/model.py` maps it onto its
//! `lora_magnitude_vector.default.weight` parameter on load), f32, never `.default.` (PEFT strips
//! the adapter name on save and re-inserts it on load). Loading is "strict = false" towards the base: the file holds adapters
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

/// One adapted module's tensors.
#[derive(Debug, Clone)]
pub struct ModuleWeights {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    /// DoRA's `[out]` magnitude.
    pub magnitude: Option<Tensor>,
}

impl ModuleWeights {
    /// A plain LoRA pair.
    pub fn lora(a: Tensor, b: Tensor) -> Self {
        Self {
            a,
            b,
            magnitude: None,
        }
    }
}

/// The tensors of each adapted module, by Hugging Face module path.
pub type AdapterWeights = BTreeMap<String, ModuleWeights>;

/// A PEFT adapter read from disk.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub config: LoraConfig,
    pub base_model_name_or_path: Option<String>,
    pub weights: AdapterWeights,
    /// `modules_to_save` copies by module path (`model.embed_tokens`, `lm_head`), `[V, H]` f32.
    pub modules: BTreeMap<String, Tensor>,
    /// `trainable_token_indices` on the embedding: the ids and their rows `[n, H]` f32.
    pub tokens: Option<(Vec<u32>, Tensor)>,
    /// LoRA on the embedding: `(A [r, V], B [H, r])` f32.
    pub embed_lora: Option<(Tensor, Tensor)>,
    /// LoRA on the head: `(A [r, H], B [V, r])` f32.
    pub head_lora: Option<(Tensor, Tensor)>,
    /// The directory it was read from (its tokenizer.json, when `data.add_tokens` extended the
    /// vocabulary, is the one exports carry).
    pub dir: Option<std::path::PathBuf>,
}

impl PeftAdapter {
    /// The directory of the adapter's own tokenizer (tokenizer.json beside the adapter), if any.
    pub fn tokenizer_dir(&self) -> Option<&Path> {
        self.dir
            .as_deref()
            .filter(|d| d.join("tokenizer.json").is_file())
    }
}

/// The keys of the embedding's LoRA (PEFT's `lora.Embedding` keeps its matrices in
/// ParameterDicts: no `.weight` suffix).
pub const EMBED_A_KEY: &str = "base_model.model.model.embed_tokens.lora_embedding_A";
pub const EMBED_B_KEY: &str = "base_model.model.model.embed_tokens.lora_embedding_B";
/// What PEFT's `save_embedding_layers = "auto"` adds beside an embedding LoRA: the base's own
/// embedding. qlora does not write it and ignores it on load (the base provides it).
pub const EMBED_BASE_KEY: &str = "base_model.model.model.embed_tokens.base_layer.weight";
/// The LoRAs outside the blocks, as their files name them: target, A's key, B's key.
const MODULE_LORAS: [(&str, &str, &str); 2] = [
    (super::EMBED_TARGET, EMBED_A_KEY, EMBED_B_KEY),
    (super::HEAD_TARGET, HEAD_A_KEY, HEAD_B_KEY),
];

/// The keys of the head's LoRA, and the head's own weight PEFT saves beside it (ignored).
pub const HEAD_A_KEY: &str = "base_model.model.lm_head.lora_A.weight";
pub const HEAD_B_KEY: &str = "base_model.model.lm_head.lora_B.weight";
pub const HEAD_BASE_KEY: &str = "base_model.model.lm_head.base_layer.weight";

/// Everything an adapter holds beside the block linears' LoRA, for [`save_every`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Extras<'a> {
    /// `modules_to_save` copies, `(module path, [V, H])`.
    pub modules: &'a [(String, Tensor)],
    /// Trained token rows, `(ids, [n, H])`.
    pub tokens: Option<(&'a [u32], &'a Tensor)>,
    /// The embedding's LoRA `(A [r, V], B [H, r])`.
    pub embed_lora: Option<(&'a Tensor, &'a Tensor)>,
    /// The head's LoRA `(A [r, H], B [V, r])`.
    pub head_lora: Option<(&'a Tensor, &'a Tensor)>,
}

/// The key of the trained embedding rows (PEFT's TrainableTokensLayer on `embed_tokens`).
pub const TOKENS_KEY: &str =
    "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta";

/// The module path of a `modules_to_save` name (`embed_tokens` → `model.embed_tokens`).
pub fn module_to_save_path(name: &str) -> &'static str {
    match name {
        "embed_tokens" => "model.embed_tokens",
        _ => "lm_head",
    }
}

/// Writes `adapter_config.json` + `adapter_model.safetensors` into `dir` (created if needed), each
/// file atomically.
pub fn save(
    dir: &Path,
    cfg: &LoraConfig,
    base_model: &str,
    weights: &[(String, ModuleWeights)],
) -> Result<()> {
    save_with_modules(dir, cfg, base_model, weights, &[])
}

/// [`save`] with `modules_to_save` copies (`(module path, [V, H])`, saved as PEFT saves them:
/// `base_model.model.<module path>.weight`).
pub fn save_with_modules(
    dir: &Path,
    cfg: &LoraConfig,
    base_model: &str,
    weights: &[(String, ModuleWeights)],
    modules: &[(String, Tensor)],
) -> Result<()> {
    save_all(dir, cfg, base_model, weights, modules, None)
}

/// [`save_with_modules`] with the trained embedding rows of `lora.trainable_token_indices`
/// (`(ids, [n, H])`, saved as PEFT's `…embed_tokens.token_adapter.trainable_tokens_delta`).
pub fn save_all(
    dir: &Path,
    cfg: &LoraConfig,
    base_model: &str,
    weights: &[(String, ModuleWeights)],
    modules: &[(String, Tensor)],
    tokens: Option<(&[u32], &Tensor)>,
) -> Result<()> {
    save_every(
        dir,
        cfg,
        base_model,
        weights,
        &Extras {
            modules,
            tokens,
            ..Extras::default()
        },
    )
}

/// [`save_all`] with every extra an adapter can hold ([`Extras`]).
pub fn save_every(
    dir: &Path,
    cfg: &LoraConfig,
    base_model: &str,
    weights: &[(String, ModuleWeights)],
    extras: &Extras<'_>,
) -> Result<()> {
    let Extras {
        modules,
        tokens,
        embed_lora,
        head_lora,
    } = *extras;
    crate::fsx::disk::create_dir_all(dir)?;
    let dora = weights.iter().any(|(_, w)| w.magnitude.is_some());
    ensure!(
        dora == cfg.use_dora && weights.iter().all(|(_, w)| w.magnitude.is_some() == dora),
        "an adapter is either DoRA on every module or on none (lora.use_dora = {})",
        cfg.use_dora
    );
    let mut tensors = Vec::new();
    for (module, w) in weights {
        tensors.push((
            format!("{KEY_PREFIX}{module}.lora_A.weight"),
            w.a.to_dtype(DType::F32)?,
        ));
        tensors.push((
            format!("{KEY_PREFIX}{module}.lora_B.weight"),
            w.b.to_dtype(DType::F32)?,
        ));
        if let Some(m) = &w.magnitude {
            tensors.push((
                format!("{KEY_PREFIX}{module}.lora_magnitude_vector"),
                m.to_dtype(DType::F32)?,
            ));
        }
    }
    for (module, t) in modules {
        tensors.push((
            format!("{KEY_PREFIX}{module}.weight"),
            t.to_dtype(DType::F32)?,
        ));
    }
    if let Some((_, rows)) = tokens {
        tensors.push((TOKENS_KEY.to_string(), rows.to_dtype(DType::F32)?));
    }
    if let Some((a, b)) = embed_lora {
        tensors.push((EMBED_A_KEY.to_string(), a.to_dtype(DType::F32)?));
        tensors.push((EMBED_B_KEY.to_string(), b.to_dtype(DType::F32)?));
    }
    if let Some((a, b)) = head_lora {
        tensors.push((HEAD_A_KEY.to_string(), a.to_dtype(DType::F32)?));
        tensors.push((HEAD_B_KEY.to_string(), b.to_dtype(DType::F32)?));
    }
    let saved_modules: Vec<&str> = super::SAVABLE_MODULES
        .into_iter()
        .filter(|m| modules.iter().any(|(p, _)| p == module_to_save_path(m)))
        .collect();
    // The targets the file really holds (a split checkpoint's names on one), in model order.
    let held: Vec<&str> = weights
        .iter()
        .filter_map(|(m, _)| crate::model::names::block_linear(&format!("{m}.weight")))
        .map(|(_, t)| t)
        .collect();
    cfg.check_targets()?;
    let mut targets: Vec<&str> = all_target_names()
        .into_iter()
        .filter(|t| held.contains(t))
        .collect();
    if embed_lora.is_some() {
        targets.insert(0, super::EMBED_TARGET);
    }
    if head_lora.is_some() {
        targets.insert(0, super::HEAD_TARGET);
    }
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "use_rslora": cfg.rslora,
        "use_dora": cfg.use_dora,
        "bias": "none",
        "fan_in_fan_out": false,
        "modules_to_save": if saved_modules.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::json!(saved_modules)
        },
        "trainable_token_indices": match tokens {
            Some((ids, _)) => serde_json::json!(ids),
            None => serde_json::Value::Null,
        },
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
    let modules_to_save: Vec<String> = match v.get("modules_to_save") {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|m| m.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .with_context(|| format!("{origin}: modules_to_save is not a list of names"))?,
        Some(other) => bail!("{origin}: modules_to_save {other} is not a list of names"),
    };
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
        use_dora: v.get("use_dora").and_then(|x| x.as_bool()).unwrap_or(false),
        modules_to_save,
        trainable_token_indices: match v.get("trainable_token_indices") {
            None | Some(serde_json::Value::Null) => super::TokenIndices::default(),
            Some(x) => serde_json::from_value(x.clone()).with_context(|| {
                format!(
                    "{origin}: trainable_token_indices {x} is not a list of token ids or a map of \
                     such lists"
                )
            })?,
        },
    };
    config
        .check_targets()
        .with_context(|| format!("{origin}: target_modules"))?;

    let weights_path = dir.join(WEIGHTS_FILE);
    let wfile = weights_path.display();
    let tensors = crate::checkpoint::load_safetensors(&weights_path, device)?;
    let mut parts: BTreeMap<String, [Option<Tensor>; 3]> = BTreeMap::new();
    let mut modules = BTreeMap::new();
    let token_rows = config
        .trainable_token_indices
        .embedding_rows()
        .with_context(|| origin.clone())?;
    let mut tokens = None;
    let mut module_parts: [[Option<Tensor>; 2]; 2] = Default::default();
    for (key, t) in tensors {
        let rest = key
            .strip_prefix(KEY_PREFIX)
            .with_context(|| format!("{wfile}: key `{key}` does not start with `{KEY_PREFIX}`"))?;
        if rest.contains(".default.") {
            bail!(
                "{wfile}: key `{key}` contains the adapter name `.default.`; PEFT never saves it (this file would load as zeros in PEFT)"
            );
        }
        if key == EMBED_BASE_KEY || key == HEAD_BASE_KEY {
            continue;
        }
        if let Some((m, which)) = MODULE_LORAS
            .iter()
            .enumerate()
            .find_map(|(m, (_, a, b))| [*a, *b].iter().position(|k| key == *k).map(|w| (m, w)))
        {
            let target = MODULE_LORAS[m].0;
            ensure!(
                config.targets.iter().any(|t| t == target),
                "{wfile}: `{key}` is a LoRA on {target} but {origin}'s target_modules lacks {target}"
            );
            ensure!(t.rank() == 2, "{wfile}: `{key}` is {:?}, not 2-d", t.dims());
            module_parts[m][which] = Some(t.to_dtype(DType::F32)?);
            continue;
        }
        if key == TOKENS_KEY {
            ensure!(
                !token_rows.is_empty(),
                "{wfile}: `{key}` holds trained token rows but {origin} lists no trainable_token_indices"
            );
            ensure!(
                t.dims().len() == 2 && t.dims()[0] == token_rows.len(),
                "{wfile}: `{key}` is {:?}, but {origin} lists {} trainable_token_indices",
                t.dims(),
                token_rows.len()
            );
            tokens = Some((token_rows.clone(), t.to_dtype(DType::F32)?));
            continue;
        }
        if let Some(name) = config
            .modules_to_save
            .iter()
            .find(|m| rest == format!("{}.weight", module_to_save_path(m)))
        {
            ensure!(
                t.rank() == 2,
                "{wfile}: `{key}` ({name}'s full copy) is {:?}, not a 2-d [vocab, hidden] tensor",
                t.dims()
            );
            modules.insert(
                module_to_save_path(name).to_string(),
                t.to_dtype(DType::F32)?,
            );
            continue;
        }
        let (module, which) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            (m, 0)
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            (m, 1)
        } else if let Some(m) = rest
            .strip_suffix(".lora_magnitude_vector")
            .or_else(|| rest.strip_suffix(".lora_magnitude_vector.weight"))
        {
            ensure!(
                config.use_dora,
                "{wfile}: `{key}` is a DoRA magnitude but {origin} does not say \"use_dora\": true"
            );
            (m, 2)
        } else {
            bail!(
                "{wfile}: key `{key}` is not a LoRA A/B weight or a DoRA magnitude (only LoRA \
                 matrices and DoRA magnitudes are supported)"
            );
        };
        let rank = if which == 2 { 1 } else { 2 };
        ensure!(
            matches!(
                t.dtype(),
                DType::F32 | DType::BF16 | DType::F16 | DType::F64
            ) && t.rank() == rank,
            "{wfile}: `{key}` is {:?} {:?}; a {} is a {rank}-d float tensor",
            t.dtype(),
            t.dims(),
            if which == 2 {
                "DoRA magnitude"
            } else {
                "LoRA matrix"
            }
        );
        let t = t.to_dtype(candle_core::DType::F32)?;
        parts.entry(module.to_string()).or_default()[which] = Some(t);
    }
    let mut weights = BTreeMap::new();
    for (module, [a, b, magnitude]) in parts {
        let (Some(a), Some(b)) = (a, b) else {
            bail!("{wfile}: module `{module}` lacks its lora_A or lora_B")
        };
        ensure!(
            magnitude.is_some() == config.use_dora,
            "{wfile}: `{module}` has no lora_magnitude_vector, but {origin} says \"use_dora\": \
             true (every DoRA module has one)"
        );
        if let Some(m) = &magnitude {
            ensure!(
                m.dims() == [b.dims()[0]],
                "{wfile}: `{module}`'s lora_magnitude_vector is {:?}, but its lora_B has {} rows",
                m.dims(),
                b.dims()[0]
            );
        }
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
        weights.insert(module, ModuleWeights { a, b, magnitude });
    }
    let mut module_loras = Vec::new();
    for ((target, a_key, _), [a, b]) in MODULE_LORAS.iter().zip(module_parts) {
        module_loras.push(match (a, b) {
            (Some(a), Some(b)) => {
                ensure!(
                    a.dims()[0] == r && b.dims()[1] == r,
                    "{wfile}: the LoRA on {target} is A {:?}, B {:?}, but {origin} says r = {r}",
                    a.dims(),
                    b.dims()
                );
                Some((a, b))
            }
            (None, None) => {
                ensure!(
                    !config.targets.iter().any(|t| t == target),
                    "{wfile}: {origin} targets {target} but the file has no `{a_key}`"
                );
                None
            }
            _ => bail!("{wfile}: the LoRA on {target} lacks one of its two matrices"),
        });
    }
    let [embed_lora, head_lora]: [Option<(Tensor, Tensor)>; 2] =
        module_loras.try_into().expect("one per module LoRA");
    ensure!(
        token_rows.is_empty() || tokens.is_some(),
        "{wfile}: {origin} lists trainable_token_indices but the file has no `{TOKENS_KEY}`"
    );
    for m in &config.modules_to_save {
        ensure!(
            modules.contains_key(module_to_save_path(m)),
            "{wfile}: {origin} lists `{m}` in modules_to_save but the file has no `{KEY_PREFIX}{}.weight`",
            module_to_save_path(m)
        );
    }
    Ok(PeftAdapter {
        config,
        base_model_name_or_path: str_of("base_model_name_or_path").map(str::to_string),
        weights,
        modules,
        tokens,
        embed_lora,
        head_lora,
        dir: Some(dir.to_path_buf()),
    })
}
