//! `qlora quantize`: a dense Hugging Face Phi-3 checkpoint into a bitsandbytes-4bit checkpoint that
//! transformers + bitsandbytes load as-is. Block linears are quantized from their own dtype;
//! embeddings, `lm_head` and norms are copied untouched; shards, tokenizer and other files are
//! carried over; config.json gains `quantization_config`. The output directory appears only when
//! complete (built under a temporary name, then renamed).
//!
//! Streaming: each linear is read, quantized, spilled to disk ([`crate::spill`]) and its mapped
//! pages released before the next; each shard is then written reading one tensor at a time back
//! (copied tensors straight from the input). Memory holds one tensor, not a shard.

use crate::checkpoint::{self, CONFIG_FILE, Checkpoint, INDEX_FILE, ShardIndex};
use crate::fsx::{AtomicDir, write_atomic};
use crate::model::{Phi3Config, names};
use crate::spill::{Spill, Spilled, SpilledView};
use anyhow::{Context, Result, bail};
use indicatif::ProgressBar;
use qlora_quant::bnb::{self, QuantStorage, QuantizationConfig};
use qlora_quant::{Blocksize, BnbBackend, QuantType, Quantized};
use safetensors::tensor::TensorView;
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// What to quantize and how.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub model: PathBuf,
    pub out: PathBuf,
    pub quant_type: QuantType,
    pub blocksize: Blocksize,
    pub double_quant: bool,
    /// Whose bytes to write: bitsandbytes' CUDA kernels (the default) or its CPU backend.
    pub backend: BnbBackend,
}

/// What was done.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeReport {
    pub n_quantized: usize,
    pub n_copied: usize,
    /// Bytes of the quantized linears before and after.
    pub linear_bytes_in: usize,
    pub linear_bytes_out: usize,
}

/// A tensor of an output shard: copied from the input or built (quantized) and spilled.
enum OutTensor<'a> {
    /// Copied out of the input mapping when written, then its pages released.
    Copied {
        view: TensorView<'a>,
        ck: &'a Checkpoint,
        error: &'a RefCell<Option<anyhow::Error>>,
    },
    Built(SpilledView<'a>),
}

impl safetensors::View for OutTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            Self::Copied { view, .. } => view.dtype(),
            Self::Built(t) => t.dtype(),
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            Self::Copied { view, .. } => view.shape(),
            Self::Built(t) => t.shape(),
        }
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            Self::Copied { view, ck, error } => {
                let bytes = view.data().to_vec();
                if let Err(e) = ck.release(view.data()) {
                    error.borrow_mut().get_or_insert(e);
                }
                Cow::Owned(bytes)
            }
            Self::Built(t) => t.data(),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            Self::Copied { view, .. } => view.data().len(),
            Self::Built(t) => t.data_len(),
        }
    }
}

/// Runs the quantization; `progress` advances once per quantized linear.
pub fn quantize_checkpoint(
    opts: &QuantizeOptions,
    progress: &ProgressBar,
) -> Result<QuantizeReport> {
    let ck = Checkpoint::open(&opts.model)?;
    let config_origin = opts.model.join(CONFIG_FILE).display().to_string();
    let cfg = Phi3Config::from_value(&ck.config, &config_origin)?;
    if cfg.is_quantized() {
        bail!(
            "{config_origin}: the checkpoint is already quantized (it has quantization_config); give the dense original"
        );
    }
    let headers = ck.tensors()?;

    // Check everything before writing anything: each block linear exists once, with the shape the
    // config implies and a float dtype.
    let mut seen = BTreeMap::new();
    for (shard, st) in ck.shards.iter().zip(&headers) {
        // In name order, so that the first problem reported is the same on every run.
        let mut tensors = st.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, view) in tensors {
            let Some((layer, target)) = names::block_linear(&name) else {
                continue;
            };
            let want = cfg.linear_shape(target).with_context(|| {
                format!(
                    "{}: tensor `{name}` is not a linear of a `{}` checkpoint",
                    shard.file, cfg.model_type
                )
            })?;
            if view.shape() != want {
                bail!(
                    "{}: tensor `{name}` has shape {:?}, but config.json implies {want:?}",
                    shard.file,
                    view.shape()
                );
            }
            if checkpoint::float_dtype(view.dtype()).is_none() {
                checkpoint::to_f32(&view, &name, &shard.file)?;
            }
            seen.insert((layer, target), name);
        }
    }
    for layer in 0..cfg.num_hidden_layers {
        for (suffix, target) in cfg.layout().linears() {
            if !seen.contains_key(&(layer, *target)) {
                bail!(
                    "{}: no tensor `{}{layer}.{suffix}.weight`, which config.json (model_type `{}`) implies",
                    opts.model.display(),
                    names::LAYER_PREFIX,
                    cfg.model_type
                );
            }
        }
    }

    let out = AtomicDir::create(&opts.out)?;
    progress.set_length(seen.len() as u64);
    let mut report = QuantizeReport {
        n_quantized: 0,
        n_copied: 0,
        linear_bytes_in: 0,
        linear_bytes_out: 0,
    };
    let mut weight_map = BTreeMap::new();
    let mut total_size = 0usize;
    let error = RefCell::new(None);
    for (shard, st) in ck.shards.iter().zip(&headers) {
        let mut spill = Spill::create(&out.path().join(format!(".{}.spill", shard.file)))?;
        // First pass: quantize each linear, spill its tensors, release its input pages.
        let mut built: Vec<(String, Spilled)> = Vec::new();
        let mut copied: Vec<(String, TensorView<'_>)> = Vec::new();
        let mut names_sorted: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names_sorted.sort();
        for name in names_sorted {
            let view = st.tensor(&name)?;
            if names::block_linear(&name).is_some() {
                progress.set_message(name.clone());
                let values = checkpoint::to_f32(&view, &name, &shard.file)?;
                ck.release(view.data())?;
                let dtype = checkpoint::float_dtype(view.dtype()).expect("checked above");
                let q = Quantized::quantize_as(
                    &values,
                    view.shape(),
                    dtype,
                    opts.quant_type,
                    opts.blocksize,
                    opts.double_quant,
                    opts.backend,
                )
                .with_context(|| format!("{}: quantizing `{name}`", shard.file))?;
                drop(values);
                report.n_quantized += 1;
                report.linear_bytes_in += view.data().len();
                for (n, t) in bnb::to_tensors(&name, &q, QuantStorage::Uint8)? {
                    report.linear_bytes_out += t.data.len();
                    built.push((n, spill.push(&t)?));
                }
                progress.inc(1);
            } else {
                report.n_copied += 1;
                copied.push((name, view));
            }
        }
        // Second pass: the shard, each tensor read back (or copied) when the writer reaches it.
        let mut tensors: Vec<(String, OutTensor<'_>)> = Vec::new();
        for (n, view) in copied {
            let t = OutTensor::Copied {
                view,
                ck: &ck,
                error: &error,
            };
            tensors.push((n, t));
        }
        for (n, s) in built {
            tensors.push((n, OutTensor::Built(spill.view(s, &error))));
        }
        for (n, t) in &tensors {
            weight_map.insert(n.clone(), shard.file.clone());
            total_size += safetensors::View::data_len(t);
        }
        let metadata = Some(std::collections::HashMap::from([(
            "format".to_string(),
            "pt".to_string(),
        )]));
        let path = out.path().join(&shard.file);
        crate::fsx::st::save(&path, tensors, metadata)?;
        if let Some(e) = error.borrow_mut().take() {
            return Err(e.context(format!("writing {}", path.display())));
        }
    }

    if ck.index.is_some() {
        let mut metadata = serde_json::Map::new();
        metadata.insert("total_size".into(), total_size.into());
        let index = ShardIndex {
            metadata,
            weight_map,
        };
        write_atomic(
            &out.path().join(INDEX_FILE),
            &serde_json::to_vec_pretty(&index)?,
        )?;
    }
    let mut config = ck.config.clone();
    let compute = checkpoint::float_dtype(
        headers
            .iter()
            .flat_map(|st| st.tensors())
            .find(|(n, _)| names::block_linear(n).is_some())
            .map(|(_, v)| v.dtype())
            .expect("checked above"),
    )
    .expect("checked above");
    config["quantization_config"] = serde_json::to_value(QuantizationConfig::new_4bit(
        opts.quant_type,
        opts.double_quant,
        compute,
    ))?;
    write_atomic(
        &out.path().join(CONFIG_FILE),
        &serde_json::to_vec_pretty(&config)?,
    )?;
    checkpoint::copy_other_files(&ck, out.path())?;
    out.commit()?;
    Ok(report)
}
