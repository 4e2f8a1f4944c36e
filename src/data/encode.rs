//! Reading and tokenizing training data at scale, for `train`, `plan` and `eval`: records stream
//! from their source ([`super::source`]) in chunks to every core (rayon), each turned into an
//! example ([`super::formats`]) and tokenized ([`super::tokenize`]); only the encoded ids and
//! masks are kept (not the records, not the rendered text), so memory is bounded by the encoded
//! output, not the input. A progress bar counts the records on a terminal.
//!
//! The encoded examples are cached (`~/.cache/qlora/data/<key>.bin`) under a key that hashes
//! everything they depend on: the data files' bytes, the tokenizer (with any added tokens), the
//! chat template and its special tokens, the format, the column mapping and the bad-line policy.
//! Packing and truncation run on the cached examples (they are cheap), so `max_seq_len` and
//! `data.pack` do not enter the key: changing them reuses the cache. A second run, a resume or
//! `qlora plan` reads the cache; `--no-data-cache` (`data.cache = false`) neither reads nor
//! writes it. A damaged or foreign cache file is ignored and rewritten.

use super::formats::{Columns, Example, Format, example};
use super::jsonl::{Conversation, TextDoc};
use super::source::{Place, Raw, Spec, for_each_raw_in};
use super::tokenize::{Encoded, TokenizerBundle};
use anyhow::{Context, Result, bail};
use qlora_quant::runtime::private_heap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

/// How records become examples.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadOptions {
    pub format: Format,
    pub columns: Columns,
    pub skip_bad_lines: bool,
}

impl ReadOptions {
    /// `data.format`, `data.columns`, `data.skip_bad_lines`.
    pub fn of(data: &crate::config::Data) -> Self {
        Self {
            format: data.format,
            columns: data.columns.clone(),
            skip_bad_lines: data.skip_bad_lines,
        }
    }
}

/// Encoded examples in source order, and what was skipped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EncodedData {
    /// `text` is empty: only ids, masks and lines are kept. Empty from [`encode_to_cache`].
    pub examples: Vec<Encoded>,
    /// Examples, their tokens and trained tokens (kept or not).
    pub count: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
    pub conversations: usize,
    pub texts: usize,
    /// `(line, reason)` of each skipped record (the reason names its place).
    pub skipped: Vec<(usize, String)>,
    /// Read from the cache.
    pub cached: bool,
}

/// Records per chunk handed to the cores.
const CHUNK: usize = 2048;

/// What a record became.
enum Item {
    Chat(Encoded),
    Text(Encoded),
}

fn encode_record(
    tok: &TokenizerBundle,
    opts: &ReadOptions,
    place: &Place,
    raw: Raw,
) -> std::result::Result<Item, String> {
    let ex = raw
        .parse()
        .and_then(|v| example(v, opts.format, &opts.columns))?;
    let failed = |e: anyhow::Error| format!("{e:#}");
    Ok(match ex {
        Example::Chat { messages, tools } => {
            let conv = Conversation {
                messages,
                tools,
                line: place.line,
            };
            let mut e = tok.encode_conversation(&conv).map_err(failed)?;
            e.text = String::new();
            Item::Chat(e)
        }
        Example::Text(text) => {
            let doc = TextDoc {
                text,
                line: place.line,
            };
            let mut e = tok.encode_text(&doc).map_err(failed)?;
            e.text = String::new();
            Item::Text(e)
        }
    })
}

/// Every record of `spec` read, converted and tokenized on every core; a bad record stops with
/// its place (the first in file order), or is skipped and counted with `skip_bad_lines`. Reads
/// and writes the cache under `cache_dir` when given.
pub fn encode_data(
    spec: &Spec,
    opts: &ReadOptions,
    tok: &TokenizerBundle,
    cache_dir: Option<&Path>,
) -> Result<EncodedData> {
    encode(spec, opts, tok, cache_dir, true)
}

/// [`encode_data`] into the cache only, keeping no example in memory (what `qlora data prepare`
/// does: memory stays that of the records in flight, as `datasets.map` writes its Arrow cache).
pub fn encode_to_cache(
    spec: &Spec,
    opts: &ReadOptions,
    tok: &TokenizerBundle,
    cache_dir: &Path,
) -> Result<EncodedData> {
    encode(spec, opts, tok, Some(cache_dir), false)
}

fn encode(
    spec: &Spec,
    opts: &ReadOptions,
    tok: &TokenizerBundle,
    cache_dir: Option<&Path>,
    keep: bool,
) -> Result<EncodedData> {
    let files = spec.files()?;
    let cache = match cache_dir {
        Some(dir) => Some(dir.join(format!("{}.bin", key(&files, opts, tok)?))),
        None => None,
    };
    if let Some(path) = &cache
        && path.exists()
    {
        match read_cache(path, keep) {
            Ok(mut d) => {
                d.cached = true;
                return Ok(d);
            }
            Err(e) => eprintln!(
                "note: the data cache {} is unreadable ({e:#}); tokenizing again",
                path.display()
            ),
        }
    }
    // The cache is written as the examples come; one that cannot be written costs the next run
    // time, not this one its data.
    let mut sink = cache.as_deref().map(CacheSink::create);
    let out = encode_files(spec, &files, opts, tok, sink.as_mut(), keep)?;
    if let (Some(sink), Some(path)) = (sink, &cache)
        && let Err(e) = sink.finish(&out)
    {
        eprintln!(
            "note: cannot write the data cache {} ({e:#}); the next run tokenizes again",
            path.display()
        );
    }
    Ok(out)
}

/// A cache file being written beside its final name; a write error stops the writing (kept, and
/// reported by [`Self::finish`]), never the run.
struct CacheSink {
    path: PathBuf,
    tmp: PathBuf,
    w: Option<std::io::BufWriter<std::fs::File>>,
    err: Option<anyhow::Error>,
}

impl CacheSink {
    fn create(path: &Path) -> Self {
        let tmp = crate::fsx::tmp_sibling(path);
        let opened = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::File::create(&tmp));
        let (w, err) = match opened {
            Ok(f) => {
                let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
                match w.write_all(MAGIC) {
                    Ok(()) => (Some(w), None),
                    Err(e) => (None, Some(e.into())),
                }
            }
            Err(e) => (None, Some(e.into())),
        };
        Self {
            path: path.to_path_buf(),
            tmp,
            w,
            err,
        }
    }

    fn push(&mut self, e: &Encoded) {
        if let Some(w) = &mut self.w
            && let Err(err) = write_example(w, e)
        {
            self.w = None;
            self.err = Some(err.into());
        }
    }

    /// The header and its length after the examples, then the rename into place.
    fn finish(mut self, d: &EncodedData) -> Result<()> {
        let done = (|| -> Result<()> {
            if let Some(e) = self.err.take() {
                return Err(e);
            }
            let mut w = self.w.take().context("not open")?;
            let header = serde_json::to_vec(&Header {
                examples: d.count,
                conversations: d.conversations,
                texts: d.texts,
                tokens: d.tokens,
                trained_tokens: d.trained_tokens,
                skipped: d.skipped.clone(),
            })?;
            w.write_all(&header)?;
            w.write_all(&(header.len() as u64).to_le_bytes())?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&self.tmp, &self.path)?;
            Ok(())
        })();
        if done.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        done
    }
}

impl Drop for CacheSink {
    fn drop(&mut self) {
        // Not finished (the encoding failed): no half file stays.
        if self.w.is_some() || self.err.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn encode_files(
    spec: &Spec,
    files: &[PathBuf],
    opts: &ReadOptions,
    tok: &TokenizerBundle,
    mut sink: Option<&mut CacheSink>,
    keep: bool,
) -> Result<EncodedData> {
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} tokenizing {msg}: {human_pos} records ({per_sec}, {elapsed})",
        )
        .expect("a valid template"),
    );
    bar.set_message(spec.to_string());
    let mut out = EncodedData::default();
    let mut fold = |done: Vec<(Place, std::result::Result<Item, String>)>| -> Result<()> {
        bar.inc(done.len() as u64);
        for (place, item) in done {
            let e = match item {
                Ok(Item::Chat(e)) => {
                    out.conversations += 1;
                    e
                }
                Ok(Item::Text(e)) => {
                    out.texts += 1;
                    e
                }
                Err(reason) if opts.skip_bad_lines => {
                    out.skipped.push((place.line, format!("{place}: {reason}")));
                    continue;
                }
                Err(reason) => bail!(
                    "{place}: {reason} (fix the line, or pass --skip-bad-lines to skip such lines)"
                ),
            };
            out.count += 1;
            out.tokens += e.ids.len();
            out.trained_tokens += e.trained.iter().filter(|&&t| t).count();
            if let Some(sink) = sink.as_deref_mut() {
                sink.push(&e);
            }
            if keep {
                out.examples.push(e);
            }
        }
        Ok(())
    };
    // A reader thread reads records in chunks; worker threads (one per core, each allocating from
    // a heap of its own: `private_heap`) parse, convert and encode whole chunks, so what a record
    // allocates is freed where it was made; this thread folds the results in source order. At
    // most `2 × workers` chunks are in flight.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    type Chunk = (usize, Vec<(Place, Raw)>);
    type Done = (usize, Vec<(Place, std::result::Result<Item, String>)>);
    let (to_work, work) = std::sync::mpsc::sync_channel::<Chunk>(workers);
    let work = std::sync::Mutex::new(work);
    let (to_fold, done) = std::sync::mpsc::sync_channel::<Done>(workers);
    let stop = &std::sync::atomic::AtomicBool::new(false);
    let read = {
        std::thread::scope(|s| -> Result<()> {
            let reader = s.spawn(move || {
                private_heap(|| {
                    let (mut chunk, mut n) = (Vec::with_capacity(CHUNK), 0);
                    let r = for_each_raw_in(files, |place, raw| {
                        if stop.load(Ordering::Relaxed) {
                            bail!("stopped");
                        }
                        chunk.push((place, raw));
                        if chunk.len() == CHUNK {
                            let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
                            to_work
                                .send((n, full))
                                .map_err(|_| anyhow::anyhow!("stopped"))?;
                            n += 1;
                        }
                        Ok(())
                    });
                    if !chunk.is_empty() {
                        let _ = to_work.send((n, chunk));
                    }
                    r
                })
            });
            for _ in 0..workers {
                let (work, to_fold) = (&work, to_fold.clone());
                s.spawn(move || {
                    private_heap(|| {
                        // Until the reader is done; after a stop, chunks are taken and dropped so
                        // that the reader, never left blocked, sees the stop.
                        while let Ok(Ok((n, chunk))) = work.lock().map(|w| w.recv()) {
                            if stop.load(Ordering::Relaxed) {
                                continue;
                            }
                            let done = chunk
                                .into_iter()
                                .map(|(place, raw)| {
                                    let item = encode_record(tok, opts, &place, raw);
                                    (place, item)
                                })
                                .collect();
                            let _ = to_fold.send((n, done));
                        }
                    })
                });
            }
            drop(to_fold);
            // Results come back in any order; they are folded in the reader's.
            let (mut next, mut waiting) = (0, std::collections::BTreeMap::new());
            let mut folded = Ok(());
            'recv: for (n, d) in done.iter() {
                waiting.insert(n, d);
                while let Some(d) = waiting.remove(&next) {
                    folded = fold(d);
                    next += 1;
                    if folded.is_err() {
                        stop.store(true, Ordering::Relaxed);
                        break 'recv;
                    }
                }
            }
            drop(done);
            drop(waiting);
            let read = reader.join().expect("the data reader does not panic");
            // The fold's error (a bad record) comes first; the reader's then (a damaged file).
            folded.and(read)
        })
    };
    bar.finish_and_clear();
    read?;
    if out.count == 0 {
        bail!("{spec}: no usable conversations or documents");
    }
    if out.conversations > 0 && out.texts > 0 {
        bail!(
            "{spec}: mixes chat examples ({}) and text documents ({}); train them in separate runs, or force one reading with data.format",
            out.conversations,
            out.texts
        );
    }
    Ok(out)
}

/// The cache key: a hash of everything the encoded examples depend on.
fn key(files: &[PathBuf], opts: &ReadOptions, tok: &TokenizerBundle) -> Result<String> {
    let mut h = Sha256::new();
    h.update(MAGIC);
    for f in files {
        // The path too: skipped records' reasons name their file.
        let name = f.to_string_lossy();
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        let mut r = std::fs::File::open(f)
            .with_context(|| format!("{}: cannot read the data file", crate::fsx::shown(f)))?;
        let len = r.metadata().map(|m| m.len()).unwrap_or(0);
        h.update(len.to_le_bytes());
        std::io::copy(&mut r, &mut h)
            .with_context(|| format!("{}: cannot read the data file", crate::fsx::shown(f)))?;
    }
    let tokenizer = tok
        .tokenizer
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("serializing the tokenizer: {e}"))?;
    for part in [
        tokenizer.as_str(),
        tok.template.source.as_str(),
        tok.template.bos_token.as_str(),
        tok.template.eos_token.as_str(),
        &serde_json::to_string(&opts.format)?,
        &serde_json::to_string(&opts.columns)?,
        if opts.skip_bad_lines { "skip" } else { "stop" },
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    Ok(format!("{:x}", h.finalize()))
}

/// The cache directory under qlora's own cache.
pub fn cache_dir() -> PathBuf {
    crate::hub::qlora_cache_dir().join("data")
}

const MAGIC: &[u8; 8] = b"QLDATA02";

/// The cache file's header (JSON), after the examples.
#[derive(Serialize, Deserialize)]
struct Header {
    examples: usize,
    conversations: usize,
    texts: usize,
    tokens: usize,
    trained_tokens: usize,
    skipped: Vec<(usize, String)>,
}

/// One example: its line (u64), its length n (u64), n ids (u32), ⌈n/8⌉ bytes of trained bits
/// (least significant first); little-endian. The file is `MAGIC`, the examples, the header's JSON
/// and its length (u64): written in one pass as the examples come.
fn write_example(w: &mut impl Write, e: &Encoded) -> std::io::Result<()> {
    w.write_all(&(e.line as u64).to_le_bytes())?;
    w.write_all(&(e.ids.len() as u64).to_le_bytes())?;
    for id in &e.ids {
        w.write_all(&id.to_le_bytes())?;
    }
    let mut bits = vec![0u8; e.trained.len().div_ceil(8)];
    for (t, &on) in e.trained.iter().enumerate() {
        bits[t / 8] |= u8::from(on) << (t % 8);
    }
    w.write_all(&bits)
}

#[cfg(test)]
fn write_cache(path: &Path, d: &EncodedData) -> Result<()> {
    let mut sink = CacheSink::create(path);
    for e in &d.examples {
        sink.push(e);
    }
    sink.finish(d)
}

/// The cache at `path`: its header, and the examples too with `keep`. Every length is checked
/// against the file's size before anything that large is allocated.
fn read_cache(path: &Path, keep: bool) -> Result<EncodedData> {
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    let mut magic = [0u8; 8];
    file.read_exact(&mut magic)?;
    if &magic != MAGIC {
        bail!("not a qlora data cache");
    }
    let read_u64 = |r: &mut dyn Read| -> Result<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    };
    if size < 16 {
        bail!("cut short");
    }
    file.seek(SeekFrom::Start(size - 8))?;
    let n = read_u64(&mut file)?;
    if n > size - 16 {
        bail!("a header longer than the file");
    }
    let body_end = size - 8 - n;
    file.seek(SeekFrom::Start(body_end))?;
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)?;
    let header: Header = serde_json::from_slice(&header)?;
    if header.examples as u64 > size {
        bail!("more examples than bytes");
    }
    let mut out = EncodedData {
        count: header.examples,
        conversations: header.conversations,
        texts: header.texts,
        tokens: header.tokens,
        trained_tokens: header.trained_tokens,
        skipped: header.skipped,
        ..Default::default()
    };
    if !keep {
        return Ok(out);
    }
    file.seek(SeekFrom::Start(8))?;
    let mut r = BufReader::with_capacity(1 << 20, file).take(body_end - 8);
    out.examples.reserve_exact(header.examples);
    for _ in 0..header.examples {
        let line = read_u64(&mut r)? as usize;
        let len = read_u64(&mut r)?;
        if len.saturating_mul(4) > size {
            bail!("an example longer than the file");
        }
        let len = len as usize;
        let mut raw = vec![0u8; len * 4];
        r.read_exact(&mut raw)?;
        let ids: Vec<u32> = raw
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let mut bits = vec![0u8; len.div_ceil(8)];
        r.read_exact(&mut bits)?;
        let trained = (0..len).map(|t| bits[t / 8] >> (t % 8) & 1 == 1).collect();
        out.examples.push(Encoded {
            ids,
            trained,
            text: String::new(),
            line,
        });
    }
    let mut rest = [0u8; 1];
    if r.read(&mut rest)? != 0 {
        bail!("bytes between the examples and the header");
    }
    Ok(out)
}

/// Splits `examples` into (train, held-out) with `fraction` of them (rounded, at least one, and
/// at least one left to train) held out, chosen by a permutation seeded with `seed`; both keep
/// their source order.
pub fn hold_out<T>(examples: Vec<T>, fraction: f64, seed: u64) -> Result<(Vec<T>, Vec<T>)> {
    if fraction <= 0.0 {
        return Ok((examples, Vec::new()));
    }
    let n = examples.len();
    let k = ((n as f64 * fraction).round() as usize).max(1);
    if k >= n {
        bail!(
            "data.eval_fraction {fraction} of {n} examples leaves none to train on; lower it or add data"
        );
    }
    // A Fisher–Yates shuffle of the indices by splitmix64 from the seed: the first k are held out.
    let mut idx: Vec<usize> = (0..n).collect();
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        idx.swap(i, j);
    }
    let mut held = vec![false; n];
    for &i in &idx[..k] {
        held[i] = true;
    }
    let (mut train, mut eval) = (Vec::with_capacity(n - k), Vec::with_capacity(k));
    for (i, e) in examples.into_iter().enumerate() {
        if held[i] { eval.push(e) } else { train.push(e) }
    }
    Ok((train, eval))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_reads_back_what_was_written_and_refuses_damage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.bin");
        let d = EncodedData {
            examples: vec![
                Encoded {
                    ids: vec![1, 70000, 3],
                    trained: vec![false, true, true],
                    text: String::new(),
                    line: 4,
                },
                Encoded {
                    ids: (0..19).collect(),
                    trained: (0..19).map(|t| t % 3 == 0).collect(),
                    text: String::new(),
                    line: 9,
                },
            ],
            count: 2,
            tokens: 22,
            trained_tokens: 9,
            conversations: 2,
            texts: 0,
            skipped: vec![(2, "f:2: bad".into())],
            cached: false,
        };
        write_cache(&p, &d).unwrap();
        assert_eq!(read_cache(&p, true).unwrap(), d);
        let header_only = read_cache(&p, false).unwrap();
        assert!(header_only.examples.is_empty());
        assert_eq!((header_only.count, header_only.tokens), (2, 22));
        let bytes = std::fs::read(&p).unwrap();
        for cut in [4, 20, bytes.len() - 1] {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            assert!(read_cache(&p, true).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        std::fs::write(&p, &long).unwrap();
        assert!(read_cache(&p, true).is_err());
    }

    #[test]
    fn hold_out_takes_the_fraction_by_the_seed() {
        let (t, e) = hold_out((0..100).collect::<Vec<_>>(), 0.05, 42).unwrap();
        assert_eq!((t.len(), e.len()), (95, 5));
        assert!(t.windows(2).all(|w| w[0] < w[1]) && e.windows(2).all(|w| w[0] < w[1]));
        let mut all: Vec<i32> = t.iter().chain(&e).copied().collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(
            hold_out((0..100).collect::<Vec<_>>(), 0.05, 42).unwrap().1,
            e
        );
        assert_ne!(
            hold_out((0..100).collect::<Vec<_>>(), 0.05, 7).unwrap().1,
            e
        );
        assert_eq!(hold_out(vec![1, 2, 3], 0.01, 1).unwrap().1.len(), 1);
        assert!(hold_out(vec![1], 0.5, 1).is_err());
    }
}
