//! Reading a GGUF file's header (v2 and v3, little-endian): its metadata and tensor infos, never
//! the tensor data, as llama.cpp's `gguf_init_from_file` checks them. Every count and length is
//! checked against the bytes left before anything is allocated, every tensor's bytes must lie in
//! the file, and any defect is one error naming the file: a damaged or hostile file can neither
//! panic this reader nor make it allocate more than the file's size.

use super::gguf::{ALIGNMENT, GgmlType};
use anyhow::{Context, Result, bail, ensure};
use std::path::Path;

const MAGIC: &[u8; 4] = b"GGUF";
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;

/// A metadata value, typed as on disk (GGUF value types 0 to 12).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// Items of one scalar or string type (llama.cpp reads no nested arrays).
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// As JSON (what `qlora inspect` prints); a non-finite float is `null`.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Self::U8(x) => J::from(*x),
            Self::I8(x) => J::from(*x),
            Self::U16(x) => J::from(*x),
            Self::I16(x) => J::from(*x),
            Self::U32(x) => J::from(*x),
            Self::I32(x) => J::from(*x),
            Self::F32(x) => J::from(*x),
            Self::Bool(x) => J::from(*x),
            Self::Str(x) => J::from(x.as_str()),
            Self::Array(a) => J::Array(a.iter().map(Self::to_json).collect()),
            Self::U64(x) => J::from(*x),
            Self::I64(x) => J::from(*x),
            Self::F64(x) => J::from(*x),
        }
    }

    /// The value as an unsigned integer, when it is one.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(x) => Some(x.into()),
            Self::U16(x) => Some(x.into()),
            Self::U32(x) => Some(x.into()),
            Self::U64(x) => Some(x),
            _ => None,
        }
    }
}

/// One tensor's info.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub ty: GgmlType,
    /// ggml's `ne` order (innermost first): the PyTorch shape reversed.
    pub ne: Vec<u64>,
    /// Relative to [`GgufHeader::data_offset`].
    pub offset: u64,
    pub n_bytes: u64,
}

/// A GGUF file's header.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufHeader {
    pub version: u32,
    /// In file order (keys are unique).
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorInfo>,
    /// `general.alignment`, or 32.
    pub alignment: u64,
    /// Where the tensor data starts in the file.
    pub data_offset: u64,
}

impl GgufHeader {
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// Reads the header of the GGUF file at `path`.
pub fn read_header(path: &Path) -> Result<GgufHeader> {
    let file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    // SAFETY: mapped read-only; only the header pages are touched.
    let mmap = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("{}: cannot map", path.display()))?;
    parse_header(&mmap).with_context(|| {
        format!(
            "{}: not a valid GGUF file (truncated or damaged? write or download it again)",
            path.display()
        )
    })
}

/// A cursor over the file's bytes; every read is bounds-checked.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.b.len() - self.at
    }
    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.at.checked_add(n))
            .filter(|&end| end <= self.b.len());
        let Some(end) = end else {
            bail!(
                "{n} bytes wanted at byte {}, only {} left (truncated?)",
                self.at,
                self.left()
            );
        };
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N as u64)?.try_into().expect("N bytes"))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn string(&mut self) -> Result<String> {
        let at = self.at;
        let len = self.u64()?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec())
            .with_context(|| format!("the string at byte {at} is not UTF-8"))
    }
    /// Checks that `count` items of at least `min_bytes` each can fit in what is left, and gives
    /// the capacity to reserve for them.
    fn capacity(&self, count: u64, min_bytes: u64, what: &str) -> Result<usize> {
        let fits = count
            .checked_mul(min_bytes)
            .is_some_and(|n| n <= self.left() as u64);
        ensure!(
            fits,
            "{count} {what} at byte {} cannot fit in the {} bytes left",
            self.at,
            self.left()
        );
        Ok(count as usize)
    }
    fn value(&mut self, ty: u32, in_array: bool) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(u8::from_le_bytes(self.array()?)),
            1 => MetaValue::I8(i8::from_le_bytes(self.array()?)),
            2 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                b @ (0 | 1) => MetaValue::Bool(b == 1),
                b => bail!("bool value {b} at byte {} is neither 0 nor 1", self.at - 1),
            },
            8 => MetaValue::Str(self.string()?),
            9 if !in_array => {
                let item_ty = self.u32()?;
                let count = self.u64()?;
                let min_bytes = match item_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => bail!(
                        "array of arrays at byte {} (GGUF readers reject them)",
                        self.at
                    ),
                    other => bail!(
                        "array item type {other} at byte {} is not a GGUF type",
                        self.at
                    ),
                };
                let mut items =
                    Vec::with_capacity(self.capacity(count, min_bytes, "array items")?);
                for _ in 0..count {
                    items.push(self.value(item_ty, true)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            other => bail!(
                "value type {other} at byte {} is not a GGUF type",
                self.at - 4
            ),
        })
    }
}

/// Parses a whole GGUF file's bytes (the header; tensor data only has its bounds checked).
pub fn parse_header(bytes: &[u8]) -> Result<GgufHeader> {
    let mut r = Reader { b: bytes, at: 0 };
    ensure!(r.array::<4>()? == *MAGIC, "no GGUF magic");
    let version = r.u32()?;
    ensure!(
        version == 2 || version == 3,
        "GGUF version {version}; versions 2 and 3 are read"
    );
    let n_tensors = r.u64()?;
    let n_kv = r.u64()?;
    // A key-value pair takes at least a key length, a type and a 1-byte value.
    let mut metadata = Vec::with_capacity(r.capacity(n_kv, 8 + 4 + 1, "metadata pairs")?);
    for _ in 0..n_kv {
        let key = r.string()?;
        let ty = r.u32()?;
        let value = r
            .value(ty, false)
            .with_context(|| format!("metadata `{key}`"))?;
        ensure!(
            !metadata.iter().any(|(k, _)| *k == key),
            "metadata key `{key}` appears twice"
        );
        metadata.push((key, value));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => ALIGNMENT,
        Some((_, MetaValue::U32(a))) if a.is_power_of_two() => u64::from(*a),
        Some((_, v)) => bail!("general.alignment {v:?} is not a power of two (u32)"),
    };
    // A tensor info takes at least a name length, n_dims, a type and an offset.
    let mut tensors: Vec<TensorInfo> =
        Vec::with_capacity(r.capacity(n_tensors, 8 + 4 + 4 + 8, "tensor infos")?);
    for _ in 0..n_tensors {
        let name = r.string()?;
        let info = tensor_info(&mut r, name.clone(), alignment)
            .with_context(|| format!("tensor `{name}`"))?;
        ensure!(
            !tensors.iter().any(|t| t.name == name),
            "tensor `{name}` appears twice"
        );
        tensors.push(info);
    }
    let data_offset = (r.at as u64).next_multiple_of(alignment);
    let data_len = (bytes.len() as u64).saturating_sub(data_offset);
    for t in &tensors {
        let end = t.offset.checked_add(t.n_bytes);
        ensure!(
            end.is_some_and(|end| end <= data_len),
            "tensor `{}`: {} bytes at data offset {} lie past the end of the file ({data_len} data bytes)",
            t.name,
            t.n_bytes,
            t.offset
        );
    }
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

fn tensor_info(r: &mut Reader<'_>, name: String, alignment: u64) -> Result<TensorInfo> {
    let n_dims = r.u32()?;
    ensure!(
        (1..=MAX_DIMS).contains(&n_dims),
        "{n_dims} dimensions (1 to {MAX_DIMS})"
    );
    let ne = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<u64>>>()?;
    let id = r.u32()?;
    let ty = GgmlType::from_id(id).with_context(|| format!("type id {id} is not a ggml type"))?;
    let offset = r.u64()?;
    let block = ty.block_elems() as u64;
    ensure!(
        ne[0] % block == 0,
        "rows of {} are not a multiple of {}'s block of {block}",
        ne[0],
        ty.name()
    );
    // ggml keeps element counts in int64.
    let n_elems = ne
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64);
    let n_bytes = n_elems
        .and_then(|n| (n / block).checked_mul(ty.block_bytes() as u64))
        .with_context(|| format!("shape {ne:?} has more elements than ggml can hold"))?;
    ensure!(
        offset % alignment == 0,
        "data offset {offset} is not a multiple of the alignment {alignment}"
    );
    Ok(TensorInfo {
        name,
        ty,
        ne,
        offset,
        n_bytes,
    })
}
