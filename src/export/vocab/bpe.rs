//! BPE vocabularies (`tokenizer.ggml.model = "gpt2"`, Phi-4-mini's) as llama.cpp's converter writes
//! them (`_set_vocab_gpt2` → `get_vocab_base`): the byte-level token strings of tokenizer.json by
//! id, ids without a token as `[PADi]` (UNUSED) up to config.json's vocab_size, added tokens as
//! CONTROL when special or when they look special (`<|…|>`), else USER_DEFINED, the rest NORMAL.
//!
//! `tokenizer.ggml.pre` names the pre-tokenizer llama.cpp must run. llama.cpp's converter does not
//! read the regex: it tokenizes a fixed check text, hashes the ids and looks the hash up in a table
//! of the vocabularies it knows (`get_vocab_base_pre`). We do the same with the same data
//! (src/export/vocab/llama_cpp/, PROVENANCE.md there), so a vocabulary gets the name llama.cpp
//! would give it, and one llama.cpp does not know is refused with its hash, unless the user names
//! the pre-tokenizer.

use super::{CONTROL, NORMAL, UNUSED, USER_DEFINED, read_json};
use anyhow::{Context, Result, anyhow, bail, ensure};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// The converter's check text (`chktxt`).
const CHKTXT: &[u8] = include_bytes!("llama_cpp/chktxt.bin");
/// The converter's (chkhsh, name, reference) rows, in its order.
const CHKHSH_TSV: &str = include_str!("llama_cpp/chkhsh.tsv");

/// The table's rows as (hash, name).
fn chkhsh_rows() -> impl Iterator<Item = (&'static str, &'static str)> {
    CHKHSH_TSV.lines().filter_map(|l| {
        let mut f = l.split('\t');
        Some((f.next()?, f.next()?))
    })
}

/// llama.cpp's name for a check hash: the LAST matching row (the converter's chain of `if`s).
pub fn pre_of_chkhsh(chkhsh: &str) -> Option<&'static str> {
    chkhsh_rows()
        .filter(|(h, _)| *h == chkhsh)
        .last()
        .map(|(_, n)| n)
}

/// Whether `name` is one of the table's pre-tokenizer names.
pub fn is_known_pre(name: &str) -> bool {
    chkhsh_rows().any(|(_, n)| n == name)
}

/// The converter's `chkhsh` of the tokenizer.json at `path`: its ids for the check text with the
/// special tokens its post-processor adds, written as Python's `str(list)`, sha256 in hex.
pub fn chkhsh(path: &Path) -> Result<String> {
    let origin = path.display();
    let tok = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| anyhow!("{origin}: cannot load the tokenizer: {e}"))?;
    let text = std::str::from_utf8(CHKTXT).expect("the check text is UTF-8");
    let enc = tok
        .encode(text, true)
        .map_err(|e| anyhow!("{origin}: cannot tokenize llama.cpp's check text: {e}"))?;
    let ids: Vec<String> = enc.get_ids().iter().map(u32::to_string).collect();
    let digest = Sha256::digest(format!("[{}]", ids.join(", ")).as_bytes());
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// Tokens and types by id, and the pre-tokenizer name.
#[derive(Debug, Clone, PartialEq)]
pub struct BpeVocab {
    pub tokens: Vec<String>,
    pub types: Vec<i32>,
    pub pre: String,
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

/// The BPE vocabulary of the checkpoint in `dir`, `vocab_size` entries. `pre` names llama.cpp's
/// pre-tokenizer when the user knows it; otherwise the check hash must be in llama.cpp's table.
pub fn read_bpe(dir: &Path, vocab_size: usize, pre: Option<&str>) -> Result<BpeVocab> {
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
    let pre: String = match pre {
        Some(name) => {
            ensure!(
                is_known_pre(name),
                "--gguf-pre `{name}` is not a pre-tokenizer name llama.cpp's converter writes \
                 (see src/export/vocab/llama_cpp/chkhsh.tsv)"
            );
            name.to_string()
        }
        None => {
            let h = chkhsh(&path)?;
            match pre_of_chkhsh(&h) {
                Some(name) => name.to_string(),
                None => bail!(
                    "{origin}: llama.cpp does not know this BPE vocabulary: its check hash {h} is not \
                     in llama.cpp's pre-tokenizer table (its converter refuses it too); if you know \
                     which pre-tokenizer it needs, pass --gguf-pre NAME (e.g. llama-bpe, gpt-4o, \
                     qwen2, dbrx)"
                ),
            }
        }
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

    /// The table as the converter reads it: later rows win (mpt's hash is also olmo's), and the
    /// check text is the converter's (its sha256 in PROVENANCE.md).
    #[test]
    fn the_last_matching_row_wins() {
        let mpt = "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166";
        let rows: Vec<_> = chkhsh_rows().filter(|(h, _)| *h == mpt).collect();
        assert_eq!(
            rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            ["mpt", "olmo"]
        );
        assert_eq!(pre_of_chkhsh(mpt), Some("olmo"));
        assert_eq!(pre_of_chkhsh(&"0".repeat(64)), None);
        assert_eq!(chkhsh_rows().count(), 97);
        let digest = Sha256::digest(CHKTXT);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da"
        );
        assert!(is_known_pre("gpt-4o") && !is_known_pre("gpt-5"));
    }
}
