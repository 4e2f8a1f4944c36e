//! Text → token ids with the trained positions marked. A conversation is rendered once with the
//! chat template; each assistant message's content is located in the rendering (the rendering of
//! the messages before it, with the generation prompt, must be a prefix of the whole: true of
//! Phi-3's template and of any template that renders turn by turn); the tokens covering that content
//! and the end-of-turn token right after it (`<|end|>`, Phi-4's `<|im_end|>`: the special token the
//! template puts there) are trained, nothing else (not the prompt, not the role headers,
//! not padding, which never masks `<|end|>` or eos because masks come from spans, not ids).
//!
//! An assistant message that calls tools (`tool_calls`) is trained on all the template renders for
//! it: from the end of the prefix (the messages before it, with the generation prompt) to the end
//! of the rendering of the messages up to and including it, whatever the template writes for the
//! calls (content, `<tool_call>` blocks, the closing token and any newline after it). An eos the
//! template writes only because the conversation ends there (absent when a generation prompt
//! follows, as Phi-3's template does) is not part of it. Tool results (`tool` messages) are never
//! trained. A template that drops the calls (one without tool support, like Phi-3's) is an error.

use super::jsonl::{Conversation, Message, Role};
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
    /// The same tokenizer cutting its text into words before BPE, where that provably changes no
    /// id ([`word_split`]): what [`Self::encode`] runs, many times faster on long texts.
    words: Option<super::spm::WordTokenizer>,
}

pub use super::spm::word_split;

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
    /// The tokenizer of `dir`, loaded, with the heap it took (0 where the allocator cannot
    /// say): what `qlora plan` counts for it.
    pub fn load_measured(dir: &Path) -> Result<(Self, u64)> {
        let before = crate::memstat::heap_in_use();
        let tok = Self::from_dir(dir)?;
        let bytes = match (before, crate::memstat::heap_in_use()) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => 0,
        };
        Ok((tok, bytes))
    }

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
            words: word_split(&tokenizer),
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
        self.words = word_split(&self.tokenizer);
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

    /// `text` encoded by the word-splitting copy where it is exact ([`word_split`]), else by the
    /// tokenizer as it is.
    fn run(&self, text: &str, add_special_tokens: bool) -> Result<tokenizers::Encoding> {
        match &self.words {
            Some(w) => w.encode(text, add_special_tokens),
            None => self.tokenizer.encode(text, add_special_tokens),
        }
        .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))
    }

    /// Whether encoding cuts the text into words first ([`word_split`]).
    pub fn splits_words(&self) -> bool {
        self.words.is_some()
    }

    /// This tokenizer encoding whole texts, as HF ships it (for measuring [`word_split`]).
    pub fn without_word_split(mut self) -> Self {
        self.words = None;
        self
    }

    /// Token ids of `text` (special-token strings in it become their ids; nothing is added).
    pub fn encode(&self, text: &str) -> Result<tokenizers::Encoding> {
        self.run(text, false)
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
        let ids = self.run(&text, true)?.get_ids().to_vec();
        Ok(Encoded {
            trained: vec![true; ids.len()],
            ids,
            text,
            line: doc.line,
        })
    }

    /// Renders, tokenizes and marks the trained tokens of a conversation.
    pub fn encode_conversation(&self, conv: &Conversation) -> Result<Encoded> {
        let render =
            |m: &[Message], generation| self.template.render_with_tools(m, &conv.tools, generation);
        let text = render(&conv.messages, false)?;
        // (start, end, whole): `whole` spans hold a tool call's whole rendering, closing special
        // tokens included; the others hold a reply's content, closed by the special token after it.
        let mut spans = Vec::new();
        for (i, m) in conv
            .messages
            .iter()
            .enumerate()
            .filter(|(_, m)| m.role == Role::Assistant)
        {
            let prefix = render(&conv.messages[..i], true)?;
            if !text.starts_with(&prefix) {
                bail!(
                    "line {}: the chat template does not render turn by turn (a conversation's prefix is not a prefix of its rendering), so assistant tokens cannot be located",
                    conv.line
                );
            }
            if !m.tool_calls.is_empty() {
                let end = self.call_end(conv, i, prefix.len(), &text)?;
                spans.push((prefix.len(), end.max(prefix.len()), true));
                continue;
            }
            if !text[prefix.len()..].starts_with(&m.content) {
                bail!(
                    "line {}: assistant message {i} does not appear verbatim after its header in the rendered conversation",
                    conv.line
                );
            }
            spans.push((prefix.len(), prefix.len() + m.content.len(), false));
        }
        let enc = self.encode(&text)?;
        let ids = enc.get_ids().to_vec();
        let offsets = enc.get_offsets();
        let mut trained = vec![false; ids.len()];
        for (t, &(s, e)) in offsets.iter().enumerate() {
            // A role header whose rstrip swallowed the content's leading whitespace overlaps the
            // content without being part of it: special tokens are trained only as the closing <|end|>
            // (or, in a tool call's span, when they start inside it).
            let is_special = self.special_ids.contains(&ids[t]);
            for &(cs, ce, whole) in &spans {
                let overlaps = s < ce && e > cs && (!is_special || (whole && s >= cs));
                // The turn's terminator: `<|end|>` (Phi-3), `<|im_end|>` (Phi-4) or whatever
                // special token the template puts right after the content.
                let closes = !whole && (Some(ids[t]) == self.end_id || is_special) && s == ce;
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

    /// Where the rendering of tool-calling assistant message `i` (its prefix, with the generation
    /// prompt, `prefix_len` bytes long) ends in `text` (the whole conversation's rendering): the end of the rendering of messages `..=i`, less an eos the
    /// template adds only because the conversation ends there. Checks that every call's function
    /// name is in it, so a template that ignores `tool_calls` is not trained on an empty turn.
    fn call_end(
        &self,
        conv: &Conversation,
        i: usize,
        prefix_len: usize,
        text: &str,
    ) -> Result<usize> {
        let upto = &conv.messages[..=i];
        let closed = self.template.render_with_tools(upto, &conv.tools, false)?;
        let open = self.template.render_with_tools(upto, &conv.tools, true)?;
        let eos = self.template.eos_token.as_str();
        let mut end = closed.len();
        if !eos.is_empty() && closed.ends_with(eos) && !open.starts_with(&closed) {
            end -= eos.len();
        }
        if !text.starts_with(&closed[..end]) {
            bail!(
                "line {}: the chat template does not render turn by turn (messages up to {i} do not render as a prefix of the conversation), so the tool call's tokens cannot be located",
                conv.line
            );
        }
        let span = closed.get(prefix_len..end).unwrap_or("");
        for call in &conv.messages[i].tool_calls {
            let name = super::formats::call_name(call).unwrap_or("");
            if !span.contains(name) {
                bail!(
                    "line {}: assistant message {i} calls `{name}`, which the chat template does not render (it has no tool support: use a model whose template renders tool_calls, or set a chat template that does)",
                    conv.line
                );
            }
        }
        Ok(end)
    }
}
