//! Hugging Face checkpoint directories: `config.json` plus `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Shards are memory-mapped; every error names the file.
//!
//! Streaming: a reader that has consumed a tensor (copied, converted or quantized it) calls
//! [`Checkpoint::release`] with its bytes, which drops this process's mapped pages of that range
//! (`madvise(MADV_DONTNEED)`). Without it every page read stays resident in the process until the
//! shard is unmapped, and a pass over a 7.6 GB checkpoint ends holding 7.6 GB of file pages in its
//! RSS. The pages stay in the page cache (reclaimable, not counted in RSS); reading the range again
//! faults them back in with the same contents, since the mapping is read-only and shared.

use anyhow::{Context, Result, anyhow, bail};
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use qlora_quant::bnb;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The single-file weights name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The sharded weights index name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The model configuration.
pub const CONFIG_FILE: &str = "config.json";

/// `model.safetensors.index.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ShardIndex {
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub weight_map: BTreeMap<String, String>,
}

/// One memory-mapped safetensors file.
#[derive(Debug)]
pub struct Shard {
    /// File name inside the checkpoint dir.
    pub file: String,
    /// The whole path, for errors.
    pub path: PathBuf,
    mmap: Mmap,
}

impl Shard {
    /// Maps the safetensors file at `path` (named `file` in its checkpoint) and checks its header.
    pub fn open(path: &Path, file: &str) -> Result<Self> {
        let f = std::fs::File::open(path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: the file is mapped read-only; a checkpoint being rewritten under us is outside
        // what any loader can defend against (transformers maps it the same way).
        let mmap =
            unsafe { Mmap::map(&f) }.with_context(|| format!("{}: cannot map", path.display()))?;
        let shard = Self {
            file: file.to_string(),
            path: path.to_path_buf(),
            mmap,
        };
        shard.tensors()?;
        Ok(shard)
    }

    /// Parses the header (cheap) and gives access to the tensors.
    pub fn tensors(&self) -> Result<SafeTensors<'_>> {
        parse_safetensors(&self.path, &self.mmap)
    }

    /// The header's `__metadata__` (string pairs), if any.
    pub fn metadata(&self) -> Result<Option<HashMap<String, String>>> {
        let (_, meta) = SafeTensors::read_metadata(&self.mmap)
            .map_err(|e| anyhow!("{}: {e}", self.path.display()))?;
        Ok(meta.metadata().clone())
    }

    /// The byte range of `bytes` inside this shard's mapping, if it lies there.
    fn range_of(&self, bytes: &[u8]) -> Option<(usize, usize)> {
        let base = self.mmap.as_ptr() as usize;
        let start = (bytes.as_ptr() as usize).checked_sub(base)?;
        (start + bytes.len() <= self.mmap.len()).then_some((start, bytes.len()))
    }
}

/// An opened checkpoint directory.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    /// `config.json` as written (kept raw so that unknown keys survive a rewrite).
    pub config: serde_json::Value,
    pub shards: Vec<Shard>,
    /// Present when the weights are sharded.
    pub index: Option<ShardIndex>,
}

impl Checkpoint {
    /// Opens `dir`: reads config.json and maps every weights file.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "{}: no such checkpoint directory (expected config.json and *.safetensors)",
                dir.display()
            );
        }
        let config_path = dir.join(CONFIG_FILE);
        let config_bytes = std::fs::read(&config_path).with_context(|| {
            format!(
                "{}: cannot read; a checkpoint needs its config.json",
                config_path.display()
            )
        })?;
        let config: serde_json::Value = serde_json::from_slice(&config_bytes)
            .with_context(|| format!("{}: invalid JSON", config_path.display()))?;
        let index_path = dir.join(INDEX_FILE);
        let (files, index) = if index_path.exists() {
            let bytes = std::fs::read(&index_path)
                .with_context(|| format!("{}: cannot read", index_path.display()))?;
            let index: ShardIndex = serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: invalid shard index", index_path.display()))?;
            // Shards are files of this directory (every writer of the format puts them there).
            if let Some(e) = index
                .weight_map
                .values()
                .find_map(|f| crate::pathsafe::file_name(f).err())
            {
                bail!(
                    "{}: weight_map: {e}; a shard must be a file of this directory",
                    index_path.display()
                );
            }
            let mut files: Vec<String> = index.weight_map.values().cloned().collect();
            files.sort();
            files.dedup();
            (files, Some(index))
        } else if dir.join(SINGLE_FILE).exists() {
            (vec![SINGLE_FILE.to_string()], None)
        } else {
            bail!(
                "{}: no {SINGLE_FILE} or {INDEX_FILE}; is this a Hugging Face checkpoint?",
                dir.display()
            );
        };
        let shards = files
            .into_iter()
            .map(|file| {
                let path = dir.join(&file);
                if index.is_some() && !path.is_file() {
                    bail!(
                        "{}: listed in {} but missing",
                        path.display(),
                        index_path.display()
                    );
                }
                Shard::open(&path, &file)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            shards,
            index,
        })
    }

    /// Drops this process's resident pages of `bytes`, a slice of one of the shards (a tensor's
    /// `data()`), rounded out to whole pages; a slice from elsewhere is ignored. The caller must
    /// have finished with the values (it holds its own copy); reading the range again still works.
    pub fn release(&self, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        for shard in &self.shards {
            if let Some((offset, len)) = shard.range_of(bytes) {
                #[cfg(unix)]
                // SAFETY: the mapping is read-only and shared (never written through), so
                // MADV_DONTNEED only drops our page-table entries: a later access refaults the same
                // file contents, and no live reference can observe a change.
                unsafe {
                    shard.mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        offset,
                        len,
                    )
                }
                .with_context(|| format!("{}: releasing mapped pages", shard.file))?;
                #[cfg(not(unix))]
                let _ = (offset, len);
            }
        }
        Ok(())
    }

    /// [`Checkpoint::release`] for the tensor `name` and its 4-bit state companions (`name.absmax`,
    /// `name.quant_state.…`, see [`bnb::STATE_SUFFIXES`]), those that `lookup` finds.
    pub fn release_named<'a>(
        &'a self,
        name: &str,
        lookup: impl Fn(&str) -> Option<safetensors::tensor::TensorView<'a>>,
    ) -> Result<()> {
        let companions = bnb::STATE_SUFFIXES.iter().map(|s| format!("{name}{s}"));
        for n in std::iter::once(name.to_string()).chain(companions) {
            if let Some(v) = lookup(&n) {
                self.release(v.data())?;
            }
        }
        Ok(())
    }

    /// Headers of every shard, in shard order.
    pub fn tensors(&self) -> Result<Vec<SafeTensors<'_>>> {
        self.shards.iter().map(Shard::tensors).collect()
    }

    /// A string field of config.json.
    pub fn config_str(&self, key: &str) -> Option<&str> {
        self.config.get(key).and_then(|v| v.as_str())
    }
}

/// Parses a whole safetensors file, `bytes`, read from `path`: any defect is one error naming
/// `path`. Every tensor's byte range is checked against the file before the safetensors crate
/// validates the header, since the crate sums the ranges unchecked: ranges adding up past
/// `usize::MAX` overflow there (a panic in debug builds; in release the sum wraps, the header is
/// accepted, and slicing the first tensor panics).
pub fn parse_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    let invalid = |e: &dyn std::fmt::Display| {
        anyhow!(
            "{}: not a valid safetensors file: {e} (truncated or damaged? download or write it again)",
            path.display()
        )
    };
    check_data_offsets(bytes).map_err(|e| invalid(&e))?;
    SafeTensors::deserialize(bytes).map_err(|e| invalid(&e))
}

/// Fails when a tensor's `data_offsets` lie outside the data that follows the header; headers the
/// safetensors crate itself rejects (too short, bad JSON…) are left to it.
fn check_data_offsets(bytes: &[u8]) -> std::result::Result<(), String> {
    let Some(n) = bytes.get(..8) else {
        return Ok(());
    };
    let n = u64::from_le_bytes(n.try_into().expect("8 bytes"));
    let Some(header) = usize::try_from(n)
        .ok()
        .and_then(|n| bytes.get(8..8usize.checked_add(n)?))
    else {
        return Ok(());
    };
    let data_len = (bytes.len() - 8 - header.len()) as u64;
    let Ok(serde_json::Value::Object(entries)) = serde_json::from_slice(header) else {
        return Ok(());
    };
    for (name, info) in &entries {
        let offsets = info.get("data_offsets").and_then(|o| o.as_array());
        if let Some([start, end]) = offsets.map(Vec::as_slice)
            && let (Some(start), Some(end)) = (start.as_u64(), end.as_u64())
            && (start > end || end > data_len)
        {
            return Err(format!(
                "tensor `{name}` has data_offsets [{start}, {end}], outside the \
                         {data_len} data bytes that follow the header"
            ));
        }
    }
    Ok(())
}

/// Every tensor of the safetensors file at `path`, on `device` (candle's
/// `candle_core::safetensors::load`, behind [`parse_safetensors`]); errors name `path`.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    use candle_core::safetensors::Load;
    let file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    // SAFETY: mapped read-only and dropped before returning (the tensors own copies).
    let mmap =
        unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
    let st = parse_safetensors(path, &mmap)?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let t = view
                .load(device)
                .with_context(|| format!("{}: tensor `{name}`", path.display()))?;
            Ok((name, t))
        })
        .collect()
}

/// The candle dtype of a safetensors dtype, for the float types a checkpoint stores weights in.
pub fn float_dtype(dtype: safetensors::Dtype) -> Option<candle_core::DType> {
    match dtype {
        safetensors::Dtype::F32 => Some(candle_core::DType::F32),
        safetensors::Dtype::BF16 => Some(candle_core::DType::BF16),
        safetensors::Dtype::F16 => Some(candle_core::DType::F16),
        _ => None,
    }
}

/// A tensor's values widened losslessly to f32 (from f32, bf16 or f16); other dtypes are an error
/// naming the tensor and the file.
pub fn to_f32(
    view: &safetensors::tensor::TensorView<'_>,
    name: &str,
    file: &str,
) -> Result<Vec<f32>> {
    let data = view.data();
    Ok(match view.dtype() {
        safetensors::Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        safetensors::Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        safetensors::Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => bail!(
            "{file}: tensor `{name}` has dtype {other:?}; 4-bit quantization reads f32, bf16 or f16 weights \
             (convert the checkpoint to one of them first)"
        ),
    })
}

/// Tokenizer, generation config and any other non-weight files of `ck`, copied into `dest` as they
/// are (config.json and the weights are the caller's to write).
pub fn copy_other_files(ck: &Checkpoint, dest: &Path) -> Result<()> {
    for entry in std::fs::read_dir(&ck.dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let skip = name == CONFIG_FILE
            || name == INDEX_FILE
            || name.ends_with(".safetensors")
            || name.starts_with('.');
        // A regular file, not a link (which could lead anywhere), under a name that stays in
        // `dest`.
        if entry.file_type()?.is_file() && !skip {
            match crate::pathsafe::join_under(dest, &name) {
                Ok(to) => {
                    std::fs::copy(entry.path(), &to).with_context(|| format!("copying {name}"))?;
                }
                Err(e) => eprintln!("warning: {}: not copied: {e}", ck.dir.display()),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Releasing a tensor's pages drops them from this process only: reading the tensor again
    /// gives the same bytes, and a slice that is not in a shard is ignored.
    #[test]
    fn released_tensors_read_back_identically() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), "{}").unwrap();
        let big: Vec<u8> = (0..3 * 4096 + 123).map(|i| (i * 7 % 251) as u8).collect();
        let small = vec![9u8; 10];
        let tensors = [
            (
                "big",
                safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![big.len()], &big)
                    .unwrap(),
            ),
            (
                "small",
                safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![10], &small)
                    .unwrap(),
            ),
        ];
        safetensors::serialize_to_file(tensors, None, &dir.path().join(SINGLE_FILE)).unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        let st = &ck.tensors().unwrap()[0];
        for (name, want) in [("big", &big), ("small", &small)] {
            let view = st.tensor(name).unwrap();
            assert_eq!(view.data(), want.as_slice());
            ck.release(view.data()).unwrap();
            assert_eq!(view.data(), want.as_slice(), "`{name}` after release");
        }
        ck.release(&big).unwrap(); // not a shard's bytes: nothing to do
    }
}
