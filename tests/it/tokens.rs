//! `lora.trainable_token_indices` against PEFT's TrainableTokensLayer (goldens:
//! tests/fixtures/gen_tokens_goldens.py): the forward, the trained rows' and the adapters'
//! gradients (the padding row's zero), the saved keys, the merge, and the refusals.

use crate::common::{fixtures, max_abs};
use crate::model::{load_f32, load_path_f32, max_abs_diff};
use crate::peft_goldens::batch;
use candle_core::{DType, Device, Tensor};
use indicatif::ProgressBar;
use qlora::export::{MergeBase, safetensors::export};
use qlora::lora::{ForwardCtx, LoraConfig, TokenIndices, attach, peft};
use qlora::model::Phi3;
use qlora::model::load::BaseFormat;
use qlora::model::phi3::OpPath;
use qlora::train::loss_and_grads;
use std::collections::HashMap;

const INDICES: [u32; 4] = [0, 5, 17, 100];

fn goldens() -> HashMap<String, Tensor> {
    crate::peft_goldens::goldens("tokens")
}

fn adapter_dir() -> std::path::PathBuf {
    fixtures().join("tokens/adapter")
}

fn with_rows(ops: OpPath) -> Phi3 {
    let mut m = load_f32("gqa", BaseFormat::Dense);
    m.ops = ops;
    let a = peft::load(&adapter_dir(), &Device::Cpu).unwrap();
    assert_eq!(
        a.config.trainable_token_indices,
        TokenIndices::List(INDICES.to_vec())
    );
    attach::load_adapters(&mut m, &a).unwrap();
    assert_eq!(m.saved.tokens.as_ref().unwrap().indices, INDICES);
    m
}

#[test]
fn trained_rows_replace_theirs_in_the_forward_and_train_as_in_peft() {
    let g = goldens();
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    for (ops, what) in [
        (OpPath::for_device(&Device::Cpu, DType::F32), "fused"),
        (OpPath::Composed, "composed"),
    ] {
        let m = with_rows(ops);
        let d = max_abs_diff(&m.forward(&ids).unwrap(), &g["logits"]);
        assert!(d <= 2e-5, "{what}: logits vs PEFT {d:e}");
        for checkpointing in [false, true] {
            let lg = loss_and_grads(&m, &batch(&g), &ForwardCtx::default(), checkpointing).unwrap();
            let mut keys = crate::peft_goldens::adapter_keys(&m, "grad");
            keys.push("grad.trainable_tokens_delta".into());
            let what = format!("{what}, checkpointing {checkpointing}");
            crate::peft_goldens::assert_matches(&lg, &g, "loss_sum", &keys, &what);
            // Token 0 is the padding row: it occurs, and gets no gradient.
            let delta = lg.grads.last().unwrap();
            assert_eq!(max_abs(&delta.get(0).unwrap()), 0.0);
            assert!(max_abs(&delta.get(1).unwrap()) > 0.0);
        }
    }
}

#[test]
fn saved_rows_have_peft_keys_and_the_merge_equals_peft() {
    let m = with_rows(OpPath::Composed);
    let a = peft::load(&adapter_dir(), &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let rows = attach::token_rows(&m).unwrap();
    peft::save_all(
        tmp.path(),
        &a.config,
        "x",
        &attach::adapter_weights(&m),
        &[],
        Some((&rows.0, &rows.1)),
    )
    .unwrap();
    crate::peft_goldens::assert_same_tensors(tmp.path(), &adapter_dir());
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join(peft::CONFIG_FILE)).unwrap())
            .unwrap();
    assert_eq!(cfg["trainable_token_indices"], serde_json::json!(INDICES));

    let out = tmp.path().join("merged");
    export(
        &fixtures().join("phi3/gqa"),
        Some(&a),
        &out,
        DType::F32,
        MergeBase::Original,
        false,
        false,
        &ProgressBar::hidden(),
    )
    .unwrap();
    let want =
        candle_core::safetensors::load(fixtures().join("tokens/merged.safetensors"), &Device::Cpu)
            .unwrap();
    let merged = load_path_f32(&out, BaseFormat::Dense);
    assert_eq!(
        max_abs_diff(&merged.embed_tokens, &want["model.embed_tokens.weight"]),
        0.0
    );
    let g = goldens();
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    assert!(max_abs_diff(&merged.forward(&ids).unwrap(), &g["logits"]) <= 2e-5);
    let e = qlora::export::gguf_lora::export(
        &fixtures().join("phi3/gqa"),
        &a,
        &tmp.path().join("a.gguf"),
        qlora::export::gguf::GgmlType::parse("f32").unwrap(),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("trainable_token_indices") && e.contains("--format gguf"),
        "{e}"
    );
}

#[test]
fn bad_token_settings_name_the_problem() {
    let cfg = |t: TokenIndices, modules: &[&str]| LoraConfig {
        trainable_token_indices: t,
        modules_to_save: modules.iter().map(|m| m.to_string()).collect(),
        ..LoraConfig::default()
    };
    let e = cfg(TokenIndices::List(vec![3]), &["embed_tokens"])
        .check_targets()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("trainable_token_indices") && e.contains("modules_to_save"),
        "{e}"
    );
    let e = cfg(TokenIndices::List(vec![3, 3]), &[])
        .check_targets()
        .unwrap_err()
        .to_string();
    assert!(e.contains("token 3 twice"), "{e}");
    let map = TokenIndices::PerModule([("lm_head".to_string(), vec![1])].into());
    let e = cfg(map, &[]).check_targets().unwrap_err().to_string();
    assert!(e.contains("`lm_head`"), "{e}");
    let mut m = load_f32("gqa", BaseFormat::Dense);
    let e = attach::init_tokens(&mut m, &cfg(TokenIndices::List(vec![128]), &[]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("token 128") && e.contains("128 rows"), "{e}");
    // The map form with embed_tokens is the list's meaning.
    let map = TokenIndices::PerModule([("embed_tokens".to_string(), vec![7, 9])].into());
    attach::init_tokens(&mut m, &cfg(map, &[])).unwrap();
    assert_eq!(m.saved.tokens.as_ref().unwrap().indices, [7, 9]);
    // From TOML, both forms.
    for (toml, want) in [
        ("[lora]\ntrainable_token_indices = [1, 2]\n", vec![1, 2]),
        (
            "[lora]\ntrainable_token_indices = { embed_tokens = [4] }\n",
            vec![4],
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("c.toml");
        std::fs::write(&p, format!("[training]\nmax_steps = 1\n{toml}")).unwrap();
        let c = qlora::config::TrainConfig::from_file(&p).unwrap();
        assert_eq!(
            c.lora.trainable_token_indices.embedding_rows().unwrap(),
            want
        );
    }
}

#[test]
fn added_tokens_take_unused_rows_train_and_travel_with_every_export() {
    use qlora::config::TrainConfig;
    use qlora::train::trainer::Trainer;
    let tmp = tempfile::tempdir().unwrap();
    // Conversations whose replies call a tool between the new tokens.
    let data = tmp.path().join("tools.jsonl");
    let mut lines = String::new();
    for i in 0..12 {
        let call = format!("<tool_call>{{\"name\": \"weather\", \"city\": \"c{i}\"}}</tool_call>");
        lines.push_str(
            &serde_json::json!({"messages": [
                {"role": "user", "content": format!("Weather in c{i}?")},
                {"role": "assistant", "content": call},
            ]})
            .to_string(),
        );
        lines.push('\n');
    }
    std::fs::write(&data, lines).unwrap();
    let out = tmp.path().join("run");
    let mut c: TrainConfig = crate::trainer::small(&out);
    c.data.train = data.display().to_string();
    c.data.add_tokens = vec!["<tool_call>".into(), "</tool_call>".into()];
    c.training.max_steps = 4;
    let mut t = Trainer::new(c, false).unwrap();
    // Phi-3's tokenizer has 32011 tokens for 32064 rows: the new ones take 32011 and 32012.
    assert_eq!(t.tok.encode("<tool_call>").unwrap().get_ids(), [32011]);
    assert_eq!(t.tok.encode("x</tool_call>y").unwrap().get_ids().len(), 3);
    // The space after the token is absorbed (rstrip, as Phi-3's own tokens): these are the ids
    // llama.cpp gives the same text on the exported GGUF (tests/interop/check_added_tokens.py).
    assert_eq!(
        t.tok.encode("call <tool_call> now").unwrap().get_ids(),
        [1246, 29871, 32011, 1286]
    );
    assert_eq!(
        t.cfg.lora.trainable_token_indices,
        TokenIndices::List(vec![32011, 32012])
    );
    t.run(None).unwrap();
    let adapter = out.join("adapter");
    assert!(adapter.join("tokenizer.json").is_file());
    let a = peft::load(&adapter, &Device::Cpu).unwrap();
    let (ids, rows) = a.tokens.as_ref().unwrap();
    assert_eq!(ids, &[32011, 32012]);
    let dir = qlora::hub::resolve(qlora::builtin::TINY_PHI3).unwrap();
    let base = load_path_f32(&dir, BaseFormat::Dense);
    assert!(
        max_abs_diff(
            &rows.get(0).unwrap(),
            &base.embed_tokens.get(32011).unwrap()
        ) > 1e-4
    );
    // The merged checkpoint carries the extended tokenizer.
    let merged = tmp.path().join("merged");
    export(
        &dir,
        Some(&a),
        &merged,
        DType::F32,
        MergeBase::Original,
        false,
        false,
        &ProgressBar::hidden(),
    )
    .unwrap();
    let tok = qlora::data::TokenizerBundle::from_dir(&merged).unwrap();
    assert_eq!(tok.encode("<tool_call>").unwrap().get_ids(), [32011]);
    // The GGUF's vocabulary has them as user-defined tokens (what llama.cpp matches as one id),
    // and qlora verify, which tokenizes with the adapter's tokenizer, finds the export faithful.
    let gguf = tmp.path().join("m.gguf");
    crate::verify::gguf(&dir, Some(&adapter), &gguf, "f32", MergeBase::Original);
    let mut f = std::fs::File::open(&gguf).unwrap();
    let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let tokens = c.metadata["tokenizer.ggml.tokens"].to_vec().unwrap();
    let types = c.metadata["tokenizer.ggml.token_type"].to_vec().unwrap();
    assert_eq!(tokens[32011].to_string().unwrap(), "<tool_call>");
    assert_eq!(tokens[32012].to_string().unwrap(), "</tool_call>");
    assert_eq!(
        types[32011].to_i32().unwrap(),
        qlora::export::vocab::USER_DEFINED
    );
    let r = crate::verify::run(&dir, Some(&adapter), MergeBase::Original, &gguf, None);
    crate::verify::assert_faithful(&r, "gguf with added tokens");
    // No row left: the 54th new token of a 32064-row model is refused.
    let mut tok = qlora::data::TokenizerBundle::from_dir(&dir).unwrap();
    let many: Vec<String> = (0..54).map(|i| format!("<new{i}>")).collect();
    let e = tok.add_tokens(&many, 32064).unwrap_err().to_string();
    assert!(
        e.contains("no unused embedding row") && e.contains("<new53>"),
        "{e}"
    );
}
