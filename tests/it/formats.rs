//! Data formats and sources: ShareGPT, Alpaca and text samples (data/formats/) read the same from
//! JSONL or a JSON array as from the Parquet files pyarrow wrote of the same rows
//! (tests/fixtures/gen_format_samples.py); gzip; conversions; a bad Parquet row named by row group
//! and row; a text run trains every token.

use crate::common::{fixtures, qlora, repo_dir};
use qlora::data::formats::{Columns, Format};
use qlora::data::jsonl::TextDoc;
use qlora::data::source::Spec;
use qlora::data::{Role, TokenizerBundle, read_data};

fn sample(name: &str) -> String {
    repo_dir()
        .join("data/formats")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn parquet_written_by_pyarrow_reads_as_its_jsonl() {
    let cols = Columns::new();
    for (json, parquet, n) in [
        ("sharegpt.jsonl", "sharegpt.parquet", 12),
        ("alpaca.json", "alpaca.parquet", 18),
    ] {
        let a = read_data(&Spec::local(&sample(json)), Format::Auto, &cols, false).unwrap();
        let b = read_data(&Spec::local(&sample(parquet)), Format::Auto, &cols, false).unwrap();
        assert_eq!(a.conversations.len(), n, "{json}");
        let msgs = |r: &qlora::data::jsonl::ReadReport| {
            r.conversations
                .iter()
                .map(|c| c.messages.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(msgs(&a), msgs(&b), "{parquet}");
    }
    // ShareGPT roles (Axolotl's mapping) and a second turn kept.
    let s = read_data(
        &Spec::local(&sample("sharegpt.jsonl")),
        Format::Auto,
        &cols,
        false,
    )
    .unwrap();
    let roles: Vec<Role> = s.conversations[1].messages.iter().map(|m| m.role).collect();
    assert_eq!(
        roles,
        [Role::User, Role::Assistant, Role::User, Role::Assistant]
    );
    assert_eq!(s.conversations[0].messages[0].role, Role::System);
    // Alpaca: the input on its own line after the instruction (LLaMA-Factory's converter).
    let a = read_data(
        &Spec::local(&sample("alpaca.json")),
        Format::Auto,
        &cols,
        false,
    )
    .unwrap();
    assert_eq!(
        a.conversations[1].messages[0].content,
        "Add the two numbers.\n2 + 4"
    );
    assert_eq!(a.conversations[0].messages[0].content, "What is 2 plus 3?");
}

#[test]
fn a_bad_parquet_row_is_named_by_row_group_and_row_or_skipped() {
    let bad = fixtures().join("formats/bad_alpaca.parquet");
    let spec = bad.display().to_string();
    let e = format!(
        "{:#}",
        read_data(&Spec::local(&spec), Format::Auto, &Columns::new(), false).unwrap_err()
    );
    assert!(
        e.contains("bad_alpaca.parquet: row group 1, row 4: `output` is missing"),
        "{e}"
    );
    let r = read_data(&Spec::local(&spec), Format::Auto, &Columns::new(), true).unwrap();
    assert_eq!((r.conversations.len(), r.skipped.len()), (17, 1));
}

#[test]
fn text_documents_end_with_eos_and_train_every_token() {
    let r = read_data(
        &Spec::local(&sample("text.jsonl.gz")),
        Format::Auto,
        &Columns::new(),
        false,
    )
    .unwrap();
    assert_eq!((r.texts.len(), r.conversations.len()), (12, 0));
    let tok = TokenizerBundle::from_dir(&repo_dir().join("assets/phi3-tokenizer")).unwrap();
    let e = tok.encode_text(&r.texts[0]).unwrap();
    assert_eq!(e.ids.last(), tok.eos_id.as_ref());
    assert!(e.trained.iter().all(|t| *t));
    // A document already ending with eos gets no second one.
    let doc = TextDoc {
        text: "Done.<|endoftext|>".into(),
        line: 1,
    };
    let e = tok.encode_text(&doc).unwrap();
    assert_eq!(e.ids.iter().filter(|&&i| Some(i) == tok.eos_id).count(), 1);
}

#[test]
fn every_format_trains_from_its_config() {
    for config in ["sharegpt", "alpaca", "text"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("run");
        let (code, stdout, err) = qlora(&[
            "train",
            "--4bit",
            "--config",
            &format!("configs/{config}.toml"),
            "--max-steps",
            "2",
            "--output",
            &out.display().to_string(),
        ]);
        assert_eq!(code, 0, "{config}: {err}");
        assert!(stdout.contains("done: 2 steps"), "{config}: {stdout}");
    }
}

#[test]
fn preference_pairs_read_from_parquet_as_from_jsonl() {
    // pyarrow's copy of the TRL goldens' conversational pairs (list<struct<role, content>>).
    let a = qlora::data::pairs::read_pairs(
        &Spec::local(&fixtures().join("pref/pairs_chat.jsonl").to_string_lossy()),
        false,
    )
    .unwrap()
    .0;
    let b = qlora::data::pairs::read_pairs(
        &Spec::local(
            &fixtures()
                .join("formats/pairs_chat.parquet")
                .to_string_lossy(),
        ),
        false,
    )
    .unwrap()
    .0;
    assert_eq!(a.len(), 4);
    assert_eq!(a, b);
}

#[test]
fn data_inspect_finds_pairs_in_parquet() {
    let (code, out, err) = qlora(&[
        "data",
        "inspect",
        "--model",
        "builtin:tiny-phi3",
        "--data",
        "tests/fixtures/formats/pairs_chat.parquet",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("4 pairs, 4 kept"), "{out}");
}

/// `qlora train` in `dir` with qlora's cache under `dir/cache`: (exit code, stdout + stderr).
/// The Phi-3 tokenizer with `template` as its chat template, in `dir`.
fn tokenizer_with_template(dir: &std::path::Path, template: &str) -> TokenizerBundle {
    let assets = repo_dir().join("assets/phi3-tokenizer");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(assets.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(assets.join("tokenizer_config.json")).unwrap())
            .unwrap();
    cfg["chat_template"] = template.into();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_vec(&cfg).unwrap(),
    )
    .unwrap();
    TokenizerBundle::from_dir(dir).unwrap()
}

/// Each run of trained tokens, as the text they cover.
fn trained_runs(e: &qlora::data::Encoded, tok: &TokenizerBundle) -> Vec<String> {
    let offsets = tok.encode(&e.text).unwrap().get_offsets().to_vec();
    let mut runs: Vec<String> = Vec::new();
    for (t, &(s, end)) in offsets.iter().enumerate() {
        if e.trained[t] {
            if t == 0 || !e.trained[t - 1] {
                runs.push(String::new());
            }
            runs.last_mut().unwrap().push_str(&e.text[s..end]);
        }
    }
    runs
}

/// Tool-calling records (tests/fixtures/gen_tool_goldens.py: a Qwen2.5/Hermes-like template with
/// Phi-3's role tokens) read as training reads them render as transformers'
/// `apply_chat_template(messages, tools=tools)` renders them, tokenize to its ids, and train
/// exactly the tokens of its assistant mask (`return_assistant_tokens_mask`, the template's
/// `{% generation %}` blocks marking the calls and replies): the calls' tokens and their closing
/// `<|end|>`, never the tool results, the schemas in the system part, or the final eos.
#[test]
fn tool_calls_render_as_transformers_and_train_the_calls_not_the_results() {
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("chat/tools.json")).unwrap())
            .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let tok = tokenizer_with_template(
        &tmp.path().join("tok"),
        golden["template"].as_str().unwrap(),
    );
    let cases = golden["cases"].as_array().unwrap();
    let data = tmp.path().join("tools.jsonl");
    let lines: Vec<String> = cases.iter().map(|c| c["record"].to_string()).collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let spec = Spec::local(&data.display().to_string());
    let report = read_data(&spec, Format::Auto, &Columns::new(), false).unwrap();
    assert_eq!(report.conversations.len(), cases.len());
    let mut encoded = Vec::new();
    for (i, (case, conv)) in cases.iter().zip(&report.conversations).enumerate() {
        let e = tok.encode_conversation(conv).unwrap();
        assert_eq!(
            e.text,
            case["text"].as_str().unwrap(),
            "case {i}: rendering"
        );
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(e.ids, ids, "case {i}: ids");
        let mask: Vec<bool> = serde_json::from_value(case["assistant_masks"].clone()).unwrap();
        let differ: Vec<usize> = (0..mask.len())
            .filter(|&t| e.trained.get(t) != Some(&mask[t]))
            .collect();
        assert!(
            differ.is_empty() && e.trained.len() == mask.len(),
            "case {i}: trained tokens differ from transformers' assistant mask at {differ:?}"
        );
        encoded.push(e);
    }

    // The same, spelled out on the first record.
    let e = &encoded[0];
    let system = &e.text[..e.text.find("<|user|>").unwrap()];
    assert!(
        system.contains(r#"{"function": {"description": "The current weather in a city & its country <metric>.", "name": "get_weather""#),
        "the tools in the system part, as transformers' tojson writes them: {system}"
    );
    let runs = trained_runs(e, &tok);
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(
        runs[0].starts_with("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|end|>"),
        "{runs:?}"
    );
    assert!(
        runs[1].starts_with("It is 22 °C and sunny in Paris.<|end|>"),
        "{runs:?}"
    );
    assert!(
        !runs.iter().any(|r| r.contains("22 °C, sunny")),
        "the tool result is not trained"
    );
    // A conversation ending with a call: its <|end|> trained, the eos after it not.
    let e = &encoded[2];
    let n = e.ids.len();
    assert_eq!((e.ids[n - 1], e.trained[n - 1]), (32000, false));
    assert_eq!((e.ids[n - 2], e.trained[n - 2]), (32007, true));

    // Phi-3's own template drops tool_calls: an error, not an empty turn trained.
    let phi3 = TokenizerBundle::from_dir(&repo_dir().join("assets/phi3-tokenizer")).unwrap();
    let err = format!(
        "{:#}",
        phi3.encode_conversation(&report.conversations[0])
            .unwrap_err()
    );
    assert!(
        err.contains("calls `get_weather`, which the chat template does not render"),
        "{err}"
    );
}

/// `qlora data inspect` reads what training reads: each sample (data/formats/) detected or forced
/// with `--format`, columns renamed with `--columns`, and a `text` document shown whole, every
/// token trained. The expected replies and documents are the samples' own fields.
#[test]
fn data_inspect_reads_every_format_with_format_and_columns() {
    let inspect = |extra: &[&str]| {
        let mut args = vec!["data", "inspect", "--model", "builtin:tiny-phi3"];
        args.extend_from_slice(extra);
        qlora(&args)
    };
    let first_line: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(sample("sharegpt.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let reply = first_line["conversations"][2]["value"].as_str().unwrap();
    for args in [
        &["--data", "data/formats/sharegpt.parquet"][..],
        &[
            "--data",
            "data/formats/sharegpt.jsonl",
            "--format",
            "sharegpt",
        ],
    ] {
        let (code, out, err) = inspect(args);
        assert_eq!(code, 0, "{args:?}: {err}");
        // <|end|> absorbs the newline after it (rstrip).
        assert!(out.contains(&format!("⟦{reply}<|end|>\n⟧")), "{out}");
        assert!(out.contains("12 conversations"), "{out}");
    }

    // Alpaca, forced, and with its columns renamed in a copy and mapped back.
    let alpaca: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(sample("alpaca.json")).unwrap()).unwrap();
    let output = alpaca[0]["output"].as_str().unwrap();
    let (code, out, err) = inspect(&[
        "--data",
        "data/formats/alpaca.parquet",
        "--format",
        "alpaca",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("⟦{output}<|end|>\n⟧")) && out.contains("18 conversations"),
        "{out}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let renamed = tmp.path().join("qa.jsonl");
    let lines: Vec<String> = alpaca
        .iter()
        .map(|r| {
            serde_json::json!({"question": r["instruction"], "context": r["input"],
                               "answer": r["output"]})
            .to_string()
        })
        .collect();
    std::fs::write(&renamed, lines.join("\n")).unwrap();
    let data = renamed.display().to_string();
    let (code, out, err) = inspect(&[
        "--data",
        &data,
        "--columns",
        "instruction=question",
        "--columns",
        "input=context",
        "--columns",
        "output=answer",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("⟦{output}<|end|>\n⟧")) && out.contains("18 conversations"),
        "{out}"
    );
    // Without the mapping nothing is recognised; a name the formats do not read is refused.
    let (code, _, err) = inspect(&["--data", &data]);
    assert!(code != 0 && err.contains("no known format"), "{err}");
    let (code, _, err) = inspect(&["--data", &data, "--columns", "reply=answer"]);
    assert!(
        code != 0 && err.contains("`reply` is not a name the formats read"),
        "{err}"
    );
    // A forced format is not guessed around.
    let (code, _, err) = inspect(&["--data", "data/formats/sharegpt.jsonl", "--format", "text"]);
    assert!(code != 0 && err.contains("`text` is missing"), "{err}");

    // A text document: shown whole with its eos, all of it trained.
    let mut jsonl = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(std::fs::File::open(sample("text.jsonl.gz")).unwrap()),
        &mut jsonl,
    )
    .unwrap();
    let doc: serde_json::Value = serde_json::from_str(jsonl.lines().next().unwrap()).unwrap();
    let doc = doc["text"].as_str().unwrap();
    for args in [
        &["--data", "data/formats/text.jsonl.gz"][..],
        &["--data", "data/formats/text.jsonl.gz", "--format", "text"],
    ] {
        let (code, out, err) = inspect(args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(
            out.starts_with(&format!("document 0 (line 1):\n⟦{doc}<|endoftext|>⟧\n")),
            "{out}"
        );
        assert!(out.contains("12 documents"), "{out}");
    }
}

fn train_in(dir: &std::path::Path, extra: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qlora"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["train", "--max-steps", "2", "--max-seq-len", "256"])
        .args(extra)
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The final train loss a run printed.
fn final_loss(log: &str) -> String {
    let at = log.find("final train loss ").expect(log) + "final train loss ".len();
    log[at..].split([',', ' ']).next().unwrap().to_string()
}

#[test]
fn tokenized_examples_are_cached_by_content_and_eval_fraction_holds_out() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("chat.jsonl");
    std::fs::copy(sample("sharegpt.jsonl"), &data).unwrap();
    let data = data.display().to_string();
    let out = |n: &str| tmp.path().join(n).display().to_string();
    let run = |o: &str, more: &[&str]| {
        let o = out(o);
        let mut args = vec![
            "--data",
            data.as_str(),
            "--eval-fraction",
            "0.25",
            "--output",
        ];
        args.push(&o);
        args.extend_from_slice(more);
        let (code, log) = train_in(tmp.path(), &args);
        assert_eq!(code, 0, "{log}");
        log
    };
    let first = run("a", &[]);
    // 12 conversations, a quarter held out; the evaluation runs on them.
    assert!(first.contains("from 9 examples"), "{first}");
    assert!(first.contains("3 held out for evaluation"), "{first}");
    assert!(first.contains("eval loss"), "{first}");
    assert!(!first.contains("data cache"), "{first}");
    let cached = run("b", &[]);
    assert!(cached.contains("read from the data cache"), "{cached}");
    let fresh = run("c", &["--no-data-cache"]);
    assert!(!fresh.contains("data cache"), "{fresh}");
    // Cached or not, the same examples: the same losses.
    assert_eq!(final_loss(&first), final_loss(&cached));
    assert_eq!(final_loss(&first), final_loss(&fresh));
    let entries = || {
        std::fs::read_dir(tmp.path().join("cache/qlora/data"))
            .unwrap()
            .count()
    };
    assert_eq!(entries(), 1);
    // Another seed holds out other examples; changed data is tokenized again.
    let other = run("d", &["--seed", "7"]);
    assert_ne!(final_loss(&other), final_loss(&first));
    let mut text = std::fs::read_to_string(&data).unwrap();
    text.push_str("{\"prompt\": \"One more?\", \"completion\": \"Yes.\"}\n");
    std::fs::write(&data, text).unwrap();
    let changed = run("e", &[]);
    assert!(!changed.contains("data cache"), "{changed}");
    assert!(changed.contains("from 10 examples"), "{changed}");
    assert_eq!(entries(), 2);
}

#[test]
fn a_parquet_column_of_the_wrong_type_is_named_with_its_row() {
    let spec = fixtures().join("formats/int_output.parquet");
    let e = format!(
        "{:#}",
        read_data(
            &Spec::local(&spec.display().to_string()),
            Format::Auto,
            &Columns::new(),
            false
        )
        .unwrap_err()
    );
    assert!(
        e.contains(
            "int_output.parquet: row group 0, row 1: `output` must be a string, not a number"
        ),
        "{e}"
    );
}
