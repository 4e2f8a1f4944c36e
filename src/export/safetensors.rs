//! The merged model as a Hugging Face checkpoint directory: config.json (without
//! `quantization_config`, `torch_dtype` set), the same shards (and index) as the base, tokenizer and
//! other files copied. Tensors are produced lazily while the file is written (the header needs only
//! shapes and dtypes), each read, merged, encoded and its mapped pages released before the next, so
//! memory holds one tensor at a time, not the model.

use super::{MergeBase, Source, check_output};
use crate::checkpoint::{self, CONFIG_FILE, INDEX_FILE, ShardIndex};
use crate::fsx::{AtomicDir, write_atomic};
use crate::lora::peft::PeftAdapter;
use ::safetensors::tensor::TensorView;
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

/// Writes the merged model into `out`.
pub fn export(
    model_dir: &Path,
    adapter: Option<&PeftAdapter>,
    out: &Path,
    dtype: DType,
    base: MergeBase,
    force: bool,
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
    let lookup = |name: &str| -> Option<TensorView<'_>> {
        headers.iter().find_map(|st| st.tensor(name).ok())
    };
    let tmp = AtomicDir::create_replacing(out, force)?;
    let error = RefCell::new(None);
    let mut weight_map = BTreeMap::new();
    progress.set_length(headers.iter().map(|h| h.len() as u64).sum());
    for (shard, st) in ck.shards.iter().zip(&headers) {
        let mut tensors: Vec<(String, Lazy<'_>)> = Vec::new();
        let mut names_sorted: Vec<&str> = st.names().into_iter().collect();
        names_sorted.sort();
        for name in names_sorted {
            if bnb::is_state_tensor(name) {
                continue;
            }
            let view = st.tensor(name)?;
            let shape = src.shape_of(name, &view, &shard.file, lookup)?;
            let (name_owned, file, src) = (name.to_string(), shard.file.clone(), &src);
            let compute: Box<dyn Fn() -> Result<Vec<f32>>> = Box::new(move || {
                progress.inc(1);
                src.values(&name_owned, &view, &file, base, lookup)
            });
            tensors.push((
                name.to_string(),
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
        let metadata = Some(std::collections::HashMap::from([(
            "format".to_string(),
            "pt".to_string(),
        )]));
        let path = tmp.path().join(&shard.file);
        ::safetensors::serialize_to_file(tensors, metadata, &path)
            .with_context(|| format!("writing {}", path.display()))?;
        if let Some(e) = error.borrow_mut().take() {
            return Err(e.context(format!("computing tensors of {}", shard.file)));
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
    let mut config = ck.config.clone();
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
    tmp.commit()?;
    Ok(())
}
