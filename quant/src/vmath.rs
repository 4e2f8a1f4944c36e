//! Vectorizable f32 math for the CPU loops: an `exp` the compiler can inline and vectorize (libm's
//! `expf` is a call per element, which keeps every loop around it scalar), and the row reductions
//! built on it, compiled for AVX-512, AVX2+FMA or the baseline and chosen at run time
//! (`multiversion`).
//!
//! [`exp`] is Cephes' `expf`: `x = n·ln 2 + r` with `n = round(x·log₂e)` and `ln 2` split in two
//! (Cody–Waite), a degree-7 polynomial for `eʳ` on `|r| ≤ ln 2 / 2`, and `2ⁿ` built in the exponent
//! bits. Its relative error is below 2⁻²² (2 ulp) on the whole finite range (pinned by tests
//! against f64's `exp`); `exp(−∞) = 0`, `exp(+∞) = +∞`, `exp(NaN) = NaN`; results below
//! `f32::MIN_POSITIVE` (x < −87.34) flush to 0 and x > 88.72 gives +∞. No fused multiply-add is
//! formed (Rust does not contract), so every target computes the same bits.

use multiversion::multiversion;

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// `ln 2 = LN2_HI + LN2_LO`, `LN2_HI` exact in 9 bits so `n · LN2_HI` is exact for |n| ≤ 2¹⁴.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `1.5 · 2²³`: adding and subtracting it rounds an f32 of magnitude < 2²² to an integer (ties
/// to even), without a call or a branch.
const ROUNDER: f32 = 12_582_912.0;
/// Below this `eˣ` is under `f32::MIN_POSITIVE`: flushed to 0.
const MIN_X: f32 = -87.336_55;
const MAX_X: f32 = 88.722_84;

/// `eˣ` in f32 (see the module documentation for its accuracy and edge cases).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(MIN_X - 1.0, MAX_X);
    let t = xc * LOG2E + ROUNDER;
    let n = t - ROUNDER;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let y = p * (r * r) + r + 1.0;
    // 2ⁿ for n ∈ [−127, 128]: the exponent field holds n + 127 for n ≤ 127 (0 gives 0 at
    // n = −127, flushed below anyway); n = 128 is 2¹²⁷ · 2, exact unless it overflows to +∞.
    // n as an integer from t's bits: t = ROUNDER + n exactly (|n| ≤ 2²² keeps ROUNDER's
    // exponent), so its bits are ROUNDER's plus n. (`n as i32`, a saturating conversion, is a
    // scalar instruction per lane with its NaN and range fix-ups: it kept the loops around this
    // function at a third of their vector speed.)
    let n = (t.to_bits() as i32).wrapping_sub(ROUNDER.to_bits() as i32);
    let v = y * f32::from_bits(((n.min(127) + 127).max(0) as u32) << 23);
    let v = if n > 127 { v * 2.0 } else { v };
    if x.is_nan() {
        x
    } else if x < MIN_X {
        0.0
    } else {
        v
    }
}

/// Lanes of the partial sums in [`exp_sum_in_place`]: one AVX-512 register of f32.
const LANES: usize = 16;

/// `(max(v), Σ exp(v − max))` of a row, each `exp(v − max)` left in `v`. The sum runs over
/// 16 interleaved partial sums (element `i` into lane `i % 16`), then the lanes in order:
/// the same bits on every target.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub fn exp_sum_in_place(v: &mut [f32]) -> (f32, f32) {
    let m = max(v);
    (m, exp_sub_sum_inline(v, m))
}

#[inline(always)]
fn exp_sub_sum_inline(v: &mut [f32], m: f32) -> f32 {
    for x in v.iter_mut() {
        *x = exp(*x - m);
    }
    lane_sum(v)
}

/// `v[j] = v[j] · scale + mask[j]` (`v[j] · scale` without a mask), then the largest `v[j]` (as
/// [`exp_sum_in_place`] finds it): the first pass of a scaled, masked softmax row.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub fn scale_mask_max(v: &mut [f32], scale: f32, mask: Option<&[f32]>) -> f32 {
    match mask {
        Some(m) => v.iter_mut().zip(m).for_each(|(x, m)| *x = *x * scale + m),
        None => v.iter_mut().for_each(|x| *x *= scale),
    }
    max(v)
}

/// `v[j] = exp(v[j] − m)`, then `Σ v` (as [`exp_sum_in_place`] sums).
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub fn exp_sub_sum(v: &mut [f32], m: f32) -> f32 {
    exp_sub_sum_inline(v, m)
}

/// `v[j] = exp(v[j] · scale + mask[j] − l)`: a softmax row from its log-sum-exp `l`, with the
/// same `v[j] · scale + mask[j]` as [`scale_mask_max`].
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub fn scale_mask_exp(v: &mut [f32], scale: f32, mask: Option<&[f32]>, l: f32) {
    match mask {
        Some(m) => v
            .iter_mut()
            .zip(m)
            .for_each(|(x, m)| *x = exp((*x * scale + m) - l)),
        None => v.iter_mut().for_each(|x| *x = exp(*x * scale - l)),
    }
}

/// `Σ a[j] · b[j]` over 16 interleaved partial sums, then the lanes in order.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((l, x), y) in lanes.iter_mut().zip(x).zip(y) {
            *l += x * y;
        }
    }
    for ((l, x), y) in lanes.iter_mut().zip(ca.remainder()).zip(cb.remainder()) {
        *l += x * y;
    }
    lanes.iter().sum()
}

/// The softmax's backward on a row: `dp[j] = p[j] · (dp[j] − delta) · scale`, with `delta =
/// Σ_j p[j] · dp[j]`.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub fn softmax_grad(p: &[f32], dp: &mut [f32], delta: f32, scale: f32) {
    dp.iter_mut()
        .zip(p)
        .for_each(|(d, p)| *d = p * (*d - delta) * scale);
}

/// The largest element (NaN if any is NaN; −∞ for an empty row).
#[inline(always)]
fn max(v: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut nan = false;
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            nan |= x.is_nan();
            *l = if x > *l { x } else { *l };
        }
    }
    for &x in chunks.remainder() {
        nan |= x.is_nan();
        lanes[0] = if x > lanes[0] { x } else { lanes[0] };
    }
    if nan {
        return f32::NAN;
    }
    lanes.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l))
}

/// Σ v over [`LANES`] interleaved partial sums, then the lanes in order.
#[inline(always)]
fn lane_sum(v: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    for (l, &x) in lanes.iter_mut().zip(chunks.remainder()) {
        *l += x;
    }
    lanes.iter().sum()
}

/// SwiGLU's forward on one f32 row: `out[i] = up[i] · silu(gate[i])`, `silu(g) = g / (1 + e⁻ᵍ)`.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub fn silu_mul_row(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = u * (g / (1.0 + exp(-g)));
    }
}

/// SwiGLU's backward on one row (f32): with `s = σ(g)`, `d_up = dy · g·s` and
/// `d_gate = dy · u · s·(1 + g·(1 − s))`.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512bw+avx512dq",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub fn silu_mul_bwd_row(
    gate: &[f32],
    up: &[f32],
    dy: &[f32],
    d_gate: &mut [f32],
    d_up: &mut [f32],
) {
    let n = gate.len();
    let (up, dy, d_gate, d_up) = (&up[..n], &dy[..n], &mut d_gate[..n], &mut d_up[..n]);
    for i in 0..n {
        let (g, u, grad) = (gate[i], up[i], dy[i]);
        let s = 1.0 / (1.0 + exp(-g));
        d_up[i] = grad * (g * s);
        d_gate[i] = (grad * u) * (s * (1.0 + g * (1.0 - s)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rel_err(x: f32) -> f64 {
        let want = (x as f64).exp();
        let got = exp(x) as f64;
        ((got - want) / want).abs()
    }

    #[test]
    fn exp_is_within_two_ulp_on_a_dense_grid() {
        // Every 2⁻¹⁰ step of the normal range, plus the ends.
        let mut worst = (0f64, 0f32);
        let mut x = MIN_X;
        while x <= MAX_X - 0.01 {
            let e = rel_err(x);
            if e > worst.0 {
                worst = (e, x);
            }
            x += 1.0 / 1024.0;
        }
        assert!(worst.0 < 2f64.powi(-22), "worst relative error {worst:?}");
    }

    #[test]
    fn exp_edge_cases() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(-88.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-87.3).is_normal());
        assert!(exp(88.7).is_finite());
    }

    /// The softmax row passes of the CPU attention against their formulas: each element the
    /// scalar `exp` of the same argument (bit for bit: the vectorized loops compute the same
    /// bits), sums and dots within f32 rounding of f64.
    #[test]
    fn softmax_row_passes_match_their_formulas() {
        let n = 100;
        let s: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 997) as f32 / 40.0 - 12.0)
            .collect();
        let mask: Vec<f32> = (0..n)
            .map(|i| if i % 7 == 3 { f32::NEG_INFINITY } else { 0.0 })
            .collect();
        let scale = 0.125f32;
        for m in [None, Some(&mask[..])] {
            let x: Vec<f32> = (0..n)
                .map(|i| s[i] * scale + m.map_or(0.0, |m| m[i]))
                .collect();
            let mut v = s.clone();
            let max = scale_mask_max(&mut v, scale, m);
            let want = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max, want);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&v), bits(&x));
            let sum = exp_sub_sum(&mut v, max);
            let e: Vec<f32> = x.iter().map(|&x| exp(x - max)).collect();
            assert_eq!(bits(&v), bits(&e));
            let want_sum: f64 = x.iter().map(|&x| ((x - max) as f64).exp()).sum();
            assert!(((sum as f64 - want_sum) / want_sum).abs() < 1e-6);
            let l = max + sum.ln();
            let mut p = s.clone();
            scale_mask_exp(&mut p, scale, m, l);
            let want_p: Vec<f32> = x.iter().map(|&x| exp(x - l)).collect();
            assert_eq!(bits(&p), bits(&want_p));
            let total: f64 = p.iter().map(|&p| p as f64).sum();
            assert!((total - 1.0).abs() < 1e-5, "probabilities sum to {total}");
            let dp: Vec<f32> = (0..n).map(|i| (i as f32 - 50.0) / 25.0).collect();
            let delta = dot(&p, &dp);
            let want_delta: f64 = p.iter().zip(&dp).map(|(&p, &d)| p as f64 * d as f64).sum();
            assert!(
                (delta as f64 - want_delta).abs() < 1e-6,
                "{delta} vs {want_delta}"
            );
            let mut ds = dp.clone();
            softmax_grad(&p, &mut ds, delta, scale);
            for i in 0..n {
                assert_eq!(ds[i], p[i] * (dp[i] - delta) * scale);
            }
        }
    }

    #[test]
    fn exp_sum_matches_f64() {
        let mut v: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 997) as f32 / 50.0 - 10.0)
            .collect();
        let want_m = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let want_s: f64 = v.iter().map(|&x| ((x - want_m) as f64).exp()).sum();
        let (m, s) = exp_sum_in_place(&mut v);
        assert_eq!(m, want_m);
        assert!(
            ((s as f64 - want_s) / want_s).abs() < 1e-6,
            "{s} vs {want_s}"
        );
        assert!(v.iter().all(|&p| p > 0.0 && p <= 1.0));
        let mut masked = vec![0.5, f32::NEG_INFINITY, 1.5];
        let (m, s) = exp_sum_in_place(&mut masked);
        assert_eq!((m, masked[1]), (1.5, 0.0));
        assert!((s - (1.0 + (-1f32).exp())).abs() < 1e-6);
        assert!(exp_sum_in_place(&mut [1.0, f32::NAN]).1.is_nan());
    }

    proptest! {
        #[test]
        fn exp_relative_error_below_two_ulp(x in MIN_X..MAX_X) {
            prop_assert!(rel_err(x) < 2f64.powi(-22), "x = {x}: {}", rel_err(x));
        }

        #[test]
        fn silu_mul_matches_the_f64_formula(
            row in proptest::collection::vec((-30f32..30.0, -4f32..4.0), 0..80)
        ) {
            let (gate, up): (Vec<f32>, Vec<f32>) = row.into_iter().unzip();
            let mut out = vec![0f32; gate.len()];
            silu_mul_row(&gate, &up, &mut out);
            for ((&o, &g), &u) in out.iter().zip(&gate).zip(&up) {
                let want = u as f64 * (g as f64 / (1.0 + (-g as f64).exp()));
                prop_assert!((o as f64 - want).abs() <= 1e-6 * want.abs().max(1e-6), "{g} {u}: {o} vs {want}");
            }
        }
    }
}
