//! The candle ops against dense references built from primitive candle ops.

use candle_core::{DType, Device, Tensor, Var};
use qlora_quant::{Blocksize, Nf4Tensor, QuantType, cpu, nf4_linear, nf4_matmul};

/// f32 matmuls that sum in a different order (tiles vs one gemm) agree to this relative error.
const F32_MATMUL_REL_TOL: f32 = 1e-5;

fn rand(shape: &[usize], seed: u64) -> Tensor {
    // A deterministic, sign-mixed pattern (candle's CPU RNG is not seedable per call).
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
            ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

pub(crate) fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let b = b
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

fn weight(out: usize, inp: usize, qt: QuantType, dq: bool) -> (Nf4Tensor, Tensor) {
    let w = rand(&[out, inp], 7);
    let q = Nf4Tensor::quantize(&w, qt, Blocksize::DEFAULT, dq).unwrap();
    let dense = q.dequantize(DType::F32).unwrap();
    (q, dense)
}

#[test]
fn dequantize_op_matches_the_cpu_reference_in_every_dtype() {
    let (q, _) = weight(40, 96, QuantType::Nf4, true);
    let host = q.to_quantized().unwrap();
    let absmax = host.absmax.decoded();
    let r32: Vec<f32> = cpu::dequantize_ref(
        &host.packed,
        &absmax,
        host.quant_type,
        host.blocksize,
        host.n_elems(),
    );
    let got = q.dequantize(DType::F32).unwrap();
    assert_eq!(got.dims(), &[40, 96]);
    assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), r32);
    let rbf: Vec<half::bf16> = cpu::dequantize_ref(
        &host.packed,
        &absmax,
        host.quant_type,
        host.blocksize,
        host.n_elems(),
    );
    assert_eq!(
        q.dequantize(DType::BF16)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<half::bf16>()
            .unwrap(),
        rbf
    );
    let rf16: Vec<half::f16> = cpu::dequantize_ref(
        &host.packed,
        &absmax,
        host.quant_type,
        host.blocksize,
        host.n_elems(),
    );
    assert_eq!(
        q.dequantize(DType::F16)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<half::f16>()
            .unwrap(),
        rf16
    );
}

/// Forward and backward of the 4-bit linear equal the dense composition on the dequantized weight.
fn check_linear(out: usize, inp: usize, x_shape: &[usize], qt: QuantType) {
    let (q, dense) = weight(out, inp, qt, true);
    let x = Var::from_tensor(&rand(x_shape, 3)).unwrap();
    let y = nf4_linear(x.as_tensor(), &q).unwrap();
    let y_ref = x.as_tensor().broadcast_matmul(&dense.t().unwrap()).unwrap();
    assert_eq!(y.dims(), y_ref.dims());
    let d = max_rel_diff(&y, &y_ref);
    assert!(
        d <= F32_MATMUL_REL_TOL,
        "forward {out}x{inp}: max rel diff {d:e}"
    );

    // A loss that weights every output differently, so the gradient has no symmetry to hide behind.
    let r = rand(y.dims(), 11);
    let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let grads_ref = (y_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gx = grads.get(x.as_tensor()).expect("x gets a gradient");
    let gx_ref = grads_ref.get(x.as_tensor()).unwrap();
    let d = max_rel_diff(gx, gx_ref);
    assert!(
        d <= F32_MATMUL_REL_TOL,
        "backward {out}x{inp}: max rel diff {d:e}"
    );
    // The weight is not an input of the graph: nothing of it receives a gradient.
    assert!(grads.get(q.packed()).is_none());
}

#[test]
fn nf4_linear_forward_and_backward_equal_the_dense_op() {
    check_linear(96, 128, &[2, 5, 128], QuantType::Nf4);
    check_linear(200, 192, &[7, 192], QuantType::Nf4); // a partial last tile of rows (200 = 3·64 + 8)
    check_linear(64, 320, &[1, 320], QuantType::Fp4); // one token, a partial last column tile
    check_linear(33, 65, &[3, 65], QuantType::Nf4); // odd inner dim: the whole-matrix path
}

#[test]
fn nf4_matmul_is_the_other_orientation() {
    let (q, dense) = weight(96, 128, QuantType::Nf4, false);
    let x = Var::from_tensor(&rand(&[4, 96], 5)).unwrap();
    let y = nf4_matmul(x.as_tensor(), &q).unwrap();
    let y_ref = x.as_tensor().matmul(&dense).unwrap();
    assert!(max_rel_diff(&y, &y_ref) <= F32_MATMUL_REL_TOL);
    let g = y.sum_all().unwrap().backward().unwrap();
    let g_ref = y_ref.sum_all().unwrap().backward().unwrap();
    assert!(
        max_rel_diff(
            g.get(x.as_tensor()).unwrap(),
            g_ref.get(x.as_tensor()).unwrap()
        ) <= F32_MATMUL_REL_TOL
    );
}

#[test]
fn half_precision_inputs_compute_in_f32_and_round_once() {
    let (q, dense) = weight(64, 128, QuantType::Nf4, true);
    let x = rand(&[3, 128], 9);
    let y32 = x.matmul(&dense.t().unwrap()).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let y = nf4_linear(&x.to_dtype(dtype).unwrap(), &q).unwrap();
        assert_eq!(y.dtype(), dtype);
        // Input rounding (2^-8 relative for bf16) dominates; the result is rounded once more.
        let d = max_rel_diff(&y, &y32);
        assert!(d <= 2e-2, "{dtype:?}: {d:e}");
    }
}

#[test]
fn wrong_inner_dimension_is_an_error_not_a_panic() {
    let (q, _) = weight(64, 128, QuantType::Nf4, false);
    let err = nf4_linear(&rand(&[2, 64], 1), &q).unwrap_err().to_string();
    assert!(err.contains("must be contiguous and end with 128"), "{err}");
}
