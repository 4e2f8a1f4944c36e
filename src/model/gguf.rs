//! A [`Phi3`] built from a llama.cpp `phi3` GGUF, the engine `qlora verify` runs GGUF exports on.
//! Every hyperparameter comes from the file's metadata, read as llama.cpp's phi3 loader reads it
//! (`llama-model.cpp` `load_hparams`, `models/phi3.cpp`; COMPAT.md §4.6), never from a config.json,
//! so metadata that disagrees with the trained model shows in the logits:
//!
//! - required: `phi3.context_length`, `.embedding_length`, `.feed_forward_length`, `.block_count`,
//!   `.attention.head_count`, `.attention.layer_norm_rms_epsilon`;
//! - optional as in llama.cpp: `.attention.head_count_kv` (the heads), `.rope.freq_base` (10000),
//!   `.rope.dimension_count` (the head: partial rotary when fewer), `.rope.scaling.attn_factor`
//!   (1), `.rope.scaling.original_context_length` (the context length),
//!   `.attention.sliding_window` (0: none);
//! - tensors `rope_factors_long.weight` / `rope_factors_short.weight` (`[n_rot / 2]`, longrope);
//!   no `output.weight` means the head is `token_embd.weight` (tied).
//!
//! Each tensor is dequantized to f32 with candle's GGML types and renamed back to the Hugging Face
//! name the exporter wrote it from ([`names::hf_name`]); `attn_q`/`attn_k`/`attn_v`, which llama.cpp
//! also accepts, are stacked into `qkv_proj`'s rows. A tensor the model does not use, a missing one
//! or one of another shape than the metadata implies is an error, as in llama.cpp's loader.
//!
//! Two choices differ from llama.cpp, both to compute what the trained model computes
//! (transformers): longrope takes the long factors once a sequence is longer than the original
//! context (llama.cpp decides by the context size it is run with; the two agree for contexts up to
//! `original_context_length`), and the sliding window is applied (llama.cpp currently disables
//! Phi's window; the two agree for sequences up to the window).

use super::config::{Phi3Config, RopeConfig, RopeScaling};
use super::linear::BaseWeight;
use super::names;
use super::phi3::{Block, OpPath, Phi3};
use crate::export::gguf_read::{GgufHeader, MetaValue, read_header};
use crate::lora::LoraLinear;
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Why a GGUF cannot be run as a Phi-3.
#[derive(Debug, thiserror::Error)]
pub enum GgufModelError {
    #[error(
        "{path}: general.architecture is `{arch}`; `qlora verify` runs `phi3` GGUFs (Phi-3, Phi-3.5, Phi-4, Phi-4-mini)"
    )]
    Architecture { path: PathBuf, arch: String },
    #[error(
        "{path}: no `{key}`, which llama.cpp requires for phi3; re-export the file with `qlora export`"
    )]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: `{key}` is {value}, {want}")]
    BadKey {
        path: PathBuf,
        key: String,
        value: String,
        want: String,
    },
    #[error("{path}: no tensor `{name}`, which the phi3 metadata implies")]
    MissingTensor { path: PathBuf, name: String },
    #[error(
        "{path}: tensor `{name}` has shape {got:?} (PyTorch order), the phi3 metadata implies {want:?}"
    )]
    Shape {
        path: PathBuf,
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("{path}: tensors a phi3 model does not have (llama.cpp refuses them too): {names:?}")]
    Unused { path: PathBuf, names: Vec<String> },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("{path}: reading tensor `{name}`: {cause}")]
    Read {
        path: PathBuf,
        name: String,
        cause: Box<candle_core::Error>,
    },
}

type Result<T> = std::result::Result<T, GgufModelError>;

/// The GGUF's metadata, read with the file's path for errors.
struct Meta<'a> {
    h: &'a GgufHeader,
    path: &'a Path,
}

impl Meta<'_> {
    fn bad(&self, key: &str, value: impl std::fmt::Display, want: &str) -> GgufModelError {
        GgufModelError::BadKey {
            path: self.path.into(),
            key: key.into(),
            value: value.to_string(),
            want: want.into(),
        }
    }

    /// An unsigned integer key, if present (any other type is an error).
    fn u(&self, key: &str) -> Result<Option<usize>> {
        match self.h.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.bad(key, v.to_json(), "want an unsigned integer")),
        }
    }

    fn u_req(&self, key: &str) -> Result<usize> {
        self.u(key)?.ok_or_else(|| GgufModelError::MissingKey {
            path: self.path.into(),
            key: key.into(),
        })
    }

    /// A float key, if present.
    fn f(&self, key: &str) -> Result<Option<f64>> {
        match self.h.get(key) {
            None => Ok(None),
            Some(MetaValue::F32(x)) => Ok(Some(*x as f64)),
            Some(MetaValue::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(self.bad(key, v.to_json(), "want a float")),
        }
    }

    fn positive(&self, key: &str, default: Option<f64>) -> Result<f64> {
        let v = match (self.f(key)?, default) {
            (Some(v), _) | (None, Some(v)) => v,
            (None, None) => {
                return Err(GgufModelError::MissingKey {
                    path: self.path.into(),
                    key: key.into(),
                });
            }
        };
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(self.bad(key, v, "want a positive number"))
        }
    }
}

/// The model the GGUF at `path` describes, in f32 on the CPU.
pub fn load(path: &Path) -> anyhow::Result<Phi3> {
    let header = read_header(path)?;
    Ok(load_with_header(path, &header)?)
}

fn load_with_header(path: &Path, header: &GgufHeader) -> Result<Phi3> {
    let m = Meta { h: header, path };
    let arch = header
        .get("general.architecture")
        .map(|v| v.to_json().as_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    if arch != "phi3" {
        return Err(GgufModelError::Architecture {
            path: path.into(),
            arch,
        });
    }
    let hidden = m.u_req("phi3.embedding_length")?;
    let heads = m.u_req("phi3.attention.head_count")?;
    let layers = m.u_req("phi3.block_count")?;
    let ctx = m.u_req("phi3.context_length")?;
    let ff = m.u_req("phi3.feed_forward_length")?;
    let eps = m
        .f("phi3.attention.layer_norm_rms_epsilon")?
        .ok_or_else(|| GgufModelError::MissingKey {
            path: path.into(),
            key: "phi3.attention.layer_norm_rms_epsilon".into(),
        })?;
    let kv_heads = m.u("phi3.attention.head_count_kv")?.unwrap_or(heads);
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(m.bad(
            "phi3.attention.head_count",
            heads,
            &format!("not a divisor of embedding_length {hidden}"),
        ));
    }
    let head_dim = hidden / heads;
    // Our model has llama.cpp's default head size only.
    for key in ["phi3.attention.key_length", "phi3.attention.value_length"] {
        if let Some(d) = m.u(key)?
            && d != head_dim
        {
            return Err(m.bad(
                key,
                d,
                &format!("a Phi-3 head has embedding_length / head_count = {head_dim}"),
            ));
        }
    }
    let n_rot = m.u("phi3.rope.dimension_count")?.unwrap_or(head_dim);
    if n_rot < 2 || !n_rot.is_multiple_of(2) || n_rot > head_dim {
        return Err(m.bad(
            "phi3.rope.dimension_count",
            n_rot,
            &format!("want an even number of rotated dims in 2..={head_dim}"),
        ));
    }
    let theta = m.positive("phi3.rope.freq_base", Some(10000.0))?;
    // Linear or YaRN position scaling (no Phi model uses it) would be another function.
    if let Some(factor) = m.f("phi3.rope.scaling.factor")?
        && factor != 0.0
        && factor != 1.0
    {
        return Err(m.bad(
            "phi3.rope.scaling.factor",
            factor,
            "Phi-3 models scale rope by longrope factor tensors only",
        ));
    }
    if let Some(MetaValue::Str(t)) = header.get("phi3.rope.scaling.type")
        && !["none", "linear", "longrope"].contains(&t.as_str())
    {
        return Err(m.bad(
            "phi3.rope.scaling.type",
            t,
            "Phi-3 models use no rope scaling type (longrope comes as factor tensors)",
        ));
    }
    let window = m.u("phi3.attention.sliding_window")?.filter(|&w| w > 0);
    let original = m
        .u("phi3.rope.scaling.original_context_length")?
        .unwrap_or(ctx);
    let attn_factor = m.positive("phi3.rope.scaling.attn_factor", Some(1.0))?;

    let mut file = std::fs::File::open(path).map_err(|e| GgufModelError::Invalid {
        path: path.into(),
        what: format!("cannot open: {e}"),
    })?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| GgufModelError::Invalid {
        path: path.into(),
        what: format!("candle cannot read it as GGUF: {e}"),
    })?;
    let read = |name: &str, want: &[usize]| -> Result<Tensor> {
        let info = content
            .tensor_infos
            .get(name)
            .ok_or_else(|| GgufModelError::MissingTensor {
                path: path.into(),
                name: name.into(),
            })?;
        let got = info.shape.dims().to_vec();
        if got != want {
            return Err(GgufModelError::Shape {
                path: path.into(),
                name: name.into(),
                got,
                want: want.to_vec(),
            });
        }
        let mut file = std::fs::File::open(path).map_err(|e| GgufModelError::Invalid {
            path: path.into(),
            what: format!("cannot open: {e}"),
        })?;
        content
            .tensor(&mut file, name, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| GgufModelError::Read {
                path: path.into(),
                name: name.into(),
                cause: Box::new(e),
            })
    };
    let missing = |name: &str| GgufModelError::MissingTensor {
        path: path.into(),
        name: name.into(),
    };

    // The rows of the embedding are the vocabulary (llama.cpp checks them against the token list).
    let vocab = content
        .tensor_infos
        .get("token_embd.weight")
        .map(|i| i.shape.dims().first().copied().unwrap_or(0))
        .ok_or_else(|| missing("token_embd.weight"))?;
    if let Some(MetaValue::Array(tokens)) = header.get("tokenizer.ggml.tokens")
        && tokens.len() != vocab
    {
        return Err(m.bad(
            "tokenizer.ggml.tokens",
            format!("a list of {}", tokens.len()),
            &format!("token_embd.weight has {vocab} rows"),
        ));
    }
    // Hyperparameters checked as config.json's are (sizes, heads, eps), partial rotary set below.
    let cfg = Phi3Config::from_value(
        &serde_json::json!({
            "model_type": "phi3", "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": ff, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "rms_norm_eps": eps, "rope_theta": theta,
            "max_position_embeddings": ctx, "original_max_position_embeddings": original,
            "sliding_window": window, "tie_word_embeddings": !content.tensor_infos.contains_key("output.weight"),
        }),
        &format!("{} (phi3.* metadata)", path.display()),
    )
    .map_err(|e| GgufModelError::Invalid {
        path: path.into(),
        what: format!("{e:#}"),
    })?;

    let factors = |name: &str| -> Result<Option<Vec<f64>>> {
        if !content.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        let v: Vec<f32> =
            read(name, &[n_rot / 2])?
                .to_vec1()
                .map_err(|e| GgufModelError::Read {
                    path: path.into(),
                    name: name.into(),
                    cause: Box::new(e),
                })?;
        if v.iter().all(|x| x.is_finite() && *x > 0.0) {
            Ok(Some(v.into_iter().map(f64::from).collect()))
        } else {
            Err(GgufModelError::Invalid {
                path: path.into(),
                what: format!("`{name}` holds a factor that is not a positive number"),
            })
        }
    };
    let long = factors("rope_factors_long.weight")?;
    let short = factors("rope_factors_short.weight")?;
    // Without factor tensors llama.cpp still scales cos/sin by attn_factor: longrope with unit
    // factors is that function.
    let scaling = match (long, short) {
        (None, None) if attn_factor == 1.0 => RopeScaling::None,
        (None, None) => RopeScaling::LongRope {
            short_factor: vec![1.0; n_rot / 2],
            long_factor: vec![1.0; n_rot / 2],
            original_max: original,
            attention_factor: attn_factor,
        },
        (Some(long_factor), Some(short_factor)) => RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max: original,
            attention_factor: attn_factor,
        },
        (l, _) => {
            return Err(missing(if l.is_some() {
                "rope_factors_short.weight"
            } else {
                "rope_factors_long.weight"
            }));
        }
    };
    let rope = RopeConfig {
        theta,
        head_dim,
        rotary_dim: n_rot,
        scaling,
    };

    // Every tensor of the file by the Hugging Face name the exporter wrote it from; what no
    // name maps back to must be a rope factor or a split projection, else the file is not phi3.
    let (q_rows, kv_rows) = (heads * head_dim, kv_heads * head_dim);
    let want = |hf: &str| -> Vec<usize> {
        let suffix = hf
            .strip_prefix(names::LAYER_PREFIX)
            .and_then(|r| r.split_once('.'))
            .map_or(hf, |(_, s)| s);
        match suffix {
            "model.embed_tokens.weight" | "lm_head.weight" => vec![vocab, hidden],
            "self_attn.qkv_proj.weight" => vec![q_rows + 2 * kv_rows, hidden],
            "self_attn.o_proj.weight" => vec![hidden, q_rows],
            "mlp.gate_up_proj.weight" => vec![2 * ff, hidden],
            "mlp.down_proj.weight" => vec![hidden, ff],
            _ => vec![hidden],
        }
    };
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    let mut split: HashMap<String, Tensor> = HashMap::new();
    let mut unused = Vec::new();
    let mut names_in_file: Vec<&String> = content.tensor_infos.keys().collect();
    names_in_file.sort();
    for gguf in names_in_file {
        if let Some(hf) = names::hf_name(gguf) {
            let t = read(gguf, &want(&hf))?;
            weights.insert(hf, t);
            continue;
        }
        // llama.cpp also reads the projections apart (`attn_q`, `attn_k`, `attn_v`).
        let part = gguf
            .strip_prefix("blk.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(l, s)| Some((l.parse::<usize>().ok()?, s)));
        match part {
            Some((l, s))
                if l < layers
                    && ["attn_q.weight", "attn_k.weight", "attn_v.weight"].contains(&s) =>
            {
                let rows = if s == "attn_q.weight" {
                    q_rows
                } else {
                    kv_rows
                };
                split.insert(gguf.clone(), read(gguf, &[rows, hidden])?);
            }
            // Read and checked above.
            _ if gguf == "rope_factors_long.weight" || gguf == "rope_factors_short.weight" => {}
            _ => unused.push(gguf.clone()),
        }
    }
    if !unused.is_empty() {
        return Err(GgufModelError::Unused {
            path: path.into(),
            names: unused,
        });
    }
    let mut get = |hf: String| -> Result<Tensor> {
        if let Some(t) = weights.remove(&hf) {
            return Ok(t);
        }
        let gguf = names::gguf_name(&hf).expect("a name of the table");
        // qkv_proj from its parts: rows Q | K | V.
        if let Some(blk) = gguf.strip_suffix(".attn_qkv.weight") {
            let parts: Vec<Tensor> = ["attn_q", "attn_k", "attn_v"]
                .iter()
                .filter_map(|p| split.remove(&format!("{blk}.{p}.weight")))
                .collect();
            if parts.len() == 3 {
                return Tensor::cat(&parts, 0).map_err(|e| GgufModelError::Read {
                    path: path.into(),
                    name: gguf.clone(),
                    cause: Box::new(e),
                });
            }
        }
        Err(missing(&gguf))
    };
    let lin = |t: Tensor| LoraLinear {
        base: BaseWeight::Dense(t),
        adapter: None,
    };
    let mut blocks = Vec::with_capacity(layers);
    for l in 0..layers {
        let p = |s: &str| format!("{}{l}.{s}", names::LAYER_PREFIX);
        blocks.push(Block {
            input_layernorm: get(p("input_layernorm.weight"))?,
            qkv: vec![("qkv_proj", lin(get(p("self_attn.qkv_proj.weight"))?))],
            o_proj: lin(get(p("self_attn.o_proj.weight"))?),
            post_attention_layernorm: get(p("post_attention_layernorm.weight"))?,
            gate_up: vec![("gate_up_proj", lin(get(p("mlp.gate_up_proj.weight"))?))],
            down_proj: lin(get(p("mlp.down_proj.weight"))?),
        });
    }
    let embed_tokens = get("model.embed_tokens.weight".into())?;
    let norm = get("model.norm.weight".into())?;
    let lm_head = if cfg.tie_word_embeddings {
        embed_tokens.clone()
    } else {
        get("lm_head.weight".into())?
    };
    // Blocks past block_count, projections both fused and apart: not this model's.
    let mut left: Vec<String> = weights
        .keys()
        .filter_map(|hf| names::gguf_name(hf))
        .chain(split.keys().cloned())
        .collect();
    if !left.is_empty() {
        left.sort();
        return Err(GgufModelError::Unused {
            path: path.into(),
            names: left,
        });
    }
    Ok(Phi3 {
        cfg,
        rope,
        embed_tokens,
        layers: blocks,
        norm,
        lm_head,
        dtype: DType::F32,
        device: Device::Cpu,
        ops: OpPath::for_device(&Device::Cpu, DType::F32),
        saved: Default::default(),
    })
}
