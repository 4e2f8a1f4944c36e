//! The fused ops (`qlora_quant::fused`) against their candle compositions, forward and backward,
//! on every device (see [`crate::devices::devices`]) and in f32, bf16 and f16. On the CPU this
//! checks the ops' own CPU loops (the kernels' formulas, derivatives included) against candle's
//! autograd; on CUDA it checks the kernels.

use crate::devices::devices;
use candle_core::{DType, Device, Tensor, Var};
use qlora_quant::fused;

/// f32: the op and the composition differ in summation order and in `exp` (CUDA's `expf` is
/// within 2 ulp); relative to max |reference|.
const F32_TOL: f32 = 2e-5;
/// bf16: both round to bf16 at the same points, but intermediate values computed in f32 by the
/// op are rounded to bf16 by some of the composition's primitives (silu, products): a few
/// half-ulps, 2^-6.
const BF16_TOL: f32 = 1.0 / 64.0;
/// f16: the same steps with 3 more mantissa bits, 2^-9.
const F16_TOL: f32 = 1.0 / 512.0;

fn tol(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => BF16_TOL,
        DType::F16 => F16_TOL,
        _ => F32_TOL,
    }
}

/// Deterministic values in [lo, hi).
pub(crate) fn uniform(shape: &[usize], seed: u64, lo: f32, hi: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
            lo + (hi - lo) * ((h >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

pub(crate) fn host_f32(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Asserts max |a − b| ≤ tol · max |b| (infinities must match exactly), printing where it fails.
fn assert_close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shape");
    let (a, b) = (host_f32(a), host_f32(b));
    let scale = b
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(1e-12);
    let mut worst = (0f32, 0usize);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let d = if x == y { 0.0 } else { (x - y).abs() };
        if d.is_nan() || d > worst.0 {
            worst = (if d.is_nan() { f32::INFINITY } else { d }, i);
        }
    }
    assert!(
        worst.0 <= tol * scale,
        "{what}: max |Δ| {:e} (relative {:e} > {tol:e}) at {}: {} vs {}",
        worst.0,
        worst.0 / scale,
        worst.1,
        a[worst.1],
        b[worst.1]
    );
}

/// Runs `op` (fused, on `dev`) and `reference` (the composition, on the CPU) on the same inputs,
/// compares outputs and the gradient of `Σ y ⊙ r` with respect to the first input.
fn check<F, R>(dev: &Device, dtype: DType, inputs: &[Tensor], what: &str, op: F, reference: R)
where
    F: Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    R: Fn(&[Tensor]) -> candle_core::Result<Tensor>,
{
    let what = format!("{what} {dev:?} {dtype:?}");
    let cast = |t: &Tensor, d: &Device| {
        if t.dtype() == DType::U32 {
            t.to_device(d).unwrap()
        } else {
            t.to_dtype(dtype).unwrap().to_device(d).unwrap()
        }
    };
    let x_dev = Var::from_tensor(&cast(&inputs[0], dev)).unwrap();
    let x_ref = Var::from_tensor(&cast(&inputs[0], &Device::Cpu)).unwrap();
    let mut args_dev = vec![x_dev.as_tensor().clone()];
    let mut args_ref = vec![x_ref.as_tensor().clone()];
    for t in &inputs[1..] {
        args_dev.push(cast(t, dev));
        args_ref.push(cast(t, &Device::Cpu));
    }
    let y = op(&args_dev).unwrap();
    let y_ref = reference(&args_ref).unwrap();
    assert_close(&y, &y_ref, tol(dtype), &format!("{what} forward"));

    let r = uniform(y.dims(), 99, -1.0, 1.0)
        .to_dtype(y.dtype())
        .unwrap();
    let g = (y * r.to_device(dev).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g_ref = (y_ref * r).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = g.get(x_dev.as_tensor()).expect("the input gets a gradient");
    let dx_ref = g_ref
        .get(x_ref.as_tensor())
        .expect("the reference input gets a gradient");
    assert_eq!(dx.dtype(), dtype, "{what}: gradient dtype");
    assert_close(dx, dx_ref, tol(dtype), &format!("{what} backward"));
}

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

#[test]
fn rms_norm_fused_matches_the_composition() {
    // Rows shorter than a block of 256 threads, and longer (each thread loops, with a tail).
    for (shape, h) in [(&[2, 3, 96][..], 96), (&[3, 300][..], 300)] {
        let x = uniform(shape, 1, -2.0, 2.0);
        let w = uniform(&[h], 2, 0.5, 1.5);
        for dev in devices() {
            for dtype in DTYPES {
                check(
                    &dev,
                    dtype,
                    &[x.clone(), w.clone()],
                    "rms_norm",
                    |a| fused::rms_norm_fused(&a[0], &a[1], 1e-5),
                    |a| fused::rms_norm_ref(&a[0], &a[1], 1e-5),
                );
            }
        }
    }
}

#[test]
fn rope_fused_matches_the_composition() {
    let x = uniform(&[2, 3, 5, 16], 3, -1.0, 1.0);
    // Full rotation with per-batch tables, and a partial one (8 of 16 dims) with shared tables.
    let tables = [
        (
            uniform(&[2, 1, 5, 16], 4, -1.0, 1.0),
            uniform(&[2, 1, 5, 16], 5, -1.0, 1.0),
        ),
        (
            uniform(&[1, 1, 5, 8], 6, -1.0, 1.0),
            uniform(&[1, 1, 5, 8], 7, -1.0, 1.0),
        ),
    ];
    for dev in devices() {
        for dtype in DTYPES {
            for (cos, sin) in &tables {
                let inputs = [x.clone(), cos.clone(), sin.clone()];
                check(
                    &dev,
                    dtype,
                    &inputs,
                    "rope",
                    |a| fused::rope_fused(&a[0], &a[1], &a[2]),
                    |a| fused::rope_ref(&a[0], &a[1], &a[2]),
                );
            }
        }
    }
}

#[test]
fn swiglu_fused_matches_the_composition() {
    let gu = uniform(&[3, 7, 80], 8, -4.0, 4.0);
    for dev in devices() {
        for dtype in DTYPES {
            check(
                &dev,
                dtype,
                std::slice::from_ref(&gu),
                "swiglu",
                |a| fused::swiglu_fused(&a[0]),
                |a| fused::swiglu_ref(&a[0]),
            );
        }
    }
}

#[test]
fn softmax_fused_matches_the_composition_with_masked_entries() {
    let mut v = host_f32(&uniform(&[2, 4, 33], 9, -6.0, 6.0));
    // An additive causal-style mask: −∞ on some entries of every row (never a whole row).
    for (i, x) in v.iter_mut().enumerate() {
        if i % 33 > 20 && (i / 33) % 2 == 0 {
            *x = f32::NEG_INFINITY;
        }
    }
    let x = Tensor::from_vec(v, (2, 4, 33), &Device::Cpu).unwrap();
    for dev in devices() {
        for dtype in DTYPES {
            check(
                &dev,
                dtype,
                std::slice::from_ref(&x),
                "softmax",
                |a| fused::softmax_last_dim_fused(&a[0]),
                |a| fused::softmax_last_dim_ref(&a[0]),
            );
        }
    }
}

/// An additive causal mask `[b, 1, t, tk]`: 0 where key `j ≤ i + (tk − t)`, −∞ after.
fn causal_mask(b: usize, t: usize, tk: usize) -> Tensor {
    let v: Vec<f32> = (0..b * t * tk)
        .map(|k| {
            let (i, j) = ((k / tk) % t, k % tk);
            if j <= i + (tk - t) {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    Tensor::from_vec(v, (b, 1, t, tk), &Device::Cpu).unwrap()
}

#[test]
fn attention_softmax_fused_matches_the_composition() {
    let scores = uniform(&[2, 3, 5, 7], 12, -8.0, 8.0);
    let scale = 1.0 / 96f64.sqrt();
    for dev in devices() {
        for dtype in DTYPES {
            for mask in [causal_mask(1, 5, 7), causal_mask(2, 5, 7)] {
                let inputs = [scores.clone(), mask];
                check(
                    &dev,
                    dtype,
                    &inputs,
                    "attention_softmax",
                    |a| fused::attention_softmax_fused(&a[0], Some(&a[1]), scale),
                    |a| fused::attention_softmax_ref(&a[0], Some(&a[1]), scale),
                );
            }
            check(
                &dev,
                dtype,
                std::slice::from_ref(&scores),
                "attention_softmax (no mask)",
                |a| fused::attention_softmax_fused(&a[0], None, 0.5),
                |a| fused::attention_softmax_ref(&a[0], None, 0.5),
            );
        }
    }
}

type AttentionFn =
    dyn Fn(&Tensor, &Tensor, &Tensor, Option<&Tensor>, f64) -> candle_core::Result<Tensor>;

/// Fused attention on `dev` in `dtype` against the composition in f32 on the host (of the same
/// dtype-rounded inputs): output and the gradients of q, k and v.
fn check_attention(dev: &Device, dtype: DType, kv_heads: usize, mask: Option<&Tensor>) {
    check_attention_with(
        dev,
        dtype,
        kv_heads,
        mask,
        "attention",
        &fused::attention_fused,
    );
}

/// `(B, H, T, Tk, D)` of the attention checks: 7 keys for 5 queries (a cached prefix).
const ATTENTION_SHAPE: (usize, usize, usize, usize, usize) = (2, 4, 5, 7, 16);

fn check_attention_with(
    dev: &Device,
    dtype: DType,
    kv_heads: usize,
    mask: Option<&Tensor>,
    name: &str,
    op: &AttentionFn,
) {
    check_attention_shaped(dev, dtype, ATTENTION_SHAPE, kv_heads, mask, name, op);
}

fn check_attention_shaped(
    dev: &Device,
    dtype: DType,
    (b, h, t, tk, d): (usize, usize, usize, usize, usize),
    kv_heads: usize,
    mask: Option<&Tensor>,
    name: &str,
    op: &AttentionFn,
) {
    let scale = 1.0 / (d as f64).sqrt();
    let what = format!(
        "{name} {dev:?} {dtype:?} kv_heads={kv_heads} mask={:?}",
        mask.map(|m| m.dims().to_vec())
    );
    let inputs = [
        uniform(&[b, h, t, d], 21, -2.0, 2.0),
        uniform(&[b, kv_heads, tk, d], 22, -2.0, 2.0),
        uniform(&[b, kv_heads, tk, d], 23, -1.0, 1.0),
    ];
    let rounded: Vec<Tensor> = inputs
        .iter()
        .map(|x| x.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap())
        .collect();
    let vars_dev: Vec<Var> = rounded
        .iter()
        .map(|x| Var::from_tensor(&x.to_dtype(dtype).unwrap().to_device(dev).unwrap()).unwrap())
        .collect();
    let vars_ref: Vec<Var> = rounded
        .iter()
        .map(|x| Var::from_tensor(x).unwrap())
        .collect();
    let mask_dev = mask.map(|m| m.to_dtype(dtype).unwrap().to_device(dev).unwrap());
    let y = op(
        vars_dev[0].as_tensor(),
        vars_dev[1].as_tensor(),
        vars_dev[2].as_tensor(),
        mask_dev.as_ref(),
        scale,
    )
    .unwrap();
    let y_ref = fused::attention_ref(
        vars_ref[0].as_tensor(),
        vars_ref[1].as_tensor(),
        vars_ref[2].as_tensor(),
        mask,
        scale,
    )
    .unwrap();
    assert_eq!(y.dtype(), dtype);
    assert_close(&y, &y_ref, tol(dtype), &format!("{what} forward"));
    let r = uniform(y.dims(), 99, -1.0, 1.0);
    let rd = r.to_dtype(dtype).unwrap();
    let g = (y * rd.to_device(dev).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let r32 = rd.to_dtype(DType::F32).unwrap();
    let g_ref = (y_ref * r32)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, name) in ["dq", "dk", "dv"].iter().enumerate() {
        let got = g
            .get(vars_dev[i].as_tensor())
            .expect("every input gets a gradient");
        let want = g_ref.get(vars_ref[i].as_tensor()).unwrap();
        assert_close(got, want, tol(dtype), &format!("{what} {name}"));
    }
}

#[test]
fn attention_fused_matches_the_composition() {
    // 7 keys for 5 queries (a cached prefix), grouped-query heads, per-batch and shared masks.
    let masks = [None, Some(causal_mask(1, 5, 7)), Some(causal_mask(2, 5, 7))];
    for dev in devices() {
        for dtype in DTYPES {
            for kv_heads in [4, 2] {
                for mask in &masks {
                    check_attention(&dev, dtype, kv_heads, mask.as_ref());
                }
            }
        }
    }
}

#[test]
fn blocked_attention_matches_the_composition_for_every_chunking() {
    // Chunk budgets (f32 bytes of [B, heads, rows, 7 keys] scores, B = 2) that give: everything in
    // one chunk; one key/value group per chunk; a few query rows; one row (below one row's size).
    // Causal blocking (keys cut per row block) only with the causal masks, as its contract says.
    let budgets = [1 << 20, 2 * 2 * 5 * 7 * 4, 2 * 2 * 2 * 7 * 4, 1];
    let masks = [None, Some(causal_mask(1, 5, 7)), Some(causal_mask(2, 5, 7))];
    for dev in devices() {
        for dtype in DTYPES {
            for kv_heads in [4, 2] {
                for mask in &masks {
                    for chunk_bytes in budgets {
                        for causal in [false, true] {
                            if causal && mask.is_none() {
                                continue;
                            }
                            let blocking = fused::Blocking {
                                chunk_bytes,
                                causal,
                                wave_bytes: fused::WAVE_BYTES,
                            };
                            check_attention_with(
                                &dev,
                                dtype,
                                kv_heads,
                                mask.as_ref(),
                                &format!("blocked attention {blocking:?}"),
                                &move |q, k, v, m, s| {
                                    fused::attention_blocked(q, k, v, m, s, blocking)
                                },
                            );
                        }
                    }
                }
            }
        }
    }
}

/// On the CPU in f32 the blocked attention runs on slices in chunks of one key/value head and 64
/// stacked query rows (`ROWS / rep` positions of each of its query heads), each seeing the keys its
/// last row can see under a causal mask: at 150 queries there are several chunks per head, the
/// last one partial, with 1, 3 and 6 query heads per key/value head, a cached prefix (170 keys),
/// per-batch masks, a packed-documents mask (causal within two documents), and no mask.
#[test]
fn blocked_attention_on_cpu_slices_matches_the_composition_over_many_chunks() {
    let (b, h, t, d) = (2, 6, 150, 12);
    // Causal within documents [0, 60) and [60, t) (a packed row), the prefix seen by all.
    let packed = |tk: usize| {
        let past = tk - t;
        let v: Vec<f32> = (0..b * t * tk)
            .map(|x| {
                let (i, j) = ((x / tk) % t, x % tk);
                let doc = |p: usize| usize::from(p >= 60);
                let visible = j <= i + past && (j < past || doc(j - past) == doc(i));
                if visible { 0.0 } else { f32::NEG_INFINITY }
            })
            .collect();
        Tensor::from_vec(v, (b, 1, t, tk), &Device::Cpu).unwrap()
    };
    for tk in [t, t + 20] {
        let masks = [
            (None, false),
            (Some(causal_mask(1, t, tk)), true),
            (Some(causal_mask(2, t, tk)), false),
            (Some(packed(tk)), true),
        ];
        for kv_heads in [6, 2, 1] {
            for (mask, causal) in &masks {
                let blocking = fused::Blocking::for_device(&Device::Cpu, *causal);
                check_attention_shaped(
                    &Device::Cpu,
                    DType::F32,
                    (b, h, t, tk, d),
                    kv_heads,
                    mask.as_ref(),
                    &format!("blocked attention on slices tk={tk} causal={causal}"),
                    &move |q, k, v, m, s| fused::attention_blocked(q, k, v, m, s, blocking),
                );
            }
        }
    }
}

/// Blocked attention's chunkings on a small shape (2 batches, 3 query heads, 3 queries, 5 keys,
/// D = 8): every chunking and mask in f32, one chunking (row blocks, causal, per-batch mask) in
/// bf16 and f16. The test above covers more; this one is sized for the emulated kernels
/// (scripts/kernels_emulated.sh: 256 OS threads per softmax row there), and runs everywhere.
#[test]
fn blocked_attention_chunkings_on_a_small_shape() {
    // 18 query rows and 30 or 10 key rows: the last block of 4 warps is partial.
    let shape = (2, 3, 3, 5, 8);
    // f32 bytes of [B, heads, rows, 5 keys] scores, B = 2: everything in one chunk; one key/value
    // group (with 3 kv heads; one row with 1); two query rows (one with 1 kv head); one row.
    let budgets = [1 << 20, 2 * 3 * 5 * 4, 2 * 2 * 5 * 4, 1];
    let masks = [None, Some(causal_mask(1, 3, 5)), Some(causal_mask(2, 3, 5))];
    let run = |dev: &Device, dtype, kv_heads, mask: Option<&Tensor>, chunk_bytes, causal| {
        let blocking = fused::Blocking {
            chunk_bytes,
            causal,
            wave_bytes: fused::WAVE_BYTES,
        };
        check_attention_shaped(
            dev,
            dtype,
            shape,
            kv_heads,
            mask,
            &format!("blocked attention {shape:?} {blocking:?}"),
            &move |q, k, v, m, s| fused::attention_blocked(q, k, v, m, s, blocking),
        );
    };
    for dev in devices() {
        for kv_heads in [3, 1] {
            for mask in &masks {
                for chunk_bytes in budgets {
                    for causal in [false, true] {
                        if !(causal && mask.is_none()) {
                            run(
                                &dev,
                                DType::F32,
                                kv_heads,
                                mask.as_ref(),
                                chunk_bytes,
                                causal,
                            );
                        }
                    }
                }
            }
        }
        for dtype in [DType::BF16, DType::F16] {
            run(&dev, dtype, 1, masks[2].as_ref(), budgets[2], true);
        }
    }
}

#[test]
fn cross_entropy_fused_matches_the_composition() {
    // A vocabulary under one block of 256 threads, and one over two (threads loop, with a tail).
    let cases = [
        (uniform(&[5, 50], 10, -5.0, 5.0), vec![0u32, 49, 7, 7, 23]),
        (uniform(&[2, 600], 11, -5.0, 5.0), vec![599, 300]),
    ];
    for (logits, targets) in &cases {
        let targets = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
        for dev in devices() {
            for dtype in DTYPES {
                check(
                    &dev,
                    dtype,
                    &[logits.clone(), targets.clone()],
                    "cross_entropy",
                    |a| fused::cross_entropy_fused(&a[0], &a[1]),
                    |a| fused::cross_entropy_ref(&a[0], &a[1]),
                );
            }
        }
    }
}

#[test]
fn fused_ops_refuse_bad_input_with_errors() {
    for dev in devices() {
        let x = uniform(&[2, 8], 1, -1.0, 1.0).to_device(&dev).unwrap();
        let trainable = Var::ones(8, DType::F32, &dev).unwrap();
        let err = fused::rms_norm_fused(&x, trainable.as_tensor(), 1e-5).unwrap_err();
        assert!(err.to_string().contains("trainable"), "{err}");
        let wrong = Tensor::ones(7, DType::F32, &dev).unwrap();
        assert!(fused::rms_norm_fused(&x, &wrong, 1e-5).is_err());
        let odd = uniform(&[2, 7], 1, -1.0, 1.0).to_device(&dev).unwrap();
        assert!(fused::swiglu_fused(&odd).is_err());
        let targets = Tensor::new(&[1u32, 8], &dev).unwrap();
        let err = fused::cross_entropy_fused(&x, &targets).unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
        let x4 = uniform(&[1, 2, 3, 8], 1, -1.0, 1.0)
            .to_device(&dev)
            .unwrap();
        let bad_table = Tensor::ones((1, 1, 4, 8), DType::F32, &dev).unwrap();
        assert!(fused::rope_fused(&x4, &bad_table, &bad_table).is_err());
        let u8s = Tensor::zeros((2, 4), DType::U8, &dev).unwrap();
        assert!(fused::softmax_last_dim_fused(&u8s).is_err());
        let wrong_mask = Tensor::zeros((1, 1, 3, 7), DType::F32, &dev).unwrap();
        assert!(fused::attention_softmax_fused(&x4, Some(&wrong_mask), 1.0).is_err());
        let kv3 = uniform(&[1, 3, 3, 8], 1, -1.0, 1.0)
            .to_device(&dev)
            .unwrap();
        assert!(
            fused::attention_fused(&x4, &kv3, &kv3, None, 1.0).is_err(),
            "3 kv heads for 2"
        );
    }
}

/// Neither the thread count nor the backward's waves (how many chunks' partial key/value gradients
/// are held before they are summed, on the candle-op path: bf16 here) change a bit of the
/// gradients: partials are summed in chunk (or task) order, cut by the shapes alone.
#[test]
fn blocked_attention_backward_threads_and_waves_change_no_bit() {
    // 100 queries, 2 query heads per key/value head: 32 positions per chunk on the CPU in f32, 4
    // chunks per key/value head.
    let (b, h, hk, t, d) = (2, 4, 2, 100, 8);
    let dev = Device::Cpu;
    let x = |n: usize, seed: u64| {
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 + 1) * 2654435761 + seed * 97) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        v
    };
    let q = Var::from_vec(x(b * h * t * d, 1), (b, h, t, d), &dev).unwrap();
    let k = Var::from_vec(x(b * hk * t * d, 2), (b, hk, t, d), &dev).unwrap();
    let v = Var::from_vec(x(b * hk * t * d, 3), (b, hk, t, d), &dev).unwrap();
    let w = Tensor::from_vec(x(b * h * t * d, 4), (b, h, t, d), &dev).unwrap();
    let mask = causal_mask(b, t, t);
    let grads = |dtype: DType, wave_bytes: usize, threads: usize| {
        let blocking = fused::Blocking {
            causal: true,
            wave_bytes,
            ..fused::Blocking::for_device(&dev, true)
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let (qd, kd, vd) = (
            q.to_dtype(dtype).unwrap(),
            k.to_dtype(dtype).unwrap(),
            v.to_dtype(dtype).unwrap(),
        );
        let (md, wd) = (mask.to_dtype(dtype).unwrap(), w.to_dtype(dtype).unwrap());
        let g = pool.install(|| {
            let o = fused::attention_blocked(&qd, &kd, &vd, Some(&md), 0.35, blocking).unwrap();
            (o * &wd).unwrap().sum_all().unwrap().backward().unwrap()
        });
        [&q, &k, &v].map(|x| {
            g.get(x.as_tensor())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|f| f.to_bits())
                .collect::<Vec<u32>>()
        })
    };
    for dtype in [DType::F32, DType::BF16] {
        let all_at_once = grads(dtype, usize::MAX, 1);
        let per_chunk_bytes = 2 * b * t * d * dtype.size_in_bytes();
        for wave_bytes in [0, per_chunk_bytes, 3 * per_chunk_bytes, fused::WAVE_BYTES] {
            for threads in [1, 2, 3] {
                let got = grads(dtype, wave_bytes, threads);
                assert!(
                    got == all_at_once,
                    "{dtype:?} wave_bytes {wave_bytes} threads {threads}"
                );
            }
        }
    }
}

/// Selective recomputation (`*_known`): an op given the output an earlier forward of the same
/// inputs computed hands it back and backpropagates exactly like the op that computed it (the
/// same bits); given another output, it hands that back (so it computes nothing).
#[test]
fn known_outputs_are_handed_back_and_backpropagate_bit_for_bit() {
    type Op<'a> = dyn Fn(&[Tensor], Option<&Tensor>) -> candle_core::Result<Tensor> + 'a;
    let bits = |t: &Tensor| host_f32(t);
    let replay = |what: &str, inputs: &[Tensor], op: &Op<'_>| {
        let run = |known: Option<&Tensor>| {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|x| Var::from_tensor(x).unwrap())
                .collect();
            let args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = op(&args, known).unwrap();
            let r = uniform(y.dims(), 99, -1.0, 1.0)
                .to_device(y.device())
                .unwrap();
            let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
            let grads: Vec<Vec<f32>> = vars
                .iter()
                .map(|v| bits(g.get(v.as_tensor()).expect("a gradient")))
                .collect();
            (y, grads)
        };
        let (y, grads) = run(None);
        let (y2, grads2) = run(Some(&y.detach()));
        assert_eq!(bits(&y2), bits(&y), "{what}: output");
        assert_eq!(grads2, grads, "{what}: gradients");
        let other = (&y * 2.0).unwrap();
        let (y3, _) = run(Some(&other));
        assert_eq!(
            bits(&y3),
            bits(&other),
            "{what}: the known output is handed back"
        );
        // A known output of another shape is refused.
        let vars: Vec<Tensor> = inputs.to_vec();
        assert!(
            op(&vars, Some(&y.narrow(0, 0, 1).unwrap())).is_err(),
            "{what}"
        );
    };
    let (b, h, hk, t, d) = (2, 4, 2, 5, 8);
    let mask = causal_mask(1, t, t);
    let blocking = fused::Blocking {
        chunk_bytes: 2 * 2 * t * 4,
        causal: true,
        wave_bytes: fused::WAVE_BYTES,
    };
    for dev in devices() {
        let qkv: Vec<Tensor> = [(h, 21), (hk, 22), (hk, 23)]
            .iter()
            .map(|&(n, seed)| {
                uniform(&[b, n, t, d], seed, -1.0, 1.0)
                    .to_device(&dev)
                    .unwrap()
            })
            .collect();
        let m = mask.to_device(&dev).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        replay(&format!("blocked attention {dev:?}"), &qkv, &|a, known| {
            fused::attention_blocked_known(&a[0], &a[1], &a[2], Some(&m), scale, blocking, known)
        });
        replay(&format!("attention {dev:?}"), &qkv, &|a, known| {
            fused::attention_fused_known(&a[0], &a[1], &a[2], Some(&m), scale, known)
        });
    }
    // The CPU's NF4 linear with its adapter, dropout on.
    let (out, inp, r) = (128, 64, 4);
    let w = qlora_quant::Nf4Tensor::quantize(
        &uniform(&[out, inp], 1, -0.1, 0.1),
        qlora_quant::QuantType::Nf4,
        qlora_quant::Blocksize::DEFAULT,
        true,
    )
    .unwrap();
    let dropout = Some(fused::DropoutSpec {
        p: 0.1,
        seed: 77,
        rows: fused::MaskRows { first: 0, step: 1 },
    });
    let inputs = [
        uniform(&[2, 6, inp], 2, -1.0, 1.0),
        uniform(&[r, inp], 3, -0.06, 0.06),
        uniform(&[out, r], 4, -0.05, 0.05),
    ];
    replay("lora_nf4_linear", &inputs, &|a, known| {
        fused::lora_nf4_linear_known(&a[0], &w, &a[1], &a[2], 2.0, dropout, known)
    });
}
