//! The `qlora` binary: parse, run, print the error chain and exit 2 on failure.

use std::process::ExitCode;

fn main() -> ExitCode {
    match qlora::cli::run() {
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
