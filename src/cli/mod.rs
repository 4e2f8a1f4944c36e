//! The command line: clap definitions (their doc comments are the `--help`) and dispatch.

mod data;
mod download;
mod eval;
mod export;
mod generate;
mod infer;
pub mod inspect;
mod plan;
mod prepare;
mod quantize;
mod train;
mod verify;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;

/// Fine-tune Phi-3 with QLoRA: NF4 base byte-identical to bitsandbytes, LoRA adapters in PEFT format.
#[derive(Debug, Parser)]
#[command(name = "qlora", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Train(Box<train::TrainArgs>),
    Plan(Box<plan::PlanArgs>),
    Eval(eval::EvalArgs),
    Generate(generate::GenerateArgs),
    Data(data::DataArgs),
    Export(export::ExportArgs),
    Inspect(inspect::InspectArgs),
    Quantize(quantize::QuantizeArgs),
    Verify(verify::VerifyArgs),
    Download(download::DownloadArgs),
}

/// The clap command, with negative numbers taken as values in every subcommand (`--lr -1` gets
/// the range check's error, not clap's "unexpected argument").
pub fn command() -> clap::Command {
    fn negatives(c: clap::Command) -> clap::Command {
        c.mut_args(|a| {
            if a.get_action().takes_values() {
                a.allow_negative_numbers(true)
            } else {
                a
            }
        })
        .mut_subcommands(negatives)
    }
    negatives(Cli::command())
}

/// Parses the process arguments and runs the chosen command.
pub fn run() -> Result<ExitCode> {
    let cli = Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Train(args) => train::run(*args),
        Command::Plan(args) => plan::run(*args),
        Command::Eval(args) => eval::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Data(args) => data::run(args),
        Command::Export(args) => export::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Download(args) => download::run(args),
    }
}
