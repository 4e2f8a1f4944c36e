//! `qlora quantize`.

use crate::quantize::{QuantizeOptions, quantize_checkpoint};
use anyhow::{Result, bail};
use clap::{ArgAction, Args};
use indicatif::{ProgressBar, ProgressStyle};
use qlora_quant::{Blocksize, QuantType};
use std::path::PathBuf;
use std::process::ExitCode;

/// Quantize a Hugging Face Phi-3 checkpoint to a bitsandbytes-4bit checkpoint (what transformers
/// writes with load_in_4bit): block linears to NF4/FP4, embeddings, lm_head and norms kept.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Checkpoint directory (config.json + model.safetensors or sharded safetensors with index), or
    /// a Hub id (HF cache, else downloaded).
    #[arg(long)]
    model: String,
    /// The Hub revision of --model (a branch, tag or commit).
    #[arg(long)]
    revision: Option<String>,
    /// Output directory; must not exist (it appears only once complete).
    #[arg(long)]
    out: PathBuf,
    /// 4-bit data type.
    #[arg(long, default_value = "nf4", value_parser = ["nf4", "fp4"])]
    quant_type: String,
    /// Elements per absmax block: a power of two from 32 to 4096.
    #[arg(long, default_value_t = 64)]
    blocksize: usize,
    /// Double-quantize the absmax (bitsandbytes' bnb_4bit_use_double_quant).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    double_quant: bool,
    /// Reproduce the bytes of this bitsandbytes backend: `cuda` (its GPU kernels, what a GPU QLoRA
    /// user's checkpoint holds) or `cpu` (bitsandbytes 0.50's CPU backend, bit for bit). They differ
    /// only in rare rounding edges and all-zero blocks; both load and dequantize the same way.
    #[arg(long, default_value = "cuda", value_parser = ["cuda", "cpu"])]
    match_bnb: String,
}

pub fn run(args: QuantizeArgs) -> Result<ExitCode> {
    let quant_type: QuantType = args.quant_type.parse()?;
    let blocksize = match Blocksize::new(args.blocksize) {
        Ok(b) => b,
        Err(e) => bail!("--blocksize: {e}"),
    };
    let opts = QuantizeOptions {
        model: crate::hub::resolve(&crate::hub::with_revision(
            &args.model,
            args.revision.as_deref(),
        ))?,
        out: args.out,
        quant_type,
        blocksize,
        double_quant: args.double_quant,
        backend: args.match_bnb.parse().map_err(anyhow::Error::msg)?,
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{spinner} quantizing [{bar:30}] {pos}/{len} {wide_msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let report = quantize_checkpoint(&opts, &bar)?;
    bar.finish_and_clear();
    println!(
        "quantized {} linears to {} (blocksize {}, double quant {}, bitsandbytes {} bytes): {:.1} MB -> {:.1} MB; copied {} tensors; wrote {}",
        report.n_quantized,
        quant_type,
        blocksize.elems(),
        opts.double_quant,
        opts.backend,
        report.linear_bytes_in as f64 / 1e6,
        report.linear_bytes_out as f64 / 1e6,
        report.n_copied,
        opts.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
