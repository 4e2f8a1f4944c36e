//! The adapter alone as a llama.cpp LoRA GGUF (`general.type = "adapter"`, `adapter.type = "lora"`):
//! tensors `<gguf base name>.lora_a` (A `[r, in]`, ggml `ne = [in, r]`) and `.lora_b` (B `[out, r]`,
//! `ne = [r, out]`), no norms, embeddings or rope tensors. llama.cpp scales by
//! `adapter.lora.alpha / r` with r read from lora_b, so alpha is written as `scale · r`: rsLoRA's
//! α/√r survives (llama.cpp's own converter copies α verbatim and loses it).

use super::gguf::{GgmlType, GgufWriter, TensorSpec, Value, encode};
use super::{check_adapter, check_output};
use crate::checkpoint::CONFIG_FILE;
use crate::lora::peft::PeftAdapter;
use crate::model::names::Layout;
use crate::model::{Phi3Config, names};
use anyhow::{Context, Result, bail};
use std::path::Path;

/// Writes `adapter` (for the base in `model_dir`) to `out`.
pub fn export(
    model_dir: &Path,
    adapter: &PeftAdapter,
    out: &Path,
    ty: GgmlType,
    force: bool,
) -> Result<()> {
    check_output(out, force)?;
    let cfg_path = model_dir.join(CONFIG_FILE);
    let value: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&cfg_path)
            .with_context(|| format!("{}: cannot read", cfg_path.display()))?,
    )
    .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
    let cfg = Phi3Config::from_value(&value, &cfg_path.display().to_string())?;
    // llama.cpp's phi3 graph has the fused tensors: a split adapter is fused first (exactly).
    if adapter.config.use_dora {
        bail!(
            "a DoRA adapter (use_dora) cannot be written as a LoRA GGUF: llama.cpp applies \
             `scale · B · A` only and has no place for DoRA's per-row magnitude. Export the merged \
             model instead (`qlora export --format gguf`), which merges the magnitude exactly"
        );
    }
    if adapter.tokens.is_some() {
        bail!(
            "the adapter trains rows of the embedding (trainable_token_indices), which a llama.cpp \
             LoRA GGUF cannot carry (it holds A and B matrices only). Export the merged model \
             instead (`qlora export --format gguf`)"
        );
    }
    if !adapter.modules.is_empty() {
        bail!(
            "the adapter holds full copies of {:?} (modules_to_save), which a llama.cpp LoRA GGUF \
             cannot carry (it holds A and B matrices only). Export the merged model instead \
             (`qlora export --format gguf`)",
            adapter.config.modules_to_save
        );
    }
    let fused = crate::lora::convert::to_layout(adapter, &cfg, Layout::Fused)?;
    let adapter = &fused;
    let mut fused_cfg = cfg.clone();
    fused_cfg.model_type = crate::model::config::MODEL_TYPE.into();
    check_adapter(adapter, &fused_cfg)?;
    let mut w = GgufWriter::default();
    w.kv("general.architecture", Value::Str("phi3".into()))?;
    w.kv("general.type", Value::Str("adapter".into()))?;
    w.kv("adapter.type", Value::Str("lora".into()))?;
    let r = adapter.config.r as f64;
    w.kv(
        "adapter.lora.alpha",
        Value::F32((adapter.config.scale() * r) as f32),
    )?;
    w.kv("general.quantization_version", Value::U32(2))?;
    // The embedding's LoRA as llama.cpp's converter writes it: `token_embd.weight.lora_a` is
    // `Aᵀ` (`[V, r]`; llama.cpp gathers its rows by token), `lora_b` is `B` (`[H, r]`).
    let embed = match &adapter.embed_lora {
        Some((a, b)) => Some((
            "token_embd.weight".to_string(),
            a.t()?.contiguous()?,
            b.clone(),
        )),
        None => None,
    };
    let head = adapter
        .head_lora
        .as_ref()
        .map(|(a, b)| ("output.weight".to_string(), a.clone(), b.clone()));
    let blocks = adapter.weights.iter().map(|(module, mw)| -> Result<_> {
        let gguf = names::gguf_name(&format!("{module}.weight"))
            .with_context(|| format!("`{module}` has no GGUF name"))?;
        Ok((gguf, mw.a.clone(), mw.b.clone()))
    });
    for item in embed.into_iter().chain(head).map(Ok).chain(blocks) {
        let (gguf, a, b) = item?;
        for (suffix, t) in [("lora_a", &a), ("lora_b", &b)] {
            let shape = t.dims().to_vec();
            let t = t.clone(); // shares the storage; flattened to f32 only when written
            let tensor_ty = if ty.block_elems() > 1 && shape[1] % ty.block_elems() != 0 {
                GgmlType::parse("f32")?
            } else {
                ty
            };
            let shape2 = shape.clone();
            w.tensor(TensorSpec {
                name: format!("{gguf}.{suffix}"),
                shape,
                ty: tensor_ty,
                produce: Box::new(move || {
                    let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
                    encode(&values, &shape2, tensor_ty)
                }),
            })?;
        }
    }
    super::gguf_model::write_file(w, out)
}
