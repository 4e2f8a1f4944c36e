//! Chat data: JSONL conversations, rendered with the model's own chat template, tokenized with the
//! trained tokens marked (assistant content and its closing `<|end|>`), and batched (packed with
//! per-conversation positions and a block-diagonal mask, or padded).
//!
//! - [`jsonl`]: reading `{"messages": [...]}` or `{"prompt", "completion"}` lines, with file:line errors.
//! - [`template`]: the chat template (minijinja), with Phi-3's format as the fallback.
//! - [`tokenize`]: text → ids + trained mask.
//! - [`encode`]: reading and tokenizing at scale (every core, bounded memory, cached).
//! - [`batch`]: packing / padding into [`crate::train::Batch`]es.
//! - [`pairs`]: preference pairs (prompt, chosen, rejected), tokenized as TRL tokenizes them.

pub mod batch;
pub mod encode;
pub mod formats;
pub mod jsonl;
pub mod pairs;
pub mod source;
pub mod spm;
pub mod template;
pub mod tokenize;

pub use jsonl::{Conversation, Message, Role, TextDoc, read_data, read_jsonl};
pub use template::ChatTemplate;
pub use tokenize::{Encoded, TokenizerBundle};
