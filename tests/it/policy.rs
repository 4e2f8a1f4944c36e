//! Gradient checkpointing per block: every policy gives the gradients of plain backprop, and a
//! selective block really takes its kept outputs back instead of computing them.

use crate::common::{assert_grads_close, tiny_config, tiny_tensors, write_checkpoint};
use crate::model::load_path_f32;
use crate::train::{golden_ids, lora, packed_batch, randomize_b};
use candle_core::{Device, Tensor};
use qlora::lora::{ForwardCtx, attach};
use qlora::model::Phi3;
use qlora::model::load::BaseFormat;
use qlora::model::phi3::{Kept, Tap};
use qlora::train::loss_and_grads;
use qlora::train::policy::{BlockPolicy, Checkpointing};

/// The tiny Phi-3 with 4 blocks, f32 on the CPU (the fused path), r = 4 on every linear with
/// dropout, B randomized.
fn four_blocks(base: BaseFormat) -> (tempfile::TempDir, Phi3) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config();
    cfg["num_hidden_layers"] = 4.into();
    // The golden ids reach past the tiny vocabulary.
    cfg["vocab_size"] = 256.into();
    write_checkpoint(dir.path(), &cfg, &tiny_tensors(&cfg), 1);
    let mut m = load_path_f32(dir.path(), base);
    attach::init_adapters(&mut m, &lora(4, 0.1), 5).unwrap();
    randomize_b(&m, 20);
    (dir, m)
}

#[test]
fn every_checkpointing_policy_gives_plain_backprops_gradients() {
    use BlockPolicy::*;
    // NF4: the attention and the gate/up projection replay; dense: only the attention does.
    for base in [BaseFormat::NF4, BaseFormat::Dense] {
        let (_dir, m) = four_blocks(base);
        let b = packed_batch(&golden_ids(), &Device::Cpu);
        // Dropout on: the replayed ops must redraw the same masks.
        let ctx = ForwardCtx {
            dropout_seed: Some(77),
            ..Default::default()
        };
        let plain = loss_and_grads(&m, &b, &ctx, false).unwrap();
        for policies in [
            Checkpointing::from(true),
            Checkpointing::from(Selective),
            Checkpointing::Blocks(vec![Recompute, Selective, Keep, Keep]),
            Checkpointing::Blocks(vec![Keep, Recompute, Selective, Recompute]),
            Checkpointing::Blocks(vec![Selective, Keep, Selective, Recompute]),
        ] {
            let got = loss_and_grads(&m, &b, &ctx, &policies).unwrap();
            let what = format!("{base:?}, {}", policies.describe(4));
            assert_eq!(got.loss_sum, plain.loss_sum, "{what}");
            // The same ops on the same values in the same order: bit for bit.
            assert_grads_close(&got, &plain, 0.0, 0.0, &what);
        }
    }
}

#[test]
fn a_selective_block_takes_its_kept_outputs_back() {
    let (_dir, m) = four_blocks(BaseFormat::NF4);
    let b = packed_batch(&golden_ids(), &Device::Cpu);
    let prep = m.prepare(&b.positions, b.segments.as_ref(), 0).unwrap();
    let ctx = ForwardCtx::default();
    let x = m.embed(&b.input_ids).unwrap();
    let want = m.block(1, &x, &prep, &ctx, None).unwrap();
    let mut kept = Kept::default();
    let recorded = m
        .block_with(1, &x, &prep, &ctx, Tap::Record(&mut kept))
        .unwrap();
    let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(bits(&recorded), bits(&want));
    // Both outputs are kept on the fused NF4 path (one gate/up projection).
    let att = kept
        .attention
        .clone()
        .expect("the attention's output is kept");
    assert!(matches!(kept.gate_up.as_slice(), [Some(_)]));
    let replayed = m
        .block_with(1, &x, &prep, &ctx, Tap::Replay(&kept))
        .unwrap();
    assert_eq!(bits(&replayed), bits(&want));
    // Handed back, not computed: altered kept outputs change the block's output.
    let mut altered = kept.clone();
    altered.attention = Some((&att * 2.0).unwrap());
    let a = m
        .block_with(1, &x, &prep, &ctx, Tap::Replay(&altered))
        .unwrap();
    assert_ne!(bits(&a), bits(&want));
    let mut altered = kept.clone();
    altered.gate_up = vec![Some(
        kept.gate_up[0].as_ref().unwrap().zeros_like().unwrap(),
    )];
    let g = m
        .block_with(1, &x, &prep, &ctx, Tap::Replay(&altered))
        .unwrap();
    // gate = 0 makes SwiGLU 0: the block is its attention half alone.
    assert_ne!(bits(&g), bits(&want));
}
