//! Reading and tokenizing chat data (`qlora::data::encode`): 4,000 generated conversations (the
//! shape of scripts/gen_chat_data.py's: 1-3 exchanges of 20-160 words, some with a system turn)
//! as JSONL, with Phi-3's tokenizer and chat template, on every core; and the same with the
//! tokenizer as HF ships it (BPE over the whole text), to show what cutting words first buys.
//! `datasets.map` side by side: scripts/compare_data_encode.sh.
//!
//!   cargo bench --bench data_encode

use criterion::{Criterion, criterion_group, criterion_main};
use qlora::data::TokenizerBundle;
use qlora::data::encode::{ReadOptions, encode_data};
use qlora::data::source::Spec;
use std::io::Write;

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "model",
    "data",
    "train",
    "loss",
    "token",
    "layer",
    "weight",
    "gradient",
    "adapter",
    "memory",
    "Paris",
    "river",
    "question",
    "answer",
    "because",
    "however",
    "example",
    "value",
    "matrix",
    "vector",
    "kernel",
    "batch",
    "sequence",
    "attention",
    "output",
    "input",
];

fn sentence(x: &mut u64, n: usize) -> String {
    let mut next = || {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    };
    let mut s = String::new();
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(WORDS[(next() % WORDS.len() as u64) as usize]);
        if next() % 9 == 0 {
            s.push(['.', ',', '?'][(next() % 3) as usize]);
        }
    }
    s
}

fn write_data(path: &std::path::Path, n: usize) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..n {
        let mut msgs = Vec::new();
        if i % 3 == 0 {
            msgs.push(serde_json::json!({"role": "system", "content": sentence(&mut x, 12)}));
        }
        for t in 0..(1 + i % 3) {
            let user = 10 + (i * 7 + t * 13) % 50;
            let assistant = 20 + (i * 11 + t * 5) % 80;
            msgs.push(serde_json::json!({"role": "user", "content": sentence(&mut x, user)}));
            msgs.push(
                serde_json::json!({"role": "assistant", "content": sentence(&mut x, assistant)}),
            );
        }
        writeln!(f, "{}", serde_json::json!({ "messages": msgs })).unwrap();
    }
}

fn encode(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("chat.jsonl");
    write_data(&data, 4000);
    let spec = Spec::local(&data.display().to_string());
    let assets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/phi3-tokenizer");
    let tok = TokenizerBundle::from_dir(&assets).unwrap();
    assert!(tok.splits_words());
    let opts = ReadOptions::default();
    let mut g = c.benchmark_group("data_encode");
    g.sample_size(10);
    g.bench_function("4000_conversations_words_cut", |b| {
        b.iter(|| encode_data(&spec, &opts, &tok, None).unwrap())
    });
    let whole = TokenizerBundle::from_dir(&assets)
        .unwrap()
        .without_word_split();
    g.bench_function("4000_conversations_bpe_whole_text", |b| {
        b.iter(|| encode_data(&spec, &opts, &whole, None).unwrap())
    });
    g.finish();
}

criterion_group!(benches, encode);
criterion_main!(benches);
