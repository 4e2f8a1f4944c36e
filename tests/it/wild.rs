//! The Phi checkpoints users download, beyond Microsoft's Phi-3-mini: Phi-3-medium's 40/10 heads,
//! Unsloth's "llamafied" re-uploads (LlamaForCausalLM, split q/k/v and gate/up, bitsandbytes 4-bit)
//! against transformers / PEFT goldens (tests/fixtures/gen_phi_wild_goldens.py), and Phi-4 (the
//! cl100k vocabulary, its ChatML-like template). End to end: load, train, convert the adapter
//! between layouts, export.

use crate::common::{Raw, fixtures, tiny_tensors, write_checkpoint};
use crate::model::{check, load_path_f32, max_abs_diff};
use candle_core::{DType, Device, Tensor};
use qlora::export::MergeBase;
use qlora::export::gguf::GgmlType;
use qlora::lora::{attach, convert, peft};
use qlora::model::load::BaseFormat;
use qlora::model::names::Layout;
use std::path::{Path, PathBuf};

fn wild(dir: &str) -> PathBuf {
    fixtures().join("wild").join(dir)
}

fn golden(file: &Path, ids_key: &str, key: &str) -> (Tensor, Tensor) {
    let t = candle_core::safetensors::load(file, &Device::Cpu).unwrap();
    (t[ids_key].to_dtype(DType::U32).unwrap(), t[key].clone())
}

#[test]
fn medium_and_llamafied_checkpoints_match_transformers() {
    for (dir, base) in [
        ("medium", BaseFormat::Dense),
        ("llama", BaseFormat::Dense),
        // bitsandbytes' own 4-bit tensors, read as they are (no re-quantization).
        ("llama-bnb", BaseFormat::NF4),
        ("llama-bnb", BaseFormat::Dense),
    ] {
        let (ids, want) = golden(&wild(dir).join("logits.safetensors"), "input_ids", "logits");
        let m = load_path_f32(&wild(dir), base);
        let expect = if dir == "medium" {
            Layout::Fused
        } else {
            Layout::Split
        };
        assert_eq!(m.cfg.layout(), expect, "{dir}");
        check(&m, &ids, &want, &format!("{dir} {base:?}"));
    }
}

#[test]
fn llamafied_adapters_reproduce_peft_on_both_layouts() {
    let logits = wild("peft-llama/logits.safetensors");
    for name in ["adapter", "adapter-qv"] {
        let a = peft::load(&wild("peft-llama").join(name), &Device::Cpu).unwrap();
        assert!(
            a.weights.contains_key("model.layers.0.self_attn.q_proj"),
            "PEFT's own module names"
        );
        let key = name.replace('-', "_");
        // On the checkpoint it was made for (4-bit), and on its dense original.
        for (dir, base, suffix) in [
            ("llama-bnb", BaseFormat::NF4, "bnb"),
            ("llama", BaseFormat::Dense, "dense"),
        ] {
            let mut m = load_path_f32(&wild(dir), base);
            attach::load_adapters(&mut m, &a).unwrap();
            let (ids, want) = golden(&logits, "input_ids", &format!("{key}_{suffix}"));
            check(&m, &ids, &want, &format!("{name} on {dir}"));
        }
        // On Microsoft's fused layout of the same weights (tests/fixtures/phi3/gqa): converted on
        // load, and written as a fused PEFT adapter and read back.
        let (ids, want) = golden(&logits, "input_ids", &format!("{key}_dense"));
        let mut m = crate::model::load_f32("gqa", BaseFormat::Dense);
        attach::load_adapters(&mut m, &a).unwrap();
        check(&m, &ids, &want, &format!("{name} fused on load onto gqa"));
        let fused = convert::to_layout(&a, &m.cfg, Layout::Fused).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let weights: Vec<_> = fused
            .weights
            .iter()
            .map(|(k, w)| (k.clone(), w.clone()))
            .collect();
        peft::save(tmp.path(), &fused.config, "gqa", &weights).unwrap();
        let back = peft::load(tmp.path(), &Device::Cpu).unwrap();
        assert_eq!(convert::layout_of(&back).unwrap(), Some(Layout::Fused));
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(tmp.path().join("adapter_config.json")).unwrap())
                .unwrap();
        let targets = cfg["target_modules"].as_array().unwrap();
        assert!(
            targets.iter().all(|t| {
                let t = t.as_str().unwrap();
                qlora::lora::TARGETS.contains(&t)
            }),
            "{targets:?}"
        );
        let mut m = crate::model::load_f32("gqa", BaseFormat::Dense);
        attach::load_adapters(&mut m, &back).unwrap();
        check(&m, &ids, &want, &format!("{name} as a fused PEFT adapter"));
        // And back to the split names: the same update, row for row.
        let split = convert::to_layout(&back, &m.cfg, Layout::Split).unwrap();
        let mut m = load_path_f32(&wild("llama"), BaseFormat::Dense);
        attach::load_adapters(&mut m, &split).unwrap();
        check(&m, &ids, &want, &format!("{name} fused then split"));
    }
}

/// Microsoft's layout of a split checkpoint: `qkv_proj` = Q | K | V rows, `gate_up_proj` = gate |
/// up, the same bytes as gen_phi_wild_goldens.py's source, tests/fixtures/phi3/gqa.
#[test]
fn fused_export_of_a_llamafied_checkpoint_is_microsofts_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fused");
    qlora::export::safetensors::export(
        &wild("llama"),
        None,
        &out,
        DType::F32,
        MergeBase::Original,
        false,
        true,
        &indicatif::ProgressBar::hidden(),
    )
    .unwrap();
    let ours = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let theirs =
        candle_core::safetensors::load(fixtures().join("phi3/gqa/model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut a: Vec<_> = ours.keys().collect();
    let mut b: Vec<_> = theirs.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "Microsoft's tensor names");
    for (k, t) in &theirs {
        assert_eq!(max_abs_diff(&ours[k], t), 0.0, "{k}");
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "phi3");
    assert_eq!(cfg["architectures"][0], "Phi3ForCausalLM");
    assert!(cfg["sliding_window"].is_null(), "Llama had no window");

    // With the adapter merged: the fused checkpoint computes what PEFT computes on the split one.
    let a = peft::load(&wild("peft-llama/adapter"), &Device::Cpu).unwrap();
    let out = tmp.path().join("fused-merged");
    qlora::export::safetensors::export(
        &wild("llama"),
        Some(&a),
        &out,
        DType::F32,
        MergeBase::Original,
        false,
        true,
        &indicatif::ProgressBar::hidden(),
    )
    .unwrap();
    let m = load_path_f32(&out, BaseFormat::Dense);
    assert_eq!(m.cfg.layout(), Layout::Fused);
    let (ids, want) = golden(
        &wild("peft-llama/logits.safetensors"),
        "input_ids",
        "adapter_dense",
    );
    check(&m, &ids, &want, "merged, fused export");
}

/// The GGUF of a split checkpoint is llama.cpp's phi3 with fused tensors: the same file as the
/// fused checkpoint's, and a split adapter becomes a fused LoRA GGUF.
#[test]
fn llamafied_gguf_exports_are_the_fused_models() {
    let tmp = tempfile::tempdir().unwrap();
    let phi3 = qlora::hub::resolve(qlora::builtin::TINY_PHI3).unwrap();
    let llama = tmp.path().join("llama");
    llamafy(&phi3, &llama);
    let gguf = |dir: &Path, adapter: Option<&peft::PeftAdapter>, name: &str| {
        let out = tmp.path().join(name);
        qlora::export::gguf_model::export(
            dir,
            adapter,
            &out,
            GgmlType::parse("f32").unwrap(),
            MergeBase::Original,
            false,
            None,
        )
        .unwrap();
        let header = qlora::export::gguf_read::read_header(&out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        (header, bytes)
    };
    let (h1, b1) = gguf(&phi3, None, "phi3.gguf");
    let (h2, b2) = gguf(&llama, None, "llama.gguf");
    // The same keys and values but the name, and the window: transformers' Llama has none, so
    // the llamafied checkpoint's GGUF says 0 where Phi-3-mini's says 2047.
    let meta = |h: &qlora::export::gguf_read::GgufHeader| {
        h.metadata
            .iter()
            .filter(|(k, _)| k != "general.name" && k != "phi3.attention.sliding_window")
            .map(|(k, v)| format!("{k}={}", v.to_json()))
            .collect::<Vec<_>>()
    };
    let (m1, m2) = (meta(&h1), meta(&h2));
    assert_eq!(m1.len(), m2.len());
    for (a, b) in m1.iter().zip(&m2) {
        assert!(
            a == b,
            "{} != {}",
            &a[..a.len().min(200)],
            &b[..b.len().min(200)]
        );
    }
    let window = |h: &qlora::export::gguf_read::GgufHeader| {
        h.get("phi3.attention.sliding_window").unwrap().as_u64()
    };
    assert_eq!((window(&h1), window(&h2)), (Some(2047), Some(0)));
    assert_eq!(h1.tensors.len(), h2.tensors.len());
    for (t1, t2) in h1.tensors.iter().zip(&h2.tensors) {
        assert_eq!((&t1.name, &t1.ne, t1.ty), (&t2.name, &t2.ne, t2.ty));
        let s1 = (h1.data_offset + t1.offset) as usize;
        let s2 = (h2.data_offset + t2.offset) as usize;
        assert!(
            b1[s1..s1 + t1.n_bytes as usize] == b2[s2..s2 + t2.n_bytes as usize],
            "{}: bytes",
            t1.name
        );
    }

    // A split adapter on Q and V only: its LoRA GGUF has fused attn_qkv pairs of the padded
    // rank, alpha rescaled so llama.cpp's alpha / r is the adapter's scale.
    let cfg = qlora::model::Phi3Config::from_value(
        &serde_json::from_slice(&std::fs::read(llama.join("config.json")).unwrap()).unwrap(),
        "config.json",
    )
    .unwrap();
    let mut model = load_path_f32(&llama, BaseFormat::Dense);
    let lora = qlora::lora::LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        rslora: false,
        use_dora: false,
        modules_to_save: Vec::new(),
        trainable_token_indices: Default::default(),
    };
    attach::init_adapters(&mut model, &lora, 5).unwrap();
    crate::train::randomize_b(&model, 9);
    let weights = attach::adapter_weights(&model);
    assert!(weights.iter().any(|(m, _)| m.ends_with("v_proj")));
    let dir = tmp.path().join("adapter");
    peft::save(&dir, &lora, "llama", &weights).unwrap();
    let split = peft::load(&dir, &Device::Cpu).unwrap();
    let out = tmp.path().join("lora.gguf");
    qlora::export::gguf_lora::export(&llama, &split, &out, GgmlType::parse("f32").unwrap(), false)
        .unwrap();
    let h = qlora::export::gguf_read::read_header(&out).unwrap();
    let a = h
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.attn_qkv.weight.lora_a")
        .unwrap();
    assert_eq!(
        a.ne,
        vec![cfg.hidden_size as u64, 8],
        "Q and V stacked: rank 8"
    );
    let d = h
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.ffn_down.weight.lora_b")
        .unwrap();
    assert_eq!(d.ne[0], 8, "down_proj padded to rank 8");
    let alpha = h.get("adapter.lora.alpha").unwrap().to_json();
    assert_eq!(alpha.as_f64().unwrap() as f32 / 8.0, 2.0, "scale α/r = 8/4");

    // Merged GGUFs: split adapter on the split checkpoint vs the fused adapter on the fused one.
    let fused = convert::to_layout(&split, &cfg, Layout::Fused).unwrap();
    let (h3, b3) = gguf(&llama, Some(&split), "llama-merged.gguf");
    let (h4, b4) = gguf(&phi3, Some(&fused), "phi3-merged.gguf");
    for (t3, t4) in h3.tensors.iter().zip(&h4.tensors) {
        assert_eq!(t3.name, t4.name);
        let f = |b: &[u8],
                 h: &qlora::export::gguf_read::GgufHeader,
                 t: &qlora::export::gguf_read::TensorInfo| {
            let s = (h.data_offset + t.offset) as usize;
            b[s..s + t.n_bytes as usize]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<f32>>()
        };
        let (x, y) = (f(&b3, &h3, t3), f(&b4, &h4, t4));
        let worst = x
            .iter()
            .zip(&y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-6, "{}: {worst}", t3.name);
    }
}

/// Writes `src` (a fused Phi-3 checkpoint dir) as Unsloth's llamafied layout into `dst`: split
/// tensors, a LlamaForCausalLM config.json, the other files copied.
pub fn llamafy(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let n = e.file_name().to_string_lossy().into_owned();
        if !n.ends_with(".safetensors") && n != "config.json" && n != "model.safetensors.index.json"
        {
            std::fs::copy(e.path(), dst.join(&n)).unwrap();
        }
    }
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    let g = |k: &str| cfg[k].as_u64().unwrap() as usize;
    let (h, heads) = (g("hidden_size"), g("num_attention_heads"));
    let kv = cfg["num_key_value_heads"]
        .as_u64()
        .map(|v| v as usize)
        .unwrap_or(heads);
    let i = g("intermediate_size");
    let (q, kvd) = (h, kv * (h / heads));
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Raw)> = Vec::new();
    let raw = |v: &safetensors::tensor::TensorView<'_>, rows: std::ops::Range<usize>| {
        let cols = v.shape()[1];
        let w = v.dtype().bitsize() / 8;
        Raw {
            dtype: v.dtype(),
            shape: vec![rows.len(), cols],
            data: v.data()[rows.start * cols * w..rows.end * cols * w].to_vec(),
        }
    };
    for (name, v) in st.tensors() {
        if let Some(p) = name.strip_suffix("self_attn.qkv_proj.weight") {
            out.push((format!("{p}self_attn.q_proj.weight"), raw(&v, 0..q)));
            out.push((format!("{p}self_attn.k_proj.weight"), raw(&v, q..q + kvd)));
            out.push((
                format!("{p}self_attn.v_proj.weight"),
                raw(&v, q + kvd..q + 2 * kvd),
            ));
        } else if let Some(p) = name.strip_suffix("mlp.gate_up_proj.weight") {
            out.push((format!("{p}mlp.gate_proj.weight"), raw(&v, 0..i)));
            out.push((format!("{p}mlp.up_proj.weight"), raw(&v, i..2 * i)));
        } else {
            out.push((
                name.clone(),
                Raw {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    data: v.data().to_vec(),
                },
            ));
        }
    }
    // unsloth/Phi-3-mini-4k-instruct-bnb-4bit's keys.
    let obj = cfg.as_object_mut().unwrap();
    obj.insert("model_type".into(), "llama".into());
    obj.insert(
        "architectures".into(),
        serde_json::json!(["LlamaForCausalLM"]),
    );
    obj.insert("attention_bias".into(), false.into());
    obj.insert("mlp_bias".into(), false.into());
    obj.insert("pretraining_tp".into(), 1.into());
    write_checkpoint(dst, &cfg, &out, 1);
    // write_checkpoint puts a placeholder tokenizer.json; the real one goes back.
    if src.join("tokenizer.json").exists() {
        std::fs::copy(src.join("tokenizer.json"), dst.join("tokenizer.json")).unwrap();
    }
}

/// Unsloth's route end to end on the built-in model: llamafied, quantized to bitsandbytes 4-bit,
/// trained; the adapter keeps the split names, and fused it gives the same model on Microsoft's
/// layout.
#[test]
fn a_llamafied_4bit_checkpoint_trains_under_its_own_module_names() {
    let tmp = tempfile::tempdir().unwrap();
    let phi3 = qlora::hub::resolve(qlora::builtin::TINY_PHI3).unwrap();
    let llama = tmp.path().join("llama");
    llamafy(&phi3, &llama);
    let bnb = tmp.path().join("llama-bnb");
    let opts = crate::quantize::opts(&llama, &bnb);
    qlora::quantize::quantize_checkpoint(&opts, &indicatif::ProgressBar::hidden()).unwrap();

    let mut c = crate::trainer::small(&tmp.path().join("run"));
    c.training.model = bnb.display().to_string();
    c.training.max_steps = 2;
    c.training.save_every = 0;
    c.training.grad_accum = 1;
    qlora::train::trainer::Trainer::new(c, false)
        .unwrap()
        .run(None)
        .unwrap();
    let dir = tmp.path().join("run/adapter");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    let mut targets: Vec<&str> = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    targets.sort();
    assert_eq!(
        targets,
        [
            "down_proj",
            "gate_proj",
            "k_proj",
            "o_proj",
            "q_proj",
            "up_proj",
            "v_proj"
        ]
    );
    let a = peft::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(
        a.weights.len(),
        2 * 7,
        "7 adapted linears in each of 2 layers"
    );
    assert!(a.weights.values().any(|w| {
        w.b.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    }));

    // Fused for Microsoft's checkpoint: the same logits on the same (dense) weights.
    let ids = Tensor::new(&[[1u32, 450, 7483, 310, 3444, 338, 29871]], &Device::Cpu).unwrap();
    let mut split_model = load_path_f32(&llama, BaseFormat::Dense);
    attach::load_adapters(&mut split_model, &a).unwrap();
    let mut fused_model = load_path_f32(&phi3, BaseFormat::Dense);
    let fused = convert::to_layout(&a, &fused_model.cfg, Layout::Fused).unwrap();
    attach::load_adapters(&mut fused_model, &fused).unwrap();
    let d = max_abs_diff(
        &split_model.forward(&ids).unwrap(),
        &fused_model.forward(&ids).unwrap(),
    );
    assert!(d <= 1e-4, "split vs fused: {d:e}");
}

/// A tiny Phi-4 checkpoint in `dir`: microsoft/phi-4's config (cl100k vocabulary of 100,352 rows,
/// rope θ 250,000, 8 heads / 2 kv heads, no window), random bf16 weights, its tokenizer files.
pub fn phi4_checkpoint(dir: &Path) {
    let config = serde_json::json!({
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 100352,
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 250000.0, "rope_scaling": null, "max_position_embeddings": 16384,
        "original_max_position_embeddings": 16384, "sliding_window": null,
        "tie_word_embeddings": false, "bos_token_id": 100257, "eos_token_id": 100265,
        "pad_token_id": 100349, "torch_dtype": "bfloat16"
    });
    write_checkpoint(dir, &config, &tiny_tensors(&config), 2);
    // The cl100k vocabulary (tests/fixtures/bpe/cl100k, pruned from GPT-4's, ids unchanged) with
    // Phi-4's added <|im_sep|> and tokenizer_config.json.
    let mut tj: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("bpe/cl100k/tokenizer.json")).unwrap(),
    )
    .unwrap();
    tj["added_tokens"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "id": 100266, "content": "<|im_sep|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    // In the model's vocabulary too, as the fixture's other specials are: an added token that
    // is not gets the next free id from the tokenizers crate (503 here), not its declared one.
    tj["model"]["vocab"]["<|im_sep|>"] = 100266.into();
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_vec(&tj).unwrap()).unwrap();
    let template = "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}";
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_vec(&serde_json::json!({
            "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|dummy_85|>",
            "unk_token": "<|endoftext|>", "model_max_length": 16384,
            "tokenizer_class": "GPT2Tokenizer", "chat_template": template
        }))
        .unwrap(),
    )
    .unwrap();
}

/// Phi-4 (microsoft/phi-4: Phi3ForCausalLM with the cl100k vocabulary, 100,352 rows, rope θ
/// 250,000, 40 heads / 10 kv heads, its `<|im_start|>role<|im_sep|>…<|im_end|>` template), tiny:
/// the assistant turn and its `<|im_end|>` are trained, training runs, and the GGUF export names
/// llama.cpp's pre-tokenizer from the vocabulary's check hash, as the converter does (`dbrx`).
#[test]
fn a_phi4_like_checkpoint_trains_and_exports_with_its_cl100k_vocabulary() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("phi4");
    phi4_checkpoint(&dir);
    let bundle = qlora::data::tokenize::TokenizerBundle::from_dir(&dir).unwrap();
    let conv = qlora::data::jsonl::Conversation {
        messages: vec![
            qlora::data::jsonl::Message::new(qlora::data::jsonl::Role::User, "hello world"),
            qlora::data::jsonl::Message::new(qlora::data::jsonl::Role::Assistant, "the cat"),
        ],
        tools: Vec::new(),
        line: 1,
    };
    let enc = bundle.encode_conversation(&conv).unwrap();
    let trained: Vec<u32> = enc
        .ids
        .iter()
        .zip(&enc.trained)
        .filter(|(_, t)| **t)
        .map(|(i, _)| *i)
        .collect();
    let want: Vec<u32> = bundle
        .encode("the cat<|im_end|>")
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(trained, want, "the reply and its <|im_end|>, nothing else");
    assert_eq!(*trained.last().unwrap(), 100265);

    let mut c = crate::trainer::small(&tmp.path().join("run"));
    c.training.model = dir.display().to_string();
    c.training.max_steps = 2;
    c.training.save_every = 0;
    c.training.grad_accum = 1;
    qlora::train::trainer::Trainer::new(c, false)
        .unwrap()
        .run(None)
        .unwrap();
    let a = peft::load(&tmp.path().join("run/adapter"), &Device::Cpu).unwrap();
    let out = tmp.path().join("phi4.gguf");
    qlora::export::gguf_model::export(
        &dir,
        Some(&a),
        &out,
        GgmlType::parse("f16").unwrap(),
        MergeBase::Original,
        false,
        None,
    )
    .unwrap();
    let h = qlora::export::gguf_read::read_header(&out).unwrap();
    let s = |k: &str| h.get(k).unwrap().to_json();
    assert_eq!(s("tokenizer.ggml.pre"), "dbrx");
    assert_eq!(s("tokenizer.ggml.model"), "gpt2");
    assert_eq!(s("phi3.attention.head_count_kv").as_u64(), Some(2));
    assert_eq!(s("phi3.attention.sliding_window").as_u64(), Some(0));
    assert_eq!(s("phi3.rope.freq_base").as_f64(), Some(250000.0));
}
