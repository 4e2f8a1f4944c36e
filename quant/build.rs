//! Compiles quant/kernels/*.cu to PTX in OUT_DIR, only when the `cuda` feature is on; the default
//! build never needs nvcc. Headers (*.cuh, e.g. common.cuh) are found through `-I kernels`, and a
//! change to any .cu or .cuh rebuilds every PTX file. The PTX targets `compute_80`, so the driver JIT-compiles it for any
//! Ampere-or-newer GPU (A100, consumer RTX 30xx+, H100/H200). Flags keep IEEE semantics (no
//! `--use_fast_math`: no flush-to-zero, no approximate division), which the bit-identity of the
//! dequantization kernels with the CPU reference relies on.

use std::path::{Path, PathBuf};
use std::process::Command;

const KERNEL_DIR: &str = "kernels";
const ARCH: &str = "compute_80";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed={KERNEL_DIR}");
    for var in ["NVCC", "CUDA_ROOT", "CUDA_HOME", "CUDA_PATH", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = find_nvcc().unwrap_or_else(|| {
        fail(
            "nvcc not found: the `cuda` feature compiles quant/kernels/*.cu with nvcc. Install a \
             CUDA toolkit, or the pinned PyPI toolchain with \
             `scripts/install-cuda-toolchain.sh ~/.cache/cuda13-pypi --minimal` and export what it \
             prints (CUDA_ROOT/CUDA_HOME/CUDA_PATH, PATH, CUDA_COMPUTE_CAP); or set NVCC to its path",
        )
    });
    let mut sources: Vec<PathBuf> = std::fs::read_dir(KERNEL_DIR)
        .unwrap_or_else(|e| fail(&format!("cannot list {KERNEL_DIR}/: {e}")))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu" || x == "cuh"))
        .collect();
    sources.sort();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
    }
    for src in sources
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
    {
        compile(&nvcc, src, &out_dir);
    }
}

/// `NVCC`, then `nvcc` under CUDA_ROOT / CUDA_HOME / CUDA_PATH, then on PATH.
fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    let roots = ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|r| PathBuf::from(r).join("bin"));
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    roots
        .chain(path_dirs)
        .map(|dir| dir.join("nvcc"))
        .find(|candidate| candidate.is_file())
}

fn compile(nvcc: &Path, src: &Path, out_dir: &Path) {
    let stem = src.file_stem().expect("a .cu file has a stem");
    let ptx = out_dir.join(stem).with_extension("ptx");
    let output = Command::new(nvcc)
        .args(["--ptx", &format!("-arch={ARCH}"), "-O3", "-std=c++17"])
        .arg("-I")
        .arg(KERNEL_DIR)
        .arg("-o")
        .arg(&ptx)
        .arg(src)
        .output()
        .unwrap_or_else(|e| fail(&format!("cannot run {}: {e}", nvcc.display())));
    if !output.status.success() {
        fail(&format!(
            "nvcc failed on {}:\n{}{}",
            src.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}
