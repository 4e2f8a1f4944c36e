//! Chat rendering and tokenization against transformers (tests/fixtures/gen_chat_goldens.py), and
//! the trained-token mask: exactly each assistant turn's tokens and its closing `<|end|>`.

use crate::common::fixtures;
use qlora::data::{Conversation, Message, TokenizerBundle};

fn bundle() -> TokenizerBundle {
    TokenizerBundle::from_dir(&crate::common::repo_dir().join("assets/phi3-tokenizer")).unwrap()
}

#[test]
fn rendering_and_ids_match_transformers_and_masks_cover_assistant_turns() {
    let tok = bundle();
    let cases: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(fixtures().join("chat/cases.json")).unwrap())
            .unwrap();
    let (assistant, end) = (
        tok.tokenizer.token_to_id("<|assistant|>").unwrap(),
        tok.end_id.unwrap(),
    );
    assert_eq!((assistant, end, tok.eos_id), (32001, 32007, Some(32000)));
    for (i, case) in cases.iter().enumerate() {
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let conv = Conversation {
            messages: messages.clone(),
            tools: Vec::new(),
            line: i + 1,
        };
        let enc = tok.encode_conversation(&conv).unwrap();
        assert_eq!(
            enc.text,
            case["text"].as_str().unwrap(),
            "case {i}: rendering"
        );
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(enc.ids, want, "case {i}: token ids");
        let prompt = tok
            .template
            .render(&messages[..messages.len() - 1], true)
            .unwrap();
        assert_eq!(
            prompt,
            case["generation_prompt_text"].as_str().unwrap(),
            "case {i}: generation prompt"
        );

        // Expected mask, from the ids alone: strictly after each <|assistant|>, up to and including
        // the next <|end|>.
        let mut expect = vec![false; want.len()];
        let mut inside = false;
        for (t, &id) in want.iter().enumerate() {
            if inside {
                expect[t] = true;
                if id == end {
                    inside = false;
                }
            } else if id == assistant {
                inside = true;
            }
        }
        assert_eq!(enc.trained, expect, "case {i}: trained mask");
        let n_turns = messages
            .iter()
            .filter(|m| m.role == qlora::data::Role::Assistant)
            .count();
        assert_eq!(
            enc.ids
                .iter()
                .zip(&enc.trained)
                .filter(|(id, tr)| **tr && **id == end)
                .count(),
            n_turns
        );
        assert!(
            !enc.trained[enc.ids.len() - 1],
            "eos after the last turn is not trained"
        );
    }
}

#[test]
fn bad_lines_name_file_and_line_or_are_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("d.jsonl");
    std::fs::write(
        &f,
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n\n{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}\nnot json\n",
    )
    .unwrap();
    let e = format!("{:#}", qlora::data::read_jsonl(&f, false).unwrap_err());
    assert!(
        e.contains("d.jsonl:3: message 0: unknown role `robot`") && e.contains("--skip-bad-lines"),
        "{e}"
    );
    let r = qlora::data::read_jsonl(&f, true).unwrap();
    assert_eq!(r.conversations.len(), 1);
    assert_eq!(
        r.skipped.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
        vec![3, 4]
    );
}

/// Phi-3's tokenizer cuts text into words before BPE ([`qlora::data::tokenize::word_split`]):
/// the ids and offsets of any text equal those of the tokenizer as HF ships it (which the goldens
/// above pin against transformers), on texts built from the pieces where a cut could matter:
/// runs of spaces, `▁` typed in the text, newlines, tabs, byte-fallback characters, special tokens.
mod word_split {
    use proptest::prelude::*;
    use qlora::data::tokenize::word_split;

    fn plain() -> tokenizers::Tokenizer {
        tokenizers::Tokenizer::from_file(
            crate::common::repo_dir().join("assets/phi3-tokenizer/tokenizer.json"),
        )
        .unwrap()
    }

    const PIECES: &[&str] = &[
        " ",
        "  ",
        "   ",
        "\n",
        "\n\n",
        "\t",
        "▁",
        "▁▁",
        "a",
        "the",
        " the",
        "Hello",
        "world",
        "don't",
        "3.14",
        "1234567",
        "é",
        "中文",
        "🦀",
        "\u{200b}",
        "<|user|>",
        "<|end|>",
        "<|assistant|>",
        "<s>",
        "</s>",
        "x▁y",
        "  ▁ ",
        ".",
        ",",
        "?!",
        "def f(x):\n    return x",
    ];

    fn same(a: &tokenizers::Tokenizer, b: &qlora::data::spm::WordTokenizer, text: &str) {
        let (x, y) = (
            a.encode(text, false).unwrap(),
            b.encode(text, false).unwrap(),
        );
        assert_eq!(x.get_ids(), y.get_ids(), "{text:?}");
        assert_eq!(x.get_offsets(), y.get_offsets(), "{text:?}");
        let (x, y) = (a.encode(text, true).unwrap(), b.encode(text, true).unwrap());
        assert_eq!(x.get_ids(), y.get_ids(), "{text:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn cut_into_words_the_ids_and_offsets_do_not_change(
            parts in proptest::collection::vec(0..PIECES.len(), 0..40)
        ) {
            static TOKS: std::sync::OnceLock<(
                tokenizers::Tokenizer,
                qlora::data::spm::WordTokenizer,
            )> = std::sync::OnceLock::new();
            let (tok, words) = TOKS.get_or_init(|| {
                let tok = plain();
                let words = word_split(&tok).expect("Phi-3's tokenizer qualifies");
                (tok, words)
            });
            let text: String = parts.iter().map(|&i| PIECES[i]).collect();
            same(tok, words, &text);
        }
    }

    #[test]
    fn a_vocabulary_with_a_token_across_a_cut_is_left_alone() {
        let tok = plain();
        let mut json: serde_json::Value =
            serde_json::from_str(&tok.to_string(false).unwrap()).unwrap();
        json["model"]["vocab"]["a▁b"] = serde_json::json!(40000);
        let crossing: tokenizers::Tokenizer = json.to_string().parse().unwrap();
        assert!(word_split(&crossing).is_none());
        // A tokenizer that already splits words, and a byte-level BPE without ▁, are left alone.
        let mut json: serde_json::Value =
            serde_json::from_str(&tok.to_string(false).unwrap()).unwrap();
        json["pre_tokenizer"] = serde_json::json!({"type": "Whitespace"});
        let split: tokenizers::Tokenizer = json.to_string().parse().unwrap();
        assert!(word_split(&split).is_none());
        // Another normalizer (NFKC before the spaces) is not the one written here.
        let mut json: serde_json::Value =
            serde_json::from_str(&tok.to_string(false).unwrap()).unwrap();
        json["normalizer"]["normalizers"]
            .as_array_mut()
            .unwrap()
            .insert(0, serde_json::json!({"type": "NFKC"}));
        let nfkc: tokenizers::Tokenizer = json.to_string().parse().unwrap();
        assert!(word_split(&nfkc).is_none());
        assert!(word_split(&tok).is_some());
    }
}
