//! The statistical check bitsandbytes publishes for NF4 (tests/test_functional.py, `test_4bit_quant`):
//! mean absolute error of quantize → dequantize on standard-normal data at blocksize 64.

use qlora_quant::{Blocksize, BnbBackend, QuantType, cpu};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// bitsandbytes' measured NF4 blocksize-64 mean absolute error and its standard deviation over
/// repeated 1024×1024 draws; the band is mean ± 7σ, as their tests allow.
const NF4_BS64_MAE: f64 = 0.072798;
const NF4_BS64_MAE_STD: f64 = 0.000074;

#[test]
fn nf4_mean_absolute_error_is_in_the_published_band() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for draw in 0..3 {
        let x: Vec<f32> = (0..1024 * 1024)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let q = cpu::quantize(&x, QuantType::Nf4, Blocksize::DEFAULT, BnbBackend::Cuda).unwrap();
        let dq: Vec<f32> = cpu::dequantize(
            &q.packed,
            &q.absmax,
            QuantType::Nf4,
            Blocksize::DEFAULT,
            x.len(),
        )
        .unwrap();
        let mae = x
            .iter()
            .zip(&dq)
            .map(|(a, b)| (a - b).abs() as f64)
            .sum::<f64>()
            / x.len() as f64;
        let band = 7.0 * NF4_BS64_MAE_STD;
        assert!(
            (mae - NF4_BS64_MAE).abs() <= band,
            "draw {draw}: MAE {mae} outside {NF4_BS64_MAE} ± {band}"
        );
    }
}
