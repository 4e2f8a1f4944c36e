//! Readers that never crash: every reader of a file a user hands us (safetensors headers, GGUF,
//! bitsandbytes quant-state JSON, tokenizer.model, adapter_config.json, config.json, training data
//! in gzip, zstd and Parquet files) is fed mutated and truncated versions of valid seed files
//! through its public entry point. Each input must give `Ok` or one error whose message names the
//! file, never a panic (caught here) and never an allocation above [`ALLOC_LIMIT`] (the seeds are
//! kilobytes; a reader that trusts a length field would ask for far more, or abort the test binary
//! outright).
//!
//! Per target: every truncation of the seed (all lengths up to [`ALL_TRUNCATIONS`], evenly spaced
//! ones beyond), then `QLORA_FUZZ_CASES` random mutation lists (default [`DEFAULT_CASES`]; proptest
//! shrinks a failure to its smallest edit list), from the fixed seed `QLORA_FUZZ_SEED` (default 0).
//! Run with `--nocapture` to see the number of inputs each reader was given.

mod alloc;
mod data;
mod mutate;
mod readers;
mod seeds;

use mutate::{Edit, JsonEdit};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

/// Random cases per target when `QLORA_FUZZ_CASES` is unset (sized for CI's debug test build).
pub const DEFAULT_CASES: u32 = 1000;
/// Seeds up to this length are truncated at every length; longer ones at this many lengths.
pub const ALL_TRUNCATIONS: usize = 1024;
/// The largest single allocation a reader may make while reading a fuzzed file.
pub const ALLOC_LIMIT: usize = 32 << 20;

fn cases() -> u32 {
    std::env::var("QLORA_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

fn rng_seed() -> u64 {
    std::env::var("QLORA_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// `QLORA_FUZZ_VERBOSE=1`: print every rejection (to audit the messages).
fn verbose() -> bool {
    std::env::var_os("QLORA_FUZZ_VERBOSE").is_some_and(|v| v == "1")
}

/// How the seed is mutated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// Byte edits only.
    Bytes,
    /// JSON edits of the parsed seed (re-serialized), byte edits, or both.
    Json,
}

/// One file and the reader behind it.
pub struct Target<'a> {
    /// Shown in the report, e.g. "config.json (model::load)".
    pub name: &'static str,
    /// The file each input is written to; errors must name it.
    pub file: PathBuf,
    /// The valid bytes that are mutated.
    pub seed: Vec<u8>,
    pub kind: Kind,
    /// Tokens of the format worth inserting.
    pub dict: &'static [&'static [u8]],
    /// Byte positions of the seed's length, count and offset fields (8 bytes each).
    pub fields: Vec<usize>,
    /// The file's contents for mutated seed bytes (identity unless the seed is embedded, like a
    /// quant state inside its safetensors file).
    pub wrap: &'a dyn Fn(&[u8]) -> Vec<u8>,
    /// Reads the file through the product's entry point.
    pub read: &'a dyn Fn() -> anyhow::Result<()>,
    /// Random cases relative to the others (a slow reader gets fewer): cases / divisor.
    pub divisor: u32,
}

/// What a target was given.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub tried: u64,
    pub accepted: u64,
    pub rejected: u64,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, o: Self) {
        self.tried += o.tried;
        self.accepted += o.accepted;
        self.rejected += o.rejected;
    }
}

/// The mutations of one random case.
#[derive(Debug, Clone)]
enum Case {
    Bytes(Vec<Edit>),
    Json(Vec<JsonEdit>, bool, Vec<Edit>),
}

fn strategy(t: &Target<'_>) -> BoxedStrategy<Case> {
    let bytes = proptest::collection::vec(mutate::edit(t.dict), 1..5);
    match t.kind {
        Kind::Bytes => bytes.prop_map(Case::Bytes).boxed(),
        Kind::Json => prop_oneof![
            1 => bytes.prop_map(Case::Bytes),
            3 => (
                proptest::collection::vec(mutate::json_edit(), 1..4),
                any::<bool>(),
                proptest::collection::vec(mutate::edit(t.dict), 0..2),
            )
                .prop_map(|(j, pretty, b)| Case::Json(j, pretty, b)),
        ]
        .boxed(),
    }
}

fn mutated(t: &Target<'_>, case: &Case) -> Vec<u8> {
    match case {
        Case::Bytes(edits) => {
            let mut b = t.seed.clone();
            mutate::apply(&mut b, edits, &t.fields);
            b
        }
        Case::Json(edits, pretty, bytes) => {
            let mut v: serde_json::Value = serde_json::from_slice(&t.seed).expect("JSON seed");
            mutate::apply_json(&mut v, edits);
            let mut b = if *pretty {
                serde_json::to_vec_pretty(&v)
            } else {
                serde_json::to_vec(&v)
            }
            .expect("serializable");
            mutate::apply(&mut b, bytes, &[]);
            b
        }
    }
}

/// Writes `bytes` (wrapped) and reads them back: `Ok(true)` accepted, `Ok(false)` rejected with
/// an error naming the file, `Err` what is wrong (a panic, an error not naming the file, an
/// allocation over the limit).
fn check(t: &Target<'_>, bytes: &[u8], tally: &Cell<Tally>) -> Result<(), String> {
    std::fs::write(&t.file, (t.wrap)(bytes)).expect("writing the fuzzed file");
    alloc::reset_peak();
    let result = catch_unwind(AssertUnwindSafe(t.read));
    let peak = alloc::peak();
    let mut n = tally.get();
    n.tried += 1;
    let verdict = match result {
        Err(panic) => Err(format!("panicked: {}", panic_message(&panic))),
        Ok(_) if peak > ALLOC_LIMIT => Err(format!(
            "allocated {peak} bytes at once (limit {ALLOC_LIMIT}): a size taken from the file \
             before checking it"
        )),
        Ok(Ok(())) => {
            n.accepted += 1;
            Ok(())
        }
        Ok(Err(e)) => {
            let msg = e.to_string();
            let path = t.file.display().to_string();
            n.rejected += 1;
            if verbose() {
                println!("  {}: {e:#}", t.name);
            }
            if msg.contains(&path) {
                Ok(())
            } else {
                Err(format!(
                    "the error does not name {path}: {msg:?} (chain: {e:#})"
                ))
            }
        }
    };
    tally.set(n);
    verdict
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(non-string payload)".into())
}

/// Saves a failing input in the temp dir (the target's own dir goes with the test) and fails the
/// test with it.
fn fail(t: &Target<'_>, what: &str, bytes: &[u8], why: &str) -> ! {
    let name = t.file.file_name().unwrap_or_default().to_string_lossy();
    let keep = std::env::temp_dir().join(format!("qlora-fuzz-failing-{name}"));
    std::fs::write(&keep, (t.wrap)(bytes)).ok();
    panic!(
        "{}: {what}: {why}\n(the input is kept at {})",
        t.name,
        keep.display()
    );
}

/// Runs every truncation and the random cases of `t`; panics on the first bad input.
pub fn fuzz(t: &Target<'_>) -> Tally {
    let tally = Cell::new(Tally::default());
    // The seed itself reads.
    std::fs::write(&t.file, (t.wrap)(&t.seed)).unwrap();
    if let Err(e) = (t.read)() {
        panic!("{}: the seed does not read: {e:#}", t.name);
    }
    let n = t.seed.len();
    let lengths: Vec<usize> = if n <= ALL_TRUNCATIONS {
        (0..n).collect()
    } else {
        (0..ALL_TRUNCATIONS)
            .map(|i| i * n / ALL_TRUNCATIONS)
            .collect()
    };
    for len in lengths {
        let bytes = &t.seed[..len];
        if let Err(why) = check(t, bytes, &tally) {
            fail(t, &format!("truncated to {len} bytes"), bytes, &why);
        }
    }
    let config = Config {
        cases: (cases() / t.divisor).max(1),
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(rng_seed()),
        max_shrink_iters: 4096,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy(t), |case| {
        let bytes = mutated(t, &case);
        check(t, &bytes, &tally).map_err(TestCaseError::fail)
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, case)) => {
            let bytes = mutated(t, &case);
            fail(t, &format!("{case:?}"), &bytes, why.message())
        }
        Err(e) => panic!("{}: {e}", t.name),
    }
    let tally = tally.get();
    println!(
        "fuzz {:<52} {:>7} inputs: {:>7} accepted, {:>7} rejected with an error naming the file",
        t.name, tally.tried, tally.accepted, tally.rejected
    );
    tally
}
