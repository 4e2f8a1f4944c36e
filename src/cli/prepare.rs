//! `qlora data prepare`: read and tokenize data exactly as `qlora train` will (every source and
//! format, on every core, [`crate::data::encode`]) into qlora's data cache, so the run itself
//! starts at once; and say what the data holds and how fast it went (the figure
//! `scripts/compare_data_encode.sh` sets beside `datasets.map`).

use crate::data::TokenizerBundle;
use crate::data::encode::{ReadOptions, cache_dir, encode_data, encode_to_cache};
use crate::data::formats::{Columns, Format, check_columns};
use crate::data::source::Spec;
use anyhow::{Context, Result};
use clap::Args;
use std::process::ExitCode;

/// Tokenize data into qlora's cache as training will read it, and report its size and speed.
#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// The data, as training's --data takes it: a file (JSONL, JSON, gzip, zstd, Parquet), a
    /// directory, a glob, or hf://datasets/owner/name[@revision][/config].
    #[arg(long)]
    data: String,
    /// The split of a Hub dataset.
    #[arg(long, default_value = "train")]
    split: String,
    /// The model whose tokenizer and chat template apply (dir, Hub id, builtin:tiny-phi3).
    #[arg(long)]
    model: String,
    /// auto, messages, prompt_completion, sharegpt, alpaca or text [data.format].
    #[arg(long, default_value = "auto")]
    format: String,
    /// A dataset column for a name the formats read, as ours=theirs (repeat) [data.columns].
    #[arg(long = "columns", value_name = "OURS=THEIRS")]
    columns: Vec<String>,
    /// Skip and count bad records instead of stopping [data.skip_bad_lines].
    #[arg(long)]
    skip_bad_lines: bool,
    /// Neither read nor write the cache: tokenize into memory, as training holds the examples
    /// (with the cache, examples go to it as they come and none is kept).
    #[arg(long)]
    no_data_cache: bool,
}

/// `auto`, `sharegpt`, … as [`Format`] (its serde names).
pub fn parse_format(s: &str) -> Result<Format> {
    serde_json::from_value(serde_json::Value::String(s.into())).map_err(|_| {
        anyhow::anyhow!(
            "--format `{s}`: use auto, messages, prompt_completion, sharegpt, alpaca or text"
        )
    })
}

/// `ours=theirs` pairs as [`Columns`], checked.
pub fn parse_columns(pairs: &[String]) -> Result<Columns> {
    let mut c = Columns::new();
    for p in pairs {
        let (ours, theirs) = p
            .split_once('=')
            .with_context(|| format!("--columns `{p}`: write ours=theirs, e.g. output=answer"))?;
        c.insert(ours.trim().to_string(), theirs.trim().to_string());
    }
    check_columns(&c)?;
    Ok(c)
}

pub fn run(a: PrepareArgs) -> Result<ExitCode> {
    let opts = ReadOptions {
        format: parse_format(&a.format)?,
        columns: parse_columns(&a.columns)?,
        skip_bad_lines: a.skip_bad_lines,
    };
    let dir = crate::hub::resolve(&a.model)?;
    let tok = TokenizerBundle::from_dir(&dir)?;
    let spec = Spec::new(&a.data, &a.split);
    let cache = (!a.no_data_cache).then(cache_dir);
    let t0 = std::time::Instant::now();
    // Into the cache, nothing kept; without it, kept in memory (as training would hold them).
    let d = match &cache {
        Some(dir) => encode_to_cache(&spec, &opts, &tok, dir)?,
        None => encode_data(&spec, &opts, &tok, None)?,
    };
    let secs = t0.elapsed().as_secs_f64();
    let (tokens, trained) = (d.tokens, d.trained_tokens);
    let records = d.count + d.skipped.len();
    println!(
        "{spec}: {} examples ({} conversations, {} documents), {tokens} tokens ({trained} trained), {} bad records skipped",
        d.count,
        d.conversations,
        d.texts,
        d.skipped.len()
    );
    println!(
        "{} in {secs:.2} s: {:.0} records/s, {:.0} tokens/s on {} threads; peak RSS {:.0} MiB",
        if d.cached {
            "read from the data cache"
        } else {
            "tokenized"
        },
        records as f64 / secs.max(1e-9),
        tokens as f64 / secs.max(1e-9),
        rayon::current_num_threads(),
        crate::memstat::peak_resident_bytes() as f64 / (1u64 << 20) as f64
    );
    if let Some(c) = &cache {
        println!("cache: {}", c.display());
    }
    Ok(ExitCode::SUCCESS)
}
