//! `builtin:tiny-phi3`: a tiny random Phi-3 (hidden 128, 2 layers, 4 heads, the real 32064-token
//! vocabulary) built from a fixed seed, with the real Phi-3 tokenizer that the repository ships
//! (assets/phi3-tokenizer), written out as an ordinary Hugging Face checkpoint directory. It makes
//! the README's first command run offline in minutes on a laptop CPU.

use crate::fsx::AtomicDir;
use anyhow::Result;
use half::bf16;
use rand::{Rng, SeedableRng};
use std::path::Path;

/// The name that selects it.
pub const TINY_PHI3: &str = "builtin:tiny-phi3";
const SEED: u64 = 3;
const HIDDEN: usize = 128;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const INTERMEDIATE: usize = 256;
const VOCAB: usize = 32064;

const TOKENIZER_FILES: [(&str, &[u8]); 4] = [
    (
        "tokenizer.json",
        include_bytes!("../assets/phi3-tokenizer/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../assets/phi3-tokenizer/tokenizer_config.json"),
    ),
    (
        "special_tokens_map.json",
        include_bytes!("../assets/phi3-tokenizer/special_tokens_map.json"),
    ),
    (
        "tokenizer.model",
        include_bytes!("../assets/phi3-tokenizer/tokenizer.model"),
    ),
];

/// Writes a Phi-3 `config.json` (the given shape, 4k context, bf16, MHA: as many kv heads as
/// heads), `generation_config.json` and the Phi-3 tokenizer files into `dir`: everything of a
/// checkpoint directory but its weights. The built-in model and `examples/phi3_mini_random.rs` use it.
pub fn write_checkpoint_files(
    dir: &Path,
    hidden: usize,
    layers: usize,
    heads: usize,
    intermediate: usize,
) -> Result<()> {
    let config = serde_json::json!({
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": VOCAB,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": heads, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": null,
        "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
        "sliding_window": 2047, "tie_word_embeddings": false, "attention_dropout": 0.0,
        "embd_pdrop": 0.0, "resid_pdrop": 0.0, "initializer_range": 0.02,
        "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.0"
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    let generation = serde_json::json!({"bos_token_id": 1, "eos_token_id": [32000, 32001, 32007], "pad_token_id": 32000});
    std::fs::write(
        dir.join("generation_config.json"),
        serde_json::to_vec_pretty(&generation)?,
    )?;
    for (name, bytes) in TOKENIZER_FILES {
        std::fs::write(dir.join(name), bytes)?;
    }
    Ok(())
}

/// The vocabulary size of the Phi-3 tokenizer the repository ships.
pub const PHI3_VOCAB: usize = VOCAB;

/// Writes the model into `dest` unless it is already there (it is the same every time).
pub fn materialize(dest: &Path) -> Result<()> {
    if dest.join("model.safetensors").exists() {
        return Ok(());
    }
    let out = AtomicDir::create(dest)?;
    write_checkpoint_files(out.path(), HIDDEN, LAYERS, HEADS, INTERMEDIATE)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
    // Uniform with the given standard deviation; bf16 like the real checkpoints. The head is larger
    // than the 0.02 of the linears so that the frozen head can express confident predictions.
    let mut tensor = |shape: &[usize], std: f32, mean: f32| -> (Vec<usize>, Vec<u8>) {
        let half = std * 3f32.sqrt();
        let n: usize = shape.iter().product();
        let mut draw = || {
            if half > 0.0 {
                mean + rng.random_range(-half..half)
            } else {
                mean
            }
        };
        let data = (0..n)
            .flat_map(|_| bf16::from_f32(draw()).to_le_bytes())
            .collect();
        (shape.to_vec(), data)
    };
    let mut tensors = vec![
        (
            "model.embed_tokens.weight".to_string(),
            tensor(&[VOCAB, HIDDEN], 1.0, 0.0),
        ),
        (
            "lm_head.weight".to_string(),
            tensor(&[VOCAB, HIDDEN], 0.1, 0.0),
        ),
        ("model.norm.weight".to_string(), tensor(&[HIDDEN], 0.0, 1.0)),
    ];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        tensors.push((
            format!("{p}.input_layernorm.weight"),
            tensor(&[HIDDEN], 0.0, 1.0),
        ));
        tensors.push((
            format!("{p}.post_attention_layernorm.weight"),
            tensor(&[HIDDEN], 0.0, 1.0),
        ));
        tensors.push((
            format!("{p}.self_attn.qkv_proj.weight"),
            tensor(&[3 * HIDDEN, HIDDEN], 0.02, 0.0),
        ));
        tensors.push((
            format!("{p}.self_attn.o_proj.weight"),
            tensor(&[HIDDEN, HIDDEN], 0.02, 0.0),
        ));
        tensors.push((
            format!("{p}.mlp.gate_up_proj.weight"),
            tensor(&[2 * INTERMEDIATE, HIDDEN], 0.02, 0.0),
        ));
        tensors.push((
            format!("{p}.mlp.down_proj.weight"),
            tensor(&[HIDDEN, INTERMEDIATE], 0.02, 0.0),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (shape, data))| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::BF16,
                    shape.clone(),
                    data,
                )?,
            ))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(views, None, &out.path().join("model.safetensors"))?;
    match out.commit() {
        Ok(_) => Ok(()),
        // Another process or thread built the same model first: theirs is identical.
        Err(_) if dest.join("model.safetensors").exists() => Ok(()),
        Err(e) => Err(e),
    }
}
