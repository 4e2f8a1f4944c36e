//! Criterion benches of the CPU training path on the 135M shape of `scripts/compare_cpu_step.sh`
//! (hidden 576, 30 layers, 9 heads / 3 kv heads, intermediate 1536, vocab 49152, tied head; NF4
//! base, LoRA r = 16 on all four linears, f32): a whole training step (forward, head, backward,
//! AdamW) of one 256-token row with and without gradient checkpointing, one generation step
//! (a token through the KV cache after a 256-token prompt), and a DPO micro-batch (one pair: two
//! 256-token rows, the reference pass included, or its scores precomputed) against an SFT
//! micro-batch of the same two rows and the same trained tokens (the optimizer step, the same for
//! both, left out).
//!
//! `cargo bench --bench train_step` (minutes: a step is a second or two on 2 cores). CI only
//! compiles it. The side-by-side ratio against PyTorch + PEFT is `scripts/compare_cpu_step.sh`.

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, criterion_group};
use qlora::data::batch::Row;
use qlora::data::pairs::{PairIds, PairRows, Truncation, cut_pair};
use qlora::lora::ForwardCtx;
use qlora::model::phi3::{KvCache, OpPath};
use qlora::model::random::{self, Shape};
use qlora::train::loss_and_grads;
use qlora::train::objective::pref::{Preference, Reference};
use qlora::train::objective::sft::Sft;
use qlora::train::objective::{Kind, Objective, Params};
use qlora::train::optim::{AdamW, AdamWConfig};
use std::hint::black_box;

const SEQ: usize = 256;

fn train_step(c: &mut Criterion) {
    let dev = Device::Cpu;
    let shape = Shape::SMALL_135M;
    let ops = OpPath::for_device(&dev, DType::F32);
    let model = random::qlora_model(&shape, 16, SEQ, DType::F32, &dev, ops).expect("model");
    let batch = random::batch(SEQ, shape.vocab, &dev).expect("batch");
    let params = model.adapters().iter().flat_map(|a| a.vars()).collect();
    let mut opt = AdamW::new(params, AdamWConfig::default()).expect("optimizer");
    let mut group = c.benchmark_group("train_step_135m_seq256");
    group.sample_size(10);
    for (name, checkpointing) in [("checkpointing", true), ("no_checkpointing", false)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let lg = loss_and_grads(&model, &batch, &ForwardCtx::default(), checkpointing)
                    .expect("step");
                let grads: Vec<Tensor> = lg.grads;
                opt.step(&grads, 1e-4).expect("AdamW");
                black_box(lg.loss_sum)
            })
        });
    }
    group.finish();

    let prompt = batch.input_ids.clone();
    let next = Tensor::new(&[[13u32]], &dev).expect("token");
    let mut group = c.benchmark_group("generate_135m");
    group.sample_size(20);
    group.bench_function("token_after_256", |b| {
        b.iter_batched(
            || {
                let mut cache = KvCache::default();
                model.forward_cached(&prompt, &mut cache).expect("prompt");
                cache
            },
            |mut cache| black_box(model.forward_cached(&next, &mut cache).expect("token")),
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

/// One pair of 256-token sequences (a 32-token prompt, 224-token completions), as rows.
fn pair_rows(vocab: usize) -> (PairRows, Vec<Row>) {
    let ids: Vec<u32> = (0..480u32)
        .map(|t| 3 + (t * 7919 + 13) % (vocab as u32 - 3))
        .collect();
    let pair = cut_pair(
        &PairIds {
            prompt: ids[..32].to_vec(),
            chosen: ids[32..256].to_vec(),
            rejected: ids[256..480].to_vec(),
            line: 1,
        },
        usize::MAX,
        Truncation::KeepStart,
    )
    .expect("a pair");
    // SFT on the same rows, trained on the same completion tokens.
    let rows = [&pair.chosen, &pair.rejected]
        .iter()
        .map(|s| {
            let n = s.ids.len();
            Row {
                ids: s.ids.clone(),
                targets: (0..n)
                    .map(|t| {
                        if t + 1 < n && s.completion[t + 1] {
                            i64::from(s.ids[t + 1])
                        } else {
                            -100
                        }
                    })
                    .collect(),
                positions: (0..n as u32).collect(),
                segments: vec![1; n],
            }
        })
        .collect();
    (pair, rows)
}

fn preference_step(c: &mut Criterion) {
    let dev = Device::Cpu;
    let shape = Shape::SMALL_135M;
    let ops = OpPath::for_device(&dev, DType::F32);
    let model = random::qlora_model(&shape, 16, SEQ, DType::F32, &dev, ops).expect("model");
    let (pair, rows) = pair_rows(shape.vocab);
    let mut sft = Sft {
        rows,
        eval_rows: Vec::new(),
        stats: Default::default(),
        skipped_lines: 0,
        pad_id: 0,
        cached: false,
        held_out: 0,
    };
    let params = Params {
        beta: 0.1,
        gamma: 0.5,
    };
    let mut dpo = Preference::new(
        Kind::Dpo,
        params,
        vec![pair],
        Vec::new(),
        Default::default(),
        0,
    );
    dpo.reference = Some(Reference::snapshot(&model).expect("reference"));
    let mut pre = Preference::new(
        Kind::Dpo,
        params,
        dpo.pairs.clone(),
        Vec::new(),
        Default::default(),
        0,
    );
    pre.precomputed = Some(dpo.precompute(&model, 1).expect("reference scores"));
    let ctx = ForwardCtx::default();
    let mut group = c.benchmark_group("preference_step_135m_2x256");
    group.sample_size(10);
    group.bench_function("sft_same_rows", |b| {
        b.iter(|| {
            black_box(
                sft.micro_batch(&model, &[0, 1], &ctx, &true.into())
                    .expect("sft")
                    .scalars,
            )
        })
    });
    group.bench_function("dpo", |b| {
        b.iter(|| {
            black_box(
                dpo.micro_batch(&model, &[0], &ctx, &true.into())
                    .expect("dpo")
                    .scalars,
            )
        })
    });
    group.bench_function("dpo_precomputed_reference", |b| {
        b.iter(|| {
            black_box(
                pre.micro_batch(&model, &[0], &ctx, &true.into())
                    .expect("dpo")
                    .scalars,
            )
        })
    });
    group.finish();
}

criterion_group!(benches, train_step, preference_step);

fn main() {
    // SAFETY: no other thread has started yet.
    unsafe { qlora_quant::runtime::init() };
    qlora_quant::runtime::run(|| {
        benches();
        criterion::Criterion::default()
            .configure_from_args()
            .final_summary();
    });
}
