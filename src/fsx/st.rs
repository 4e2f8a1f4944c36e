//! safetensors files written through [`super::disk::write_with`] (so a full disk is reported with
//! the file's size and nothing half-written remains), streamed tensor by tensor as the crate's
//! `serialize_to_file` does, and sized before writing (for the disk plan).
//!
//! The header is the crate's: [`header`] builds it with `safetensors::tensor::Metadata` in the
//! crate's order (descending dtype alignment, then name) and pads it to 8 bytes, and a test pins
//! the bytes to `safetensors::serialize`.

use ::safetensors::tensor::{Metadata, TensorInfo};
use ::safetensors::{Dtype, View};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// The size prefix and header of a file of `tensors` (name, dtype, shape, data bytes), the
/// tensors' indices in file order, and the whole file's size.
pub fn header(
    tensors: &[(&str, Dtype, &[usize], usize)],
    metadata: Option<HashMap<String, String>>,
) -> Result<(Vec<u8>, Vec<usize>, u64)> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&l, &r| {
        let (l, r) = (&tensors[l], &tensors[r]);
        r.1.cmp(&l.1).then(l.0.cmp(r.0))
    });
    let mut offset = 0;
    let infos = order
        .iter()
        .map(|&i| {
            let (name, dtype, shape, n_bytes) = tensors[i];
            let info = TensorInfo {
                dtype,
                shape: shape.to_vec(),
                data_offsets: (offset, offset + n_bytes),
            };
            offset += n_bytes;
            (name.to_string(), info)
        })
        .collect();
    let meta = Metadata::new(metadata, infos).context("safetensors header")?;
    let mut json = serde_json::to_string(&meta)?.into_bytes();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    let total = out.len() as u64 + offset as u64;
    Ok((out, order, total))
}

/// The size of a safetensors file of tensors `(name, dtype, shape)`.
pub fn file_bytes(tensors: &[(String, Dtype, Vec<usize>)]) -> Result<u64> {
    let specs: Vec<(&str, Dtype, &[usize], usize)> = tensors
        .iter()
        .map(|(n, d, s)| {
            let elems: usize = s.iter().product();
            (n.as_str(), *d, s.as_slice(), elems * d.bitsize() / 8)
        })
        .collect();
    Ok(header(&specs, None)?.2)
}

/// Writes `tensors` to `path` (atomically, through [`super::disk::write_with`]), each tensor's
/// bytes asked for once, when the writer reaches it.
pub fn save<S: AsRef<str>, V: View>(
    path: &Path,
    tensors: Vec<(S, V)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let specs: Vec<(&str, Dtype, &[usize], usize)> = tensors
        .iter()
        .map(|(n, v)| (n.as_ref(), v.dtype(), v.shape(), v.data_len()))
        .collect();
    let (head, order, total) = header(&specs, metadata)?;
    super::disk::write_with(path, Some(total), |w| {
        w.write_all(&head)?;
        for i in order {
            w.write_all(tensors[i].1.data().as_ref())?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    struct Raw(Dtype, Vec<usize>, Vec<u8>);
    impl View for &Raw {
        fn dtype(&self) -> Dtype {
            self.0
        }
        fn shape(&self) -> &[usize] {
            &self.1
        }
        fn data(&self) -> Cow<'_, [u8]> {
            Cow::Borrowed(&self.2)
        }
        fn data_len(&self) -> usize {
            self.2.len()
        }
    }

    /// Byte for byte what the crate writes (order, offsets, padding, metadata), and the size
    /// predicted before writing is the file's.
    #[test]
    fn files_equal_the_crates_and_their_predicted_size() {
        let tensors = [
            ("z.weight", Raw(Dtype::U8, vec![5], vec![1, 2, 3, 4, 5])),
            ("a.bias", Raw(Dtype::F32, vec![3], vec![7; 12])),
            ("b.half", Raw(Dtype::BF16, vec![2, 2], vec![9; 8])),
            ("a.weight", Raw(Dtype::F32, vec![1, 2], vec![3; 8])),
        ];
        let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
        let want = ::safetensors::serialize(tensors.iter().map(|(n, r)| (*n, r)), metadata.clone())
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        save(
            &path,
            tensors.iter().map(|(n, r)| (*n, r)).collect(),
            metadata,
        )
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), want);
        let sized: Vec<(String, Dtype, Vec<usize>)> = tensors
            .iter()
            .map(|(n, r)| (n.to_string(), r.0, r.1.clone()))
            .collect();
        let plain = ::safetensors::serialize(tensors.iter().map(|(n, r)| (*n, r)), None).unwrap();
        assert_eq!(file_bytes(&sized).unwrap(), plain.len() as u64);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(leftovers.len(), 1, "only the file itself");
    }
}
