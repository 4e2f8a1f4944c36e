//! What `--type` means for a merged GGUF: one tensor type for every weight (`f16`, `q8_0`, … as
//! llama.cpp's converter writes them), or one of llama-quantize's k-quant *mixes* (`q4_k_m`,
//! `q5_k_m`, `q6_k`), where each tensor's type depends on its role, its layer and its row length.
//!
//! The mix rules are llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp) for the `phi3`
//! architecture without an importance matrix, restricted to these three mixes:
//! - `output.weight` (or `token_embd.weight` when the head is tied and there is no output tensor):
//!   `q6_K`; `q8_0` when its rows are not a multiple of 256.
//! - `attn_qkv` is counted with the attn_v tensors: `q6_K` in the layers where
//!   `use_more_bits(i, n)` holds (the first and last eighth, and every third layer between), for
//!   `q4_k_m` and `q5_k_m`; `ffn_down` likewise by layer.
//! - everything else: the mix's base type (`q4_K`, `q5_K`, `q6_K`).
//! - a k-quant needs rows that are a multiple of 256: otherwise `q4_K → q5_0`, `q5_K → q5_1`,
//!   `q6_K → q8_0`, and `f16` if even 32 does not divide the rows.
//! - 1-D tensors (norms, rope factors) stay `f32`.

use super::gguf::GgmlType;
use anyhow::{Result, bail};

/// `--type` values for a merged model GGUF.
pub const MODEL_TYPES: [&str; 8] = [
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k",
];
/// `--type` values for a LoRA GGUF (llama.cpp's convert_lora_to_gguf.py offers these).
pub const LORA_TYPES: [&str; 4] = ["f32", "f16", "bf16", "q8_0"];

/// A llama-quantize k-quant mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    Q4KM,
    Q5KM,
    Q6K,
}

/// The file's type: uniform, or a mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    Uniform(GgmlType),
    Mix(Mix),
}

impl From<GgmlType> for FileType {
    fn from(t: GgmlType) -> Self {
        Self::Uniform(t)
    }
}

fn ty(name: &str) -> GgmlType {
    GgmlType::parse(name).expect("a type of the table")
}

impl FileType {
    /// Parses a model `--type`.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "q4_k_m" => Self::Mix(Mix::Q4KM),
            "q5_k_m" => Self::Mix(Mix::Q5KM),
            "q6_k" => Self::Mix(Mix::Q6K),
            n if MODEL_TYPES.contains(&n) => Self::Uniform(ty(n)),
            _ => bail!("GGUF type `{name}` is not supported; use one of {MODEL_TYPES:?}"),
        })
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`).
    pub fn id(self) -> u32 {
        match self {
            Self::Mix(Mix::Q4KM) => 15,
            Self::Mix(Mix::Q5KM) => 17,
            Self::Mix(Mix::Q6K) => 18,
            Self::Uniform(t) => match t.name() {
                "f16" => 1,
                "q4_0" => 2,
                "q8_0" => 7,
                "bf16" => 32,
                _ => 0,
            },
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Mix(Mix::Q4KM) => "q4_k_m",
            Self::Mix(Mix::Q5KM) => "q5_k_m",
            Self::Mix(Mix::Q6K) => "q6_k",
            Self::Uniform(t) => t.name(),
        }
    }
}

/// Parses a LoRA GGUF `--type`.
pub fn parse_lora_type(name: &str) -> Result<GgmlType> {
    if !LORA_TYPES.contains(&name) {
        bail!("LoRA GGUF type `{name}` is not supported; use one of {LORA_TYPES:?}");
    }
    GgmlType::parse(name)
}

/// llama.cpp's layer pattern for spending more bits.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64) % 3 == 2
}

/// Chooses each tensor's type, in file order (the layer counters advance as llama-quantize's do).
#[derive(Debug)]
pub struct TypePicker {
    file: FileType,
    n_layers: usize,
    /// Whether the file has an `output.weight` (else `token_embd` is the head).
    has_output: bool,
    attn_qkv_seen: usize,
    ffn_down_seen: usize,
}

impl TypePicker {
    pub fn new(file: FileType, n_layers: usize, has_output: bool) -> Self {
        Self {
            file,
            n_layers,
            has_output,
            attn_qkv_seen: 0,
            ffn_down_seen: 0,
        }
    }

    /// The type of GGUF tensor `name` with torch-order `shape`.
    pub fn pick(&mut self, name: &str, shape: &[usize]) -> GgmlType {
        let quantizable =
            shape.len() >= 2 && name.ends_with("weight") && !name.contains("_norm.weight");
        if !quantizable {
            return ty("f32");
        }
        let mix = match self.file {
            FileType::Uniform(t) => return t,
            FileType::Mix(m) => m,
        };
        let base = ty(match mix {
            Mix::Q4KM => "q4_k",
            Mix::Q5KM => "q5_k",
            Mix::Q6K => "q6_k",
        });
        let ncols = *shape.last().expect("2-D");
        let more_bits = mix != Mix::Q6K;
        let is_head = name == "output.weight" || (!self.has_output && name == "token_embd.weight");
        let chosen = if is_head {
            if !ncols.is_multiple_of(base.block_elems()) {
                ty("q8_0")
            } else {
                ty("q6_k")
            }
        } else if name.contains("attn_qkv.weight") {
            let i = self.attn_qkv_seen;
            self.attn_qkv_seen += 1;
            if more_bits && use_more_bits(i, self.n_layers) {
                ty("q6_k")
            } else {
                base
            }
        } else if name.contains("ffn_down") {
            let i = self.ffn_down_seen;
            self.ffn_down_seen += 1;
            if more_bits && use_more_bits(i, self.n_layers) {
                ty("q6_k")
            } else {
                base
            }
        } else {
            base
        };
        if ncols.is_multiple_of(chosen.block_elems()) {
            return chosen;
        }
        let fallback = match chosen.name() {
            "q4_k" => ty("q5_0"),
            "q5_k" => ty("q5_1"),
            "q6_k" => ty("q8_0"),
            _ => chosen,
        };
        if ncols.is_multiple_of(fallback.block_elems()) {
            fallback
        } else {
            ty("f16")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_bits_layers_match_llama_cpp_for_32_layers() {
        // Phi-3-mini's 32 layers: 0..4, 28..32 and every third in between starting at 6.
        let picked: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(
            picked,
            [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
    }
}
