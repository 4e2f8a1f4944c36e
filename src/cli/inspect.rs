//! `qlora inspect`: a GGUF's or a safetensors file's metadata and tensor table.

use crate::checkpoint::Shard;
use crate::export::gguf_read;
use anyhow::{Context, Result};
use clap::Args;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Print a GGUF's or safetensors file's metadata and tensor table.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A .gguf or .safetensors file.
    file: PathBuf,
    /// Show array metadata in full instead of its length and first items.
    #[arg(long)]
    full: bool,
}

fn short(v: &serde_json::Value, full: bool) -> String {
    match v {
        serde_json::Value::Array(a) if !full && a.len() > 6 => {
            let head: Vec<String> = a.iter().take(4).map(|x| x.to_string()).collect();
            format!("[{}, … {} items]", head.join(", "), a.len())
        }
        serde_json::Value::String(s) if !full && s.len() > 80 => {
            format!(
                "{:?}… ({} chars)",
                s.chars().take(77).collect::<String>(),
                s.len()
            )
        }
        other => other.to_string(),
    }
}

pub fn run(args: InspectArgs) -> Result<ExitCode> {
    print!("{}", describe(&args.file, args.full)?);
    Ok(ExitCode::SUCCESS)
}

/// What `qlora inspect` prints for `path`: its metadata and tensor table. Both readers check the
/// whole header first, so a damaged file is one error naming it.
pub fn describe(path: &Path, full: bool) -> Result<String> {
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(
        &mut std::fs::File::open(path)
            .with_context(|| format!("{}: cannot open", path.display()))?,
        &mut magic,
    )
    .with_context(|| format!("{}: too short for GGUF or safetensors", path.display()))?;
    let mut out = String::new();
    if &magic == b"GGUF" {
        let h = gguf_read::read_header(path)?;
        writeln!(
            out,
            "{}: GGUF v{}, {} metadata keys, {} tensors, alignment {}",
            path.display(),
            h.version,
            h.metadata.len(),
            h.tensors.len(),
            h.alignment
        )?;
        for (k, v) in &h.metadata {
            writeln!(out, "  {k} = {}", short(&v.to_json(), full))?;
        }
        writeln!(
            out,
            "  {:<40} {:>8} {:>24} {:>12}",
            "tensor", "type", "ggml shape", "bytes"
        )?;
        for t in &h.tensors {
            writeln!(
                out,
                "  {:<40} {:>8} {:>24} {:>12}",
                t.name,
                t.ty.name(),
                format!("{:?}", t.ne),
                t.n_bytes
            )?;
        }
        return Ok(out);
    }
    let shard = Shard::open(path, &path.display().to_string())
        .with_context(|| format!("{}: neither GGUF nor safetensors", path.display()))?;
    let st = shard.tensors()?;
    writeln!(out, "{}: safetensors, {} tensors", path.display(), st.len())?;
    for (k, v) in shard.metadata()?.iter().flatten() {
        writeln!(out, "  {k} = {v}")?;
    }
    let mut names: Vec<_> = st.names();
    names.sort();
    writeln!(out, "  {:<60} {:>6} {:>20}", "tensor", "dtype", "shape")?;
    for n in names {
        let t = st
            .tensor(n)
            .with_context(|| format!("{}: tensor `{n}`", path.display()))?;
        writeln!(
            out,
            "  {:<60} {:>6} {:>20}",
            n,
            format!("{:?}", t.dtype()),
            format!("{:?}", t.shape())
        )?;
    }
    Ok(out)
}
