//! A spill file for writing a safetensors shard one tensor at a time when some tensors' sizes are
//! known only once they are encoded.
//!
//! A safetensors file starts with a header of every tensor's byte range, so a writer must know all
//! sizes before the first data byte. For the dense exports the sizes follow from shapes and dtypes,
//! and the tensors are computed while the file is written. A bitsandbytes 4-bit weight is different:
//! its `quant_state` tensor is JSON holding `nested_offset`, the mean of the weight's absmax values,
//! whose decimal length depends on the data. Rather than hold a whole shard of quantized weights
//! until the header can be written, each tensor is encoded once, appended to a spill file beside the
//! output and dropped; the shard is then written by `safetensors::serialize_to_file` (so the bytes
//! are exactly what it writes for in-memory tensors), reading each tensor back from the spill when
//! the writer reaches it. Memory: one tensor; disk: the shard's quantized data twice, briefly.

use crate::fsx::disk::OutFile;
use anyhow::{Context, Result};
use qlora_quant::bnb::RawTensor;
use std::borrow::Cow;
use std::cell::RefCell;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// An append-only scratch file, removed when dropped.
#[derive(Debug)]
pub struct Spill {
    path: PathBuf,
    file: OutFile,
    n_bytes: u64,
}

/// Where a spilled tensor lies in its [`Spill`].
#[derive(Debug, Clone, PartialEq)]
pub struct Spilled {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub offset: u64,
    pub n_bytes: usize,
}

impl Spill {
    /// Creates `path` (which must not exist).
    pub fn create(path: &Path) -> Result<Self> {
        let file = OutFile::open(
            path,
            File::options().read(true).write(true).create_new(true),
        )
        .context("creating a spill file")?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            n_bytes: 0,
        })
    }

    /// Appends `t`'s bytes (then dropped by the caller) and returns where they are.
    pub fn push(&mut self, t: &RawTensor) -> Result<Spilled> {
        if self.file.write_all(&t.data).is_err() {
            let needed = self.n_bytes + t.data.len() as u64;
            let e = self.file.failure(&self.path, Some(needed));
            return Err(
                anyhow::Error::new(e.expect("a failed write keeps its error"))
                    .context("writing a spill file (the quantized shard's data, once more)"),
            );
        }
        let spilled = Spilled {
            dtype: t.dtype,
            shape: t.shape.clone(),
            offset: self.n_bytes,
            n_bytes: t.data.len(),
        };
        self.n_bytes += t.data.len() as u64;
        Ok(spilled)
    }

    /// The bytes of `t`, read back.
    pub fn read(&self, t: &Spilled) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; t.n_bytes];
        self.file
            .file()
            .read_exact_at(&mut buf, t.offset)
            .with_context(|| format!("reading back the spill file {}", self.path.display()))?;
        Ok(buf)
    }

    /// A [`safetensors::View`] of `t` whose `data()` reads it back; a read error is stored in
    /// `error` (the trait cannot fail) for the caller to report after the write.
    pub fn view<'a>(
        &'a self,
        t: Spilled,
        error: &'a RefCell<Option<anyhow::Error>>,
    ) -> SpilledView<'a> {
        SpilledView {
            spill: self,
            t,
            error,
        }
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A spilled tensor as the safetensors writer sees it.
#[derive(Debug)]
pub struct SpilledView<'a> {
    spill: &'a Spill,
    t: Spilled,
    error: &'a RefCell<Option<anyhow::Error>>,
}

impl safetensors::View for SpilledView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.t.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.t.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self.spill.read(&self.t) {
            Ok(bytes) => Cow::Owned(bytes),
            Err(e) => {
                self.error.borrow_mut().get_or_insert(e);
                Cow::Owned(vec![0u8; self.t.n_bytes])
            }
        }
    }
    fn data_len(&self) -> usize {
        self.t.n_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard written from the spill is byte-identical to the same tensors serialized from memory:
    /// the header (order, offsets) is the crate's, and every tensor's bytes come back intact.
    #[test]
    fn spilled_shard_equals_in_memory_serialization() {
        let dir = tempfile::tempdir().unwrap();
        let tensors: Vec<(String, RawTensor)> = vec![
            ("b.weight".into(), RawTensor::u8(&[1, 2, 3, 4, 5])),
            ("a.weight.absmax".into(), RawTensor::f32(&[0.5, -1.25, 3.0])),
            (
                "a.weight".into(),
                RawTensor::u8(&(0..=255).collect::<Vec<u8>>()),
            ),
            ("c.quant_state".into(), RawTensor::u8(br#"{"x": 0.1}"#)),
        ];
        let want = dir.path().join("want.safetensors");
        safetensors::serialize_to_file(tensors.clone(), None, &want).unwrap();

        let mut spill = Spill::create(&dir.path().join(".spill")).unwrap();
        let spilled: Vec<(String, Spilled)> = tensors
            .iter()
            .map(|(n, t)| (n.clone(), spill.push(t).unwrap()))
            .collect();
        assert_eq!(spilled[1].1.offset, 5);
        assert_eq!(spilled[2].1.offset, 5 + 12);
        let error = RefCell::new(None);
        let views = spilled.into_iter().map(|(n, s)| (n, spill.view(s, &error)));
        let got = dir.path().join("got.safetensors");
        safetensors::serialize_to_file(views, None, &got).unwrap();
        assert!(error.borrow().is_none());
        assert_eq!(std::fs::read(&got).unwrap(), std::fs::read(&want).unwrap());
        drop(spill);
        assert!(!dir.path().join(".spill").exists(), "removed on drop");
    }
}
