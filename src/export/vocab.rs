//! The tokenizer as llama.cpp's `phi3` converter writes it (`tokenizer.ggml.model = "llama"`): the
//! SentencePiece pieces, scores and types of tokenizer.model, padded to the model's vocab_size with
//! `[PADi]` (score −10000, UNUSED), then the added tokens of tokenizer_config.json /
//! tokenizer.json (score −1000, CONTROL when special, else USER_DEFINED).

use anyhow::{Context, Result, bail};
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
            1 => at += 8,
            2 => {
                let len = varint(b, &mut at)? as usize;
                let payload = b.get(at..at + len).context("truncated field")?;
                at += len;
                f(field, wire, payload, 0)?;
            }
            5 => {
                let payload = b.get(at..at + 4).context("truncated field")?;
                at += 4;
                f(field, wire, payload, 0)?;
            }
            other => bail!("unsupported protobuf wire type {other}"),
        }
    }
    Ok(())
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
                    (3, 0) => ty = x as i32,
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
    Ok(v)
}

/// The vocabulary llama.cpp's converter would write for the model in `dir`.
pub fn phi3_vocab(dir: &Path, vocab_size: usize) -> Result<Vocab> {
    let sp = read_sentencepiece(&dir.join("tokenizer.model"))
        .context("GGUF export of a SentencePiece (llama) vocabulary needs tokenizer.model")?;
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
    if let Ok(bytes) = std::fs::read(dir.join("tokenizer_config.json")) {
        let cfg: serde_json::Value = serde_json::from_slice(&bytes)?;
        if let Some(dec) = cfg.get("added_tokens_decoder").and_then(|d| d.as_object()) {
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
    }
    if let Ok(bytes) = std::fs::read(dir.join("tokenizer.json")) {
        let tj: serde_json::Value = serde_json::from_slice(&bytes)?;
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
