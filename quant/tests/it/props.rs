//! Properties of the 4-bit quantizer that hold for every input (proptest).

use proptest::prelude::*;
use qlora_quant::cpu::{self, quantize_ref};
use qlora_quant::format::{dynamic_map, pack_pair, unpack_pair};
use qlora_quant::nested::double_quant;
use qlora_quant::{Blocksize, BnbBackend, QuantType};

fn qtype() -> impl Strategy<Value = QuantType> {
    prop_oneof![Just(QuantType::Nf4), Just(QuantType::Fp4)]
}

fn backend() -> impl Strategy<Value = BnbBackend> {
    prop_oneof![Just(BnbBackend::Cuda), Just(BnbBackend::Cpu)]
}

fn blocksize() -> impl Strategy<Value = Blocksize> {
    prop::sample::select(vec![32usize, 64, 128, 256]).prop_map(|b| Blocksize::new(b).unwrap())
}

/// Finite values of normal magnitude, with exact zeros mixed in; lengths include odd counts and
/// partial blocks.
fn values() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(
        prop_oneof![8 => -1e3f32..1e3, 1 => Just(0.0f32), 1 => -1e-3f32..1e-3],
        1..700,
    )
}

/// Half the largest gap between adjacent sorted code values.
fn max_half_gap(qt: QuantType) -> f32 {
    let mut c = *qt.code();
    c.sort_by(|a, b| a.partial_cmp(b).unwrap());
    c.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max) / 2.0
}

fn codes_of(packed: &[u8], n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| {
            let (h, l) = unpack_pair(packed[i / 2]);
            if i % 2 == 0 { h } else { l }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn error_is_bounded_by_half_the_largest_code_gap(x in values(), qt in qtype(), bs in blocksize(), be in backend()) {
        let q = cpu::quantize(&x, qt, bs, be).unwrap();
        let dq: Vec<f32> = cpu::dequantize(&q.packed, &q.absmax, qt, bs, x.len()).unwrap();
        let gap = max_half_gap(qt);
        for (i, (&v, &d)) in x.iter().zip(&dq).enumerate() {
            let am = q.absmax[i / bs.elems()];
            // f32 slack: scaling, the code value and the product are each rounded once.
            let bound = am * gap + am * 4.0 * f32::EPSILON;
            prop_assert!((v - d).abs() <= bound, "elem {i}: |{v} - {d}| > {bound}");
        }
    }

    #[test]
    fn dequantized_values_are_table_entries_times_absmax(x in values(), qt in qtype(), bs in blocksize(), be in backend()) {
        let q = cpu::quantize(&x, qt, bs, be).unwrap();
        let dq: Vec<f32> = cpu::dequantize(&q.packed, &q.absmax, qt, bs, x.len()).unwrap();
        for (i, d) in dq.iter().enumerate() {
            let am = q.absmax[i / bs.elems()];
            prop_assert!(qt.code().iter().any(|c| (c * am).to_bits() == d.to_bits()), "elem {i}: {d}");
        }
    }

    #[test]
    fn requantizing_the_dequantized_tensor_is_the_identity(x in values(), qt in qtype(), bs in blocksize(), be in backend()) {
        let q = cpu::quantize(&x, qt, bs, be).unwrap();
        let dq: Vec<f32> = cpu::dequantize(&q.packed, &q.absmax, qt, bs, x.len()).unwrap();
        let q2 = cpu::quantize(&dq, qt, bs, be).unwrap();
        prop_assert_eq!(&q2.absmax, &q.absmax);
        if qt == QuantType::Nf4 {
            prop_assert_eq!(&q2.packed, &q.packed);
        } else {
            // FP4 has two zeros (codes 0 and 8, +0 and -0): equal up to which zero, i.e. same values.
            let dq2: Vec<f32> = cpu::dequantize(&q2.packed, &q2.absmax, qt, bs, x.len()).unwrap();
            prop_assert_eq!(dq2, dq);
        }
    }

    #[test]
    fn pack_unpack_is_the_identity(codes in prop::collection::vec(0u8..16, 0..300)) {
        let packed: Vec<u8> = codes.chunks(2).map(|p| pack_pair(p[0], *p.get(1).unwrap_or(&0))).collect();
        prop_assert_eq!(codes_of(&packed, codes.len()), codes);
    }

    #[test]
    fn zero_blocks_round_trip_to_zeros(n in 1usize..600, qt in qtype(), bs in blocksize(), be in backend()) {
        let x = vec![0f32; n];
        let q = cpu::quantize(&x, qt, bs, be).unwrap();
        let dq: Vec<f32> = cpu::dequantize(&q.packed, &q.absmax, qt, bs, n).unwrap();
        prop_assert!(dq.iter().all(|v| *v == 0.0 && !v.is_nan()));
    }

    #[test]
    fn scaling_a_block_by_a_power_of_two_keeps_its_codes(x in values(), qt in qtype(), bs in blocksize(), be in backend(), k in -20i32..20) {
        // Powers of two scale exactly in f32, so x·c / absmax(x·c) is the same number as x / absmax.
        let c = 2f32.powi(k);
        let q = cpu::quantize(&x, qt, bs, be).unwrap();
        let scaled: Vec<f32> = x.iter().map(|v| v * c).collect();
        let qs = cpu::quantize(&scaled, qt, bs, be).unwrap();
        prop_assert_eq!(qs.packed, q.packed);
    }

    #[test]
    fn fast_paths_are_bit_identical_to_the_references(x in values(), qt in qtype(), bs in blocksize(), be in backend()) {
        let fast = cpu::quantize(&x, qt, bs, be).unwrap();
        let reference = quantize_ref(&x, qt, bs, be).unwrap();
        prop_assert_eq!(&fast, &reference);
        let a: Vec<f32> = cpu::dequantize(&fast.packed, &fast.absmax, qt, bs, x.len()).unwrap();
        let b: Vec<f32> = cpu::dequantize_ref(&fast.packed, &fast.absmax, qt, bs, x.len());
        prop_assert_eq!(a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), b.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        let a: Vec<half::bf16> = cpu::dequantize(&fast.packed, &fast.absmax, qt, bs, x.len()).unwrap();
        let b: Vec<half::bf16> = cpu::dequantize_ref(&fast.packed, &fast.absmax, qt, bs, x.len());
        prop_assert_eq!(a, b);
    }

    #[test]
    // Absmax values log-uniform over 1e-4..10, drawn through integers: proptest 1.12's f32 range
    // sampler trips its own debug assertion on ranges spanning this many binades.
    fn double_quant_absmax_error_is_bounded_by_the_map_gap(absmax in prop::collection::vec(
        (0u32..=1_000_000).prop_map(|k| 1e-4f32 * 10f32.powf(5.0 * k as f32 / 1e6)), 1..1200),
        be in backend()) {
        let map = dynamic_map();
        // CUDA picks the nearest entry; the CPU's table first moves the value to its grid of
        // [-1, 1] (step 2/65535), at most half a step.
        let half_gap = map.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max) / 2.0
            + if be == BnbBackend::Cpu { 1.0 / 65535.0 } else { 0.0 };
        let nested = double_quant(&absmax, be);
        for (b, &a) in absmax.iter().enumerate() {
            let scale = nested.nested_absmax[b / 256];
            // Rounding slack: the centring, the division, the product and the add each round once.
            let bound = half_gap * scale + 4.0 * f32::EPSILON * (a.abs() + nested.offset.abs());
            let err = (nested.absmax(b) - a).abs();
            prop_assert!(err <= bound, "block {b}: {err} > {bound}");
        }
    }
}
