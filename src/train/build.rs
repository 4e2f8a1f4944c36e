//! What a run trains on, made before the model exists (the memory plan needs it): the tokenizer's
//! added tokens, the objective with its data, and then the objective's reference.

use super::objective::pref::{Preference, Reference};
use super::objective::sft::Sft;
use super::objective::{Kind, Objective, Params};
use crate::config::TrainConfig;
use crate::data::TokenizerBundle;
use crate::data::batch::{Row, RowStats, build_rows};
use crate::data::encode::{EncodedData, ReadOptions, encode_data};
use crate::data::source::Spec;
use crate::dist;
use crate::fsx::write_atomic;
use crate::model::Phi3;
use anyhow::{Context, Result, bail};
use candle_core::DType;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `data.add_tokens` into `tok` (ids in the model's unused embedding rows, which then train as
/// trainable token rows unless an embedding copy trains them), announced on `loud`; the extended
/// tokenizer's files, or `None` when nothing is added.
pub(super) fn add_tokens(
    cfg: &mut TrainConfig,
    tok: &mut TokenizerBundle,
    model_dir: &Path,
    loud: bool,
) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
    if cfg.data.add_tokens.is_empty() {
        return Ok(None);
    }
    let cfg_path = model_dir.join(crate::checkpoint::CONFIG_FILE);
    let value: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&cfg_path)
            .with_context(|| format!("{}: cannot read", cfg_path.display()))?,
    )
    .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
    let model = crate::model::Phi3Config::from_value(&value, &cfg_path.display().to_string())?;
    let added = tok.add_tokens(&cfg.data.add_tokens, model.vocab_size)?;
    let new: Vec<u32> = added.iter().filter(|a| a.2).map(|a| a.1).collect();
    if cfg.lora.embedding_targeted() && !new.is_empty() {
        bail!(
            "data.add_tokens with a LoRA on embed_tokens: the new tokens' rows need to train \
             themselves; drop embed_tokens from lora.targets (they then train as token rows), or \
             train the embedding whole with lora.modules_to_save = [\"embed_tokens\"]"
        );
    }
    let copy = cfg.lora.modules_to_save.iter().any(|m| m == "embed_tokens");
    if !copy && !new.is_empty() {
        let mut rows = cfg.lora.trainable_token_indices.embedding_rows()?;
        for id in &new {
            if !rows.contains(id) {
                rows.push(*id);
            }
        }
        cfg.lora.trainable_token_indices = crate::lora::TokenIndices::List(rows);
    }
    if loud {
        let shown: Vec<String> = added
            .iter()
            .map(|(t, id, is_new)| {
                format!(
                    "{t} → {id}{}",
                    if *is_new {
                        " (new row, trained)"
                    } else {
                        " (already in the vocabulary)"
                    }
                )
            })
            .collect();
        eprintln!("data.add_tokens: {}", shown.join(", "));
        if new
            .iter()
            .any(|_| !cfg.lora.modules_to_save.iter().any(|m| m == "lm_head"))
        {
            eprintln!(
                "note: the head's rows of new tokens are the checkpoint's untrained ones; to have \
                 the model emit them, train the head too (lora.modules_to_save = [\"lm_head\"])"
            );
        }
    }
    let base_cfg = std::fs::read(model_dir.join("tokenizer_config.json")).ok();
    Ok(Some(tok.files(base_cfg.as_deref())?))
}

/// `spec` read and tokenized ([`crate::data::encode`]: every core, cached unless `data.cache` is
/// off), with `data.eval_fraction` of it held out when `hold_out` (training's data).
fn encode_examples(
    tok: &TokenizerBundle,
    spec: &Spec,
    cfg: &TrainConfig,
    hold_out: bool,
) -> Result<(EncodedData, Vec<crate::data::Encoded>)> {
    let cache = cfg.data.cache.then(crate::data::encode::cache_dir);
    let mut d = encode_data(spec, &ReadOptions::of(&cfg.data), tok, cache.as_deref())?;
    let mut held = Vec::new();
    if hold_out && cfg.data.eval_fraction > 0.0 {
        let all = std::mem::take(&mut d.examples);
        (d.examples, held) =
            crate::data::encode::hold_out(all, cfg.data.eval_fraction, cfg.training.seed)?;
    }
    Ok((d, held))
}

/// Examples into rows (packed or padded to max_seq_len); an error naming `spec` when none has a
/// trained token.
fn rows_of(
    examples: &[crate::data::Encoded],
    spec: &Spec,
    cfg: &TrainConfig,
) -> Result<(Vec<Row>, RowStats)> {
    let (rows, stats) = build_rows(examples, cfg.training.max_seq_len, cfg.data.pack);
    if rows.is_empty() {
        bail!(
            "{spec}: no example has trainable tokens within max_seq_len {}",
            cfg.training.max_seq_len
        );
    }
    Ok((rows, stats))
}

/// The training rows of `spec`, their stats and the records skipped (what `qlora eval` and the
/// tests read too).
pub fn encode_rows(
    tok: &TokenizerBundle,
    spec: &Spec,
    cfg: &TrainConfig,
) -> Result<(Vec<Row>, RowStats, usize)> {
    let (d, _) = encode_examples(tok, spec, cfg, false)?;
    let (rows, stats) = rows_of(&d.examples, spec, cfg)?;
    Ok((rows, stats, d.skipped.len()))
}

/// The objective before the model exists (the memory plan needs its data), then given its
/// reference.
pub(super) enum ObjectiveData {
    Sft(Sft),
    Pref(Box<Preference>),
}

/// The file in the output directory holding precomputed reference scores.
pub const REF_CACHE: &str = "ref_logps.json";

/// Precomputed reference scores, as f64 bits (JSON's decimal floats do not always read back to
/// the same bits).
#[derive(Serialize, Deserialize)]
struct RefCache {
    key: String,
    train: Vec<[u64; 2]>,
    eval: Vec<[u64; 2]>,
}

fn to_bits(v: &[[f64; 2]]) -> Vec<[u64; 2]> {
    v.iter().map(|p| p.map(f64::to_bits)).collect()
}

fn from_bits(v: &[[u64; 2]]) -> Vec<[f64; 2]> {
    v.iter().map(|p| p.map(f64::from_bits)).collect()
}

impl ObjectiveData {
    pub(super) fn read(cfg: &TrainConfig, tok: &TokenizerBundle, pad_id: u32) -> Result<Self> {
        let kind = cfg.training.objective;
        let train = cfg.data.train_spec();
        if kind == Kind::Sft {
            let (d, held) = encode_examples(tok, &train, cfg, true)?;
            let (rows, stats) = rows_of(&d.examples, &train, cfg)?;
            let (skipped_lines, cached, held_out) = (d.skipped.len(), d.cached, held.len());
            drop(d);
            let eval_rows = match cfg.data.eval_spec() {
                Some(spec) => encode_rows(tok, &spec, cfg)?.0,
                None if !held.is_empty() => {
                    rows_of(&held, &train, cfg)
                        .context("the held-out evaluation examples")?
                        .0
                }
                None => Vec::new(),
            };
            return Ok(Self::Sft(Sft {
                rows,
                eval_rows,
                stats,
                skipped_lines,
                pad_id,
                cached,
                held_out,
            }));
        }
        let load = |spec: &Spec| {
            crate::data::pairs::load_pairs(
                tok,
                spec,
                cfg.training.max_seq_len,
                cfg.data.truncation_mode,
                cfg.data.skip_bad_lines,
            )
        };
        let (pairs, stats) = load(&train)?;
        let (pairs, eval_pairs) = match cfg.data.eval_spec() {
            Some(spec) => (pairs, load(&spec)?.0),
            None => {
                crate::data::encode::hold_out(pairs, cfg.data.eval_fraction, cfg.training.seed)?
            }
        };
        let mut p = Preference::new(
            kind,
            Params {
                beta: cfg.training.beta,
                gamma: cfg.training.simpo_gamma,
            },
            pairs,
            eval_pairs,
            stats,
            pad_id,
        );
        // Sequences share rows only where the rows' layout cannot matter: without dropout.
        p.pack = cfg.data.pack && cfg.lora.dropout == 0.0;
        Ok(Self::Pref(Box::new(p)))
    }

    pub(super) fn as_dyn(&self) -> &dyn Objective {
        match self {
            Self::Sft(s) => s,
            Self::Pref(p) => &**p,
        }
    }

    pub(super) fn into_dyn(self) -> Box<dyn Objective> {
        match self {
            Self::Sft(s) => Box::new(s),
            Self::Pref(p) => p,
        }
    }

    /// DPO and IPO: the reference is the model's trainable values now (a fresh adapter's, or the
    /// starting adapter's); with `training.precompute_ref`, its scores of every pair instead,
    /// from the output directory's cache when its key (data, base, reference values) matches,
    /// else computed and cached (by `lead`).
    pub(super) fn attach_reference(
        &mut self,
        cfg: &TrainConfig,
        model: &Phi3,
        model_dir: &Path,
        output: &Path,
        lead: bool,
    ) -> Result<()> {
        let Self::Pref(p) = self else {
            return Ok(());
        };
        if !p.kind.has_reference() {
            return Ok(());
        }
        let reference = Reference::snapshot(model)?;
        if !cfg.training.precompute_ref {
            p.reference = Some(reference);
            return Ok(());
        }
        let mut bytes = p.fingerprint();
        for e in &p.eval_pairs {
            bytes.extend(
                e.chosen
                    .ids
                    .iter()
                    .chain(&e.rejected.ids)
                    .flat_map(|v| v.to_le_bytes()),
            );
        }
        bytes.extend(
            std::fs::read(model_dir.join(crate::checkpoint::CONFIG_FILE)).unwrap_or_default(),
        );
        let mut files: Vec<(String, u64)> = std::fs::read_dir(model_dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                    .map(|e| {
                        (
                            e.file_name().to_string_lossy().into_owned(),
                            e.metadata().map_or(0, |m| m.len()),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        bytes.extend(
            format!(
                "{files:?}{:?}{}{}",
                cfg.quant, cfg.training.four_bit, cfg.training.dtype
            )
            .into_bytes(),
        );
        for v in model.trainable_vars() {
            let host: Vec<f32> = v
                .as_tensor()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            bytes.extend(host.iter().flat_map(|x| x.to_le_bytes()));
        }
        let key = format!("{:016x}", dist::fnv1a(bytes));
        let path = output.join(REF_CACHE);
        if let Ok(text) = std::fs::read(&path)
            && let Ok(c) = serde_json::from_slice::<RefCache>(&text)
            && c.key == key
            && c.train.len() == p.pairs.len()
            && c.eval.len() == p.eval_pairs.len()
        {
            p.precomputed = Some((from_bits(&c.train), from_bits(&c.eval)));
            return Ok(());
        }
        if lead {
            eprintln!(
                "computing the reference's log-probs of {} pairs once (training.precompute_ref)",
                p.pairs.len() + p.eval_pairs.len()
            );
        }
        drop(reference);
        let (train, eval) = p.precompute(model, cfg.training.micro_batch_size)?;
        if lead {
            crate::fsx::disk::create_dir_all(output)?;
            let c = RefCache {
                key,
                train: to_bits(&train),
                eval: to_bits(&eval),
            };
            write_atomic(&path, &serde_json::to_vec(&c)?)?;
        }
        p.precomputed = Some((train, eval));
        Ok(())
    }
}

/// What the memory and disk plans need of a run's data: its rows ([`Objective::plan_rows`]) and
/// its training units; nothing without `data.train`.
pub fn plan_data(
    cfg: &TrainConfig,
    tok: &TokenizerBundle,
) -> Result<(crate::plan::inputs::Rows, usize)> {
    if cfg.data.train.is_empty() {
        return Ok((crate::plan::inputs::Rows::default(), 0));
    }
    let d = ObjectiveData::read(cfg, tok, tok.pad_id.or(tok.eos_id).unwrap_or(0))?;
    Ok((d.as_dyn().plan_rows(), d.as_dyn().units()))
}
