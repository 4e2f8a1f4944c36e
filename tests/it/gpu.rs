//! The model and the trainer on a CUDA device, against the same references as on the CPU:
//! transformers' logits (f32 and bf16), the CPU's loss and LoRA gradients, the CPU's training
//! curve, and resume reproducing the uninterrupted curve bit for bit. They run when this binary
//! was built with `--features cuda` and device 0 opens (scripts/gpu_check.sh runs them on a GPU);
//! elsewhere each prints "skipped: no CUDA device" and passes.

use crate::model::{F32_LOGITS_ABS_TOL, golden};
use crate::train::{batch, golden_ids, lora, randomize_b};
use crate::trainer::{small, train_losses};
use candle_core::{DType, Device, Tensor};
use qlora::device::DeviceSpec;
use qlora::lora::{ForwardCtx, attach};
use qlora::model::load::{BaseFormat, LoadOptions, load};
use qlora::model::{FusedAttention, OpPath, Phi3};
use qlora::train::trainer::Trainer;
use qlora::train::{Batch, loss_and_grads};

const ATTENTIONS: [FusedAttention; 2] = [FusedAttention::Blocked, FusedAttention::Streaming];

fn cuda() -> Option<Device> {
    match DeviceSpec::Cuda(0).open() {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e:#})");
            None
        }
    }
}

fn load_on(dir: &str, base: BaseFormat, dtype: DType, device: &Device) -> Phi3 {
    load(
        &crate::common::fixtures().join("phi3").join(dir),
        &LoadOptions {
            dtype,
            device: device.clone(),
            base,
        },
    )
    .unwrap()
}

fn host(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn rms(t: &Tensor) -> f32 {
    t.sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt()
}

const CASES: [(&str, BaseFormat, &str, &str); 5] = [
    ("mha", BaseFormat::Dense, "input_ids", "logits"),
    ("gqa", BaseFormat::Dense, "input_ids", "logits"),
    ("longrope", BaseFormat::Dense, "input_ids", "logits"),
    (
        "partial",
        BaseFormat::Dense,
        "input_ids_short",
        "logits_short",
    ),
    ("gqa-bnb", BaseFormat::NF4, "input_ids", "logits"),
];

#[test]
fn cuda_logits_match_transformers_in_f32_and_bf16() {
    let Some(dev) = cuda() else { return };
    for (dir, base, ids_key, logits_key) in CASES {
        let (ids, want) = golden(dir, "logits.safetensors", ids_key, logits_key);
        let ids = ids.to_device(&dev).unwrap();
        for attention in ATTENTIONS {
            let mut m = load_on(dir, base, DType::F32, &dev);
            assert_eq!(m.ops, OpPath::Fused(FusedAttention::Blocked));
            m.ops = OpPath::Fused(attention);
            let got = host(&m.forward(&ids).unwrap());
            let d = max_abs(&(&got - &want).unwrap());
            assert!(
                d <= F32_LOGITS_ABS_TOL,
                "{dir} f32 {attention:?}: max |Δlogits| {d:e}"
            );
        }
        // bf16 compute (the GPU default): 8 mantissa bits through two layers.
        let m = load_on(dir, base, DType::BF16, &dev);
        let got = host(&m.forward(&ids).unwrap());
        let rel = rms(&(&got - &want).unwrap()) / rms(&want);
        assert!(rel <= 2e-2, "{dir} bf16: relative RMS error {rel:e}");
    }
}

fn to_dev(b: &Batch, dev: &Device) -> Batch {
    Batch {
        input_ids: b.input_ids.to_device(dev).unwrap(),
        positions: b.positions.to_device(dev).unwrap(),
        segments: b.segments.as_ref().map(|s| s.to_device(dev).unwrap()),
        targets: b.targets.clone(),
    }
}

#[test]
fn cuda_loss_and_lora_gradients_match_the_cpu() {
    let Some(dev) = cuda() else { return };
    // NF4 base, grouped-query heads, dropout (drawn on the device), packed sequences.
    let mut cpu = crate::model::load_f32("gqa", BaseFormat::NF4);
    attach::init_adapters(&mut cpu, &lora(4, 0.1), 5).unwrap();
    randomize_b(&cpu, 20);
    let mut b = batch(&golden_ids());
    b.positions = Tensor::new(&[[0u32, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]], &Device::Cpu).unwrap();
    b.segments =
        Some(Tensor::new(&[[1u32, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]], &Device::Cpu).unwrap());
    let ctx = ForwardCtx {
        dropout_seed: Some(77),
    };
    let want = loss_and_grads(&cpu, &b, &ctx, false).unwrap();
    let b_dev = to_dev(&b, &dev);
    for attention in ATTENTIONS {
        let mut m = load_on("gqa", BaseFormat::NF4, DType::F32, &dev);
        attach::init_adapters(&mut m, &lora(4, 0.1), 5).unwrap();
        randomize_b(&m, 20);
        m.ops = OpPath::Fused(attention);
        for checkpointing in [false, true] {
            let got = loss_and_grads(&m, &b_dev, &ctx, checkpointing).unwrap();
            let rel = (got.loss_sum - want.loss_sum).abs() / want.loss_sum.abs();
            assert!(
                rel <= 1e-5,
                "{attention:?}: loss {} vs {}",
                got.loss_sum,
                want.loss_sum
            );
            for (i, ((ga, gb), (wa, wb))) in got.grads.iter().zip(&want.grads).enumerate() {
                for (g, w) in [(ga, wa), (gb, wb)] {
                    let d = max_abs(&(host(g) - w).unwrap());
                    let scale = max_abs(w).max(1e-12);
                    assert!(
                        d <= 1e-4 * scale,
                        "{attention:?} adapter {i} (checkpointing {checkpointing}): {d:e} of {scale:e}"
                    );
                }
            }
        }
    }
}

fn losses(out: &std::path::Path) -> Vec<f64> {
    train_losses(out)
        .into_iter()
        .map(|(_, bits)| f64::from_bits(bits))
        .collect()
}

#[test]
fn cuda_training_follows_the_cpu_curve_and_resumes_bit_for_bit() {
    let Some(_) = cuda() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, device: &str, dtype: &str, stop: Option<u64>| {
        let out = tmp.path().join(name);
        let mut c = small(&out);
        c.training.device = device.into();
        c.training.dtype = dtype.into();
        Trainer::new(c, false).unwrap().run(stop).unwrap();
        out
    };
    let cpu = losses(&run("cpu", "cpu", "f32", None));
    let gpu = losses(&run("cuda", "cuda", "f32", None));
    assert_eq!(cpu.len(), 9);
    // Same data, seeds and dropout masks; f32 sums in other orders, amplified a little by AdamW.
    for (step, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        let tol = if step == 0 { 1e-5 } else { 1e-3 };
        assert!(
            (c - g).abs() <= tol * c.abs(),
            "step {}: cpu {c} vs cuda {g}",
            step + 1
        );
    }
    // Killed after step 5 (latest checkpoint: step 3), resumed on the GPU.
    let b = run("cuda-resumed", "cuda", "f32", Some(5));
    let cfg = qlora::config::TrainConfig::from_file(&b.join("config.resolved.toml")).unwrap();
    let mut t = Trainer::new(cfg, true).unwrap();
    assert!(t.run(None).unwrap().finished);
    assert_eq!(losses(&b), gpu, "the resumed curve differs");
    // bf16 compute trains too: finite losses, the first (adapters still zero) within bf16 error.
    let bf = losses(&run("cuda-bf16", "cuda", "bf16", None));
    assert!(bf.iter().all(|l| l.is_finite()), "{bf:?}");
    assert!(
        (bf[0] - gpu[0]).abs() <= 2e-2 * gpu[0],
        "{} vs {}",
        bf[0],
        gpu[0]
    );
}
