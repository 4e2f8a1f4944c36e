//! BPE vocabularies (`tokenizer.ggml.model = "gpt2"`, Phi-4-mini's) as llama.cpp's converter writes
//! them (`_set_vocab_gpt2` → `get_vocab_base`): the byte-level token strings of tokenizer.json by
//! id, ids without a token as `[PADi]` (UNUSED) up to config.json's vocab_size, added tokens as
//! CONTROL when special or when they look special (`<|…|>`), else USER_DEFINED, the rest NORMAL.
//!
//! `tokenizer.ggml.pre` names the pre-tokenizer llama.cpp must run. The converter finds it by
//! hashing the tokenizer's output on a check text, which only works for vocabularies it has seen;
//! we read it off tokenizer.json's `pre_tokenizer` instead ([`PRE_TOKENIZERS`]), and refuse the
//! ones we cannot name rather than guess.

use super::{CONTROL, NORMAL, UNUSED, USER_DEFINED, read_json};
use anyhow::{Context, Result, bail, ensure};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::Path;

/// The o200k (GPT-4o) split regex, as tokenizer.json holds it (llama.cpp `LLAMA_VOCAB_PRE_TYPE_GPT4O`).
pub const O200K_REGEX: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Llama-3's split regex, as tokenizer.json holds it (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
pub const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// What tokenizer.json's pre-tokenizer is, for the ones we can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// `Sequence[Split(regex, Isolated), ByteLevel(use_regex: false)]`.
    SplitThenByteLevel(&'static str),
    /// `ByteLevel(use_regex: true)` alone: GPT-2's built-in regex.
    ByteLevelRegex,
}

/// llama.cpp's `tokenizer.ggml.pre` names, by pre-tokenizer (none of them with a normalizer or
/// `add_prefix_space`): the pre-tokenizer types that run exactly these regexes in llama-vocab.cpp.
pub const PRE_TOKENIZERS: [(&str, PreTokenizer, &str); 3] = [
    (
        "gpt-4o",
        PreTokenizer::SplitThenByteLevel(O200K_REGEX),
        "the o200k Split regex + ByteLevel (GPT-4o, Phi-4-mini)",
    ),
    (
        "llama-bpe",
        PreTokenizer::SplitThenByteLevel(LLAMA3_REGEX),
        "the Llama-3 Split regex + ByteLevel",
    ),
    (
        "gpt-2",
        PreTokenizer::ByteLevelRegex,
        "ByteLevel with its built-in GPT-2 regex",
    ),
];

/// Tokens and types by id, and the pre-tokenizer name.
#[derive(Debug, Clone, PartialEq)]
pub struct BpeVocab {
    pub tokens: Vec<String>,
    pub types: Vec<i32>,
    pub pre: &'static str,
}

/// gguf's `does_token_look_special`: added tokens that ought to be control tokens although not
/// marked special.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// GPT-2's byte → printable character table (`bytes_to_unicode`), reversed.
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let c = c as u32;
    if c < 256 && printable(c) {
        return Some(c as u8);
    }
    // The others map to 256, 257, … in byte order.
    let k = c.checked_sub(256)? as usize;
    (0u32..256)
        .filter(|b| !printable(*b))
        .nth(k)
        .map(|b| b as u8)
}

/// The text of a non-normalized added token after the converter's `decode(encode(token))`: a
/// ByteLevel decoder maps a token whose characters are all byte-level characters back to bytes.
fn round_trip(token: &str, byte_level_decoder: bool) -> String {
    if !byte_level_decoder {
        return token.to_string();
    }
    match token.chars().map(byte_of_char).collect::<Option<Vec<u8>>>() {
        Some(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        None => token.to_string(),
    }
}

/// Which of [`PRE_TOKENIZERS`] tokenizer.json uses, if any.
fn pre_tokenizer_of(tj: &Json) -> Option<&'static str> {
    if tj.get("normalizer").is_some_and(|n| !n.is_null()) {
        return None;
    }
    let pt = tj.get("pre_tokenizer")?;
    let ty = |v: &Json| v.get("type").and_then(|t| t.as_str()).map(str::to_string);
    let flag =
        |v: &Json, k: &str, default: bool| v.get(k).and_then(|b| b.as_bool()).unwrap_or(default);
    let found = match ty(pt).as_deref() {
        Some("ByteLevel")
            if flag(pt, "use_regex", true) && !flag(pt, "add_prefix_space", false) =>
        {
            PreTokenizer::ByteLevelRegex
        }
        Some("Sequence") => {
            let [split, bl] = pt.get("pretokenizers")?.as_array()?.as_slice() else {
                return None;
            };
            let ok = ty(split).as_deref() == Some("Split")
                && split.get("behavior").and_then(|b| b.as_str()) == Some("Isolated")
                && !flag(split, "invert", false)
                && ty(bl).as_deref() == Some("ByteLevel")
                && !flag(bl, "use_regex", true)
                && !flag(bl, "add_prefix_space", false);
            let regex = split.get("pattern")?.get("Regex")?.as_str()?;
            if !ok {
                return None;
            }
            return PRE_TOKENIZERS.iter().find_map(|(name, p, _)| {
                matches!(p, PreTokenizer::SplitThenByteLevel(r) if *r == regex).then_some(*name)
            });
        }
        _ => return None,
    };
    PRE_TOKENIZERS
        .iter()
        .find_map(|(name, p, _)| (*p == found).then_some(*name))
}

/// The BPE vocabulary of the checkpoint in `dir`, `vocab_size` entries.
pub fn read_bpe(dir: &Path, vocab_size: usize) -> Result<BpeVocab> {
    let path = dir.join("tokenizer.json");
    let tj = read_json(&path)?.with_context(|| {
        format!(
            "{}: missing; GGUF export of a BPE (gpt2) vocabulary reads it",
            path.display()
        )
    })?;
    let origin = path.display();
    let model = tj
        .get("model")
        .with_context(|| format!("{origin}: no `model`"))?;
    let kind = model.get("type").and_then(|t| t.as_str());
    ensure!(
        kind == Some("BPE") || (kind.is_none() && model.get("merges").is_some()),
        "{origin}: model type is {}, not BPE",
        kind.unwrap_or("missing")
    );
    let Some(pre) = pre_tokenizer_of(&tj) else {
        let supported: Vec<String> = PRE_TOKENIZERS
            .iter()
            .map(|(name, _, what)| format!("{name} ({what})"))
            .collect();
        bail!(
            "{origin}: cannot tell which llama.cpp pre-tokenizer (tokenizer.ggml.pre) this BPE \
             vocabulary needs; supported, each without a normalizer: {}",
            supported.join(", ")
        );
    };
    let mut by_id: BTreeMap<u64, String> = BTreeMap::new();
    for (token, id) in model
        .get("vocab")
        .and_then(|v| v.as_object())
        .with_context(|| format!("{origin}: no `model.vocab` object"))?
    {
        let id = id
            .as_u64()
            .with_context(|| format!("{origin}: the id of `{token}` is not a token id"))?;
        by_id.insert(id, token.clone());
    }
    // Added tokens: tokenizer.json's, then tokenizer_config.json's for ids it lacks (as
    // transformers merges them): (content, special, normalized) by id.
    let mut added: BTreeMap<u64, (String, bool, bool)> = BTreeMap::new();
    for a in tj
        .get("added_tokens")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
    {
        let (Some(id), Some(content)) = (
            a.get("id").and_then(|i| i.as_u64()),
            a.get("content").and_then(|c| c.as_str()),
        ) else {
            bail!("{origin}: an added token without an id or content: {a}");
        };
        let flag = |k: &str| a.get(k).and_then(|b| b.as_bool()).unwrap_or(false);
        added.insert(
            id,
            (content.to_string(), flag("special"), flag("normalized")),
        );
    }
    let tc_path = dir.join("tokenizer_config.json");
    if let Some(tc) = read_json(&tc_path)? {
        for (id, a) in tc
            .get("added_tokens_decoder")
            .and_then(|d| d.as_object())
            .into_iter()
            .flatten()
        {
            let (Ok(id), Some(content)) =
                (id.parse::<u64>(), a.get("content").and_then(|c| c.as_str()))
            else {
                bail!(
                    "{}: bad added_tokens_decoder entry `{id}`",
                    tc_path.display()
                );
            };
            let flag = |k: &str| a.get(k).and_then(|b| b.as_bool()).unwrap_or(false);
            added
                .entry(id)
                .or_insert_with(|| (content.to_string(), flag("special"), flag("normalized")));
        }
    }
    for (id, (content, _, _)) in &added {
        by_id.insert(*id, content.clone());
    }
    if let Some((&max, _)) = by_id.last_key_value() {
        ensure!(
            max < vocab_size as u64,
            "{origin}: token id {max} is beyond config.json's vocab_size {vocab_size}"
        );
    }
    let byte_level_decoder = tj
        .get("decoder")
        .and_then(|d| d.get("type"))
        .and_then(|t| t.as_str())
        == Some("ByteLevel");
    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    for i in 0..vocab_size as u64 {
        let Some(token) = by_id.get(&i) else {
            tokens.push(format!("[PAD{i}]"));
            types.push(UNUSED);
            continue;
        };
        match added.get(&i).filter(|(content, _, _)| content == token) {
            Some((content, special, normalized)) => {
                let text = if *normalized {
                    content.clone()
                } else {
                    round_trip(content, byte_level_decoder)
                };
                if *special || looks_special(&text) {
                    tokens.push(text);
                    types.push(CONTROL);
                } else {
                    tokens.push(text.replace('\u{2581}', " "));
                    types.push(USER_DEFINED);
                }
            }
            None => {
                tokens.push(token.clone());
                types.push(NORMAL);
            }
        }
    }
    Ok(BpeVocab { tokens, types, pre })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_table_is_gpt2s() {
        assert_eq!(byte_of_char('A'), Some(b'A'));
        assert_eq!(byte_of_char('\u{120}'), Some(b' ')); // Ġ
        assert_eq!(byte_of_char('\u{10a}'), Some(b'\n')); // Ċ
        assert_eq!(byte_of_char('\u{100}'), Some(0));
        assert_eq!(byte_of_char('\u{143}'), Some(0xad));
        assert_eq!(byte_of_char('\u{144}'), None);
        assert_eq!(round_trip("\u{120}hi", true), " hi");
        assert_eq!(round_trip("a b", true), "a b"); // ' ' is not a byte-level character
    }

    #[test]
    fn pre_tokenizers_are_named_by_their_regex() {
        let seq = |regex: &str| {
            serde_json::json!({"normalizer": null, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}})
        };
        assert_eq!(pre_tokenizer_of(&seq(O200K_REGEX)), Some("gpt-4o"));
        assert_eq!(pre_tokenizer_of(&seq(LLAMA3_REGEX)), Some("llama-bpe"));
        assert_eq!(pre_tokenizer_of(&seq(r"\p{N}")), None);
        let gpt2 = serde_json::json!({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false,
                                      "trim_offsets": true, "use_regex": true}});
        assert_eq!(pre_tokenizer_of(&gpt2), Some("gpt-2"));
        let mut lowercased = seq(O200K_REGEX);
        lowercased["normalizer"] = serde_json::json!({"type": "Lowercase"});
        assert_eq!(pre_tokenizer_of(&lowercased), None);
    }
}
