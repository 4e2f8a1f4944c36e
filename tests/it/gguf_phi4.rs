//! Phi-4-mini's traits in the GGUF export, against llama.cpp's own converter
//! (tests/fixtures/gen_gguf_goldens.py): a BPE ("gpt2") vocabulary with the gpt-4o pre-tokenizer,
//! merges and padding, partial rotary (rope.dimension_count 12 of head_dim 16), a tied head (no
//! `output.weight`), longrope factors of rotary_dim / 2, sliding_window 0. The checkpoint is the
//! committed tests/fixtures/phi4-mini-tiny, so both sides read the same bytes.

use crate::common::fixtures;
use crate::gguf::compare;
use qlora::export::MergeBase;
use qlora::export::gguf::GgmlType;
use std::path::Path;

/// Exports with the pre-tokenizer named `gpt-4o`: the fixture's vocabulary is synthetic, so its
/// check hash is in no table, and the golden was made with the converter told the same name.
fn export(model: &Path, out: &Path) -> anyhow::Result<()> {
    export_pre(model, out, Some("gpt-4o"))
}

fn export_pre(model: &Path, out: &Path, pre: Option<&str>) -> anyhow::Result<()> {
    qlora::export::gguf_model::export(
        model,
        None,
        out,
        GgmlType::parse("f16").unwrap(),
        MergeBase::Original,
        false,
        pre,
    )
}

#[test]
fn phi4_mini_like_gguf_equals_llama_cpp_converter_output() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("phi4.gguf");
    export(&fixtures().join("phi4-mini-tiny"), &out).unwrap();
    compare(&out, "phi4-mini-tiny-f16.json");
}

/// A copy of the fixture with tokenizer.json edited by `edit`.
fn with_tokenizer(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    std::fs::create_dir_all(dir).unwrap();
    for e in std::fs::read_dir(fixtures().join("phi4-mini-tiny")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let path = dir.join("tokenizer.json");
    let mut tj: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut tj);
    std::fs::write(&path, serde_json::to_vec(&tj).unwrap()).unwrap();
}

#[test]
fn unknown_bpe_pre_tokenizers_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    with_tokenizer(&dir, |_| {});
    let out = tmp.path().join("m.gguf");
    // The synthetic vocabulary's check hash is in no table: refused with its hash, as llama.cpp's
    // converter refuses it, and the way out named.
    let hash = qlora::export::vocab::chkhsh(&dir.join("tokenizer.json")).unwrap();
    let e = format!("{:#}", export_pre(&dir, &out, None).unwrap_err());
    assert!(
        e.contains("tokenizer.json") && e.contains(&hash) && e.contains("--gguf-pre"),
        "{e}"
    );
    assert!(!out.exists(), "nothing is written");
    // A name llama.cpp does not have is refused too.
    let e = format!("{:#}", export_pre(&dir, &out, Some("gpt-5")).unwrap_err());
    assert!(e.contains("gpt-5") && e.contains("--gguf-pre"), "{e}");
    assert!(!out.exists(), "nothing is written");

    // A token id past config.json's vocab_size is an error, not a truncated vocabulary.
    let dir = tmp.path().join("m2");
    with_tokenizer(&dir, |tj| {
        tj["added_tokens"][0]["id"] = 4000.into();
        tj["model"]["vocab"]["<|endoftext|>"] = 4000.into();
    });
    let e = format!("{:#}", export(&dir, &out).unwrap_err());
    assert!(
        e.contains("tokenizer.json") && e.contains("4000") && e.contains("vocab_size"),
        "{e}"
    );
}
