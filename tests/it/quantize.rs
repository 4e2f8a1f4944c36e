//! `qlora quantize`: against the checkpoint transformers + bitsandbytes wrote for the same model,
//! sharded layouts, and every bad input getting one clear error with nothing left behind.

use crate::common::{Raw, fixtures, tiny_config, tiny_tensors, write_checkpoint};
use indicatif::ProgressBar;
use qlora::quantize::{QuantizeOptions, quantize_checkpoint};
use qlora_quant::{Blocksize, BnbBackend, QuantType};
use safetensors::SafeTensors;
use std::path::Path;

pub fn opts(model: &Path, out: &Path) -> QuantizeOptions {
    QuantizeOptions {
        model: model.to_path_buf(),
        out: out.to_path_buf(),
        quant_type: QuantType::Nf4,
        blocksize: Blocksize::DEFAULT,
        double_quant: true,
        backend: BnbBackend::Cuda,
    }
}

fn quantize(model: &Path, out: &Path) -> anyhow::Result<qlora::quantize::QuantizeReport> {
    quantize_checkpoint(&opts(model, out), &ProgressBar::hidden())
}

fn err_of(model: &Path, out: &Path) -> String {
    format!("{:#}", quantize(model, out).unwrap_err())
}

#[test]
fn output_matches_what_transformers_and_bitsandbytes_saved() {
    // tests/fixtures/gen_bnb_goldens.py: tiny-phi3 (dense bf16) and tiny-phi3-bnb (transformers'
    // load_in_4bit nf4 + double quant, then save_pretrained).
    // transformers quantized on the CPU there: `--match-bnb cpu` gives its bytes, every one.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let o = QuantizeOptions {
        backend: BnbBackend::Cpu,
        ..opts(&fixtures().join("bnb/tiny-phi3"), &out)
    };
    let report = quantize_checkpoint(&o, &ProgressBar::hidden()).unwrap();
    assert_eq!(report.n_quantized, 8);
    let ours_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let theirs_bytes =
        std::fs::read(fixtures().join("bnb/tiny-phi3-bnb/model.safetensors")).unwrap();
    let (ours, theirs) = (
        SafeTensors::deserialize(&ours_bytes).unwrap(),
        SafeTensors::deserialize(&theirs_bytes).unwrap(),
    );
    let mut names_ours: Vec<_> = ours.names();
    let mut names_theirs: Vec<_> = theirs.names();
    names_ours.sort();
    names_theirs.sort();
    assert_eq!(names_ours, names_theirs, "same tensor names");
    for name in names_theirs {
        let (a, b) = (ours.tensor(name).unwrap(), theirs.tensor(name).unwrap());
        assert_eq!((a.dtype(), a.shape()), (b.dtype(), b.shape()), "{name}");
        // Includes the quant-state JSON: byte-identical to bitsandbytes' json.dumps.
        assert!(a.data() == b.data(), "{name}: bytes differ");
    }
    let cfg = |p: &Path| {
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(p.join("config.json")).unwrap())
            .unwrap()
    };
    assert_eq!(
        cfg(&out)["quantization_config"],
        cfg(&fixtures().join("bnb/tiny-phi3-bnb"))["quantization_config"]
    );
    assert!(
        out.join("generation_config.json").exists(),
        "other files are carried over"
    );
}

#[test]
fn sharded_checkpoints_stay_sharded_with_an_index() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, out) = (tmp.path().join("m"), tmp.path().join("q"));
    let config = tiny_config();
    write_checkpoint(&model, &config, &tiny_tensors(&config), 3);
    let report = quantize(&model, &out).unwrap();
    assert_eq!((report.n_quantized, report.n_copied), (8, 7));
    let index: qlora::checkpoint::ShardIndex =
        serde_json::from_slice(&std::fs::read(out.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    let files: std::collections::BTreeSet<_> = index.weight_map.values().collect();
    assert_eq!(files.len(), 3);
    for (name, file) in &index.weight_map {
        let bytes = std::fs::read(out.join(file)).unwrap();
        assert!(
            SafeTensors::deserialize(&bytes)
                .unwrap()
                .tensor(name)
                .is_ok(),
            "{name} in {file}"
        );
    }
    assert!(
        index
            .weight_map
            .contains_key("model.layers.1.mlp.down_proj.weight.quant_state.bitsandbytes__nf4")
    );
    assert!(out.join("tokenizer.json").exists());
}

#[test]
fn bad_inputs_get_one_clear_error_and_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let config = tiny_config();

    let missing = tmp.path().join("nope");
    assert!(err_of(&missing, &out).contains("no such checkpoint directory"));

    let no_config = tmp.path().join("no_config");
    write_checkpoint(&no_config, &config, &tiny_tensors(&config), 1);
    std::fs::remove_file(no_config.join("config.json")).unwrap();
    assert!(err_of(&no_config, &out).contains("config.json: cannot read"));

    let gemma = tmp.path().join("gemma");
    let mut cfg = config.clone();
    cfg["model_type"] = "gemma".into();
    write_checkpoint(&gemma, &cfg, &tiny_tensors(&config), 1);
    assert!(err_of(&gemma, &out).contains("model_type is `gemma`, not `phi3`"));
    // A Llama config over Phi-3's fused tensors: the layouts disagree, named.
    let llama = tmp.path().join("llama");
    cfg["model_type"] = "llama".into();
    write_checkpoint(&llama, &cfg, &tiny_tensors(&config), 1);
    let e = err_of(&llama, &out);
    assert!(
        e.contains(
            "`model.layers.0.mlp.gate_up_proj.weight` is not a linear of a `llama` checkpoint"
        ),
        "{e}"
    );

    let f64_weights = tmp.path().join("f64");
    let mut tensors = tiny_tensors(&config);
    let qkv = tensors
        .iter_mut()
        .find(|(n, _)| n.ends_with("0.self_attn.qkv_proj.weight"))
        .unwrap();
    let n: usize = qkv.1.shape.iter().product();
    qkv.1 = Raw {
        dtype: safetensors::Dtype::F64,
        shape: qkv.1.shape.clone(),
        data: vec![0u8; n * 8],
    };
    write_checkpoint(&f64_weights, &config, &tensors, 1);
    let e = err_of(&f64_weights, &out);
    assert!(
        e.contains(
            "model.safetensors: tensor `model.layers.0.self_attn.qkv_proj.weight` has dtype F64"
        ),
        "{e}"
    );

    let wrong_shape = tmp.path().join("shape");
    let mut tensors = tiny_tensors(&config);
    tensors
        .iter_mut()
        .find(|(n, _)| n.ends_with("1.mlp.down_proj.weight"))
        .unwrap()
        .1 = Raw::bf16(&[64, 95], 9);
    write_checkpoint(&wrong_shape, &config, &tensors, 1);
    assert!(
        err_of(&wrong_shape, &out).contains("has shape [64, 95], but config.json implies [64, 96]")
    );

    // A failure after writing started (a NaN in the last layer) removes the partial output.
    let nan = tmp.path().join("nan");
    let mut tensors = tiny_tensors(&config);
    let down = tensors
        .iter_mut()
        .find(|(n, _)| n.ends_with("1.mlp.down_proj.weight"))
        .unwrap();
    down.1.data[0..2].copy_from_slice(&half::bf16::NAN.to_le_bytes());
    write_checkpoint(&nan, &config, &tensors, 1);
    let e = err_of(&nan, &out);
    assert!(
        e.contains("quantizing `model.layers.1.mlp.down_proj.weight`") && e.contains("NaN"),
        "{e}"
    );

    let entries: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        !out.exists()
            && entries
                .iter()
                .all(|n| !n.to_string_lossy().contains(".q.tmp")),
        "{entries:?}"
    );

    // An existing output is never overwritten.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), b"x").unwrap();
    assert!(
        err_of(&llama, &out).contains("llama") || err_of(&nan, &out).contains("already exists")
    );
    let good = tmp.path().join("good");
    write_checkpoint(&good, &config, &tiny_tensors(&config), 1);
    assert!(
        err_of(&good, &out).contains("already exists; remove it or choose another output path")
    );
    assert!(out.join("keep").exists());
}

#[test]
fn the_binary_exits_2_with_the_error_on_stderr() {
    let tmp = tempfile::tempdir().unwrap();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(["quantize", "--model"])
        .arg(tmp.path().join("absent"))
        .arg("--out")
        .arg(tmp.path().join("q"))
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.starts_with("error: ") && stderr.contains("no such checkpoint directory"),
        "{stderr}"
    );
}

/// `--match-bnb` picks whose bytes the binary writes: `cpu` reproduces the checkpoint transformers
/// saved on the CPU byte for byte; the default (`cuda`) differs from it only in the 8-bit absmax
/// codes, never in the 4-bit codes of these non-zero weights; a bad value is refused by name.
#[test]
fn match_bnb_selects_the_backend_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let theirs_bytes =
        std::fs::read(fixtures().join("bnb/tiny-phi3-bnb/model.safetensors")).unwrap();
    let theirs = SafeTensors::deserialize(&theirs_bytes).unwrap();
    let run = |extra: &[&str], out: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_qlora"))
            .arg("quantize")
            .arg("--model")
            .arg(fixtures().join("bnb/tiny-phi3"))
            .arg("--out")
            .arg(out)
            .args(extra)
            .output()
            .unwrap()
    };
    for (extra, backend) in [(&["--match-bnb", "cpu"][..], "cpu"), (&[][..], "cuda")] {
        let out = tmp.path().join(backend);
        let r = run(extra, &out);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(String::from_utf8_lossy(&r.stdout).contains(&format!("bitsandbytes {backend}")));
        let ours_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let ours = SafeTensors::deserialize(&ours_bytes).unwrap();
        let mut absmax_diffs = 0;
        for name in theirs.names() {
            let (a, b) = (ours.tensor(name).unwrap(), theirs.tensor(name).unwrap());
            if backend == "cuda" && name.ends_with(".weight.absmax") {
                absmax_diffs += a
                    .data()
                    .iter()
                    .zip(b.data())
                    .filter(|(x, y)| x != y)
                    .count();
            } else {
                assert!(a.data() == b.data(), "{backend}: {name}: bytes differ");
            }
        }
        eprintln!("{backend}: {absmax_diffs} absmax codes differ from bitsandbytes' CPU save");
    }
    let r = run(&["--match-bnb", "gpu"], &tmp.path().join("bad"));
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("--match-bnb"));
    assert!(!tmp.path().join("bad").exists());
}
