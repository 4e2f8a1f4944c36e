//! `qlora data inspect`: one rendered conversation with its trained tokens marked, counts, lints;
//! or, for preference pairs, one pair's chosen and rejected sequences with their scored tokens.

use crate::data::TokenizerBundle;
use crate::data::batch::build_rows;
use crate::data::source::Spec;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
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
    /// then counts and lints for the whole file; for preference pairs (lines with "chosen"), one
    /// pair's chosen and rejected sequences as training cuts them, scored tokens between ⟦ ⟧.
    Inspect(InspectArgs),
    /// Read and tokenize data as `qlora train` will, into qlora's data cache (so the run starts
    /// at once), and report its examples and tokens, and the speed.
    Prepare(super::prepare::PrepareArgs),
}

#[derive(Debug, Args)]
struct InspectArgs {
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
    /// Which conversation to show (0-based).
    #[arg(long, default_value_t = 0)]
    index: usize,
    /// Training's max_seq_len, for the truncation count.
    #[arg(long, default_value_t = 2048)]
    max_seq_len: usize,
    /// Skip and count bad lines.
    #[arg(long)]
    skip_bad_lines: bool,
    /// Preference pairs: keep_start or keep_end, as data.truncation_mode.
    #[arg(long, default_value = "keep_start")]
    truncation_mode: String,
}

impl InspectArgs {
    fn spec(&self) -> Spec {
        Spec::new(&self.data, &self.split)
    }
}

/// Whether the data holds preference pairs (its first record has `chosen`), from any source.
fn holds_pairs(spec: &Spec) -> bool {
    crate::data::source::first_record(spec).is_some_and(|v| v.get("chosen").is_some())
}

/// `ids` as text, token by token, the scored ones (`mark[t]`) between ⟦ ⟧.
fn marked(tok: &TokenizerBundle, ids: &[u32], mark: &[bool]) -> Result<String> {
    let decode = |n: usize| -> Result<String> {
        tok.tokenizer
            .decode(&ids[..n], false)
            .map_err(|e| anyhow::anyhow!("decoding: {e}"))
    };
    let (mut shown, mut prev, mut inside) = (String::new(), String::new(), false);
    for (t, &scored) in mark.iter().enumerate().take(ids.len()) {
        let text = decode(t + 1)?;
        let piece = text
            .strip_prefix(prev.as_str())
            .unwrap_or(&text[prev.len().min(text.len())..]);
        if scored != inside {
            shown.push(if scored { '⟦' } else { '⟧' });
            inside = scored;
        }
        shown.push_str(piece);
        prev = text;
    }
    if inside {
        shown.push('⟧');
    }
    Ok(shown)
}

/// A conversation's rendered text cut at token boundaries (each token with any gap before it), the
/// trained tokens between ⟦ ⟧.
fn rendered(tok: &TokenizerBundle, e: &crate::data::Encoded) -> Result<String> {
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
    Ok(shown)
}

/// `data inspect` on preference pairs: one pair as training sees it (after truncation, the scored
/// completion tokens between ⟦ ⟧), counts, and lints.
fn inspect_pairs(a: &InspectArgs, tok: &TokenizerBundle) -> Result<ExitCode> {
    use crate::data::pairs::{Skip, cut_pair, encode_pair, read_pairs};
    let mode: crate::data::pairs::Truncation = a.truncation_mode.parse()?;
    let (raw, bad) = read_pairs(&a.spec(), a.skip_bad_lines)?;
    if a.index >= raw.len() {
        bail!("--index {}: the file has {} pairs", a.index, raw.len())
    }
    let mut lints = Vec::new();
    let (mut truncated, mut kept, mut tokens, mut scored) = (0, 0, 0, 0);
    for (i, r) in raw.iter().enumerate() {
        let ids = encode_pair(tok, r).with_context(|| format!("{}:{}", a.data, r.line))?;
        let rows = cut_pair(&ids, a.max_seq_len, mode);
        if i == a.index {
            println!(
                "pair {} (line {}{}), {} prompt tokens:",
                a.index,
                r.line,
                if r.implicit {
                    ", prompt implicit: chosen and rejected's common start"
                } else {
                    ""
                },
                ids.prompt.len()
            );
            match &rows {
                Ok(p) => {
                    for (name, seq) in [("chosen", &p.chosen), ("rejected", &p.rejected)] {
                        let mark: Vec<bool> = seq
                            .completion
                            .iter()
                            .enumerate()
                            .map(|(t, c)| *c && t > 0)
                            .collect();
                        println!(
                            "{name} ({} tokens, {} scored):\n{}\n",
                            seq.ids.len(),
                            seq.scored_len(),
                            marked(tok, &seq.ids, &mark)?
                        );
                    }
                }
                Err(e) => println!("skipped in training: {e:?}\n"),
            }
        }
        match rows {
            Ok(p) => {
                kept += 1;
                truncated += usize::from(p.truncated);
                tokens += p.tokens();
                scored += p.chosen.scored_len() + p.rejected.scored_len();
                if p.truncated {
                    lints.push(format!(
                        "line {}: cut to max_seq_len {} ({})",
                        r.line, a.max_seq_len, a.truncation_mode
                    ));
                }
            }
            Err(Skip::LongPrompt) => lints.push(format!(
                "line {}: the prompt alone ({} tokens) fills max_seq_len {}: skipped (raise it, or --truncation-mode keep_end)",
                r.line,
                ids.prompt.len(),
                a.max_seq_len
            )),
            Err(Skip::Identical) => lints.push(format!(
                "line {}: chosen equals rejected: skipped (nothing to prefer)",
                r.line
            )),
            Err(Skip::EmptyCompletion) => lints.push(format!(
                "line {}: a completion keeps no scored token: skipped (its average log-prob would be 0/0, NaN in TRL)",
                r.line
            )),
        }
        // TRL warns too: the prompt's last tokens merged with the completion's first.
        let alone = match &r.prompt {
            crate::data::pairs::Side::Messages(m) => {
                tok.encode(&tok.template.render(m, true)?)?.get_ids().len()
            }
            crate::data::pairs::Side::Text(t) => tok
                .tokenizer
                .encode(t.as_str(), true)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
                .get_ids()
                .len(),
        };
        if alone > ids.prompt.len() {
            lints.push(format!(
                "line {}: the prompt's last {} token(s) merge with the completion: the completion starts where they diverge",
                r.line,
                alone - ids.prompt.len()
            ));
        }
    }
    println!(
        "{} pairs, {kept} kept ({tokens} tokens, {scored} scored completion tokens), {truncated} truncated at {}, {} skipped, {} bad lines skipped",
        raw.len(),
        a.max_seq_len,
        raw.len() - kept,
        bad.len()
    );
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

pub fn run(args: DataArgs) -> Result<ExitCode> {
    let a = match args.command {
        DataCommand::Inspect(a) => a,
        DataCommand::Prepare(p) => return super::prepare::run(p),
    };
    let format = super::prepare::parse_format(&a.format)?;
    let columns = super::prepare::parse_columns(&a.columns)?;
    let dir = crate::hub::resolve(&a.model)?;
    let tok = TokenizerBundle::from_dir(&dir)?;
    // A forced format is read as that format, even where the first record looks like a pair.
    if format == crate::data::formats::Format::Auto && holds_pairs(&a.spec()) {
        return inspect_pairs(&a, &tok);
    }
    let report = crate::data::read_data(&a.spec(), format, &columns, a.skip_bad_lines)?;
    let encoded = report.encode(&tok)?;
    let Some(e) = encoded.get(a.index) else {
        bail!(
            "--index {}: the file has {} examples",
            a.index,
            encoded.len()
        )
    };
    if !report.texts.is_empty() {
        // A document: its ids as training has them (with any special tokens the tokenizer adds),
        // every one trained.
        println!("document {} (line {}):", a.index, e.line);
        println!("{}\n", marked(&tok, &e.ids, &e.trained)?);
    } else {
        println!("conversation {} (line {}):", a.index, e.line);
        println!("{}\n", rendered(&tok, e)?);
    }
    let (_, stats) = build_rows(&encoded, a.max_seq_len, true);
    println!(
        "{} {}, {} tokens, {} trained ({:.1}%), {} truncated at {}, {} dropped (nothing trained left), {} bad lines skipped",
        stats.conversations,
        if report.texts.is_empty() {
            "conversations"
        } else {
            "documents"
        },
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
