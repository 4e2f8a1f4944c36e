//! The fused dropout (`qlora_quant::fused::dropout`) against its contract, re-implemented here from
//! the formula in `fused`'s module docs (this file is the spec's second, independent copy), on every
//! device (see [`crate::devices::devices`]): the mask bit for bit, the kept fraction, the gradient,
//! seeds, and the probabilities it refuses.

use crate::devices::devices;
use crate::fused::{host_f32, uniform};
use candle_core::{DType, Device, Tensor, Var};
use qlora_quant::fused;

/// More than 8192 blocks × 256 threads, so the CUDA kernel's grid-stride loop wraps.
const N_LARGE: usize = 2_500_000;

/// The standard splitmix64 finalizer.
fn splitmix64(z: u64) -> u64 {
    let mut z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The contract: element `i` of a dropout with `p` and `seed` is kept.
fn keeps(seed: u64, i: u64, p: f32) -> bool {
    let keep = 1.0f32 - p;
    let threshold = (keep * (1u32 << 24) as f32).round() as u32;
    let h = splitmix64(seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    ((h >> 40) as u32) < threshold
}

fn dtypes(dev: &Device) -> Vec<DType> {
    let mut d = vec![DType::F32, DType::BF16, DType::F16];
    if dev.is_cpu() {
        d.push(DType::F64);
    }
    d
}

/// Exact f64 values of a float tensor, on the host.
fn host_f64(t: &Tensor) -> Vec<f64> {
    let t = t.flatten_all().unwrap().to_device(&Device::Cpu).unwrap();
    t.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

/// The contract applied on the host to `x` (its dtype): kept elements `x · (1.0f32 / keep)` in f32
/// (f64 for f64) rounded once to the dtype, dropped ones +0.
fn dropout_ref(x: &Tensor, p: f32, seed: u64) -> Tensor {
    let scale = 1.0f32 / (1.0 - p);
    let x = x.flatten_all().unwrap().to_device(&Device::Cpu).unwrap();
    let kept = |i: usize| keeps(seed, i as u64, p);
    if x.dtype() == DType::F64 {
        let v: Vec<f64> = x.to_vec1().unwrap();
        let y: Vec<f64> = v
            .iter()
            .enumerate()
            .map(|(i, &v)| if kept(i) { v * f64::from(scale) } else { 0.0 })
            .collect();
        Tensor::from_vec(y, x.elem_count(), &Device::Cpu).unwrap()
    } else {
        let v: Vec<f32> = x.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
        let y: Vec<f32> = v
            .iter()
            .enumerate()
            .map(|(i, &v)| if kept(i) { v * scale } else { 0.0 })
            .collect();
        let y = Tensor::from_vec(y, x.elem_count(), &Device::Cpu).unwrap();
        y.to_dtype(x.dtype()).unwrap()
    }
}

/// Asserts `got` and `want` hold the same values bit for bit (+0 ≠ −0), printing the first
/// mismatches and their count.
fn assert_bits_eq(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    assert_eq!(got.elem_count(), want.elem_count(), "{what}: size");
    let (g, w) = (host_f64(got), host_f64(want));
    let bad: Vec<usize> = (0..g.len())
        .filter(|&i| g[i].to_bits() != w[i].to_bits())
        .collect();
    let first: Vec<String> = bad
        .iter()
        .take(5)
        .map(|&i| format!("[{i}] {} vs {}", g[i], w[i]))
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} differ; first: {}",
        bad.len(),
        g.len(),
        first.join(", ")
    );
}

#[test]
fn dropout_mask_matches_the_contract_bit_for_bit_on_every_device() {
    let x = uniform(&[3, 5, 67], 31, -2.0, 2.0);
    for dev in devices() {
        for dtype in dtypes(&dev) {
            let xd = x.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
            for (p, seed) in [(0.1, 0), (0.5, 7), (0.9, u64::MAX), (1e-9, 3)] {
                let what = format!("{dev:?} {dtype:?} p={p} seed={seed}");
                let y = fused::dropout(&xd, p, seed).unwrap();
                assert_eq!(y.dims(), x.dims(), "{what}: shape");
                assert_bits_eq(&y, &dropout_ref(&xd, p, seed), &what);
            }
            // A contiguous view that starts at an offset, and a strided one: indices count from
            // the view's first element, in its row-major order.
            for view in [xd.narrow(0, 1, 2).unwrap(), xd.narrow(1, 2, 3).unwrap()] {
                let y = fused::dropout(&view, 0.3, 11).unwrap();
                let what = format!("{dev:?} {dtype:?} view {:?}", view.dims());
                assert_bits_eq(&y, &dropout_ref(&view, 0.3, 11), &what);
            }
        }
        let mask = fused::dropout_mask(N_LARGE, 0.25, 5, &dev).unwrap();
        let want: Vec<u8> = (0..N_LARGE)
            .map(|i| u8::from(keeps(5, i as u64, 0.25)))
            .collect();
        let got: Vec<u8> = mask.to_device(&Device::Cpu).unwrap().to_vec1().unwrap();
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(
            first, None,
            "{dev:?}: mask of {N_LARGE} elements, first mismatch"
        );
    }
}

/// The contract's counter of element `i` of `dropout_rows` with rows of `len` elements placed at
/// `first + b·step`.
fn row_counter(i: u64, len: u64, first: u64, step: u64) -> u64 {
    let (b, j) = (i / len, i % len);
    (first.wrapping_add(b.wrapping_mul(step)) << 40).wrapping_add(j)
}

#[test]
fn dropout_rows_matches_the_contract_bit_for_bit_on_every_device() {
    // 3 rows of 5 × 67; rows longer than the CPU loop's 64 Ki chunks, so counters restart at row
    // boundaries inside a chunk and chunks start inside rows.
    for (dims, rows) in [
        (vec![3, 5, 67], (0u64, 1u64)),
        (vec![3, 5, 67], (5, 2)),
        (vec![4, 40_000], (1, 3)),
        (vec![2, 70_001], (u64::MAX - 1, 1)),
    ] {
        let x = uniform(&dims, 32, -2.0, 2.0);
        let len = (x.elem_count() / dims[0]) as u64;
        let mask_rows = fused::MaskRows {
            first: rows.0,
            step: rows.1,
        };
        for dev in devices() {
            for dtype in [DType::F32, DType::BF16] {
                let xd = x.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
                let y = fused::dropout_rows(&xd, 0.3, 19, mask_rows).unwrap();
                let m = fused::dropout_rows_mask(x.shape(), 0.3, 19, mask_rows, &dev).unwrap();
                let want: Vec<u8> = (0..x.elem_count() as u64)
                    .map(|i| u8::from(keeps(19, row_counter(i, len, rows.0, rows.1), 0.3)))
                    .collect();
                let got: Vec<u8> = m
                    .flatten_all()
                    .unwrap()
                    .to_device(&Device::Cpu)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let what = format!("{dev:?} {dtype:?} {dims:?} rows {rows:?}");
                assert_eq!(
                    got.iter().zip(&want).position(|(a, b)| a != b),
                    None,
                    "{what}: first mismatch"
                );
                // The values: the kept ones scaled, the others +0.
                let scale = 1.0f32 / 0.7;
                let xs = host_f32(&xd);
                let want_y: Vec<f32> = xs
                    .iter()
                    .zip(&want)
                    .map(|(&v, &k)| if k == 1 { v * scale } else { 0.0 })
                    .collect();
                let want_y = Tensor::from_vec(want_y, x.shape(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                assert_bits_eq(&y, &want_y, &what);
            }
        }
    }
}

#[test]
fn a_rows_mask_depends_on_its_global_row_alone() {
    // One batch of 4 rows × 6 positions × 10 features against: each row alone at its global row,
    // two ranks taking every other row, and a row padded to 9 positions (its first 6 positions'
    // mask unchanged).
    let (b, t, d) = (4usize, 6usize, 10usize);
    let (p, seed) = (0.5f32, 1234u64);
    for dev in devices() {
        let whole = fused::dropout_rows_mask((b, t, d), p, seed, Default::default(), &dev).unwrap();
        let row = |i: usize| {
            whole
                .narrow(0, i, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<u8>()
                .unwrap()
        };
        for i in 0..b {
            let rows = fused::MaskRows {
                first: i as u64,
                step: 1,
            };
            let alone = fused::dropout_rows_mask((1, t, d), p, seed, rows, &dev).unwrap();
            assert_eq!(
                alone.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
                row(i),
                "{dev:?}: row {i} alone"
            );
            let padded = fused::dropout_rows_mask((1, t + 3, d), p, seed, rows, &dev).unwrap();
            assert_eq!(
                padded
                    .narrow(1, 0, t)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<u8>()
                    .unwrap(),
                row(i),
                "{dev:?}: row {i} padded"
            );
        }
        for rank in 0..2 {
            let rows = fused::MaskRows {
                first: rank,
                step: 2,
            };
            let share = fused::dropout_rows_mask((b / 2, t, d), p, seed, rows, &dev).unwrap();
            for k in 0..b / 2 {
                let got = share
                    .narrow(0, k, 1)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<u8>()
                    .unwrap();
                assert_eq!(
                    got,
                    row(rank as usize + 2 * k),
                    "{dev:?}: rank {rank} row {k}"
                );
            }
        }
        // A single row at global row 0 is exactly `dropout`'s mask.
        let flat = fused::dropout_mask(t * d, p, seed, &dev)
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        assert_eq!(flat, row(0), "{dev:?}: row 0 is dropout's mask");
    }
}

#[test]
fn dropout_keeps_its_fraction_within_five_sigma() {
    let n = 1_000_000;
    for dev in devices() {
        for p in [0.05f32, 0.1, 0.5, 0.9] {
            let kept = fused::dropout_mask(n, p, 42, &dev)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let keep = f64::from(1.0 - p);
            let sigma = (n as f64 * keep * (1.0 - keep)).sqrt();
            let z = (kept - n as f64 * keep) / sigma;
            assert!(
                z.abs() <= 5.0,
                "{dev:?} p={p}: kept {kept} of {n}, {z:.2}σ from {keep}"
            );
        }
    }
}

#[test]
fn dropout_gradient_is_the_same_mask_and_scale() {
    let x = uniform(&[4, 33], 32, -1.0, 1.0);
    let g = uniform(&[4, 33], 33, -3.0, 3.0);
    for dev in devices() {
        for dtype in dtypes(&dev) {
            let what = format!("{dev:?} {dtype:?}");
            let x = Var::from_tensor(&x.to_dtype(dtype).unwrap().to_device(&dev).unwrap()).unwrap();
            let g = g.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
            let y = fused::dropout(x.as_tensor(), 0.3, 9).unwrap();
            let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = grads.get(x.as_tensor()).expect("x gets a gradient");
            assert_bits_eq(dx, &dropout_ref(&g, 0.3, 9), &format!("{what} gradient"));
        }
    }
}

#[test]
fn dropout_masks_follow_the_seed() {
    let n = 10_000;
    for dev in devices() {
        let mask = |seed| -> Vec<u8> {
            let m = fused::dropout_mask(n, 0.5, seed, &dev).unwrap();
            m.to_device(&Device::Cpu).unwrap().to_vec1().unwrap()
        };
        assert_eq!(mask(1), mask(1), "{dev:?}: same seed, same mask");
        for (a, b) in [(1, 2), (1, 1 ^ (1 << 63)), (0, u64::MAX)] {
            let (ma, mb) = (mask(a), mask(b));
            let differ = ma.iter().zip(&mb).filter(|(x, y)| x != y).count();
            // Independent masks at p = 0.5 differ in half the places (σ = 50).
            assert!(
                (4_500..=5_500).contains(&differ),
                "{dev:?}: seeds {a} and {b} differ in {differ} of {n}"
            );
        }
    }
}

#[test]
fn dropout_of_zero_is_the_identity_and_bad_probabilities_are_errors() {
    for dev in devices() {
        let x =
            Var::from_tensor(&uniform(&[2, 9], 34, -1.0, 1.0).to_device(&dev).unwrap()).unwrap();
        let y = fused::dropout(x.as_tensor(), 0.0, 1).unwrap();
        assert_bits_eq(&y, x.as_tensor(), &format!("{dev:?} p=0"));
        let grads = y.sum_all().unwrap().backward().unwrap();
        let ones = Tensor::ones((2, 9), DType::F32, &dev).unwrap();
        assert_bits_eq(
            grads.get(x.as_tensor()).unwrap(),
            &ones,
            &format!("{dev:?} p=0 gradient"),
        );
        for p in [1.0, 1.5, -0.1, f32::NAN, f32::INFINITY] {
            let err = fused::dropout(x.as_tensor(), p, 1).unwrap_err();
            assert!(
                err.to_string().contains("outside [0, 1)"),
                "{dev:?} p={p}: {err}"
            );
        }
        let u8s = Tensor::zeros((2, 4), DType::U8, &dev).unwrap();
        assert!(fused::dropout(&u8s, 0.5, 1).is_err(), "{dev:?}: u8");
        if !dev.is_cpu() {
            let f64s = Tensor::zeros((2, 4), DType::F64, &dev).unwrap();
            assert!(
                fused::dropout(&f64s, 0.5, 1).is_err(),
                "{dev:?}: f64 off the CPU"
            );
        }
    }
}
