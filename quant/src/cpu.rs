//! 4-bit block quantization on the CPU: scalar `_ref` references that follow bitsandbytes 0.50.2's
//! `quantize_4bit` (either backend's arithmetic, [`BnbBackend`]) / `dequantize_4bit` step by step, and the fast paths (rayon across blocks,
//! branch-free bucket counting, a byte → pair lookup table) that tests pin bit-identical to them.
//!
//! Units: `n_elems` counts 4-bit values, packed buffers hold `packed_len(n_elems)` bytes, and
//! `absmax` holds one f32 per block of `Blocksize::elems()` consecutive elements of the row-major
//! flattened tensor (a trailing partial block has its own absmax).

use crate::QuantError;
use crate::backend::{BnbBackend, code4_cuda};
use crate::format::{
    ABSMAX_FLOOR, Blocksize, QuantType, n_blocks, pack_pair, packed_len, unpack_pair,
};
use half::{bf16, f16};
use rayon::prelude::*;

/// An output element type of dequantization: the f32 product `code × absmax`, rounded to nearest
/// even; `to_f32` widens exactly.
pub trait DequantOut: Copy + Send + Sync + Default + 'static {
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;

    /// `Some` for `f32` (which has vector loops), `None` otherwise.
    #[inline(always)]
    fn as_f32_mut(_out: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    /// `Some` for `f32`, `None` otherwise.
    #[inline(always)]
    fn as_f32(_v: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl DequantOut for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn as_f32_mut(out: &mut [f32]) -> Option<&mut [f32]> {
        Some(out)
    }
    #[inline(always)]
    fn as_f32(v: &[f32]) -> Option<&[f32]> {
        Some(v)
    }
}

/// The vector loop of [`dequantize_slice`] for `f32` output.
#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{Blocksize, QuantType, pair_lut};
    use std::arch::x86_64::*;

    /// [`super::dequantize_slice`] into f32, 16 values at a time: the 16-entry code sits in one
    /// register and `vpermps` looks up 16 nibbles at once; the product with the block's absmax is
    /// the same single-rounded f32 multiply as the scalar loop, so the two are bit-identical.
    #[target_feature(enable = "avx512f")]
    pub(super) fn dequantize_slice_avx512(
        packed: &[u8],
        absmax: impl Fn(usize) -> f32,
        qt: QuantType,
        bs: Blocksize,
        first_elem: usize,
        out: &mut [f32],
    ) {
        let lut = pair_lut(qt);
        // SAFETY: 16 floats from a 16-float array.
        let table = unsafe { _mm512_loadu_ps(qt.code().as_ptr()) };
        let nibble = _mm_set1_epi16(0xF);
        super::for_each_block(packed, bs, first_elem, out, |block, bytes, now| {
            let scale = absmax(block);
            let s = _mm512_set1_ps(scale);
            let vec = now.len() / 16;
            assert!(bytes.len() >= 8 * vec && now.len() >= 16 * vec);
            for i in 0..vec {
                // SAFETY: bytes 8i..8i+8 and out 16i..16i+16 are in bounds (asserted above).
                unsafe {
                    let b = _mm_loadl_epi64(bytes.as_ptr().add(8 * i).cast());
                    // u16 lane k = byte k; its low byte becomes the high nibble (the even
                    // element), its high byte the low nibble (the odd one).
                    let w = _mm_cvtepu8_epi16(b);
                    let pairs = _mm_or_si128(
                        _mm_srli_epi16(w, 4),
                        _mm_slli_epi16(_mm_and_si128(w, nibble), 8),
                    );
                    let idx = _mm512_cvtepu8_epi32(pairs);
                    let v = _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), s);
                    _mm512_storeu_ps(now.as_mut_ptr().add(16 * i), v);
                }
            }
            for (j, o) in now.iter_mut().enumerate().skip(16 * vec) {
                let byte = bytes[j / 2] as usize;
                *o = lut[byte][j % 2] * scale;
            }
        });
    }
}

impl DequantOut for bf16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}
impl DequantOut for f16 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// Packed codes and per-block absmax of one tensor, before any double quantization.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized4 {
    /// `packed_len(n_elems)` bytes, element `2i` in the high nibble.
    pub packed: Vec<u8>,
    /// One f32 per block.
    pub absmax: Vec<f32>,
}

/// Bucket of a scaled value `s ∈ [-1, 1]`: the number of midpoints strictly below `s`, so ties go to
/// the lower code (torch.bucketize with `right=False`). Reference: an explicit scan.
fn bucket_ref(midpoints: &[f32; 15], s: f32) -> usize {
    let mut bucket = 0;
    while bucket < 15 && midpoints[bucket] < s {
        bucket += 1;
    }
    bucket
}

/// max |x| over a block, propagating NaN (as torch's `abs().max()`; `f32::max` would drop it).
fn abs_max(block: &[f32]) -> f32 {
    block.iter().fold(0f32, |m, v| {
        if v.is_nan() || v.abs() > m {
            v.abs()
        } else {
            m
        }
    })
}

/// [`bucket_ref`] by a 4-step branch-free binary search over the sorted midpoints: the number of
/// midpoints strictly below `s` (ties low), in 4 comparisons instead of 15.
#[inline(always)]
fn bucket_fast(midpoints: &[f32; 15], s: f32) -> usize {
    let mut idx = 0usize;
    for step in [8usize, 4, 2, 1] {
        // Midpoint `idx + step - 1` exists for every reachable idx (idx + step ≤ 15).
        idx += step * (midpoints[idx + step - 1] < s) as usize;
    }
    idx
}

fn check_finite(absmax: f32, block: usize) -> Result<(), QuantError> {
    if absmax.is_finite() {
        Ok(())
    } else {
        Err(QuantError::NonFinite { block })
    }
}

/// Reference 4-bit quantization, element by element as `backend` computes it.
///
/// - [`BnbBackend::Cpu`] (bitsandbytes' default backend): full blocks scale by
///   `x * (1 / max(absmax, 1e-38))` and store the raw absmax; the trailing partial block scales by
///   `x / max(absmax, 1e-38)` and stores the clamped absmax; `clamp(-1, 1)`; bucketize on the
///   midpoints; an odd count pads one value 0.0 (its code, not nibble 0).
/// - [`BnbBackend::Cuda`] (`kQuantizeBlockwise`): every block scales by `x * (1 / absmax)` and stores
///   the raw absmax; the comparison tree of [`code4_cuda`]; an all-zero block gives `0 · ∞ = NaN`,
///   code 0; the pad value 0.0 is scaled like its block's values.
pub fn quantize_ref(
    x: &[f32],
    qt: QuantType,
    bs: Blocksize,
    backend: BnbBackend,
) -> Result<Quantized4, QuantError> {
    let b = qt.buckets();
    let block_elems = bs.elems();
    let mut codes = Vec::with_capacity(x.len() + 1);
    let mut absmax = Vec::with_capacity(n_blocks(x.len(), block_elems));
    let mut pad_code = b.order[bucket_ref(&b.midpoints, 0.0)];
    for (block, chunk) in x.chunks(block_elems).enumerate() {
        let am = abs_max(chunk);
        check_finite(am, block)?;
        match backend {
            BnbBackend::Cpu => {
                let partial = chunk.len() < block_elems;
                let scale_by = am.max(ABSMAX_FLOOR);
                let recip = 1.0 / scale_by;
                for &v in chunk {
                    let s = if partial { v / scale_by } else { v * recip };
                    codes.push(b.order[bucket_ref(&b.midpoints, s.clamp(-1.0, 1.0))]);
                }
                absmax.push(if partial { scale_by } else { am });
            }
            BnbBackend::Cuda => {
                let recip = 1.0 / am;
                codes.extend(chunk.iter().map(|&v| code4_cuda(qt, v * recip)));
                pad_code = code4_cuda(qt, 0.0 * recip);
                absmax.push(am);
            }
        }
    }
    if codes.len() % 2 == 1 {
        codes.push(pad_code);
    }
    let packed = codes
        .chunks_exact(2)
        .map(|p| pack_pair(p[0], p[1]))
        .collect();
    Ok(Quantized4 { packed, absmax })
}

/// Reference dequantization: `code[q] * absmax[block]` in f32, then rounded to `T`.
pub fn dequantize_ref<T: DequantOut>(
    packed: &[u8],
    absmax: &[f32],
    qt: QuantType,
    bs: Blocksize,
    n_elems: usize,
) -> Vec<T> {
    let code = qt.code();
    (0..n_elems)
        .map(|i| {
            let (hi, lo) = unpack_pair(packed[i / 2]);
            let q = if i % 2 == 0 { hi } else { lo };
            T::from_f32(code[q as usize] * absmax[i / bs.elems()])
        })
        .collect()
}

/// Validates that buffers fit `n_elems` at this block size.
pub fn check_lengths(
    packed: &[u8],
    absmax_len: usize,
    bs: Blocksize,
    n_elems: usize,
) -> Result<(), QuantError> {
    let (want_packed, want_blocks) = (packed_len(n_elems), n_blocks(n_elems, bs.elems()));
    if packed.len() != want_packed || absmax_len != want_blocks {
        return Err(QuantError::Length {
            n_elems,
            packed: packed.len(),
            want_packed,
            absmax: absmax_len,
            want_absmax: want_blocks,
        });
    }
    Ok(())
}

/// Fast quantization: blocks in parallel, each bucket counted branch-free over the 15 midpoints
/// (CPU) or the 15 thresholds (CUDA). Bit-identical to [`quantize_ref`] for the same backend.
pub fn quantize(
    x: &[f32],
    qt: QuantType,
    bs: Blocksize,
    backend: BnbBackend,
) -> Result<Quantized4, QuantError> {
    let b = qt.buckets();
    let block_elems = bs.elems();
    let n = x.len();
    let mut packed = vec![0u8; packed_len(n)];
    let mut absmax = vec![0f32; n_blocks(n, block_elems)];
    x.par_chunks(block_elems)
        .zip(packed.par_chunks_mut(block_elems / 2))
        .zip(absmax.par_iter_mut())
        .enumerate()
        .try_for_each(|(block, ((chunk, out), am_out))| {
            let am = abs_max(chunk);
            check_finite(am, block)?;
            let partial = chunk.len() < block_elems;
            let (scale_by, stored) = match backend {
                BnbBackend::Cpu => {
                    let floored = am.max(ABSMAX_FLOOR);
                    (floored, if partial { floored } else { am })
                }
                BnbBackend::Cuda => (am, am),
            };
            let recip = 1.0 / scale_by;
            let code_of = |v: f32| -> u8 {
                match backend {
                    BnbBackend::Cpu => {
                        let s = if partial { v / scale_by } else { v * recip }.clamp(-1.0, 1.0);
                        b.order[bucket_fast(&b.midpoints, s)]
                    }
                    BnbBackend::Cuda => code4_cuda(qt, v * recip),
                }
            };
            let mut pairs = chunk.chunks_exact(2);
            for (o, p) in out.iter_mut().zip(&mut pairs) {
                *o = pack_pair(code_of(p[0]), code_of(p[1]));
            }
            if let [last] = pairs.remainder() {
                out[out.len() - 1] = pack_pair(code_of(*last), code_of(0.0));
            }
            *am_out = stored;
            Ok::<(), QuantError>(())
        })?;
    Ok(Quantized4 { packed, absmax })
}

/// `pair_lut(qt)[byte]` = the two code values of a packed byte, high nibble first.
pub fn pair_lut(qt: QuantType) -> &'static [[f32; 2]; 256] {
    use std::sync::OnceLock;
    static NF4: OnceLock<[[f32; 2]; 256]> = OnceLock::new();
    static FP4: OnceLock<[[f32; 2]; 256]> = OnceLock::new();
    let build = || {
        let code = qt.code();
        std::array::from_fn(|byte| {
            let (hi, lo) = unpack_pair(byte as u8);
            [code[hi as usize], code[lo as usize]]
        })
    };
    match qt {
        QuantType::Nf4 => NF4.get_or_init(build),
        QuantType::Fp4 => FP4.get_or_init(build),
    }
}

/// Dequantizes the elements `[first_elem, first_elem + out.len())` of a tensor into `out`.
/// `first_elem` must be even (a byte boundary). Serial: callers parallelize over slices.
pub fn dequantize_slice<T: DequantOut>(
    packed: &[u8],
    absmax: impl Fn(usize) -> f32,
    qt: QuantType,
    bs: Blocksize,
    first_elem: usize,
    out: &mut [T],
) {
    debug_assert!(first_elem.is_multiple_of(2));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && let Some(out) = T::as_f32_mut(out)
    {
        // SAFETY: the CPU has AVX-512F (checked above).
        return unsafe { simd::dequantize_slice_avx512(packed, absmax, qt, bs, first_elem, out) };
    }
    dequantize_slice_scalar(packed, absmax, qt, bs, first_elem, out);
}

/// Walks `out` (the elements `first_elem..` of a tensor, `first_elem` even) block by block:
/// `f(block, its packed bytes, its part of out)`.
#[inline(always)]
fn for_each_block<T>(
    packed: &[u8],
    bs: Blocksize,
    first_elem: usize,
    out: &mut [T],
    mut f: impl FnMut(usize, &[u8], &mut [T]),
) {
    let block_elems = bs.elems();
    let mut elem = first_elem;
    let mut rest = out;
    while !rest.is_empty() {
        let block = elem / block_elems;
        let take = ((block + 1) * block_elems - elem).min(rest.len());
        let (now, later) = std::mem::take(&mut rest).split_at_mut(take);
        f(block, &packed[elem / 2..(elem + take).div_ceil(2)], now);
        elem += take;
        rest = later;
    }
}

/// [`dequantize_slice`]'s portable loop (every output type; f32 on CPUs without AVX-512).
fn dequantize_slice_scalar<T: DequantOut>(
    packed: &[u8],
    absmax: impl Fn(usize) -> f32,
    qt: QuantType,
    bs: Blocksize,
    first_elem: usize,
    out: &mut [T],
) {
    let lut = pair_lut(qt);
    for_each_block(packed, bs, first_elem, out, |block, bytes, now| {
        let scale = absmax(block);
        let mut pairs = now.chunks_exact_mut(2);
        for (o, &byte) in (&mut pairs).zip(bytes) {
            let [a, b] = lut[byte as usize];
            o[0] = T::from_f32(a * scale);
            o[1] = T::from_f32(b * scale);
        }
        if let [o] = pairs.into_remainder() {
            *o = T::from_f32(lut[bytes[bytes.len() - 1] as usize][0] * scale);
        }
    });
}

/// Elements per parallel task of [`dequantize`]: large enough to amortize scheduling, a multiple
/// of every block size so each task starts on a block (and byte) boundary.
pub const DEQUANT_TASK_ELEMS: usize = 1 << 16;

/// Fast dequantization into `out` (`out.len() == n_elems`), parallel over 64 Ki-element slices.
/// Bit-identical to [`dequantize_ref`].
pub fn dequantize_into<T: DequantOut>(
    packed: &[u8],
    absmax: &[f32],
    qt: QuantType,
    bs: Blocksize,
    out: &mut [T],
) -> Result<(), QuantError> {
    check_lengths(packed, absmax.len(), bs, out.len())?;
    out.par_chunks_mut(DEQUANT_TASK_ELEMS)
        .enumerate()
        .for_each(|(task, chunk)| {
            dequantize_slice(
                packed,
                |b| absmax[b],
                qt,
                bs,
                task * DEQUANT_TASK_ELEMS,
                chunk,
            )
        });
    Ok(())
}

/// [`dequantize_into`] into a new vector.
pub fn dequantize<T: DequantOut>(
    packed: &[u8],
    absmax: &[f32],
    qt: QuantType,
    bs: Blocksize,
    n_elems: usize,
) -> Result<Vec<T>, QuantError> {
    let mut out = vec![T::default(); n_elems];
    dequantize_into(packed, absmax, qt, bs, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_ties_go_low() {
        let b = QuantType::Nf4.buckets();
        for (i, &m) in b.midpoints.iter().enumerate() {
            assert_eq!(
                bucket_ref(&b.midpoints, m),
                i,
                "a value on midpoint {i} takes the lower code"
            );
            assert_eq!(bucket_ref(&b.midpoints, m.next_up()), i + 1);
        }
    }

    #[test]
    fn binary_search_bucket_equals_the_scan() {
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            let m = &qt.buckets().midpoints;
            let mut probes = vec![-1.0f32, 1.0, 0.0, -0.0];
            for &x in m {
                probes.extend([x, x.next_up(), x.next_down()]);
            }
            for i in 0..2001 {
                probes.push(i as f32 / 1000.0 - 1.0);
            }
            for s in probes {
                assert_eq!(bucket_fast(m, s), bucket_ref(m, s), "{qt} at {s}");
            }
        }
    }

    #[test]
    fn odd_count_pads_with_the_code_of_zero() {
        for backend in [BnbBackend::Cpu, BnbBackend::Cuda] {
            let q = quantize_ref(
                &[1.0, -1.0, 0.5],
                QuantType::Nf4,
                Blocksize::DEFAULT,
                backend,
            )
            .unwrap();
            assert_eq!(q.packed, vec![pack_pair(15, 0), pack_pair(12, 7)]);
            assert_eq!(q.absmax, vec![1.0]);
        }
    }

    /// An all-zero block: the code of 0.0 on the CPU; on CUDA `0 · (1/0)` is NaN and every code 0,
    /// the pad value included. Both decode to zeros.
    #[test]
    fn all_zero_block_codes_differ_by_backend() {
        let x = [0f32; 5];
        let bs = Blocksize::DEFAULT;
        for backend in [BnbBackend::Cpu, BnbBackend::Cuda] {
            let want = match backend {
                BnbBackend::Cpu => vec![0x77; 3],
                BnbBackend::Cuda => vec![0x00; 3],
            };
            for q in [
                quantize_ref(&x, QuantType::Nf4, bs, backend).unwrap(),
                quantize(&x, QuantType::Nf4, bs, backend).unwrap(),
            ] {
                assert_eq!(q.packed, want, "{backend}");
                let back: Vec<f32> =
                    dequantize(&q.packed, &q.absmax, QuantType::Nf4, bs, 5).unwrap();
                assert!(back.iter().all(|v| *v == 0.0), "{backend}: {back:?}");
            }
        }
    }

    /// Away from the all-zero blocks and the exact thresholds the backends agree on every value:
    /// NF4 codes equal; FP4 values equal (CUDA gives a small negative value FP4's -0 code, the CPU's
    /// bucketize may give it +0's).
    #[test]
    fn backends_agree_on_ordinary_values() {
        let mut state = 0x9e37_79b9_u32;
        let x: Vec<f32> = (0..64 * 37 + 21)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect();
        let bs = Blocksize::DEFAULT;
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            let cpu = quantize(&x, qt, bs, BnbBackend::Cpu).unwrap();
            let cuda = quantize(&x, qt, bs, BnbBackend::Cuda).unwrap();
            assert_eq!(cpu.absmax, cuda.absmax, "{qt}");
            if qt == QuantType::Nf4 {
                assert_eq!(cpu.packed, cuda.packed);
            }
            let a: Vec<f32> = dequantize(&cpu.packed, &cpu.absmax, qt, bs, x.len()).unwrap();
            let b: Vec<f32> = dequantize(&cuda.packed, &cuda.absmax, qt, bs, x.len()).unwrap();
            assert_eq!(a, b, "{qt}");
        }
    }

    #[test]
    fn non_finite_input_is_an_error() {
        let mut x = vec![0.5f32; 130];
        x[70] = f32::NAN;
        assert!(matches!(
            quantize(&x, QuantType::Nf4, Blocksize::DEFAULT, BnbBackend::Cuda),
            Err(QuantError::NonFinite { block: 1 })
        ));
        assert!(quantize_ref(&x, QuantType::Nf4, Blocksize::DEFAULT, BnbBackend::Cpu).is_err());
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod simd_tests {
    use super::*;

    /// The AVX-512 loop against the portable one, bit for bit, on slices that start and end
    /// inside blocks and vectors, for both codes and three block sizes (where the CPU has it).
    #[test]
    fn avx512_dequantization_is_bit_identical_to_the_portable_loop() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512 on this CPU: the portable loop is the only one");
            return;
        }
        let n = 4096 + 38;
        let packed: Vec<u8> = (0..packed_len(n))
            .map(|i| (i * 2_654_435_761) as u8)
            .collect();
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            for bs in [64, 128, 4096] {
                let bs = Blocksize::new(bs).unwrap();
                let absmax: Vec<f32> = (0..n_blocks(n, bs.elems()))
                    .map(|b| 0.37 + b as f32 * 1.3)
                    .collect();
                for (first, len) in [(0, n), (2, n - 2), (40, 1000), (64, 17), (6, 3), (0, 0)] {
                    let mut want = vec![0f32; len];
                    let mut got = vec![f32::NAN; len];
                    dequantize_slice_scalar(&packed, |b| absmax[b], qt, bs, first, &mut want);
                    // SAFETY: AVX-512F is present (checked above).
                    unsafe {
                        simd::dequantize_slice_avx512(
                            &packed,
                            |b| absmax[b],
                            qt,
                            bs,
                            first,
                            &mut got,
                        )
                    };
                    let same = want
                        .iter()
                        .zip(&got)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{qt:?} blocksize {bs:?} elements {first}..+{len}");
                }
            }
        }
    }
}
