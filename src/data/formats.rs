//! The formats chat and text data come in, one record at a time (a JSONL line, an element of a
//! JSON array, a Parquet row: each a JSON object), into one example. The format is detected from
//! the record's keys, or forced with `data.format`; `data.columns` maps the names a dataset uses
//! onto the ones below.
//!
//! - `messages`: `[{"role": "system" | "user" | "assistant", "content": …}]`, as today.
//! - `prompt` / `completion`: one user turn and one assistant turn, as today (TRL's
//!   prompt-completion format).
//! - ShareGPT: `conversations: [{"from", "value"}]`, `from` mapped as Axolotl's `chat_template`
//!   loader maps roles by default (`human`, `user` → user; `gpt`, `assistant`, `model` → assistant;
//!   `system` → system).
//! - Alpaca: `instruction`, optional `input`, `output` (and an optional `system`): one user turn,
//!   the instruction then the input on a new line, and one assistant turn, as LLaMA-Factory's
//!   alpaca converter builds it.
//! - `text`: a document for continued pretraining, as TRL's SFTTrainer takes a language-modeling
//!   dataset: no chat template, eos appended unless the text ends with it, every token trained.
//!
//! Preference pairs (`chosen`, `rejected`) are read by [`super::pairs`] for the preference
//! objectives.

use super::jsonl::{Message, Role};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// A data format (`data.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Detected per record from its keys.
    #[default]
    Auto,
    Messages,
    PromptCompletion,
    Sharegpt,
    Alpaca,
    Text,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Messages => "messages",
            Self::PromptCompletion => "prompt_completion",
            Self::Sharegpt => "sharegpt",
            Self::Alpaca => "alpaca",
            Self::Text => "text",
        }
    }
}

/// One training example.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// A conversation, rendered with the chat template; the assistant turns are trained.
    Chat(Vec<Message>),
    /// A document, trained on every token.
    Text(String),
}

/// `data.columns`: a dataset's column name for each name the formats use (`messages = "dialog"`,
/// `output = "answer"`, …).
pub type Columns = BTreeMap<String, String>;

/// The names the formats read, for checking `data.columns`.
pub const KEYS: [&str; 9] = [
    "messages",
    "prompt",
    "completion",
    "conversations",
    "instruction",
    "input",
    "output",
    "system",
    "text",
];

/// Checks `data.columns`' keys.
pub fn check_columns(columns: &Columns) -> anyhow::Result<()> {
    for k in columns.keys() {
        if !KEYS.contains(&k.as_str()) {
            anyhow::bail!(
                "data.columns: `{k}` is not a name the formats read (use one of {})",
                KEYS.join(", ")
            );
        }
    }
    Ok(())
}

/// The record with `columns` renamed to the formats' names. A mapped column missing from the
/// record is an error naming it.
fn renamed(mut obj: Map<String, Value>, columns: &Columns) -> Result<Map<String, Value>, String> {
    for (ours, theirs) in columns {
        if ours == theirs {
            continue;
        }
        match obj.remove(theirs) {
            Some(v) => {
                obj.insert(ours.clone(), v);
            }
            // Optional fields may be absent.
            None if matches!(ours.as_str(), "input" | "system") => {}
            None => {
                return Err(format!(
                    "data.columns maps `{ours}` to column `{theirs}`, which this record does not have (it has: {})",
                    obj.keys().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
        }
    }
    Ok(obj)
}

/// The format a record's keys say.
fn detect(obj: &Map<String, Value>) -> Result<Format, String> {
    let has = |k: &str| obj.contains_key(k);
    Ok(if has("messages") {
        Format::Messages
    } else if has("conversations") {
        Format::Sharegpt
    } else if has("instruction") && has("output") {
        Format::Alpaca
    } else if has("prompt") && has("completion") {
        Format::PromptCompletion
    } else if has("text") {
        Format::Text
    } else if has("chosen") && has("rejected") {
        return Err(
            "a preference pair (chosen, rejected): train it with --objective dpo, ipo, orpo or simpo"
                .into(),
        );
    } else {
        return Err(format!(
            "no known format in keys {:?}: expected messages, conversations (ShareGPT), instruction + output (Alpaca), prompt + completion, or text; map other names with data.columns",
            obj.keys().collect::<Vec<_>>()
        ));
    })
}

fn string(obj: &Map<String, Value>, key: &str) -> Result<String, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Null) | None => Err(format!("`{key}` is missing")),
        Some(other) => Err(format!("`{key}` must be a string, not {}", kind(other))),
    }
}

fn optional_string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("`{key}` must be a string, not {}", kind(other))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A list of message objects under `key`, each with `role_key` and `content_key`, roles mapped by
/// `role`.
fn turns(
    obj: &Map<String, Value>,
    key: &str,
    role_key: &str,
    content_key: &str,
    role: impl Fn(&str) -> Option<Role>,
    roles_hint: &str,
) -> Result<Vec<Message>, String> {
    let Some(Value::Array(items)) = obj.get(key) else {
        return Err(format!("`{key}` must be a list of messages"));
    };
    let item = |i: usize| {
        if key == "messages" {
            format!("message {i}")
        } else {
            format!("`{key}` item {i}")
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let Value::Object(m) = m else {
                return Err(format!("{} must be an object", item(i)));
            };
            let r = string(m, role_key).map_err(|e| format!("{}: {e}", item(i)))?;
            let content = string(m, content_key).map_err(|e| format!("{}: {e}", item(i)))?;
            let role = role(&r).ok_or_else(|| {
                format!("{}: unknown {role_key} `{r}` (use {roles_hint})", item(i))
            })?;
            Ok(Message { role, content })
        })
        .collect()
}

fn chat_role(r: &str) -> Option<Role> {
    match r {
        "system" => Some(Role::System),
        "user" => Some(Role::User),
        "assistant" => Some(Role::Assistant),
        _ => None,
    }
}

/// Axolotl's default role mapping for ShareGPT-style `from` values.
fn sharegpt_role(r: &str) -> Option<Role> {
    match r {
        "system" => Some(Role::System),
        "human" | "user" => Some(Role::User),
        "gpt" | "assistant" | "model" => Some(Role::Assistant),
        _ => None,
    }
}

/// One record (a JSON object) as an example of `format` (`Auto`: detected), after `columns`.
pub fn example(record: Value, format: Format, columns: &Columns) -> Result<Example, String> {
    let Value::Object(obj) = record else {
        return Err(format!(
            "a record must be a JSON object, not {}",
            kind(&record)
        ));
    };
    let obj = renamed(obj, columns)?;
    let format = match format {
        Format::Auto => detect(&obj)?,
        f => f,
    };
    let messages = match format {
        Format::Auto => unreachable!("resolved above"),
        Format::Text => {
            let text = string(&obj, "text")?;
            if text.is_empty() {
                return Err("`text` is empty".into());
            }
            return Ok(Example::Text(text));
        }
        Format::Messages => turns(
            &obj,
            "messages",
            "role",
            "content",
            chat_role,
            "system, user or assistant",
        )?,
        Format::Sharegpt => turns(
            &obj,
            "conversations",
            "from",
            "value",
            sharegpt_role,
            "system, human/user or gpt/assistant/model",
        )?,
        Format::PromptCompletion => vec![
            Message {
                role: Role::User,
                content: string(&obj, "prompt")?,
            },
            Message {
                role: Role::Assistant,
                content: string(&obj, "completion")?,
            },
        ],
        Format::Alpaca => {
            let mut user = string(&obj, "instruction")?;
            if let Some(input) = optional_string(&obj, "input")?.filter(|s| !s.is_empty()) {
                user.push('\n');
                user.push_str(&input);
            }
            let mut m = Vec::new();
            if let Some(system) = optional_string(&obj, "system")?.filter(|s| !s.is_empty()) {
                m.push(Message {
                    role: Role::System,
                    content: system,
                });
            }
            m.push(Message {
                role: Role::User,
                content: user,
            });
            m.push(Message {
                role: Role::Assistant,
                content: string(&obj, "output")?,
            });
            m
        }
    };
    if let Some(i) = messages.iter().position(|m| m.content.trim().is_empty()) {
        return Err(format!("{} message {i} has empty content", format.name()));
    }
    if !messages.iter().any(|m| m.role == Role::Assistant) {
        return Err("no assistant message: nothing to train on".into());
    }
    Ok(Example::Chat(messages))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(v: Value) -> Vec<Message> {
        match example(v, Format::Auto, &Columns::new()).unwrap() {
            Example::Chat(m) => m,
            Example::Text(t) => panic!("text {t}"),
        }
    }

    #[test]
    fn every_format_is_detected_and_converted() {
        let m = chat(json!({"conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"}]}));
        assert_eq!(
            m.iter().map(|m| m.role).collect::<Vec<_>>(),
            [Role::System, Role::User, Role::Assistant]
        );
        let m = chat(json!({"instruction": "Add.", "input": "2 + 2", "output": "4"}));
        assert_eq!(
            (m[0].content.as_str(), m[1].content.as_str()),
            ("Add.\n2 + 2", "4")
        );
        // An empty input adds nothing (LLaMA-Factory's converter).
        let m = chat(json!({"instruction": "Say hi.", "input": "", "output": "hi"}));
        assert_eq!(m[0].content, "Say hi.");
        assert_eq!(
            example(
                json!({"text": "A document."}),
                Format::Auto,
                &Columns::new()
            )
            .unwrap(),
            Example::Text("A document.".into())
        );
        assert_eq!(chat(json!({"prompt": "p", "completion": "c"})).len(), 2);
    }

    #[test]
    fn columns_map_names_and_a_missing_one_is_named() {
        let cols: Columns = [
            ("instruction".to_string(), "question".to_string()),
            ("output".to_string(), "answer".to_string()),
        ]
        .into();
        let m = match example(
            json!({"question": "Why?", "answer": "Because."}),
            Format::Auto,
            &cols,
        )
        .unwrap()
        {
            Example::Chat(m) => m,
            _ => unreachable!(),
        };
        assert_eq!(m[1].content, "Because.");
        let e = example(json!({"question": "Why?"}), Format::Auto, &cols).unwrap_err();
        assert!(e.contains("column `answer`"), "{e}");
        assert!(check_columns(&[("reply".to_string(), "x".to_string())].into()).is_err());
    }

    #[test]
    fn bad_records_say_what_is_wrong() {
        let e = |v: Value| example(v, Format::Auto, &Columns::new()).unwrap_err();
        assert!(e(json!({"foo": 1})).contains("no known format"));
        assert!(e(json!({"chosen": "a", "rejected": "b"})).contains("--objective dpo"));
        assert!(
            e(json!({"conversations": [{"from": "bot", "value": "x"}]}))
                .contains("unknown from `bot`")
        );
        assert!(e(json!({"instruction": 3, "output": "x"})).contains("must be a string"));
        assert!(e(json!([1])).contains("JSON object"));
        // Forced: a record of another format is an error, not a guess.
        let e = example(json!({"text": "x"}), Format::Alpaca, &Columns::new()).unwrap_err();
        assert!(e.contains("`instruction` is missing"), "{e}");
    }
}
