//! Atomic writes: every artifact is written under a temporary name beside its destination and
//! renamed into place, so a killed run never leaves a half-written file or directory behind.
//! Every byte goes through [`disk`] (write errors named, faults injectable); [`st`] writes
//! safetensors files through it. Also [`shown`], how a path appears in a message.

pub mod disk;
pub mod st;

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// A directory built under a temporary sibling name and renamed to its destination on
/// [`AtomicDir::commit`]; dropped without committing, it is removed.
#[derive(Debug)]
pub struct AtomicDir {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
    replace: bool,
}

impl AtomicDir {
    /// Starts building `dest`, which must not exist (or be an empty directory).
    pub fn create(dest: &Path) -> Result<Self> {
        Self::create_replacing(dest, false)
    }

    /// Like [`AtomicDir::create`]; with `replace`, an existing `dest` is replaced at the commit
    /// (moved aside, the new one renamed in, the old one removed).
    pub fn create_replacing(dest: &Path, replace: bool) -> Result<Self> {
        if dest.exists() && !replace {
            let empty = dest.is_dir() && std::fs::read_dir(dest)?.next().is_none();
            if !empty {
                bail!(
                    "{} already exists; remove it or choose another output path",
                    dest.display()
                );
            }
        }
        let name = dest
            .file_name()
            .with_context(|| format!("{} has no file name", dest.display()))?;
        let parent = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        disk::create_dir_all(parent)?;
        let tmp = parent.join(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            unique_suffix()
        ));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("removing stale {}", tmp.display()))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| disk::DiskError::classify(dest, &e, None, 0))?;
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
            replace,
        })
    }

    /// Where to write the contents until the commit.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Renames the finished directory into place.
    pub fn commit(mut self) -> Result<PathBuf> {
        let old = if self.replace && self.dest.exists() {
            let aside = tmp_sibling(&self.dest);
            std::fs::rename(&self.dest, &aside)
                .with_context(|| format!("moving the old {} aside", self.dest.display()))?;
            Some(aside)
        } else {
            if self.dest.is_dir() {
                std::fs::remove_dir(&self.dest)
                    .with_context(|| format!("replacing empty {}", self.dest.display()))?;
            }
            None
        };
        std::fs::rename(&self.tmp, &self.dest).with_context(|| {
            format!("renaming {} to {}", self.tmp.display(), self.dest.display())
        })?;
        self.committed = true;
        if let Some(old) = old {
            if old.is_dir() {
                std::fs::remove_dir_all(&old)?;
            } else {
                std::fs::remove_file(&old)?;
            }
        }
        Ok(self.dest.clone())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Writes `bytes` to `path` through a temporary sibling file and a rename ([`disk::write_with`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    disk::write_with(path, Some(bytes.len() as u64), |w| {
        std::io::Write::write_all(w, bytes)?;
        Ok(())
    })
}

/// Removes the temporaries (`.name.tmp-<pid>-<n>`) that a process killed while writing left in
/// `dir`; call it only where no other process writes.
pub fn remove_temps(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.contains(".tmp-") {
            let p = e.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            }
            .with_context(|| format!("removing the leftover {}", p.display()))?;
        }
    }
    Ok(())
}

/// `path` for a message: a relative path says what it is relative to (`data/train.jsonl (relative
/// to /home/me)`), since a config's paths resolve against the working directory, not the config's.
pub fn shown(path: &Path) -> String {
    match std::env::current_dir() {
        Ok(cwd) if path.is_relative() => {
            format!("{} (relative to {})", path.display(), cwd.display())
        }
        _ => path.display().to_string(),
    }
}

/// `dir/.name.tmp-<pid>-<n>` for `dir/name`.
pub fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", unique_suffix()))
}

/// `<pid>-<n>`: unique per process and call, so concurrent writers never share a temporary.
fn unique_suffix() -> String {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftover_temporaries_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join(".step-000004.tmp-77-0/adapter")).unwrap();
        std::fs::write(d.join(".step-000004.tmp-77-0/state.json"), "{").unwrap();
        std::fs::write(d.join(".optimizer.safetensors.tmp-77-1"), "x").unwrap();
        std::fs::create_dir(d.join("step-000003")).unwrap();
        std::fs::write(d.join(".hidden"), "kept").unwrap();
        remove_temps(d).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".hidden", "step-000003"]);
        remove_temps(&d.join("missing")).unwrap();
    }
}
