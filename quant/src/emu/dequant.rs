//! The dequantization kernels of quant/kernels/dequant.cu in the harness, launched as
//! `crate::cuda` launches them: the same arguments, tables and grid.

use super::{Arg, Elem, bytes_of, elems_of, launch, tensor_input};
use crate::format::{NESTED_BLOCK_ELEMS, dynamic_map, n_blocks};
use crate::tensor::{AbsmaxTensor, Nf4Tensor};
use candle_core::{CpuStorage, DType, Result, bail};

/// `w` dequantized to `dtype` (f32, bf16 or f16) by the emulated kernel.
pub(crate) fn dequantize(w: &Nf4Tensor, dtype: DType) -> Result<CpuStorage> {
    match dtype {
        DType::F32 => Ok(CpuStorage::F32(run::<f32>(w, "f32")?)),
        DType::BF16 => Ok(CpuStorage::BF16(run::<half::bf16>(w, "bf16")?)),
        DType::F16 => Ok(CpuStorage::F16(run::<half::f16>(w, "f16")?)),
        other => bail!("qlora-quant: cannot dequantize to {other:?}; use f32, bf16 or f16"),
    }
}

/// Whether a buffer at `offset` bytes from an aligned allocation allows 16-byte vector accesses.
fn aligned(a: &Arg) -> bool {
    match a {
        Arg::In { offset, .. } => offset % 16 == 0,
        _ => true, // outputs are fresh allocations
    }
}

fn run<T: Elem>(w: &Nf4Tensor, suffix: &str) -> Result<Vec<T>> {
    let n_elems = w.n_elems();
    let dims = crate::launch::dequant(n_elems)?;
    let blocks = n_blocks(n_elems, w.blocksize().elems());
    let packed = tensor_input::<u8>(w.packed(), "the packed weight")?;
    if let Arg::In { bytes, .. } = &packed
        && bytes.len() < n_elems.div_ceil(2)
    {
        bail!(
            "qlora-quant: {} packed bytes cannot hold {n_elems} elements",
            bytes.len()
        );
    }
    let mut tables = Vec::with_capacity(16 + 256);
    tables.extend_from_slice(w.quant_type().code());
    tables.extend_from_slice(dynamic_map());
    let vec_ok = u32::from(aligned(&packed));
    let block_shift = w.blocksize().elems().trailing_zeros();
    // As in crate::cuda: the pointer a kernel does not read is another valid buffer.
    let (kind, absmax, codes, nested, offset) = match w.absmax() {
        AbsmaxTensor::Plain(a) => {
            if a.elem_count() < blocks {
                bail!(
                    "qlora-quant: {} absmax values for {blocks} blocks",
                    a.elem_count()
                );
            }
            let absmax = tensor_input::<f32>(a, "the absmax")?;
            let unused_codes = tensor_input::<u8>(w.packed(), "the packed weight")?;
            let unused_nested = tensor_input::<f32>(a, "the absmax")?;
            ("plain", absmax, unused_codes, unused_nested, 0f32)
        }
        AbsmaxTensor::Nested {
            codes,
            nested_absmax,
            offset,
        } => {
            if codes.elem_count() < blocks
                || nested_absmax.elem_count() < blocks.div_ceil(NESTED_BLOCK_ELEMS)
            {
                bail!(
                    "qlora-quant: {} absmax codes and {} nested scales for {blocks} blocks",
                    codes.elem_count(),
                    nested_absmax.elem_count()
                );
            }
            let unused_absmax = tensor_input::<f32>(nested_absmax, "the nested absmax")?;
            let c = tensor_input::<u8>(codes, "the absmax codes")?;
            let s = tensor_input::<f32>(nested_absmax, "the nested absmax")?;
            ("nested", unused_absmax, c, s, *offset)
        }
    };
    let args = [
        packed,
        absmax,
        codes,
        nested,
        Arg::F32(offset),
        Arg::In {
            bytes: bytes_of(&tables),
            offset: 0,
        },
        super::output::<T>(n_elems),
        Arg::U64(n_elems as u64),
        Arg::U32(block_shift),
        Arg::U32(vec_ok),
    ];
    let outs = launch(&format!("dequant_{kind}_{suffix}"), dims, &args)?;
    Ok(elems_of(&outs[0]))
}
