//! The tokenizer as llama.cpp's `phi3` converter writes it ([`write_tokenizer`]), of two kinds:
//! - SentencePiece (`tokenizer.ggml.model = "llama"`, Phi-3 and Phi-3.5): the pieces, scores and
//!   types of tokenizer.model, padded to the model's vocab_size with `[PADi]` (score −10000,
//!   UNUSED), then the added tokens of added_tokens.json (USER_DEFINED), tokenizer_config.json and
//!   tokenizer.json (score −1000, CONTROL when special, else USER_DEFINED).
//! - BPE (`"gpt2"`, Phi-4-mini: tokenizer_config.json's `tokenizer_class` is `GPT2Tokenizer`): see
//!   `bpe`.
//!
//! Both then get gguf-py's special tokens, flags, merges (BPE) and chat template (`special`).

mod bpe;
mod post_processor;
mod special;

pub use bpe::{BpeVocab, chkhsh, is_known_pre, pre_of_chkhsh, read_bpe};
pub use special::SpecialVocab;

use super::gguf::{GgufWriter, Value};
use crate::model::config::Phi3Config;
use anyhow::{Context, Result, bail, ensure};
use std::path::Path;

/// llama.cpp's token types (SentencePiece's numbering).
pub const NORMAL: i32 = 1;
pub const UNKNOWN: i32 = 2;
pub const CONTROL: i32 = 3;
pub const USER_DEFINED: i32 = 4;
pub const UNUSED: i32 = 5;
pub const BYTE: i32 = 6;

/// Tokens, scores and types, indexed by id.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub types: Vec<i32>,
}

fn varint(b: &[u8], at: &mut usize) -> Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at).context("truncated varint")?;
        *at += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    bail!("varint too long")
}

/// Visits the fields of a protobuf message: `(field number, wire type, payload)`.
fn fields(b: &[u8], mut f: impl FnMut(u64, u64, &[u8], u64) -> Result<()>) -> Result<()> {
    let mut at = 0;
    while at < b.len() {
        let key = varint(b, &mut at)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = varint(b, &mut at)?;
                f(field, wire, &[], v)?;
            }
            1 => {
                take(b, &mut at, 8)?;
            }
            2 => {
                let len = varint(b, &mut at)?;
                let payload = take(b, &mut at, usize::try_from(len).unwrap_or(usize::MAX))?;
                f(field, wire, payload, 0)?;
            }
            5 => {
                let payload = take(b, &mut at, 4)?;
                f(field, wire, payload, 0)?;
            }
            other => bail!("unsupported protobuf wire type {other} at byte {at}"),
        }
    }
    Ok(())
}

/// The next `len` bytes of `b` from `*at` (advancing it), or an error when fewer are left.
fn take<'a>(b: &'a [u8], at: &mut usize, len: usize) -> Result<&'a [u8]> {
    let payload = at
        .checked_add(len)
        .and_then(|end| b.get(*at..end))
        .with_context(|| {
            format!(
                "truncated field: {len} bytes at byte {at}, {} left",
                b.len() - *at
            )
        })?;
    *at += len;
    Ok(payload)
}

/// The pieces of a SentencePiece `tokenizer.model` (ModelProto field 1: piece, score, type).
pub fn read_sentencepiece(path: &Path) -> Result<Vocab> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut v = Vocab {
        tokens: Vec::new(),
        scores: Vec::new(),
        types: Vec::new(),
    };
    fields(&bytes, |field, wire, payload, _| {
        if field == 1 && wire == 2 {
            let (mut piece, mut score, mut ty) = (String::new(), 0f32, NORMAL);
            fields(payload, |f, w, p, x| {
                match (f, w) {
                    (1, 2) => {
                        piece = String::from_utf8(p.to_vec()).context("piece is not UTF-8")?
                    }
                    (2, 5) => score = f32::from_le_bytes(p.try_into().expect("4 bytes")),
                    (3, 0) => {
                        ty = i32::try_from(x)
                            .ok()
                            .filter(|t| (NORMAL..=BYTE).contains(t))
                            .with_context(|| {
                                format!(
                                    "piece {} has type {x}, not a SentencePiece type (1 to 6)",
                                    v.tokens.len()
                                )
                            })?
                    }
                    _ => {}
                }
                Ok(())
            })?;
            v.tokens.push(piece);
            v.scores.push(score);
            v.types.push(ty);
        }
        Ok(())
    })
    .with_context(|| format!("{}: not a SentencePiece model", path.display()))?;
    ensure!(
        !v.tokens.is_empty(),
        "{}: not a SentencePiece model (no pieces)",
        path.display()
    );
    Ok(v)
}

/// The vocabulary llama.cpp's converter would write for the model in `dir`.
pub fn phi3_vocab(dir: &Path, vocab_size: usize) -> Result<Vocab> {
    let path = dir.join("tokenizer.model");
    if !path.is_file() {
        bail!(
            "{}: missing; GGUF export of a SentencePiece (llama) vocabulary needs tokenizer.model \
             (BPE vocabularies are recognized by tokenizer_config.json's tokenizer_class \
             GPT2Tokenizer)",
            path.display()
        );
    }
    let sp = read_sentencepiece(&path)?;
    let mut v = Vocab {
        tokens: (0..vocab_size).map(|i| format!("[PAD{i}]")).collect(),
        scores: vec![-10000.0; vocab_size],
        types: vec![UNUSED; vocab_size],
    };
    for (id, ((t, s), ty)) in sp
        .tokens
        .into_iter()
        .zip(sp.scores)
        .zip(sp.types)
        .enumerate()
        .take(vocab_size)
    {
        v.tokens[id] = t;
        v.scores[id] = s;
        v.types[id] = ty;
    }
    let mut added = |id: usize, content: &str, special: bool| {
        if id < vocab_size {
            v.tokens[id] = content.to_string();
            v.scores[id] = -1000.0;
            v.types[id] = if special { CONTROL } else { USER_DEFINED };
        }
    };
    let path = dir.join("added_tokens.json");
    if let Some(map) = read_json(&path)? {
        let map = map
            .as_object()
            .with_context(|| format!("{}: not a JSON object", path.display()))?;
        for (content, id) in map {
            let id = id.as_u64().with_context(|| {
                format!(
                    "{}: the id of `{content}` is not a token id",
                    path.display()
                )
            })?;
            added(id as usize, content, false);
        }
    }
    if let Some(cfg) = read_json(&dir.join("tokenizer_config.json"))?
        && let Some(dec) = cfg.get("added_tokens_decoder").and_then(|d| d.as_object())
    {
        for (id, data) in dec {
            if let (Ok(id), Some(content)) = (
                id.parse::<usize>(),
                data.get("content").and_then(|c| c.as_str()),
            ) {
                added(
                    id,
                    content,
                    data.get("special")
                        .and_then(|s| s.as_bool())
                        .unwrap_or(false),
                );
            }
        }
    }
    if let Some(tj) = read_json(&dir.join("tokenizer.json"))? {
        for data in tj
            .get("added_tokens")
            .and_then(|a| a.as_array())
            .into_iter()
            .flatten()
        {
            if let (Some(id), Some(content)) = (
                data.get("id").and_then(|i| i.as_u64()),
                data.get("content").and_then(|c| c.as_str()),
            ) {
                added(
                    id as usize,
                    content,
                    data.get("special")
                        .and_then(|s| s.as_bool())
                        .unwrap_or(false),
                );
            }
        }
    }
    Ok(v)
}

/// A JSON file, or `None` when there is no such file; unreadable or invalid JSON is an error that
/// names the file.
pub(crate) fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .with_context(|| format!("{}: not valid JSON", path.display()))
}

/// tokenizer_config.json's `tokenizer_class` values of BPE ("gpt2") vocabularies: llama.cpp's
/// converter checks for `GPT2Tokenizer` (Phi-4-mini); its fast twin names the same tokenizer.
const BPE_TOKENIZER_CLASSES: [&str; 2] = ["GPT2Tokenizer", "GPT2TokenizerFast"];

/// Writes the tokenizer keys llama.cpp's `phi3` converter writes for the checkpoint in `dir`: a
/// BPE vocabulary when tokenizer_config.json's `tokenizer_class` says GPT-2, else SentencePiece.
/// `pre` overrides the BPE pre-tokenizer name (see [`read_bpe`]).
pub fn write_tokenizer(
    w: &mut GgufWriter<'_>,
    dir: &Path,
    cfg: &Phi3Config,
    pre: Option<&str>,
) -> Result<()> {
    let tc = read_json(&dir.join("tokenizer_config.json"))?;
    let class = tc
        .as_ref()
        .and_then(|t| t.get("tokenizer_class"))
        .and_then(|c| c.as_str());
    if class.is_some_and(|c| BPE_TOKENIZER_CLASSES.contains(&c)) {
        let v = read_bpe(dir, cfg.vocab_size, pre)?;
        w.kv("tokenizer.ggml.model", Value::Str("gpt2".into()))?;
        w.kv("tokenizer.ggml.pre", Value::Str(v.pre))?;
        w.kv("tokenizer.ggml.tokens", Value::ArrStr(v.tokens))?;
        w.kv("tokenizer.ggml.token_type", Value::ArrI32(v.types))?;
        SpecialVocab::load(dir, true, None)?.write(w)
    } else {
        let v = phi3_vocab(dir, cfg.vocab_size)?;
        let n_vocab = v.tokens.len();
        w.kv("tokenizer.ggml.model", Value::Str("llama".into()))?;
        w.kv("tokenizer.ggml.pre", Value::Str("default".into()))?;
        w.kv("tokenizer.ggml.tokens", Value::ArrStr(v.tokens))?;
        w.kv("tokenizer.ggml.scores", Value::ArrF32(v.scores))?;
        w.kv("tokenizer.ggml.token_type", Value::ArrI32(v.types))?;
        SpecialVocab::load(dir, false, Some(n_vocab))?.write(w)
    }
}
