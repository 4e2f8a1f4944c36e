//! The model through `qlora_quant::fused`'s ops (the CUDA kernels' arithmetic, run by their CPU
//! loops) against the same independent references as the composed model: transformers' and PEFT's
//! logits (tests/fixtures/gen_phi3_goldens.py), the KV cache and packing against the plain forward,
//! and its loss and LoRA gradients against the composed path's (which tests/it/train.rs checks
//! against f64 finite differences). The model takes this path in f32, bf16 and f16 on every device
//! ([`OpPath::for_device`]; on the CPU the fused path also runs each NF4 linear with its adapter as
//! one op and the head's cross-entropy in one pass), so the composition's own logits are checked
//! here too.

use crate::common::assert_grads_close;
use crate::model::{
    assert_cached_equals_full, assert_packed_equals_separate, check, golden, load_f32,
};
use crate::train::{golden_ids, lora, packed_batch, randomize_b};
use candle_core::Device;
use qlora::lora::{ForwardCtx, attach, peft};
use qlora::model::load::BaseFormat;
use qlora::model::{FusedAttention, OpPath, Phi3};
use qlora::train::loss_and_grads;

pub const ATTENTIONS: [FusedAttention; 2] = [FusedAttention::Blocked, FusedAttention::Streaming];

fn fused_with(mut m: Phi3, attention: FusedAttention) -> Phi3 {
    m.ops = OpPath::Fused(attention);
    m
}

fn composed(mut m: Phi3) -> Phi3 {
    m.ops = OpPath::Composed;
    m
}

/// The golden logit cases: (fixture, base, ids key, logits key).
pub const LOGIT_CASES: [(&str, BaseFormat, &str, &str); 7] = [
    ("mha", BaseFormat::Dense, "input_ids", "logits"),
    ("gqa", BaseFormat::Dense, "input_ids", "logits"),
    // Longrope, long and short factors.
    ("longrope", BaseFormat::Dense, "input_ids", "logits"),
    (
        "longrope",
        BaseFormat::Dense,
        "input_ids_short",
        "logits_short",
    ),
    // Partial rotary factor (the last 4 of 16 dims pass through RoPE) and a tied head.
    ("partial", BaseFormat::Dense, "input_ids", "logits"),
    (
        "partial",
        BaseFormat::Dense,
        "input_ids_short",
        "logits_short",
    ),
    // NF4 codes saved by bitsandbytes, against transformers over bitsandbytes' dequantization.
    ("gqa-bnb", BaseFormat::NF4, "input_ids", "logits"),
];

#[test]
fn fused_ops_reproduce_transformers_and_peft_logits() {
    assert_eq!(
        load_f32("gqa", BaseFormat::Dense).ops,
        OpPath::Fused(FusedAttention::Blocked),
        "the f32 default, on the CPU too"
    );
    for (dir, base, ids_key, logits_key) in LOGIT_CASES {
        let (ids, want) = golden(dir, "logits.safetensors", ids_key, logits_key);
        let m = composed(load_f32(dir, base));
        check(&m, &ids, &want, &format!("{dir} {ids_key} composed"));
    }
    for attention in ATTENTIONS {
        for (dir, base, ids_key, logits_key) in LOGIT_CASES {
            let (ids, want) = golden(dir, "logits.safetensors", ids_key, logits_key);
            let m = fused_with(load_f32(dir, base), attention);
            check(&m, &ids, &want, &format!("{dir} {ids_key} {attention:?}"));
        }
        let mut m = fused_with(load_f32("gqa", BaseFormat::Dense), attention);
        let a = peft::load(
            &crate::common::fixtures().join("phi3/peft/adapter"),
            &Device::Cpu,
        )
        .unwrap();
        attach::load_adapters(&mut m, &a).unwrap();
        let (ids, want) = golden("peft", "logits.safetensors", "input_ids", "logits");
        check(&m, &ids, &want, &format!("peft adapter {attention:?}"));
    }
}

#[test]
fn fused_kv_cache_and_packing_equal_the_plain_forward() {
    for attention in ATTENTIONS {
        assert_cached_equals_full(&fused_with(load_f32("gqa", BaseFormat::NF4), attention));
        assert_packed_equals_separate(&fused_with(load_f32("gqa", BaseFormat::Dense), attention));
    }
}

#[test]
fn fused_and_composed_loss_and_lora_gradients_agree() {
    // NF4 base, grouped-query heads, dropout, packed sequences, with and without checkpointing.
    // The reference is the composition throughout: candle's primitive ops and autograd, the NF4
    // linear and its adapter as separate ops, the head through autograd.
    let mut reference = composed(load_f32("gqa", BaseFormat::NF4));
    attach::init_adapters(&mut reference, &lora(4, 0.1), 5).unwrap();
    randomize_b(&reference, 20);
    let b = packed_batch(&golden_ids(), &Device::Cpu);
    let ctx = ForwardCtx {
        dropout_seed: Some(77),
        ..Default::default()
    };
    let want = loss_and_grads(&reference, &b, &ctx, false).unwrap();
    for attention in ATTENTIONS {
        let fused = fused_with(reference.clone(), attention);
        for checkpointing in [false, true] {
            // The same formulas evaluated in f32 in another order: the loss (~20 nats) to a few
            // ulps, each gradient within 1e-4 of its largest entry (a wrong term is O(1) off).
            assert_grads_close(
                &loss_and_grads(&fused, &b, &ctx, checkpointing).unwrap(),
                &want,
                1e-5,
                1e-4,
                &format!("{attention:?}, checkpointing {checkpointing}"),
            );
        }
    }
}
