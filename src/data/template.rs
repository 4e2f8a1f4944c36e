//! The chat template: the model's own `chat_template` from tokenizer_config.json rendered with
//! minijinja (Jinja2, as transformers renders it), or Phi-3's format when the model has none:
//! `<|system|>\n…<|end|>\n<|user|>\n…<|end|>\n<|assistant|>\n…<|end|>\n` then eos (TRL's phi3.jinja).

use super::jsonl::Message;
use anyhow::{Context, Result};
use minijinja::{Environment, context};

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
}

impl ChatTemplate {
    /// Compiles `source` (or the Phi-3 fallback).
    pub fn new(source: Option<&str>, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        let from_model = source.is_some();
        env.add_template_owned("chat", source.unwrap_or(PHI3_TEMPLATE).to_string())
            .context("the chat template does not compile")?;
        Ok(Self {
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            from_model,
        })
    }

    /// Renders `messages`; `add_generation_prompt` ends with the assistant header instead of eos.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat").expect("added in new");
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .context("rendering the chat template")
    }
}
