//! What an export is held to: its weight encoding (a GGUF's file type, a checkpoint's dtype) and
//! the acceptance bounds of each encoding, with their source.

use super::Export;
use anyhow::{Context, Result};

/// The export's weight encoding, for its thresholds: a GGUF's file type, else the safetensors'
/// dtype.
pub fn export_type(export: &Export) -> Result<String> {
    if let Export::LoraGguf { lora, base } = export {
        // The looser of the base's type and the LoRA tensors' (an f16 LoRA on an f32 base is
        // an f16 export).
        let base_ty = export_type(&Export::Gguf(base.clone()))?;
        let h = crate::export::gguf_read::read_header(lora)?;
        let lora_ty = h
            .tensors
            .iter()
            .map(|t| t.ty.name())
            .max_by(|a, b| {
                Thresholds::for_type(a)
                    .mean_kl
                    .total_cmp(&Thresholds::for_type(b).mean_kl)
            })
            .unwrap_or("f32")
            .to_string();
        return Ok(
            if Thresholds::for_type(&lora_ty).mean_kl > Thresholds::for_type(&base_ty).mean_kl {
                lora_ty
            } else {
                base_ty
            },
        );
    }
    let gguf = match export {
        Export::Gguf(p) => Some(p),
        _ => None,
    };
    if let Some(p) = gguf {
        let h = crate::export::gguf_read::read_header(p)?;
        let ft = h
            .get("general.file_type")
            .and_then(|v| v.as_u64())
            .context("no general.file_type")?;
        // llama.cpp's LLAMA_FTYPE values.
        return Ok(match ft {
            0 => "f32",
            1 => "f16",
            2 => "q4_0",
            7 => "q8_0",
            15 => "q4_k_m",
            17 => "q5_k_m",
            18 => "q6_k",
            32 => "bf16",
            _ => "other",
        }
        .into());
    }
    if let Export::Merged(d) = export {
        let c: serde_json::Value = serde_json::from_slice(
            &std::fs::read(d.join("config.json"))
                .with_context(|| format!("{}: cannot read config.json", d.display()))?,
        )?;
        let dt = c
            .get("torch_dtype")
            .or_else(|| c.get("dtype"))
            .and_then(|v| v.as_str())
            .unwrap_or("float32");
        return Ok(match dt {
            "float16" => "f16",
            "bfloat16" => "bf16",
            _ => "f32",
        }
        .into());
    }
    Ok("f32".into())
}

/// Acceptance bounds for one export type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Largest mean KL(reference ‖ export) over the teacher-forced positions, in nats.
    pub mean_kl: f64,
    /// Smallest fraction of positions whose top-1 token agrees.
    pub top1: f64,
    /// Smallest fraction of greedy tokens equal to the reference's before the first difference,
    /// averaged over prompts.
    pub greedy: f64,
}

impl Thresholds {
    /// By the weights' encoding, from measurements of faithful exports on two models: the built-in
    /// one with a random rank-8 adapter (tests/it/verify.rs with `QLORA_VERIFY_PRINT=1`; its
    /// 128-wide rows take k-quants' fallback types) and the 256-wide pattern model of
    /// tests/fixtures/gen_kquant_goldens.py (`qlora verify` on its exports, 4 prompts × 16 tokens:
    /// real k-quants everywhere). Worst mean KL(model ‖ export), top-1: f32 (merged, GGUF, base
    /// GGUF + LoRA GGUF) 6e-14, 100%; f16 2.0e-10, 100%; bf16 1.4e-8, 100%; q8_0 5.4e-4, 98.2%;
    /// q6_k 2.7e-3, 89.4%; q5_k_m 6.5e-3, 85.8%; q4_k_m 2.3e-2, 81.4%; q4_0 5.6e-2, 77.0%. Random
    /// models' flat distributions are near-ties everywhere, the worst case for top-1 and greedy.
    /// The bounds sit 3–5× above the worst KL (more for the exact types, for real models' larger
    /// logits) and far below what the faults cost: a lost adapter (KL 1.2e-3 for the random
    /// adapter, 1.4 for the demo one), a wrong scale or a transposed tensor, the other merge base.
    /// Greedy agreement is required where rounding rarely flips a near-tie (f32 to q8_0); below 8
    /// bits it is reported.
    pub fn for_type(ty: &str) -> Self {
        let (mean_kl, top1, greedy) = match ty {
            "f32" => (1e-9, 1.0, 1.0),
            "f16" => (1e-6, 0.99, 0.75),
            "bf16" => (1e-5, 0.97, 0.75),
            "q8_0" => (2e-3, 0.9, 0.5),
            "q6_k" => (1e-2, 0.8, 0.0),
            "q5_k_m" => (2e-2, 0.75, 0.0),
            "q4_k_m" => (7e-2, 0.7, 0.0),
            _ => (0.15, 0.6, 0.0),
        };
        Self {
            mean_kl,
            top1,
            greedy,
        }
    }
}
