//! Exports: the adapter merged into its base. [`safetensors`] writes a Hugging Face checkpoint
//! directory that transformers loads; [`gguf_model`] a llama.cpp `phi3` GGUF ([`gguf`]: the writer,
//! [`vocab`]: the tokenizer as llama.cpp's converter writes it).
//!
//! The merge base: an adapter trained with `--4bit` learned against `dequant(NF4(W))`. By default
//! the merge goes into the original weights (`W + scale·B·A`, what PEFT's `merge_and_unload` on the
//! original model gives); `MergeBase::Nf4` merges into the dequantized NF4 weights instead, which is
//! exactly the model the adapter saw during training.
//!
//! A DoRA adapter merges as PEFT's `merge_safe` does: each row of `W + ΔW` (over whichever base
//! above) is rescaled to its magnitude, `W'_j = m_j · (W + ΔW)_j / ‖(W + ΔW)_j‖`.

pub mod ftype;
pub mod gguf;
pub mod gguf_lora;
pub mod gguf_model;
pub mod gguf_read;
pub mod kquants;
pub mod safetensors;
pub mod vocab;

use crate::checkpoint;
use crate::lora::peft::PeftAdapter;
use crate::model::{Phi3Config, names};
use ::safetensors::tensor::TensorView;
use anyhow::{Context, Result, bail, ensure};
use candle_core::Tensor;
use qlora_quant::{Blocksize, QuantType, Quantized, bnb};

/// Which base weights the adapter is merged into.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MergeBase {
    /// The checkpoint's own weights (dequantized first when the checkpoint is 4-bit).
    Original,
    /// `dequant(quant(W))` with these settings: the base a QLoRA adapter was trained on.
    Nf4 {
        quant_type: QuantType,
        blocksize: Blocksize,
        double_quant: bool,
    },
}

/// What every export starts from: the base checkpoint, its config, whether it is bitsandbytes-4bit,
/// and the adapter (checked against the base). Nothing here holds tensor data: each module's
/// `scale · B · A` is computed by [`Source::delta`] when its tensor is written, and dropped with it.
#[derive(Debug)]
pub struct Source {
    pub ck: crate::checkpoint::Checkpoint,
    pub cfg: Phi3Config,
    pub is_bnb: bool,
    /// In the checkpoint's layout ([`crate::lora::convert::to_layout`]).
    pub adapter: Option<PeftAdapter>,
}

impl Source {
    /// Opens `model_dir` and checks `adapter` against it.
    pub fn open(model_dir: &std::path::Path, adapter: Option<&PeftAdapter>) -> Result<Self> {
        let ck = crate::checkpoint::Checkpoint::open(model_dir)?;
        let origin = model_dir
            .join(crate::checkpoint::CONFIG_FILE)
            .display()
            .to_string();
        let cfg = Phi3Config::from_value(&ck.config, &origin)?;
        let is_bnb = cfg.quantization_config.as_ref().is_some_and(|q| {
            serde_json::from_value::<qlora_quant::bnb::QuantizationConfig>(q.clone())
                .is_ok_and(|q| q.is_bnb_4bit())
        });
        let adapter = adapter
            .map(|a| crate::lora::convert::to_layout(a, &cfg, cfg.layout()))
            .transpose()?;
        if let Some(a) = &adapter {
            check_adapter(a, &cfg)?;
        }
        Ok(Self {
            ck,
            cfg,
            is_bnb,
            adapter,
        })
    }

    /// The exported shape of checkpoint tensor `name` (`view`, in `file`): a 4-bit block linear's
    /// from its quant state (no data read), any other's from its header.
    pub fn shape_of<'v>(
        &self,
        name: &str,
        view: &TensorView<'v>,
        file: &str,
        lookup: impl Fn(&str) -> Option<TensorView<'v>>,
    ) -> Result<Vec<usize>> {
        Ok(if self.is_bnb && names::block_linear(name).is_some() {
            bnb::quant_state(name, lookup)
                .with_context(|| format!("{file}: `{name}`"))?
                .1
                .shape
        } else {
            view.shape().to_vec()
        })
    }

    /// The f32 values of checkpoint tensor `name` (`view`, in `file`) as exported: a block linear
    /// merged with the adapter's delta into `base` ([`merged_linear`]), any other converted. Its
    /// mapped pages (a 4-bit weight's state tensors too) are released afterwards.
    pub fn values<'v>(
        &'v self,
        name: &str,
        view: &TensorView<'v>,
        file: &str,
        base: MergeBase,
        lookup: impl Fn(&str) -> Option<TensorView<'v>>,
    ) -> Result<Vec<f32>> {
        if names::block_linear(name).is_none() {
            // A `modules_to_save` copy replaces the checkpoint's tensor (PEFT's merge_and_unload).
            if let Some(copy) = self.adapter.as_ref().and_then(|a| {
                a.modules
                    .get(name.trim_end_matches(".weight"))
                    .filter(|_| name.ends_with(".weight"))
            }) {
                ensure!(
                    copy.dims() == view.shape(),
                    "{file}: `{name}` is {:?} but the adapter's copy is {:?}",
                    view.shape(),
                    copy.dims()
                );
                return Ok(copy
                    .flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1()?);
            }
            let mut values = checkpoint::to_f32(view, name, file)?;
            self.ck.release(view.data())?;
            if let Some(d) = self.module_lora_delta(name)? {
                ensure!(
                    d.dims() == view.shape(),
                    "{file}: `{name}` is {:?} but the adapter's LoRA on it makes {:?}",
                    view.shape(),
                    d.dims()
                );
                let d: Vec<f32> = d.flatten_all()?.to_vec1()?;
                values.iter_mut().zip(&d).for_each(|(x, y)| *x += y);
            }
            // Trained token rows replace theirs (PEFT's TrainableTokensLayer merge: index_copy).
            if let (Some((ids, rows)), "model.embed_tokens.weight") =
                (self.adapter.as_ref().and_then(|a| a.tokens.as_ref()), name)
            {
                let h = view.shape().get(1).copied().unwrap_or(0);
                ensure!(
                    rows.dims() == [ids.len(), h],
                    "{file}: `{name}` rows are {h} wide but the adapter's token rows are {:?}",
                    rows.dims()
                );
                let rows: Vec<f32> = rows
                    .flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1()?;
                for (k, &id) in ids.iter().enumerate() {
                    let at = id as usize * h;
                    ensure!(
                        at + h <= values.len(),
                        "{file}: token {id} is past `{name}`'s rows"
                    );
                    values[at..at + h].copy_from_slice(&rows[k * h..(k + 1) * h]);
                }
            }
            return Ok(values);
        }
        let q = if self.is_bnb {
            Some(bnb::from_tensors(name, &lookup).with_context(|| format!("{file}: `{name}`"))?)
        } else {
            None
        };
        let delta = self.delta(name)?;
        let values = merged_linear(name, view, file, q, base, delta.as_ref())?;
        self.ck.release_named(name, lookup)?;
        Ok(values)
    }

    /// The checkpoint tensors whose rows, in order, make up Phi-3 tensor `name`: `name` itself, or
    /// on a split checkpoint the parts of a fused linear (`qkv_proj` → `q_proj`, `k_proj`, `v_proj`).
    pub fn parts_of(&self, name: &str) -> Vec<String> {
        match (self.cfg.layout(), names::block_linear(name)) {
            (names::Layout::Split, Some((layer, target))) => names::split_parts(target)
                .iter()
                .map(|p| {
                    let suffix = names::Layout::Split.suffix(p).expect("a split target");
                    format!("{}{layer}.{suffix}.weight", names::LAYER_PREFIX)
                })
                .collect(),
            _ => vec![name.to_string()],
        }
    }

    /// The exported tensor stacked by rows from checkpoint tensors `parts` ([`Self::parts_of`]):
    /// each part's view and file (from `headers`, the checkpoint's shard headers), and the total
    /// shape. Nothing is read but headers (a 4-bit part's shape comes from its quant state).
    pub fn stack<'v>(
        &self,
        parts: Vec<String>,
        headers: &'v [::safetensors::SafeTensors<'v>],
    ) -> Result<Stacked<'v>> {
        let lookup = |name: &str| headers.iter().find_map(|st| st.tensor(name).ok());
        let mut out = Stacked {
            shape: Vec::new(),
            parts: Vec::new(),
        };
        for part in parts {
            let (shard, view) = self
                .ck
                .shards
                .iter()
                .zip(headers)
                .find_map(|(s, st)| st.tensor(&part).ok().map(|v| (s, v)))
                .with_context(|| format!("{}: no tensor `{part}`", self.ck.dir.display()))?;
            let file = shard.file.clone();
            let s = self.shape_of(&part, &view, &file, lookup)?;
            if out.shape.is_empty() {
                out.shape = s;
            } else {
                ensure!(
                    s.len() == 2 && s[1] == out.shape[1],
                    "{file}: `{part}` has shape {s:?}, not [_, {}] as the parts before it",
                    out.shape[1]
                );
                out.shape[0] += s[0];
            }
            out.parts.push((part, view, file));
        }
        Ok(out)
    }

    /// The f32 values of a [`Stacked`] tensor as exported ([`Self::values`] of each part, in row
    /// order).
    pub fn stacked_values<'v>(
        &'v self,
        stacked: &Stacked<'v>,
        base: MergeBase,
        headers: &'v [::safetensors::SafeTensors<'v>],
    ) -> Result<Vec<f32>> {
        let lookup = |name: &str| headers.iter().find_map(|st| st.tensor(name).ok());
        let mut values = Vec::new();
        for (part, view, file) in &stacked.parts {
            values.extend(self.values(part, view, file, base, lookup)?);
        }
        Ok(values)
    }

    /// What an embedding or head LoRA adds to checkpoint tensor `name`: `scale · Aᵀ · Bᵀ` to the
    /// embedding (PEFT's `lora.Embedding` merge), `scale · B · A` to the head; `None` to any other.
    fn module_lora_delta(&self, name: &str) -> Result<Option<Tensor>> {
        let Some(ad) = &self.adapter else {
            return Ok(None);
        };
        let s = ad.config.scale();
        Ok(match (name, &ad.embed_lora, &ad.head_lora) {
            ("model.embed_tokens.weight", Some((a, b)), _) => Some((a.t()?.matmul(&b.t()?)? * s)?),
            ("lm_head.weight", _, Some((a, b))) => Some((b.matmul(a)? * s)?),
            _ => None,
        })
    }

    /// `scale · B · A` (f32 `[out, in]`) and DoRA's magnitude for the block linear `weight_name`
    /// (`….weight`), or `None` when the adapter does not touch it (or there is no adapter).
    pub fn delta(&self, weight_name: &str) -> Result<Option<ModuleDelta>> {
        self.adapter
            .as_ref()
            .map(|a| adapter_delta(a, weight_name.trim_end_matches(".weight")))
            .transpose()
            .map(Option::flatten)
    }
}

/// An exported tensor and the checkpoint tensors whose rows make it (one, or a split
/// checkpoint's parts): `(name, view, file)` each.
#[derive(Debug)]
pub struct Stacked<'v> {
    pub shape: Vec<usize>,
    parts: Vec<(String, TensorView<'v>, String)>,
}

/// Checks that `adapter` fits the model described by `cfg`: every module a Phi-3 block linear of
/// an existing layer, A `[r, in]` and B `[out, r]` of that linear's shape.
pub fn check_adapter(adapter: &PeftAdapter, cfg: &Phi3Config) -> Result<()> {
    if let Some((a, b)) = &adapter.head_lora {
        let r = adapter.config.r;
        ensure!(
            !cfg.tie_word_embeddings,
            "the adapter has a LoRA on lm_head but the base ties its head to the embedding"
        );
        ensure!(
            a.dims() == [r, cfg.hidden_size] && b.dims() == [cfg.vocab_size, r],
            "the adapter's lm_head LoRA is A {:?}, B {:?}, not [{r}, {}] and [{}, {r}]",
            a.dims(),
            b.dims(),
            cfg.hidden_size,
            cfg.vocab_size
        );
    }
    if let Some((a, b)) = &adapter.embed_lora {
        let r = adapter.config.r;
        ensure!(
            a.dims() == [r, cfg.vocab_size] && b.dims() == [cfg.hidden_size, r],
            "the adapter's embedding LoRA is A {:?}, B {:?}, not [{r}, {}] and [{}, {r}]",
            a.dims(),
            b.dims(),
            cfg.vocab_size,
            cfg.hidden_size
        );
    }
    if let Some((ids, rows)) = &adapter.tokens {
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            bail!(
                "the adapter trains token {bad}, past the base's {} embedding rows",
                cfg.vocab_size
            );
        }
        ensure!(
            rows.dims() == [ids.len(), cfg.hidden_size],
            "the adapter's token rows are {:?}, not [{}, {}]",
            rows.dims(),
            ids.len(),
            cfg.hidden_size
        );
    }
    for (path, t) in &adapter.modules {
        ensure!(
            t.dims() == [cfg.vocab_size, cfg.hidden_size],
            "the adapter's `{path}` copy is {:?}, not the base's [{}, {}]",
            t.dims(),
            cfg.vocab_size,
            cfg.hidden_size
        );
        ensure!(
            !(cfg.tie_word_embeddings && path == "lm_head"),
            "the adapter has an `lm_head` copy but the base ties its head to the embedding"
        );
    }
    for (module, w) in &adapter.weights {
        let (a, b) = (&w.a, &w.b);
        let (layer, target) = names::block_linear(&format!("{module}.weight"))
            .with_context(|| format!("adapter module `{module}` is not a Phi-3 block linear"))?;
        ensure!(
            layer < cfg.num_hidden_layers,
            "adapter module `{module}`: the base has {} layers",
            cfg.num_hidden_layers
        );
        let [o, i] = cfg.linear_shape(target).with_context(|| {
            format!(
                "adapter module `{module}`: the base (model_type `{}`) has no `{target}`",
                cfg.model_type
            )
        })?;
        ensure!(
            a.dims() == [adapter.config.r, i] && b.dims() == [o, adapter.config.r],
            "adapter module `{module}`: A {:?} and B {:?} do not fit the base's [{o}, {i}] (an adapter for another model?)",
            a.dims(),
            b.dims()
        );
        if let Some(m) = &w.magnitude {
            ensure!(
                m.dims() == [o],
                "adapter module `{module}`: its DoRA magnitude {:?} does not fit the base's {o} rows",
                m.dims()
            );
        }
    }
    Ok(())
}

/// What an adapter adds to one linear: `scale · B · A` (f32 `[out, in]`) and, for DoRA, the
/// magnitude its merged rows are rescaled to.
#[derive(Debug, Clone)]
pub struct ModuleDelta {
    pub delta: Tensor,
    pub magnitude: Option<Tensor>,
}

/// [`ModuleDelta`] of `module` (a Hugging Face module path), if the adapter has it. One module's
/// delta is as large as its base weight: compute it when needed, drop it after.
pub fn adapter_delta(adapter: &PeftAdapter, module: &str) -> Result<Option<ModuleDelta>> {
    let Some(w) = adapter.weights.get(module) else {
        return Ok(None);
    };
    Ok(Some(ModuleDelta {
        delta: (w.b.matmul(&w.a)? * adapter.config.scale())?,
        magnitude: w.magnitude.clone(),
    }))
}

/// The merged f32 values of block linear `name` (`[out, in]` from the checkpoint `view`), with
/// the adapter's delta for it if any (DoRA: each merged row then rescaled to its magnitude).
pub fn merged_linear(
    name: &str,
    view: &::safetensors::tensor::TensorView<'_>,
    file: &str,
    bnb: Option<Quantized>,
    base: MergeBase,
    delta: Option<&ModuleDelta>,
) -> Result<Vec<f32>> {
    let (w, shape, src) = match bnb {
        Some(q) => {
            let shape = q.shape.clone();
            (q.dequantize::<f32>()?, shape, q.dtype)
        }
        None => (
            checkpoint::to_f32(view, name, file)?,
            view.shape().to_vec(),
            checkpoint::float_dtype(view.dtype()).context("checked by to_f32")?,
        ),
    };
    let w = match base {
        MergeBase::Original => w,
        MergeBase::Nf4 {
            quant_type,
            blocksize,
            double_quant,
        } => Quantized::quantize(&w, &shape, src, quant_type, blocksize, double_quant)?
            .dequantize::<f32>()?,
    };
    let Some(ModuleDelta {
        delta: d,
        magnitude,
    }) = delta
    else {
        return Ok(w);
    };
    ensure!(
        d.dims() == shape.as_slice(),
        "`{name}`: adapter delta {:?} does not fit the weight's {shape:?}",
        d.dims()
    );
    // In place: the same f32 additions as `w + d`, without a third weight-sized buffer.
    let d: Vec<f32> = d.flatten_all()?.to_vec1()?;
    let mut w = w;
    for (x, y) in w.iter_mut().zip(&d) {
        *x += y;
    }
    if let Some(m) = magnitude {
        let m: Vec<f32> = m.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        let cols = shape[1];
        ensure!(
            m.len() * cols == w.len(),
            "`{name}`: DoRA magnitude of {} rows does not fit the weight's {shape:?}",
            m.len()
        );
        // PEFT's `m / ‖W + ΔW‖_row` in f32 (torch.linalg.norm's f32 result), then the product.
        for (row, &mj) in w.chunks_mut(cols).zip(&m) {
            let norm = row
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                .sqrt() as f32;
            let factor = mj / norm;
            row.iter_mut().for_each(|v| *v *= factor);
        }
    }
    Ok(w)
}

/// The files [`tokenizer_dir`] takes from an adapter's own tokenizer.
pub const ADAPTER_TOKENIZER_FILES: [&str; 2] = ["tokenizer.json", "tokenizer_config.json"];

/// Where to read tokenizer files from: `model_dir` itself, or, when the adapter carries its own
/// tokenizer (`data.add_tokens` extended the vocabulary), a temporary view of `model_dir` (links
/// to its entries) with the adapter's tokenizer.json and tokenizer_config.json in their place.
/// The view lives as long as the returned guard.
pub fn tokenizer_dir(
    model_dir: &std::path::Path,
    adapter: Option<&PeftAdapter>,
) -> Result<(std::path::PathBuf, Option<tempfile::TempDir>)> {
    let Some(own) = adapter.and_then(|a| a.tokenizer_dir()) else {
        return Ok((model_dir.to_path_buf(), None));
    };
    let view = tempfile::tempdir()
        .context("creating a temporary tokenizer directory (set TMPDIR to a roomier place)")?;
    let model_dir = std::fs::canonicalize(model_dir)
        .with_context(|| format!("{}: cannot resolve", model_dir.display()))?;
    for entry in std::fs::read_dir(&model_dir)
        .with_context(|| format!("{}: cannot list", model_dir.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        if ADAPTER_TOKENIZER_FILES.iter().any(|f| name == *f) {
            continue;
        }
        std::os::unix::fs::symlink(entry.path(), view.path().join(&name)).with_context(|| {
            format!("linking {} into the tokenizer view", entry.path().display())
        })?;
    }
    for f in ADAPTER_TOKENIZER_FILES {
        let from = own.join(f);
        if from.is_file() {
            std::fs::copy(&from, view.path().join(f))
                .with_context(|| format!("{}: cannot copy", from.display()))?;
        } else if model_dir.join(f).is_file() {
            std::os::unix::fs::symlink(model_dir.join(f), view.path().join(f))?;
        }
    }
    Ok((view.path().to_path_buf(), Some(view)))
}

/// Refuses an existing output unless `force`.
pub fn check_output(out: &std::path::Path, force: bool) -> Result<()> {
    if out.exists() && !force {
        bail!(
            "{} exists; pass --force to replace it, or choose another --out",
            out.display()
        );
    }
    Ok(())
}
