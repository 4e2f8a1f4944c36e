//! What `eval` and `generate` share: the model (4-bit or dense, with an optional PEFT adapter) and
//! its tokenizer.

use crate::data::TokenizerBundle;
use crate::device::{DeviceSpec, compute_dtype};
use crate::lora::{attach, peft};
use crate::model::Phi3;
use crate::model::load::{BaseFormat, LoadOptions, load};
use anyhow::{Context, Result, bail};
use clap::Args;
use std::path::PathBuf;

/// The model directory: `--model` when given, else the adapter's `base_model_name_or_path`.
pub fn resolve_model(model: Option<&str>, adapter: Option<&peft::PeftAdapter>) -> Result<PathBuf> {
    resolve_model_at(model, None, adapter)
}

/// [`resolve_model`] at a Hub `revision` (of `--model`, or of the adapter's base).
pub fn resolve_model_at(
    model: Option<&str>,
    revision: Option<&str>,
    adapter: Option<&peft::PeftAdapter>,
) -> Result<PathBuf> {
    let model_ref = match (model, adapter) {
        (Some(m), _) => m.to_string(),
        (None, Some(a)) => a
            .base_model_name_or_path
            .clone()
            .context("the adapter names no base_model_name_or_path; pass --model")?,
        (None, None) => bail!("pass --model (or --adapter, whose base model is used)"),
    };
    crate::hub::resolve(&crate::hub::with_revision(&model_ref, revision))
}

/// Model selection flags.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Checkpoint dir, Hub id (HF cache, else downloaded) or builtin:tiny-phi3; defaults to the adapter's
    /// base_model_name_or_path.
    #[arg(long)]
    pub model: Option<String>,
    /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Quantize the base to NF4 on load (as QLoRA training saw it).
    #[arg(long = "4bit")]
    pub four_bit: bool,
    /// Compute dtype: auto (bf16 on CUDA, f32 on the CPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto", value_parser = ["auto", "f32", "bf16", "f16"])]
    pub dtype: String,
    /// auto (CUDA device 0 when built with the cuda feature and one opens, else the CPU), cpu,
    /// cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
}

/// A loaded model and tokenizer.
#[derive(Debug)]
pub struct Loaded {
    pub model: Phi3,
    pub tok: TokenizerBundle,
    pub dir: PathBuf,
}

impl ModelArgs {
    pub fn load(&self) -> Result<Loaded> {
        let device = self.device.open()?;
        let adapter = self
            .adapter
            .as_ref()
            .map(|a| peft::load(a, &device))
            .transpose()?;
        let dir = resolve_model(self.model.as_deref(), adapter.as_ref())?;
        let dtype = compute_dtype(&self.dtype, &device)?;
        let base = if self.four_bit {
            BaseFormat::NF4
        } else {
            BaseFormat::Dense
        };
        let mut model = load(
            &dir,
            &LoadOptions {
                dtype,
                device,
                base,
            },
        )?;
        if let Some(a) = &adapter {
            attach::load_adapters(&mut model, a).with_context(|| {
                format!(
                    "applying {}",
                    self.adapter.as_ref().expect("some").display()
                )
            })?;
        }
        // An adapter that extended the vocabulary (data.add_tokens) brings its own tokenizer.
        let tok = match adapter.as_ref().and_then(|a| a.tokenizer_dir()) {
            Some(own) => {
                let (view, _guard) = crate::export::tokenizer_dir(&dir, adapter.as_ref())?;
                TokenizerBundle::from_dir(&view)
                    .with_context(|| format!("the tokenizer of {}", own.display()))?
            }
            None => TokenizerBundle::from_dir(&dir)?,
        };
        Ok(Loaded { model, tok, dir })
    }
}
