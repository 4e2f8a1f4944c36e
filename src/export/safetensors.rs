//! The merged model as a Hugging Face checkpoint directory: config.json (without
//! `quantization_config`, `torch_dtype` set), the same shards (and index) as the base, tokenizer and
//! other files copied. Tensors are produced lazily while the file is written (the header needs only
//! shapes and dtypes), each read, merged, encoded and its mapped pages released before the next, so
//! memory holds one tensor at a time, not the model.

use super::{MergeBase, Source, check_output};
use crate::checkpoint::{self, CONFIG_FILE, INDEX_FILE, ShardIndex};
use crate::fsx::{AtomicDir, write_atomic};
use crate::lora::peft::PeftAdapter;
use crate::model::names;
use anyhow::{Context, Result};
use candle_core::DType;
use indicatif::ProgressBar;
use qlora_quant::bnb;
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;

/// A tensor whose bytes are computed when the writer asks for them.
struct Lazy<'a> {
    dtype: ::safetensors::Dtype,
    shape: Vec<usize>,
    compute: Box<dyn Fn() -> Result<Vec<f32>> + 'a>,
    /// The first error, reported after the write (the View trait cannot fail).
    error: &'a RefCell<Option<anyhow::Error>>,
}

fn encode(values: &[f32], dtype: ::safetensors::Dtype) -> Vec<u8> {
    match dtype {
        ::safetensors::Dtype::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        ::safetensors::Dtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

impl ::safetensors::View for Lazy<'_> {
    fn dtype(&self) -> ::safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match (self.compute)() {
            Ok(v) => Cow::Owned(encode(&v, self.dtype)),
            Err(e) => {
                self.error.borrow_mut().get_or_insert(e);
                Cow::Owned(vec![0u8; self.data_len()])
            }
        }
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Writes the merged model into `out`. With `fuse`, a split ("llamafied") checkpoint is written in
/// Microsoft's layout: `qkv_proj` and `gate_up_proj` stacked from their parts, config.json a
/// Phi-3 one ([`phi3_config`]).
#[allow(clippy::too_many_arguments)]
pub fn export(
    model_dir: &Path,
    adapter: Option<&PeftAdapter>,
    out: &Path,
    dtype: DType,
    base: MergeBase,
    force: bool,
    fuse: bool,
    progress: &ProgressBar,
) -> Result<()> {
    check_output(out, force)?;
    let src = Source::open(model_dir, adapter)?;
    let ck = &src.ck;
    let st_dtype: ::safetensors::Dtype = match dtype {
        DType::BF16 => ::safetensors::Dtype::BF16,
        DType::F16 => ::safetensors::Dtype::F16,
        _ => ::safetensors::Dtype::F32,
    };
    let headers = ck.tensors()?;
    let split = src.cfg.layout() == names::Layout::Split;
    let tmp = AtomicDir::create_replacing(out, force)?;
    let error = RefCell::new(None);
    let mut weight_map = BTreeMap::new();
    progress.set_length(headers.iter().map(|h| h.len() as u64).sum());
    // Every shard's tensors (lazily computed) first, so the whole export's size is known and a
    // filesystem without room for it is told before anything is written.
    let mut shards: Vec<(&str, Vec<(String, Lazy<'_>)>)> = Vec::new();
    for (shard, st) in ck.shards.iter().zip(&headers) {
        let mut tensors: Vec<(String, Lazy<'_>)> = Vec::new();
        let mut names_sorted: Vec<&str> = st.names().into_iter().collect();
        names_sorted.sort();
        for name in names_sorted {
            if bnb::is_state_tensor(name) {
                continue;
            }
            // Fusing: a fused linear is written where its first part is, the other parts skipped.
            let (out_name, parts) = match names::block_linear(name) {
                Some((layer, target)) if fuse && split => {
                    let Some(fused) = names::fused_of(target) else {
                        unreachable!("every split target has a fused one")
                    };
                    if names::split_parts(fused)[0] != target {
                        continue;
                    }
                    let suffix = names::Layout::Fused.suffix(fused).expect("a fused target");
                    let out = format!("{}{layer}.{suffix}.weight", names::LAYER_PREFIX);
                    let parts = src.parts_of(&out);
                    (out, parts)
                }
                _ => (name.to_string(), vec![name.to_string()]),
            };
            let stacked = src.stack(parts, &headers)?;
            let shape = stacked.shape.clone();
            let (src, headers) = (&src, &headers);
            let compute: Box<dyn Fn() -> Result<Vec<f32>>> = Box::new(move || {
                progress.inc(1);
                src.stacked_values(&stacked, base, headers)
            });
            tensors.push((
                out_name,
                Lazy {
                    dtype: st_dtype,
                    shape,
                    compute,
                    error: &error,
                },
            ));
        }
        for (n, _) in &tensors {
            weight_map.insert(n.clone(), shard.file.clone());
        }
        shards.push((shard.file.as_str(), tensors));
    }
    let metadata = || {
        Some(std::collections::HashMap::from([(
            "format".to_string(),
            "pt".to_string(),
        )]))
    };
    let mut n_bytes = 0;
    for (_, tensors) in &shards {
        let specs: Vec<_> = tensors
            .iter()
            .map(|(n, t)| {
                (
                    n.as_str(),
                    t.dtype,
                    t.shape.as_slice(),
                    ::safetensors::View::data_len(t),
                )
            })
            .collect();
        n_bytes += crate::fsx::st::header(&specs, metadata())?.2;
    }
    crate::fsx::disk::ensure_room(out, n_bytes)?;
    for (file, tensors) in shards {
        let path = tmp.path().join(file);
        crate::fsx::st::save(&path, tensors, metadata())?;
        if let Some(e) = error.borrow_mut().take() {
            return Err(e.context(format!("computing tensors of {file}")));
        }
    }
    if ck.index.is_some() {
        let index = ShardIndex {
            metadata: serde_json::Map::new(),
            weight_map,
        };
        write_atomic(
            &tmp.path().join(INDEX_FILE),
            &serde_json::to_vec_pretty(&index)?,
        )?;
    }
    let mut config = if fuse && split {
        phi3_config(&ck.config)
    } else {
        ck.config.clone()
    };
    if let Some(obj) = config.as_object_mut() {
        obj.remove("quantization_config");
        obj.insert(
            "torch_dtype".into(),
            qlora_quant::bnb::torch_dtype_name(dtype).into(),
        );
    }
    write_atomic(
        &tmp.path().join(CONFIG_FILE),
        &serde_json::to_vec_pretty(&config)?,
    )?;
    checkpoint::copy_other_files(ck, tmp.path())?;
    // An adapter that extended the vocabulary (data.add_tokens) brings its tokenizer.
    if let Some(own) = adapter.and_then(|a| a.tokenizer_dir()) {
        for f in super::ADAPTER_TOKENIZER_FILES {
            if own.join(f).is_file() {
                let bytes = std::fs::read(own.join(f))
                    .with_context(|| format!("{}: cannot read", own.join(f).display()))?;
                write_atomic(&tmp.path().join(f), &bytes)?;
            }
        }
    }
    tmp.commit()?;
    Ok(())
}

/// A split checkpoint's config.json as Microsoft's Phi-3 one: `model_type` phi3,
/// `Phi3ForCausalLM`, the Llama/Mistral-only keys dropped, every other key kept (a Llama config
/// had no sliding window: `sliding_window` null then).
pub fn phi3_config(config: &serde_json::Value) -> serde_json::Value {
    let mut c = config.clone();
    if let Some(obj) = c.as_object_mut() {
        let was_llama = obj.get("model_type").and_then(|v| v.as_str()) == Some("llama");
        obj.insert("model_type".into(), crate::model::config::MODEL_TYPE.into());
        obj.insert(
            "architectures".into(),
            serde_json::json!(["Phi3ForCausalLM"]),
        );
        for k in [
            "attention_bias",
            "mlp_bias",
            "head_dim",
            "pretraining_tp",
            "auto_map",
        ] {
            obj.remove(k);
        }
        if was_llama {
            obj.insert("sliding_window".into(), serde_json::Value::Null);
        }
    }
    c
}
