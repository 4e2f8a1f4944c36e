//! `qlora export`.

use crate::export::{MergeBase, safetensors};
use crate::lora::peft;
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::process::ExitCode;

/// Merge a LoRA adapter into its base and write a Hugging Face checkpoint or a llama.cpp GGUF, or
/// write the adapter alone as a llama.cpp LoRA GGUF.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Base checkpoint (dir, Hub id, builtin:tiny-phi3); defaults to the adapter's
    /// base_model_name_or_path.
    #[arg(long)]
    model: Option<String>,
    /// The Hub revision of the base (a branch, tag or commit).
    #[arg(long)]
    revision: Option<String>,
    /// PEFT adapter directory; without it the base is converted alone.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Output directory (safetensors) or file (gguf).
    #[arg(long)]
    out: PathBuf,
    /// Output format: the merged model (safetensors, gguf), the adapter alone for llama.cpp
    /// (gguf-lora), or the adapter as PEFT for the base's layout (peft; see --fuse).
    #[arg(long, default_value = "safetensors", value_parser = ["safetensors", "gguf", "gguf-lora", "peft"])]
    format: String,
    /// Output dtype (safetensors).
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f16", "f32"])]
    dtype: String,
    /// GGUF type: gguf f32|f16|bf16|q8_0|q4_0 or a llama-quantize mix q4_k_m|q5_k_m|q6_k;
    /// gguf-lora f32|f16|bf16|q8_0. Norms stay f32.
    #[arg(long = "type", default_value = "f16")]
    ty: String,
    /// Merge into the original weights (default) or into dequant(NF4(W)), what a --4bit adapter saw.
    #[arg(long, default_value = "original", value_parser = ["original", "nf4"])]
    merge_base: String,
    /// Replace an existing --out.
    #[arg(long)]
    force: bool,
    /// Do not check what was written (by default a quick `qlora verify` runs on it: 2 prompts, 8
    /// tokens; a failure leaves the file in place and exits 1).
    #[arg(long)]
    no_verify: bool,
    /// From a split ("llamafied", q_proj/k_proj/v_proj, gate_proj/up_proj) checkpoint, write
    /// Microsoft's fused names (qkv_proj, gate_up_proj): safetensors as a Phi-3 checkpoint, peft
    /// as an adapter that loads onto Microsoft's. GGUF exports are always fused (llama.cpp's phi3).
    #[arg(long)]
    fuse: bool,
    /// GGUF of a BPE vocabulary: llama.cpp's pre-tokenizer name (tokenizer.ggml.pre) to write when
    /// llama.cpp's table does not know the vocabulary's check hash (by default it is looked up, as
    /// llama.cpp's converter does).
    #[arg(long)]
    gguf_pre: Option<String>,
}

pub fn run(args: ExportArgs) -> Result<ExitCode> {
    let adapter = args
        .adapter
        .as_ref()
        .map(|a| peft::load(a, &Device::Cpu))
        .transpose()?;
    let dir = super::infer::resolve_model_at(
        args.model.as_deref(),
        args.revision.as_deref(),
        adapter.as_ref(),
    )?;
    let dtype = match args.dtype.as_str() {
        "f16" => DType::F16,
        "f32" => DType::F32,
        _ => DType::BF16,
    };
    let base = match args.merge_base.as_str() {
        "nf4" => MergeBase::Nf4 {
            quant_type: qlora_quant::QuantType::Nf4,
            blocksize: qlora_quant::Blocksize::DEFAULT,
            double_quant: true,
        },
        _ => MergeBase::Original,
    };
    if args.format == "peft" {
        let a = adapter.as_ref().context("--format peft needs --adapter")?;
        crate::export::check_output(&args.out, args.force)?;
        let ck = crate::checkpoint::Checkpoint::open(&dir)?;
        let origin = dir
            .join(crate::checkpoint::CONFIG_FILE)
            .display()
            .to_string();
        let cfg = crate::model::Phi3Config::from_value(&ck.config, &origin)?;
        let layout = if args.fuse {
            crate::model::names::Layout::Fused
        } else {
            cfg.layout()
        };
        let converted = crate::lora::convert::to_layout(a, &cfg, layout)?;
        let weights: Vec<_> = converted
            .weights
            .iter()
            .map(|(m, w)| (m.clone(), w.clone()))
            .collect();
        let base_name = converted
            .base_model_name_or_path
            .clone()
            .unwrap_or_else(|| dir.display().to_string());
        let modules: Vec<_> = converted
            .modules
            .iter()
            .map(|(m, t)| (m.clone(), t.clone()))
            .collect();
        peft::save_every(
            &args.out,
            &converted.config,
            &base_name,
            &weights,
            &peft::Extras {
                modules: &modules,
                tokens: converted
                    .tokens
                    .as_ref()
                    .map(|(ids, rows)| (ids.as_slice(), rows)),
                embed_lora: converted.embed_lora.as_ref().map(|(a, b)| (a, b)),
                head_lora: converted.head_lora.as_ref().map(|(a, b)| (a, b)),
            },
        )?;
        println!(
            "wrote {} (PEFT adapter, {} modules, {} names, r = {}, alpha = {})",
            args.out.display(),
            weights.len(),
            match layout {
                crate::model::names::Layout::Fused => "fused (qkv_proj, gate_up_proj)",
                crate::model::names::Layout::Split => "split (q_proj … up_proj)",
            },
            converted.config.r,
            converted.config.alpha
        );
        return quick_verify(&args, &dir, adapter.as_ref(), MergeBase::Original, false);
    }
    if args.format == "gguf-lora" {
        let a = adapter
            .as_ref()
            .context("--format gguf-lora needs --adapter")?;
        let ty = crate::export::ftype::parse_lora_type(&args.ty)?;
        crate::export::gguf_lora::export(&dir, a, &args.out, ty, args.force)?;
        println!(
            "wrote {} (llama.cpp LoRA GGUF, {}, scale = {}: alpha written as scale · r)",
            args.out.display(),
            args.ty,
            a.config.scale()
        );
        // Checked on an f32 GGUF of the base, written for the check and removed after it.
        return quick_verify(&args, &dir, adapter.as_ref(), MergeBase::Original, true);
    }
    if args.format == "gguf" {
        let ty = crate::export::ftype::FileType::parse(&args.ty)?;
        crate::export::gguf_model::export(
            &dir,
            adapter.as_ref(),
            &args.out,
            ty,
            base,
            args.force,
            args.gguf_pre.as_deref(),
        )?;
        println!(
            "wrote {} (GGUF phi3, {}, {} merged into the {} base)",
            args.out.display(),
            args.ty,
            if adapter.is_some() {
                "adapter"
            } else {
                "no adapter"
            },
            args.merge_base
        );
        return quick_verify(&args, &dir, adapter.as_ref(), base, false);
    }
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{spinner} exporting [{bar:30}] {pos}/{len}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    safetensors::export(
        &dir,
        adapter.as_ref(),
        &args.out,
        dtype,
        base,
        args.force,
        args.fuse,
        &bar,
    )?;
    bar.finish_and_clear();
    println!(
        "wrote {} ({}, {} merged into the {} base)",
        args.out.display(),
        args.dtype,
        if adapter.is_some() {
            "adapter"
        } else {
            "no adapter"
        },
        args.merge_base
    );
    quick_verify(&args, &dir, adapter.as_ref(), base, false)
}

/// The quick check after an export: `qlora verify` on 2 prompts × 8 tokens (a LoRA GGUF, with
/// `lora_gguf`, on an f32 GGUF of the base written for the check). Models whose f32 reference and
/// export would not fit in half the available memory are left to an explicit `qlora verify` (said
/// so, not skipped silently).
fn quick_verify(
    args: &ExportArgs,
    dir: &std::path::Path,
    adapter: Option<&peft::PeftAdapter>,
    base: MergeBase,
    lora_gguf: bool,
) -> Result<ExitCode> {
    if args.no_verify {
        return Ok(ExitCode::SUCCESS);
    }
    let ck = crate::checkpoint::Checkpoint::open(dir)?;
    let origin = dir
        .join(crate::checkpoint::CONFIG_FILE)
        .display()
        .to_string();
    let cfg = crate::model::Phi3Config::from_value(&ck.config, &origin)?;
    let params = crate::verify::parameter_count(&cfg);
    // The f32 reference (base alone too with an adapter) and the export's engine in f32.
    let need = params * 4 * if adapter.is_some() { 3 } else { 2 };
    let avail = crate::verify::available_memory().unwrap_or(u64::MAX);
    if need as u64 > avail / 2 {
        println!(
            "verify: not run by default for a model of {:.1}B parameters (it needs ~{:.0} GiB); run `qlora verify {}` with the same --model/--adapter",
            params as f64 / 1e9,
            need as f64 / (1u64 << 30) as f64,
            args.out.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let run = || -> Result<crate::verify::Report> {
        let tmp = tempfile::tempdir()?;
        let base_gguf = tmp.path().join("base-f32.gguf");
        if lora_gguf {
            crate::export::gguf_model::export(
                dir,
                None,
                &base_gguf,
                crate::export::gguf::GgmlType::parse("f32")?,
                MergeBase::Original,
                false,
                args.gguf_pre.as_deref(),
            )?;
        }
        let export = crate::verify::classify(&args.out, lora_gguf.then_some(base_gguf.as_path()))?;
        let export_adapter = match &export {
            crate::verify::Export::Adapter(p) => Some(peft::load(p, &Device::Cpu)?),
            _ => None,
        };
        let reference = crate::verify::Reference::new(dir, adapter, base)?;
        let ty = crate::verify::export_type(&export)?;
        let prompts: Vec<String> = crate::verify::PROMPTS[..2]
            .iter()
            .map(|p| p.to_string())
            .collect();
        crate::verify::verify(
            &reference,
            &export,
            &ty,
            &prompts,
            8,
            export_adapter.as_ref(),
        )
    };
    // A model that cannot be run on prompts (no tokenizer, say) is reported, and the export stands.
    let report = match run() {
        Ok(r) => r,
        Err(e) => {
            println!("verify: could not run: {e:#}");
            return Ok(ExitCode::SUCCESS);
        }
    };
    print!("verify: ");
    super::verify::print(&report);
    Ok(match report.exit_code() {
        1 => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    })
}
