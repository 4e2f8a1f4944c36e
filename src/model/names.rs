//! Tensor names of a Hugging Face Phi-3 checkpoint, as a table: which weights are linear layers
//! (quantized to 4 bits, LoRA targets), which stay dense. Two layouts hold the same model:
//! Microsoft's (`Phi3ForCausalLM`: fused `qkv_proj` and `gate_up_proj`) and the "llamafied" one of
//! Unsloth's re-uploads (`LlamaForCausalLM` / `MistralForCausalLM`: `q_proj`, `k_proj`, `v_proj`,
//! `gate_proj`, `up_proj`), whose parts are row ranges of the fused weights.

/// Phi-3's linear layers inside each decoder block, by the suffix after `model.layers.{N}.`:
/// `(suffix, PEFT target name)`. `qkv_proj` rows are `Q | K | V`, `gate_up_proj` rows `gate | up`.
pub const BLOCK_LINEARS: [(&str, &str); 4] = [
    ("self_attn.qkv_proj", "qkv_proj"),
    ("self_attn.o_proj", "o_proj"),
    ("mlp.gate_up_proj", "gate_up_proj"),
    ("mlp.down_proj", "down_proj"),
];

/// The split layout's linears (transformers' Llama and Mistral), in model order.
pub const SPLIT_LINEARS: [(&str, &str); 7] = [
    ("self_attn.q_proj", "q_proj"),
    ("self_attn.k_proj", "k_proj"),
    ("self_attn.v_proj", "v_proj"),
    ("self_attn.o_proj", "o_proj"),
    ("mlp.gate_proj", "gate_proj"),
    ("mlp.up_proj", "up_proj"),
    ("mlp.down_proj", "down_proj"),
];

/// How a checkpoint stores a block's input projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Microsoft's: `qkv_proj` (rows Q | K | V) and `gate_up_proj` (rows gate | up).
    Fused,
    /// Llama's: `q_proj`, `k_proj`, `v_proj`, `gate_proj` and `up_proj` apart.
    Split,
}

impl Layout {
    /// `(suffix, target)` of each block linear, in model order.
    pub fn linears(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Fused => &BLOCK_LINEARS,
            Self::Split => &SPLIT_LINEARS,
        }
    }

    /// The PEFT target names of the block linears, in model order.
    pub fn targets(self) -> Vec<&'static str> {
        self.linears().iter().map(|(_, t)| *t).collect()
    }

    /// The suffix after `model.layers.{N}.` of linear `target`.
    pub fn suffix(self, target: &str) -> Option<&'static str> {
        self.linears()
            .iter()
            .find(|(_, t)| *t == target)
            .map(|(s, _)| *s)
    }
}

/// The split targets that make up fused target `fused` (rows in this order), or `[fused]` itself
/// for `o_proj` and `down_proj`.
pub fn split_parts(fused: &str) -> &'static [&'static str] {
    match fused {
        "qkv_proj" => &["q_proj", "k_proj", "v_proj"],
        "gate_up_proj" => &["gate_proj", "up_proj"],
        "o_proj" => &["o_proj"],
        "down_proj" => &["down_proj"],
        _ => &[],
    }
}

/// The fused target that split target `target` is a row range of (`o_proj`, `down_proj`: itself).
pub fn fused_of(target: &str) -> Option<&'static str> {
    BLOCK_LINEARS
        .iter()
        .map(|(_, f)| *f)
        .find(|f| split_parts(f).contains(&target))
}

/// Prefix of decoder block `N`'s tensors.
pub const LAYER_PREFIX: &str = "model.layers.";

/// If `name` is the weight of one of a block's linear layers (of either layout),
/// `(layer, PEFT target name)`.
/// Embeddings, `lm_head` and norms are not (transformers' 4-bit loading keeps them dense too).
pub fn block_linear(name: &str) -> Option<(usize, &'static str)> {
    let rest = name.strip_prefix(LAYER_PREFIX)?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let module = rest.strip_suffix(".weight")?;
    BLOCK_LINEARS
        .iter()
        .chain(&SPLIT_LINEARS)
        .find(|(suffix, _)| *suffix == module)
        .map(|(_, target)| (layer, *target))
}

/// Hugging Face → GGUF (llama.cpp `phi3`) names of a block's tensors, by suffix after
/// `model.layers.{N}.`; the GGUF name is `blk.{N}.<name>`.
pub const GGUF_BLOCK_NAMES: [(&str, &str); 6] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.qkv_proj.weight", "attn_qkv.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
];

/// Hugging Face → GGUF names of the tensors outside the blocks.
pub const GGUF_TOP_NAMES: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// The GGUF name of a Hugging Face Phi-3 tensor.
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some((_, g)) = GGUF_TOP_NAMES.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix(LAYER_PREFIX)?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    GGUF_BLOCK_NAMES
        .iter()
        .find(|(h, _)| *h == suffix)
        .map(|(_, g)| format!("blk.{layer}.{g}"))
}

/// The Hugging Face name of a GGUF tensor that [`gguf_name`] writes (its inverse): `blk.7.ffn_up.weight`
/// → `model.layers.7.mlp.gate_up_proj.weight`.
pub fn hf_name(gguf: &str) -> Option<String> {
    if let Some((h, _)) = GGUF_TOP_NAMES.iter().find(|(_, g)| *g == gguf) {
        return Some(h.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    GGUF_BLOCK_NAMES
        .iter()
        .find(|(_, g)| *g == suffix)
        .map(|(h, _)| format!("{LAYER_PREFIX}{layer}.{h}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linears_and_the_rest() {
        assert_eq!(
            block_linear("model.layers.3.self_attn.qkv_proj.weight"),
            Some((3, "qkv_proj"))
        );
        assert_eq!(
            block_linear("model.layers.31.mlp.down_proj.weight"),
            Some((31, "down_proj"))
        );
        assert_eq!(
            block_linear("model.layers.2.self_attn.k_proj.weight"),
            Some((2, "k_proj"))
        );
        assert_eq!(
            block_linear("model.layers.0.mlp.up_proj.weight"),
            Some((0, "up_proj"))
        );
        for (_, fused) in BLOCK_LINEARS {
            for part in split_parts(fused) {
                assert_eq!(fused_of(part), Some(fused));
                assert!(Layout::Split.targets().contains(part));
            }
        }
        for dense in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.norm.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.qkv_proj.bias",
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.x.mlp.down_proj.weight",
        ] {
            assert_eq!(block_linear(dense), None, "{dense}");
        }
    }

    #[test]
    fn gguf_names() {
        assert_eq!(
            gguf_name("model.layers.7.mlp.gate_up_proj.weight").as_deref(),
            Some("blk.7.ffn_up.weight")
        );
        assert_eq!(
            gguf_name("model.layers.0.input_layernorm.weight").as_deref(),
            Some("blk.0.attn_norm.weight")
        );
        assert_eq!(
            gguf_name("lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(gguf_name("model.layers.0.self_attn.q_proj.weight"), None);
        // Every name of the table maps back.
        for (h, _) in GGUF_TOP_NAMES {
            assert_eq!(hf_name(&gguf_name(h).unwrap()).as_deref(), Some(h));
        }
        for (h, _) in GGUF_BLOCK_NAMES {
            let hf = format!("{LAYER_PREFIX}12.{h}");
            assert_eq!(hf_name(&gguf_name(&hf).unwrap()), Some(hf));
        }
        assert_eq!(hf_name("blk.0.attn_q.weight"), None);
        assert_eq!(hf_name("rope_factors_long.weight"), None);
    }
}
