//! `qlora generate`: the prompt as one user turn through the model's chat template, generated with
//! the KV cache, streamed, stopping at `<|end|>` / eos.

use super::infer::ModelArgs;
use crate::data::{Message, Role};
use anyhow::Result;
use candle_core::{D, DType, Tensor};
use clap::Args;
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::process::ExitCode;

/// Generate a reply to one user prompt.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The user turn.
    #[arg(long)]
    prompt: String,
    /// An optional system turn before it.
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling mass (with temperature > 0).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object at the end instead of streaming.
    #[arg(long)]
    json: bool,
}

/// Stop ids: generation_config.json's eos_token_id, else config eos and `<|end|>`.
fn stop_ids(dir: &std::path::Path, cfg: &crate::model::Phi3Config, end: Option<u32>) -> Vec<u32> {
    let from_gen = std::fs::read(dir.join("generation_config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .map(|v| match v.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
            _ => Vec::new(),
        })
        .unwrap_or_default();
    let mut ids = if from_gen.is_empty() {
        cfg.eos_token_ids()
    } else {
        from_gen
    };
    ids.extend(end);
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Picks the next token from `[V]` logits.
fn sample(logits: &Tensor, temperature: f64, top_p: f64, rng: &mut impl Rng) -> Result<u32> {
    let logits = logits.to_dtype(DType::F32)?;
    if temperature <= 0.0 {
        return Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?);
    }
    let probs: Vec<f32> =
        candle_nn::ops::softmax(&(logits / temperature)?, D::Minus1)?.to_vec1()?;
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let mut kept = Vec::new();
    let mut mass = 0f64;
    for i in order {
        kept.push(i);
        mass += probs[i] as f64;
        if mass >= top_p {
            break;
        }
    }
    let mut r = rng.random::<f64>() * mass;
    for &i in &kept {
        r -= probs[i] as f64;
        if r <= 0.0 {
            return Ok(i as u32);
        }
    }
    Ok(*kept.last().expect("at least one token") as u32)
}

pub fn run(args: GenerateArgs) -> Result<ExitCode> {
    let m = args.model.load()?;
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(Message::new(Role::System, s.clone()));
    }
    messages.push(Message::new(Role::User, args.prompt.clone()));
    let text = m.tok.template.render(&messages, true)?;
    let prompt_ids = m.tok.encode(&text)?.get_ids().to_vec();
    let stops = stop_ids(&m.dir, &m.model.cfg, m.tok.end_id);
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut cache = crate::model::phi3::KvCache::default();
    let mut input = Tensor::new(prompt_ids.as_slice(), &m.model.device)?.unsqueeze(0)?;
    let mut generated: Vec<u32> = Vec::new();
    let mut shown = String::new();
    let mut out = std::io::stdout();
    for _ in 0..args.max_new_tokens {
        let logits = m.model.forward_cached(&input, &mut cache)?;
        let last = logits.squeeze(0)?.get(logits.dim(1)? - 1)?;
        let next = sample(&last, args.temperature, args.top_p, &mut rng)?;
        if stops.contains(&next) {
            break;
        }
        generated.push(next);
        if !args.json {
            let now = m.tok.decode(&generated)?;
            if let Some(delta) = now.strip_prefix(&shown) {
                write!(out, "{delta}")?;
                out.flush()?;
            }
            shown = now;
        }
        input = Tensor::new(&[next], &m.model.device)?.unsqueeze(0)?;
    }
    let text_out = m.tok.decode(&generated)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"prompt_token_ids": prompt_ids, "token_ids": generated, "text": text_out})
        );
    } else {
        if let Some(rest) = text_out.strip_prefix(&shown) {
            write!(out, "{rest}")?;
        }
        writeln!(out)?;
    }
    Ok(ExitCode::SUCCESS)
}
