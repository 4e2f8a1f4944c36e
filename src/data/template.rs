//! The chat template: the model's own `chat_template` from tokenizer_config.json rendered with
//! minijinja (Jinja2, as transformers renders it), or Phi-3's format when the model has none:
//! `<|system|>\n…<|end|>\n<|user|>\n…<|end|>\n<|assistant|>\n…<|end|>\n` then eos (TRL's phi3.jinja).
//!
//! The context is transformers' (`render_jinja_template`): `messages`, `tools` (`none` when the
//! conversation has none), `add_generation_prompt`, `bos_token`, `eos_token`. `tojson` is
//! transformers' own filter (`json.dumps(x, ensure_ascii=False, indent=…, separators=…)`: `", "`
//! and `": "` between items, no HTML escaping), not minijinja's (compact, `<>&'` escaped), so tool
//! schemas and calls render as transformers renders them. One difference is left: object keys
//! come out sorted (serde_json's maps), where `json.dumps` keeps the dataset's order.

use super::jsonl::Message;
use anyhow::{Context, Result};
use minijinja::value::{Kwargs, Value as JinjaValue, ValueKind};
use minijinja::{Environment, Error, ErrorKind, context};
use serde_json::Value;

/// Phi-3's format, used when tokenizer_config.json carries no template.
pub const PHI3_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}";

/// A compiled chat template with the special tokens it refers to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    pub bos_token: String,
    pub eos_token: String,
    /// Whether the model's own template is used (false: the Phi-3 fallback).
    pub from_model: bool,
    /// The template's text (what the data cache's key hashes).
    pub source: String,
}

impl ChatTemplate {
    /// Compiles `source` (or the Phi-3 fallback).
    pub fn new(source: Option<&str>, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.add_filter("tojson", tojson);
        let from_model = source.is_some();
        env.add_template_owned("chat", source.unwrap_or(PHI3_TEMPLATE).to_string())
            .context("the chat template does not compile")?;
        Ok(Self {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            from_model,
            source: source.unwrap_or(PHI3_TEMPLATE).to_string(),
        })
    }

    /// Renders `messages`; `add_generation_prompt` ends with the assistant header instead of eos.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, &[], add_generation_prompt)
    }

    /// Renders `messages` with the tool schemas `tools` (empty: the template's `tools` is `none`,
    /// as transformers passes `tools=None`).
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: &[Value],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self.env.get_template("chat").expect("added in new");
        tmpl.render(context! {
            messages => messages.iter().map(message).collect::<Vec<_>>(),
            tools => (!tools.is_empty()).then(|| tools.iter().map(jinja).collect::<Vec<_>>()),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .context("rendering the chat template")
    }
}

/// `v` as a template value. Numbers are converted by hand: serde_json's `arbitrary_precision`
/// (a dependency turns it on) would hand them to minijinja as one-key maps.
fn jinja(v: &Value) -> JinjaValue {
    match v {
        Value::Null => JinjaValue::from(()),
        Value::Bool(b) => JinjaValue::from(*b),
        Value::Number(n) => n
            .as_i64()
            .map(JinjaValue::from)
            .or_else(|| n.as_u64().map(JinjaValue::from))
            .or_else(|| n.as_f64().map(JinjaValue::from))
            .unwrap_or_else(|| JinjaValue::from(n.to_string())),
        Value::String(s) => JinjaValue::from(s.as_str()),
        Value::Array(items) => items.iter().map(jinja).collect(),
        Value::Object(map) => map.iter().map(|(k, v)| (k.as_str(), jinja(v))).collect(),
    }
}

/// A message as templates see it: `role` and `content`, and `tool_calls`, `name` and
/// `tool_call_id` only when it has them.
fn message(m: &Message) -> JinjaValue {
    let mut fields = vec![
        ("role", JinjaValue::from_serialize(m.role)),
        ("content", JinjaValue::from(m.content.as_str())),
    ];
    if !m.tool_calls.is_empty() {
        fields.push(("tool_calls", m.tool_calls.iter().map(jinja).collect()));
    }
    for (key, v) in [("name", &m.name), ("tool_call_id", &m.tool_call_id)] {
        if let Some(v) = v {
            fields.push((key, JinjaValue::from(v.as_str())));
        }
    }
    fields.into_iter().collect()
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, its first positional argument `ensure_ascii` as there. Keys come out sorted
/// whatever `sort_keys` says (see the module doc).
fn tojson(
    value: &JinjaValue,
    ensure_ascii: Option<bool>,
    kwargs: Kwargs,
) -> std::result::Result<JinjaValue, Error> {
    let ensure_ascii = match kwargs.get::<Option<bool>>("ensure_ascii")? {
        Some(b) => b,
        None => ensure_ascii.unwrap_or(false),
    };
    let indent = match kwargs.get::<Option<JinjaValue>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match (v.as_str(), v.as_usize()) {
            (Some(s), _) => s.to_string(),
            (None, Some(n)) => " ".repeat(n),
            (None, None) => return Err(bad("indent must be a count or a string")),
        }),
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => return Err(bad("separators must be two strings")),
        // json.dumps: ", " without an indent, "," with one.
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let _sorted_anyway: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let style = PyJson {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    style.value(value, 0, &mut out)?;
    Ok(JinjaValue::from_safe_string(out))
}

fn bad(what: &str) -> Error {
    Error::new(ErrorKind::InvalidOperation, format!("tojson: {what}"))
}

/// Python's `json.dumps` layout.
struct PyJson {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
}

impl PyJson {
    fn value(
        &self,
        v: &JinjaValue,
        level: usize,
        out: &mut String,
    ) -> std::result::Result<(), Error> {
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
            ValueKind::Number => out.push_str(&py_float(f64::try_from(v.clone())?)),
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<(Option<String>, JinjaValue)> =
                    v.try_iter()?.map(|item| (None, item)).collect();
                self.container(('[', ']'), &items, level, out)?
            }
            ValueKind::Map => {
                let mut items = Vec::new();
                for key in v.try_iter()? {
                    // Python writes int, float, bool and None keys as strings too.
                    let name = match key.as_str() {
                        Some(s) => s.to_string(),
                        None => key.to_string(),
                    };
                    items.push((Some(name), v.get_item(&key)?));
                }
                self.container(('{', '}'), &items, level, out)?
            }
            kind => return Err(bad(&format!("a {kind} is not JSON serializable"))),
        }
        Ok(())
    }

    fn container(
        &self,
        (open, close): (char, char),
        items: &[(Option<String>, JinjaValue)],
        level: usize,
        out: &mut String,
    ) -> std::result::Result<(), Error> {
        if items.is_empty() {
            out.extend([open, close]);
            return Ok(());
        }
        let newline = |level: usize| {
            self.indent
                .as_ref()
                .map(|i| format!("\n{}", i.repeat(level)))
                .unwrap_or_default()
        };
        out.push(open);
        out.push_str(&newline(level + 1));
        for (n, (key, v)) in items.iter().enumerate() {
            if n > 0 {
                out.push_str(&self.item_sep);
                out.push_str(&newline(level + 1));
            }
            if let Some(k) = key {
                self.string(k, out);
                out.push_str(&self.key_sep);
            }
            self.value(v, level + 1, out)?;
        }
        out.push_str(&newline(level));
        out.push(close);
        Ok(())
    }

    /// Python's escapes: `\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f`, other controls as `\u00xx`;
    /// with `ensure_ascii`, every non-ASCII character as `\uxxxx` (surrogate pairs past U+FFFF).
    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)`: the shortest digits that read back, in positional notation for
/// exponents -5 < e < 16 (with `.0` when integral), else `d.ddde±XX`.
fn py_float(f: f64) -> String {
    if !f.is_finite() {
        return if f.is_nan() {
            "NaN".into()
        } else if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    // Rust's `{:e}` gives the same shortest round-trip digits: "-1.2345e-7".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("an integer exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if !(-5 < exp && exp < 16) {
        let exp_sign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{mantissa}e{exp_sign}{:02}", exp.abs());
    }
    let point = exp + 1; // digits before the decimal point
    let body = if point <= 0 {
        format!("0.{}{digits}", "0".repeat((-point) as usize))
    } else if point as usize >= digits.len() {
        format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
    } else {
        let (a, b) = digits.split_at(point as usize);
        format!("{a}.{b}")
    };
    format!("{sign}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `tojson` against Python's `json.dumps` (transformers' filter); the references were printed
    /// by Python 3 `json.dumps(v, ensure_ascii=False, sort_keys=True)`, `json.dumps(v["s"],
    /// ensure_ascii=True)` and `json.dumps(w, ensure_ascii=False, indent=2)`.
    #[test]
    fn tojson_writes_what_transformers_writes() {
        let v = json!({
            "a": [1, 2.5, 1e-5, 1e16, 123456789012345678_i64, -0.0, 0.0001, 1e15, 3.0, 0.1,
                  1.5e-7, 2.5e20, 1e22, 12345.678, 5e-324, 1.7976931348623157e308],
            "b": {"x": null, "y": true},
            "s": "<tag> & 'q' \"dq\" \\ \n\t\u{1}\u{1f} é 😀",
            "e": [],
            "o": {},
        });
        let w = json!({"k": [1, {"z": []}], "m": "x"});
        let t = ChatTemplate::new(
            Some(
                "{{ tools[0] | tojson }}|{{ tools[0].s | tojson(ensure_ascii=true) }}|{{ tools[1] | tojson(indent=2) }}",
            ),
            "<s>",
            "</s>",
        )
        .unwrap();
        let out = t.render_with_tools(&[], &[v, w], false).unwrap();
        let want = [
            r#"{"a": [1, 2.5, 1e-05, 1e+16, 123456789012345678, -0.0, 0.0001, 1000000000000000.0, 3.0, 0.1, 1.5e-07, 2.5e+20, 1e+22, 12345.678, 5e-324, 1.7976931348623157e+308], "b": {"x": null, "y": true}, "e": [], "o": {}, "s": "<tag> & 'q' \"dq\" \\ \n\t\u0001\u001f é 😀"}"#,
            r#""<tag> & 'q' \"dq\" \\ \n\t\u0001\u001f \u00e9 \ud83d\ude00""#,
            "{\n  \"k\": [\n    1,\n    {\n      \"z\": []\n    }\n  ],\n  \"m\": \"x\"\n}",
        ]
        .join("|");
        assert_eq!(out, want);
    }

    #[test]
    fn tools_are_none_unless_given_and_keep_their_types() {
        let t = ChatTemplate::new(
            Some("{% if tools is none %}none{% else %}{{ tools[0].n + 1 }}{% endif %}"),
            "<s>",
            "</s>",
        )
        .unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "none");
        // Numbers stay numbers.
        let tools = [json!({"n": 41})];
        assert_eq!(t.render_with_tools(&[], &tools, false).unwrap(), "42");
    }
}
