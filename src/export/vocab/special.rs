//! What llama.cpp's converter writes about a vocabulary besides its tokens, as gguf-py's
//! `SpecialVocab` (gguf-py/gguf/vocab.py) computes it: the special token ids (`bos`, `eos`, `unk`,
//! `sep`, `pad`, `mask`, and `eot`/`eom` when a template's trailing token replaces the eos), the
//! `add_*_token` flags, the BPE merges, the chat template and the normalizer flags.
//!
//! The sources and their precedence are gguf-py's: tokenizer.json (merges, normalizer, the
//! post-processor's implied bos/eos/sep handling, `added_tokens` to resolve token texts to ids), then
//! tokenizer_config.json (`*_token` texts, `add_*_token`, `chat_template`, else chat_template.jinja /
//! chat_template.json), then config.json's `*_token_id` for the types still unset. The first value
//! found for a type wins.

use super::super::gguf::{GgufWriter, Value};
use super::post_processor::{read_post_processor, truthy};
use super::read_json;
use anyhow::{Context, Result, bail, ensure};
use serde_json::{Map, Value as Json};
use std::path::Path;

/// The token types gguf-py looks for, in its order.
const TYPES: [&str; 7] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];

/// GGUF keys of the ids gguf-py has a writer for (it has none for `cls`, which it skips).
const ID_KEYS: [(&str, &str); 8] = [
    ("bos", "tokenizer.ggml.bos_token_id"),
    ("eos", "tokenizer.ggml.eos_token_id"),
    ("unk", "tokenizer.ggml.unknown_token_id"),
    ("sep", "tokenizer.ggml.seperator_token_id"),
    ("pad", "tokenizer.ggml.padding_token_id"),
    ("mask", "tokenizer.ggml.mask_token_id"),
    ("eot", "tokenizer.ggml.eot_token_id"),
    ("eom", "tokenizer.ggml.eom_token_id"),
];

/// GGUF keys of the `add_*_token` flags gguf-py writes.
const ADD_KEYS: [(&str, &str); 3] = [
    ("bos", "tokenizer.ggml.add_bos_token"),
    ("eos", "tokenizer.ggml.add_eos_token"),
    ("sep", "tokenizer.ggml.add_sep_token"),
];

/// Special tokens, flags, merges and chat template of a checkpoint directory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialVocab {
    /// `"left right"` per merge, in rank order (only when asked for).
    pub merges: Vec<String>,
    /// `(type, id)` in the order found.
    pub ids: Vec<(&'static str, u32)>,
    /// `(type, add)` in the order found.
    pub add: Vec<(&'static str, bool)>,
    /// A template string, or a list of `{name, template}` objects.
    pub chat_template: Option<Json>,
    pub normalizer_lowercase: Option<bool>,
    pub normalizer_strip_accents: Option<bool>,
}

impl SpecialVocab {
    /// Reads `dir`'s tokenizer files. `n_vocab`: ids at or beyond it are skipped (gguf-py's
    /// `n_vocab`, given for SentencePiece vocabularies, not for BPE ones).
    pub fn load(dir: &Path, load_merges: bool, n_vocab: Option<usize>) -> Result<Self> {
        let mut sv = Self::default();
        let mut types: Vec<&'static str> = TYPES.to_vec();
        let tj_path = dir.join("tokenizer.json");
        let tj = read_json(&tj_path)?;
        if let Some(tj) = &tj {
            if load_merges {
                sv.merges = merges_of(tj).with_context(|| format!("{}", tj_path.display()))?;
            }
            if let Some(norm) = tj.get("normalizer").filter(|n| truthy(Some(n))) {
                sv.parse_normalizer(norm);
            }
        }
        let added: Vec<Json> = tj
            .as_ref()
            .and_then(|t| t.get("added_tokens"))
            .and_then(|a| a.as_array())
            .cloned()
            .unwrap_or_default();
        let tc_path = dir.join("tokenizer_config.json");
        let mut tc: Option<Map<String, Json>> = match read_json(&tc_path)? {
            None => None,
            Some(Json::Object(o)) => Some(o),
            Some(_) => bail!("{}: not a JSON object", tc_path.display()),
        };
        if let Some(tj) = tj.as_ref().filter(|t| truthy(Some(t))) {
            read_post_processor(&mut sv, tj, &mut tc, &mut types);
        }
        let tc = match tc {
            Some(tc) if !tc.is_empty() => tc,
            _ => {
                sv.read_config_json(dir, &types, n_vocab)?;
                return finish(sv, dir, load_merges);
            }
        };
        sv.chat_template = match tc.get("chat_template") {
            Some(t) => Some(t.clone()),
            None => alt_chat_template(dir)?,
        }
        .filter(|t| !t.is_null());
        if let Some(t) = &sv.chat_template {
            ensure!(
                t.is_string() || t.is_array(),
                "{}: chat_template is neither a string nor a list",
                tc_path.display()
            );
        }
        for &typ in &types {
            if let Some(Json::Bool(b)) = tc.get(&format!("add_{typ}_token"))
                && !sv.add.iter().any(|(t, _)| *t == typ)
            {
                sv.add.push((typ, *b));
            }
            let content = match tc.get(&format!("{typ}_token")) {
                Some(Json::String(s)) => s.as_str(),
                Some(Json::Object(o)) => match o.get("content").and_then(|c| c.as_str()) {
                    Some(c) => c,
                    None => continue,
                },
                _ => continue,
            };
            let id = added
                .iter()
                .find(|a| a.get("content").and_then(|c| c.as_str()) == Some(content))
                .and_then(|a| a.get("id"));
            sv.set_id(typ, id, n_vocab)
                .with_context(|| format!("{}: `{typ}_token`", tc_path.display()))?;
        }
        sv.read_config_json(dir, &types, n_vocab)?;
        finish(sv, dir, load_merges)
    }

    /// gguf-py's `_set_special_token`: integer ids only, the first one per type, below `n_vocab`.
    fn set_id(
        &mut self,
        typ: &'static str,
        id: Option<&Json>,
        n_vocab: Option<usize>,
    ) -> Result<()> {
        let Some(id) = id.and_then(|v| v.as_i64()) else {
            return Ok(());
        };
        ensure!(id >= 0, "invalid id {id} for the {typ} token");
        if n_vocab.is_none_or(|n| (id as u64) < n as u64)
            && !self.ids.iter().any(|(t, _)| *t == typ)
        {
            self.ids.push((typ, id as u32));
        }
        Ok(())
    }

    pub(super) fn set_add(&mut self, typ: &'static str, value: bool) {
        match self.add.iter_mut().find(|(t, _)| *t == typ) {
            Some(entry) => entry.1 = value,
            None => self.add.push((typ, value)),
        }
    }

    fn parse_normalizer(&mut self, n: &Json) {
        match n.get("type").and_then(|t| t.as_str()) {
            Some("Lowercase") => self.normalizer_lowercase = Some(true),
            Some("StripAccents") => self.normalizer_strip_accents = Some(true),
            Some("BertNormalizer") => {
                if let Some(v) = n.get("lowercase") {
                    self.normalizer_lowercase = v.as_bool();
                }
                if let Some(v) = n.get("strip_accents") {
                    self.normalizer_strip_accents = v.as_bool();
                }
            }
            Some("Sequence") => {
                for inner in n
                    .get("normalizers")
                    .and_then(|a| a.as_array())
                    .into_iter()
                    .flatten()
                {
                    self.parse_normalizer(inner);
                }
            }
            _ => {}
        }
    }

    /// config.json's `<type>_token_id` (or its `text_config`'s) for the types still unset.
    fn read_config_json(
        &mut self,
        dir: &Path,
        types: &[&'static str],
        n_vocab: Option<usize>,
    ) -> Result<()> {
        let path = dir.join("config.json");
        let Some(cfg) = read_json(&path)? else {
            return Ok(());
        };
        for &typ in types {
            let key = format!("{typ}_token_id");
            let id = cfg
                .get(&key)
                .filter(|v| !v.is_null())
                .or_else(|| cfg.get("text_config").and_then(|t| t.get(&key)));
            self.set_id(typ, id, n_vocab)
                .with_context(|| format!("{}: `{key}`", path.display()))?;
        }
        Ok(())
    }

    /// Writes what gguf-py's `add_to_gguf` writes.
    pub fn write(&self, w: &mut GgufWriter<'_>) -> Result<()> {
        if !self.merges.is_empty() {
            w.kv("tokenizer.ggml.merges", Value::ArrStr(self.merges.clone()))?;
        }
        for (typ, id) in &self.ids {
            if let Some((_, key)) = ID_KEYS.iter().find(|(t, _)| t == typ) {
                w.kv(key, Value::U32(*id))?;
            }
        }
        for (typ, add) in &self.add {
            if let Some((_, key)) = ADD_KEYS.iter().find(|(t, _)| t == typ) {
                w.kv(key, Value::Bool(*add))?;
            }
        }
        match &self.chat_template {
            Some(Json::String(t)) => w.kv("tokenizer.chat_template", Value::Str(t.clone()))?,
            Some(Json::Array(choices)) => {
                let mut default = None;
                let mut names: Vec<String> = Vec::new();
                for choice in choices {
                    let name: String = choice
                        .get("name")
                        .and_then(|n| n.as_str())
                        .unwrap_or("")
                        .chars()
                        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                        .collect();
                    let Some(template) = choice.get("template").filter(|t| !t.is_null()) else {
                        continue;
                    };
                    let template = template
                        .as_str()
                        .context("a chat template in the list is not a string")?;
                    if name.is_empty() {
                        continue;
                    }
                    if name == "default" {
                        default = Some(template.to_string());
                    } else {
                        if !names.contains(&name) {
                            names.push(name.clone());
                        }
                        w.kv(
                            &format!("tokenizer.chat_template.{name}"),
                            Value::Str(template.to_string()),
                        )?;
                    }
                }
                if !names.is_empty() {
                    w.kv("tokenizer.chat_templates", Value::ArrStr(names))?;
                }
                if let Some(t) = default {
                    w.kv("tokenizer.chat_template", Value::Str(t))?;
                }
            }
            _ => {}
        }
        if let Some(b) = self.normalizer_lowercase {
            w.kv("tokenizer.ggml.normalizer.lowercase", Value::Bool(b))?;
        }
        if let Some(b) = self.normalizer_strip_accents {
            w.kv("tokenizer.ggml.normalizer.strip_accents", Value::Bool(b))?;
        }
        Ok(())
    }
}

/// Merges from merges.txt when tokenizer.json had none and merges were asked for.
fn finish(mut sv: SpecialVocab, dir: &Path, load_merges: bool) -> Result<SpecialVocab> {
    if load_merges && sv.merges.is_empty() {
        let path = dir.join("merges.txt");
        if path.is_file() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            let mut lines = text.lines().peekable();
            if lines.peek().is_some_and(|l| l.trim().starts_with('#')) {
                lines.next();
            }
            sv.merges = lines
                .filter_map(|l| {
                    let parts: Vec<&str> = l.split_whitespace().collect();
                    (parts.len() == 2).then(|| format!("{} {}", parts[0], parts[1]))
                })
                .collect();
        }
    }
    Ok(sv)
}

/// `model.merges` of tokenizer.json: `"a b"` strings as they are, or `[a, b]` pairs joined with a
/// space after encoding spaces inside them as U+0120 (`Ġ`), as gguf-py does.
fn merges_of(tj: &Json) -> Result<Vec<String>> {
    let Some(list) = tj
        .get("model")
        .and_then(|m| m.get("merges"))
        .and_then(|m| m.as_array())
        .filter(|l| !l.is_empty())
    else {
        return Ok(Vec::new());
    };
    if list[0].is_string() {
        return list
            .iter()
            .map(|m| {
                m.as_str()
                    .map(str::to_string)
                    .context("a merge is not a string")
            })
            .collect();
    }
    let pair = |m: &Json| -> Option<String> {
        let [a, b] = m.as_array()?.as_slice() else {
            return None;
        };
        let enc = |s: &str| s.replace(' ', "\u{120}");
        Some(format!("{} {}", enc(a.as_str()?), enc(b.as_str()?)))
    };
    list.iter()
        .map(|m| pair(m).with_context(|| format!("unknown merges format: {m}")))
        .collect()
}

/// chat_template.jinja (with additional_chat_templates/*.jinja as a named list), else
/// chat_template.json's `chat_template`.
fn alt_chat_template(dir: &Path) -> Result<Option<Json>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let read = |p: &Path| {
            std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))
        };
        let default = read(&jinja)?;
        let mut extra: Vec<std::path::PathBuf> =
            std::fs::read_dir(dir.join("additional_chat_templates"))
                .map(|rd| {
                    rd.filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.extension().is_some_and(|x| x == "jinja"))
                        .collect()
                })
                .unwrap_or_default();
        if extra.is_empty() {
            return Ok(Some(Json::String(default)));
        }
        extra.sort();
        let mut list = vec![serde_json::json!({"name": "default", "template": default})];
        for p in extra {
            let name = p.file_stem().map(|s| s.to_string_lossy().into_owned());
            list.push(serde_json::json!({"name": name, "template": read(&p)?}));
        }
        return Ok(Some(Json::Array(list)));
    }
    let json = dir.join("chat_template.json");
    Ok(read_json(&json)?.and_then(|v| v.get("chat_template").cloned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, Json)]) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        for (name, v) in files {
            std::fs::write(tmp.path().join(name), v.to_string()).unwrap();
        }
        tmp
    }

    #[test]
    fn template_processing_roberta_and_config_fallbacks() {
        // Llama-3 style: TemplateProcessing adds <|begin_of_text|> (bos) and nothing after.
        let tj = serde_json::json!({
            "added_tokens": [{"id": 5, "content": "<s>"}, {"id": 6, "content": "</s>"}],
            "post_processor": {"type": "Sequence", "processors": [
                {"type": "ByteLevel"},
                {"type": "TemplateProcessing",
                 "single": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}],
                 "pair": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}},
                          {"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "B"}}]}]},
            "model": {"merges": [["a", "b c"], ["ab", "x"]]}
        });
        let tc = serde_json::json!({"bos_token": "<s>", "eos_token": {"content": "</s>"},
                                    "add_eos_token": true, "chat_template": "{{ x }}"});
        let cfg =
            serde_json::json!({"pad_token_id": 7, "eos_token_id": [6, 9], "unk_token_id": 99});
        let tmp = dir_with(&[
            ("tokenizer.json", tj),
            ("tokenizer_config.json", tc),
            ("config.json", cfg),
        ]);
        let sv = SpecialVocab::load(tmp.path(), true, Some(50)).unwrap();
        assert_eq!(sv.merges, vec!["a b\u{120}c", "ab x"]);
        assert_eq!(sv.ids, vec![("bos", 5), ("eos", 6), ("pad", 7)]);
        // ByteLevel sets bos/eos false, the template turns bos on and finds no separator in its
        // pair; tokenizer_config's add_eos_token does not override the post-processor.
        assert_eq!(sv.add, vec![("bos", true), ("eos", false), ("sep", false)]);
        assert_eq!(sv.chat_template, Some(Json::String("{{ x }}".into())));

        let tj = serde_json::json!({
            "added_tokens": [{"id": 0, "content": "<s>"}, {"id": 2, "content": "</s>"}],
            "post_processor": {"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0]},
            "normalizer": {"type": "BertNormalizer", "lowercase": true, "strip_accents": null}
        });
        let tc = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>"});
        let tmp = dir_with(&[("tokenizer.json", tj), ("tokenizer_config.json", tc)]);
        let sv = SpecialVocab::load(tmp.path(), false, None).unwrap();
        // cls is found too (gguf-py has no GGUF key for it, so it is not written).
        assert_eq!(sv.ids, vec![("bos", 0), ("eos", 2), ("sep", 2), ("cls", 0)]);
        assert_eq!(sv.add, vec![("bos", true), ("eos", true), ("sep", true)]);
        assert_eq!(
            (sv.normalizer_lowercase, sv.normalizer_strip_accents),
            (Some(true), None)
        );

        let tmp = dir_with(&[("config.json", serde_json::json!({"bos_token_id": -1}))]);
        let e = format!(
            "{:#}",
            SpecialVocab::load(tmp.path(), false, None).unwrap_err()
        );
        assert!(
            e.contains("config.json") && e.contains("bos_token_id"),
            "{e}"
        );
    }
}
