//! Tensor names of a Hugging Face Phi-3 checkpoint, as a table: which weights are linear layers
//! (quantized to 4 bits, LoRA targets), which stay dense.

/// Phi-3's linear layers inside each decoder block, by the suffix after `model.layers.{N}.`:
/// `(suffix, PEFT target name)`. `qkv_proj` rows are `Q | K | V`, `gate_up_proj` rows `gate | up`.
pub const BLOCK_LINEARS: [(&str, &str); 4] = [
    ("self_attn.qkv_proj", "qkv_proj"),
    ("self_attn.o_proj", "o_proj"),
    ("mlp.gate_up_proj", "gate_up_proj"),
    ("mlp.down_proj", "down_proj"),
];

/// Prefix of decoder block `N`'s tensors.
pub const LAYER_PREFIX: &str = "model.layers.";

/// If `name` is the weight of one of a block's linear layers, `(layer, PEFT target name)`.
/// Embeddings, `lm_head` and norms are not (transformers' 4-bit loading keeps them dense too).
pub fn block_linear(name: &str) -> Option<(usize, &'static str)> {
    let rest = name.strip_prefix(LAYER_PREFIX)?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let module = rest.strip_suffix(".weight")?;
    BLOCK_LINEARS
        .iter()
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
        for dense in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.norm.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.qkv_proj.bias",
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
    }
}
