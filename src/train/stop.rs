//! Stopping a run cleanly when asked to: SIGTERM (`kill`, Slurm's preemption and time limit),
//! SIGINT (Ctrl-C) and SIGUSR1 (Slurm's `--signal=USR1@…` warning) make the trainer finish the
//! optimizer step it is in, write a checkpoint and exit with [`EXIT_STOPPED`], printing the
//! command that resumes. A second SIGINT while a stop is pending exits at once with
//! [`EXIT_FORCED`] (a repeated SIGTERM or SIGUSR1 does not: a batch system may send several, and
//! the checkpoint in progress is the point; SIGKILL remains).
//!
//! On a data-parallel job each rank adds its flag to the step's scalar all-reduce (the one that
//! sums the loss and token counts), so one rank's signal stops every rank after the same step.
//! The handlers are `signal-hook`'s (they only set atomics); they are installed just before the
//! first step, so a signal while the model loads ends the process as usual (nothing is trained
//! yet, nothing is lost).

use super::trainer::{Trainer, list_checkpoints};
use anyhow::{Context, Result};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Exit status of a run stopped by a signal after writing its checkpoint (`EX_TEMPFAIL`: try
/// again, with `--resume`).
pub const EXIT_STOPPED: u8 = 75;
/// Exit status of a second Ctrl-C (128 + SIGINT): no checkpoint written.
pub const EXIT_FORCED: i32 = 130;

/// Whether a stop was asked for, by a signal here or (after the step's all-reduce) on any rank.
#[derive(Debug, Clone, Default)]
pub struct Stop {
    /// The number of the signal this process received (0: none).
    signal: Arc<AtomicUsize>,
    /// Set with `signal`, for signal-hook's conditional shutdown.
    pending: Arc<AtomicBool>,
    /// Some rank asked, as the last step's all-reduce told.
    agreed: Arc<AtomicBool>,
}

impl Stop {
    /// A flag no signal sets (a library run: the caller decides when to stop).
    pub fn never() -> Self {
        Self::default()
    }

    /// Installs the handlers of SIGTERM, SIGINT and SIGUSR1 for this process.
    pub fn on_signals() -> Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
        use signal_hook::flag;
        let stop = Self::default();
        // Registered first, so it sees the flag as the previous signal left it: only a second
        // SIGINT exits.
        flag::register_conditional_shutdown(SIGINT, EXIT_FORCED, stop.pending.clone())
            .context("installing the SIGINT handler")?;
        for sig in [SIGTERM, SIGINT, SIGUSR1] {
            flag::register_usize(sig, stop.signal.clone(), sig as usize)
                .and_then(|_| flag::register(sig, stop.pending.clone()))
                .with_context(|| format!("installing the handler of signal {sig}"))?;
        }
        Ok(stop)
    }

    /// Asks for a stop as a signal would (`signal`: its number).
    pub fn raise(&self, signal: i32) {
        self.signal.store(signal as usize, Ordering::SeqCst);
        self.pending.store(true, Ordering::SeqCst);
    }

    /// This rank's vote for the step's all-reduce: 1 when a signal arrived here.
    pub fn vote(&self) -> f64 {
        if self.pending.load(Ordering::SeqCst) {
            1.0
        } else {
            0.0
        }
    }

    /// Records the all-reduced sum of every rank's [`Self::vote`].
    pub fn agree(&self, votes: f64) {
        if votes > 0.0 {
            self.agreed.store(true, Ordering::SeqCst);
        }
    }

    /// Whether the run stops after the step just taken: on one process, when a signal arrived;
    /// on several, when the step's all-reduce said some rank got one (every rank then agrees).
    pub fn now(&self, single: bool) -> bool {
        if single {
            self.pending.load(Ordering::SeqCst)
        } else {
            self.agreed.load(Ordering::SeqCst)
        }
    }

    /// The signal that stopped the run, for messages: `SIGTERM`, or `a signal to another rank`.
    pub fn reason(&self) -> String {
        match self.signal.load(Ordering::SeqCst) as i32 {
            0 => "a signal to another rank".to_string(),
            s => signal_name(s).to_string(),
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGUSR1 => "SIGUSR1",
        _ => "a signal",
    }
}

/// The command that resumes the run in `output`: this program as it was invoked, under
/// `mpirun -np <world>` for a data-parallel job, with the flags that are not in the saved config.
pub fn resume_command(output: &std::path::Path, world: usize, flags: &[String]) -> String {
    let program = std::env::args_os()
        .next()
        .map_or_else(|| "qlora".to_string(), |p| p.to_string_lossy().into_owned());
    let mut words = Vec::new();
    if world > 1 {
        words.extend(["mpirun".to_string(), "-np".into(), world.to_string()]);
    }
    words.extend([
        program,
        "train".into(),
        "--resume".into(),
        output.display().to_string(),
    ]);
    words.extend(flags.iter().cloned());
    words
        .iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a stopped run prints: why and where it stopped, and (rank 0) how to resume.
pub fn stopped_message(t: &Trainer, flags: &[String]) -> String {
    let (rank, world) = t.rank_world();
    if rank > 0 {
        return format!(
            "rank {rank} of {world}: stopped by {} after step {}",
            t.stop.reason(),
            t.state.step
        );
    }
    format!(
        "stopped by {} after step {} of {}; checkpoint {}\nresume with: {}",
        t.stop.reason(),
        t.state.step,
        t.total_steps,
        t.output
            .join("checkpoints")
            .join(format!("step-{:06}", t.state.step))
            .display(),
        resume_command(&t.output, world, flags)
    )
}

/// A failed write during training (a full disk, a read-only output) told how to go on: the
/// latest checkpoint is intact, and the command that resumes from it once the cause is fixed.
/// Other errors are returned as they are.
pub fn with_resume_hint(err: anyhow::Error, t: &Trainer, flags: &[String]) -> anyhow::Error {
    let disk = err.chain().any(|c| c.is::<crate::fsx::disk::DiskError>());
    let latest = list_checkpoints(&t.output).ok().and_then(|mut c| c.pop());
    match (disk, latest) {
        (true, Some(ck)) => {
            let (_, world) = t.rank_world();
            err.context(format!(
                "training stopped at step {} of {}; the checkpoint {} is intact: fix the cause below, then resume with: {}",
                t.state.step,
                t.total_steps,
                ck.display(),
                resume_command(&t.output, world, flags)
            ))
        }
        _ => err,
    }
}

/// `w` as a POSIX shell word.
fn shell_quote(w: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=@,+%".contains(c);
    if !w.is_empty() && w.chars().all(plain) {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stop_is_taken_on_a_signal_here_or_a_vote_anywhere() {
        let s = Stop::never();
        assert!(!s.now(true) && !s.now(false));
        assert_eq!(s.vote(), 0.0);
        // Another rank's vote stops this rank too, after the same step.
        s.agree(1.0);
        assert!(s.now(false) && !s.now(true));
        assert_eq!(s.reason(), "a signal to another rank");
        let s = Stop::never();
        s.raise(libc::SIGTERM);
        assert!(s.now(true));
        assert_eq!(s.vote(), 1.0);
        assert!(!s.now(false), "several ranks wait for the all-reduce");
        assert_eq!(s.reason(), "SIGTERM");
    }

    #[test]
    fn resume_commands_are_shell_words() {
        let out = std::path::Path::new("runs/it's here");
        let c = resume_command(out, 2, &["--dist".into(), "mpi".into()]);
        assert!(c.starts_with("mpirun -np 2 "), "{c}");
        assert!(
            c.ends_with(r" train --resume 'runs/it'\''s here' --dist mpi"),
            "{c}"
        );
        assert!(!resume_command(out, 1, &[]).contains("mpirun"));
    }
}
