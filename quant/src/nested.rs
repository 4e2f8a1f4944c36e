//! Double quantization of the per-block absmax (bitsandbytes `compress_statistics=True`):
//! `offset = mean(absmax)`, then `absmax − offset` quantized in blocks of 256 with the signed 8-bit
//! dynamic map, one f32 `nested_absmax` per 256-block. Memory: 4 + 8/64 + 32/16384 ≈ 4.127 bits per
//! weight instead of 4.5.
//!
//! The 8-bit rounding follows the bitsandbytes backend chosen ([`BnbBackend`]): CUDA's search for
//! the nearest code, or the CPU's lookup table, bit for bit.

use crate::backend::{BnbBackend, quantize_blockwise_8bit};
use crate::format::{NESTED_BLOCK_ELEMS, dynamic_map};

/// Quantized absmax: 8-bit codes into [`dynamic_map`], one scale per 256 codes, and the offset.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedAbsmax {
    /// One code per 4-bit block.
    pub codes: Vec<u8>,
    /// One f32 per 256 codes: max |absmax − offset| over them.
    pub nested_absmax: Vec<f32>,
    /// `mean(absmax)` as torch computes it in f32.
    pub offset: f32,
}

impl NestedAbsmax {
    /// Absmax of 4-bit block `block`: `map[code] * nested_absmax + offset`, two f32 roundings
    /// (bitsandbytes dequantizes blockwise, then adds the offset).
    pub fn absmax(&self, block: usize) -> f32 {
        decode_one(
            self.codes[block],
            self.nested_absmax[block / NESTED_BLOCK_ELEMS],
            self.offset,
        )
    }

    /// All absmax values, decoded.
    pub fn decode(&self) -> Vec<f32> {
        decode(&self.codes, &self.nested_absmax, self.offset)
    }
}

#[inline(always)]
fn decode_one(code: u8, nested_absmax: f32, offset: f32) -> f32 {
    dynamic_map()[code as usize] * nested_absmax + offset
}

/// Decodes double-quantized absmax from borrowed parts (see [`NestedAbsmax::absmax`]).
pub fn decode(codes: &[u8], nested_absmax: &[f32], offset: f32) -> Vec<f32> {
    codes
        .iter()
        .enumerate()
        .map(|(b, &c)| decode_one(c, nested_absmax[b / NESTED_BLOCK_ELEMS], offset))
        .collect()
}

/// Double-quantizes `absmax` as bitsandbytes does on `backend`: `offset = absmax.mean()` (torch's
/// CPU summation order, [`torch_mean_f32`]), then [`double_quant_with_offset`].
pub fn double_quant(absmax: &[f32], backend: BnbBackend) -> NestedAbsmax {
    double_quant_with_offset(absmax, torch_mean_f32(absmax), backend)
}

/// Double quantization around a given offset: `quantize_blockwise(absmax − offset, blocksize=256)`
/// on the signed dynamic map, each value `(absmax − offset) · (1 / nested_absmax)` rounded by
/// `backend`'s rule ([`crate::backend::code8`]). On a GPU torch computes the mean with its CUDA
/// reduction, whose summation order differs from the CPU's, so comparing with a GPU's bytes starts
/// from the offset bitsandbytes stored.
pub fn double_quant_with_offset(absmax: &[f32], offset: f32, backend: BnbBackend) -> NestedAbsmax {
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let (codes, nested_absmax) = quantize_blockwise_8bit(&centred, NESTED_BLOCK_ELEMS, backend);
    NestedAbsmax {
        codes,
        nested_absmax,
        offset,
    }
}

/// `torch.Tensor.mean()` of a contiguous f32 vector on the CPU: torch's cascade sum
/// (`aten/src/ATen/native/cpu/SumKernel.cpp`: `vectorized_inner_sum` over 8-lane vectors with 4-way
/// ILP and 4 accumulation levels, or `scalar_inner_sum` below 8 values), then one f32 division by
/// the count. 8 lanes is what torch 2.15's f32 sum uses on x86, measured bit-exact against it on an
/// AVX-512 machine over sizes 3..20000 (tests/fixtures/gen_bnb_goldens.py's offsets pin it).
///
/// Exact for up to 32768 values (one torch reduction task, `GRAIN_SIZE`); beyond that torch splits
/// the sum across threads and its own result depends on the thread count. The offset is stored in
/// the checkpoint, so dequantization never depends on this.
pub fn torch_mean_f32(x: &[f32]) -> f32 {
    if x.is_empty() {
        return f32::NAN;
    }
    torch_sum_f32(x) / x.len() as f32
}

const LANES: usize = 8;
const ILP: usize = 4;
const LEVELS: usize = 4;

fn add<const L: usize>(acc: &mut [f32; L], v: &[f32; L]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a += b;
    }
}

fn torch_sum_f32(x: &[f32]) -> f32 {
    if x.len() < LANES {
        let scalars: Vec<[f32; 1]> = x.iter().map(|&v| [v]).collect();
        return row_sum(&scalars)[0];
    }
    let vecs: Vec<[f32; LANES]> = x
        .chunks_exact(LANES)
        .map(|c| c.try_into().expect("chunk of LANES"))
        .collect();
    let lanes = row_sum(&vecs);
    let mut total = 0f32;
    for &v in &x[vecs.len() * LANES..] {
        total += v;
    }
    for lane in lanes {
        total += lane;
    }
    total
}

/// torch's `row_sum`: the items viewed as rows of `ILP`, summed by [`multi_row_sum`], then the
/// leftover items and the `ILP` partial sums folded into the first.
fn row_sum<const L: usize>(items: &[[f32; L]]) -> [f32; L] {
    let rows = items.len() / ILP;
    let mut partial = multi_row_sum(&items[..rows * ILP], rows);
    for v in &items[rows * ILP..] {
        add(&mut partial[0], v);
    }
    for k in 1..ILP {
        let p = partial[k];
        add(&mut partial[0], &p);
    }
    partial[0]
}

/// torch's `multi_row_sum` with `nrows = ILP`: a running sum per level, flushed up a level every
/// `2^level_power` rows, so that only partial sums of similar magnitude meet.
fn multi_row_sum<const L: usize>(items: &[[f32; L]], rows: usize) -> [[f32; L]; ILP] {
    let ceil_log2 = if rows <= 2 {
        1
    } else {
        (usize::BITS - (rows - 1).leading_zeros()) as usize
    };
    let level_power = (ceil_log2 / LEVELS).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; L]; ILP]; LEVELS];
    let mut i = 0;
    let add_row = |acc: &mut [[f32; L]; ILP], row: usize| {
        for (a, item) in acc.iter_mut().zip(&items[row * ILP..(row + 1) * ILP]) {
            add(a, item);
        }
    };
    while i + level_step <= rows {
        for _ in 0..level_step {
            add_row(&mut acc[0], i);
            i += 1;
        }
        for j in 1..LEVELS {
            let lower = std::mem::replace(&mut acc[j - 1], [[0f32; L]; ILP]);
            for (a, l) in acc[j].iter_mut().zip(&lower) {
                add(a, l);
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    for row in i..rows {
        add_row(&mut acc[0], row);
    }
    let [mut total, upper @ ..] = acc;
    for level in upper {
        for (a, u) in total.iter_mut().zip(&level) {
            add(a, u);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every entry of the map, as an absmax value, gets its own code back on CUDA (the search finds
    /// the nearest entry); on the CPU the table cannot reach codes 124..=130 (closer than its grid
    /// step), so those map elsewhere; both decode every block within one step of the map.
    #[test]
    fn map_entries_round_trip_on_cuda() {
        let map = dynamic_map();
        let cuda = double_quant_with_offset(map, 0.0, BnbBackend::Cuda);
        assert_eq!(cuda.nested_absmax, vec![1.0]);
        let want: Vec<u8> = (0..=255).collect();
        assert_eq!(cuda.codes, want);
        let cpu = double_quant_with_offset(map, 0.0, BnbBackend::Cpu);
        assert!(cpu.codes.iter().all(|c| !(124..=130).contains(c)));
        assert_eq!(cpu.codes[127], 131, "0.0 goes to code 131 on the CPU");
    }

    /// A 256-block whose values all equal the offset: scale 0, codes 0 on both backends, decoding
    /// to the offset.
    #[test]
    fn constant_block_has_zero_scale() {
        for backend in [BnbBackend::Cuda, BnbBackend::Cpu] {
            let n = double_quant(&[3.0; 300], backend);
            assert_eq!(n.offset, 3.0);
            assert_eq!(n.nested_absmax, vec![0.0, 0.0]);
            assert!(n.codes.iter().all(|&c| c == 0));
            assert!(n.decode().iter().all(|&a| a == 3.0));
        }
    }

    #[test]
    fn torch_sum_order_shows_on_cancelling_values() {
        // Sequential summation of [1e8, 1, 1, -1e8, 1] loses the first two ones and gives 1; torch's
        // 4-way ILP sums (x0 + x4) + x1 + x2 + x3, losing all three: 0.
        assert_eq!(torch_sum_f32(&[1e8, 1.0, 1.0, -1e8, 1.0]), 0.0);
        assert_eq!(torch_mean_f32(&[1.0, 2.0, 3.0, 4.0]), 2.5);
        let x: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        assert_eq!(torch_mean_f32(&x), 499.5);
    }
}
