//! The `qlora` binary: parse, run, print the error chain and exit 2 on failure (74 when a write
//! failed: a full disk, a read-only output).

use std::process::ExitCode;

/// glibc's malloc, but a heap of their own for the threads that tokenize data.
#[global_allocator]
static ALLOCATOR: qlora_quant::runtime::Allocator = qlora_quant::runtime::Allocator;

fn main() -> ExitCode {
    // Piped into `head`, stop quietly like other Unix tools instead of panicking on EPIPE.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Before any thread and any CPU feature query (QLORA_CPU=avx2: the AVX2 paths on an AVX-512
    // CPU, for measuring both classes on one machine).
    // SAFETY: no other thread has started yet, and no feature was asked.
    match unsafe { qlora_quant::isa::force_from_env() } {
        Ok(Some(note)) => eprintln!("{note}"),
        Ok(None) => {}
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    // SAFETY: no other thread has started yet.
    unsafe { qlora_quant::runtime::init() };
    match qlora_quant::runtime::run(qlora::cli::run) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            // A full disk or a read-only output: 74 (EX_IOERR), apart from other failures.
            if err.chain().any(|c| c.is::<qlora::fsx::disk::DiskError>()) {
                ExitCode::from(74)
            } else {
                ExitCode::from(2)
            }
        }
    }
}
