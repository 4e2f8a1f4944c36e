//! Gradients: central finite differences in f64, checkpointed vs plain backprop, the loss against
//! the cross-entropy of transformers' logits, and a short run that overfits.

use crate::model::load_f32;
use candle_core::{DType, Device, Tensor, Var};
use qlora::lora::{ForwardCtx, LoraConfig, attach};
use qlora::model::load::{BaseFormat, LoadOptions, load};
use qlora::train::optim::{AdamW, AdamWConfig};
use qlora::train::{Batch, loss, loss_and_grads};

pub fn golden_ids() -> Vec<u32> {
    let t = candle_core::safetensors::load(
        crate::common::fixtures().join("phi3/gqa/logits.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    t["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Labels: the prompt (first 3 tokens) ignored, the rest trained.
pub fn batch(ids: &[u32]) -> Batch {
    batch_on(ids, &Device::Cpu)
}

fn batch_on(ids: &[u32], dev: &Device) -> Batch {
    let labels: Vec<i64> = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| if i < 3 { -100 } else { t as i64 })
        .collect();
    Batch::causal(&[ids.to_vec()], &[labels], dev).unwrap()
}

/// [`batch`] of 12 ids as two packed sequences of 5 and 7 (positions restarting, segments).
pub fn packed_batch(ids: &[u32], dev: &Device) -> Batch {
    let mut b = batch_on(ids, dev);
    b.positions = Tensor::new(&[[0u32, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]], dev).unwrap();
    b.segments = Some(Tensor::new(&[[1u32, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]], dev).unwrap());
    b
}

pub fn lora(r: usize, dropout: f32) -> LoraConfig {
    LoraConfig {
        r,
        alpha: 2.0 * r as f64,
        dropout,
        targets: vec!["all-linear".into()],
        rslora: false,
        use_dora: false,
        modules_to_save: Vec::new(),
        trainable_token_indices: Default::default(),
    }
}

/// Nonzero B everywhere, so that every A has a gradient too.
pub fn randomize_b(model: &qlora::model::Phi3, seed: u64) {
    for (i, a) in model.adapters().iter().enumerate() {
        let b = a.b.as_tensor();
        let n = b.elem_count();
        let v: Vec<f64> = crate::common::values(n, seed + i as u64, 0.1)
            .into_iter()
            .map(f64::from)
            .collect();
        a.b.set(
            &Tensor::from_vec(v, b.shape(), b.device())
                .unwrap()
                .to_dtype(b.dtype())
                .unwrap(),
        )
        .unwrap();
    }
}

/// Each DoRA magnitude multiplied by `1 + 0.2·u`, `u` drawn from `seed` (away from the base's
/// row norms, so `g ≠ 1`).
pub fn randomize_magnitudes(model: &qlora::model::Phi3, seed: u64) {
    for (i, a) in model.adapters().iter().enumerate() {
        let m = &a.dora.as_ref().expect("a DoRA adapter").magnitude;
        let t = m.as_tensor();
        let u = crate::common::values(t.elem_count(), seed + i as u64, 0.2);
        let f = Tensor::from_vec(u, t.shape(), t.device())
            .unwrap()
            .to_dtype(t.dtype())
            .unwrap();
        m.set(&(t * (f + 1.0).unwrap()).unwrap()).unwrap();
    }
}

#[test]
fn loss_is_the_cross_entropy_of_transformers_logits() {
    let ids = golden_ids();
    let t = candle_core::safetensors::load(
        crate::common::fixtures().join("phi3/gqa/logits.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let logits: Vec<Vec<f32>> = t["logits"].squeeze(0).unwrap().to_vec2().unwrap();
    // Σ over t ≥ 3 of −log softmax(logits[t − 1])[ids[t]], in f64.
    let mut want = 0f64;
    for tpos in 3..ids.len() {
        let row = &logits[tpos - 1];
        let max = row.iter().fold(f32::MIN, |m, v| m.max(*v)) as f64;
        let lse = max
            + row
                .iter()
                .map(|v| (*v as f64 - max).exp())
                .sum::<f64>()
                .ln();
        want += lse - row[ids[tpos] as usize] as f64;
    }
    let m = load_f32("gqa", BaseFormat::Dense);
    let (got, n) = loss(&m, &batch(&ids)).unwrap();
    assert_eq!(n, ids.len() - 3);
    assert!(
        (got - want).abs() <= 1e-4 * want.abs(),
        "loss {got} vs {want}"
    );
    let lg = loss_and_grads(&m, &batch(&ids), &ForwardCtx::default(), true).unwrap();
    assert!((lg.loss_sum - want).abs() <= 1e-4 * want.abs());
}

#[test]
fn lora_gradients_equal_central_finite_differences_in_f64() {
    // gqa, and partial: Phi-4-mini's partial rotary (12 of 16 dims) with a tied head.
    for variant in ["gqa", "partial"] {
        finite_difference_check(variant, false);
    }
}

#[test]
fn dora_magnitude_gradients_equal_central_finite_differences_in_f64() {
    // The magnitude does not enter DoRA's (detached) weight norm, so its gradient is the loss's
    // true derivative; A's and B's are not (the norm is held constant by design) and are checked
    // against PEFT's autograd instead (tests/it/dora.rs).
    finite_difference_check("gqa", true);
}

fn finite_difference_check(variant: &str, dora: bool) {
    let dir = crate::common::fixtures().join("phi3").join(variant);
    let mut m = load(
        &dir,
        &LoadOptions {
            dtype: DType::F64,
            device: Device::Cpu,
            base: BaseFormat::Dense,
        },
    )
    .unwrap();
    let cfg = LoraConfig {
        use_dora: dora,
        modules_to_save: Vec::new(),
        trainable_token_indices: Default::default(),
        ..lora(2, 0.0)
    };
    attach::init_adapters(&mut m, &cfg, 3).unwrap();
    randomize_b(&m, 10);
    if dora {
        randomize_magnitudes(&m, 11);
    }
    let ids = golden_ids();
    let b = batch(&ids);
    // f64 throughout: truncation O(ε²) ≈ 1e-12, rounding ≈ 1e-16 · |L| / ε ≈ 1e-9.
    const EPS: f64 = 1e-6;
    const TOL: f64 = 1e-6;
    for checkpointing in [false, true] {
        let analytic = loss_and_grads(&m, &b, &ForwardCtx::default(), checkpointing).unwrap();
        let vars = m.trainable_vars();
        let mut checked = 0;
        // (adapter, variable): A = 0, B = 1, DoRA's magnitude = 2.
        let picks: &[(usize, usize)] = if dora {
            &[(0, 2), (1, 2), (3, 2), (4, 2), (6, 2), (7, 2)]
        } else {
            &[(0, 0), (0, 1), (3, 0), (3, 1), (5, 0), (7, 1)]
        };
        let per = if dora { 3 } else { 2 };
        for &(ai, which) in picks {
            let var: &Var = &vars[ai * per + which];
            let grad = &analytic.grads[ai * per + which];
            let orig: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let g: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
            for k in [0, orig.len() / 2, orig.len() - 1] {
                let at = |delta: f64| {
                    let mut v = orig.clone();
                    v[k] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss(&m, &b).unwrap().0
                };
                let fd = (at(EPS) - at(-EPS)) / (2.0 * EPS);
                var.set(&Tensor::from_vec(orig.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                assert!(
                    (fd - g[k]).abs() <= TOL * (1.0 + g[k].abs()),
                    "{variant}: adapter {ai} {} [{k}] (checkpointing {checkpointing}): analytic {} vs finite difference {fd}",
                    ["A", "B", "m"][which],
                    g[k]
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 18);
    }
}

#[test]
fn checkpointed_and_plain_backprop_agree() {
    // NF4 base, dropout on (the recomputed forward must redraw the same masks), packed sequences.
    let mut m = load_f32("gqa", BaseFormat::NF4);
    attach::init_adapters(&mut m, &lora(4, 0.1), 5).unwrap();
    randomize_b(&m, 20);
    let b = packed_batch(&golden_ids(), &Device::Cpu);
    let ctx = ForwardCtx {
        dropout_seed: Some(77),
        ..Default::default()
    };
    let plain = loss_and_grads(&m, &b, &ctx, false).unwrap();
    let ckpt = loss_and_grads(&m, &b, &ctx, true).unwrap();
    assert_eq!(plain.loss_sum, ckpt.loss_sum);
    // Same ops on the same values; only the order in which gradient contributions are summed may
    // differ, so f32 agreement to 1e-6 relative to each gradient's largest entry.
    crate::common::assert_grads_close(&ckpt, &plain, 0.0, 1e-6, "checkpointed vs plain");
    // Dropout really is on: another seed gives other gradients.
    let other = loss_and_grads(
        &m,
        &b,
        &ForwardCtx {
            dropout_seed: Some(78),
            ..Default::default()
        },
        true,
    )
    .unwrap();
    assert_ne!(
        other.grads[0].to_vec2::<f32>().unwrap(),
        ckpt.grads[0].to_vec2::<f32>().unwrap()
    );
}

#[test]
fn a_short_run_overfits_a_few_sequences() {
    let mut m = load_f32("mha", BaseFormat::NF4);
    // The fixture's frozen head (rows of norm ≈ 0.4 against RMS-normed states of norm ≈ 8) caps
    // |logits| near 3, a floor of ≈ 1.8 nats whatever the adapters learn (measured). Scale it ×10 so
    // that confident predictions are expressible.
    m.lm_head = (&m.lm_head * 10.0).unwrap();
    attach::init_adapters(&mut m, &lora(8, 0.0), 9).unwrap();
    let ids = golden_ids();
    let rows = [ids.clone(), ids.iter().rev().copied().collect::<Vec<_>>()];
    let labels: Vec<Vec<i64>> = rows
        .iter()
        .map(|r| r.iter().map(|&t| t as i64).collect())
        .collect();
    let b = Batch::causal(&rows, &labels, &Device::Cpu).unwrap();
    let params: Vec<Var> = m.trainable_vars();
    let mut opt = AdamW::new(params, AdamWConfig::default()).unwrap();
    let mut losses = Vec::new();
    for _ in 0..60 {
        let lg = loss_and_grads(&m, &b, &ForwardCtx::default(), true).unwrap();
        losses.push(lg.loss_sum / lg.n_tokens as f64);
        let grads: Vec<Tensor> = lg
            .grads
            .iter()
            .map(|g| (g / lg.n_tokens as f64).unwrap())
            .collect();
        opt.step(&grads, 1e-2).unwrap();
    }
    // Starts well above 0 (a random model); 22 tokens memorized by rank-8 adapters.
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(first > 4.0, "initial loss {first}");
    assert!(last < 0.2, "loss after 60 steps {last} (curve {losses:?})");
}

#[test]
fn returned_gradients_record_no_ops_on_the_variables() {
    // A gradient that depends on a variable through recorded ops makes the optimizer's moments
    // hold every step's graph (a leak of ~22 MB a step on the demo, found with the embedding
    // LoRA). Backpropagating each returned gradient must reach no trainable variable.
    let configs = [
        LoraConfig {
            targets: vec!["embed_tokens".into(), "lm_head".into(), "all-linear".into()],
            dropout: 0.1,
            ..lora(4, 0.1)
        },
        LoraConfig {
            use_dora: true,
            modules_to_save: vec!["lm_head".into()],
            trainable_token_indices: qlora::lora::TokenIndices::List(vec![5, 17]),
            ..lora(4, 0.1)
        },
    ];
    for cfg in configs {
        for ops in [
            qlora::model::phi3::OpPath::for_device(&Device::Cpu, DType::F32),
            qlora::model::phi3::OpPath::Composed,
        ] {
            let mut m = load_f32("gqa", BaseFormat::NF4);
            m.ops = ops;
            attach::init_adapters(&mut m, &cfg, 1).unwrap();
            attach::init_modules(&mut m, &cfg).unwrap();
            attach::init_tokens(&mut m, &cfg).unwrap();
            randomize_b(&m, 3);
            let vars = m.trainable_vars();
            let ctx = ForwardCtx {
                dropout_seed: Some(9),
                ..Default::default()
            };
            for checkpointing in [false, true] {
                let lg = loss_and_grads(&m, &batch(&golden_ids()), &ctx, checkpointing).unwrap();
                assert_eq!(lg.grads.len(), vars.len());
                for (i, g) in lg.grads.iter().enumerate() {
                    let store = g.sum_all().unwrap().backward().unwrap();
                    for (j, v) in vars.iter().enumerate() {
                        assert!(
                            store.get(v.as_tensor()).is_none(),
                            "{ops:?}, checkpointing {checkpointing}: gradient {i} records ops on variable {j}"
                        );
                    }
                }
            }
        }
    }
}
