//! Where records come from: `data.train` / `data.eval` name a file, a directory (its data files,
//! sorted), a glob of shards, or a split of a Hub dataset (`hf://datasets/owner/name…`, its files
//! found and downloaded into the Hugging Face cache by [`crate::hub::dataset`]). A file is JSONL (`.jsonl`, and any other name), a JSON array
//! (`.json` whose text starts with `[`; else read as JSONL), either compressed with gzip (`.gz`) or
//! zstd (`.zst`), or Parquet (`.parquet`, read row group by row group, each row as a JSON object).
//! Records are handed over one at a time with their place (`file:line`, or `file: row group g,
//! row r`); a damaged file (truncated gzip or zstd, corrupt Parquet) is an error naming it, never a
//! panic.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// A record's place, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub file: PathBuf,
    /// 1-based line (JSONL), element (JSON array) or row (Parquet: within its row group).
    pub line: usize,
    /// Parquet: the 0-based row group.
    pub row_group: Option<usize>,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.row_group {
            None => write!(f, "{}:{}", self.file.display(), self.line),
            Some(g) => write!(
                f,
                "{}: row group {g}, row {}",
                self.file.display(),
                self.line
            ),
        }
    }
}

/// Whether `spec` names a Hub dataset.
pub fn is_hub(spec: &str) -> bool {
    spec.starts_with(crate::hub::dataset::PREFIX)
}

/// What to read: a local spec, or a split of a Hub dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub path: String,
    /// The split, for a Hub dataset (ignored for local data).
    pub split: String,
}

impl Spec {
    pub fn new(path: &str, split: &str) -> Self {
        Self {
            path: path.to_string(),
            split: split.to_string(),
        }
    }

    /// Local data (or a Hub dataset's `train` split).
    pub fn local(path: &str) -> Self {
        Self::new(path, "train")
    }

    /// The files, in reading order (a Hub dataset's split downloaded when not in the cache).
    pub fn files(&self) -> Result<Vec<PathBuf>> {
        match crate::hub::dataset::DatasetRef::parse(&self.path)? {
            Some(r) => {
                crate::hub::dataset::resolve(&r, &self.split, &crate::hub::HubEnv::from_env())
            }
            None => files(&self.path),
        }
    }
}

impl std::fmt::Display for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if is_hub(&self.path) {
            write!(f, "{} (split {})", self.path, self.split)
        } else {
            f.write_str(&self.path)
        }
    }
}

impl From<&str> for Spec {
    fn from(path: &str) -> Self {
        Self::local(path)
    }
}

/// The extensions a directory's data files have.
pub const DATA_EXTENSIONS: [&str; 7] = [
    ".jsonl",
    ".json",
    ".jsonl.gz",
    ".json.gz",
    ".jsonl.zst",
    ".json.zst",
    ".parquet",
];

/// The files `spec` names: itself, a directory's data files, or a glob's matches (sorted).
pub fn files(spec: &str) -> Result<Vec<PathBuf>> {
    let path = Path::new(spec);
    if spec.contains(['*', '?', '[']) && !path.exists() {
        let mut out: Vec<PathBuf> = glob::glob(spec)
            .with_context(|| format!("{spec}: not a valid glob pattern"))?
            .filter_map(|p| p.ok())
            .filter(|p| p.is_file())
            .collect();
        out.sort();
        if out.is_empty() {
            bail!("{spec}: no file matches this pattern");
        }
        return Ok(out);
    }
    if path.is_dir() {
        let mut out: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("{}: cannot list the directory", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        !n.starts_with('.') && DATA_EXTENSIONS.iter().any(|e| n.ends_with(e))
                    })
            })
            .collect();
        out.sort();
        if out.is_empty() {
            bail!(
                "{}: no data files in this directory (looked for {})",
                path.display(),
                DATA_EXTENSIONS.join(", ")
            );
        }
        return Ok(out);
    }
    Ok(vec![path.to_path_buf()])
}

fn named(path: &Path, suffix: &str) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(suffix))
}

/// Calls `f` with each record of `spec` (every file in order) and its place: the parsed JSON, or
/// why the record does not parse. Blank lines are skipped. A file that cannot be read, decompressed
/// or decoded ends the walk with an error naming it.
pub fn for_each_record(
    spec: &Spec,
    f: impl FnMut(Place, std::result::Result<Value, String>) -> Result<()>,
) -> Result<()> {
    for_each_record_in(&spec.files()?, f)
}

/// [`for_each_record`] over files already resolved ([`Spec::files`]).
pub fn for_each_record_in(
    files: &[PathBuf],
    mut f: impl FnMut(Place, std::result::Result<Value, String>) -> Result<()>,
) -> Result<()> {
    for file in files {
        read_file(file, &mut f)?;
    }
    Ok(())
}

/// The first record of `spec` that parses, reading no further than it (what a data set holds;
/// `None` when nothing parses).
pub fn first_record(spec: &Spec) -> Option<Value> {
    let mut first = None;
    // An error stops the walk at the first record; the walk's own errors mean "none".
    let _ = for_each_record(spec, |_, v| {
        if let Ok(v) = v {
            first = Some(v);
            bail!("found");
        }
        Ok(())
    });
    first
}

/// A record as read, not yet parsed: parsing (and dropping what it allocates) happens where the
/// record is used, on the encoding threads ([`super::encode`]).
#[derive(Debug)]
pub enum Raw {
    /// A JSONL line.
    Line(String),
    /// An element of a JSON array, or a Parquet row.
    Value(Value),
}

impl Raw {
    /// The record as JSON, or why it does not parse.
    pub fn parse(self) -> std::result::Result<Value, String> {
        match self {
            Self::Line(l) => serde_json::from_str(&l).map_err(|e| format!("invalid JSON: {e}")),
            Self::Value(v) => Ok(v),
        }
    }
}

/// Calls `f` with each record of `files` unparsed ([`Raw`]), and its place.
pub fn for_each_raw_in(
    files: &[PathBuf],
    mut f: impl FnMut(Place, Raw) -> Result<()>,
) -> Result<()> {
    for file in files {
        read_file_raw(file, &mut f)?;
    }
    Ok(())
}

fn read_file(
    file: &Path,
    f: &mut impl FnMut(Place, std::result::Result<Value, String>) -> Result<()>,
) -> Result<()> {
    read_file_raw(file, &mut |place, raw: Raw| f(place, raw.parse()))
}

fn read_file_raw(file: &Path, f: &mut impl FnMut(Place, Raw) -> Result<()>) -> Result<()> {
    if named(file, ".parquet") {
        return read_parquet(file, f);
    }
    let raw = std::fs::File::open(file)
        .with_context(|| format!("{}: cannot read the data file", crate::fsx::shown(file)))?;
    let reader: Box<dyn Read> = if named(file, ".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(raw))
    } else if named(file, ".zst") {
        Box::new(
            zstd::stream::read::Decoder::new(raw)
                .with_context(|| format!("{}: not a zstd stream", file.display()))?,
        )
    } else {
        Box::new(raw)
    };
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    let damaged = |e: std::io::Error| {
        anyhow::anyhow!(
            "{}: cannot read the data ({e}); the file is damaged or truncated",
            file.display()
        )
    };
    // A JSON array: read whole, one record per element.
    let first = loop {
        let buf = reader.fill_buf().map_err(damaged)?;
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => break Some(buf[i]),
            None if buf.is_empty() => break None,
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    };
    if first == Some(b'[') {
        let mut text = Vec::new();
        reader.read_to_end(&mut text).map_err(damaged)?;
        let items: Vec<Value> = serde_json::from_slice(&text)
            .map_err(|e| anyhow::anyhow!("{}: invalid JSON array: {e}", file.display()))?;
        for (i, v) in items.into_iter().enumerate() {
            let place = Place {
                file: file.to_path_buf(),
                line: i + 1,
                row_group: None,
            };
            f(place, Raw::Value(v))?;
        }
        return Ok(());
    }
    let mut line = String::new();
    let mut n = 0;
    loop {
        line.clear();
        let read = reader.read_line(&mut line).map_err(damaged)?;
        if read == 0 {
            return Ok(());
        }
        n += 1;
        if line.trim().is_empty() {
            continue;
        }
        let place = Place {
            file: file.to_path_buf(),
            line: n,
            row_group: None,
        };
        f(place, Raw::Line(std::mem::take(&mut line)))?;
    }
}

fn read_parquet(file: &Path, f: &mut impl FnMut(Place, Raw) -> Result<()>) -> Result<()> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let raw = std::fs::File::open(file)
        .with_context(|| format!("{}: cannot read the data file", crate::fsx::shown(file)))?;
    let reader = guarded(file, || SerializedFileReader::new(raw))?
        .with_context(|| format!("{}: not a readable Parquet file", file.display()))?;
    let groups = reader.metadata().num_row_groups();
    for g in 0..groups {
        // parquet's ColumnChunkMetaData::byte_range asserts these (a panic on a damaged footer).
        for c in reader.metadata().row_group(g).columns() {
            let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset());
            if start < 0 || c.compressed_size() < 0 {
                bail!(
                    "{}: row group {g}: damaged Parquet file (column `{}` has a negative offset or size)",
                    file.display(),
                    c.column_path()
                );
            }
        }
        let group = reader
            .get_row_group(g)
            .with_context(|| format!("{}: row group {g} is damaged", file.display()))?;
        let mut rows = guarded(file, || group.get_row_iter(None))?
            .with_context(|| format!("{}: row group {g} is damaged", file.display()))?;
        for i in 0.. {
            let Some(row) = guarded(file, || rows.next())? else {
                break;
            };
            let row = row.with_context(|| {
                format!("{}: row group {g}, row {}: damaged", file.display(), i + 1)
            })?;
            let place = Place {
                file: file.to_path_buf(),
                line: i + 1,
                row_group: Some(g),
            };
            let record = guarded(file, || row.to_json_value())?;
            f(place, Raw::Value(record))?;
        }
    }
    Ok(())
}

/// Runs `call` into the parquet crate, which panics on some damaged files instead of returning an
/// error (a BYTE_ARRAY value's length past the end of its dictionary page fails an assertion in
/// `bit_util::read_num_bytes` while the row iterator decodes it): the panic becomes an error naming
/// the file. Only the crate's calls are guarded, never the code that handles the records.
fn guarded<T>(file: &Path, call: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).map_err(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        anyhow::anyhow!(
            "{}: damaged Parquet file (the Parquet reader failed: {why})",
            file.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn collect(spec: &str) -> Result<Vec<(String, Value)>> {
        let mut out = Vec::new();
        for_each_record(&spec.into(), |p, v| {
            out.push((p.to_string(), v.map_err(|e| anyhow::anyhow!(e))?));
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn jsonl_arrays_gzip_zstd_directories_and_globs_read_alike() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let lines = "{\"text\": \"a\"}\n\n{\"text\": \"b\"}\n";
        std::fs::write(d.join("0.jsonl"), lines).unwrap();
        std::fs::write(d.join("1.json"), " [{\"text\": \"c\"}, {\"text\": \"d\"}]").unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(lines.as_bytes()).unwrap();
        std::fs::write(d.join("2.jsonl.gz"), gz.finish().unwrap()).unwrap();
        std::fs::write(
            d.join("3.jsonl.zst"),
            zstd::encode_all(lines.as_bytes(), 3).unwrap(),
        )
        .unwrap();
        std::fs::write(d.join("notes.txt"), "not data").unwrap();
        let all = collect(&d.display().to_string()).unwrap();
        let texts: Vec<&str> = all
            .iter()
            .map(|(_, v)| v["text"].as_str().unwrap())
            .collect();
        assert_eq!(texts, ["a", "b", "c", "d", "a", "b", "a", "b"]);
        // Places: the blank line counts.
        assert!(all[1].0.ends_with("0.jsonl:3"), "{}", all[1].0);
        assert!(all[3].0.ends_with("1.json:2"), "{}", all[3].0);
        let glob = collect(&format!("{}/*.jsonl*", d.display())).unwrap();
        assert_eq!(glob.len(), 6);
        assert!(collect(&format!("{}/*.none", d.display())).is_err());
    }

    #[test]
    fn damaged_compressed_files_are_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let body = "{\"text\": \"a\"}\n".repeat(2000);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(body.as_bytes()).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(body.as_bytes(), 3).unwrap();
        for (name, bytes) in [("t.jsonl.gz", &gz), ("t.jsonl.zst", &zst)] {
            let p = dir.path().join(name);
            std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
            let e = format!("{:#}", collect(&p.display().to_string()).unwrap_err());
            assert!(
                e.contains(name) && e.contains("damaged or truncated"),
                "{e}"
            );
        }
        let p = dir.path().join("t.parquet");
        std::fs::write(&p, b"PAR1 not really").unwrap();
        let e = format!("{:#}", collect(&p.display().to_string()).unwrap_err());
        assert!(e.contains("t.parquet") && e.contains("Parquet"), "{e}");
    }
}
