//! Criterion benches of the CPU training path on the 135M shape of `scripts/compare_cpu_step.sh`
//! (hidden 576, 30 layers, 9 heads / 3 kv heads, intermediate 1536, vocab 49152, tied head; NF4
//! base, LoRA r = 16 on all four linears, f32): a whole training step (forward, head, backward,
//! AdamW) of one 256-token row with and without gradient checkpointing, and one generation step
//! (a token through the KV cache after a 256-token prompt).
//!
//! `cargo bench --bench train_step` (minutes: a step is a second or two on 2 cores). CI only
//! compiles it. The side-by-side ratio against PyTorch + PEFT is `scripts/compare_cpu_step.sh`.

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, criterion_group};
use qlora::lora::ForwardCtx;
use qlora::model::phi3::{KvCache, OpPath};
use qlora::model::random::{self, Shape};
use qlora::train::loss_and_grads;
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

criterion_group!(benches, train_step);

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
