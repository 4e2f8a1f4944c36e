//! The model and the trainer on a CUDA device, against the same references as on the CPU:
//! transformers' logits (f32 and bf16), the CPU's loss and LoRA gradients, the CPU's training
//! curve, and resume reproducing the uninterrupted curve bit for bit. They run when this binary
//! was built with `--features cuda` and device 0 opens (scripts/gpu_check.sh runs them on a GPU);
//! elsewhere each prints "skipped: no CUDA device" and passes.

use crate::common::{assert_grads_close, fixtures, host};
use crate::fused_model::{ATTENTIONS, LOGIT_CASES};
use crate::model::{assert_cached_equals_full, assert_packed_equals_separate, check, golden};
use crate::train::{golden_ids, lora, packed_batch, randomize_b};
use crate::trainer::{small, train_losses};
use candle_core::{DType, Device, Tensor};
use qlora::device::DeviceSpec;
use qlora::lora::{ForwardCtx, attach};
use qlora::model::load::{BaseFormat, LoadOptions, load};
use qlora::model::{FusedAttention, OpPath, Phi3};
use qlora::train::loss_and_grads;
use qlora::train::trainer::Trainer;

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
        &fixtures().join("phi3").join(dir),
        &LoadOptions {
            dtype,
            device: device.clone(),
            base,
        },
    )
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

#[test]
fn cuda_model_matches_transformers_in_f32_and_bf16() {
    let Some(dev) = cuda() else { return };
    for (dir, base, ids_key, logits_key) in LOGIT_CASES {
        let (ids, want) = golden(dir, "logits.safetensors", ids_key, logits_key);
        let ids = ids.to_device(&dev).unwrap();
        for attention in ATTENTIONS {
            let mut m = load_on(dir, base, DType::F32, &dev);
            assert_eq!(m.ops, OpPath::Fused(FusedAttention::Blocked));
            m.ops = OpPath::Fused(attention);
            check(
                &m,
                &ids,
                &want,
                &format!("{dir} {ids_key} f32 {attention:?}"),
            );
        }
        // bf16 compute (the GPU default): 8 mantissa bits through two layers.
        let m = load_on(dir, base, DType::BF16, &dev);
        let got = host(&m.forward(&ids).unwrap());
        let rel = rms(&(&got - &want).unwrap()) / rms(&want);
        assert!(
            rel <= 2e-2,
            "{dir} {ids_key} bf16: relative RMS error {rel:e}"
        );
    }
    for attention in ATTENTIONS {
        let mut m = load_on("gqa", BaseFormat::NF4, DType::F32, &dev);
        m.ops = OpPath::Fused(attention);
        assert_cached_equals_full(&m);
        assert_packed_equals_separate(&m);
    }
}

#[test]
fn cuda_loss_and_lora_gradients_match_the_cpu() {
    let Some(dev) = cuda() else { return };
    // NF4 base, grouped-query heads, dropout (drawn on the device), packed sequences.
    let mut cpu = crate::model::load_f32("gqa", BaseFormat::NF4);
    attach::init_adapters(&mut cpu, &lora(4, 0.1), 5).unwrap();
    randomize_b(&cpu, 20);
    let ctx = ForwardCtx {
        dropout_seed: Some(77),
        ..Default::default()
    };
    let want = loss_and_grads(
        &cpu,
        &packed_batch(&golden_ids(), &Device::Cpu),
        &ctx,
        false,
    )
    .unwrap();
    let b = packed_batch(&golden_ids(), &dev);
    for attention in ATTENTIONS {
        let mut m = load_on("gqa", BaseFormat::NF4, DType::F32, &dev);
        attach::init_adapters(&mut m, &lora(4, 0.1), 5).unwrap();
        randomize_b(&m, 20);
        m.ops = OpPath::Fused(attention);
        // Every checkpointing policy, a mix included (the attention replays its kept output).
        use qlora::train::policy::{BlockPolicy, Checkpointing};
        for checkpointing in [
            Checkpointing::from(false),
            Checkpointing::from(true),
            Checkpointing::from(BlockPolicy::Selective),
            Checkpointing::Blocks(vec![BlockPolicy::Selective, BlockPolicy::Keep]),
        ] {
            assert_grads_close(
                &loss_and_grads(&m, &b, &ctx, &checkpointing).unwrap(),
                &want,
                1e-5,
                1e-4,
                &format!(
                    "cuda {attention:?}, checkpointing {}",
                    checkpointing.describe(2)
                ),
            );
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
