//! The model through `qlora_quant::fused`'s ops (the CUDA kernels' arithmetic, run by their CPU
//! loops) against the same independent references as the composed model: transformers' and PEFT's
//! logits (tests/fixtures/gen_phi3_goldens.py), the KV cache and packing against the plain forward,
//! and its loss and LoRA gradients against the composed path's (which tests/it/train.rs checks
//! against f64 finite differences). On a GPU the model takes this path ([`OpPath::for_device`]).

use crate::model::{F32_LOGITS_ABS_TOL, check, golden, load_f32, max_abs_diff};
use crate::train::{batch, golden_ids, lora, randomize_b};
use candle_core::{Device, IndexOp, Tensor};
use qlora::lora::{ForwardCtx, attach, peft};
use qlora::model::load::BaseFormat;
use qlora::model::{FusedAttention, OpPath, Phi3};
use qlora::train::loss_and_grads;

const ATTENTIONS: [FusedAttention; 2] = [FusedAttention::Blocked, FusedAttention::Streaming];

fn fused_with(mut m: Phi3, attention: FusedAttention) -> Phi3 {
    assert_eq!(
        m.ops,
        OpPath::Composed,
        "the CPU default is the composition"
    );
    m.ops = OpPath::Fused(attention);
    m
}

#[test]
fn fused_ops_reproduce_transformers_and_peft_logits() {
    for attention in ATTENTIONS {
        fused_logits(&|m| fused_with(m, attention));
    }
}

fn fused_logits(fused: &dyn Fn(Phi3) -> Phi3) {
    for dir in ["mha", "gqa"] {
        let (ids, want) = golden(dir, "logits.safetensors", "input_ids", "logits");
        check(&fused(load_f32(dir, BaseFormat::Dense)), &ids, &want, dir);
    }
    let long = fused(load_f32("longrope", BaseFormat::Dense));
    for (ids_key, logits_key) in [("input_ids", "logits"), ("input_ids_short", "logits_short")] {
        let (ids, want) = golden("longrope", "logits.safetensors", ids_key, logits_key);
        check(&long, &ids, &want, ids_key);
    }
    // Partial rotary factor (the last 4 of 16 dims pass through RoPE) and a tied head.
    let partial = fused(load_f32("partial", BaseFormat::Dense));
    for (ids_key, logits_key) in [("input_ids", "logits"), ("input_ids_short", "logits_short")] {
        let (ids, want) = golden("partial", "logits.safetensors", ids_key, logits_key);
        check(&partial, &ids, &want, ids_key);
    }
    // NF4 codes saved by bitsandbytes, against transformers over bitsandbytes' dequantization.
    let (ids, want) = golden("gqa-bnb", "logits.safetensors", "input_ids", "logits");
    check(
        &fused(load_f32("gqa-bnb", BaseFormat::NF4)),
        &ids,
        &want,
        "gqa-bnb",
    );
    let mut m = fused(load_f32("gqa", BaseFormat::Dense));
    let a = peft::load(
        &crate::common::fixtures().join("phi3/peft/adapter"),
        &Device::Cpu,
    )
    .unwrap();
    attach::load_adapters(&mut m, &a).unwrap();
    let (ids, want) = golden("peft", "logits.safetensors", "input_ids", "logits");
    check(&m, &ids, &want, "peft adapter");
}

#[test]
fn fused_kv_cache_and_packing_equal_the_plain_forward() {
    for attention in ATTENTIONS {
        cache_and_packing(fused_with(load_f32("gqa", BaseFormat::NF4), attention));
    }
}

fn cache_and_packing(m: Phi3) {
    let (ids, _) = golden("gqa", "logits.safetensors", "input_ids", "logits");
    let full = m.forward(&ids).unwrap();
    let mut cache = qlora::model::phi3::KvCache::default();
    let mut steps = vec![
        m.forward_cached(&ids.i((.., 0..7)).unwrap(), &mut cache)
            .unwrap(),
    ];
    for t in 7..12 {
        steps.push(
            m.forward_cached(&ids.i((.., t..t + 1)).unwrap(), &mut cache)
                .unwrap(),
        );
    }
    let d = max_abs_diff(&Tensor::cat(&steps, 1).unwrap(), &full);
    assert!(d <= F32_LOGITS_ABS_TOL, "cached vs full: {d:e}");

    let (a, b) = (ids.i((.., 0..5)).unwrap(), ids.i((.., 5..12)).unwrap());
    let positions = Tensor::new(&[[0u32, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]], &Device::Cpu).unwrap();
    let segments = Tensor::new(&[[1u32, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]], &Device::Cpu).unwrap();
    let hidden = m
        .hidden(&ids, &positions, Some(&segments), &ForwardCtx::default())
        .unwrap();
    let packed = m.lm_head(&hidden).unwrap();
    let separate = Tensor::cat(&[m.forward(&a).unwrap(), m.forward(&b).unwrap()], 1).unwrap();
    let d = max_abs_diff(&packed, &separate);
    assert!(d <= F32_LOGITS_ABS_TOL, "packed vs separate: {d:e}");
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn fused_and_composed_loss_and_lora_gradients_agree() {
    // NF4 base, grouped-query heads, dropout, packed sequences, with and without checkpointing.
    let mut composed = load_f32("gqa", BaseFormat::NF4);
    attach::init_adapters(&mut composed, &lora(4, 0.1), 5).unwrap();
    randomize_b(&composed, 20);
    for attention in ATTENTIONS {
        gradients_agree(&composed, &fused_with(composed.clone(), attention));
    }
}

fn gradients_agree(composed: &Phi3, fused: &Phi3) {
    let mut b = batch(&golden_ids());
    b.positions = Tensor::new(&[[0u32, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]], &Device::Cpu).unwrap();
    b.segments =
        Some(Tensor::new(&[[1u32, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]], &Device::Cpu).unwrap());
    let ctx = ForwardCtx {
        dropout_seed: Some(77),
    };
    let want = loss_and_grads(composed, &b, &ctx, false).unwrap();
    for checkpointing in [false, true] {
        let got = loss_and_grads(fused, &b, &ctx, checkpointing).unwrap();
        assert_eq!(got.n_tokens, want.n_tokens);
        // f32 sums in another order: a few ulps of a loss of ~20 nats.
        let rel = (got.loss_sum - want.loss_sum).abs() / want.loss_sum.abs();
        assert!(
            rel <= 1e-5,
            "{:?}: loss {} vs {}",
            fused.ops,
            got.loss_sum,
            want.loss_sum
        );
        // Each gradient within 1e-4 of its largest entry: the same formulas, evaluated in f32 in
        // another order through 2 layers of backward (a wrong term is O(1) off).
        for (i, ((fa, fb), (ca, cb))) in got.grads.iter().zip(&want.grads).enumerate() {
            for (f, c) in [(fa, ca), (fb, cb)] {
                let scale = max_abs(c).max(1e-12);
                let d = max_abs(&(f - c).unwrap());
                assert!(
                    d <= 1e-4 * scale,
                    "{:?}, adapter {i} (checkpointing {checkpointing}): max |Δgrad| {d:e}, scale {scale:e}",
                    fused.ops
                );
            }
        }
    }
}
