//! SentencePiece-converted BPE tokenizers (Phi-3's, Llama-2's), run word by word: the same ids and
//! offsets as the tokenizer HF ships, several times faster on chat data.
//!
//! Such a tokenizer (`tokenizer.json`: a `Sequence[Prepend("▁"), Replace(" ", "▁")]` normalizer,
//! no pre-tokenizer, a BPE model) hands BPE each stretch of text between special tokens as one
//! "word": a heap over every character of a conversation, and the model's word cache never hit.
//! [`word_split`] builds the same tokenizer with a pre-tokenizer that cuts the normalized text
//! before each run of `▁`, so BPE merges word by word and its per-thread cache serves the words
//! that repeat. Normalizer and pre-tokenizer are written here in Rust rather than with the
//! tokenizers crate's regex-based `Replace` and `Split`: its regex engine (Oniguruma, C) allocates
//! through glibc on every match, which serialized the encoding threads on glibc's one lock
//! (`qlora_quant::runtime::Allocator`).
//!
//! Exact, not an approximation: a merge joins two adjacent symbols into a vocabulary token, so
//! when no vocabulary token has `▁` right after another character, no merge can join symbols
//! across a cut made between a character and the `▁` after it; the pieces then evolve
//! independently and BPE of each piece, concatenated, is BPE of the whole. [`word_split`] checks
//! that, and that the BPE has no dropout, subword prefix, word suffix or `ignore_merges` (which
//! would make word boundaries matter), and gives `None` otherwise. Special tokens are split off
//! first, as always (the added tokens are copied with their ids). `tests/it/data.rs` compares ids
//! and offsets with the shipped tokenizer on generated texts, and the chat goldens with
//! transformers.

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::ModelWrapper;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pattern::Pattern;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{
    NormalizedString, Normalizer, Offsets, PreTokenizedString, PreTokenizer,
    SplitDelimiterBehavior, TokenizerImpl,
};

/// SentencePiece's space.
const SPACE: char = '\u{2581}';

/// The word-splitting tokenizer.
pub type WordTokenizer =
    TokenizerImpl<ModelWrapper, SpaceNormalizer, WordStarts, PostProcessorWrapper, DecoderWrapper>;

/// `Sequence[Prepend("▁"), Replace(" ", "▁")]`: `▁` before a non-empty text, every space a `▁`.
#[derive(Debug, Clone, Copy)]
pub struct SpaceNormalizer;

impl Normalizer for SpaceNormalizer {
    fn normalize(&self, n: &mut NormalizedString) -> tokenizers::Result<()> {
        if !n.is_empty() {
            n.prepend("\u{2581}");
        }
        n.replace(' ', "\u{2581}")
    }
}

/// Cuts before each `▁` that does not follow another `▁`, the `▁` staying with the text after it.
#[derive(Debug, Clone, Copy)]
pub struct WordStarts;

impl Pattern for WordStarts {
    /// The matched `▁`s and the stretches between them, covering `inside` (as the crate's regex
    /// patterns report matches).
    fn find_matches(&self, inside: &str) -> tokenizers::Result<Vec<(Offsets, bool)>> {
        if inside.is_empty() {
            return Ok(vec![((0, 0), false)]);
        }
        let mut out = Vec::new();
        let (mut prev, mut last) = (0, None);
        for (i, c) in inside.char_indices() {
            if c == SPACE && last != Some(SPACE) {
                if prev != i {
                    out.push(((prev, i), false));
                }
                let end = i + SPACE.len_utf8();
                out.push(((i, end), true));
                prev = end;
            }
            last = Some(c);
        }
        if prev != inside.len() {
            out.push(((prev, inside.len()), false));
        }
        Ok(out)
    }
}

impl PreTokenizer for WordStarts {
    fn pre_tokenize(&self, p: &mut PreTokenizedString) -> tokenizers::Result<()> {
        p.split(|_, s| s.split(WordStarts, SplitDelimiterBehavior::MergedWithNext))
    }
}

/// Whether `n` is `Sequence[Prepend("▁"), Replace(" ", "▁")]`.
fn is_space_normalizer(n: Option<&NormalizerWrapper>) -> bool {
    let want = serde_json::json!({
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}
        ]
    });
    n.and_then(|n| serde_json::to_value(n).ok()) == Some(want)
}

/// `tok` run word by word (module doc), or `None` when that could change an id.
pub fn word_split(tok: &tokenizers::Tokenizer) -> Option<WordTokenizer> {
    if tok.get_pre_tokenizer().is_some() || !is_space_normalizer(tok.get_normalizer()) {
        return None;
    }
    let ModelWrapper::BPE(bpe) = tok.get_model() else {
        return None;
    };
    if bpe.dropout.is_some_and(|d| d > 0.0)
        || bpe.continuing_subword_prefix.is_some()
        || bpe.end_of_word_suffix.is_some()
        || bpe.ignore_merges
    {
        return None;
    }
    let crosses = |t: &str| {
        let mut prev: Option<char> = None;
        t.chars().any(|c| {
            let hit = c == SPACE && prev.is_some_and(|p| p != SPACE);
            prev = Some(c);
            hit
        })
    };
    if bpe.get_vocab().keys().any(|t| crosses(t)) {
        return None;
    }
    let mut out = WordTokenizer::new(tok.get_model().clone());
    out.with_normalizer(Some(SpaceNormalizer)).ok()?;
    out.with_pre_tokenizer(Some(WordStarts));
    out.with_post_processor(tok.get_post_processor().cloned());
    out.with_decoder(tok.get_decoder().cloned());
    // The added tokens in id order, each checked to get its id back.
    let mut added: Vec<_> = tok.get_added_tokens_decoder().into_iter().collect();
    added.sort_by_key(|(id, _)| *id);
    for (id, t) in added {
        let content = t.content.clone();
        if t.special {
            out.add_special_tokens([t]).ok()?;
        } else {
            out.add_tokens([t]).ok()?;
        }
        if out.token_to_id(&content) != Some(id) {
            return None;
        }
    }
    Some(out)
}
