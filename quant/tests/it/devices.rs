//! One test body per case, run on every available device: the CPU always, and CUDA when built
//! with `--features cuda` and `Device::new_cuda(0)` succeeds (otherwise each test prints
//! "skipped: no CUDA device" and checks the CPU alone). Every device is compared with the host
//! references (`cpu::dequantize_ref`, f32 dense matmuls on the CPU).

use candle_core::{DType, Device, Tensor, Var};
use qlora_quant::tensor::AbsmaxTensor;
use qlora_quant::{Blocksize, Nf4Tensor, QuantType, Quantized, cpu, nf4_linear, nf4_matmul};

/// f32 matmuls summing in another order (tiles, cuBLAS) agree with one f32 gemm to this relative
/// error (of max |reference|); cuBLAS runs f32 without TF32 (candle's default).
const F32_MATMUL_REL_TOL: f32 = 1e-5;
/// bf16 x, against the f32 product of the same (rounded) inputs: the CPU multiplies in f32 and
/// rounds once (a half-ulp, 2^-9 relative); CUDA also rounds the dequantized weight to bf16 before
/// the gemm (a half-ulp per product, mostly cancelling over the sum) and rounds the result. Bound:
/// 8 half-ulps of max |y|, 2^-6.
const BF16_MATMUL_REL_TOL: f32 = 1.0 / 64.0;
/// f16 has 3 more mantissa bits than bf16: the same 8 half-ulps are 2^-9.
const F16_MATMUL_REL_TOL: f32 = 1.0 / 512.0;

/// The CPU, plus CUDA device 0 when there is one.
pub fn devices() -> Vec<Device> {
    #[allow(unused_mut)]
    let mut devices = vec![Device::Cpu];
    #[cfg(feature = "cuda")]
    match Device::new_cuda(0) {
        Ok(d) => devices.push(d),
        Err(e) => eprintln!("skipped: no CUDA device ({e}); checked the CPU only"),
    }
    #[cfg(not(feature = "cuda"))]
    eprintln!("skipped: no CUDA device (built without --features cuda); checked the CPU only");
    devices
}

/// Deterministic sign-mixed values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
            ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn host_tensor(shape: &[usize], seed: u64) -> Tensor {
    Tensor::from_vec(values(shape.iter().product(), seed), shape, &Device::Cpu).unwrap()
}

fn to_f32_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Bit patterns of a tensor's values (so -0.0 ≠ +0.0 and NaN payloads count).
fn bits(t: &Tensor) -> Vec<u32> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits() as u32)
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits() as u32)
            .collect(),
        other => panic!("no bit view for {other:?}"),
    }
}

/// Bit patterns of the CPU reference dequantization in `dtype`.
fn reference_bits(q: &Quantized, dtype: DType) -> Vec<u32> {
    let absmax = q.absmax.decoded();
    let (p, qt, bs, n) = (&q.packed, q.quant_type, q.blocksize, q.n_elems());
    match dtype {
        DType::F32 => cpu::dequantize_ref::<f32>(p, &absmax, qt, bs, n)
            .iter()
            .map(|v| v.to_bits())
            .collect(),
        DType::BF16 => cpu::dequantize_ref::<half::bf16>(p, &absmax, qt, bs, n)
            .iter()
            .map(|v| v.to_bits() as u32)
            .collect(),
        DType::F16 => cpu::dequantize_ref::<half::f16>(p, &absmax, qt, bs, n)
            .iter()
            .map(|v| v.to_bits() as u32)
            .collect(),
        other => panic!("no reference for {other:?}"),
    }
}

fn assert_bits_eq(got: &[u32], want: &[u32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} values differ; first at {:?}: got {:#x}, want {:#x}",
        bad.len(),
        got.len(),
        &bad[..bad.len().min(8)],
        got[bad[0]],
        want[bad[0]]
    );
}

/// Quantized weights of `n` values: sign-mixed, with the last `zero_tail` set to 0 (an all-zero
/// partial block dequantizes through the 1e-38 floor into subnormals).
fn quantized(n: usize, zero_tail: usize, qt: QuantType, bs: usize, dq: bool) -> Quantized {
    let mut v = values(n, n as u64);
    for x in v.iter_mut().rev().take(zero_tail) {
        *x = 0.0;
    }
    Quantized::quantize(&v, &[n], DType::F32, qt, Blocksize::new(bs).unwrap(), dq).unwrap()
}

#[test]
fn dequantize_is_bit_identical_to_the_cpu_reference_on_every_device() {
    // (elements, zero tail, blocksize): single values, odd counts, partial blocks, > 256 blocks
    // (several nested scales), runs spanning CUDA blocks (8192 elements each), a zero last block.
    let cases = [
        (1, 0, 64),
        (15, 0, 32),
        (31, 0, 64),
        (33, 0, 32),
        (231, 0, 64),
        (4160, 0, 128),
        (9617, 0, 32),
        (100_003, 0, 4096),
        (65_536 + 10, 10, 64),
    ];
    for dev in devices() {
        for &(n, zeros, bs) in &cases {
            for qt in [QuantType::Nf4, QuantType::Fp4] {
                for dq in [false, true] {
                    let q = quantized(n, zeros, qt, bs, dq);
                    let w = Nf4Tensor::new(&q, &dev).unwrap();
                    for dtype in [DType::F32, DType::BF16, DType::F16] {
                        let got = w.dequantize(dtype).unwrap();
                        assert_eq!(got.dims(), &[n]);
                        assert_eq!(got.dtype(), dtype);
                        let what = format!("{dev:?} {qt} dq={dq} n={n} bs={bs} {dtype:?}");
                        assert_bits_eq(&bits(&got), &reference_bits(&q, dtype), &what);
                    }
                }
            }
        }
    }
}

#[test]
fn dequantize_from_unaligned_parts_takes_the_scalar_path_and_agrees() {
    // Packed codes starting one byte into their buffer: not 16-byte aligned, so the CUDA kernel
    // cannot use its vector loads.
    let q = quantized(4099, 0, QuantType::Nf4, 64, true);
    let Some(nested) = (match &q.absmax {
        qlora_quant::Absmax::Nested(n) => Some(n.clone()),
        qlora_quant::Absmax::Plain(_) => None,
    }) else {
        panic!("asked for double quantization")
    };
    for dev in devices() {
        let mut shifted = vec![0xA5u8];
        shifted.extend_from_slice(&q.packed);
        let buf = Tensor::from_vec(shifted, q.packed.len() + 1, &dev).unwrap();
        let packed = buf.narrow(0, 1, q.packed.len()).unwrap();
        let absmax = AbsmaxTensor::Nested {
            codes: Tensor::from_slice(&nested.codes, nested.codes.len(), &dev).unwrap(),
            nested_absmax: Tensor::from_slice(
                &nested.nested_absmax,
                nested.nested_absmax.len(),
                &dev,
            )
            .unwrap(),
            offset: nested.offset,
        };
        let w = Nf4Tensor::from_parts(
            packed,
            absmax,
            q.quant_type,
            q.blocksize,
            q.shape.clone(),
            q.dtype,
        )
        .unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let got = w.dequantize(dtype).unwrap();
            let what = format!("{dev:?} unaligned {dtype:?}");
            assert_bits_eq(&bits(&got), &reference_bits(&q, dtype), &what);
        }
    }
}

#[test]
fn from_parts_rejects_what_does_not_fit() {
    let q = quantized(256, 0, QuantType::Nf4, 64, false);
    let absmax = q.absmax.decoded().to_vec();
    for dev in devices() {
        let packed = Tensor::from_slice(&q.packed, q.packed.len(), &dev).unwrap();
        let short = AbsmaxTensor::Plain(Tensor::from_slice(&absmax[..3], 3, &dev).unwrap());
        let err = Nf4Tensor::from_parts(
            packed.clone(),
            short,
            QuantType::Nf4,
            Blocksize::DEFAULT,
            256,
            DType::F32,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("absmax is F32 [3]") && err.contains("[4]"),
            "{err}"
        );
        let wrong_dtype = AbsmaxTensor::Plain(
            Tensor::from_slice(&absmax, 4, &dev)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap(),
        );
        assert!(
            Nf4Tensor::from_parts(
                packed,
                wrong_dtype,
                QuantType::Nf4,
                Blocksize::DEFAULT,
                256,
                DType::F32
            )
            .is_err()
        );
    }
}

/// Max |a − b| over max |b|.
fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

fn matmul_tol(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => BF16_MATMUL_REL_TOL,
        DType::F16 => F16_MATMUL_REL_TOL,
        _ => F32_MATMUL_REL_TOL,
    }
}

/// Forward and backward of the 4-bit matmul in `dtype` on `dev` against f32 dense products on the
/// host (of the dequantized f32 weight and the `dtype`-rounded input).
fn check_matmul(dev: &Device, (out, inp): (usize, usize), x_shape: &[usize], transposed: bool) {
    let q = Quantized::quantize(
        &values(out * inp, 7),
        &[out, inp],
        DType::F32,
        QuantType::Nf4,
        Blocksize::DEFAULT,
        true,
    )
    .unwrap();
    let w = Nf4Tensor::new(&q, dev).unwrap();
    let dense = Tensor::from_vec(q.dequantize::<f32>().unwrap(), (out, inp), &Device::Cpu).unwrap();
    let rhs = if transposed {
        dense.t().unwrap()
    } else {
        dense
    };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let x_host = host_tensor(x_shape, 3).to_dtype(dtype).unwrap();
        let x = Var::from_tensor(&x_host.to_device(dev).unwrap()).unwrap();
        let y = if transposed {
            nf4_linear(x.as_tensor(), &w).unwrap()
        } else {
            nf4_matmul(x.as_tensor(), &w).unwrap()
        };
        assert_eq!(y.dtype(), dtype);
        let x32 = x_host.to_dtype(DType::F32).unwrap();
        let y_ref = x32.broadcast_matmul(&rhs).unwrap();
        assert_eq!(y.dims(), y_ref.dims());
        let what = format!("{dev:?} {out}x{inp} transposed={transposed} {dtype:?}");
        let d = max_rel_diff(&to_f32_vec(&y), &to_f32_vec(&y_ref));
        assert!(d <= matmul_tol(dtype), "{what} forward: max rel diff {d:e}");

        // dL/dx for L = Σ y ⊙ r is r · Wᵀᵀ: the backward re-dequantizes in the other orientation.
        let r_host = host_tensor(y.dims(), 11);
        let r = r_host.to_dtype(dtype).unwrap().to_device(dev).unwrap();
        let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = grads.get(x.as_tensor()).expect("x gets a gradient");
        assert_eq!(gx.dtype(), dtype);
        let r32 = r_host
            .to_dtype(dtype)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let gx_ref = r32.broadcast_matmul(&rhs.t().unwrap()).unwrap();
        let d = max_rel_diff(&to_f32_vec(gx), &to_f32_vec(&gx_ref));
        assert!(
            d <= matmul_tol(dtype),
            "{what} backward: max rel diff {d:e}"
        );
        assert!(
            grads.get(w.packed()).is_none(),
            "the weight gets no gradient"
        );
    }
}

#[test]
fn nf4_matmul_forward_and_backward_match_the_host_on_every_device() {
    for dev in devices() {
        check_matmul(&dev, (96, 128), &[2, 5, 128], true);
        check_matmul(&dev, (200, 192), &[7, 192], true);
        check_matmul(&dev, (33, 65), &[3, 65], true); // odd inner dim
        check_matmul(&dev, (96, 128), &[4, 96], false); // x · W
        check_matmul(&dev, (40, 34), &[1, 40], false);
    }
}

#[test]
fn inputs_on_another_device_than_the_weight_are_an_error() {
    let q = quantized(64 * 32, 0, QuantType::Nf4, 64, false);
    let q = Quantized {
        shape: vec![64, 32],
        ..q
    };
    let host_w = Nf4Tensor::new(&q, &Device::Cpu).unwrap();
    for dev in devices().into_iter().filter(|d| !d.is_cpu()) {
        let x = host_tensor(&[2, 32], 1).to_device(&dev).unwrap();
        let err = nf4_linear(&x, &host_w).unwrap_err().to_string();
        assert!(err.contains("not on the CUDA device"), "{err}");
    }
}
