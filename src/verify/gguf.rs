//! The engines `qlora verify` runs a GGUF export on: our model built from the file
//! ([`crate::model::gguf`], every file `qlora export` writes), and, where it computes the same
//! model, candle-transformers' quantized Phi-3 as a second engine on the same file (it shares no
//! code with ours: its own GGUF tensor names, fused-tensor splits and rope). A LoRA GGUF is first
//! applied to its base as llama.cpp applies it, into a temporary f32 GGUF both engines read.

use crate::export::gguf_read::GgufHeader;
use crate::model::Phi3;
use anyhow::{Context, Result, ensure};
use candle_core::quantized::gguf_file;
use candle_core::{D, DType, Device, Tensor};
use std::path::{Path, PathBuf};

/// candle-transformers' quantized Phi-3, where it applies: the file it reads again for each
/// comparison (and the temporary merged GGUF of a LoRA GGUF, kept until then).
pub(super) struct Second {
    path: PathBuf,
    _tmp: Option<tempfile::NamedTempFile>,
}

/// Our model over the GGUF at `path` (with the LoRA GGUF `lora` applied first, if any), and the
/// second engine when candle's model computes the same function (`header` is `path`'s).
pub(super) fn open(
    path: &Path,
    lora: Option<&Path>,
    header: &GgufHeader,
    notes: &mut Vec<String>,
) -> Result<(Phi3, Option<Second>)> {
    let (file, tmp) = match lora {
        Some(lora) => {
            let merged = merge_lora_gguf(path, lora)?;
            notes.push(format!(
                "{} applied to {} as llama.cpp does (W + alpha/r · B·A)",
                lora.display(),
                path.display()
            ));
            (merged.path().to_path_buf(), Some(merged))
        }
        None => (path.to_path_buf(), None),
    };
    let model = crate::model::gguf::load(&file)
        .with_context(|| format!("{}: cannot be run as a phi3 model", path.display()))?;
    notes.push(format!(
        "GGUF engine: our model from the file's metadata (rope base {}, {} of {} dims rotated{}, \
         {} heads / {} kv heads{})",
        model.rope.theta,
        model.rope.rotary_dim,
        model.rope.head_dim,
        match model.rope.scaling {
            crate::model::config::RopeScaling::None => "",
            _ => ", longrope",
        },
        model.cfg.num_attention_heads,
        model.cfg.num_kv_heads(),
        if model.cfg.tie_word_embeddings {
            ", tied head"
        } else {
            ""
        }
    ));
    let second = match candle_limits(header) {
        None => Some(Second {
            path: file,
            _tmp: tmp,
        }),
        Some(why) => {
            notes.push(format!(
                "second engine: candle-transformers' quantized Phi-3 not run: {why}"
            ));
            None
        }
    };
    Ok((model, second))
}

impl Second {
    /// Mean over positions of KL(`ours` ‖ candle's) for each `(sequence, our log-probabilities)`.
    pub(super) fn mean_kl(&self, seqs: &[(Vec<u32>, Vec<Vec<f64>>)]) -> Result<f64> {
        let mut candle = Candle::open(&self.path)?;
        let (mut sum, mut n) = (0f64, 0usize);
        for (seq, ours) in seqs {
            let theirs = super::log_softmax_rows(&candle.logits(seq)?)?;
            ensure!(
                theirs.len() == ours.len()
                    && theirs.iter().zip(ours).all(|(a, b)| a.len() == b.len()),
                "candle-transformers' quantized Phi-3 gives logits of another shape"
            );
            sum += super::mean_kl(ours, &theirs) * ours.len() as f64;
            n += ours.len();
        }
        Ok(sum / n.max(1) as f64)
    }
}

/// candle-transformers' quantized Phi-3 over a GGUF file (its cache restarts at position 0).
struct Candle {
    model: candle_transformers::models::quantized_phi3::ModelWeights,
}

impl Candle {
    fn open(path: &Path) -> Result<Self> {
        let mut f = std::fs::File::open(path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        let content = gguf_file::Content::read(&mut f)
            .with_context(|| format!("{}: not a GGUF file candle can read", path.display()))?;
        let model = candle_transformers::models::quantized_phi3::ModelWeights::from_gguf(
            false,
            content,
            &mut f,
            &Device::Cpu,
        )
        .with_context(|| {
            format!(
                "{}: candle-transformers' quantized Phi-3 cannot load it",
                path.display()
            )
        })?;
        Ok(Self { model })
    }

    /// f32 `[T, V]` logits of `ids`: it returns the last position's logits, so one token at a
    /// time through its cache.
    fn logits(&mut self, ids: &[u32]) -> Result<Tensor> {
        let rows = ids
            .iter()
            .enumerate()
            .map(|(pos, &id)| {
                let x = Tensor::new(&[id], &Device::Cpu)?.unsqueeze(0)?;
                Ok(self.model.forward(&x, pos)?.squeeze(0)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let t = Tensor::stack(&rows, 0)?.to_dtype(DType::F32)?;
        Ok(t.reshape(((), t.dim(D::Minus1)?))?)
    }
}

/// Why candle-transformers' quantized Phi-3 would compute another function than the file
/// describes (it assumes rope base 10000, full-head rotary, no longrope factors or attention
/// factor, an output matrix, a fused attn_qkv), or `None` when it can run it.
fn candle_limits(header: &GgufHeader) -> Option<String> {
    let u = |k: &str| header.get(k).and_then(|v| v.as_u64());
    let f = |k: &str| header.get(k).map(|v| v.to_json()).and_then(|v| v.as_f64());
    if let Some(base) = f("phi3.rope.freq_base")
        && base != 10000.0
    {
        return Some(format!("rope base {base} (it assumes 10000)"));
    }
    if let Some(a) = f("phi3.rope.scaling.attn_factor")
        && a != 1.0
    {
        return Some(format!("rope attention factor {a} (it has none)"));
    }
    if let (Some(rot), Some(h), Some(heads)) = (
        u("phi3.rope.dimension_count"),
        u("phi3.embedding_length"),
        u("phi3.attention.head_count"),
    ) && heads > 0
        && rot != h / heads
    {
        return Some(format!(
            "partial rotary ({rot} of {} dims; it rotates whole heads)",
            h / heads
        ));
    }
    // Its 32-block dot products assert an even number of blocks per row (a debug assertion).
    if let Some(t) = header
        .tensors
        .iter()
        .find(|t| t.ne.len() == 2 && t.ty.block_elems() == 32 && !(t.ne[0] / 32).is_multiple_of(2))
    {
        return Some(format!(
            "`{}` has rows of {} values in {} (it wants an even number of 32-blocks)",
            t.name,
            t.ne[0],
            t.ty.name()
        ));
    }
    let names: Vec<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
    if names.iter().any(|n| n.starts_with("rope_factors_")) {
        return Some("longrope factors (it has no rope scaling)".into());
    }
    if !names.contains(&"output.weight") {
        return Some("a tied head without output.weight (it needs one)".into());
    }
    if !names.iter().any(|n| n.ends_with(".attn_qkv.weight")) {
        return Some("q, k and v apart (it reads attn_qkv)".into());
    }
    None
}

/// `base` with `lora` applied as llama.cpp applies it, `W + alpha/r · B·A` with r the rank of the
/// tensor pair, written as a temporary f32 GGUF for the engines (other tensors kept as they are).
fn merge_lora_gguf(base: &Path, lora: &Path) -> Result<tempfile::NamedTempFile> {
    use candle_core::quantized::{GgmlDType, QTensor};
    let read = |p: &Path| -> Result<(gguf_file::Content, std::fs::File)> {
        let mut f =
            std::fs::File::open(p).with_context(|| format!("{}: cannot open", p.display()))?;
        let c = gguf_file::Content::read(&mut f)
            .with_context(|| format!("{}: not a GGUF file", p.display()))?;
        Ok((c, f))
    };
    let (bc, mut bf) = read(base)?;
    let (lc, mut lf) = read(lora)?;
    let alpha = lc
        .metadata
        .get("adapter.lora.alpha")
        .context("the LoRA GGUF has no adapter.lora.alpha")?
        .to_f32()? as f64;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for name in bc.tensor_infos.keys() {
        let t = bc.tensor(&mut bf, name, &Device::Cpu)?;
        let (a, b) = (format!("{name}.lora_a"), format!("{name}.lora_b"));
        if lc.tensor_infos.contains_key(&a) {
            let a = lc
                .tensor(&mut lf, &a, &Device::Cpu)?
                .dequantize(&Device::Cpu)?;
            let b = lc
                .tensor(&mut lf, &b, &Device::Cpu)?
                .dequantize(&Device::Cpu)?;
            let w = t.dequantize(&Device::Cpu)?;
            // token_embd's A is stored transposed (`[V, r]`, gathered by token): its delta is
            // `A · Bᵀ`; every other tensor's is `B · A`. r is the rank either way.
            let delta = if name == "token_embd.weight" {
                let r = a.dim(1)? as f64;
                (a.matmul(&b.t()?)? * (alpha / r))?
            } else {
                let r = a.dim(0)? as f64;
                (b.matmul(&a)? * (alpha / r))?
            };
            let w = (w + delta)?;
            tensors.push((name.clone(), QTensor::quantize(&w, GgmlDType::F32)?));
        } else {
            tensors.push((name.clone(), t));
        }
    }
    let unused: Vec<&String> = lc
        .tensor_infos
        .keys()
        .filter(|k| {
            let base_name = k.trim_end_matches(".lora_a").trim_end_matches(".lora_b");
            !bc.tensor_infos.contains_key(base_name)
        })
        .collect();
    ensure!(
        unused.is_empty(),
        "{}: LoRA tensors for tensors the base lacks: {unused:?}",
        lora.display()
    );
    let tmp = tempfile::NamedTempFile::new()
        .context("creating a temporary file for the merged GGUF (set TMPDIR to a roomier place)")?;
    let metadata: Vec<(&str, &gguf_file::Value)> =
        bc.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    // A full temporary directory is named with the path (TMPDIR moves it), not a bare errno.
    let written = std::fs::File::create(tmp.path())
        .map_err(candle_core::Error::from)
        .and_then(|mut f| gguf_file::write(&mut f, &metadata, &refs));
    if let Err(e) = written {
        let disk = match &e {
            candle_core::Error::Io(io) => Some(crate::fsx::disk::DiskError::classify(
                tmp.path(),
                io,
                None,
                0,
            )),
            _ => None,
        };
        return Err(match disk {
            Some(d) => anyhow::Error::new(d),
            None => anyhow::Error::new(e),
        }
        .context("writing the LoRA GGUF merged into its base, for the check (set TMPDIR to a roomier place)"));
    }
    Ok(tmp)
}
