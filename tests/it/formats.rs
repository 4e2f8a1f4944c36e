//! Data formats and sources: ShareGPT, Alpaca and text samples (data/formats/) read the same from
//! JSONL or a JSON array as from the Parquet files pyarrow wrote of the same rows
//! (tests/fixtures/gen_format_samples.py); gzip; conversions; a bad Parquet row named by row group
//! and row; a text run trains every token.

use crate::common::{fixtures, qlora, repo_dir};
use qlora::data::formats::{Columns, Format};
use qlora::data::jsonl::TextDoc;
use qlora::data::{Role, TokenizerBundle, read_data};

fn sample(name: &str) -> String {
    repo_dir()
        .join("data/formats")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn parquet_written_by_pyarrow_reads_as_its_jsonl() {
    let cols = Columns::new();
    for (json, parquet, n) in [
        ("sharegpt.jsonl", "sharegpt.parquet", 12),
        ("alpaca.json", "alpaca.parquet", 18),
    ] {
        let a = read_data(&sample(json), Format::Auto, &cols, false).unwrap();
        let b = read_data(&sample(parquet), Format::Auto, &cols, false).unwrap();
        assert_eq!(a.conversations.len(), n, "{json}");
        let msgs = |r: &qlora::data::jsonl::ReadReport| {
            r.conversations
                .iter()
                .map(|c| c.messages.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(msgs(&a), msgs(&b), "{parquet}");
    }
    // ShareGPT roles (Axolotl's mapping) and a second turn kept.
    let s = read_data(&sample("sharegpt.jsonl"), Format::Auto, &cols, false).unwrap();
    let roles: Vec<Role> = s.conversations[1].messages.iter().map(|m| m.role).collect();
    assert_eq!(
        roles,
        [Role::User, Role::Assistant, Role::User, Role::Assistant]
    );
    assert_eq!(s.conversations[0].messages[0].role, Role::System);
    // Alpaca: the input on its own line after the instruction (LLaMA-Factory's converter).
    let a = read_data(&sample("alpaca.json"), Format::Auto, &cols, false).unwrap();
    assert_eq!(
        a.conversations[1].messages[0].content,
        "Add the two numbers.\n2 + 4"
    );
    assert_eq!(a.conversations[0].messages[0].content, "What is 2 plus 3?");
}

#[test]
fn a_bad_parquet_row_is_named_by_row_group_and_row_or_skipped() {
    let bad = fixtures().join("formats/bad_alpaca.parquet");
    let spec = bad.display().to_string();
    let e = format!(
        "{:#}",
        read_data(&spec, Format::Auto, &Columns::new(), false).unwrap_err()
    );
    assert!(
        e.contains("bad_alpaca.parquet: row group 1, row 4: `output` is missing"),
        "{e}"
    );
    let r = read_data(&spec, Format::Auto, &Columns::new(), true).unwrap();
    assert_eq!((r.conversations.len(), r.skipped.len()), (17, 1));
}

#[test]
fn text_documents_end_with_eos_and_train_every_token() {
    let r = read_data(
        &sample("text.jsonl.gz"),
        Format::Auto,
        &Columns::new(),
        false,
    )
    .unwrap();
    assert_eq!((r.texts.len(), r.conversations.len()), (12, 0));
    let tok = TokenizerBundle::from_dir(&repo_dir().join("assets/phi3-tokenizer")).unwrap();
    let e = tok.encode_text(&r.texts[0]).unwrap();
    assert_eq!(e.ids.last(), tok.eos_id.as_ref());
    assert!(e.trained.iter().all(|t| *t));
    // A document already ending with eos gets no second one.
    let doc = TextDoc {
        text: "Done.<|endoftext|>".into(),
        line: 1,
    };
    let e = tok.encode_text(&doc).unwrap();
    assert_eq!(e.ids.iter().filter(|&&i| Some(i) == tok.eos_id).count(), 1);
}

#[test]
fn every_format_trains_from_its_config() {
    for config in ["sharegpt", "alpaca", "text"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("run");
        let (code, stdout, err) = qlora(&[
            "train",
            "--4bit",
            "--config",
            &format!("configs/{config}.toml"),
            "--max-steps",
            "2",
            "--output",
            &out.display().to_string(),
        ]);
        assert_eq!(code, 0, "{config}: {err}");
        assert!(stdout.contains("done: 2 steps"), "{config}: {stdout}");
    }
}

#[test]
fn preference_pairs_read_from_parquet_as_from_jsonl() {
    // pyarrow's copy of the TRL goldens' conversational pairs (list<struct<role, content>>).
    let a = qlora::data::pairs::read_pairs(&fixtures().join("pref/pairs_chat.jsonl"), false)
        .unwrap()
        .0;
    let b = qlora::data::pairs::read_pairs(&fixtures().join("formats/pairs_chat.parquet"), false)
        .unwrap()
        .0;
    assert_eq!(a.len(), 4);
    assert_eq!(a, b);
}

#[test]
fn data_inspect_finds_pairs_in_parquet() {
    let (code, out, err) = qlora(&[
        "data",
        "inspect",
        "--model",
        "builtin:tiny-phi3",
        "--data",
        "tests/fixtures/formats/pairs_chat.parquet",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("4 pairs, 4 kept"), "{out}");
}
