//! Building a [`Phi3`] from a Hugging Face checkpoint directory: dense (any float dtype, cast to the
//! compute dtype), quantized to NF4 on load (`--4bit`, from the checkpoint's own dtype), or a
//! bitsandbytes-4bit checkpoint loaded straight into NF4 without a dense round trip.

use super::config::Phi3Config;
use super::linear::BaseWeight;
use super::names;
use super::phi3::{Block, OpPath, Phi3};
use crate::checkpoint::{self, CONFIG_FILE, Checkpoint};
use crate::lora::LoraLinear;
use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device, Tensor};
use qlora_quant::bnb::{self, QuantizationConfig};
use qlora_quant::{Blocksize, Nf4Tensor, QuantType, Quantized};
use safetensors::tensor::TensorView;
use std::collections::HashMap;
use std::path::Path;

/// How the frozen block linears are held.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BaseFormat {
    /// Dense in the compute dtype (a bitsandbytes checkpoint is dequantized).
    Dense,
    /// 4-bit; a dense checkpoint is quantized with these settings, a bitsandbytes one keeps its own.
    Quantized {
        quant_type: QuantType,
        blocksize: Blocksize,
        double_quant: bool,
    },
}

impl BaseFormat {
    /// QLoRA's choice: NF4, blocksize 64, double quantization.
    pub const NF4: Self = Self::Quantized {
        quant_type: QuantType::Nf4,
        blocksize: Blocksize::DEFAULT,
        double_quant: true,
    };
}

/// Loading options.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Compute dtype of activations, dense weights, embeddings and norms.
    pub dtype: DType,
    pub device: Device,
    pub base: BaseFormat,
}

/// Loads the model in `dir`.
pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Phi3> {
    if opts.device.is_cpu() && opts.dtype == DType::BF16 {
        bail!(
            "bf16 compute needs a GPU (candle's CPU matmul has no bf16); use dtype f32 (or f16) on the CPU"
        );
    }
    let ck = Checkpoint::open(dir)?;
    let origin = dir.join(CONFIG_FILE).display().to_string();
    let cfg = Phi3Config::from_value(&ck.config, &origin)?;
    let bnb_4bit = match &cfg.quantization_config {
        None => false,
        Some(q) => {
            let qc: QuantizationConfig = serde_json::from_value(q.clone())
                .with_context(|| format!("{origin}: quantization_config is not bitsandbytes 4-bit (the only quantized format read)"))?;
            ensure!(
                qc.is_bnb_4bit(),
                "{origin}: quantization_config is not 4-bit bitsandbytes"
            );
            true
        }
    };
    let headers = ck.tensors()?;
    let mut where_is: HashMap<&str, usize> = HashMap::new();
    for (i, st) in headers.iter().enumerate() {
        for name in st.names() {
            where_is.insert(name, i);
        }
    }
    let view = |name: &str| -> Option<TensorView<'_>> {
        where_is
            .get(name)
            .and_then(|&i| headers[i].tensor(name).ok())
    };
    // Where the tensor list lives: the index of a sharded checkpoint, else its one file.
    let weights = match (&ck.index, ck.shards.as_slice()) {
        (None, [shard]) => shard.path.clone(),
        _ => dir.join(checkpoint::INDEX_FILE),
    };
    // The file holding `name` (where the tensor list lives when no shard has it), for errors.
    let file_of = |name: &str| {
        where_is
            .get(name)
            .map(|&i| ck.shards[i].path.display().to_string())
            .unwrap_or_else(|| weights.display().to_string())
    };
    let missing = |name: &str| {
        format!(
            "{}: no tensor `{name}`, which {origin} implies",
            weights.display()
        )
    };
    // Streaming: once a tensor (or a 4-bit weight with its state tensors) has been copied into the
    // model, its mapped pages are dropped, so loading never holds the checkpoint's file pages.
    let dense = |name: &str, want: &[usize]| -> Result<Tensor> {
        let v = view(name).with_context(|| missing(name))?;
        ensure!(
            v.shape() == want,
            "{}: `{name}` has shape {:?}, {origin} implies {want:?}",
            file_of(name),
            v.shape()
        );
        let dtype = checkpoint::float_dtype(v.dtype()).with_context(|| {
            format!(
                "{}: tensor `{name}` has dtype {:?}; expected f32, bf16 or f16",
                file_of(name),
                v.dtype()
            )
        })?;
        let t = Tensor::from_raw_buffer(v.data(), dtype, v.shape(), &Device::Cpu)?;
        ck.release(v.data())?;
        Ok(t.to_dtype(opts.dtype)?.to_device(&opts.device)?)
    };
    let linear = |layer: usize, suffix: &str, target: &str| -> Result<BaseWeight> {
        let name = format!("{}{layer}.{suffix}.weight", names::LAYER_PREFIX);
        let want = cfg.linear_shape(target).expect("known target");
        let q: Option<Quantized> = if bnb_4bit {
            Some(bnb::from_tensors(&name, view).with_context(|| {
                format!(
                    "{}: reading 4-bit `{name}` ({origin} has a bitsandbytes \
                             quantization_config)",
                    file_of(&name)
                )
            })?)
        } else {
            None
        };
        let shape = q
            .as_ref()
            .map(|q| q.shape.clone())
            .or_else(|| view(&name).map(|v| v.shape().to_vec()));
        let shape = shape.with_context(|| {
            format!(
                "{} (model_type `{}`: {})",
                missing(&name),
                cfg.model_type,
                match cfg.layout() {
                    names::Layout::Fused => "fused qkv_proj and gate_up_proj",
                    names::Layout::Split => "q_proj, k_proj, v_proj, gate_proj and up_proj apart",
                }
            )
        })?;
        ensure!(
            shape == want,
            "{}: `{name}` has shape {shape:?}, {origin} implies {want:?}",
            file_of(&name)
        );
        // `q` (4-bit) owns copies of its tensors; the dense paths below release their own.
        if q.is_some() {
            ck.release_named(&name, view)?;
        }
        Ok(match (q, opts.base) {
            (Some(q), BaseFormat::Quantized { .. }) => {
                BaseWeight::Nf4(Nf4Tensor::new(&q, &opts.device)?)
            }
            (Some(q), BaseFormat::Dense) => {
                let w: Vec<f32> = q.dequantize()?;
                BaseWeight::Dense(
                    Tensor::from_vec(w, (want[0], want[1]), &Device::Cpu)?
                        .to_dtype(opts.dtype)?
                        .to_device(&opts.device)?,
                )
            }
            (
                None,
                BaseFormat::Quantized {
                    quant_type,
                    blocksize,
                    double_quant,
                },
            ) => {
                let v = view(&name).expect("shape found above");
                let values = checkpoint::to_f32(&v, &name, &file_of(&name))?;
                ck.release(v.data())?;
                let src = checkpoint::float_dtype(v.dtype()).expect("to_f32 checked the dtype");
                let q =
                    Quantized::quantize(&values, &want, src, quant_type, blocksize, double_quant)
                        .with_context(|| format!("{}: quantizing `{name}`", file_of(&name)))?;
                BaseWeight::Nf4(Nf4Tensor::new(&q, &opts.device)?)
            }
            (None, BaseFormat::Dense) => BaseWeight::Dense(dense(&name, &want)?),
        })
    };
    let plain = |base: BaseWeight| LoraLinear {
        base,
        adapter: None,
    };
    let layout = cfg.layout();
    let named = |layer: usize, target: &'static str| -> Result<(&'static str, LoraLinear)> {
        let suffix = layout.suffix(target).expect("a target of the layout");
        Ok((target, plain(linear(layer, suffix, target)?)))
    };
    // A fused projection, or its split parts in row order.
    let projection =
        |layer: usize, fused: &'static str| -> Result<Vec<(&'static str, LoraLinear)>> {
            match layout {
                names::Layout::Fused => Ok(vec![named(layer, fused)?]),
                names::Layout::Split => names::split_parts(fused)
                    .iter()
                    .map(|t| named(layer, t))
                    .collect(),
            }
        };
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    let (hidden, vocab) = (cfg.hidden_size, cfg.vocab_size);
    for l in 0..cfg.num_hidden_layers {
        let p = format!("{}{l}", names::LAYER_PREFIX);
        layers.push(Block {
            input_layernorm: dense(&format!("{p}.input_layernorm.weight"), &[hidden])?,
            qkv: projection(l, "qkv_proj")?,
            o_proj: named(l, "o_proj")?.1,
            post_attention_layernorm: dense(
                &format!("{p}.post_attention_layernorm.weight"),
                &[hidden],
            )?,
            gate_up: projection(l, "gate_up_proj")?,
            down_proj: named(l, "down_proj")?.1,
        });
    }
    let embed_tokens = dense("model.embed_tokens.weight", &[vocab, hidden])?;
    let lm_head = if cfg.tie_word_embeddings || view("lm_head.weight").is_none() {
        if !cfg.tie_word_embeddings {
            bail!(
                "{}: no `lm_head.weight`, and {origin} says tie_word_embeddings is false",
                weights.display()
            );
        }
        embed_tokens.clone()
    } else {
        dense("lm_head.weight", &[vocab, hidden])?
    };
    let rope = cfg.rope()?;
    Ok(Phi3 {
        embed_tokens,
        layers,
        norm: dense("model.norm.weight", &[hidden])?,
        lm_head,
        rope,
        cfg,
        dtype: opts.dtype,
        device: opts.device.clone(),
        ops: OpPath::for_device(&opts.device, opts.dtype),
        saved: Default::default(),
    })
}
