//! llama.cpp's pre-tokenizer detection on real BPE vocabularies (tests/fixtures/gen_bpe_vocab_goldens.py):
//! GPT-2, Llama-3 as packaged (smaug-bpe: no BOS) and with Meta's post-processor (llama-bpe),
//! GPT-4o's o200k (gpt-4o: Phi-4-mini's), GPT-4's cl100k (dbrx: Phi-4's) and Qwen3's (qwen2, single
//! digits). Each vocabulary is committed pruned to what the check text and llama.cpp's 46 test
//! strings use, ids unchanged. For each: our check hash and name equal the converter's, our GGUF's
//! `tokenizer.ggml.*` keys equal what convert_hf_to_gguf.py writes for the same tiny checkpoint
//! (where two conversions agree: not for the Llama-3 copies and Qwen3, whose added tokens the
//! converter renumbers from run to run once pruned; see the generator),
//! and tokenizers' ids for the test strings equal the golden's, which llama.cpp's `llama_tokenize`
//! reproduces except on the cases the golden lists as llama.cpp's own divergences.

use crate::common::{Raw, fixtures, write_checkpoint};
use crate::gguf::compare_metadata;
use qlora::export::MergeBase;
use qlora::export::gguf::GgmlType;
use qlora::export::vocab::{chkhsh, pre_of_chkhsh};
use serde::Deserialize;
use std::path::Path;

const VOCABS: [&str; 6] = ["gpt2", "llama3", "llama3-meta", "gpt4o", "cl100k", "qwen3"];

#[derive(Deserialize)]
struct Golden {
    chkhsh: String,
    pre: String,
    vocab_size: usize,
    /// The converter's tokenizer keys for the checkpoint.
    metadata: serde_json::Map<String, serde_json::Value>,
    /// Whether they were made with the pruned vocabulary's id gaps filled (the generator's
    /// `fill_gaps`, which [`fill_gaps`] repeats).
    gap_fill: bool,
    tokenizers_ids: Vec<Vec<u32>>,
    llama_tokenize_ids: Vec<Vec<u32>>,
    llama_tokenize_differs: Vec<usize>,
}

fn golden(name: &str) -> Golden {
    let path = fixtures().join(format!("bpe/{name}.json"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// llama.cpp's tokenizer test strings (`models/ggml-vocab-*.gguf.inp`).
fn test_strings() -> Vec<String> {
    let text = std::fs::read_to_string(fixtures().join("bpe/llama.cpp-vocab-test.inp")).unwrap();
    let mut cases: Vec<String> = text
        .split("\n__ggml_vocab_test__\n")
        .map(str::to_string)
        .collect();
    assert_eq!(
        cases.pop().as_deref(),
        Some(""),
        "the file ends with a separator"
    );
    cases
}

/// The generator's tiny checkpoint: its config.json (a 1-layer Phi-3 of hidden 16 with the
/// vocabulary's size, transformers' default special ids included), weights of those shapes, the
/// pruned tokenizer.json, and tokenizer_config.json under Phi-4's class (llama.cpp's Phi-3 converter
/// reads a BPE vocabulary only then) with bos/eos/unk null where absent.
pub fn tiny_checkpoint(dir: &Path, vocab: &str) {
    let src = fixtures().join("bpe").join(vocab);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    let g = |k: &str| config[k].as_u64().unwrap() as usize;
    let (h, i, v) = (g("hidden_size"), g("intermediate_size"), g("vocab_size"));
    assert_eq!(
        (g("num_hidden_layers"), g("num_key_value_heads")),
        (1, g("num_attention_heads"))
    );
    let p = "model.layers.0";
    let tensors = vec![
        (
            "model.embed_tokens.weight".to_string(),
            Raw::bf16(&[v, h], 1),
        ),
        ("model.norm.weight".to_string(), Raw::bf16(&[h], 2)),
        ("lm_head.weight".to_string(), Raw::bf16(&[v, h], 3)),
        (format!("{p}.input_layernorm.weight"), Raw::bf16(&[h], 4)),
        (
            format!("{p}.post_attention_layernorm.weight"),
            Raw::bf16(&[h], 5),
        ),
        (
            format!("{p}.self_attn.qkv_proj.weight"),
            Raw::bf16(&[3 * h, h], 6),
        ),
        (
            format!("{p}.self_attn.o_proj.weight"),
            Raw::bf16(&[h, h], 7),
        ),
        (
            format!("{p}.mlp.gate_up_proj.weight"),
            Raw::bf16(&[2 * i, h], 8),
        ),
        (format!("{p}.mlp.down_proj.weight"), Raw::bf16(&[h, i], 9)),
    ];
    write_checkpoint(dir, &config, &tensors, 1);
    std::fs::copy(src.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let mut tc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("tokenizer_config.json")).unwrap()).unwrap();
    tc["tokenizer_class"] = "GPT2Tokenizer".into();
    for k in ["bos_token", "eos_token", "unk_token"] {
        if tc.get(k).is_none() {
            tc[k] = serde_json::Value::Null;
        }
    }
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_vec(&tc).unwrap(),
    )
    .unwrap();
}

/// The generator's `fill_gaps`: a vocabulary entry `<|qlora_gap_{i}|>` at every id below the largest
/// that no token uses (no merge forms them, so every text tokenizes as before).
fn fill_gaps(tokenizer_json: &Path) {
    let mut tj: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tokenizer_json).unwrap()).unwrap();
    let mut used: std::collections::BTreeSet<u64> = tj["model"]["vocab"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .collect();
    used.extend(
        tj["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_u64().unwrap()),
    );
    let max = *used.last().unwrap();
    let vocab = tj["model"]["vocab"].as_object_mut().unwrap();
    for i in (0..max).filter(|i| !used.contains(i)) {
        vocab.insert(format!("<|qlora_gap_{i}|>"), i.into());
    }
    std::fs::write(tokenizer_json, serde_json::to_vec(&tj).unwrap()).unwrap();
}

fn vocab_size_of(dir: &Path) -> usize {
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    c["vocab_size"].as_u64().unwrap() as usize
}

#[test]
fn check_hashes_name_the_pre_tokenizer_llama_cpp_does() {
    for vocab in VOCABS {
        let g = golden(vocab);
        let h = chkhsh(&fixtures().join("bpe").join(vocab).join("tokenizer.json")).unwrap();
        assert_eq!(h, g.chkhsh, "{vocab}: check hash");
        assert_eq!(pre_of_chkhsh(&h), Some(g.pre.as_str()), "{vocab}: name");
    }
}

#[test]
fn bpe_vocabularies_export_the_converters_tokenizer_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let mut compared = 0;
    for vocab in VOCABS {
        let g = golden(vocab);
        let metadata = &g.metadata;
        compared += 1;
        let dir = tmp.path().join(vocab);
        tiny_checkpoint(&dir, vocab);
        if g.gap_fill {
            fill_gaps(&dir.join("tokenizer.json"));
        }
        assert_eq!(g.vocab_size, vocab_size_of(&dir));
        let out = tmp.path().join(format!("{vocab}.gguf"));
        qlora::export::gguf_model::export(
            &dir,
            None,
            &out,
            GgmlType::parse("f32").unwrap(),
            MergeBase::Original,
            false,
            None,
        )
        .unwrap_or_else(|e| panic!("{vocab}: {e:#}"));
        let file = gguf_rs::mmap::MmapGGUF::open(&out).unwrap();
        let ours = file.model().metadata().clone();
        compare_metadata(vocab, &ours, metadata);
        let extra: Vec<_> = ours
            .keys()
            .filter(|k| k.starts_with("tokenizer.") && !metadata.contains_key(*k))
            .collect();
        assert!(
            extra.is_empty(),
            "{vocab}: keys the converter does not write: {extra:?}"
        );
        drop(file);
        std::fs::remove_file(&out).unwrap();
    }
    assert_eq!(compared, VOCABS.len());
}

#[test]
fn tokenizers_ids_are_what_llama_cpp_tokenizes() {
    let texts = test_strings();
    assert_eq!(texts.len(), 46);
    for vocab in VOCABS {
        let g = golden(vocab);
        let path = fixtures().join("bpe").join(vocab).join("tokenizer.json");
        let tok = tokenizers::Tokenizer::from_file(&path).unwrap();
        let mut differs = Vec::new();
        for (k, text) in texts.iter().enumerate() {
            let ids = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
            assert_eq!(ids, g.tokenizers_ids[k], "{vocab}: case {k} {text:?}");
            if ids != g.llama_tokenize_ids[k] {
                differs.push(k);
            }
        }
        assert_eq!(
            differs, g.llama_tokenize_differs,
            "{vocab}: cases llama.cpp tokenizes otherwise"
        );
        if !differs.is_empty() {
            eprintln!("{vocab}: llama.cpp's own tokenizer differs on {differs:?}");
        }
    }
}
