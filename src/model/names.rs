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
}
