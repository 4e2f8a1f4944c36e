//! Training data files, read as `train` reads them (`data::read_data`, every format detected, bad
//! records both skipped and not): the committed samples compressed with gzip, a zstd file built
//! here, and the Parquet files pyarrow wrote (data/formats/, tests/fixtures/formats/). Compressed files are mutated two
//! ways: their bytes (the decompressor's checks), and the text inside, compressed again (the
//! record readers behind a valid stream).

use super::readers::{BINARY_TOKENS, JSON_TOKENS, identity, report};
use super::{Kind, Target, fuzz};
use crate::common::repo_dir;
use qlora::data::formats::{Columns, Format};
use qlora::data::read_data;
use qlora::data::source::Spec;
use std::io::{Read, Write};
use std::path::Path;

fn sample(name: &str) -> Vec<u8> {
    std::fs::read(repo_dir().join("data/formats").join(name)).unwrap()
}

/// `file` read with bad records skipped, then without (each error must name the file).
fn read(file: &Path) -> anyhow::Result<()> {
    let spec = Spec::local(&file.display().to_string());
    let cols = Columns::new();
    read_data(&spec, Format::Auto, &cols, true)?;
    read_data(&spec, Format::Auto, &cols, false).map(drop)
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(b).unwrap();
    gz.finish().unwrap()
}

fn zstd(b: &[u8]) -> Vec<u8> {
    zstd::encode_all(b, 3).unwrap()
}

#[test]
fn data_files_never_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tallies = Vec::new();
    let bytes_and_json: Vec<&[u8]> = BINARY_TOKENS.iter().chain(JSON_TOKENS).copied().collect();
    let bytes_and_json: &'static [&'static [u8]] = bytes_and_json.leak();

    // gzip: the committed sample's bytes, then its JSONL mutated and compressed again.
    let file = tmp.path().join("text.jsonl.gz");
    let gz = sample("text.jsonl.gz");
    let r = || read(&file);
    tallies.push(fuzz(&Target {
        name: "text.jsonl.gz, its bytes (read_data)",
        file: file.clone(),
        seed: gz.clone(),
        kind: Kind::Bytes,
        dict: bytes_and_json,
        fields: vec![gz.len() - 8, gz.len() - 4],
        wrap: &identity,
        read: &r,
        divisor: 1,
    }));
    let mut jsonl = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut jsonl)
        .unwrap();
    tallies.push(fuzz(&Target {
        name: "text.jsonl.gz, its JSONL (read_data)",
        file: file.clone(),
        seed: jsonl,
        kind: Kind::Bytes,
        dict: JSON_TOKENS,
        fields: vec![],
        wrap: &gzip,
        read: &r,
        divisor: 1,
    }));

    // zstd, built here: ShareGPT JSONL's bytes; the Alpaca JSON array edited as JSON.
    let file = tmp.path().join("sharegpt.jsonl.zst");
    let seed = zstd(&sample("sharegpt.jsonl"));
    let r = || read(&file);
    tallies.push(fuzz(&Target {
        name: "sharegpt.jsonl.zst, its bytes (read_data)",
        file: file.clone(),
        seed,
        kind: Kind::Bytes,
        dict: bytes_and_json,
        fields: vec![4, 5],
        wrap: &identity,
        read: &r,
        divisor: 1,
    }));
    let file = tmp.path().join("alpaca.json.zst");
    let r = || read(&file);
    tallies.push(fuzz(&Target {
        name: "alpaca.json.zst, its JSON array (read_data)",
        file: file.clone(),
        seed: sample("alpaca.json"),
        kind: Kind::Json,
        dict: JSON_TOKENS,
        fields: vec![],
        wrap: &zstd,
        read: &r,
        divisor: 1,
    }));

    // Parquet written by pyarrow: the bytes, the footer's metadata length among the fields. Also
    // a file of two row groups with one bad row (read with bad rows skipped) and one of nested
    // lists of structs (preference pairs, read by read_pairs).
    let lenient = |file: &Path| {
        let spec = Spec::local(&file.display().to_string());
        read_data(&spec, Format::Auto, &Columns::new(), true).map(drop)
    };
    let pairs = |file: &Path| {
        let spec = Spec::local(&file.display().to_string());
        qlora::data::pairs::read_pairs(&spec, true)?;
        qlora::data::pairs::read_pairs(&spec, false).map(drop)
    };
    type Reader<'a> = &'a dyn Fn(&Path) -> anyhow::Result<()>;
    let cases: [(&str, &str, &'static str, Reader<'_>); 4] = [
        (
            "data/formats",
            "sharegpt.parquet",
            "sharegpt.parquet (read_data)",
            &read,
        ),
        (
            "data/formats",
            "alpaca.parquet",
            "alpaca.parquet (read_data)",
            &read,
        ),
        (
            "tests/fixtures/formats",
            "bad_alpaca.parquet",
            "bad_alpaca.parquet, two row groups (read_data, skipping)",
            &lenient,
        ),
        (
            "tests/fixtures/formats",
            "pairs_chat.parquet",
            "pairs_chat.parquet, list<struct> (read_pairs)",
            &pairs,
        ),
    ];
    for (dir, name, label, reader) in cases {
        let file = tmp.path().join(name);
        let seed = std::fs::read(repo_dir().join(dir).join(name)).unwrap();
        let r = || reader(&file);
        tallies.push(fuzz(&Target {
            name: label,
            file: file.clone(),
            fields: vec![seed.len() - 12, 4],
            seed,
            kind: Kind::Bytes,
            dict: BINARY_TOKENS,
            wrap: &identity,
            read: &r,
            divisor: 1,
        }));
    }
    report("training data (gzip, zstd, Parquet)", &tallies);
}

/// The Parquet inputs that made the parquet crate panic, now one error naming the file: a
/// column chunk's offset made negative in the footer (`ColumnChunkMetaData::byte_range` asserts),
/// and a dictionary value's length run past its page (`bit_util::read_num_bytes` asserts).
#[test]
fn former_parquet_crashers_are_one_error() {
    let tmp = tempfile::tempdir().unwrap();
    for (dir, name, at, bytes) in [
        ("data/formats", "alpaca.parquet", 1523, &[0xff, 0xff][..]),
        (
            "tests/fixtures/formats",
            "pairs_chat.parquet",
            119,
            &[20][..],
        ),
    ] {
        let mut b = std::fs::read(repo_dir().join(dir).join(name)).unwrap();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        let file = tmp.path().join(name);
        std::fs::write(&file, b).unwrap();
        let spec = Spec::local(&file.display().to_string());
        let e = read_data(&spec, Format::Auto, &Columns::new(), true)
            .map(drop)
            .and_then(|_| qlora::data::pairs::read_pairs(&spec, true).map(drop))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&file.display().to_string()) && e.contains("damaged Parquet file"),
            "{name}: {e}"
        );
    }
}
