//! `qlora inspect`: a GGUF's or a safetensors file's metadata and tensor table.

use anyhow::{Context, Result, bail};
use clap::Args;
use std::path::PathBuf;
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
    let path = &args.file;
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(
        &mut std::fs::File::open(path)
            .with_context(|| format!("{}: cannot open", path.display()))?,
        &mut magic,
    )
    .with_context(|| format!("{}: too short", path.display()))?;
    if &magic == b"GGUF" {
        let file = gguf_rs::mmap::MmapGGUF::open(path)
            .with_context(|| format!("{}: not a readable GGUF", path.display()))?;
        let m = file.model();
        println!(
            "{}: GGUF {}, {} metadata keys, {} tensors, alignment {}",
            path.display(),
            m.get_version(),
            m.num_kv(),
            m.num_tensor(),
            m.alignment()
        );
        for (k, v) in m.metadata() {
            println!("  {k} = {}", short(v, args.full));
        }
        println!(
            "  {:<40} {:>8} {:>24} {:>12}",
            "tensor", "type", "ggml shape", "bytes"
        );
        for t in m.tensors() {
            let ty = gguf_rs::GGMLType::try_from(t.kind)
                .map(|g| g.to_string())
                .unwrap_or_else(|_| format!("#{}", t.kind));
            println!(
                "  {:<40} {:>8} {:>24} {:>12}",
                t.name,
                ty,
                format!("{:?}", t.shape),
                t.size
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("{}: neither GGUF nor safetensors", path.display()))?;
    let st = match safetensors::SafeTensors::deserialize(&bytes) {
        Ok(st) => st,
        Err(e) => bail!("{}: invalid safetensors: {e}", path.display()),
    };
    println!("{}: safetensors, {} tensors", path.display(), st.len());
    for (k, v) in meta.metadata().iter().flatten() {
        println!("  {k} = {v}");
    }
    let mut names: Vec<_> = st.names();
    names.sort();
    println!("  {:<60} {:>6} {:>20}", "tensor", "dtype", "shape");
    for n in names {
        let t = st.tensor(n)?;
        println!(
            "  {:<60} {:>6} {:>20}",
            n,
            format!("{:?}", t.dtype()),
            format!("{:?}", t.shape())
        );
    }
    Ok(ExitCode::SUCCESS)
}
