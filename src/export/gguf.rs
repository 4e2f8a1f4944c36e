//! GGUF v3, written as a small state machine (llama.cpp's gguf-py `GGUFWriter` is the model):
//! metadata and tensor infos are declared first (duplicates rejected, shapes reversed to ggml's
//! `ne` order, data offsets aligned to 32), then the header is written and each tensor's bytes are
//! produced and written in declaration order, one at a time, so memory holds one tensor.

use anyhow::{Context, Result, bail, ensure};
use std::io::{Seek, Write};

/// Data alignment (`general.alignment` default).
pub const ALIGNMENT: u64 = 32;
const MAGIC: u32 = 0x4655_4747; // "GGUF"
const VERSION: u32 = 3;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    ArrStr(Vec<String>),
    ArrF32(Vec<f32>),
    ArrI32(Vec<i32>),
}

/// ggml's tensor types: `(name, ggml id, elements per block, bytes per block)`, one table
/// (ggml.c's `type_traits`; ids 4, 5, 31–33 and 36–38 are retired). [`WRITABLE`] are those this
/// writer encodes; a reader ([`super::gguf_read`]) sizes any of them.
pub const TYPES: [(&str, u32, usize, usize); 32] = [
    ("f32", 0, 1, 4),
    ("f16", 1, 1, 2),
    ("q4_0", 2, 32, 18),
    ("q4_1", 3, 32, 20),
    ("q5_0", 6, 32, 22),
    ("q5_1", 7, 32, 24),
    ("q8_0", 8, 32, 34),
    ("q8_1", 9, 32, 36),
    ("q2_k", 10, 256, 84),
    ("q3_k", 11, 256, 110),
    ("q4_k", 12, 256, super::kquants::Q4_K_BYTES),
    ("q5_k", 13, 256, super::kquants::Q5_K_BYTES),
    ("q6_k", 14, 256, super::kquants::Q6_K_BYTES),
    ("q8_k", 15, 256, 292),
    ("iq2_xxs", 16, 256, 66),
    ("iq2_xs", 17, 256, 74),
    ("iq3_xxs", 18, 256, 98),
    ("iq1_s", 19, 256, 50),
    ("iq4_nl", 20, 32, 18),
    ("iq3_s", 21, 256, 110),
    ("iq2_s", 22, 256, 82),
    ("iq4_xs", 23, 256, 136),
    ("i8", 24, 1, 1),
    ("i16", 25, 1, 2),
    ("i32", 26, 1, 4),
    ("i64", 27, 1, 8),
    ("f64", 28, 1, 8),
    ("iq1_m", 29, 256, 56),
    ("bf16", 30, 1, 2),
    ("tq1_0", 34, 256, 54),
    ("tq2_0", 35, 256, 66),
    ("mxfp4", 39, 32, 17),
];

/// The types [`encode`] writes.
pub const WRITABLE: [&str; 10] = [
    "f32", "f16", "q4_0", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k", "bf16",
];

/// A ggml tensor type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType(usize);

impl GgmlType {
    /// A type this writer encodes, by name.
    pub fn parse(name: &str) -> Result<Self> {
        match TYPES.iter().position(|t| t.0 == name) {
            Some(i) if WRITABLE.contains(&name) => Ok(Self(i)),
            _ => bail!("GGUF type `{name}` is not supported; use one of {WRITABLE:?}"),
        }
    }
    /// Any ggml type, by its id in a file.
    pub fn from_id(id: u32) -> Option<Self> {
        TYPES.iter().position(|t| t.1 == id).map(Self)
    }
    pub fn name(self) -> &'static str {
        TYPES[self.0].0
    }
    pub fn id(self) -> u32 {
        TYPES[self.0].1
    }
    pub fn block_elems(self) -> usize {
        TYPES[self.0].2
    }
    pub fn block_bytes(self) -> usize {
        TYPES[self.0].3
    }
    /// Bytes of `n` elements.
    pub fn n_bytes(self, n: usize) -> usize {
        n / TYPES[self.0].2 * TYPES[self.0].3
    }
}

/// A tensor to write: its name, torch-order shape, type, and how to produce its bytes.
pub struct TensorSpec<'a> {
    pub name: String,
    /// Row-major (PyTorch) order; written reversed.
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    pub produce: Box<dyn FnOnce() -> Result<Vec<u8>> + 'a>,
}

/// Collects metadata and tensors, then writes the file.
#[derive(Default)]
pub struct GgufWriter<'a> {
    kv: Vec<(String, Value)>,
    tensors: Vec<TensorSpec<'a>>,
}

impl std::fmt::Debug for TensorSpec<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorSpec")
            .field("name", &self.name)
            .field("shape", &self.shape)
            .field("ty", &self.ty.name())
            .finish()
    }
}

impl std::fmt::Debug for GgufWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufWriter")
            .field("kv", &self.kv.len())
            .field("tensors", &self.tensors)
            .finish()
    }
}

fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn put_value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    let ty = |t: u32, w: &mut dyn Write| w.write_all(&t.to_le_bytes());
    match v {
        Value::U32(x) => {
            ty(4, w)?;
            w.write_all(&x.to_le_bytes())
        }
        Value::I32(x) => {
            ty(5, w)?;
            w.write_all(&x.to_le_bytes())
        }
        Value::F32(x) => {
            ty(6, w)?;
            w.write_all(&x.to_le_bytes())
        }
        Value::Bool(x) => {
            ty(7, w)?;
            w.write_all(&[*x as u8])
        }
        Value::Str(s) => {
            ty(8, w)?;
            put_str(w, s)
        }
        Value::ArrStr(a) => {
            ty(9, w)?;
            ty(8, w)?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|s| put_str(w, s))
        }
        Value::ArrF32(a) => {
            ty(9, w)?;
            ty(6, w)?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
        Value::ArrI32(a) => {
            ty(9, w)?;
            ty(5, w)?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
    }
}

fn pad(w: &mut (impl Write + Seek)) -> std::io::Result<()> {
    let pos = w.stream_position()?;
    let n = (ALIGNMENT - pos % ALIGNMENT) % ALIGNMENT;
    w.write_all(&vec![0u8; n as usize])
}

impl<'a> GgufWriter<'a> {
    pub fn kv(&mut self, key: &str, value: Value) -> Result<()> {
        ensure!(
            !self.kv.iter().any(|(k, _)| k == key),
            "GGUF key `{key}` written twice"
        );
        self.kv.push((key.to_string(), value));
        Ok(())
    }

    pub fn tensor(&mut self, spec: TensorSpec<'a>) -> Result<()> {
        ensure!(
            !self.tensors.iter().any(|t| t.name == spec.name),
            "GGUF tensor `{}` written twice",
            spec.name
        );
        let n: usize = spec.shape.iter().product();
        let inner = *spec.shape.last().unwrap_or(&1);
        ensure!(
            inner.is_multiple_of(spec.ty.block_elems()),
            "`{}`: rows of {inner} are not a multiple of {}'s block of {}",
            spec.name,
            spec.ty.name(),
            spec.ty.block_elems()
        );
        ensure!(n > 0, "`{}` is empty", spec.name);
        self.tensors.push(spec);
        Ok(())
    }

    /// The size of the file [`GgufWriter::write`] writes, before writing it: the header padded to
    /// [`ALIGNMENT`], then each tensor's bytes padded the same way.
    pub fn file_bytes(&self) -> Result<u64> {
        let mut head = std::io::Cursor::new(Vec::new());
        let sizes = self.write_header(&mut head)?;
        let head = head.into_inner().len() as u64;
        Ok(head.next_multiple_of(ALIGNMENT)
            + sizes
                .iter()
                .map(|s| s.next_multiple_of(ALIGNMENT))
                .sum::<u64>())
    }

    /// The header (magic, counts, metadata, tensor infos), unpadded; returns each tensor's size.
    fn write_header(&self, w: &mut impl Write) -> Result<Vec<u64>> {
        w.write_all(&MAGIC.to_le_bytes())?;
        w.write_all(&VERSION.to_le_bytes())?;
        w.write_all(&(self.tensors.len() as u64).to_le_bytes())?;
        w.write_all(&(self.kv.len() as u64).to_le_bytes())?;
        for (k, v) in &self.kv {
            put_str(w, k)?;
            put_value(w, v)?;
        }
        let mut offset = 0u64;
        let mut sizes = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            put_str(w, &t.name)?;
            w.write_all(&(t.shape.len() as u32).to_le_bytes())?;
            for d in t.shape.iter().rev() {
                w.write_all(&(*d as u64).to_le_bytes())?;
            }
            w.write_all(&t.ty.id().to_le_bytes())?;
            w.write_all(&offset.to_le_bytes())?;
            let size = t.ty.n_bytes(t.shape.iter().product()) as u64;
            sizes.push(size);
            offset += size.div_ceil(ALIGNMENT) * ALIGNMENT;
        }
        Ok(sizes)
    }

    /// Writes everything to `w`; each tensor's bytes are produced just before they are written.
    pub fn write(self, w: &mut (impl Write + Seek)) -> Result<()> {
        let sizes = self.write_header(w)?;
        pad(w)?;
        for (t, size) in self.tensors.into_iter().zip(sizes) {
            let name = t.name.clone();
            let bytes = (t.produce)().with_context(|| format!("producing `{name}`"))?;
            ensure!(
                bytes.len() as u64 == size,
                "`{name}`: {} bytes produced, {size} declared",
                bytes.len()
            );
            w.write_all(&bytes)?;
            pad(w)?;
        }
        Ok(())
    }
}

/// `values` (row-major, `shape`) encoded as `ty`: f32/f16/bf16 directly, k-quants with
/// [`super::kquants`] (llama-quantize's algorithm), the 32-element block types through candle's
/// quantizers (the same as ggml's reference ones).
pub fn encode(values: &[f32], shape: &[usize], ty: GgmlType) -> Result<Vec<u8>> {
    Ok(match ty.name() {
        "f32" => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        "f16" => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        "bf16" => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        "q4_k" => super::kquants::encode(values, super::kquants::KQuant::Q4K),
        "q5_k" => super::kquants::encode(values, super::kquants::KQuant::Q5K),
        "q6_k" => super::kquants::encode(values, super::kquants::KQuant::Q6K),
        name => {
            let dtype = match name {
                "q8_0" => candle_core::quantized::GgmlDType::Q8_0,
                "q4_0" => candle_core::quantized::GgmlDType::Q4_0,
                "q5_0" => candle_core::quantized::GgmlDType::Q5_0,
                "q5_1" => candle_core::quantized::GgmlDType::Q5_1,
                other => bail!("no quantizer for {other}"),
            };
            let t = candle_core::Tensor::from_slice(values, shape, &candle_core::Device::Cpu)?;
            candle_core::quantized::QTensor::quantize(&t, dtype)?
                .data()?
                .into_owned()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;

    /// A cursor that publishes its position, so a `produce` closure can see how far the file is.
    struct Tracked {
        inner: std::io::Cursor<Vec<u8>>,
        pos: Rc<Cell<u64>>,
    }
    impl Write for Tracked {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let n = self.inner.write(b)?;
            self.pos.set(self.inner.position());
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Seek for Tracked {
        fn seek(&mut self, p: std::io::SeekFrom) -> std::io::Result<u64> {
            self.inner.seek(p)
        }
    }

    /// Streaming: the header (offsets from shapes and types alone) is complete before the first
    /// tensor is produced, and tensor k is produced only when tensors 0..k are on disk, exactly at
    /// the offset the header declared for it; so the writer holds one tensor's bytes at a time.
    #[test]
    fn tensors_are_produced_one_at_a_time_where_the_header_says() {
        let pos = Rc::new(Cell::new(0u64));
        let produced_at: Rc<RefCell<Vec<(String, u64)>>> = Rc::default();
        let mut w = GgufWriter::default();
        w.kv("general.architecture", Value::Str("phi3".into()))
            .unwrap();
        let specs: [(&str, Vec<usize>, &str); 4] = [
            ("a", vec![3, 32], "f32"),
            ("b", vec![7], "f16"),
            ("c", vec![2, 64], "q8_0"),
            ("d", vec![5], "f32"),
        ];
        let mut want_bytes = Vec::new();
        for (name, shape, ty) in specs {
            let ty = GgmlType::parse(ty).unwrap();
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            want_bytes.push((name, encode(&values, &shape, ty).unwrap()));
            let (pos, produced_at, shape2) = (pos.clone(), produced_at.clone(), shape.clone());
            w.tensor(TensorSpec {
                name: name.into(),
                shape,
                ty,
                produce: Box::new(move || {
                    produced_at.borrow_mut().push((name.into(), pos.get()));
                    encode(&values, &shape2, ty)
                }),
            })
            .unwrap();
        }
        let mut out = Tracked {
            inner: std::io::Cursor::new(Vec::new()),
            pos: pos.clone(),
        };
        w.write(&mut out).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        std::fs::write(&path, out.inner.into_inner()).unwrap();

        let file = gguf_rs::mmap::MmapGGUF::open(&path).unwrap();
        let m = file.model();
        let data = m.data_offset();
        let produced_at = produced_at.borrow();
        assert_eq!(produced_at.len(), 4, "each tensor produced once");
        for ((name, at), (want_name, bytes)) in produced_at.iter().zip(&want_bytes) {
            assert_eq!(name, want_name, "declaration order");
            let t = m.tensors().iter().find(|t| &t.name == name).unwrap();
            assert_eq!(
                *at,
                data + t.offset,
                "`{name}` produced when the file reached its declared offset"
            );
            let start = (data + t.offset) as usize;
            assert_eq!(
                &file.as_slice()[start..start + bytes.len()],
                bytes.as_slice()
            );
        }
    }
}
