//! The formats chat and text data come in, one record at a time (a JSONL line, an element of a
//! JSON array, a Parquet row: each a JSON object), into one example. The format is detected from
//! the record's keys, or forced with `data.format`; `data.columns` maps the names a dataset uses
//! onto the ones below.
//!
//! - `messages`: `[{"role": "system" | "user" | "assistant" | "tool", "content": …}]`, with tool
//!   use as transformers' chat templates take it: an assistant message may carry `tool_calls`
//!   (`[{"type": "function", "function": {"name", "arguments"}}]`, `arguments` an object or a
//!   string) and then needs no `content`; a `tool` message is a tool's result (its `name` and
//!   `tool_call_id` kept); the record's `tools` (JSON schemas, or a string holding their JSON list,
//!   as LLaMA-Factory stores them) reach the template as `tools`. These values are kept as JSON
//!   and handed to the template unchanged; `null` or `[]` counts as absent (Parquet rows carry
//!   every field of the schema).
//! - `prompt` / `completion`: one user turn and one assistant turn, as today (TRL's
//!   prompt-completion format).
//! - ShareGPT: `conversations: [{"from", "value"}]`, `from` mapped as Axolotl's `chat_template`
//!   loader maps roles by default (`human`, `user` → user; `gpt`, `assistant`, `model` → assistant;
//!   `system` → system), and its tool turns as LLaMA-Factory's sharegpt converter reads them:
//!   `function_call` (its value the JSON of `{"name", "arguments"}` or a list of them) → an
//!   assistant message with those `tool_calls`, `observation` and `tool` → a `tool` message.
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
    /// A conversation, rendered with the chat template; the assistant turns are trained. `tools`:
    /// the record's tool schemas (empty: none).
    Chat {
        messages: Vec<Message>,
        tools: Vec<Value>,
    },
    /// A document, trained on every token.
    Text(String),
}

/// `data.columns`: a dataset's column name for each name the formats use (`messages = "dialog"`,
/// `output = "answer"`, …).
pub type Columns = BTreeMap<String, String>;

/// The names the formats read, for checking `data.columns`.
pub const KEYS: [&str; 10] = [
    "messages",
    "prompt",
    "completion",
    "conversations",
    "instruction",
    "input",
    "output",
    "system",
    "text",
    "tools",
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
            None if matches!(ours.as_str(), "input" | "system" | "tools") => {}
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
            let at = |e: String| format!("{}: {e}", item(i));
            let r = string(m, role_key).map_err(at)?;
            let role = role(&r).ok_or_else(|| {
                format!("{}: unknown {role_key} `{r}` (use {roles_hint})", item(i))
            })?;
            // An assistant message that calls tools needs no text; a missing one is empty.
            let mut content = if role == Role::Assistant {
                optional_string(m, content_key)
                    .map_err(at)?
                    .unwrap_or_default()
            } else {
                string(m, content_key).map_err(at)?
            };
            let mut calls = tool_calls(m.get("tool_calls")).map_err(at)?;
            if key == "conversations" && r == "function_call" {
                calls = calls_from_text(&content).map_err(at)?;
                content.clear();
            }
            if !calls.is_empty() && role != Role::Assistant {
                return Err(at(format!(
                    "only an assistant message may carry tool_calls, not {r}"
                )));
            }
            Ok(Message {
                role,
                content,
                tool_calls: calls,
                name: optional_string(m, "name").map_err(at)?,
                tool_call_id: optional_string(m, "tool_call_id").map_err(at)?,
            })
        })
        .collect()
}

/// The function a tool call names (`function.name`, or a flat call's `name`).
pub fn call_name(call: &Value) -> Option<&str> {
    call.get("function")
        .unwrap_or(call)
        .get("name")
        .and_then(Value::as_str)
}

/// A message's `tool_calls`: absent, `null` and `[]` are none; else a list of calls, each an
/// object naming its function.
fn tool_calls(v: Option<&Value>) -> Result<Vec<Value>, String> {
    let calls = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(calls)) => calls,
        Some(other) => return Err(format!("`tool_calls` must be a list, not {}", kind(other))),
    };
    for (j, c) in calls.iter().enumerate() {
        if !c.is_object() || call_name(c).is_none() {
            return Err(format!(
                "tool call {j} must be an object naming its function ({{\"type\": \"function\", \"function\": {{\"name\": …, \"arguments\": …}}}})"
            ));
        }
    }
    Ok(calls.clone())
}

/// LLaMA-Factory's `function_call` value: the JSON of `{"name", "arguments"}` or a list of them,
/// as OpenAI-shaped calls.
fn calls_from_text(text: &str) -> Result<Vec<Value>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| {
        format!("a function_call's value must be the JSON of {{\"name\", \"arguments\"}} or a list of them ({e})")
    })?;
    let list = match v {
        Value::Array(l) => l,
        one => vec![one],
    };
    let calls: Vec<Value> = list
        .into_iter()
        .map(|f| serde_json::json!({"type": "function", "function": f}))
        .collect();
    if calls.is_empty() {
        return Err("a function_call's value is an empty list".into());
    }
    tool_calls(Some(&Value::Array(calls)))
}

/// The record's `tools`: absent, `null` and `[]` are none; else a list of JSON schemas, or a
/// string holding that list's JSON (LLaMA-Factory's and many Hub datasets' way).
fn tools(obj: &Map<String, Value>) -> Result<Vec<Value>, String> {
    let parsed;
    let list = match obj.get("tools") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(Vec::new()),
        Some(Value::String(s)) => {
            parsed = serde_json::from_str::<Value>(s)
                .map_err(|e| format!("`tools` is a string but not JSON ({e})"))?;
            &parsed
        }
        Some(v) => v,
    };
    match list {
        Value::Array(l) if l.iter().all(Value::is_object) => Ok(l.clone()),
        other => Err(format!(
            "`tools` must be a list of JSON schemas (objects), not {}",
            kind(other)
        )),
    }
}

fn chat_role(r: &str) -> Option<Role> {
    match r {
        "system" => Some(Role::System),
        "user" => Some(Role::User),
        "assistant" => Some(Role::Assistant),
        "tool" => Some(Role::Tool),
        _ => None,
    }
}

/// Axolotl's default role mapping for ShareGPT-style `from` values, and LLaMA-Factory's tool
/// turns (`function_call`: an assistant's calls; `observation`: their result).
fn sharegpt_role(r: &str) -> Option<Role> {
    match r {
        "system" => Some(Role::System),
        "human" | "user" => Some(Role::User),
        "gpt" | "assistant" | "model" | "function_call" => Some(Role::Assistant),
        "observation" | "tool" => Some(Role::Tool),
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
            "system, user, assistant or tool",
        )?,
        Format::Sharegpt => turns(
            &obj,
            "conversations",
            "from",
            "value",
            sharegpt_role,
            "system, human/user, gpt/assistant/model, function_call or observation/tool",
        )?,
        Format::PromptCompletion => vec![
            Message::new(Role::User, string(&obj, "prompt")?),
            Message::new(Role::Assistant, string(&obj, "completion")?),
        ],
        Format::Alpaca => {
            let mut user = string(&obj, "instruction")?;
            if let Some(input) = optional_string(&obj, "input")?.filter(|s| !s.is_empty()) {
                user.push('\n');
                user.push_str(&input);
            }
            let mut m = Vec::new();
            if let Some(system) = optional_string(&obj, "system")?.filter(|s| !s.is_empty()) {
                m.push(Message::new(Role::System, system));
            }
            m.push(Message::new(Role::User, user));
            m.push(Message::new(Role::Assistant, string(&obj, "output")?));
            m
        }
    };
    if let Some(i) = messages
        .iter()
        .position(|m| m.content.trim().is_empty() && m.tool_calls.is_empty())
    {
        let calls = if messages[i].role == Role::Assistant {
            " and no tool_calls"
        } else {
            ""
        };
        return Err(format!(
            "{} message {i} has empty content{calls}",
            format.name()
        ));
    }
    if !messages.iter().any(|m| m.role == Role::Assistant) {
        return Err("no assistant message: nothing to train on".into());
    }
    let tools = tools(&obj)?;
    Ok(Example::Chat { messages, tools })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(v: Value) -> Vec<Message> {
        match example(v, Format::Auto, &Columns::new()).unwrap() {
            Example::Chat { messages, .. } => messages,
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
            Example::Chat { messages, .. } => messages,
            _ => unreachable!(),
        };
        assert_eq!(m[1].content, "Because.");
        let e = example(json!({"question": "Why?"}), Format::Auto, &cols).unwrap_err();
        assert!(e.contains("column `answer`"), "{e}");
        assert!(check_columns(&[("reply".to_string(), "x".to_string())].into()).is_err());
    }

    #[test]
    fn tool_calls_results_and_schemas_are_kept_as_json() {
        let call = json!({"type": "function",
                          "function": {"name": "get_weather", "arguments": {"city": "Paris"}}});
        let schema = json!({"type": "function", "function": {"name": "get_weather"}});
        let record = json!({
            "tools": [schema],
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "name": "get_weather", "tool_call_id": "c1", "content": "22 C"},
                // Parquet rows carry every field of the schema: nulls are absent.
                {"role": "assistant", "content": "It is 22 C.", "tool_calls": null, "name": null}]});
        let Example::Chat { messages, tools } =
            example(record, Format::Auto, &Columns::new()).unwrap()
        else {
            panic!("not chat")
        };
        assert_eq!(tools, [schema]);
        assert_eq!(
            messages.iter().map(|m| m.role).collect::<Vec<_>>(),
            [Role::User, Role::Assistant, Role::Tool, Role::Assistant]
        );
        assert_eq!(
            (messages[1].content.as_str(), &messages[1].tool_calls),
            ("", &vec![call])
        );
        assert_eq!(messages[2].name.as_deref(), Some("get_weather"));
        assert_eq!(messages[2].tool_call_id.as_deref(), Some("c1"));
        // What templates see: extra keys only where the data has them, so a template that never
        // looks at them renders as before.
        assert_eq!(
            serde_json::to_value(&messages[3]).unwrap(),
            json!({"role": "assistant", "content": "It is 22 C."})
        );
        assert_eq!(
            serde_json::to_value(&messages[2]).unwrap(),
            json!({"role": "tool", "content": "22 C", "name": "get_weather", "tool_call_id": "c1"})
        );
        // `tools` as a string holding the JSON list (LLaMA-Factory), mapped from another column.
        let cols: Columns = [("tools".to_string(), "functions".to_string())].into();
        let Example::Chat { tools, .. } = example(
            json!({"functions": "[{\"name\": \"f\"}]",
                   "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}),
            Format::Auto,
            &cols,
        )
        .unwrap() else {
            panic!("not chat")
        };
        assert_eq!(tools, [json!({"name": "f"})]);
    }

    #[test]
    fn sharegpt_tool_turns_map_as_llama_factory_maps_them() {
        // LLaMA-Factory's sharegpt tool data: the call's value is the JSON of {name, arguments}.
        let m = chat(json!({"conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"},
            {"from": "observation", "value": "22 C"},
            {"from": "gpt", "value": "It is 22 C."}]}));
        assert_eq!(
            m.iter().map(|m| m.role).collect::<Vec<_>>(),
            [Role::User, Role::Assistant, Role::Tool, Role::Assistant]
        );
        assert_eq!(m[1].content, "");
        assert_eq!(
            m[1].tool_calls,
            [json!({"type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}}})]
        );
        assert_eq!(m[2].content, "22 C");
        let e = example(
            json!({"conversations": [{"from": "human", "value": "x"},
                                     {"from": "function_call", "value": "get_weather(Paris)"}]}),
            Format::Auto,
            &Columns::new(),
        )
        .unwrap_err();
        assert!(e.contains("item 1") && e.contains("function_call"), "{e}");
    }

    #[test]
    fn bad_tool_data_says_what_is_wrong() {
        let e = |v: Value| example(v, Format::Auto, &Columns::new()).unwrap_err();
        let user = json!({"role": "user", "content": "x"});
        // Neither content nor tool_calls.
        let msg = e(json!({"messages": [user, {"role": "assistant", "tool_calls": []}]}));
        assert!(msg.contains("message 1 has empty content"), "{msg}");
        let msg = e(json!({"messages": [user, {"role": "assistant"}]}));
        assert!(msg.contains("message 1 has empty content"), "{msg}");
        // An unknown role names its message.
        let msg = e(json!({"messages": [user, {"role": "ipython", "content": "1"}]}));
        assert!(msg.contains("message 1: unknown role `ipython`"), "{msg}");
        let msg = e(json!({"messages": [{"role": "user", "content": "x",
                                         "tool_calls": [{"function": {"name": "f"}}]}]}));
        assert!(msg.contains("message 0: only an assistant"), "{msg}");
        let msg = e(json!({"messages": [user, {"role": "assistant", "tool_calls": [{"x": 1}]}]}));
        assert!(
            msg.contains("message 1: tool call 0 must be an object naming"),
            "{msg}"
        );
        let msg = e(json!({"tools": {"name": "f"}, "messages": [user,
                          {"role": "assistant", "content": "y"}]}));
        assert!(msg.contains("`tools` must be a list"), "{msg}");
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
