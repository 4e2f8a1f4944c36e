//! `qlora eval`: mean loss and perplexity on assistant tokens.

use super::infer::ModelArgs;
use crate::data::batch::{Row, build_rows, collate};
use crate::train::loss;
use anyhow::Result;
use clap::Args;
use std::process::ExitCode;

/// Mean cross-entropy and perplexity of a model (optionally with an adapter) on the assistant
/// tokens of a chat JSONL file.
#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The data, as training's --data takes it: a file (JSONL, JSON, gzip, zstd, Parquet), a
    /// directory, a glob, or hf://datasets/owner/name[@revision][/config].
    #[arg(long)]
    data: String,
    /// The split of a Hub dataset.
    #[arg(long, default_value = "test")]
    split: String,
    /// Tokens per row (longer conversations are truncated).
    #[arg(long, default_value_t = 2048)]
    max_seq_len: usize,
    /// Rows per forward pass.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Skip and count bad lines.
    #[arg(long)]
    skip_bad_lines: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: EvalArgs) -> Result<ExitCode> {
    let m = args.model.load()?;
    let opts = crate::data::encode::ReadOptions {
        skip_bad_lines: args.skip_bad_lines,
        ..Default::default()
    };
    let spec = crate::data::source::Spec::new(&args.data, &args.split);
    let cache = crate::data::encode::cache_dir();
    let report = crate::data::encode::encode_data(&spec, &opts, &m.tok, Some(&cache))?;
    let (rows, stats) = build_rows(&report.examples, args.max_seq_len, true);
    let pad = m.tok.pad_id.or(m.tok.eos_id).unwrap_or(0);
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in rows.chunks(args.batch_size.max(1)) {
        let refs: Vec<&Row> = chunk.iter().collect();
        let (s, k) = loss(&m.model, &collate(&refs, pad, &m.model.device)?)?;
        sum += s;
        n += k;
    }
    let mean = sum / n.max(1) as f64;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"loss": mean, "perplexity": mean.exp(), "tokens": n, "conversations": stats.conversations, "truncated": stats.truncated, "skipped_lines": report.skipped.len()})
        );
    } else {
        println!(
            "loss {mean:.4}  perplexity {:.3}  ({n} assistant tokens in {} conversations, {} truncated)",
            mean.exp(),
            stats.conversations,
            stats.truncated
        );
    }
    Ok(ExitCode::SUCCESS)
}
