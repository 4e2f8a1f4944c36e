//! `qlora download`.

use anyhow::Result;
use clap::Args;
use std::process::ExitCode;

/// Download a model from the Hugging Face Hub into the local cache (the files a Phi-3 checkpoint
/// needs: config, tokenizer, safetensors weights), resuming an interrupted download, and print the
/// snapshot directory. HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE / HF_HOME apply as for huggingface-cli.
#[derive(Debug, Args)]
pub struct DownloadArgs {
    /// The Hub id: owner/name.
    model: String,
    /// A branch, tag or commit [default: main, or the `@revision` of MODEL].
    #[arg(long)]
    revision: Option<String>,
}

pub fn run(args: DownloadArgs) -> Result<ExitCode> {
    let env = crate::hub::HubEnv::from_env();
    let model = crate::hub::with_revision(&args.model, args.revision.as_deref());
    let dir = if env.offline {
        // Offline: only a complete cached snapshot answers.
        crate::hub::resolve_with(&model, &env)?
    } else {
        crate::hub::download(&model, &env)?
    };
    println!("{}", dir.display());
    Ok(ExitCode::SUCCESS)
}
