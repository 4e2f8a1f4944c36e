//! Which bitsandbytes backend's rounding a quantization reproduces.
//!
//! bitsandbytes quantizes the same tensor to slightly different bytes depending on where it runs.
//! Both backends pick the nearest code for almost every value; they differ on the edges:
//!
//! | | CUDA (`csrc/kernels.cu`, built with `--use_fast_math`) | CPU (0.50: `backends/default` for 4-bit, `csrc/cpu_ops.cpp` for 8-bit) |
//! |---|---|---|
//! | 4-bit scale | `x · (1/absmax)` in every block | `x · (1/absmax)`, but `x / absmax` in the trailing partial block, absmax floored at 1e-38 there |
//! | 4-bit rounding | a comparison tree on literal thresholds, ties low (FP4: ties toward zero) | `bucketize` on the f32 midpoints, ties low |
//! | all-zero 4-bit block | `0 · ∞ = NaN`: every code 0 | the code of 0.0 |
//! | 8-bit rounding (double quant) | `dQuantize<0>`: 7-step binary search, then a midpoint test: the nearest code | a 65,536-entry lookup table over a grid of [-1, 1]: codes closer than the grid step are unreachable, 0.0 → code 131 |
//!
//! [`BnbBackend::Cuda`] is the default: QLoRA checkpoints are mostly quantized on a GPU. The CUDA
//! kernels compute `1/absmax` with the GPU's approximate reciprocal (fast math); we use the IEEE
//! quotient, which agrees except within an ulp of the rounding edges: `scripts/gpu_check.sh`
//! compares against bitsandbytes on a real GPU. [`BnbBackend::Cpu`] reproduces bitsandbytes 0.50's
//! CPU arithmetic bit for bit (tests/fixtures/gen_bnb_goldens.py).

use crate::format::{QuantType, dynamic_map, n_blocks};
use rayon::prelude::*;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// The bitsandbytes backend whose bytes a quantization reproduces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum BnbBackend {
    /// bitsandbytes' CUDA kernels: what a GPU QLoRA user's checkpoint holds.
    #[default]
    Cuda,
    /// bitsandbytes 0.50's CPU backend, bit for bit.
    Cpu,
}

impl BnbBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cuda => "cuda",
            Self::Cpu => "cpu",
        }
    }
}

impl fmt::Display for BnbBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BnbBackend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cuda" => Ok(Self::Cuda),
            "cpu" => Ok(Self::Cpu),
            other => Err(format!(
                "unknown bitsandbytes backend `{other}`: use `cuda` (a GPU's bytes) or `cpu`"
            )),
        }
    }
}

/// `dQuantizeNF4`'s thresholds, ascending: the decimal literals of its comparison tree, which the
/// compiler rounds to f32 as CUDA's does.
#[allow(clippy::excessive_precision)]
const NF4_CUDA_THRESHOLDS: [f32; 15] = [
    -0.8480964004993439,
    -0.6106329262256622,
    -0.4599952697753906,
    -0.33967943489551544,
    -0.23460740596055984,
    -0.13791173323988914,
    -0.045525018125772476,
    0.03979014977812767,
    0.1202552504837513,
    0.2035212516784668,
    0.2920137718319893,
    0.3893125355243683,
    0.5016634166240692,
    0.6427869200706482,
    0.8614784181118011,
];

/// `dQuantizeFP4`'s magnitude thresholds, ascending, and the 3-bit magnitude code of each bucket.
#[allow(clippy::excessive_precision)]
const FP4_CUDA_THRESHOLDS: [f32; 7] = [
    0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333,
];
const FP4_CUDA_MAGNITUDE: [u8; 8] = [0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011];

/// Number of `thresholds` strictly below `x` (the comparison tree's `x > t` at every node; NaN
/// compares false everywhere and lands in bucket 0).
#[inline(always)]
fn count_below(thresholds: &[f32], x: f32) -> usize {
    thresholds.iter().map(|&t| (x > t) as usize).sum()
}

/// The 4-bit code bitsandbytes' CUDA kernel gives the scaled value `x` (`dQuantizeNF4` /
/// `dQuantizeFP4`); no clamping, NaN → 0.
#[inline(always)]
pub fn code4_cuda(qt: QuantType, x: f32) -> u8 {
    match qt {
        QuantType::Nf4 => count_below(&NF4_CUDA_THRESHOLDS, x) as u8,
        QuantType::Fp4 => {
            let sign = if x < 0.0 { 0b1000 } else { 0 };
            sign | FP4_CUDA_MAGNITUDE[count_below(&FP4_CUDA_THRESHOLDS, x.abs())]
        }
    }
}

/// The lookup table bitsandbytes 0.50's CPU 8-bit quantizer builds for a 256-entry code
/// (`build_quantize_lut`): entry `i` is the number of midpoints `0.5·(c[k] + c[k+1])` strictly
/// below the grid point `-1 + 2i/65535`, all in f32. Built for any sorted map (the 8-bit optimizers
/// quantize their second moment over the unsigned map with the same table construction).
pub fn build_cpu_lut(code: &[f32; 256]) -> Box<[u8; 65536]> {
    let mids: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    let mut lut = Box::new([0u8; 65536]);
    let mut k = 0usize;
    for (i, out) in lut.iter_mut().enumerate() {
        let grid = -1.0f32 + (2.0f32 * i as f32) / 65535.0f32;
        while k < mids.len() && mids[k] < grid {
            k += 1;
        }
        *out = k as u8;
    }
    lut
}

fn cpu_lut() -> &'static [u8; 65536] {
    static LUT: OnceLock<Box<[u8; 65536]>> = OnceLock::new();
    LUT.get_or_init(|| build_cpu_lut(dynamic_map()))
}

/// The grid index bitsandbytes' CPU quantizer gives a normalised value (`norm_to_lut_index`):
/// clamp to [-1, 1], `(v + 1)·0.5·65535 + 0.5` with the last multiply-add fused (gcc contracts it:
/// the file is compiled for `avx2,fma`), truncated.
#[inline(always)]
fn cpu_lut_index(v: f32) -> usize {
    let t = (v.clamp(-1.0, 1.0) + 1.0) * 0.5;
    t.mul_add(65535.0, 0.5) as u16 as usize
}

/// The code bitsandbytes' CPU quantizer gives `v` (already multiplied by `1/absmax`) from `lut`,
/// the [`build_cpu_lut`] table of its map.
#[inline(always)]
pub fn code8_cpu(lut: &[u8; 65536], v: f32) -> u8 {
    lut[cpu_lut_index(v)]
}

/// bitsandbytes' CUDA `dQuantize<0>` over the dynamic map: a 7-step binary search from entry 127,
/// then the value goes to the neighbour on its side when it lies beyond the midpoint with the last
/// pivot passed on that side (`(a + b)·0.5` in f32). The 8-bit optimizers' `quantize_2D<SIGNED>`
/// (`kOptimizerStatic8bit2StateBlockwise`) is the same search over `code` (its first pivots read
/// from a copy of entries 63/127/191, its outer bounds ±1 or 0 and 1, which equal the map's ends
/// where they matter), so this serves both the signed and the unsigned map.
///
/// Written with selects instead of branches (the search's direction is a coin flip per value, so
/// branches mispredict): the same pivots, and `lower`/`upper` are always `code[lower_pivot]` /
/// `code[upper_pivot]` once the kernel's ±1 start values are replaced by the map's ends, as it
/// does. `tests::code8_cuda_branchy` transcribes the kernel's branches; a test holds them equal.
#[inline]
pub fn code8_cuda(code: &[f32; 256], x: f32) -> u8 {
    let (mut pivot, mut upper_pivot, mut lower_pivot) = (127usize, 255usize, 0usize);
    for step in [64, 32, 16, 8, 4, 2, 1] {
        let gt = x > code[pivot];
        lower_pivot = if gt { pivot } else { lower_pivot };
        upper_pivot = if gt { upper_pivot } else { pivot };
        pivot = if gt { pivot + step } else { pivot - step };
    }
    let val = code[pivot];
    let above = x > (code[upper_pivot] + val) * 0.5;
    let below = x < (code[lower_pivot] + val) * 0.5;
    let chosen = if x > val {
        if above { upper_pivot } else { pivot }
    } else if below {
        lower_pivot
    } else {
        pivot
    };
    chosen as u8
}

/// The 8-bit code of `v`, already multiplied by `1/absmax`, as `backend` picks it on the dynamic map.
#[inline(always)]
pub fn code8(backend: BnbBackend, v: f32) -> u8 {
    match backend {
        BnbBackend::Cuda => code8_cuda(dynamic_map(), v),
        BnbBackend::Cpu => code8_cpu(cpu_lut(), v),
    }
}

/// bitsandbytes' `quantize_blockwise(x, blocksize)` with the signed dynamic map, as `backend`
/// computes it: per block `absmax = max |x|`, each value scaled by `1/absmax` (f32) and rounded to
/// an 8-bit code. An all-zero block: codes 0 on both backends (the CPU writes 0; on CUDA `0·∞` is
/// NaN, which the search sends to 0). Returns `(codes, absmax)`. Blocks run in parallel.
pub fn quantize_blockwise_8bit(
    x: &[f32],
    blocksize: usize,
    backend: BnbBackend,
) -> (Vec<u8>, Vec<f32>) {
    assert!(blocksize > 0, "blocksize must be positive");
    let mut codes = vec![0u8; x.len()];
    let mut absmax = vec![0f32; n_blocks(x.len(), blocksize)];
    x.par_chunks(blocksize)
        .zip(codes.par_chunks_mut(blocksize))
        .zip(absmax.par_iter_mut())
        .for_each(|((chunk, out), am)| {
            *am = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            if backend == BnbBackend::Cpu && *am == 0.0 {
                out.fill(0);
                return;
            }
            let recip = 1.0 / *am;
            for (o, &v) in out.iter_mut().zip(chunk) {
                *o = code8(backend, v * recip);
            }
        });
    (codes, absmax)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::QuantType;

    /// `dQuantizeNF4`'s tree, transcribed branch by branch.
    #[allow(clippy::excessive_precision)]
    fn nf4_tree(x: f32) -> u8 {
        if x > 0.03979014977812767 {
            if x > 0.3893125355243683 {
                if x > 0.6427869200706482 {
                    if x > 0.8614784181118011 { 15 } else { 14 }
                } else if x > 0.5016634166240692 {
                    13
                } else {
                    12
                }
            } else if x > 0.2035212516784668 {
                if x > 0.2920137718319893 { 11 } else { 10 }
            } else if x > 0.1202552504837513 {
                9
            } else {
                8
            }
        } else if x > -0.33967943489551544 {
            if x > -0.13791173323988914 {
                if x > -0.045525018125772476 { 7 } else { 6 }
            } else if x > -0.23460740596055984 {
                5
            } else {
                4
            }
        } else if x > -0.6106329262256622 {
            if x > -0.4599952697753906 { 3 } else { 2 }
        } else if x > -0.8480964004993439 {
            1
        } else {
            0
        }
    }

    /// `dQuantizeFP4`'s tree, transcribed branch by branch.
    #[allow(clippy::excessive_precision)]
    fn fp4_tree(x: f32) -> u8 {
        let sign = if x < 0.0 { 0b1000 } else { 0 };
        let x = x.abs();
        sign + if x > 0.29166667 {
            if x > 0.583333 {
                if x > 0.8333333 { 0b0011 } else { 0b0010 }
            } else if x > 0.4166667 {
                0b101
            } else {
                0b100
            }
        } else if x > 0.0859375 {
            if x > 0.20833333 { 0b0111 } else { 0b0110 }
        } else if x > 0.00260417 {
            0b0001
        } else {
            0b0000
        }
    }

    /// Values around every threshold (±3 ulps), zeros of both signs, NaN, ±∞ and a sweep.
    fn probes(thresholds: &[f32]) -> Vec<f32> {
        let mut v = vec![
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1.0,
            -1.0,
        ];
        for &t in thresholds {
            for t in [t, -t] {
                for d in -3i32..=3 {
                    v.push(f32::from_bits((t.to_bits() as i32 + d) as u32));
                }
            }
        }
        v.extend((-2000..=2000).map(|i| i as f32 / 1000.0));
        v
    }

    /// `dQuantize<0>` / `quantize_2D`, transcribed branch by branch.
    pub(super) fn code8_cuda_branchy(code: &[f32; 256], x: f32) -> u8 {
        let (mut pivot, mut upper_pivot, mut lower_pivot) = (127usize, 255usize, 0usize);
        let (mut lower, mut upper) = (-1.0f32, 1.0f32);
        let mut val = code[pivot];
        let mut step = 64;
        while step > 0 {
            if x > val {
                lower_pivot = pivot;
                lower = val;
                pivot += step;
            } else {
                upper_pivot = pivot;
                upper = val;
                pivot -= step;
            }
            val = code[pivot];
            step >>= 1;
        }
        if upper_pivot == 255 {
            upper = code[255];
        }
        if lower_pivot == 0 {
            lower = code[0];
        }
        let chosen = if x > val {
            if x > (upper + val) * 0.5 {
                upper_pivot
            } else {
                pivot
            }
        } else if x < (lower + val) * 0.5 {
            lower_pivot
        } else {
            pivot
        };
        chosen as u8
    }

    /// Every entry, every midpoint ±3 ulps, both ends, zeros, NaN, ±∞ and a fine sweep, on the
    /// signed and the unsigned map.
    #[test]
    fn select_search_equals_the_branchy_transcription() {
        for map in [dynamic_map(), crate::format::dynamic_map_unsigned()] {
            let mut xs: Vec<f32> = (-200_000..=200_000).map(|i| i as f32 / 200_000.0).collect();
            xs.extend([
                0.0,
                -0.0,
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                1.5,
                -1.5,
            ]);
            for w in map.windows(2) {
                for m in [w[0], 0.5 * (w[0] + w[1])] {
                    for d in -3i32..=3 {
                        xs.push(f32::from_bits((m.to_bits() as i32 + d) as u32));
                    }
                }
            }
            for x in xs {
                assert_eq!(code8_cuda(map, x), code8_cuda_branchy(map, x), "{x:e}");
            }
        }
    }

    #[test]
    fn counting_equals_the_cuda_trees() {
        for x in probes(&NF4_CUDA_THRESHOLDS) {
            assert_eq!(code4_cuda(QuantType::Nf4, x), nf4_tree(x), "nf4 {x:e}");
        }
        for x in probes(&FP4_CUDA_THRESHOLDS) {
            assert_eq!(code4_cuda(QuantType::Fp4, x), fp4_tree(x), "fp4 {x:e}");
        }
    }

    /// The CUDA NF4 literals are the f32 midpoints between the NF4 values, so away from a
    /// threshold the tree and bucketize agree; the FP4 ones are the magnitude midpoints.
    #[test]
    fn cuda_thresholds_are_the_code_midpoints() {
        let nf4 = QuantType::Nf4.buckets();
        for (t, m) in NF4_CUDA_THRESHOLDS.iter().zip(&nf4.midpoints) {
            assert!((t - m).abs() <= 2.0 * f32::EPSILON * m.abs(), "{t} vs {m}");
        }
        let fp4 = QuantType::Fp4.code();
        for (k, t) in FP4_CUDA_THRESHOLDS.iter().enumerate() {
            let (a, b) = (
                fp4[FP4_CUDA_MAGNITUDE[k] as usize],
                fp4[FP4_CUDA_MAGNITUDE[k + 1] as usize],
            );
            let m = (a + b) / 2.0;
            assert!((t - m).abs() <= 2e-6, "fp4 threshold {k}: {t} vs {m}");
        }
    }

    /// Every finite value gets the nearest entry of the dynamic map from the CUDA search (ties, up to
    /// the f32 rounding of its midpoints, may go either way: check the distance, not the index).
    #[test]
    fn cuda_search_finds_the_nearest_code() {
        let map = dynamic_map();
        let mut xs: Vec<f32> = (-20000..=20000).map(|i| i as f32 / 20000.0).collect();
        for w in map.windows(2) {
            let m = 0.5 * (w[0] + w[1]);
            for d in -2i32..=2 {
                xs.push(f32::from_bits((m.to_bits() as i32 + d) as u32));
            }
        }
        xs.extend(map.iter().copied());
        for x in xs {
            let got = code8_cuda(map, x) as usize;
            let best = map
                .iter()
                .map(|&c| (x - c).abs())
                .fold(f32::INFINITY, f32::min);
            // A value within a few ulps of a midpoint is a tie up to rounding: either side is right.
            let slack = 4.0 * f32::EPSILON * (x.abs() + map[got].abs());
            assert!(
                (x - map[got]).abs() <= best + slack,
                "x {x:e}: code {got} ({}) is not nearest ({best:e})",
                map[got]
            );
        }
        assert_eq!(code8_cuda(map, 0.0), 127);
        assert_eq!(code8_cuda(map, f32::NAN), 0);
    }

    /// The CPU table as the issue states it: 0.0 → 131 and codes 124..=130 unreachable, every
    /// entry the count of midpoints below its grid point (checked by a direct count), monotone.
    #[test]
    fn cpu_lut_counts_midpoints_below_the_grid() {
        let map = dynamic_map();
        let lut = cpu_lut();
        let mids: Vec<f32> = map.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        for i in (0..65536).step_by(7).chain([0, 32767, 32768, 65535]) {
            let grid = -1.0f32 + (2.0f32 * i as f32) / 65535.0f32;
            let want = mids.iter().filter(|&&m| m < grid).count();
            assert_eq!(lut[i] as usize, want, "entry {i}");
        }
        assert!(lut.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(code8(BnbBackend::Cpu, 0.0), 131);
        for c in 124..=130u8 {
            assert!(!lut.contains(&c), "code {c} is reachable");
        }
        assert_eq!(code8(BnbBackend::Cpu, 1.0), 255);
        assert_eq!(code8(BnbBackend::Cpu, -1.0), 0);
    }

    #[test]
    fn backend_names_round_trip() {
        for b in [BnbBackend::Cuda, BnbBackend::Cpu] {
            assert_eq!(b.as_str().parse::<BnbBackend>().unwrap(), b);
        }
        assert!("gpu".parse::<BnbBackend>().unwrap_err().contains("cuda"));
        assert_eq!(BnbBackend::default(), BnbBackend::Cuda);
    }
}
