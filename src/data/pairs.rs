//! Preference pairs for DPO, IPO, ORPO and SimPO, read and tokenized as TRL's `DPOTrainer` does
//! (TRL 1.16, pinned in tests/fixtures/gen_pref_goldens.py):
//!
//! - a record (a JSONL line, a JSON array's element, a Parquet row: [`super::source`]) is
//!   `{"prompt", "chosen", "rejected"}`, each a string or a list of messages, or
//!   `{"chosen", "rejected"}` alone, whose prompt is their longest common prefix (of messages, or
//!   of characters for strings: TRL's `extract_prompt`, whose space rule hands a space before the
//!   difference to the completions);
//! - strings are tokenized as they are, with the tokenizer's own special tokens (its
//!   post-processor: Phi-3's adds none), each completion given the eos text unless it already ends
//!   with it; conversations through the chat template: the prompt with the generation prompt,
//!   prompt + chosen and prompt + rejected without (the template closes them);
//! - the prompt's ids are where the three tokenizations stop agreeing (a token merging across the
//!   boundary moves the end of the prompt into the completions), the completions the rest;
//! - each sequence `prompt + completion` is cut to `max_length` on its own: `keep_start` keeps the
//!   start (and a pair whose prompt alone fills `max_length` is dropped, as TRL drops it),
//!   `keep_end` the end.
//!
//! Where TRL would go on to a NaN (a completion with no scored token, whose average log-prob is
//! 0/0) or learn nothing (chosen equal to rejected), the pair is skipped and counted.

use super::jsonl::{Message, Role};
use super::source::Spec;
use super::tokenize::TokenizerBundle;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// One side of a pair: plain text, or messages.
#[derive(Debug, Clone, PartialEq)]
pub enum Side {
    Text(String),
    Messages(Vec<Message>),
}

impl Side {
    fn is_chat(&self) -> bool {
        matches!(self, Side::Messages(_))
    }
}

/// A pair as read.
#[derive(Debug, Clone, PartialEq)]
pub struct RawPair {
    pub prompt: Side,
    pub chosen: Side,
    pub rejected: Side,
    /// Whether the prompt was implicit (extracted from chosen and rejected).
    pub implicit: bool,
    /// 1-based line.
    pub line: usize,
}

/// How sequences longer than `max_length` are cut (TRL's `truncation_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    #[default]
    KeepStart,
    KeepEnd,
}

impl std::str::FromStr for Truncation {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "keep_start" => Ok(Self::KeepStart),
            "keep_end" => Ok(Self::KeepEnd),
            other => bail!("unknown truncation mode `{other}`: use keep_start or keep_end"),
        }
    }
}

/// A tokenized pair: TRL's `prompt_ids`, `chosen_ids`, `rejected_ids`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairIds {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub line: usize,
}

/// One scored sequence: `prompt + completion` after truncation, and which tokens are the
/// completion's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seq {
    pub ids: Vec<u32>,
    pub completion: Vec<bool>,
}

impl Seq {
    /// Completion tokens (TRL's `completion_mask.sum()`).
    pub fn completion_len(&self) -> usize {
        self.completion.iter().filter(|c| **c).count()
    }

    /// Completion tokens that a position predicts (all but one at index 0): the tokens whose
    /// log-probs a pair's score sums.
    pub fn scored_len(&self) -> usize {
        self.completion.iter().skip(1).filter(|c| **c).count()
    }
}

/// A pair ready to batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairRows {
    pub chosen: Seq,
    pub rejected: Seq,
    pub line: usize,
    pub truncated: bool,
}

impl PairRows {
    /// Input tokens of both sequences.
    pub fn tokens(&self) -> usize {
        self.chosen.ids.len() + self.rejected.ids.len()
    }
}

/// What reading and cutting pairs did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PairStats {
    pub pairs: usize,
    /// Pairs with a sequence cut to `max_length` (and kept).
    pub truncated: usize,
    /// Lines whose prompt alone fills `max_length` under `keep_start` (TRL drops them too).
    pub dropped_long_prompt: Vec<usize>,
    /// Lines whose chosen equals their rejected.
    pub identical: Vec<usize>,
    /// Lines with a completion left without a scored token.
    pub empty_completion: Vec<usize>,
    /// Lines skipped as unreadable (`--skip-bad-lines`).
    pub bad_lines: BadLines,
    pub tokens: usize,
    pub completion_tokens: usize,
}

impl PairStats {
    /// Pairs kept.
    pub fn kept(&self) -> usize {
        self.pairs
            - self.dropped_long_prompt.len()
            - self.identical.len()
            - self.empty_completion.len()
    }

    /// One line per kind of skip, naming the lines (at most 8 each).
    pub fn skip_notes(&self) -> Vec<String> {
        let lines = |v: &[usize]| {
            let shown: Vec<String> = v.iter().take(8).map(|l| l.to_string()).collect();
            format!(
                "{}{}",
                shown.join(", "),
                if v.len() > 8 { ", …" } else { "" }
            )
        };
        let mut notes = Vec::new();
        if !self.dropped_long_prompt.is_empty() {
            notes.push(format!(
                "{} pair(s) skipped: the prompt alone fills max_seq_len (lines {}); raise training.max_seq_len or use data.truncation_mode = \"keep_end\"",
                self.dropped_long_prompt.len(),
                lines(&self.dropped_long_prompt)
            ));
        }
        if !self.identical.is_empty() {
            notes.push(format!(
                "{} pair(s) skipped: chosen equals rejected, nothing to prefer (lines {})",
                self.identical.len(),
                lines(&self.identical)
            ));
        }
        if !self.empty_completion.is_empty() {
            notes.push(format!(
                "{} pair(s) skipped: a completion has no scored token after truncation, whose average log-prob would be 0/0 (lines {})",
                self.empty_completion.len(),
                lines(&self.empty_completion)
            ));
        }
        notes
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessage {
    role: String,
    content: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawSide {
    Text(String),
    Messages(Vec<RawMessage>),
}

#[derive(Deserialize)]
struct RawLine {
    prompt: Option<RawSide>,
    chosen: Option<RawSide>,
    rejected: Option<RawSide>,
}

fn side(raw: RawSide, key: &str) -> std::result::Result<Side, String> {
    Ok(match raw {
        RawSide::Text(t) => Side::Text(t),
        RawSide::Messages(m) => Side::Messages(
            m.into_iter()
                .enumerate()
                .map(|(i, m)| {
                    let role = match m.role.as_str() {
                        "system" => Role::System,
                        "user" => Role::User,
                        "assistant" => Role::Assistant,
                        other => {
                            return Err(format!(
                                "{key}: message {i}: unknown role `{other}` (use system, user or assistant)"
                            ));
                        }
                    };
                    Ok(Message::new(role, m.content))
                })
                .collect::<std::result::Result<_, _>>()?,
        ),
    })
}

/// TRL's `extract_prompt` over items (messages, or characters): the index where chosen and
/// rejected first differ; a space right before it goes to the completions. When one is a prefix
/// of the other TRL's loop ends on its last index without breaking, leaving the last shared item
/// to the completions: kept as TRL does.
fn common_prefix<T: PartialEq>(a: &[T], b: &[T], is_space: impl Fn(&T) -> bool) -> usize {
    let n = a.len().min(b.len());
    for idx in 0..n {
        if a[idx] != b[idx] {
            return if idx > 0 && is_space(&a[idx - 1]) {
                idx - 1
            } else {
                idx
            };
        }
    }
    n.saturating_sub(1)
}

#[cfg(test)]
fn parse_line(text: &str) -> std::result::Result<(Side, Side, Side, bool), String> {
    parse_record(serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?)
}

fn parse_record(v: serde_json::Value) -> std::result::Result<(Side, Side, Side, bool), String> {
    let raw: RawLine = serde_json::from_value(v).map_err(|e| format!("not a pair: {e}"))?;
    let (Some(chosen), Some(rejected)) = (raw.chosen, raw.rejected) else {
        return Err(
            "expected {\"prompt\", \"chosen\", \"rejected\"} or {\"chosen\", \"rejected\"} (strings or lists of messages)"
                .into(),
        );
    };
    let chosen = side(chosen, "chosen")?;
    let rejected = side(rejected, "rejected")?;
    let (prompt, chosen, rejected, implicit) = match raw.prompt {
        Some(p) => (side(p, "prompt")?, chosen, rejected, false),
        None => match (chosen, rejected) {
            (Side::Text(c), Side::Text(r)) => {
                let (cc, rc): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
                let k = common_prefix(&cc, &rc, |ch| *ch == ' ');
                (
                    Side::Text(cc[..k].iter().collect()),
                    Side::Text(cc[k..].iter().collect()),
                    Side::Text(rc[k..].iter().collect()),
                    true,
                )
            }
            (Side::Messages(c), Side::Messages(r)) => {
                let k = common_prefix(&c, &r, |_| false);
                (
                    Side::Messages(c[..k].to_vec()),
                    Side::Messages(c[k..].to_vec()),
                    Side::Messages(r[k..].to_vec()),
                    true,
                )
            }
            _ => {
                return Err(
                    "chosen and rejected must both be strings or both lists of messages".into(),
                );
            }
        },
    };
    if prompt.is_chat() != chosen.is_chat() || chosen.is_chat() != rejected.is_chat() {
        return Err(
            "prompt, chosen and rejected must all be strings or all lists of messages".into(),
        );
    }
    Ok((prompt, chosen, rejected, implicit))
}

/// `(line, reason)` of each line skipped as unreadable.
pub type BadLines = Vec<(usize, String)>;

/// Reads preference pairs from any source [`super::source`] reads (JSONL, JSON arrays, gzip,
/// zstd, Parquet, directories, globs); blank lines are ignored. A bad record is an error naming
/// its place, or (`skip_bad_lines`) skipped and reported.
pub fn read_pairs(spec: &Spec, skip_bad_lines: bool) -> Result<(Vec<RawPair>, BadLines)> {
    let (mut pairs, mut skipped) = (Vec::new(), Vec::new());
    super::source::for_each_record(spec, |place, parsed| {
        match parsed.and_then(parse_record) {
            Ok((prompt, chosen, rejected, implicit)) => pairs.push(RawPair {
                prompt,
                chosen,
                rejected,
                implicit,
                line: place.line,
            }),
            Err(reason) if skip_bad_lines => {
                skipped.push((place.line, format!("{place}: {reason}")))
            }
            Err(reason) => bail!(
                "{place}: {reason} (fix the line, or pass --skip-bad-lines to skip such lines)"
            ),
        }
        Ok(())
    })?;
    if pairs.is_empty() {
        bail!("{spec}: no preference pairs (expected records with \"chosen\" and \"rejected\")");
    }
    Ok((pairs, skipped))
}

fn common_ids(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Tokenizes a pair as TRL's `DPOTrainer._prepare_dataset` does (see the module docs).
pub fn encode_pair(tok: &TokenizerBundle, pair: &RawPair) -> Result<PairIds> {
    let eos = tok.template.eos_token.as_str();
    let text_ids = |s: &str| -> Result<Vec<u32>> {
        Ok(tok
            .tokenizer
            .encode(s, true)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
            .get_ids()
            .to_vec())
    };
    let chat_ids = |m: &[Message], generation: bool| -> Result<Vec<u32>> {
        Ok(tok
            .encode(&tok.template.render(m, generation)?)?
            .get_ids()
            .to_vec())
    };
    let (prompt, pc, pr) = match (&pair.prompt, &pair.chosen, &pair.rejected) {
        (Side::Text(p), Side::Text(c), Side::Text(r)) => {
            let close = |s: &str| {
                if s.ends_with(eos) {
                    s.to_string()
                } else {
                    format!("{s}{eos}")
                }
            };
            (
                text_ids(p)?,
                text_ids(&format!("{p}{}", close(c)))?,
                text_ids(&format!("{p}{}", close(r)))?,
            )
        }
        (Side::Messages(p), Side::Messages(c), Side::Messages(r)) => {
            let join = |x: &[Message]| [p.as_slice(), x].concat();
            (
                chat_ids(p, true)?,
                chat_ids(&join(c), false)?,
                chat_ids(&join(r), false)?,
            )
        }
        _ => bail!("line {}: mixed strings and messages", pair.line),
    };
    let k = common_ids(&prompt, &pc).min(common_ids(&prompt, &pr));
    Ok(PairIds {
        prompt: prompt[..k].to_vec(),
        chosen: pc[k..].to_vec(),
        rejected: pr[k..].to_vec(),
        line: pair.line,
    })
}

fn cut(prompt: &[u32], completion: &[u32], max_length: usize, mode: Truncation) -> (Seq, bool) {
    let ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let completion_mask: Vec<bool> = std::iter::repeat_n(false, prompt.len())
        .chain(std::iter::repeat_n(true, completion.len()))
        .collect();
    let n = ids.len();
    if n <= max_length {
        return (
            Seq {
                ids,
                completion: completion_mask,
            },
            false,
        );
    }
    let range = match mode {
        Truncation::KeepStart => 0..max_length,
        Truncation::KeepEnd => n - max_length..n,
    };
    (
        Seq {
            ids: ids[range.clone()].to_vec(),
            completion: completion_mask[range].to_vec(),
        },
        true,
    )
}

/// Why [`cut_pair`] left a pair out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    LongPrompt,
    Identical,
    EmptyCompletion,
}

/// The collator's sequences of one pair, or why it is skipped.
pub fn cut_pair(
    p: &PairIds,
    max_length: usize,
    mode: Truncation,
) -> std::result::Result<PairRows, Skip> {
    if mode == Truncation::KeepStart && p.prompt.len() >= max_length {
        return Err(Skip::LongPrompt);
    }
    if p.chosen == p.rejected {
        return Err(Skip::Identical);
    }
    let (chosen, tc) = cut(&p.prompt, &p.chosen, max_length, mode);
    let (rejected, tr) = cut(&p.prompt, &p.rejected, max_length, mode);
    if chosen.scored_len() == 0 || rejected.scored_len() == 0 {
        return Err(Skip::EmptyCompletion);
    }
    Ok(PairRows {
        chosen,
        rejected,
        line: p.line,
        truncated: tc || tr,
    })
}

/// Reads, tokenizes and cuts a preference file: the pairs kept, and what happened.
pub fn load_pairs(
    tok: &TokenizerBundle,
    spec: &Spec,
    max_length: usize,
    mode: Truncation,
    skip_bad_lines: bool,
) -> Result<(Vec<PairRows>, PairStats)> {
    let (raw, bad) = read_pairs(spec, skip_bad_lines)?;
    let mut stats = PairStats {
        pairs: raw.len(),
        bad_lines: bad,
        ..Default::default()
    };
    let mut kept = Vec::new();
    for r in &raw {
        let ids = encode_pair(tok, r).with_context(|| format!("{spec}:{}", r.line))?;
        match cut_pair(&ids, max_length, mode) {
            Ok(rows) => {
                stats.truncated += usize::from(rows.truncated);
                stats.tokens += rows.tokens();
                stats.completion_tokens +=
                    rows.chosen.completion_len() + rows.rejected.completion_len();
                kept.push(rows);
            }
            Err(Skip::LongPrompt) => stats.dropped_long_prompt.push(r.line),
            Err(Skip::Identical) => stats.identical.push(r.line),
            Err(Skip::EmptyCompletion) => stats.empty_completion.push(r.line),
        }
    }
    if kept.is_empty() {
        let notes = stats.skip_notes().join("; ");
        bail!("{spec}: no usable preference pair ({notes})");
    }
    Ok((kept, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implicit_prompts_follow_trl_extract_prompt() {
        let (p, c, r, implicit) =
            parse_line(r#"{"chosen": "The sky is blue.", "rejected": "The sky is green."}"#)
                .unwrap();
        assert!(implicit);
        // The space before the difference goes to the completions.
        assert_eq!(p, Side::Text("The sky is".into()));
        assert_eq!(c, Side::Text(" blue.".into()));
        assert_eq!(r, Side::Text(" green.".into()));
        // One a prefix of the other: TRL's loop ends without a break, on the last shared index.
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 3, 4], |_| false), 2);
    }

    #[test]
    fn bad_lines_say_what_is_expected() {
        assert!(
            parse_line(r#"{"prompt": "x", "chosen": "y"}"#)
                .unwrap_err()
                .contains("expected")
        );
        let mixed = parse_line(
            r#"{"prompt": "x", "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#,
        )
        .unwrap_err();
        assert!(mixed.contains("all be strings"), "{mixed}");
        assert!(
            parse_line(r#"{"chosen": [{"role": "bot", "content": "a"}], "rejected": []}"#)
                .unwrap_err()
                .contains("unknown role `bot`")
        );
    }

    #[test]
    fn truncation_cuts_each_sequence_on_its_own() {
        let p = PairIds {
            prompt: vec![1, 2, 3],
            chosen: vec![4, 5],
            rejected: vec![6, 7, 8, 9],
            line: 1,
        };
        let rows = cut_pair(&p, 5, Truncation::KeepStart).unwrap();
        assert_eq!(rows.chosen.ids, vec![1, 2, 3, 4, 5]);
        assert_eq!(rows.rejected.ids, vec![1, 2, 3, 6, 7]);
        assert!(rows.truncated);
        let rows = cut_pair(&p, 5, Truncation::KeepEnd).unwrap();
        assert_eq!(rows.rejected.ids, vec![3, 6, 7, 8, 9]);
        assert_eq!(
            rows.rejected.completion,
            vec![false, true, true, true, true]
        );
        assert_eq!(
            cut_pair(&p, 3, Truncation::KeepStart),
            Err(Skip::LongPrompt)
        );
        // keep_end with the whole row inside the completion: its first token is not scored.
        let q = PairIds {
            prompt: vec![1],
            chosen: vec![2, 3, 4],
            rejected: vec![5],
            line: 2,
        };
        assert_eq!(
            cut_pair(&q, 1, Truncation::KeepEnd),
            Err(Skip::EmptyCompletion)
        );
        let same = PairIds {
            rejected: p.chosen.clone(),
            ..p
        };
        assert_eq!(
            cut_pair(&same, 9, Truncation::KeepStart),
            Err(Skip::Identical)
        );
    }
}
