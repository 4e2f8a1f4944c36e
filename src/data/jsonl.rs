//! JSONL chat data. One conversation per line, either
//! `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}` or
//! `{"prompt": "...", "completion": "..."}` (a user turn and an assistant turn). A bad line (invalid
//! JSON, unknown role, empty content, no assistant turn) is an error naming the file and line, or is
//! skipped and counted when asked.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// One conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    pub messages: Vec<Message>,
    /// 1-based line in its file.
    pub line: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessage {
    role: String,
    content: String,
}

#[derive(Deserialize)]
struct RawLine {
    messages: Option<Vec<RawMessage>>,
    prompt: Option<String>,
    completion: Option<String>,
}

/// Conversations read, and lines skipped.
#[derive(Debug, Clone, Default)]
pub struct ReadReport {
    pub conversations: Vec<Conversation>,
    /// `(line, reason)` of each skipped line.
    pub skipped: Vec<(usize, String)>,
}

fn parse_line(text: &str) -> std::result::Result<Vec<Message>, String> {
    let raw: RawLine = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let messages = match (raw.messages, raw.prompt, raw.completion) {
        (Some(m), None, None) => m
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let role = match m.role.as_str() {
                    "system" => Role::System,
                    "user" => Role::User,
                    "assistant" => Role::Assistant,
                    other => {
                        return Err(format!(
                            "message {i}: unknown role `{other}` (use system, user or assistant)"
                        ));
                    }
                };
                Ok(Message {
                    role,
                    content: m.content,
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?,
        (None, Some(p), Some(c)) => vec![
            Message {
                role: Role::User,
                content: p,
            },
            Message {
                role: Role::Assistant,
                content: c,
            },
        ],
        _ => {
            return Err(
                "expected {\"messages\": [...]} or {\"prompt\": ..., \"completion\": ...}".into(),
            );
        }
    };
    if let Some(i) = messages.iter().position(|m| m.content.trim().is_empty()) {
        return Err(format!("message {i} has empty content"));
    }
    if !messages.iter().any(|m| m.role == Role::Assistant) {
        return Err("no assistant message: nothing to train on".into());
    }
    Ok(messages)
}

/// Reads a JSONL file; blank lines are ignored.
pub fn read_jsonl(path: &Path, skip_bad_lines: bool) -> Result<ReadReport> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the data file", crate::fsx::shown(path)))?;
    let mut report = ReadReport::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line) {
            Ok(messages) => report.conversations.push(Conversation {
                messages,
                line: i + 1,
            }),
            Err(reason) if skip_bad_lines => report.skipped.push((i + 1, reason)),
            Err(reason) => bail!(
                "{}:{}: {reason} (fix the line, or pass --skip-bad-lines to skip such lines)",
                path.display(),
                i + 1
            ),
        }
    }
    if report.conversations.is_empty() {
        bail!("{}: no usable conversations", path.display());
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
