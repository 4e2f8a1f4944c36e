//! The Phi-3 model against transformers (and PEFT, and bitsandbytes' NF4) logits, from
//! tests/fixtures/gen_phi3_goldens.py; KV cache and packing against the plain forward.

use crate::common::{fixtures, host, max_abs};
use candle_core::{DType, Device, IndexOp, Tensor};
use qlora::lora::{attach, peft};
use qlora::model::Phi3;
use qlora::model::load::{BaseFormat, LoadOptions, load};

/// f32 logits of a 2-layer model computed by two implementations summing in different orders.
pub const F32_LOGITS_ABS_TOL: f32 = 1e-4;

pub fn load_f32(dir: &str, base: BaseFormat) -> Phi3 {
    load_path_f32(&fixtures().join("phi3").join(dir), base)
}

/// Any checkpoint directory, f32 on the CPU.
pub fn load_path_f32(path: &std::path::Path, base: BaseFormat) -> Phi3 {
    load(
        path,
        &LoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            base,
        },
    )
    .unwrap()
}

pub fn golden(dir: &str, file: &str, ids_key: &str, logits_key: &str) -> (Tensor, Tensor) {
    let t =
        candle_core::safetensors::load(fixtures().join("phi3").join(dir).join(file), &Device::Cpu)
            .unwrap();
    (
        t[ids_key].to_dtype(DType::U32).unwrap(),
        t[logits_key].clone(),
    )
}

/// max |a − b| of two tensors on any devices, in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(host(a) - host(b)).unwrap())
}

pub fn check(model: &Phi3, ids: &Tensor, want: &Tensor, what: &str) {
    let got = model.forward(ids).unwrap();
    let d = max_abs_diff(&got, want);
    assert!(
        d <= F32_LOGITS_ABS_TOL,
        "{what}: max |Δlogits| {d:e} > {F32_LOGITS_ABS_TOL:e}"
    );
}

#[test]
fn f32_logits_match_transformers_mha_gqa_longrope() {
    for dir in ["mha", "gqa"] {
        let (ids, want) = golden(dir, "logits.safetensors", "input_ids", "logits");
        check(&load_f32(dir, BaseFormat::Dense), &ids, &want, dir);
    }
    let m = load_f32("longrope", BaseFormat::Dense);
    let (ids, want) = golden("longrope", "logits.safetensors", "input_ids", "logits");
    check(&m, &ids, &want, "longrope, 48 tokens (long factors)");
    let (ids, want) = golden(
        "longrope",
        "logits.safetensors",
        "input_ids_short",
        "logits_short",
    );
    check(&m, &ids, &want, "longrope, 20 tokens (short factors)");
}

#[test]
fn partial_rotary_and_tied_head_match_transformers() {
    // Phi-4-mini's traits: RoPE (longrope) on the first 12 of each head's 16 dims, the lm_head tied
    // to the embeddings (the checkpoint has no lm_head.weight).
    let m = load_f32("partial", BaseFormat::Dense);
    assert_eq!((m.rope.head_dim, m.rope.rotary_dim), (16, 12));
    for (ids_key, logits_key, what) in [
        ("input_ids", "logits", "partial, 48 tokens (long factors)"),
        (
            "input_ids_short",
            "logits_short",
            "partial, 20 tokens (short factors)",
        ),
    ] {
        let (ids, want) = golden("partial", "logits.safetensors", ids_key, logits_key);
        check(&m, &ids, &want, what);
    }
    // The KV cache keeps the passed-through dims as they are.
    let (ids, _) = golden(
        "partial",
        "logits.safetensors",
        "input_ids_short",
        "logits_short",
    );
    let full = m.forward(&ids).unwrap();
    let mut cache = qlora::model::phi3::KvCache::default();
    let mut steps = vec![
        m.forward_cached(&ids.i((.., 0..13)).unwrap(), &mut cache)
            .unwrap(),
    ];
    for t in 13..20 {
        steps.push(
            m.forward_cached(&ids.i((.., t..t + 1)).unwrap(), &mut cache)
                .unwrap(),
        );
    }
    let d = max_abs_diff(&Tensor::cat(&steps, 1).unwrap(), &full);
    assert!(d <= F32_LOGITS_ABS_TOL, "partial, cached vs full: {d:e}");
}

#[test]
fn nf4_checkpoint_loads_straight_into_nf4_and_matches_the_dequantized_reference() {
    // gqa-bnb: saved by transformers + bitsandbytes; the reference logits come from the f32 model
    // whose linears are bitsandbytes' own dequantization of those codes.
    let m = load_f32("gqa-bnb", BaseFormat::NF4);
    assert!(m.layers.iter().all(|l| {
        l.linears()
            .iter()
            .all(|(_, lin)| matches!(lin.base, qlora::model::linear::BaseWeight::Nf4(_)))
    }));
    let (ids, want) = golden("gqa-bnb", "logits.safetensors", "input_ids", "logits");
    check(&m, &ids, &want, "gqa-bnb as NF4");
    // The same checkpoint dequantized on load gives the same model.
    check(
        &load_f32("gqa-bnb", BaseFormat::Dense),
        &ids,
        &want,
        "gqa-bnb dequantized",
    );
}

#[test]
fn peft_adapters_reproduce_peft_logits() {
    for (adapter, logits) in [
        ("adapter", "logits.safetensors"),
        ("adapter-rslora", "logits_rslora.safetensors"),
    ] {
        let mut m = load_f32("gqa", BaseFormat::Dense);
        let a = peft::load(&fixtures().join("phi3/peft").join(adapter), &Device::Cpu).unwrap();
        attach::load_adapters(&mut m, &a).unwrap();
        let (ids, want) = golden("peft", logits, "input_ids", "logits");
        check(&m, &ids, &want, adapter);
    }
}

#[test]
fn a_fresh_adapter_leaves_the_output_unchanged_and_merging_is_exact() {
    let base = load_f32("gqa", BaseFormat::NF4);
    let (ids, _) = golden("gqa", "logits.safetensors", "input_ids", "logits");
    let before = base.forward(&ids).unwrap();
    let mut m = base.clone();
    attach::init_adapters(&mut m, &qlora::lora::LoraConfig::default(), 1).unwrap();
    assert_eq!(m.adapters().len(), 8);
    assert_eq!(
        max_abs_diff(&m.forward(&ids).unwrap(), &before),
        0.0,
        "B = 0 at step 0"
    );

    // Merge: W' = dequant(W) + scale · B·A, checked entrywise and through the model.
    let mut m = load_f32("gqa", BaseFormat::NF4);
    let a = peft::load(&fixtures().join("phi3/peft/adapter"), &Device::Cpu).unwrap();
    attach::load_adapters(&mut m, &a).unwrap();
    let lin = m.layers[1].linear("gate_up_proj").unwrap();
    let ad = lin.adapter.as_ref().unwrap();
    let want = (lin.base.to_dense(DType::F32).unwrap()
        + (ad.b.as_tensor().matmul(ad.a.as_tensor()).unwrap() * 2.0).unwrap())
    .unwrap();
    assert_eq!(max_abs_diff(&lin.merged().unwrap(), &want), 0.0);
    let mut merged = m.clone();
    for blk in &mut merged.layers {
        for (_, lin) in blk.linears_mut() {
            lin.base = qlora::model::linear::BaseWeight::Dense(lin.merged().unwrap());
            lin.adapter = None;
        }
    }
    let d = max_abs_diff(&merged.forward(&ids).unwrap(), &m.forward(&ids).unwrap());
    assert!(d <= F32_LOGITS_ABS_TOL, "merged vs adapter: {d:e}");
}

#[test]
fn kv_cache_generation_equals_the_full_forward() {
    assert_cached_equals_full(&load_f32("gqa", BaseFormat::NF4));
}

/// The golden gqa ids fed 7 then 1 by 1 through the KV cache give the full forward's logits.
pub fn assert_cached_equals_full(m: &Phi3) {
    let (ids, _) = golden("gqa", "logits.safetensors", "input_ids", "logits");
    let ids = ids.to_device(&m.device).unwrap();
    let full = m.forward(&ids).unwrap();
    let mut cache = qlora::model::phi3::KvCache::default();
    let first = m
        .forward_cached(&ids.i((.., 0..7)).unwrap(), &mut cache)
        .unwrap();
    let mut steps = vec![first];
    for t in 7..12 {
        steps.push(
            m.forward_cached(&ids.i((.., t..t + 1)).unwrap(), &mut cache)
                .unwrap(),
        );
    }
    let d = max_abs_diff(&Tensor::cat(&steps, 1).unwrap(), &full);
    assert!(
        d <= F32_LOGITS_ABS_TOL,
        "{:?}: cached vs full: {d:e}",
        m.ops
    );
}

#[test]
fn packed_sequences_do_not_see_each_other() {
    assert_packed_equals_separate(&load_f32("gqa", BaseFormat::Dense));
}

/// Two sequences packed in one row (positions restarting, segment mask) give each one's logits.
pub fn assert_packed_equals_separate(m: &Phi3) {
    let (ids, _) = golden("gqa", "logits.safetensors", "input_ids", "logits");
    let dev = &m.device;
    let ids = ids.to_device(dev).unwrap();
    let (a, b) = (ids.i((.., 0..5)).unwrap(), ids.i((.., 5..12)).unwrap());
    let positions = Tensor::new(&[[0u32, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]], dev).unwrap();
    let segments = Tensor::new(&[[1u32, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]], dev).unwrap();
    let ctx = qlora::lora::ForwardCtx::default();
    let packed = m
        .lm_head(&m.hidden(&ids, &positions, Some(&segments), &ctx).unwrap())
        .unwrap();
    let separate = Tensor::cat(&[m.forward(&a).unwrap(), m.forward(&b).unwrap()], 1).unwrap();
    let d = max_abs_diff(&packed, &separate);
    assert!(
        d <= F32_LOGITS_ABS_TOL,
        "{:?}: packed vs separate: {d:e}",
        m.ops
    );
}

#[test]
fn saved_adapters_use_peft_names_and_reload_exactly() {
    let mut m = load_f32("gqa", BaseFormat::NF4);
    let a = peft::load(&fixtures().join("phi3/peft/adapter-rslora"), &Device::Cpu).unwrap();
    attach::load_adapters(&mut m, &a).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    peft::save(
        tmp.path(),
        &a.config,
        "tests/fixtures/phi3/gqa",
        &attach::adapter_weights(&m),
    )
    .unwrap();
    let st =
        candle_core::safetensors::load(tmp.path().join(peft::WEIGHTS_FILE), &Device::Cpu).unwrap();
    let mut keys: Vec<_> = st.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys.len(), 8);
    assert_eq!(
        keys[0],
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    );
    assert!(keys.iter().all(|k| !k.contains(".default.")));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join(peft::CONFIG_FILE)).unwrap())
            .unwrap();
    assert_eq!(
        (
            cfg["r"].as_u64(),
            cfg["use_rslora"].as_bool(),
            cfg["peft_type"].as_str()
        ),
        (Some(8), Some(true), Some("LORA"))
    );
    // Same tensors as PEFT wrote, bit for bit, and the same model when reloaded.
    let theirs = candle_core::safetensors::load(
        fixtures()
            .join("phi3/peft/adapter-rslora")
            .join(peft::WEIGHTS_FILE),
        &Device::Cpu,
    )
    .unwrap();
    for k in &keys {
        assert_eq!(max_abs_diff(&st[k], &theirs[k]), 0.0, "{k}");
    }
    let mut again = load_f32("gqa", BaseFormat::NF4);
    attach::load_adapters(&mut again, &peft::load(tmp.path(), &Device::Cpu).unwrap()).unwrap();
    let (ids, _) = golden("gqa", "logits.safetensors", "input_ids", "logits");
    assert_eq!(
        max_abs_diff(&again.forward(&ids).unwrap(), &m.forward(&ids).unwrap()),
        0.0
    );
}

#[test]
fn adapter_errors_name_the_file_and_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("phi3/peft/adapter");
    std::fs::copy(
        src.join(peft::WEIGHTS_FILE),
        tmp.path().join(peft::WEIGHTS_FILE),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join(peft::CONFIG_FILE)).unwrap()).unwrap();
    cfg["use_dora"] = true.into();
    std::fs::write(tmp.path().join(peft::CONFIG_FILE), cfg.to_string()).unwrap();
    // use_dora without magnitudes: a DoRA adapter missing its lora_magnitude_vector.
    let e = format!("{:#}", peft::load(tmp.path(), &Device::Cpu).unwrap_err());
    assert!(
        e.contains("adapter_model.safetensors")
            && e.contains("lora_magnitude_vector")
            && e.contains("use_dora"),
        "{e}"
    );
    // An adapter for a bigger model (layer 5 does not exist here) is refused, not half-applied.
    cfg["use_dora"] = false.into();
    std::fs::write(tmp.path().join(peft::CONFIG_FILE), cfg.to_string()).unwrap();
    let mut a = peft::load(tmp.path(), &Device::Cpu).unwrap();
    let extra = a.weights.values().next().unwrap().clone();
    a.weights
        .insert("model.layers.5.self_attn.qkv_proj".into(), extra);
    let mut m = load_f32("gqa", BaseFormat::Dense);
    let e = attach::load_adapters(&mut m, &a).unwrap_err().to_string();
    assert!(e.contains("model.layers.5.self_attn.qkv_proj"), "{e}");
}
