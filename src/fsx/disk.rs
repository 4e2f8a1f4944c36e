//! The one door every artifact byte goes through: checkpoints, the final adapter, metrics, the
//! loss plot, exports, quantized checkpoints and their spill files are all written by an
//! [`OutFile`] (through [`write_with`], [`super::write_atomic`] or [`AppendLog`]). What it owns:
//!
//! - **Write errors, made plain.** A failed write becomes a [`DiskError`] naming the file, the
//!   bytes it needed and the bytes its filesystem has free (`ENOSPC`/`EDQUOT`), or saying the
//!   filesystem is read-only (`EROFS`) or the directory not writable (`EACCES`/`EPERM`).
//! - **Nothing half-written under a final name.** [`write_with`] writes a temporary sibling and
//!   renames it into place, removing the temporary on any error; [`AppendLog`] cuts a line that
//!   failed half-way back off the file.
//! - **Free space** of the filesystem holding a path ([`free_bytes`], `statvfs(3)`).
//! - **Fault injection, for tests.** Two environment variables, read once per process:
//!   - `QLORA_FAULT_WRITE=N[:KIND]`: the `N`-th `write(2)` of an artifact file in this process
//!     (counting from 1) fails with `KIND`: `enospc` (the default), `erofs` or `eio`. Every later
//!     write fails too, as on a disk that stays full.
//!   - `QLORA_FAULT_FREE_BYTES=N`: [`free_bytes`] reports `N` bytes free on every filesystem.
//!
//!   Unset (the normal case), a write pays one load of an initialized `OnceLock`.

use anyhow::Result;
use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// A write that failed, with what the user needs to act on it.
#[derive(Debug)]
pub enum DiskError {
    /// `ENOSPC` / `EDQUOT`.
    Full {
        path: PathBuf,
        /// The whole file's size, when known before writing.
        needed_bytes: Option<u64>,
        written_bytes: u64,
        free_bytes: Option<u64>,
    },
    /// `EROFS`.
    ReadOnly {
        path: PathBuf,
    },
    /// `EACCES` / `EPERM`.
    Denied {
        path: PathBuf,
    },
    Other {
        path: PathBuf,
        source: io::Error,
    },
}

impl std::fmt::Display for DiskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Full {
                path,
                needed_bytes,
                written_bytes,
                free_bytes,
            } => {
                write!(f, "{}: no space left on device", path.display())?;
                match needed_bytes {
                    Some(n) => write!(f, "; the file needs {}", bytes_text(*n))?,
                    None => write!(f, " after {}", bytes_text(*written_bytes))?,
                }
                if let Some(free) = free_bytes {
                    write!(f, ", its filesystem has {} free", bytes_text(*free))?;
                }
                write!(
                    f,
                    "; free space there (or choose another output directory) and run again"
                )
            }
            Self::ReadOnly { path } => write!(
                f,
                "{}: the filesystem is read-only; choose an output directory on a writable one (or remount it read-write)",
                path.display()
            ),
            Self::Denied { path } => write!(
                f,
                "{}: permission denied; choose an output directory you can write to",
                path.display()
            ),
            Self::Other { path, source } => write!(f, "writing {}: {source}", path.display()),
        }
    }
}

impl std::error::Error for DiskError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Other { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// `12345 bytes (12.1 KiB)`.
pub fn bytes_text(n: u64) -> String {
    let (v, unit) = match n {
        n if n >= 1 << 30 => (n as f64 / (1u64 << 30) as f64, "GiB"),
        n if n >= 1 << 20 => (n as f64 / (1u64 << 20) as f64, "MiB"),
        n => (n as f64 / 1024.0, "KiB"),
    };
    format!("{n} bytes ({v:.1} {unit})")
}

impl DiskError {
    /// Names `err`, raised while writing `path` after `written_bytes` of `needed_bytes`.
    pub fn classify(
        path: &Path,
        err: &io::Error,
        needed_bytes: Option<u64>,
        written_bytes: u64,
    ) -> Self {
        let path = path.to_path_buf();
        match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Self::Full {
                free_bytes: free_bytes(&path),
                path,
                needed_bytes,
                written_bytes,
            },
            Some(libc::EROFS) => Self::ReadOnly { path },
            Some(libc::EACCES) | Some(libc::EPERM) => Self::Denied { path },
            _ => Self::Other {
                path,
                source: io::Error::new(err.kind(), err.to_string()),
            },
        }
    }
}

/// `create_dir_all`, its failure a [`DiskError`].
pub fn create_dir_all(dir: &Path) -> Result<(), DiskError> {
    std::fs::create_dir_all(dir).map_err(|e| DiskError::classify(dir, &e, None, 0))
}

/// The fault `QLORA_FAULT_WRITE` asks for: the write number and the `errno`.
fn fault() -> Option<(u64, i32)> {
    static FAULT: OnceLock<Option<(u64, i32)>> = OnceLock::new();
    *FAULT.get_or_init(|| {
        let v = std::env::var("QLORA_FAULT_WRITE").ok()?;
        let (n, kind) = v.split_once(':').unwrap_or((&v, "enospc"));
        let errno = match kind {
            "enospc" => libc::ENOSPC,
            "erofs" => libc::EROFS,
            "eio" => libc::EIO,
            _ => return None,
        };
        Some((n.trim().parse().ok()?, errno))
    })
}

/// Counts a write and fails it when it is the injected fault's (or after it).
fn injected() -> io::Result<()> {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    if let Some((nth, errno)) = fault() {
        let n = WRITES.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= nth {
            return Err(io::Error::from_raw_os_error(errno));
        }
    }
    Ok(())
}

/// A file being written, counting its bytes and keeping its first error.
#[derive(Debug)]
pub struct OutFile {
    path: PathBuf,
    file: File,
    written_bytes: u64,
    error: Option<io::Error>,
}

impl OutFile {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> Result<Self, DiskError> {
        Self::open(
            path,
            File::options().write(true).create(true).truncate(true),
        )
    }

    /// Opens `path` with `options` (which must allow writing).
    pub fn open(path: &Path, options: &std::fs::OpenOptions) -> Result<Self, DiskError> {
        let file = options
            .open(path)
            .map_err(|e| DiskError::classify(path, &e, None, 0))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            written_bytes: 0,
            error: None,
        })
    }

    /// The open file (for reading back what was written).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The first write error, as a [`DiskError`] for `name` (the file the user knows), when the
    /// whole of it needs `needed_bytes`.
    pub fn failure(&self, name: &Path, needed_bytes: Option<u64>) -> Option<DiskError> {
        self.error
            .as_ref()
            .map(|e| DiskError::classify(name, e, needed_bytes, self.written_bytes))
    }

    fn keep(&mut self, e: io::Error) -> io::Error {
        let copy = match e.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(e.kind(), e.to_string()),
        };
        self.error.get_or_insert(copy);
        e
    }
}

impl Write for OutFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Err(e) = injected() {
            return Err(self.keep(e));
        }
        match self.file.write(buf) {
            Ok(n) => {
                self.written_bytes += n as u64;
                Ok(n)
            }
            Err(e) => Err(self.keep(e)),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Seek for OutFile {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.file.seek(pos)
    }
}

/// Writes `path` atomically: `fill` writes the contents into a temporary sibling (through a
/// buffer), which is then renamed into place. On any error the temporary is removed, and a
/// write failure is reported as a [`DiskError`] naming `path` and `needed_bytes` (the file's size,
/// when known).
pub fn write_with(
    path: &Path,
    needed_bytes: Option<u64>,
    fill: impl FnOnce(&mut BufWriter<OutFile>) -> Result<()>,
) -> Result<()> {
    let tmp = super::tmp_sibling(path);
    // A buffer of up to 1 MiB (larger writes go straight through), no larger than the file.
    let capacity = needed_bytes.map_or(1 << 20, |n| n.clamp(64, 1 << 20) as usize);
    let file = OutFile::create(&tmp).map_err(|e| rename(e, path))?;
    let mut w = BufWriter::with_capacity(capacity, file);
    let filled = fill(&mut w).and_then(|()| Ok(w.flush()?));
    let out = w.get_ref();
    if let Err(e) = filled {
        let _ = std::fs::remove_file(&tmp);
        return Err(match out.failure(path, needed_bytes) {
            Some(disk) => anyhow::Error::new(disk),
            None => e.context(format!("writing {}", path.display())),
        });
    }
    drop(w);
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::Error::new(DiskError::classify(path, &e, needed_bytes, 0))
    })
}

/// A [`DiskError`] about a temporary file, told about the file it stands for.
fn rename(e: DiskError, path: &Path) -> DiskError {
    let path = path.to_path_buf();
    match e {
        DiskError::Full {
            needed_bytes,
            written_bytes,
            free_bytes,
            ..
        } => DiskError::Full {
            path,
            needed_bytes,
            written_bytes,
            free_bytes,
        },
        DiskError::ReadOnly { .. } => DiskError::ReadOnly { path },
        DiskError::Denied { .. } => DiskError::Denied { path },
        DiskError::Other { source, .. } => DiskError::Other { path, source },
    }
}

/// A file appended one whole line at a time (metrics.jsonl): a line that fails half-way is cut
/// back off, so the file never ends in a partial line.
#[derive(Debug)]
pub struct AppendLog {
    out: OutFile,
    n_bytes: u64,
}

impl AppendLog {
    /// Opens `path` for appending (created if missing).
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let out = OutFile::open(path, File::options().create(true).append(true))?;
        let n_bytes = out
            .file
            .metadata()
            .map_err(|e| DiskError::classify(path, &e, None, 0))?
            .len();
        Ok(Self { out, n_bytes })
    }

    /// Appends `line` and a newline in one write.
    pub fn line(&mut self, line: &str) -> Result<(), DiskError> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        if self.out.write_all(&buf).is_err() {
            let err = self
                .out
                .failure(&self.out.path.clone(), Some(buf.len() as u64));
            let _ = self.out.file.set_len(self.n_bytes);
            self.out.error = None;
            return Err(err.expect("a failed write keeps its error"));
        }
        self.n_bytes += buf.len() as u64;
        Ok(())
    }
}

/// Bytes free to an unprivileged writer on the filesystem holding `path` (or its nearest existing
/// ancestor), or `QLORA_FAULT_FREE_BYTES` when set; `None` when it cannot be told.
pub fn free_bytes(path: &Path) -> Option<u64> {
    static FAKE: OnceLock<Option<u64>> = OnceLock::new();
    if let Some(n) = *FAKE.get_or_init(|| {
        std::env::var("QLORA_FAULT_FREE_BYTES")
            .ok()
            .and_then(|v| v.trim().parse().ok())
    }) {
        return Some(n);
    }
    let abs = std::path::absolute(path).ok()?;
    let existing = abs.ancestors().find(|p| p.exists())?;
    let c = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` a buffer statvfs fills on success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // c_ulong / fsblkcnt_t: u64 here, u32 on 32-bit targets.
    #[allow(clippy::unnecessary_cast)]
    let (blocks, block_bytes) = (st.f_bavail as u64, st.f_frsize as u64);
    Some(blocks.saturating_mul(block_bytes))
}

/// `Ok` when the filesystem of `path` has room for `n_bytes` more (or cannot tell), else the
/// [`DiskError::Full`] the write would end in, before anything is written.
pub fn ensure_room(path: &Path, n_bytes: u64) -> Result<(), DiskError> {
    match free_bytes(path) {
        Some(free) if free < n_bytes => Err(DiskError::Full {
            path: path.to_path_buf(),
            needed_bytes: Some(n_bytes),
            written_bytes: 0,
            free_bytes: Some(free),
        }),
        _ => Ok(()),
    }
}

/// Bytes under `path` (a file, or a directory's files, recursively); 0 when it does not exist.
pub fn tree_bytes(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path).map_or(0, |d| d.flatten().map(|e| tree_bytes(&e.path())).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_fill_leaves_neither_the_temporary_nor_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        let e = write_with(&path, None, |w| {
            w.write_all(b"abc")?;
            anyhow::bail!("boom")
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("boom"), "{e:#}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        write_with(&path, Some(3), |w| Ok(w.write_all(b"abc")?)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abc");
    }

    #[test]
    fn a_full_device_is_named_with_the_bytes_the_write_needed() {
        // /dev/full fails every write with ENOSPC, as a full disk does.
        let full = Path::new("/dev/full");
        if !full.exists() {
            eprintln!("skipped: no /dev/full");
            return;
        }
        let mut log = AppendLog::open(full).unwrap();
        let e = log.line("{}").unwrap_err();
        assert!(matches!(e, DiskError::Full { .. }), "{e:?}");
        let e = e.to_string();
        assert!(
            e.starts_with("/dev/full: no space left on device; the file needs 3 bytes (0.0 KiB)"),
            "{e}"
        );
        assert!(e.ends_with("and run again"), "{e}");
    }

    #[test]
    fn errors_are_told_apart() {
        let p = Path::new("out/x");
        let ro = DiskError::classify(p, &io::Error::from_raw_os_error(libc::EROFS), None, 0);
        assert!(
            ro.to_string()
                .starts_with("out/x: the filesystem is read-only")
        );
        let full = DiskError::classify(p, &io::Error::from_raw_os_error(libc::EDQUOT), None, 7);
        assert!(
            full.to_string()
                .contains("no space left on device after 7 bytes")
        );
        assert_eq!(bytes_text(3 << 20), "3145728 bytes (3.0 MiB)");
    }
}
