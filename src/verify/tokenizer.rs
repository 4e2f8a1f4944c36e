//! `qlora verify`'s tokenizer checks: a merged directory carries the base's tokenizer files and
//! special ids; a GGUF carries the `tokenizer.*` keys llama.cpp's converter writes for this model.

use super::{PROMPTS, Reference};
use anyhow::{Context, Result};
use std::path::Path;

/// A merged export carries the base's tokenizer files unchanged and its special ids.
pub(super) fn tokenizer_files(
    base: &Path,
    export: &Path,
    failures: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> Result<()> {
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
    ] {
        match (std::fs::read(base.join(f)), std::fs::read(export.join(f))) {
            (Ok(a), Ok(b)) if a == b => {}
            (Ok(_), Ok(_)) => failures.push(format!("tokenizer: {f} differs from the base's")),
            (Ok(_), Err(_)) => failures.push(format!("tokenizer: {f} is missing from the export")),
            _ => {}
        }
    }
    let cfg = |d: &Path| -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(
            &std::fs::read(d.join("config.json"))
                .with_context(|| format!("{}: cannot read config.json", d.display()))?,
        )?)
    };
    let (a, b) = (cfg(base)?, cfg(export)?);
    for k in ["bos_token_id", "eos_token_id", "pad_token_id", "vocab_size"] {
        if a.get(k) != b.get(k) {
            failures.push(format!(
                "tokenizer: config.json {k} is {} in the export, {} in the base",
                b.get(k).unwrap_or(&serde_json::Value::Null),
                a.get(k).unwrap_or(&serde_json::Value::Null)
            ));
        }
    }
    notes.push("tokenizer files and special ids: compared with the base's".into());
    Ok(())
}

/// The GGUF's tokenizer keys against what the converter writes for this model (the vocabulary,
/// token types, merges, special ids, pre-tokenizer, chat template), and the prompts' ids read
/// back through its token list.
pub(super) fn gguf_tokenizer(
    reference: &Reference,
    header: &crate::export::gguf_read::GgufHeader,
    path: &Path,
    failures: &mut Vec<String>,
    notes: &mut Vec<String>,
) -> Result<()> {
    use crate::export::gguf::GgufWriter;
    let cfg = &reference.model.cfg;
    let file_pre = header
        .get("tokenizer.ggml.pre")
        .map(|v| v.to_json().as_str().unwrap_or_default().to_string());
    let mut w = GgufWriter::default();
    if let Err(e) = crate::export::vocab::write_tokenizer(&mut w, &reference.tok_dir, cfg, None) {
        // A vocabulary no llama.cpp table knows: the file's own name, if llama.cpp has it.
        match &file_pre {
            Some(p) if crate::export::vocab::is_known_pre(p) => {
                notes.push(format!(
                    "pre-tokenizer: the vocabulary's check hash is in no llama.cpp table ({e:#}); the \
                     file says `{p}`, a name llama.cpp knows"
                ));
                w = GgufWriter::default();
                crate::export::vocab::write_tokenizer(&mut w, &reference.tok_dir, cfg, Some(p))?;
            }
            _ => {
                failures.push(format!("tokenizer: {e:#}"));
                return Ok(());
            }
        }
    }
    let mut bytes = std::io::Cursor::new(Vec::new());
    w.write(&mut bytes)?;
    let want = crate::export::gguf_read::parse_header(bytes.get_ref())?;
    for (k, v) in &want.metadata {
        match header.get(k) {
            None => failures.push(format!("tokenizer: {} has no {k}", path.display())),
            Some(got) if got != v => {
                let show = |x: &crate::export::gguf_read::MetaValue| {
                    let s = x.to_json().to_string();
                    if s.chars().count() > 80 {
                        format!("{}…", s.chars().take(80).collect::<String>())
                    } else {
                        s
                    }
                };
                failures.push(format!(
                    "tokenizer: {k} is {} in the file, {} for this model",
                    show(got),
                    show(v)
                ))
            }
            Some(_) => {}
        }
    }
    // The prompts' ids through the file's token list: the same strings as the tokenizer's.
    if let Some(crate::export::gguf_read::MetaValue::Array(tokens)) =
        header.get("tokenizer.ggml.tokens")
    {
        let ids = reference.prompt_ids(&PROMPTS.map(str::to_string))?;
        let mut bad = 0;
        for &id in ids.iter().flatten() {
            let theirs = tokens.get(id as usize).map(|t| t.to_json());
            let ours = reference.tok.tokenizer.id_to_token(id);
            if theirs.as_ref().and_then(|t| t.as_str()) != ours.as_deref() {
                bad += 1;
            }
        }
        if bad > 0 {
            failures.push(format!(
                "tokenizer: {bad} of the prompts' ids name other tokens in the file"
            ));
        }
    }
    notes.push(format!(
        "tokenizer: {} keys compared with what the converter writes for this model",
        want.metadata.len()
    ));
    Ok(())
}
