//! ggml's k-quant encoders (`q4_K`, `q5_K`, `q6_K`): 256-element super-blocks, written the way
//! llama.cpp's `llama-quantize` writes them without an importance matrix
//! (`quantize_row_q{4,5,6}_K_ref` in ggml-quants.c), so our files are byte-identical to its output
//! (tests/fixtures/gen_kquant_goldens.py checks that against llama.cpp itself).
//!
//! candle ships k-quant encoders too, but its `q4_K`/`q5_K` use the older `make_qkx1_quants`
//! search; llama.cpp has since moved to `make_qkx2_quants` (weighted least squares over a grid of
//! candidate scales), so candle's bytes differ from llama-quantize's. The decoders agree (one ggml
//! layout), which the tests use as a second implementation for round trips.
//!
//! Every step follows the reference's f32 arithmetic in the same order: ggml-quants.c is built
//! without FMA contraction (ggml-base gets no `-march` flags), so plain Rust f32 operations
//! reproduce it exactly.

use half::f16;
use rayon::prelude::*;

/// Elements per super-block.
pub const QK_K: usize = 256;
/// Bytes per super-block of each type.
pub const Q4_K_BYTES: usize = 144;
pub const Q5_K_BYTES: usize = 176;
pub const Q6_K_BYTES: usize = 210;

/// ggml's round-to-nearest (ties to even) through the 1.5·2²³ trick; valid for |x| < 2²², which
/// the reference asserts, and bit-for-bit the same outside that range.
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Smallest absolute maximum treated as a non-zero group (`GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// Asymmetric `x ≈ scale·l − min` with `l ∈ [0, nmax]`, fitted by weighted least squares over
/// `nstep + 1` candidate inverse scales `(rmin + rdelta·k + nmax) / (max − min)`; returns
/// `(scale, min)` with `min ≥ 0` and fills `levels`.
#[allow(clippy::too_many_arguments)]
fn fit_scale_min(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    levels: &mut [u8],
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        min = if x[i] < min { x[i] } else { min };
        max = if x[i] > max { x[i] } else { max };
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let quant = |iscale: f32, xi: f32, min: f32| nearest_int(iscale * (xi - min)).clamp(0, nmax);
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        levels[i] = quant(iscale, x[i], min) as u8;
        let diff = scale * levels[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    let mut aux = [0u8; 32];
    let aux = &mut aux[..n];
    for step in 0..=nstep {
        iscale = (rmin + rdelta * step as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = quant(iscale, x[i], min);
            aux[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                error += weights[i] * (diff * diff);
            }
            if error < best_error {
                levels.copy_from_slice(aux);
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Symmetric `x ≈ scale·(l − nmax)` with `l ∈ [0, 2·nmax)`, weights `x²`, searching 18 nearby
/// inverse scales around `−nmax / max` (the reference's `rmse_type = 1`); returns the scale.
fn fit_scale_symmetric(x: &[f32], nmax: i32, levels: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let quant = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let l = quant(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let mut iscale = -(nmax as f32) / max;
    for (l, &v) in levels.iter_mut().zip(x) {
        *l = (quant(iscale, v) + nmax) as i8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for step in (-9..=9).filter(|s| *s != 0) {
        iscale = -(nmax as f32 + 0.1 * step as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (l, &v) in levels.iter_mut().zip(x) {
                *l = (quant(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// The 12-byte packing of eight 6-bit scales and eight 6-bit mins shared by `q4_K` and `q5_K`.
fn pack_scales_mins(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    s[..4].copy_from_slice(&ls[..4]);
    s[4..8].copy_from_slice(&lm[..4]);
    for j in 4..8 {
        s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
        s[j - 4] |= (ls[j] >> 4) << 6;
        s[j] |= (lm[j] >> 4) << 6;
    }
    s
}

/// The inverse of [`pack_scales_mins`] for sub-block `j` (ggml's `get_scale_min_k4`).
fn scale_min(j: usize, s: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// The shared part of `q4_K`/`q5_K`: eight 32-element sub-blocks, each fitted with weights
/// `√(mean x²) + |x|`, their scales and mins quantized to 6 bits against two f16 super-scales, and
/// the levels recomputed with the quantized scales. Returns `(d, dmin, packed scales, levels)`.
fn asymmetric_superblock(
    x: &[f32],
    nmax: i32,
    rmin: f32,
    nstep: i32,
) -> (f16, f16, [u8; 12], [u8; QK_K]) {
    let mut levels = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let sub = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in sub {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let mut weights = [0f32; 32];
        for (w, &v) in weights.iter_mut().zip(sub) {
            *w = av_x + v.abs();
        }
        (scales[j], mins[j]) = fit_scale_min(
            sub,
            &weights,
            nmax,
            rmin,
            0.1,
            nstep,
            &mut levels[32 * j..32 * j + 32],
        );
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    // C stores the int in a uint8_t before the clamp: a negative value wraps, then clamps to 63.
    let six_bits = |v: f32| (nearest_int(v) as u8).min(63);
    let ls: [u8; 8] = std::array::from_fn(|j| six_bits(inv_scale * scales[j]));
    let lm: [u8; 8] = std::array::from_fn(|j| six_bits(inv_min * mins[j]));
    let packed = pack_scales_mins(&ls, &lm);
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = scale_min(j, &packed);
        let dj = d.to_f32() * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for i in 32 * j..32 * j + 32 {
            levels[i] = nearest_int((x[i] + dm) / dj).clamp(0, nmax) as u8;
        }
    }
    (d, dmin, packed, levels)
}

/// One `q4_K` super-block: `d, dmin: f16`, 12 bytes of scales/mins, 128 bytes of nibbles (in each
/// 64-element chunk, element `l` in the low and `l + 32` in the high nibble).
fn q4_k_block(x: &[f32], out: &mut Vec<u8>) {
    let (d, dmin, scales, levels) = asymmetric_superblock(x, 15, -1.0, 20);
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    out.extend_from_slice(&scales);
    for chunk in levels.chunks_exact(64) {
        out.extend((0..32).map(|l| chunk[l] | (chunk[l + 32] << 4)));
    }
}

/// One `q5_K` super-block: as `q4_K` with a 32-byte plane of fifth bits before the nibbles (bits
/// `2c` and `2c + 1` of byte `l` hold the high bits of chunk `c`'s elements `l` and `l + 32`).
fn q5_k_block(x: &[f32], out: &mut Vec<u8>) {
    let (d, dmin, scales, levels) = asymmetric_superblock(x, 31, -0.5, 15);
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    out.extend_from_slice(&scales);
    let mut qh = [0u8; 32];
    let mut qs = [0u8; 128];
    for (c, chunk) in levels.chunks_exact(64).enumerate() {
        for l in 0..32 {
            let (lo, hi) = (chunk[l], chunk[l + 32]);
            qh[l] |= ((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1));
            qs[32 * c + l] = (lo & 0xF) | ((hi & 0xF) << 4);
        }
    }
    out.extend_from_slice(&qh);
    out.extend_from_slice(&qs);
}

/// One `q6_K` super-block: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, sixteen `i8`
/// sub-block scales, `d: f16` (last).
fn q6_k_block(x: &[f32], out: &mut Vec<u8>) {
    let mut levels = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for (ib, s) in scales.iter_mut().enumerate() {
        *s = fit_scale_symmetric(
            &x[16 * ib..16 * ib + 16],
            32,
            &mut levels[16 * ib..16 * ib + 16],
        );
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = *s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        out.extend_from_slice(&[0u8; Q6_K_BYTES]);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let q_scales: [i8; 16] =
        std::array::from_fn(|ib| nearest_int(iscale * scales[ib]).min(127) as i8);
    for (j, &sc) in q_scales.iter().enumerate() {
        let dj = d.to_f32() * sc as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            levels[i] = (nearest_int(x[i] / dj).clamp(-32, 31) + 32) as i8;
        }
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for (h, chunk) in levels.chunks_exact(128).enumerate() {
        let q = |k: usize| chunk[k] as u8;
        for l in 0..32 {
            ql[64 * h + l] = (q(l) & 0xF) | ((q(l + 64) & 0xF) << 4);
            ql[64 * h + l + 32] = (q(l + 32) & 0xF) | ((q(l + 96) & 0xF) << 4);
            qh[32 * h + l] = (q(l) >> 4)
                | ((q(l + 32) >> 4) << 2)
                | ((q(l + 64) >> 4) << 4)
                | ((q(l + 96) >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(q_scales.iter().map(|s| *s as u8));
    out.extend_from_slice(&d.to_le_bytes());
}

/// A k-quant type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KQuant {
    Q4K,
    Q5K,
    Q6K,
}

impl KQuant {
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4K => Q4_K_BYTES,
            Self::Q5K => Q5_K_BYTES,
            Self::Q6K => Q6_K_BYTES,
        }
    }
}

/// Encodes `values` (a whole number of 256-element super-blocks; rows are multiples of 256, so
/// blocks never straddle rows) as `ty`, super-blocks in parallel.
pub fn encode(values: &[f32], ty: KQuant) -> Vec<u8> {
    assert!(
        values.len().is_multiple_of(QK_K),
        "k-quants need whole super-blocks (checked by the caller)"
    );
    let block: fn(&[f32], &mut Vec<u8>) = match ty {
        KQuant::Q4K => q4_k_block,
        KQuant::Q5K => q5_k_block,
        KQuant::Q6K => q6_k_block,
    };
    // Chunks of 64 super-blocks per task keep rayon's overhead small.
    let per_task = 64 * QK_K;
    let parts: Vec<Vec<u8>> = values
        .par_chunks(per_task)
        .map(|chunk| {
            let mut out = Vec::with_capacity(chunk.len() / QK_K * ty.block_bytes());
            for sb in chunk.chunks_exact(QK_K) {
                block(sb, &mut out);
            }
            out
        })
        .collect();
    parts.concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        for (x, want) in [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (3.49, 3),
            (-7.51, -8),
        ] {
            assert_eq!(nearest_int(x), want, "{x}");
        }
    }

    #[test]
    fn scale_packing_round_trips_every_6_bit_pair() {
        for seed in 0..64u8 {
            let ls: [u8; 8] = std::array::from_fn(|j| ((seed as usize + 7 * j) % 64) as u8);
            let lm: [u8; 8] = std::array::from_fn(|j| ((3 * seed as usize + 11 * j) % 64) as u8);
            let packed = pack_scales_mins(&ls, &lm);
            for j in 0..8 {
                assert_eq!(scale_min(j, &packed), (ls[j], lm[j]));
            }
        }
    }
}
