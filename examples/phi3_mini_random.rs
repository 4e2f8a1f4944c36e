//! A random bf16 checkpoint of Phi-3-mini's shape (hidden 3072, 32 layers, 32 heads = kv heads,
//! intermediate 8192, vocab 32064: 3.8B parameters, 7.6 GB) in two shards with an index and the
//! Phi-3 tokenizer, plus a random PEFT adapter for it (r = 16, α = 32 on qkv_proj, o_proj,
//! gate_up_proj, down_proj; B non-zero so that merging changes every weight). For
//! `scripts/stream_memory.sh`, which measures loading and exporting memory at that scale. Write it
//! under a temporary directory, never into the repository.
//!
//! Each tensor is generated when the safetensors writer asks for it, so this needs one tensor of
//! memory, not the model. Seeded: the same arguments give the same files.
//!
//! Usage: `cargo run --release --example phi3_mini_random -- MODEL_DIR ADAPTER_DIR
//! [--hidden 3072] [--layers 32] [--heads 32] [--intermediate 8192]` (smaller shapes for a dry run).

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use half::bf16;
use qlora::builtin::{PHI3_VOCAB, write_checkpoint_files};
use qlora::checkpoint::{INDEX_FILE, ShardIndex};
use qlora::lora::LoraConfig;
use qlora::model::{Phi3Config, names};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A bf16 tensor of uniform values (mean, standard deviation), generated when written.
struct Random {
    shape: Vec<usize>,
    mean: f32,
    std: f32,
    seed: u64,
}

/// Rows generated per rayon task (each with its own seeded generator, so the result does not
/// depend on the thread count).
const CHUNK_ELEMS: usize = 1 << 20;

impl safetensors::View for Random {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::BF16
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let mut bytes = vec![0u8; self.data_len()];
        let half_width = self.std * 3f32.sqrt();
        bytes
            .par_chunks_mut(2 * CHUNK_ELEMS)
            .enumerate()
            .for_each(|(i, chunk)| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed ^ ((i as u64) << 32));
                for pair in chunk.chunks_exact_mut(2) {
                    let v = if half_width > 0.0 {
                        self.mean + rng.random_range(-half_width..half_width)
                    } else {
                        self.mean
                    };
                    pair.copy_from_slice(&bf16::from_f32(v).to_le_bytes());
                }
            });
        Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 2
    }
}

struct Args {
    model: PathBuf,
    adapter: PathBuf,
    hidden: usize,
    layers: usize,
    heads: usize,
    intermediate: usize,
}

fn parse_args() -> Result<Args> {
    let mut positional = Vec::new();
    let (mut hidden, mut layers, mut heads, mut intermediate) = (3072, 32, 32, 8192);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> Result<usize> {
            it.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("{name} needs an integer"))
        };
        match a.as_str() {
            "--hidden" => hidden = num("--hidden")?,
            "--layers" => layers = num("--layers")?,
            "--heads" => heads = num("--heads")?,
            "--intermediate" => intermediate = num("--intermediate")?,
            s if s.starts_with("--") => bail!("unknown option {s}"),
            _ => positional.push(PathBuf::from(a)),
        }
    }
    let [model, adapter] = <[PathBuf; 2]>::try_from(positional).map_err(|_| {
        anyhow::anyhow!(
            "usage: phi3_mini_random MODEL_DIR ADAPTER_DIR [--hidden N] [--layers N] [--heads N] [--intermediate N]"
        )
    })?;
    Ok(Args {
        model,
        adapter,
        hidden,
        layers,
        heads,
        intermediate,
    })
}

fn write_model(a: &Args) -> Result<Phi3Config> {
    std::fs::create_dir_all(&a.model)?;
    write_checkpoint_files(&a.model, a.hidden, a.layers, a.heads, a.intermediate)?;
    let cfg_path = a.model.join("config.json");
    let cfg = Phi3Config::from_value(
        &serde_json::from_slice(&std::fs::read(&cfg_path)?)?,
        &cfg_path.display().to_string(),
    )?;
    let mut seed = 0u64;
    let mut random = |shape: Vec<usize>, mean: f32, std: f32| {
        seed += 1;
        Random {
            shape,
            mean,
            std,
            seed,
        }
    };
    // Like Phi-3-mini's own split: embeddings and the first half of the blocks, then the rest, the
    // final norm and the head.
    let files = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let (h, v) = (a.hidden, PHI3_VOCAB);
    let mut shards: [Vec<(String, Random)>; 2] = [Vec::new(), Vec::new()];
    shards[0].push((
        "model.embed_tokens.weight".into(),
        random(vec![v, h], 0.0, 1.0),
    ));
    for l in 0..a.layers {
        let shard = &mut shards[usize::from(l >= a.layers / 2)];
        let p = format!("{}{l}", names::LAYER_PREFIX);
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            shard.push((format!("{p}.{norm}.weight"), random(vec![h], 1.0, 0.0)));
        }
        for (suffix, target) in names::BLOCK_LINEARS {
            let shape = cfg.linear_shape(target).expect("known target").to_vec();
            shard.push((format!("{p}.{suffix}.weight"), random(shape, 0.0, 0.02)));
        }
    }
    shards[1].push(("model.norm.weight".into(), random(vec![h], 1.0, 0.0)));
    shards[1].push(("lm_head.weight".into(), random(vec![v, h], 0.0, 0.1)));

    let mut weight_map = BTreeMap::new();
    let mut total_size = 0usize;
    for (file, tensors) in files.iter().zip(shards) {
        for (name, t) in &tensors {
            weight_map.insert(name.clone(), file.to_string());
            total_size += safetensors::View::data_len(t);
        }
        let path = a.model.join(file);
        let metadata = Some(std::collections::HashMap::from([(
            "format".to_string(),
            "pt".to_string(),
        )]));
        safetensors::serialize_to_file(tensors, metadata, &path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let mut metadata = serde_json::Map::new();
    metadata.insert("total_size".into(), total_size.into());
    let index = ShardIndex {
        metadata,
        weight_map,
    };
    std::fs::write(a.model.join(INDEX_FILE), serde_json::to_vec_pretty(&index)?)?;
    Ok(cfg)
}

fn write_adapter(dir: &Path, model: &Path, cfg: &Phi3Config) -> Result<()> {
    let lora = LoraConfig {
        dropout: 0.0,
        ..LoraConfig::default()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut uniform = |shape: (usize, usize), std: f32| -> Result<Tensor> {
        let half_width = std * 3f32.sqrt();
        let values: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.random_range(-half_width..half_width))
            .collect();
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
    };
    let mut weights = Vec::new();
    for l in 0..cfg.num_hidden_layers {
        for (suffix, target) in names::BLOCK_LINEARS {
            let [o, i] = cfg.linear_shape(target).expect("known target");
            let a = uniform((lora.r, i), 0.02)?;
            let b = uniform((o, lora.r), 0.01)?;
            weights.push((
                format!("{}{l}.{suffix}", names::LAYER_PREFIX),
                qlora::lora::peft::ModuleWeights::lora(a, b),
            ));
        }
    }
    qlora::lora::peft::save(dir, &lora, &model.display().to_string(), &weights)
}

fn main() -> Result<()> {
    let a = parse_args()?;
    let t = std::time::Instant::now();
    let cfg = write_model(&a)?;
    write_adapter(&a.adapter, &a.model, &cfg)?;
    let n_params: usize = std::fs::read_dir(&a.model)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| e.metadata().map(|m| m.len() as usize).unwrap_or(0))
        .sum::<usize>()
        / 2;
    println!(
        "wrote {} (~{:.2}B parameters, bf16) and {} in {:.0} s",
        a.model.display(),
        n_params as f64 / 1e9,
        a.adapter.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
