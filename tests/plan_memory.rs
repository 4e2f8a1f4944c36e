//! `qlora plan`'s model of a training block against what candle actually allocates: a counting
//! allocator (this test binary's, so that nothing else runs in it) measures the memory one block's
//! forward keeps and the peak of its backward, and `model::phi3::memory::block` simulated by
//! `plan::tape` must predict both. A change to the block (a new op, a copy, a kept tensor) that is
//! not mirrored in its memory description fails here.

use candle_core::{DType, Device, Tensor, Var};
use qlora::lora::{ForwardCtx, LoraConfig, LoraLinear, attach};
use qlora::model::Phi3Config;
use qlora::model::linear::BaseWeight;
use qlora::model::phi3::memory::{self, Step};
use qlora::model::phi3::{Block, OpPath, Phi3};
use qlora::plan::tape::{Kind, Tape};
use qlora_quant::{Blocksize, Nf4Tensor, QuantType};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grow(n: usize) {
    let v = LIVE.fetch_add(n, Relaxed) + n;
    PEAK.fetch_max(v, Relaxed);
}

// SAFETY: every call forwards to `System` unchanged; the counters do not touch the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        grow(l.size());
        // SAFETY: forwarded as received.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        grow(l.size());
        // SAFETY: forwarded as received.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_sub(l.size(), Relaxed);
        grow(n);
        // SAFETY: forwarded as received.
        unsafe { System.realloc(p, l, n) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Starts a measurement: the live bytes now, which the peak is reset to.
fn mark() -> usize {
    let l = LIVE.load(Relaxed);
    PEAK.store(l, Relaxed);
    l
}

fn randn(shape: (usize, usize), seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rng.random_range(-0.05f32..0.05))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn model(
    hidden: usize,
    heads: usize,
    kv: usize,
    inter: usize,
    nf4: bool,
    r: usize,
    dora: bool,
) -> Phi3 {
    let cfg = Phi3Config::from_value(
        &serde_json::json!({
            "model_type": "phi3", "vocab_size": 256, "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": heads,
            "num_key_value_heads": kv, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 4096
        }),
        "plan_memory",
    )
    .unwrap();
    let d = hidden / heads;
    let lin = |out: usize, inp: usize, seed: u64| {
        let w = randn((out, inp), seed);
        LoraLinear {
            base: if nf4 {
                BaseWeight::Nf4(
                    Nf4Tensor::quantize(&w, QuantType::Nf4, Blocksize::DEFAULT, true).unwrap(),
                )
            } else {
                BaseWeight::Dense(w)
            },
            adapter: None,
        }
    };
    let ones = Tensor::ones(hidden, DType::F32, &Device::Cpu).unwrap();
    let block = Block {
        input_layernorm: ones.clone(),
        qkv: vec![("qkv_proj", lin((heads + 2 * kv) * d, hidden, 1))],
        o_proj: lin(hidden, heads * d, 2),
        post_attention_layernorm: ones.clone(),
        gate_up: vec![("gate_up_proj", lin(2 * inter, hidden, 3))],
        down_proj: lin(hidden, inter, 4),
    };
    let rope = cfg.rope().unwrap();
    let mut m = Phi3 {
        embed_tokens: randn((256, hidden), 5),
        lm_head: randn((256, hidden), 6),
        norm: ones,
        layers: vec![block],
        rope,
        cfg,
        dtype: DType::F32,
        device: Device::Cpu,
        ops: OpPath::for_device(&Device::Cpu, DType::F32),
        saved: Default::default(),
    };
    attach::init_adapters(
        &mut m,
        &LoraConfig {
            r,
            alpha: 16.0,
            dropout: 0.1,
            targets: vec!["all-linear".into()],
            rslora: false,
            use_dora: dora,
            modules_to_save: Vec::new(),
            trainable_token_indices: Default::default(),
        },
        0,
    )
    .unwrap();
    m
}

/// Measured `(kept, backward peak above kept)` of one checkpointed block recompute, as
/// `train::grads` runs it, and the plan's.
fn measure(
    m: &Phi3,
    (batch, seq, r): (usize, usize, usize),
    (nf4, dora, dropout): (bool, bool, bool),
) -> ((f64, f64), (f64, f64)) {
    let h = m.cfg.hidden_size;
    let ids: Vec<u32> = (0..(batch * seq) as u32).map(|i| (i * 7) % 256).collect();
    let ids = Tensor::from_vec(ids, (batch, seq), &Device::Cpu).unwrap();
    let positions = qlora::model::phi3::default_positions(&ids).unwrap();
    let prep = m.prepare(&positions, None, 0).unwrap();
    let x = m.embed(&ids).unwrap();
    let g = x.ones_like().unwrap();
    let ctx = ForwardCtx {
        dropout_seed: dropout.then_some(7),
        ..Default::default()
    };
    // A first pass so that one-time buffers (gemm's per-thread packing space) exist before.
    {
        let xin = Var::from_tensor(&x).unwrap();
        let out = m.block(0, xin.as_tensor(), &prep, &ctx, None).unwrap();
        let _ = (out * &g).unwrap().sum_all().unwrap().backward().unwrap();
    }
    let xin = Var::from_tensor(&x).unwrap();
    let before = mark();
    let out = m.block(0, xin.as_tensor(), &prep, &ctx, None).unwrap();
    let prod = (out * &g).unwrap().sum_all().unwrap();
    let kept = mark();
    let store = prod.backward().unwrap();
    let peak = PEAK.load(Relaxed);
    drop(store);
    drop(prod);

    let step = Step {
        batch,
        seq,
        elem: 4,
        cpu_threads: Some(rayon::current_num_threads()),
        nf4,
        adapted: m
            .cfg
            .layout()
            .targets()
            .into_iter()
            .map(|t| (t, r))
            .collect(),
        dropout,
        dora,
    };
    let nh = (batch * seq * h * 4) as u64;
    let mut t = Tape::new();
    let xv = t.var(nh);
    let o = memory::block(&mut t, &step, &m.cfg, xv);
    let gc = t.constant(nh);
    let p = t.op(Kind::MulConst, &[o, gc], nh);
    let root = t.op(Kind::Pass, &[p], 4);
    let sim = t.simulate(root);
    (
        ((kept - before) as f64, (peak - kept) as f64),
        (sim.kept as f64, sim.backward_peak as f64),
    )
}

#[test]
fn the_block_memory_model_matches_what_candle_allocates() {
    // (hidden, heads, kv heads, intermediate, NF4, rank, batch, seq, DoRA, dropout): grouped-query
    // and not, NF4 (the fused LoRA op) and dense (candle's matmuls), one and several rows; DoRA
    // on the fused op (no dropout) and composed with its second base product (dropout).
    let cases = [
        (256, 4, 4, 704, true, 16, 1, 256, false, true),
        (256, 8, 2, 512, true, 8, 2, 128, false, true),
        (256, 4, 4, 704, false, 16, 1, 512, false, true),
        (192, 6, 3, 512, true, 32, 3, 96, false, true),
        (256, 4, 4, 704, true, 16, 1, 256, true, false),
        (256, 8, 2, 512, true, 8, 2, 128, true, true),
        (256, 4, 4, 704, false, 16, 1, 512, true, true),
    ];
    let mut failures = Vec::new();
    for (hidden, heads, kv, inter, nf4, r, batch, seq, dora, dropout) in cases {
        let m = model(hidden, heads, kv, inter, nf4, r, dora);
        let ((kept, bwd), (p_kept, p_bwd)) = measure(&m, (batch, seq, r), (nf4, dora, dropout));
        eprintln!(
            "{hidden} {heads}/{kv} {inter} nf4 {nf4} r {r} {batch}x{seq} dora {dora} dropout {dropout}: kept {kept} vs {p_kept}, bwd {bwd} vs {p_bwd} ({:.3})",
            p_bwd / bwd
        );
        let what = format!(
            "hidden {hidden}, heads {heads}/{kv}, inter {inter}, nf4 {nf4}, r {r}, {batch}×{seq}, \
             DoRA {dora}, dropout {dropout}"
        );
        // The forward's kept tensors are counted exactly (up to the small per-op structs).
        if (p_kept - kept).abs() > 0.02 * kept {
            failures.push(format!("{what}: kept {kept} measured, {p_kept} predicted"));
        }
        // The backward's peak within 10% (the attention's chunk buffers are bounded, not
        // replayed chunk by chunk).
        if (p_bwd - bwd).abs() > 0.10 * bwd {
            failures.push(format!(
                "{what}: backward peak {bwd} measured, {p_bwd} predicted"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
