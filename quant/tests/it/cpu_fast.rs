//! The CPU training path's own ops against the compositions they replace (candle's primitive ops
//! and autograd, which the model tests check against transformers and finite differences):
//! the QLoRA linear as one op (forward and the gradients of x, A and B, with and without dropout),
//! the head's cross-entropy in one pass (loss and gradient), and the fused ops' row loops on enough
//! rows to be split across rayon tasks.

use crate::fused::uniform;
use crate::ops::max_rel_diff;
use candle_core::{DType, Device, Tensor, Var};
use qlora_quant::{Blocksize, Nf4Tensor, QuantType, fused, nf4_linear};

/// f32 products summed in another order (gemm tiles, accumulation into the output); relative to
/// max |reference|.
const TOL: f32 = 2e-5;

fn assert_close(a: &Tensor, b: &Tensor, what: &str) {
    let d = max_rel_diff(a, b);
    assert!(d <= TOL, "{what}: relative difference {d:e} > {TOL:e}");
}

/// The model's composed LoRA linear: `nf4_linear(x) + (drop(x) · Aᵀ) · (s·B)ᵀ`.
fn lora_composed(
    x: &Tensor,
    w: &Nf4Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f32,
    dropout: Option<fused::DropoutSpec>,
) -> Tensor {
    let xd = match dropout {
        Some(d) => fused::dropout_rows(x, d.p, d.seed, d.rows).unwrap(),
        None => x.clone(),
    };
    let inp = a.dim(1).unwrap();
    let out = b.dim(0).unwrap();
    let mut dims = x.dims().to_vec();
    *dims.last_mut().unwrap() = out;
    let h = xd
        .reshape(((), inp))
        .unwrap()
        .matmul(&a.t().unwrap())
        .unwrap();
    let lora = h
        .matmul(&(b * f64::from(scale)).unwrap().t().unwrap())
        .unwrap()
        .reshape(dims)
        .unwrap();
    (nf4_linear(x, w).unwrap() + lora).unwrap()
}

#[test]
fn lora_nf4_linear_matches_the_composition_forward_and_gradients() {
    // 2 × 160 rows, out 384, in 256, r 16: the products are large enough for gemm's parallel
    // path, and 384 rows of W are 6 tiles of the NF4 linear.
    let (out, inp, r) = (384, 256, 16);
    let w = Nf4Tensor::quantize(
        &uniform(&[out, inp], 1, -0.1, 0.1),
        QuantType::Nf4,
        Blocksize::DEFAULT,
        true,
    )
    .unwrap();
    let x0 = uniform(&[2, 160, inp], 2, -1.0, 1.0);
    let a0 = uniform(&[r, inp], 3, -0.06, 0.06);
    let b0 = uniform(&[out, r], 4, -0.05, 0.05);
    let ry = uniform(&[2, 160, out], 5, -1.0, 1.0);
    let scale = 2.5f32;
    // Rows 3 and 7 of a rank's interleaved share: the op numbers the mask as `dropout_rows` does.
    let spec = |first, step| fused::DropoutSpec {
        p: 0.1,
        seed: 77,
        rows: fused::MaskRows { first, step },
    };
    for dropout in [None, Some(spec(0, 1)), Some(spec(3, 4))] {
        let run = |fused_op: bool| {
            let (x, a, b) = (
                Var::from_tensor(&x0).unwrap(),
                Var::from_tensor(&a0).unwrap(),
                Var::from_tensor(&b0).unwrap(),
            );
            let y = if fused_op {
                fused::lora_nf4_linear(
                    x.as_tensor(),
                    &w,
                    a.as_tensor(),
                    b.as_tensor(),
                    scale,
                    dropout,
                )
                .unwrap()
            } else {
                lora_composed(
                    x.as_tensor(),
                    &w,
                    a.as_tensor(),
                    b.as_tensor(),
                    scale,
                    dropout,
                )
            };
            let g = (&y * &ry).unwrap().sum_all().unwrap().backward().unwrap();
            let get = |v: &Var| g.get(v.as_tensor()).expect("a gradient").clone();
            (y, get(&x), get(&a), get(&b))
        };
        let (y, dx, da, db) = run(true);
        let (y_ref, dx_ref, da_ref, db_ref) = run(false);
        let what = format!("dropout {dropout:?}");
        assert_close(&y, &y_ref, &format!("{what}: y"));
        assert_close(&dx, &dx_ref, &format!("{what}: dx"));
        assert_close(&da, &da_ref, &format!("{what}: dA"));
        assert_close(&db, &db_ref, &format!("{what}: dB"));
        // The adapter contributes: the op is not the base alone.
        assert!(
            max_rel_diff(&y, &nf4_linear(&x0, &w).unwrap()) > 1e-3,
            "{what}"
        );
    }
}

#[test]
fn lora_nf4_linear_refuses_what_it_does_not_compute() {
    let w = Nf4Tensor::quantize(
        &uniform(&[8, 64], 1, -1.0, 1.0),
        QuantType::Nf4,
        Blocksize::DEFAULT,
        true,
    )
    .unwrap();
    let (a, b) = (Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap(), {
        Tensor::zeros((8, 4), DType::F32, &Device::Cpu).unwrap()
    });
    let x = uniform(&[3, 64], 2, -1.0, 1.0);
    assert!(fused::lora_nf4_linear(&x, &w, &a, &b, 1.0, None).is_ok());
    let half = x.to_dtype(DType::F16).unwrap();
    assert!(fused::lora_nf4_linear(&half, &w, &a, &b, 1.0, None).is_err());
    let wrong_a = Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap();
    assert!(fused::lora_nf4_linear(&x, &w, &wrong_a, &b, 1.0, None).is_err());
}

#[test]
fn head_cross_entropy_cpu_matches_the_composition() {
    // 150 rows: two full blocks of 64 and a partial one.
    let (n, hd, v) = (150, 48, 1000);
    let h0 = uniform(&[n, hd], 11, -1.0, 1.0);
    let w = uniform(&[v, hd], 12, -0.5, 0.5);
    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 3) % v as u32).collect();
    let (loss, dh) = fused::head_cross_entropy_cpu(&h0, &w, &targets).unwrap();

    let h = Var::from_tensor(&h0).unwrap();
    let logits = h.as_tensor().matmul(&w.t().unwrap()).unwrap();
    let t = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
    let nll = fused::cross_entropy_ref(&logits, &t)
        .unwrap()
        .sum_all()
        .unwrap();
    let loss_ref = f64::from(nll.to_scalar::<f32>().unwrap());
    let g = nll.backward().unwrap();
    let dh_ref = g.get(h.as_tensor()).unwrap();
    assert!(
        (loss - loss_ref).abs() <= 1e-5 * loss_ref.abs(),
        "loss {loss} vs {loss_ref}"
    );
    assert_close(&dh, dh_ref, "dh");

    let err = fused::head_cross_entropy_cpu(&h0, &w, &vec![v as u32; n]).unwrap_err();
    assert!(err.to_string().contains("vocabulary"), "{err}");
    assert!(fused::head_cross_entropy_cpu(&h0, &w, &targets[1..]).is_err());
}

/// The row loops split their rows across rayon tasks (16 Ki elements each): on 300 rows of 128
/// every op runs in several tasks, whose rows must land where the composition puts them.
#[test]
fn fused_row_loops_split_across_tasks_match_the_composition() {
    let x = uniform(&[300, 128], 21, -2.0, 2.0);
    let wn = uniform(&[128], 22, 0.5, 1.5);
    let close = |a: candle_core::Result<Tensor>, b: candle_core::Result<Tensor>, what: &str| {
        assert_close(&a.unwrap(), &b.unwrap(), what)
    };
    close(
        fused::rms_norm_fused(&x, &wn, 1e-5),
        fused::rms_norm_ref(&x, &wn, 1e-5),
        "rms_norm",
    );
    close(fused::swiglu_fused(&x), fused::swiglu_ref(&x), "swiglu");
    close(
        fused::softmax_last_dim_fused(&x),
        fused::softmax_last_dim_ref(&x),
        "softmax",
    );
    let t = Tensor::new(
        (0..300u32).map(|i| i % 128).collect::<Vec<_>>().as_slice(),
        &Device::Cpu,
    )
    .unwrap();
    close(
        fused::cross_entropy_fused(&x, &t),
        fused::cross_entropy_ref(&x, &t),
        "cross_entropy",
    );
    let q = uniform(&[1, 6, 300, 32], 23, -1.0, 1.0);
    let cos = uniform(&[1, 1, 300, 32], 24, -1.0, 1.0);
    let sin = uniform(&[1, 1, 300, 32], 25, -1.0, 1.0);
    close(
        fused::rope_fused(&q, &cos, &sin),
        fused::rope_ref(&q, &cos, &sin),
        "rope",
    );
    // And the backward loops, through autograd on both sides.
    for (what, op, reference) in [
        (
            "rms_norm backward",
            Box::new(|x: &Tensor| fused::rms_norm_fused(x, &wn, 1e-5))
                as Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor>>,
            Box::new(|x: &Tensor| fused::rms_norm_ref(x, &wn, 1e-5))
                as Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor>>,
        ),
        (
            "swiglu backward",
            Box::new(|x: &Tensor| fused::swiglu_fused(x)),
            Box::new(|x: &Tensor| fused::swiglu_ref(x)),
        ),
        (
            "softmax backward",
            Box::new(|x: &Tensor| fused::softmax_last_dim_fused(x)),
            Box::new(|x: &Tensor| fused::softmax_last_dim_ref(x)),
        ),
    ] {
        let grad = |f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>| {
            let v = Var::from_tensor(&x).unwrap();
            let y = f(v.as_tensor()).unwrap();
            let r = uniform(y.dims(), 26, -1.0, 1.0);
            let g = (y * r).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(v.as_tensor()).unwrap().clone()
        };
        assert_close(&grad(&*op), &grad(&*reference), what);
    }
}
