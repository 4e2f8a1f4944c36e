//! `qlora data inspect`: one rendered conversation with its trained tokens marked, counts, lints.

use crate::data::batch::build_rows;
use crate::data::{TokenizerBundle, read_jsonl};
use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Look at chat data the way training will see it.
#[derive(Debug, Args)]
pub struct DataArgs {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(Debug, Subcommand)]
enum DataCommand {
    /// Show one conversation rendered with the model's chat template, trained tokens between ⟦ ⟧,
    /// then counts and lints for the whole file.
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
struct InspectArgs {
    /// Chat JSONL.
    #[arg(long)]
    data: PathBuf,
    /// The model whose tokenizer and chat template apply (dir, Hub id, builtin:tiny-phi3).
    #[arg(long)]
    model: String,
    /// Which conversation to show (0-based).
    #[arg(long, default_value_t = 0)]
    index: usize,
    /// Training's max_seq_len, for the truncation count.
    #[arg(long, default_value_t = 2048)]
    max_seq_len: usize,
    /// Skip and count bad lines.
    #[arg(long)]
    skip_bad_lines: bool,
}

pub fn run(args: DataArgs) -> Result<ExitCode> {
    let DataCommand::Inspect(a) = args.command;
    let dir = crate::hub::resolve(&a.model)?;
    let tok = TokenizerBundle::from_dir(&dir)?;
    let report = read_jsonl(&a.data, a.skip_bad_lines)?;
    let encoded = report
        .conversations
        .iter()
        .map(|c| tok.encode_conversation(c))
        .collect::<Result<Vec<_>>>()?;
    let Some(e) = encoded.get(a.index) else {
        bail!(
            "--index {}: the file has {} conversations",
            a.index,
            encoded.len()
        )
    };
    println!("conversation {} (line {}):", a.index, e.line);
    // The rendered text cut at token boundaries (each token with any gap before it).
    let offsets = tok.encode(&e.text)?.get_offsets().to_vec();
    let mut shown = String::new();
    let mut inside = false;
    let mut at = 0;
    for (t, &(_, end)) in offsets.iter().enumerate() {
        if e.trained[t] != inside {
            shown.push(if e.trained[t] { '⟦' } else { '⟧' });
            inside = e.trained[t];
        }
        shown.push_str(&e.text[at..end.max(at)]);
        at = end.max(at);
    }
    if inside {
        shown.push('⟧');
    }
    println!("{shown}\n");
    let (_, stats) = build_rows(&encoded, a.max_seq_len, true);
    println!(
        "{} conversations, {} tokens, {} trained ({:.1}%), {} truncated at {}, {} dropped (nothing trained left), {} bad lines skipped",
        stats.conversations,
        encoded.iter().map(|e| e.ids.len()).sum::<usize>(),
        stats.trained_tokens,
        100.0 * stats.trained_tokens as f64 / stats.tokens.max(1) as f64,
        stats.truncated,
        a.max_seq_len,
        stats.dropped,
        report.skipped.len()
    );
    let mut lints = Vec::new();
    for e in &encoded {
        if !e.trained.iter().any(|t| *t) {
            lints.push(format!("line {}: no trained tokens", e.line));
        }
        if e.ids.len() > a.max_seq_len {
            lints.push(format!(
                "line {}: {} tokens, over max_seq_len {} (truncated)",
                e.line,
                e.ids.len(),
                a.max_seq_len
            ));
        }
        let trained_ends = e
            .ids
            .iter()
            .zip(&e.trained)
            .filter(|(id, tr)| Some(**id) == tok.end_id && **tr)
            .count();
        let turns = report
            .conversations
            .iter()
            .find(|c| c.line == e.line)
            .map_or(0, |c| {
                c.messages
                    .iter()
                    .filter(|m| m.role == crate::data::Role::Assistant)
                    .count()
            });
        if tok.end_id.is_some() && trained_ends < turns {
            lints.push(format!(
                "line {}: {} of {turns} assistant turns do not end with a trained <|end|>",
                e.line,
                turns - trained_ends
            ));
        }
    }
    if tok.pad_id.is_some() && tok.pad_id == tok.eos_id {
        lints.push("pad token == eos token: qlora masks by span, never by id, so padding never hides a real token; tools that mask padding by id would also mask every eos".into());
    }
    if lints.is_empty() {
        println!("lints: none");
    } else {
        println!("lints:");
        for l in lints {
            println!("  - {l}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
