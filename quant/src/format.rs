//! Every fact about the 4-bit formats, defined once: the NF4 and FP4 code tables, their rounding
//! midpoints, the nibble order, the valid block sizes and the 8-bit dynamic map used for double
//! quantization. Sources: bitsandbytes 0.50.2 `functional.py` (`get_4bit_type`,
//! `create_dynamic_map`) and `backends/default/ops.py` (`quantize_4bit`); each is pinned by a test
//! against a value bitsandbytes produced (tests/fixtures/gen_bnb_goldens.py).

use crate::QuantError;
use std::sync::OnceLock;

/// The two 4-bit data types bitsandbytes offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantType {
    /// NormalFloat4: quantiles of N(0, 1), index order = value order.
    Nf4,
    /// 1 sign, 2 exponent, 1 mantissa bit; index order is the bit pattern, not the value order.
    Fp4,
}

impl QuantType {
    /// The name bitsandbytes uses (`"nf4"`, `"fp4"`), also the suffix of `quant_state.bitsandbytes__*`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nf4 => "nf4",
            Self::Fp4 => "fp4",
        }
    }

    /// The 16 dequantization values, indexed by 4-bit code.
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            Self::Nf4 => &NF4_CODE,
            Self::Fp4 => fp4_code(),
        }
    }

    /// The `quant_map` tensor bitsandbytes stores in checkpoints: [`Self::code`] with FP4's -0.0 as
    /// +0.0 (its Python table). Loaders compare with IEEE equality, so either sign reads back.
    pub fn stored_quant_map(self) -> [f32; 16] {
        self.code().map(|v| if v == 0.0 { 0.0 } else { v })
    }

    /// Rounding tables: midpoints between the sorted code values and the code of each bucket.
    pub fn buckets(self) -> &'static Buckets {
        static NF4: OnceLock<Buckets> = OnceLock::new();
        static FP4: OnceLock<Buckets> = OnceLock::new();
        match self {
            Self::Nf4 => NF4.get_or_init(|| Buckets::new(&NF4_CODE)),
            Self::Fp4 => FP4.get_or_init(|| Buckets::new(fp4_code())),
        }
    }
}

impl std::str::FromStr for QuantType {
    type Err = QuantError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "nf4" => Ok(Self::Nf4),
            "fp4" => Ok(Self::Fp4),
            other => Err(QuantError::UnknownQuantType(other.to_string())),
        }
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// NF4 code table (`get_4bit_type("nf4")`, `create_normal_map(offset=0.9677083)` normalised to
/// max |·| = 1): bitsandbytes' literals verbatim (Python doubles), rounded to f32 by the compiler as
/// `torch.tensor(..., dtype=float32)` rounds them. Comment per entry: the 4-bit code.
#[allow(clippy::excessive_precision, reason = "bitsandbytes' literals, kept verbatim")]
#[rustfmt::skip]
pub const NF4_CODE: [f32; 16] = [
    -1.0, // 0b0000
    -0.6961928009986877, // 0b0001
    -0.5250730514526367, // 0b0010
    -0.39491748809814453, // 0b0011
    -0.28444138169288635, // 0b0100
    -0.18477343022823334, // 0b0101
    -0.09105003625154495, // 0b0110
    0.0, // 0b0111
    0.07958029955625534, // 0b1000
    0.16093020141124725, // 0b1001
    0.24611230194568634, // 0b1010
    0.33791524171829224, // 0b1011
    0.44070982933044434, // 0b1100
    0.5626170039176941, // 0b1101
    0.7229568362236023, // 0b1110
    1.0, // 0b1111
];

/// FP4 values in bit-pattern order before normalisation (`get_4bit_type("fp4")`): sign bit 3, then
/// 2 exponent bits (bias 2) and 1 mantissa bit; `0b001` is the subnormal 0.0625. Code `0b1000` is
/// -0.0: bitsandbytes' CUDA and native CPU dequantizers decode the sign bit, so it dequantizes to
/// -0.0 (its Python table writes `-0`, an integer, i.e. +0.0: see [`QuantType::stored_quant_map`]).
const FP4_RAW: [f32; 16] = [
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
];

/// FP4 code table: `FP4_RAW / max|FP4_RAW|` in f32, exactly as bitsandbytes' `data.div_(max)`.
pub fn fp4_code() -> &'static [f32; 16] {
    static CODE: OnceLock<[f32; 16]> = OnceLock::new();
    CODE.get_or_init(|| {
        let max = FP4_RAW.iter().fold(0f32, |m, v| m.max(v.abs()));
        FP4_RAW.map(|v| v / max)
    })
}

/// Nearest-code rounding as bitsandbytes' `torch.bucketize(scaled, midpoints)` does it: the bucket of
/// `s` is the number of midpoints strictly below `s`, so a value exactly on a midpoint goes to the
/// LOWER code; the bucket is mapped back to a code by the stable argsort of the table.
#[derive(Debug, Clone)]
pub struct Buckets {
    /// `(sorted[i] + sorted[i + 1]) / 2` in f32, ascending.
    pub midpoints: [f32; 15],
    /// `order[bucket]` = the 4-bit code of the `bucket`-th smallest value (stable argsort).
    pub order: [u8; 16],
}

impl Buckets {
    fn new(code: &[f32; 16]) -> Self {
        let mut order: [u8; 16] = std::array::from_fn(|i| i as u8);
        // Stable: +0.0 (code 0) sorts before -0.0 (code 8) in FP4, as torch.argsort does.
        order.sort_by(|&a, &b| cmp_finite(code[a as usize], code[b as usize]));
        let midpoints =
            std::array::from_fn(|i| (code[order[i] as usize] + code[order[i + 1] as usize]) / 2.0);
        Self { midpoints, order }
    }
}

/// IEEE order (`-0.0 == +0.0`, as torch's sort sees it) for the finite values of a code table.
fn cmp_finite(a: f32, b: f32) -> std::cmp::Ordering {
    a.partial_cmp(&b).expect("code tables hold no NaN")
}

/// Elements per block: a power of two from 32 to 4096 (bitsandbytes' `quantize_4bit` check).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Blocksize(u32);

impl Blocksize {
    /// bitsandbytes' and transformers' default.
    pub const DEFAULT: Self = Self(64);
    /// The smallest and largest block sizes bitsandbytes accepts.
    pub const MIN_ELEMS: usize = 32;
    pub const MAX_ELEMS: usize = 4096;

    /// Validates `block_elems` (a power of two in 32..=4096).
    pub fn new(block_elems: usize) -> Result<Self, QuantError> {
        if block_elems.is_power_of_two()
            && (Self::MIN_ELEMS..=Self::MAX_ELEMS).contains(&block_elems)
        {
            Ok(Self(block_elems as u32))
        } else {
            Err(QuantError::InvalidBlocksize(block_elems))
        }
    }

    /// Elements per block.
    pub fn elems(self) -> usize {
        self.0 as usize
    }
}

impl Default for Blocksize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Double quantization: absmax values are quantized in blocks of this many (bitsandbytes hardcodes 256).
pub const NESTED_BLOCK_ELEMS: usize = 256;

/// Packing: element `2i` goes in the HIGH nibble, `2i + 1` in the low nibble.
#[inline(always)]
pub const fn pack_pair(first: u8, second: u8) -> u8 {
    (first << 4) | (second & 0x0F)
}

/// Inverse of [`pack_pair`]: `(first, second)`.
#[inline(always)]
pub const fn unpack_pair(byte: u8) -> (u8, u8) {
    (byte >> 4, byte & 0x0F)
}

/// Bytes holding `n_elems` packed 4-bit codes (odd counts pad the last low nibble).
pub const fn packed_len(n_elems: usize) -> usize {
    n_elems.div_ceil(2)
}

/// Blocks covering `n_elems` elements; a trailing partial block counts as one.
pub const fn n_blocks(n_elems: usize, block_elems: usize) -> usize {
    n_elems.div_ceil(block_elems)
}

/// Smallest absmax used for scaling, so an all-zero block scales to 0 instead of NaN
/// (bitsandbytes: `absmax.clamp(min=1e-38)`).
pub const ABSMAX_FLOOR: f32 = 1e-38;

/// bitsandbytes' signed 8-bit dynamic map, `create_dynamic_map(signed=True, max_exponent_bits=7,
/// total_bits=8)`: 256 sorted values in [-0.99297, 1], regenerated with the same f32 arithmetic.
///
/// For exponent `i` in 0..7 the generator takes `2^i + 1` boundaries from `torch.linspace(0.1, 1)`
/// (which torch computes as `fma(step, k, start)` for the first half and `fma(-step, n-1-k, end)`
/// for the second), their pairwise means `(b[k] + b[k+1]) / 2`, and scales them by `±10^(i-6)`
/// (the Python float cast to f32, then an f32 multiply); then appends 0 and 1 and sorts.
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| build_dynamic_map(true))
}

/// bitsandbytes' unsigned 8-bit dynamic map, `create_dynamic_map(signed=False)`: 256 sorted values
/// in [0, 1], the map of 8-bit optimizers' second moment (`qmap2`). As [`dynamic_map`], but
/// `2^(i+1) + 1` boundaries per exponent and no negative half: 254 means, 0 and 1.
pub fn dynamic_map_unsigned() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(|| build_dynamic_map(false))
}

fn build_dynamic_map(signed: bool) -> [f32; 256] {
    const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data = Vec::with_capacity(256);
    for (i, &scale) in SCALES.iter().enumerate() {
        let items = if signed { 1 << i } else { 1 << (i + 1) };
        let bounds = linspace_f32(0.1, 1.0, items + 1);
        let means: Vec<f32> = bounds.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        let scale = scale as f32;
        data.extend(means.iter().map(|m| scale * m));
        if signed {
            data.extend(means.iter().map(|m| -scale * m));
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(|a, b| cmp_finite(*a, *b));
    data.try_into().expect("a dynamic map has 256 entries")
}

/// `torch.linspace(start, end, steps, dtype=float32)` on the CPU, bit-exact.
fn linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|k| {
            if k < half {
                step.mul_add(k as f32, start)
            } else {
                (-step).mul_add((steps - 1 - k) as f32, end)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_table_is_sorted_symmetric_in_range() {
        assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((NF4_CODE[0], NF4_CODE[7], NF4_CODE[15]), (-1.0, 0.0, 1.0));
        // bitsandbytes' CUDA decision tree opens with mid(0, 0.0796) = 0.03979014977812767.
        assert_eq!(NF4_CODE[8] / 2.0, 0.039_790_15_f32);
        assert_eq!(
            QuantType::Nf4.buckets().order,
            std::array::from_fn(|i| i as u8)
        );
    }

    #[test]
    fn fp4_order_matches_torch_argsort() {
        // torch.argsort(get_4bit_type("fp4")) in bitsandbytes 0.50.2.
        let expected = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];
        assert_eq!(QuantType::Fp4.buckets().order, expected);
        assert_eq!(fp4_code()[1], 0.0625 / 12.0);
    }

    #[test]
    fn dynamic_map_shape() {
        let map = dynamic_map();
        assert!(map.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(map[255], 1.0);
        assert_eq!(map[0], -0.992_968_75);
        assert_eq!(map.iter().filter(|v| **v == 0.0).count(), 1);
        let u = dynamic_map_unsigned();
        assert!(u.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((u[0], u[255]), (0.0, 1.0));
    }

    #[test]
    fn blocksize_validation() {
        for ok in [32, 64, 128, 256, 512, 1024, 2048, 4096] {
            assert_eq!(Blocksize::new(ok).unwrap().elems(), ok);
        }
        for bad in [0, 16, 48, 100, 8192] {
            assert!(Blocksize::new(bad).is_err());
        }
    }

    #[test]
    fn nibble_order_first_is_high() {
        assert_eq!(pack_pair(0xA, 0x3), 0xA3);
        assert_eq!(unpack_pair(0xA3), (0xA, 0x3));
    }
}
