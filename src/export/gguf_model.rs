//! The merged model as a llama.cpp `phi3` GGUF (v3): llama.cpp's metadata keys, its tensor names
//! (fused `attn_qkv` and `ffn_up` = gate|up), shapes in ggml order, the tokenizer as its converter
//! writes it, each tensor merged and encoded just before it is written.

use super::ftype::{FileType, TypePicker};
use super::gguf::{GgmlType, GgufWriter, TensorSpec, Value, encode};
use super::vocab::write_tokenizer;
use super::{MergeBase, Source, check_output};
use crate::lora::peft::PeftAdapter;
use crate::model::config::RopeScaling;
use crate::model::names;
use anyhow::{Context, Result, bail};
use std::path::Path;

/// Writes the merged model to `out` (a file, written under a temporary name and renamed).
pub fn export(
    model_dir: &Path,
    adapter: Option<&PeftAdapter>,
    out: &Path,
    ty: impl Into<FileType>,
    base: MergeBase,
    force: bool,
    pre: Option<&str>,
) -> Result<()> {
    let ty: FileType = ty.into();
    check_output(out, force)?;
    let src = Source::open(model_dir, adapter)?;
    let (ck, cfg) = (&src.ck, &src.cfg);
    let rope = cfg.rope()?;
    let headers = ck.tensors()?;
    let lookup = |name: &str| headers.iter().find_map(|st| st.tensor(name).ok());

    let mut w = GgufWriter::default();
    let name = model_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "phi3".into());
    w.kv("general.architecture", Value::Str("phi3".into()))?;
    w.kv("general.type", Value::Str("model".into()))?;
    w.kv("general.name", Value::Str(name))?;
    let u = |v: usize| Value::U32(v as u32);
    w.kv("phi3.context_length", u(cfg.max_position_embeddings))?;
    w.kv(
        "phi3.rope.scaling.original_context_length",
        u(cfg
            .original_max_position_embeddings
            .unwrap_or(cfg.max_position_embeddings)),
    )?;
    w.kv("phi3.embedding_length", u(cfg.hidden_size))?;
    w.kv("phi3.feed_forward_length", u(cfg.intermediate_size))?;
    w.kv("phi3.block_count", u(cfg.num_hidden_layers))?;
    w.kv("phi3.attention.head_count", u(cfg.num_attention_heads))?;
    w.kv("phi3.attention.head_count_kv", u(cfg.num_kv_heads()))?;
    w.kv(
        "phi3.attention.layer_norm_rms_epsilon",
        Value::F32(cfg.rms_norm_eps as f32),
    )?;
    // The rotated dims of a head (Phi-4-mini: 96 of 128), as the converter's
    // int(partial_rotary_factor * n_embd) // n_head.
    w.kv("phi3.rope.dimension_count", u(rope.rotary_dim))?;
    w.kv("phi3.rope.freq_base", Value::F32(rope.theta as f32))?;
    // The converter writes 0 for no window (how llama.cpp tells Phi-4 from Phi-3).
    w.kv(
        "phi3.attention.sliding_window",
        u(cfg.sliding_window.unwrap_or(0)),
    )?;
    w.kv("general.file_type", Value::U32(ty.id()))?;
    // Longrope (128k models): the attention factor, and both factor sets as f32 tensors that
    // llama.cpp picks between by context length.
    if let RopeScaling::LongRope {
        short_factor,
        long_factor,
        attention_factor,
        ..
    } = &rope.scaling
    {
        w.kv(
            "phi3.rope.scaling.attn_factor",
            Value::F32(*attention_factor as f32),
        )?;
        let f32_ty = GgmlType::parse("f32")?;
        for (name, factors) in [
            ("rope_factors_long.weight", long_factor),
            ("rope_factors_short.weight", short_factor),
        ] {
            let values: Vec<f32> = factors.iter().map(|f| *f as f32).collect();
            let n = values.len();
            w.tensor(TensorSpec {
                name: name.into(),
                shape: vec![n],
                ty: f32_ty,
                produce: Box::new(move || encode(&values, &[n], f32_ty)),
            })?;
        }
    }

    // The adapter's own tokenizer when it extended the vocabulary (data.add_tokens).
    let (tok_dir, _view) = super::tokenizer_dir(model_dir, adapter)?;
    write_tokenizer(&mut w, &tok_dir, cfg, pre)?;
    w.kv("general.quantization_version", Value::U32(2))?;

    // Tensors in llama.cpp's order: embeddings, blocks, final norm, head.
    let mut hf_names: Vec<String> = names::GGUF_TOP_NAMES[..1]
        .iter()
        .map(|(h, _)| h.to_string())
        .collect();
    for l in 0..cfg.num_hidden_layers {
        hf_names.extend(
            names::GGUF_BLOCK_NAMES
                .iter()
                .map(|(h, _)| format!("{}{l}.{h}", names::LAYER_PREFIX)),
        );
    }
    hf_names.push("model.norm.weight".into());
    // A tied head (Phi-4-mini) has no lm_head.weight; like the converter we then write no
    // `output.weight`, and llama.cpp uses token_embd.
    let has_output = lookup("lm_head.weight").is_some();
    if has_output {
        hf_names.push("lm_head.weight".into());
    } else if !cfg.tie_word_embeddings {
        bail!(
            "{}: no `lm_head.weight` and tie_word_embeddings is false",
            model_dir.display()
        );
    }
    let mut picker = TypePicker::new(ty, cfg.num_hidden_layers, has_output);
    // Declared from shapes alone (a 4-bit weight's from its quant state); each tensor is read,
    // merged and encoded only when the writer reaches it, and its mapped pages are dropped then.
    for hf in &hf_names {
        let gguf = names::gguf_name(hf).context("named in the table")?;
        // A split checkpoint's parts, stacked by rows into llama.cpp's fused tensor.
        let stacked = src.stack(src.parts_of(hf), &headers)?;
        let shape = stacked.shape.clone();
        let tensor_ty = picker.pick(&gguf, &shape);
        let (shape2, src, headers) = (shape.clone(), &src, &headers);
        w.tensor(TensorSpec {
            name: gguf,
            shape,
            ty: tensor_ty,
            produce: Box::new(move || {
                let values = src.stacked_values(&stacked, base, headers)?;
                encode(&values, &shape2, tensor_ty)
            }),
        })?;
    }
    write_file(w, out)
}

/// Writes `w` to `out` through a temporary sibling and a rename (nothing half-written remains);
/// a file its filesystem has no room for is not started (the size is known from the header).
pub fn write_file(w: GgufWriter<'_>, out: &Path) -> Result<()> {
    let n_bytes = w.file_bytes()?;
    crate::fsx::disk::ensure_room(out, n_bytes)?;
    crate::fsx::disk::write_with(out, Some(n_bytes), |f| w.write(f))
}
