//! The `qlora` binary: parse, run, print the error chain and exit 2 on failure.

use std::process::ExitCode;

fn main() -> ExitCode {
    // Piped into `head`, stop quietly like other Unix tools instead of panicking on EPIPE.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
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
            ExitCode::from(2)
        }
    }
}
