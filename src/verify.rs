//! `qlora verify`: is an export the model it came from? The reference is the base plus the adapter
//! as qlora computes it (our model, f32, merged into the base the export names: the original
//! weights or `dequant(NF4(W))`); the candidate is the export, read by its own loader:
//!
//! - a merged Hugging Face directory, or a PEFT adapter on the base: our model (the safetensors and
//!   the adapter are what is checked, not the arithmetic);
//! - a GGUF, or a LoRA GGUF applied to its base GGUF (`W + alpha/r · B·A`, r from the tensor, as
//!   llama.cpp does): our model built from the file alone ([`crate::model::gguf`]): every
//!   hyperparameter from the GGUF's metadata as llama.cpp's phi3 loader reads it (rope base and
//!   rotated dims, longrope factor tensors and attention factor, heads and kv heads, norm epsilon,
//!   sliding window, tied head), every tensor dequantized with candle's GGML types and renamed back
//!   from llama.cpp's names. Phi-3, Phi-3.5, Phi-4 and Phi-4-mini GGUFs all run; metadata that
//!   disagrees with the trained model (a wrong rope base, say) shows in the logits. Where
//!   candle-transformers' quantized Phi-3 computes the same model (rope base 10000, whole-head
//!   rotary, no longrope factors, an output matrix: Phi-3-mini-4k) it runs the file too, as a
//!   second engine independent of our model code and of our GGUF reader's renaming: it must agree
//!   with ours within the type's bound.
//!
//! On a fixed set of chat prompts (or `--data`), each followed by the reference's greedy
//! continuation, it measures teacher-forced logits (max |Δ|, mean KL(reference ‖ export), top-1
//! agreement per position), the export's own greedy continuation against the reference's, the
//! tokenizer (ids, special ids, chat template; for GGUF the vocabulary keys the converter writes),
//! and whether the adapter survived: the export must be closer to base + adapter than to the base
//! alone. Thresholds per export type are in [`Thresholds::for_type`] with their source.

use crate::data::{Message, Role, TokenizerBundle};
use crate::export::MergeBase;
use crate::lora::{attach, peft::PeftAdapter};
use crate::model::Phi3;
use crate::model::load::{BaseFormat, LoadOptions, load};
use anyhow::{Context, Result, ensure};
use candle_core::{D, DType, Device, Tensor};
use std::path::{Path, PathBuf};

mod gguf;
mod thresholds;
mod tokenizer;

pub use thresholds::{Thresholds, export_type};

use tokenizer::{gguf_tokenizer, tokenizer_files};

/// What was exported.
#[derive(Debug, Clone)]
pub enum Export {
    /// A merged Hugging Face checkpoint directory.
    Merged(PathBuf),
    /// A PEFT adapter directory, applied to the base.
    Adapter(PathBuf),
    /// A merged GGUF.
    Gguf(PathBuf),
    /// A LoRA GGUF and the base GGUF it applies to.
    LoraGguf { lora: PathBuf, base: PathBuf },
}

/// The export at `path` (`base_gguf` for a LoRA GGUF), by what it is.
pub fn classify(path: &Path, base_gguf: Option<&Path>) -> Result<Export> {
    if path.is_dir() {
        return Ok(if path.join(crate::lora::peft::CONFIG_FILE).exists() {
            Export::Adapter(path.to_path_buf())
        } else {
            Export::Merged(path.to_path_buf())
        });
    }
    let h = crate::export::gguf_read::read_header(path)?;
    let kind = h.get("general.type").map(|v| v.to_json());
    if kind.as_ref().and_then(|k| k.as_str()) == Some("adapter") {
        let base = base_gguf.with_context(|| {
            format!(
                "{} is a LoRA GGUF: pass --base-gguf with the GGUF it applies to",
                path.display()
            )
        })?;
        return Ok(Export::LoraGguf {
            lora: path.to_path_buf(),
            base: base.to_path_buf(),
        });
    }
    Ok(Export::Gguf(path.to_path_buf()))
}

/// Parameters of the model `cfg` describes (embeddings, head, blocks).
pub fn parameter_count(cfg: &crate::model::Phi3Config) -> usize {
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let block: usize = crate::lora::TARGETS
        .iter()
        .filter_map(|t| cfg.any_linear_shape(t))
        .map(|[o, i]| o * i)
        .sum::<usize>()
        + 2 * h;
    let head = if cfg.tie_word_embeddings { 0 } else { v * h };
    v * h + head + h + cfg.num_hidden_layers * block
}

/// `MemAvailable` of /proc/meminfo, in bytes.
pub fn available_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The built-in prompts: short chat turns of different kinds.
pub const PROMPTS: [&str; 4] = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in one sentence why the sky is blue.",
    "List three prime numbers greater than 10.",
];

/// The measures of one verification.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Measures {
    pub positions: usize,
    pub max_abs_logit_diff: f32,
    pub mean_kl: f64,
    pub top1_agreement: f64,
    pub greedy_agreement: f64,
    /// Mean KL(base alone ‖ export): must exceed `mean_kl` when there is an adapter.
    pub mean_kl_to_base: Option<f64>,
    /// Mean KL(our GGUF engine ‖ candle-transformers' quantized Phi-3) on the same file, where
    /// candle's model applies.
    pub second_engine_kl: Option<f64>,
}

/// The verdict.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub export_type: String,
    pub measures: Measures,
    /// Each failed check, one line naming the measure.
    pub failures: Vec<String>,
    /// What was checked beyond the numbers.
    pub notes: Vec<String>,
}

impl Report {
    /// Every check ran and passed.
    pub fn faithful(&self) -> bool {
        self.failures.is_empty()
    }

    /// 0 faithful, 1 not faithful (the CLI's exit codes; bad input is an error, exit 2).
    pub fn exit_code(&self) -> u8 {
        if self.faithful() { 0 } else { 1 }
    }
}

/// An engine that gives logits for a token sequence.
trait Engine {
    /// f32 `[T, V]` logits of `ids` (a fresh sequence).
    fn logits(&mut self, ids: &[u32]) -> Result<Tensor>;
    /// `n` greedy tokens after `prompt`, stopping at `stops`.
    fn greedy(&mut self, prompt: &[u32], n: usize, stops: &[u32]) -> Result<Vec<u32>>;
}

struct Ours(Phi3);

impl Engine for Ours {
    fn logits(&mut self, ids: &[u32]) -> Result<Tensor> {
        let t = Tensor::new(ids, &self.0.device)?.unsqueeze(0)?;
        Ok(self.0.forward(&t)?.squeeze(0)?.to_dtype(DType::F32)?)
    }

    fn greedy(&mut self, prompt: &[u32], n: usize, stops: &[u32]) -> Result<Vec<u32>> {
        let mut cache = crate::model::phi3::KvCache::default();
        let mut input = Tensor::new(prompt, &self.0.device)?.unsqueeze(0)?;
        let mut out = Vec::new();
        for _ in 0..n {
            let logits = self.0.forward_cached(&input, &mut cache)?;
            let last = logits.squeeze(0)?.get(logits.dim(1)? - 1)?;
            let next = last.argmax(D::Minus1)?.to_scalar::<u32>()?;
            if stops.contains(&next) {
                break;
            }
            out.push(next);
            input = Tensor::new(&[next], &self.0.device)?.unsqueeze(0)?;
        }
        Ok(out)
    }
}

/// Everything verification needs from the model side.
#[derive(Debug)]
pub struct Reference {
    pub dir: PathBuf,
    /// Where the tokenizer files are: `dir`, or a view of it with the adapter's own tokenizer
    /// ([`crate::export::tokenizer_dir`]).
    pub tok_dir: PathBuf,
    _tok_view: Option<tempfile::TempDir>,
    pub tok: TokenizerBundle,
    model: Phi3,
    base_only: Option<Phi3>,
    stops: Vec<u32>,
}

impl Reference {
    /// The base in `dir` with `adapter` merged as `merge_base` says, in f32 on the CPU.
    pub fn new(dir: &Path, adapter: Option<&PeftAdapter>, merge_base: MergeBase) -> Result<Self> {
        let base = match merge_base {
            MergeBase::Original => BaseFormat::Dense,
            MergeBase::Nf4 {
                quant_type,
                blocksize,
                double_quant,
            } => BaseFormat::Quantized {
                quant_type,
                blocksize,
                double_quant,
            },
        };
        let opts = LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            base,
        };
        let plain = load(dir, &opts)?;
        let (model, base_only) = match adapter {
            Some(a) => {
                let mut m = plain.clone();
                attach::load_adapters(&mut m, a)?;
                (m, Some(plain))
            }
            None => (plain, None),
        };
        let (tok_dir, tok_view) = crate::export::tokenizer_dir(dir, adapter)?;
        let tok = TokenizerBundle::from_dir(&tok_dir)?;
        let mut stops = model.cfg.eos_token_ids();
        stops.extend(tok.end_id);
        Ok(Self {
            dir: dir.to_path_buf(),
            tok_dir,
            _tok_view: tok_view,
            tok,
            model,
            base_only,
            stops,
        })
    }

    /// The rope base of the model (config.json's).
    pub fn rope_theta(&self) -> f64 {
        self.model.rope.theta
    }

    /// Token ids of each prompt rendered as one user turn with the generation prompt.
    pub fn prompt_ids(&self, prompts: &[String]) -> Result<Vec<Vec<u32>>> {
        prompts
            .iter()
            .map(|p| {
                let text = self
                    .tok
                    .template
                    .render(&[Message::new(Role::User, p.clone())], true)?;
                Ok(self.tok.encode(&text)?.get_ids().to_vec())
            })
            .collect()
    }
}

/// `softmax` rows of `[T, V]` logits, in f64 on the host.
fn log_softmax_rows(logits: &Tensor) -> Result<Vec<Vec<f64>>> {
    let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + r.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            r.iter().map(|&x| x as f64 - lse).collect()
        })
        .collect())
}

/// Mean over rows of KL(p ‖ q) from log-probabilities.
fn mean_kl(lp: &[Vec<f64>], lq: &[Vec<f64>]) -> f64 {
    let total: f64 = lp
        .iter()
        .zip(lq)
        .map(|(p, q)| {
            p.iter()
                .zip(q)
                .map(|(a, b)| {
                    if a.is_finite() {
                        a.exp() * (a - b)
                    } else {
                        0.0
                    }
                })
                .sum::<f64>()
                .max(0.0)
        })
        .sum();
    total / lp.len().max(1) as f64
}

fn argmax(r: &[f64]) -> usize {
    r.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap_or(0)
}

/// Runs the measures of `export` against `reference` on `prompts`, `n` continuation tokens each.
pub fn verify(
    reference: &Reference,
    export: &Export,
    export_type: &str,
    prompts: &[String],
    n: usize,
    adapter_for_export: Option<&PeftAdapter>,
) -> Result<Report> {
    let mut notes = Vec::new();
    let mut failures = Vec::new();
    // candle-transformers' quantized Phi-3 on a GGUF it computes faithfully.
    let mut second: Option<gguf::Second> = None;
    let mut engine: Box<dyn Engine> = match export {
        Export::Merged(dir) => {
            let m = load(
                dir,
                &LoadOptions {
                    dtype: DType::F32,
                    device: Device::Cpu,
                    base: BaseFormat::Dense,
                },
            )?;
            tokenizer_files(&reference.tok_dir, dir, &mut failures, &mut notes)?;
            Box::new(Ours(m))
        }
        Export::Adapter(_) => {
            let a = adapter_for_export.context("an adapter export needs the adapter loaded")?;
            let mut m = load(
                &reference.dir,
                &LoadOptions {
                    dtype: DType::F32,
                    device: Device::Cpu,
                    base: BaseFormat::Dense,
                },
            )?;
            attach::load_adapters(&mut m, a)?;
            Box::new(Ours(m))
        }
        Export::Gguf(path) => {
            let header = crate::export::gguf_read::read_header(path)?;
            gguf_tokenizer(reference, &header, path, &mut failures, &mut notes)?;
            let (model, s) = gguf::open(path, None, &header, &mut notes)?;
            second = s;
            Box::new(Ours(model))
        }
        Export::LoraGguf { lora, base } => {
            let header = crate::export::gguf_read::read_header(base)?;
            gguf_tokenizer(reference, &header, base, &mut failures, &mut notes)?;
            let (model, s) = gguf::open(base, Some(lora), &header, &mut notes)?;
            second = s;
            Box::new(Ours(model))
        }
    };
    let mut ours = Ours(reference.model.clone());
    let mut base_only = reference.base_only.clone().map(Ours);
    let prompt_ids = reference.prompt_ids(prompts)?;
    let mut m = Measures::default();
    let (mut kl_sum, mut kl_base_sum, mut agree, mut greedy_sum) = (0f64, 0f64, 0usize, 0f64);
    let mut for_second = Vec::new();
    for ids in &prompt_ids {
        let cont = ours.greedy(ids, n, &reference.stops)?;
        let mut seq = ids.clone();
        seq.extend(&cont);
        let lr = ours.logits(&seq)?;
        let le = engine.logits(&seq)?;
        ensure!(
            lr.dims() == le.dims(),
            "the export's logits are {:?}, the model's {:?} (another vocabulary size?)",
            le.dims(),
            lr.dims()
        );
        let d = (&lr - &le)?.abs()?.max_all()?.to_scalar::<f32>()?;
        m.max_abs_logit_diff = m.max_abs_logit_diff.max(d);
        let (pr, pe) = (log_softmax_rows(&lr)?, log_softmax_rows(&le)?);
        if second.is_some() {
            for_second.push((seq.clone(), pe.clone()));
        }
        kl_sum += mean_kl(&pr, &pe) * pr.len() as f64;
        agree += pr
            .iter()
            .zip(&pe)
            .filter(|(a, b)| argmax(a) == argmax(b))
            .count();
        m.positions += pr.len();
        if let Some(b) = base_only.as_mut() {
            let pb = log_softmax_rows(&b.logits(&seq)?)?;
            kl_base_sum += mean_kl(&pb, &pe) * pb.len() as f64;
        }
        let theirs = engine.greedy(ids, cont.len().max(1), &reference.stops)?;
        let same = cont.iter().zip(&theirs).take_while(|(a, b)| a == b).count();
        greedy_sum += if cont.is_empty() && theirs.is_empty() {
            1.0
        } else {
            same as f64 / cont.len().max(theirs.len()) as f64
        };
    }
    // One engine at a time holds the model: ours goes before candle's is built.
    drop(engine);
    if let Some(second) = &second {
        m.second_engine_kl = Some(second.mean_kl(&for_second)?);
    }
    let np = m.positions.max(1) as f64;
    m.mean_kl = kl_sum / np;
    m.top1_agreement = agree as f64 / np;
    m.greedy_agreement = greedy_sum / prompt_ids.len().max(1) as f64;
    if base_only.is_some() {
        m.mean_kl_to_base = Some(kl_base_sum / np);
    }
    let t = Thresholds::for_type(export_type);
    if m.mean_kl > t.mean_kl {
        failures.push(format!(
            "logits: mean KL(model ‖ export) {:.3e} > {:.0e} allowed for {export_type} (max |Δlogit| {:.3e})",
            m.mean_kl, t.mean_kl, m.max_abs_logit_diff
        ));
    }
    if m.top1_agreement < t.top1 {
        failures.push(format!(
            "top-1: {:.1}% of positions agree, {:.0}% required for {export_type}",
            100.0 * m.top1_agreement,
            100.0 * t.top1
        ));
    }
    if m.greedy_agreement < t.greedy {
        failures.push(format!(
            "greedy: {:.1}% of the continuation agrees, {:.0}% required for {export_type}",
            100.0 * m.greedy_agreement,
            100.0 * t.greedy
        ));
    }
    if let Some(kl) = m.second_engine_kl {
        if kl > t.mean_kl {
            failures.push(format!(
                "second engine: candle-transformers' quantized Phi-3 and our GGUF engine disagree on \
                 this file: mean KL {kl:.3e} > {:.0e} allowed for {export_type} (a tensor layout \
                 or metadata fault that our reader may share with our exporter)",
                t.mean_kl
            ));
        } else {
            notes.push(format!(
                "second engine: candle-transformers' quantized Phi-3 agrees with ours on the file \
                 (mean KL {kl:.3e})"
            ));
        }
    }
    match m.mean_kl_to_base {
        Some(kb) if kb <= m.mean_kl => failures.push(format!(
            "adapter: the export is as close to the base alone (KL {kb:.3e}) as to base + adapter \
             (KL {:.3e}): the adapter did not survive",
            m.mean_kl
        )),
        Some(_) => {}
        None => notes.push("no adapter: only the base is compared".into()),
    }
    Ok(Report {
        export_type: export_type.into(),
        measures: m,
        failures,
        notes,
    })
}
