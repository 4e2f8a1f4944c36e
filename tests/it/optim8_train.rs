//! 8-bit AdamW's own semantics and plumbing: training's CUDA mode step by step against an f64
//! nearest-code reference, the weight-decay order of both modes, non-finite gradients, the bytes
//! per parameter, the config key, checkpoints of the other optimizer, and a run killed with
//! SIGKILL resuming bit for bit.

use crate::optim8::{splitmix64, unit, vec_of};
use candle_core::{DType, Device, Tensor, Var};
use qlora::train::optim::AdamWConfig;
use qlora::train::optim8::{AdamW8bit, State};
use qlora_quant::BnbBackend;
use qlora_quant::format::{dynamic_map, dynamic_map_unsigned};
use std::collections::HashMap;

/// A deterministic stream of f32 in [-1, 1).
struct Stream(u64);

impl Stream {
    fn next(&mut self) -> f32 {
        self.0 += 1;
        unit(splitmix64(self.0))
    }
}

/// The map entries acceptable as the code of `x` (f64): the nearest, and any other within
/// rounding of it (`x` reaches the optimizer as an f32 quotient).
fn nearest_codes(map: &[f32; 256], x: f64) -> Vec<usize> {
    let d: Vec<f64> = map.iter().map(|&c| (x - c as f64).abs()).collect();
    let best = d.iter().copied().fold(f64::INFINITY, f64::min);
    let slack = 1e-6 * x.abs() + 1e-12;
    (0..256).filter(|&i| d[i] <= best + slack).collect()
}

/// The CUDA mode against an independent f64 reference, one step at a time from the state the
/// optimizer reached: Adam's moments and update in f64, codes by brute-force nearest search with
/// the sign fix for `m`, new absmax the block's max |·|. Blocks of different magnitudes, a
/// partial last block, a block whose gradient is zero at first (absmax 0) and weight decay.
#[test]
fn cuda_mode_is_adam_on_nearest_codes_step_by_step() {
    use qlora::train::optim8::{BLOCK_ELEMS, Coeffs, step_8bit};
    let (map1, map2) = (dynamic_map(), dynamic_map_unsigned());
    let n = 5 * BLOCK_ELEMS + 77;
    let nb = n.div_ceil(BLOCK_ELEMS);
    let cfg = AdamWConfig {
        weight_decay: 0.1,
        ..Default::default()
    };
    let mut r = Stream(7);
    let mut p: Vec<f32> = (0..n).map(|_| r.next()).collect();
    let (mut c1, mut c2) = (vec![0u8; n], vec![0u8; n]);
    let (mut a1, mut a2) = (vec![0f32; nb], vec![0f32; nb]);
    let lr = 1e-2;
    for t in 1..=6u64 {
        let g: Vec<f32> = (0..n)
            .map(|i| {
                let b = i / BLOCK_ELEMS;
                if b == 2 && t <= 2 {
                    0.0
                } else if t == 1 && (i == 1 || i == 2) {
                    // m within 1e-9 of the block's absmax: the nearest code is 0.0, so the
                    // negative one must take the code below it (the sign fix).
                    if i == 1 { -1e-10 } else { 1e-10 }
                } else {
                    r.next() * 10f32.powi(-(b as i32) - 1)
                }
            })
            .collect();
        let (p0, c10, c20, a10, a20) = (p.clone(), c1.clone(), c2.clone(), a1.clone(), a2.clone());
        let k = Coeffs::new(&cfg, lr, t, BnbBackend::Cuda);
        step_8bit(&k, &mut p, &g, &mut c1, &mut c2, &mut a1, &mut a2);
        let (b1, b2) = (cfg.beta1 as f32 as f64, cfg.beta2 as f32 as f64);
        let (corr1, corr2) = (1.0 - b1.powi(t as i32), (1.0 - b2.powi(t as i32)).sqrt());
        for (b, ((gb, pb), p0b)) in g
            .chunks(BLOCK_ELEMS)
            .zip(p.chunks(BLOCK_ELEMS))
            .zip(p0.chunks(BLOCK_ELEMS))
            .enumerate()
        {
            let at = |j: usize| b * BLOCK_ELEMS + j;
            let m: Vec<f64> = (0..gb.len())
                .map(|j| {
                    b1 * (map1[c10[at(j)] as usize] * a10[b]) as f64 + (1.0 - b1) * gb[j] as f64
                })
                .collect();
            let v: Vec<f64> = (0..gb.len())
                .map(|j| {
                    let g = gb[j] as f64;
                    b2 * (map2[c20[at(j)] as usize] * a20[b]) as f64 + (1.0 - b2) * g * g
                })
                .collect();
            let am1 = m.iter().fold(0f64, |a, x| a.max(x.abs()));
            let am2 = v.iter().fold(0f64, |a, x| a.max(x.abs()));
            let close = |x: f32, y: f64, what: &str| {
                assert!(
                    (x as f64 - y).abs() <= 1e-6 * y.abs().max(1e-30),
                    "step {t} block {b}: {what} {x:e}, reference {y:e}"
                );
            };
            close(a1[b], am1, "absmax1");
            close(a2[b], am2, "absmax2");
            for j in 0..gb.len() {
                let update = lr * corr2 / corr1 * m[j] / (v[j].sqrt() + cfg.eps * corr2);
                let want = (p0b[j] as f64 - update) * (1.0 - lr * cfg.weight_decay);
                let tol = 1e-6 * want.abs().max(lr);
                assert!(
                    (pb[j] as f64 - want).abs() <= tol,
                    "step {t} element {}: p {}, reference {want}",
                    at(j),
                    pb[j]
                );
                if am1 > 0.0 {
                    let mut ok = nearest_codes(map1, m[j] / am1);
                    // The sign fix: a code of m's sign, one step toward it.
                    for c in ok.iter_mut() {
                        if m[j] != 0.0 && (map1[*c] < 0.0) != (m[j] < 0.0) {
                            *c = if m[j] > 0.0 { *c + 1 } else { *c - 1 };
                        }
                    }
                    let got = c1[at(j)] as usize;
                    assert!(
                        ok.contains(&got),
                        "step {t} element {}: m code {got}, nearest {ok:?}",
                        at(j)
                    );
                } else {
                    assert_eq!(c1[at(j)], 127, "an all-zero m block gets the code of 0");
                }
                if am2 > 0.0 {
                    let ok = nearest_codes(map2, v[j] / am2);
                    let got = c2[at(j)] as usize;
                    assert!(
                        ok.contains(&got),
                        "step {t} element {}: v code {got}, nearest {ok:?}",
                        at(j)
                    );
                }
            }
        }
    }
    // The zero-gradient block had absmax 0 after step 1 and moments after step 3.
    assert!(a1[2] > 0.0 && a2[2] > 0.0);
}

/// One step from zero state with g = 1, lr 0.1, λ 0.5: Adam moves every parameter by ≈ −lr. The
/// CUDA kernel decays after it, (1 − 0.1)·0.95 = 0.855; bitsandbytes' CPU path before it,
/// 0.95 − 0.1 = 0.85. Both state kinds.
#[test]
fn weight_decay_order_cuda_after_cpu_before() {
    for (backend, want) in [(BnbBackend::Cuda, 0.855f32), (BnbBackend::Cpu, 0.85)] {
        for n in [4096usize, 10] {
            let p = Var::from_tensor(&Tensor::ones(n, DType::F32, &Device::Cpu).unwrap()).unwrap();
            let cfg = AdamWConfig {
                weight_decay: 0.5,
                ..Default::default()
            };
            let mut opt = AdamW8bit::new(vec![p], cfg, backend).unwrap();
            let g = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
            opt.step(&[g], 0.1).unwrap();
            for x in vec_of::<f32>(opt.params[0].as_tensor()) {
                assert!((x - want).abs() < 1e-5, "{backend} n {n}: {x}, want {want}");
            }
        }
    }
}

/// A NaN or infinite gradient element zeroes its moments and leaves its parameter alone; the
/// others of its block train on.
#[test]
fn non_finite_gradient_elements_zero_their_moments() {
    for n in [4096usize, 10] {
        let p = Var::from_tensor(&Tensor::ones(n, DType::F32, &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW8bit::new(vec![p], AdamWConfig::default(), BnbBackend::Cuda).unwrap();
        let g = |bad: f32| {
            let mut v = vec![0.5f32; n];
            (v[1], v[2]) = (bad, -bad);
            Tensor::new(v, &Device::Cpu).unwrap()
        };
        opt.step(&[g(0.5)], 0.01).unwrap();
        opt.step(&[g(f32::NAN)], 0.01).unwrap();
        opt.step(&[g(f32::INFINITY)], 0.01).unwrap();
        let p = vec_of::<f32>(opt.params[0].as_tensor());
        let moments: Vec<f32> = match &opt.states[0] {
            State::F32 { m, .. } => vec_of(m),
            State::Q8 { m, m_absmax, .. } => {
                let a = vec_of::<f32>(m_absmax)[0];
                vec_of::<u8>(m)
                    .iter()
                    .map(|&c| dynamic_map()[c as usize] * a)
                    .collect()
            }
        };
        assert!(p.iter().all(|x| x.is_finite()), "n {n}");
        assert_eq!((moments[1], moments[2]), (0.0, 0.0), "n {n}");
        // A constant gradient moves by lr a step: elements 1, 2 once (step 1, g = ±0.5), the
        // rest three times.
        for (x, want) in p[..3].iter().zip([0.97, 0.99, 1.01]) {
            assert!((x - want).abs() < 1e-4, "n {n}: {:?}", &p[..3]);
        }
    }
}

/// 2 + 8/256 bytes per parameter for LoRA matrices of Phi-3-mini at r 16 (every one a multiple of
/// 256 and ≥ 4096 elements); 8 under 4096 elements; a partial block costs a whole absmax pair.
#[test]
fn state_bytes_per_parameter() {
    use qlora::train::optim8::state_bytes;
    // qkv 3072→9216, o 3072→3072, gate_up 3072→16384, down 8192→3072; A [16, in], B [out, 16].
    let shapes = [(3072, 9216), (3072, 3072), (3072, 16384), (8192, 3072)];
    let n: Vec<usize> = shapes.iter().flat_map(|&(i, o)| [16 * i, 16 * o]).collect();
    let bytes: u64 = n.iter().map(|&n| state_bytes(n)).sum();
    let params: usize = n.iter().sum();
    assert_eq!(bytes as f64 / params as f64, 2.03125);
    assert_eq!(state_bytes(4095), 8 * 4095);
    assert_eq!(state_bytes(4097), 2 * 4097 + 8 * 17);
}

/// An unknown optimizer is one error naming the key and the accepted values.
#[test]
fn an_unknown_optimizer_names_the_key_and_the_choices() {
    let mut cfg = qlora::config::TrainConfig::default();
    let e = format!("{:#}", cfg.set("training.optimizer=adam8bit").unwrap_err());
    for s in [
        "training.optimizer",
        "adam8bit",
        "\"adamw\"",
        "\"adamw_8bit\"",
    ] {
        assert!(e.contains(s), "`{s}` not in: {e}");
    }
    cfg.set("training.optimizer=adamw_8bit").unwrap();
    assert_eq!(cfg.training.optimizer, "adamw_8bit");
}

/// Resuming with the other optimizer says which one wrote the checkpoint.
#[test]
fn a_checkpoint_of_the_other_optimizer_is_named() {
    use qlora::train::optim::{Optimizer, OptimizerKind};
    let var = || Var::from_tensor(&Tensor::zeros(4096, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let cfg = AdamWConfig::default();
    let a = Optimizer::new(OptimizerKind::AdamW, vec![var()], cfg).unwrap();
    let mut b = Optimizer::new(OptimizerKind::AdamW8bit, vec![var()], cfg).unwrap();
    let mut saved: HashMap<String, Tensor> = a.state_tensors().into_iter().collect();
    let e = b.load_state(&mut saved).unwrap_err().to_string();
    assert!(e.contains("m8.0") && e.contains("\"adamw\""), "{e}");
    let mut saved: HashMap<String, Tensor> = b.state_tensors().into_iter().collect();
    let mut a = Optimizer::new(OptimizerKind::AdamW, vec![var()], cfg).unwrap();
    let e = a.load_state(&mut saved).unwrap_err().to_string();
    assert!(e.contains("m.0") && e.contains("\"adamw_8bit\""), "{e}");
    // Its own state loads.
    let mut saved: HashMap<String, Tensor> = b.state_tensors().into_iter().collect();
    b.load_state(&mut saved).unwrap();
}

/// `qlora train` with 8-bit AdamW, killed with SIGKILL once it has written two checkpoints, then
/// resumed: its loss curve, adapter and 8-bit optimizer state three steps past the checkpoint
/// are those of a run never interrupted.
#[test]
fn a_run_killed_with_sigkill_resumes_bit_for_bit_with_8bit_state() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, last) = killed_and_resumed(
        tmp.path(),
        &[
            "--config",
            "configs/demo.toml",
            "--set",
            "training.optimizer=\"adamw_8bit\"",
        ],
    );
    let state =
        candle_core::safetensors::load(a.join(&last).join("optimizer.safetensors"), &Device::Cpu)
            .unwrap();
    let q8 = state
        .iter()
        .filter(|(k, t)| k.starts_with("m8.") && t.dtype() == DType::U8)
        .count();
    assert!(
        q8 > 0,
        "no 8-bit state in {last}: {:?}",
        state.keys().collect::<Vec<_>>()
    );
}

/// The same for DPO: its reference (the starting values, kept outside the checkpoint) is rebuilt
/// on resume, and the curve goes on unchanged.
#[test]
fn a_dpo_run_killed_with_sigkill_resumes_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    killed_and_resumed(
        tmp.path(),
        &[
            "--config",
            "configs/dpo.toml",
            "--batch-size",
            "2",
            "--set",
            "training.eval_every=0",
        ],
    );
}

/// `qlora train <extra>` killed with SIGKILL once it has written two checkpoints, then resumed,
/// against a run never interrupted: the same loss curve, and the same adapter and optimizer bytes
/// three steps past the checkpoint. Returns the uninterrupted run's directory and that
/// checkpoint's path in it.
fn killed_and_resumed(tmp: &std::path::Path, extra: &[&str]) -> (std::path::PathBuf, String) {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let args = |out: &std::path::Path, more: &[String]| {
        let mut a: Vec<String> = ["train", "--4bit"].map(String::from).to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        a.extend(
            [
                "--max-steps",
                "100000",
                "--set",
                "training.eval_every=0",
                "--set",
                "training.save_every=1",
                "--set",
                "training.keep_last=100",
                "--output",
            ]
            .map(String::from),
        );
        a.push(out.display().to_string());
        a.extend_from_slice(more);
        a
    };
    let qlora = |a: &[String]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_qlora"));
        c.current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(a)
            .env("RAYON_NUM_THREADS", "1");
        c
    };
    let ok = |c: &mut Command| {
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let (a, b) = (tmp.join("a"), tmp.join("b"));
    let ckpts = b.join("checkpoints");
    let mut child = qlora(&args(&b, &[]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let steps = |dir: &std::path::Path| -> Vec<u64> {
        let mut s: Vec<u64> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        s.sort();
        s
    };
    while steps(&ckpts).len() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no checkpoints after 120 s"
        );
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let k = *steps(&ckpts).last().unwrap();
    let stop = (k + 3).to_string();
    let resume = [
        "train",
        "--resume",
        &b.display().to_string(),
        "--stop-after-steps",
        &stop,
    ]
    .map(String::from);
    ok(&mut qlora(&resume));
    ok(&mut qlora(&args(
        &a,
        &["--stop-after-steps".into(), stop.clone()],
    )));
    let (la, lb) = (
        crate::trainer::train_losses(&a),
        crate::trainer::train_losses(&b),
    );
    assert_eq!(la.len() as u64, k + 3);
    assert_eq!(la, lb, "loss curves differ");
    let last = format!("checkpoints/step-{:06}", k + 3);
    for f in ["adapter/adapter_model.safetensors", "optimizer.safetensors"] {
        let read = |d: &std::path::Path| std::fs::read(d.join(&last).join(f)).unwrap();
        assert!(read(&a) == read(&b), "{last}/{f} differs");
    }
    (a, last)
}

/// The disk plan sizes `optimizer.safetensors` from `checkpoint_layout`: it names exactly the
/// tensors `state_tensors` writes, with their dtypes and shapes, for both optimizers.
#[test]
fn checkpoint_layout_is_what_state_tensors_writes() {
    use qlora::train::optim::{Optimizer, OptimizerKind, checkpoint_layout};
    let shapes: [&[usize]; 4] = [&[16, 512], &[4095], &[20, 250], &[8, 8]];
    for kind in [OptimizerKind::AdamW, OptimizerKind::AdamW8bit] {
        let vars = shapes
            .iter()
            .map(|s| {
                Var::from_tensor(&Tensor::zeros(*s, DType::F32, &Device::Cpu).unwrap()).unwrap()
            })
            .collect();
        let opt = Optimizer::new(kind, vars, AdamWConfig::default()).unwrap();
        let got: Vec<_> = opt
            .state_tensors()
            .into_iter()
            .map(|(n, t)| (n, format!("{:?}", t.dtype()), t.dims().to_vec()))
            .collect();
        let want: Vec<_> = shapes
            .iter()
            .enumerate()
            .flat_map(|(i, s)| checkpoint_layout(kind, i, s))
            .map(|(n, d, s)| (n, format!("{d:?}"), s))
            .collect();
        assert_eq!(got, want, "{}", kind.as_str());
    }
}
