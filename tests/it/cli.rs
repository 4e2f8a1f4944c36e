//! The binary end to end on the built-in model: train → eval → generate, and generate's greedy
//! tokens equal the argmax of the plain forward (the training numerics) at every step.

use crate::common::qlora;
use candle_core::{D, Device, Tensor};
use std::path::Path;

#[test]
fn train_eval_generate_on_the_builtin_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let out_s = out.display().to_string();
    let (code, stdout, stderr) = qlora(&[
        "train",
        "--4bit",
        "--config",
        "configs/demo.toml",
        "--max-steps",
        "3",
        "--output",
        &out_s,
        "--set",
        "training.save_every=0",
        "--set",
        "training.eval_every=0",
        "--rank",
        "4",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("done: 3 steps"), "{stdout}");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (
            cfg["r"].as_u64(),
            cfg["peft_type"].as_str(),
            cfg["task_type"].as_str()
        ),
        (Some(4), Some("LORA"), Some("CAUSAL_LM"))
    );
    let base = cfg["base_model_name_or_path"].as_str().unwrap().to_string();
    assert!(
        Path::new(&base).join("config.json").exists(),
        "the adapter names its base: {base}"
    );

    let adapter = out.join("adapter").display().to_string();
    let (code, stdout, stderr) = qlora(&[
        "eval",
        "--adapter",
        &adapter,
        "--4bit",
        "--data",
        "data/demo/eval.jsonl",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let ev: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(ev["loss"].as_f64().unwrap().is_finite() && ev["tokens"].as_u64().unwrap() > 0);

    let (code, stdout, stderr) = qlora(&[
        "generate",
        "--adapter",
        &adapter,
        "--4bit",
        "--prompt",
        "What is the capital of Peru?",
        "--max-new-tokens",
        "6",
        "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let g: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let prompt: Vec<u32> = serde_json::from_value(g["prompt_token_ids"].clone()).unwrap();
    let generated: Vec<u32> = serde_json::from_value(g["token_ids"].clone()).unwrap();
    assert_eq!(
        &prompt[prompt.len() - 1..],
        &[32001],
        "ends with the generation prompt <|assistant|>"
    );
    assert!(!generated.is_empty());

    // The same model through the library, without the KV cache: each generated token is the argmax.
    let mut model = qlora::model::load::load(
        Path::new(&base),
        &qlora::model::load::LoadOptions {
            dtype: candle_core::DType::F32,
            device: Device::Cpu,
            base: qlora::model::load::BaseFormat::NF4,
        },
    )
    .unwrap();
    let a = qlora::lora::peft::load(&out.join("adapter"), &Device::Cpu).unwrap();
    qlora::lora::attach::load_adapters(&mut model, &a).unwrap();
    let mut ids = prompt.clone();
    for &tok in &generated {
        let logits = model
            .forward(
                &Tensor::new(ids.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            )
            .unwrap();
        let last = logits.squeeze(0).unwrap().get(ids.len() - 1).unwrap();
        assert_eq!(
            last.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap(),
            tok
        );
        ids.push(tok);
    }

    // Export verifies what it wrote; `qlora verify` exits 0 faithful, 1 not, 2 bad input.
    let gguf = tmp.path().join("m.gguf").display().to_string();
    let (code, stdout, stderr) = qlora(&[
        "export",
        "--adapter",
        &adapter,
        "--out",
        &gguf,
        "--format",
        "gguf",
        "--type",
        "f16",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("verify: f16 export") && stdout.contains("faithful"),
        "{stdout}"
    );
    let base_gguf = tmp.path().join("base.gguf").display().to_string();
    let (code, stdout, stderr) = qlora(&[
        "export",
        "--model",
        &base,
        "--out",
        &base_gguf,
        "--format",
        "gguf",
        "--no-verify",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(!stdout.contains("verify"), "{stdout}");
    let (code, stdout, _) = qlora(&["verify", &gguf, "--adapter", &adapter, "--tokens", "4"]);
    assert_eq!(code, 0, "{stdout}");
    let (code, stdout, _) = qlora(&["verify", &base_gguf, "--adapter", &adapter, "--json"]);
    assert_eq!(code, 1, "the base alone is not the adapted model: {stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(
        report["failures"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f.as_str().unwrap().starts_with("adapter:")),
        "{report}"
    );
    let (code, _, stderr) = qlora(&["verify", "no-such.gguf", "--adapter", &adapter]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no-such.gguf"), "{stderr}");
}

#[test]
fn train_flag_errors_are_clear() {
    let (code, _, stderr) = qlora(&[
        "train",
        "--config",
        "configs/demo.toml",
        "--set",
        "training.warmup=3",
    ]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("[training] has no key `warmup`"),
        "{stderr}"
    );
    let (code, _, stderr) = qlora(&["train", "--model", "builtin:tiny-phi3"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("no training data"), "{stderr}");
    // A negative number is a value (then out of range), not clap's "unexpected argument".
    for lr in [["--lr", "-1"], ["--lr", "-1e-4"]] {
        let (code, _, stderr) = qlora(&["train", "--config", "configs/demo.toml", lr[0], lr[1]]);
        assert_eq!(code, 2, "{stderr}");
        assert!(
            stderr.contains("training.learning_rate must be a positive number")
                && !stderr.contains("unexpected argument"),
            "{stderr}"
        );
    }
    // A relative data path says what it is relative to.
    let (code, _, stderr) = qlora(&[
        "train",
        "--config",
        "configs/demo.toml",
        "--data",
        "data/demo/no-such.jsonl",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "data/demo/no-such.jsonl (relative to {}): cannot read the data file",
            env!("CARGO_MANIFEST_DIR")
        )),
        "{stderr}"
    );
}

#[test]
fn a_max_seq_len_past_the_context_is_warned_about() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run").display().to_string();
    let (code, stdout, stderr) = qlora(&[
        "train",
        "--config",
        "configs/demo.toml",
        "--max-steps",
        "1",
        "--max-seq-len",
        "5000",
        "--output",
        &out,
        "--set",
        "training.save_every=0",
        "--set",
        "training.eval_every=0",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stderr
            .contains("warning: training.max_seq_len 5000 exceeds the model's context length 4096")
            && stderr.contains("no rope scaling (rope_theta 10000)"),
        "{stderr}"
    );
    // Within the context: no warning.
    let out2 = tmp.path().join("run2").display().to_string();
    let (code, _, stderr) = qlora(&[
        "train",
        "--config",
        "configs/demo.toml",
        "--max-steps",
        "1",
        "--output",
        &out2,
        "--set",
        "training.save_every=0",
        "--set",
        "training.eval_every=0",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("context length"), "{stderr}");
}

#[test]
fn inspect_prints_metadata_and_tensor_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let lora = tmp.path().join("lora.gguf");
    let l = lora.display().to_string();
    let (code, _, stderr) = qlora(&[
        "export",
        "--model",
        "tests/fixtures/phi3/gqa",
        "--adapter",
        "tests/fixtures/phi3/peft/adapter",
        "--out",
        &l,
        "--format",
        "gguf-lora",
        "--type",
        "f32",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, _) = qlora(&["inspect", &l]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("GGUF v3")
            && stdout.contains("adapter.type = \"lora\"")
            && stdout.contains("blk.1.attn_qkv.weight.lora_b"),
        "{stdout}"
    );
    let (code, stdout, _) = qlora(&[
        "inspect",
        "tests/fixtures/phi3/peft/adapter/adapter_model.safetensors",
    ]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("safetensors, 16 tensors") && stdout.contains("lora_A.weight"),
        "{stdout}"
    );
    let (code, _, stderr) = qlora(&["inspect", "README.md"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("neither GGUF nor safetensors"), "{stderr}");
}

/// `QLORA_CPU=avx2` runs the AVX2 paths on an AVX-512 CPU (cpuid traps and is answered without
/// AVX-512: `qlora_quant::isa`); what each host can show, it shows.
#[test]
fn qlora_cpu_avx2_hides_avx512_from_every_dispatch() {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
    let tmp = tempfile::tempdir().unwrap();
    let run = |cpu: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_qlora"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args([
                "train",
                "--config",
                "configs/demo.toml",
                "--max-steps",
                "1",
                "--output",
            ])
            .arg(tmp.path().join(cpu))
            .env("QLORA_CPU", cpu)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run("sse9");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("QLORA_CPU=sse9: use native"), "{err}");
    let (code, native) = run("native");
    assert_eq!(code, 0, "{native}");
    let (code, err) = run("avx2");
    if !has("avx512f") {
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("no AVX-512 to hide"), "{err}");
    } else if !has("cpuid_fault") {
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("needs CPUID faulting"), "{err}");
    } else {
        assert_eq!(code, 0, "{err}");
        assert!(native.contains("cpu, avx512 paths"), "{native}");
        assert!(err.contains("AVX-512 and AMX hidden"), "{err}");
        assert!(err.contains("cpu, avx2 paths"), "{err}");
    }
}
