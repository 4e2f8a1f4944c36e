//! `qlora verify`.

use crate::data::Role;
use crate::export::MergeBase;
use crate::lora::peft;
use crate::verify::{Export, PROMPTS, Reference, Report, classify, export_type, verify};
use anyhow::{Result, bail};
use candle_core::Device;
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Check that an export is the model it came from: base + adapter as qlora computes it, against the
/// export read by its own loader (a GGUF: our model built from the file's metadata and tensors
/// alone; candle-transformers' quantized Phi-3 too where it applies). Exit 0 faithful, 1 not
/// faithful (the failing measure is printed), 2 bad input.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The export: a merged checkpoint dir, a PEFT adapter dir, a GGUF, or a LoRA GGUF (with
    /// --base-gguf).
    export: PathBuf,
    /// The base checkpoint (dir, Hub id, builtin:tiny-phi3); defaults to the adapter's
    /// base_model_name_or_path.
    #[arg(long)]
    model: Option<String>,
    /// The adapter the export was made from (none: the export must be the base).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// For a LoRA GGUF: the base GGUF it applies to.
    #[arg(long)]
    base_gguf: Option<PathBuf>,
    /// The base the adapter was merged into (as `qlora export --merge-base`).
    #[arg(long, default_value = "original", value_parser = ["original", "nf4"])]
    merge_base: String,
    /// Prompts: a chat JSONL whose user turns are used (default: built-in prompts).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Continuation tokens per prompt.
    #[arg(long, default_value_t = 16)]
    tokens: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The user turns of a chat JSONL.
fn prompts_of(path: &Path) -> Result<Vec<String>> {
    let report = crate::data::jsonl::read_jsonl(path, false)?;
    let prompts: Vec<String> = report
        .conversations
        .iter()
        .filter_map(|c| {
            c.messages
                .iter()
                .find(|m| m.role == Role::User)
                .map(|m| m.content.clone())
        })
        .collect();
    if prompts.is_empty() {
        bail!("{}: no user turns to use as prompts", path.display());
    }
    Ok(prompts)
}

/// Prints a report in words.
pub fn print(report: &Report) {
    let m = &report.measures;
    println!(
        "{} export, {} positions: max |Δlogit| {:.3e}, mean KL {:.3e}, top-1 {:.1}%, greedy {:.1}%{}",
        report.export_type,
        m.positions,
        m.max_abs_logit_diff,
        m.mean_kl,
        100.0 * m.top1_agreement,
        100.0 * m.greedy_agreement,
        m.mean_kl_to_base
            .map(|k| format!(", KL to the base alone {k:.3e}"))
            .unwrap_or_default()
    );
    for n in &report.notes {
        println!("  note: {n}");
    }
    for f in &report.failures {
        println!("  FAIL {f}");
    }
    println!(
        "{}",
        if report.faithful() {
            "faithful"
        } else {
            "NOT FAITHFUL"
        }
    );
}

pub fn run(args: VerifyArgs) -> Result<ExitCode> {
    let adapter = args
        .adapter
        .as_ref()
        .map(|a| peft::load(a, &Device::Cpu))
        .transpose()?;
    let dir = super::infer::resolve_model(args.model.as_deref(), adapter.as_ref())?;
    let merge_base = match args.merge_base.as_str() {
        "nf4" => MergeBase::Nf4 {
            quant_type: qlora_quant::QuantType::Nf4,
            blocksize: qlora_quant::Blocksize::DEFAULT,
            double_quant: true,
        },
        _ => MergeBase::Original,
    };
    let export = classify(&args.export, args.base_gguf.as_deref())?;
    // An adapter export is compared with the adapter it was converted from.
    let (reference_adapter, export_adapter) = match &export {
        Export::Adapter(p) => (adapter.clone(), Some(peft::load(p, &Device::Cpu)?)),
        _ => (adapter.clone(), None),
    };
    let reference = Reference::new(&dir, reference_adapter.as_ref(), merge_base)?;
    let prompts = match &args.data {
        Some(p) => prompts_of(p)?,
        None => PROMPTS.iter().map(|p| p.to_string()).collect(),
    };
    let ty = export_type(&export)?;
    let report = verify(
        &reference,
        &export,
        &ty,
        &prompts,
        args.tokens,
        export_adapter.as_ref(),
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print(&report);
    }
    Ok(ExitCode::from(report.exit_code()))
}
