//! Download progress: a bar with bytes, rate and ETA on a terminal (indicatif), and a log line per
//! file (and every 10 %) otherwise, like the trainer's.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Progress of one download (files in turn).
#[derive(Debug)]
pub struct Progress {
    terminal: bool,
}

impl Progress {
    pub fn new() -> Self {
        Self {
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// The bar of one file of `size` bytes.
    pub fn file(&self, name: &str, size: u64) -> FileBar {
        let bar = if self.terminal {
            let b = ProgressBar::new(size);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg:30!} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b.set_message(name.to_string());
            b
        } else {
            ProgressBar::hidden()
        };
        FileBar {
            bar,
            name: name.to_string(),
            size,
            t0: Instant::now(),
            start: AtomicU64::new(u64::MAX),
            logged: AtomicU64::new(0),
            terminal: self.terminal,
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// One file's progress.
#[derive(Debug)]
pub struct FileBar {
    bar: ProgressBar,
    name: String,
    size: u64,
    t0: Instant,
    /// Where this run started (a resumed `.part`'s length).
    start: AtomicU64,
    /// Tenths logged so far (no terminal).
    logged: AtomicU64,
    terminal: bool,
}

impl FileBar {
    /// `at` bytes are on disk.
    pub fn at(&self, at: u64) {
        if self.start.load(Ordering::Relaxed) == u64::MAX {
            self.start.store(at, Ordering::Relaxed);
            if at > 0 && !self.terminal {
                eprintln!(
                    "{}: resuming at {:.1} of {:.1} MB",
                    self.name,
                    at as f64 / 1e6,
                    self.size as f64 / 1e6
                );
            }
        }
        if self.terminal {
            self.bar.set_position(at);
            return;
        }
        let tenth = (at * 10).checked_div(self.size).unwrap_or(10);
        if tenth > self.logged.load(Ordering::Relaxed) && tenth < 10 {
            self.logged.store(tenth, Ordering::Relaxed);
            eprintln!(
                "{}: {}% of {:.1} MB",
                self.name,
                tenth * 10,
                self.size as f64 / 1e6
            );
        }
    }

    /// The file is complete.
    pub fn done(&self) {
        self.bar.finish_and_clear();
        if !self.terminal {
            let secs = self.t0.elapsed().as_secs_f64().max(1e-6);
            let start = self.start.load(Ordering::Relaxed);
            let got = self.size - if start == u64::MAX { 0 } else { start };
            eprintln!(
                "{}: {:.1} MB downloaded in {secs:.1} s ({:.1} MB/s)",
                self.name,
                self.size as f64 / 1e6,
                got as f64 / 1e6 / secs
            );
        }
    }
}
