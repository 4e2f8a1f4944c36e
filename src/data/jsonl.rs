//! Chat and text data, read from any source ([`super::source`]: JSONL, JSON arrays, gzip, zstd,
//! Parquet, directories, globs) in any format ([`super::formats`]: messages, prompt/completion,
//! ShareGPT, Alpaca, text). A bad record (invalid JSON, unknown role, empty content, no assistant
//! turn, a missing mapped column) is an error naming its file and line (Parquet: row group and
//! row), or is skipped and counted when asked.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    /// A tool's result, answering an assistant's tool call (never trained).
    Tool,
}

/// One message, as transformers' chat templates receive it: `role` and `content`, and, only when
/// the data has them (so templates that never look at them render as before), an assistant's
/// `tool_calls` (OpenAI's shape, `[{"type": "function", "function": {"name", "arguments"}}]`,
/// kept as the data has it) and a tool result's `name` and `tool_call_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    /// The text; empty for an assistant message that only calls tools.
    pub content: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    /// A message with text only.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            name: None,
            tool_call_id: None,
        }
    }
}

/// One conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    pub messages: Vec<Message>,
    /// The tools the conversation may call (JSON schemas, the record's `tools`), handed to the
    /// chat template as `tools`; empty: none (the template sees `none`).
    pub tools: Vec<serde_json::Value>,
    /// 1-based line in its file.
    pub line: usize,
}

/// A document for continued pretraining (the `text` format).
#[derive(Debug, Clone, PartialEq)]
pub struct TextDoc {
    pub text: String,
    /// 1-based line (or element, or row) in its file.
    pub line: usize,
}

/// Examples read, and records skipped.
#[derive(Debug, Clone, Default)]
pub struct ReadReport {
    pub conversations: Vec<Conversation>,
    /// Documents of the `text` format.
    pub texts: Vec<TextDoc>,
    /// `(line, reason)` of each skipped record (the reason names its place).
    pub skipped: Vec<(usize, String)>,
}

impl ReadReport {
    /// Examples read.
    pub fn len(&self) -> usize {
        self.conversations.len() + self.texts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every example tokenized: the conversations (chat template, assistant turns trained), then
    /// the documents (every token trained).
    pub fn encode(&self, tok: &super::TokenizerBundle) -> Result<Vec<super::Encoded>> {
        let mut out = Vec::with_capacity(self.len());
        for c in &self.conversations {
            out.push(tok.encode_conversation(c)?);
        }
        for d in &self.texts {
            out.push(tok.encode_text(d)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
fn parse_line(text: &str) -> std::result::Result<Vec<Message>, String> {
    let v = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    match super::formats::example(v, super::formats::Format::Auto, &Default::default())? {
        super::formats::Example::Chat { messages, .. } => Ok(messages),
        super::formats::Example::Text(_) => Err("a text document".into()),
    }
}

/// Reads a JSONL file of any chat or text format (detected per record); blank lines are ignored.
pub fn read_jsonl(path: &Path, skip_bad_lines: bool) -> Result<ReadReport> {
    read_data(
        &super::source::Spec::local(&path.to_string_lossy()),
        super::formats::Format::Auto,
        &Default::default(),
        skip_bad_lines,
    )
}

/// Reads `spec` (a file, a directory or a glob: [`super::source`]) in `format` (`Auto`: detected
/// per record) with `columns` mapped ([`super::formats`]). A bad record stops with its place and
/// the reason, or is skipped and reported with `skip_bad_lines`.
pub fn read_data(
    spec: &super::source::Spec,
    format: super::formats::Format,
    columns: &super::formats::Columns,
    skip_bad_lines: bool,
) -> Result<ReadReport> {
    use super::formats::{Example, example};
    let mut report = ReadReport::default();
    super::source::for_each_record(spec, |place, parsed| {
        match parsed.and_then(|v| example(v, format, columns)) {
            Ok(Example::Chat { messages, tools }) => report.conversations.push(Conversation {
                messages,
                tools,
                line: place.line,
            }),
            Ok(Example::Text(text)) => report.texts.push(TextDoc {
                text,
                line: place.line,
            }),
            Err(reason) if skip_bad_lines => report
                .skipped
                .push((place.line, format!("{place}: {reason}"))),
            Err(reason) => bail!(
                "{place}: {reason} (fix the line, or pass --skip-bad-lines to skip such lines)"
            ),
        }
        Ok(())
    })?;
    if report.is_empty() {
        bail!("{spec}: no usable conversations or documents");
    }
    if !report.conversations.is_empty() && !report.texts.is_empty() {
        bail!(
            "{spec}: mixes chat examples ({}) and text documents ({}); train them in separate runs, or force one reading with data.format",
            report.conversations.len(),
            report.texts.len()
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_errors() {
        let ok = parse_line(r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#).unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(
            parse_line(r#"{"prompt": "a", "completion": "b"}"#).unwrap()[1].role,
            Role::Assistant
        );
        assert!(parse_line("{").unwrap_err().starts_with("invalid JSON"));
        assert!(
            parse_line(r#"{"messages": [{"role": "bot", "content": "x"}]}"#)
                .unwrap_err()
                .contains("unknown role `bot`")
        );
        assert!(parse_line(r#"{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]}"#).unwrap_err().contains("empty content"));
        assert!(
            parse_line(r#"{"messages": [{"role": "user", "content": "x"}]}"#)
                .unwrap_err()
                .contains("no assistant")
        );
    }
}
