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
