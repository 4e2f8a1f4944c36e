//! Text → token ids with the trained positions marked. A conversation is rendered once with the
//! chat template; each assistant message's content is located in the rendering (the rendering of
//! the messages before it, with the generation prompt, must be a prefix of the whole: true of
//! Phi-3's template and of any template that renders turn by turn); the tokens covering that content
//! and the end-of-turn token right after it (`<|end|>`, Phi-4's `<|im_end|>`: the special token the
//! template puts there) are trained, nothing else (not the prompt, not the role headers,
//! not padding, which never masks `<|end|>` or eos because masks come from spans, not ids).

use super::jsonl::{Conversation, Role};
use super::template::ChatTemplate;
use anyhow::{Context, Result, bail};
use std::path::Path;

/// The end-of-turn token Phi-3 is trained to emit.
pub const END_TOKEN: &str = "<|end|>";

/// A tokenizer with the chat template and the special ids that matter.
#[derive(Debug)]
pub struct TokenizerBundle {
    pub tokenizer: tokenizers::Tokenizer,
    pub template: ChatTemplate,
    /// `<|end|>`, when the vocabulary has it.
    pub end_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// Ids of the added tokens marked special (role headers, `<|end|>`, eos…), computed once.
    special_ids: std::collections::HashSet<u32>,
}

/// One tokenized conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Whether the model is trained to produce `ids[t]`.
    pub trained: Vec<bool>,
    /// The rendered text.
    pub text: String,
    /// Source line.
    pub line: usize,
}

impl TokenizerBundle {
    /// Reads tokenizer.json and tokenizer_config.json (chat template, special tokens) from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("{}: cannot load the tokenizer", tok_path.display()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read(&cfg_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?,
            Err(_) => serde_json::Value::Null,
        };
        // Special tokens are strings or {"content": ...} objects.
        let special = |k: &str| -> Option<String> {
            match cfg.get(k)? {
                serde_json::Value::String(s) => Some(s.clone()),
                v => v.get("content")?.as_str().map(str::to_string),
            }
        };
        let bos = special("bos_token").unwrap_or_else(|| "<s>".into());
        let eos = special("eos_token").unwrap_or_else(|| "<|endoftext|>".into());
        let pad = special("pad_token");
        let template = ChatTemplate::new(
            cfg.get("chat_template").and_then(|v| v.as_str()),
            &bos,
            &eos,
        )
        .with_context(|| format!("{}: chat_template", cfg_path.display()))?;
        Ok(Self {
            end_id: tokenizer.token_to_id(END_TOKEN),
            eos_id: tokenizer.token_to_id(&eos),
            pad_id: pad.and_then(|p| tokenizer.token_to_id(&p)),
            special_ids: tokenizer
                .get_added_tokens_decoder()
                .into_iter()
                .filter(|(_, t)| t.special)
                .map(|(id, _)| id)
                .collect(),
            tokenizer,
            template,
        })
    }

    /// Adds `tokens` to the vocabulary (`data.add_tokens`) as HF's `add_tokens` adds them (not
    /// special, so decoding keeps them), matched on the raw text (`normalized = false`, as
    /// llama.cpp matches user-defined tokens) and absorbing the whitespace after them
    /// (`rstrip = true`, as Phi-3's own added tokens do, which makes the following text tokenize
    /// as llama.cpp tokenizes it): each new one takes the next id, which must be one
    /// of the model's `rows` embedding rows (Phi-3 has 32064 for 32011 tokens). Returns each
    /// listed token's id and whether it is new (one already in the vocabulary keeps its id).
    pub fn add_tokens(
        &mut self,
        tokens: &[String],
        rows: usize,
    ) -> Result<Vec<(String, u32, bool)>> {
        let mut out = Vec::new();
        for t in tokens {
            if t.is_empty() {
                bail!("data.add_tokens: an empty token");
            }
            if let Some(id) = self.tokenizer.token_to_id(t) {
                out.push((t.clone(), id, false));
                continue;
            }
            let next = self.tokenizer.get_vocab_size(true);
            if next >= rows {
                bail!(
                    "data.add_tokens: no unused embedding row is left for `{t}`: the model has {rows} \
                     rows and the tokenizer already {next} tokens (new tokens go into the rows \
                     past the vocabulary; resizing the embedding is not done here)"
                );
            }
            // rstrip as Phi-3's own added tokens (<|end|>, <|user|>…) have it: the space after the
            // token is absorbed, so the next word starts with its ▁ as llama.cpp tokenizes it.
            let added = tokenizers::AddedToken::from(t.clone(), false)
                .normalized(false)
                .rstrip(true);
            self.tokenizer
                .add_tokens([added])
                .map_err(|e| anyhow::anyhow!("data.add_tokens: adding `{t}`: {e}"))?;
            let id = self
                .tokenizer
                .token_to_id(t)
                .with_context(|| format!("data.add_tokens: `{t}` was not added"))?;
            if id as usize >= rows {
                bail!("data.add_tokens: `{t}` got id {id}, past the model's {rows} rows");
            }
            out.push((t.clone(), id, true));
        }
        Ok(out)
    }

    /// tokenizer.json of the tokenizer as it is now (with any added tokens), and `base_config`
    /// (the base's tokenizer_config.json, or `{}`) with `added_tokens_decoder` listing every
    /// added token, as transformers' `save_pretrained` writes them.
    pub fn files(&self, base_config: Option<&[u8]>) -> Result<(Vec<u8>, Vec<u8>)> {
        let json = self
            .tokenizer
            .to_string(true)
            .map_err(|e| anyhow::anyhow!("serializing the tokenizer: {e}"))?;
        let mut cfg: serde_json::Value = match base_config {
            Some(b) => serde_json::from_slice(b).context("tokenizer_config.json")?,
            None => serde_json::json!({}),
        };
        let mut dec = serde_json::Map::new();
        let mut added: Vec<_> = self
            .tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .collect();
        added.sort_by_key(|(id, _)| *id);
        for (id, t) in added {
            dec.insert(
                id.to_string(),
                serde_json::json!({
                    "content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                    "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special,
                }),
            );
        }
        if let Some(obj) = cfg.as_object_mut() {
            obj.insert(
                "added_tokens_decoder".into(),
                serde_json::Value::Object(dec),
            );
        }
        Ok((json.into_bytes(), serde_json::to_vec_pretty(&cfg)?))
    }

    /// Token ids of `text` (special-token strings in it become their ids; nothing is added).
    pub fn encode(&self, text: &str) -> Result<tokenizers::Encoding> {
        self.tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))
    }

    /// Decodes ids to text (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("decoding: {e}"))
    }

    /// A document of the `text` format as TRL's SFTTrainer tokenizes a language-modeling example:
    /// eos appended unless the text ends with it, the tokenizer's own special tokens added, every
    /// token trained.
    pub fn encode_text(&self, doc: &super::jsonl::TextDoc) -> Result<Encoded> {
        let eos = self.template.eos_token.as_str();
        let text = if doc.text.ends_with(eos) {
            doc.text.clone()
        } else {
            format!("{}{eos}", doc.text)
        };
        let ids = self
            .tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
            .get_ids()
            .to_vec();
        Ok(Encoded {
            trained: vec![true; ids.len()],
            ids,
            text,
            line: doc.line,
        })
    }

    /// Renders, tokenizes and marks the trained tokens of a conversation.
    pub fn encode_conversation(&self, conv: &Conversation) -> Result<Encoded> {
        let text = self.template.render(&conv.messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in conv
            .messages
            .iter()
            .enumerate()
            .filter(|(_, m)| m.role == Role::Assistant)
        {
            let prefix = self.template.render(&conv.messages[..i], true)?;
            if !text.starts_with(&prefix) {
                bail!(
                    "line {}: the chat template does not render turn by turn (a conversation's prefix is not a prefix of its rendering), so assistant tokens cannot be located",
                    conv.line
                );
            }
            if !text[prefix.len()..].starts_with(&m.content) {
                bail!(
                    "line {}: assistant message {i} does not appear verbatim after its header in the rendered conversation",
                    conv.line
                );
            }
            spans.push((prefix.len(), prefix.len() + m.content.len()));
        }
        let enc = self.encode(&text)?;
        let ids = enc.get_ids().to_vec();
        let offsets = enc.get_offsets();
        let mut trained = vec![false; ids.len()];
        for (t, &(s, e)) in offsets.iter().enumerate() {
            // A role header whose rstrip swallowed the content's leading whitespace overlaps the
            // content without being part of it: special tokens are trained only as the closing <|end|>.
            let is_special = self.special_ids.contains(&ids[t]);
            for &(cs, ce) in &spans {
                let overlaps = s < ce && e > cs && !is_special;
                // The turn's terminator: `<|end|>` (Phi-3), `<|im_end|>` (Phi-4) or whatever
                // special token the template puts right after the content.
                let closes = (Some(ids[t]) == self.end_id || is_special) && s == ce;
                if overlaps || closes {
                    trained[t] = true;
                }
            }
        }
        Ok(Encoded {
            ids,
            trained,
            text,
            line: conv.line,
        })
    }
}
