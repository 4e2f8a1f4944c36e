//! qlora-quant's integration tests, one binary: goldens from real bitsandbytes, property tests,
//! the statistical error band, the candle ops against dense references, and the per-device cases
//! (CPU always, CUDA when built with `--features cuda` and a GPU is present; with `--features
//! emulate` the CPU runs the CUDA kernels in the emulation harness, and `emulated` tests the
//! harness itself).

mod cpu_fast;
mod devices;
mod dropout;
#[cfg(feature = "emulate")]
mod emulated;
mod fused;
mod goldens;
mod ops;
mod props;
mod stats;

/// tests/fixtures at the repository root (generators and their committed outputs); the root is
/// `QLORA_REPO_DIR` when set (a test binary carried to another machine, as scripts/gpu_check.sh
/// does).
pub fn fixtures() -> std::path::PathBuf {
    match std::env::var_os("QLORA_REPO_DIR") {
        Some(root) => std::path::PathBuf::from(root).join("tests/fixtures"),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"),
    }
}
