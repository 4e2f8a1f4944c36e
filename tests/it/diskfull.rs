//! A real full filesystem and a real read-only one: a small tmpfs mounted by the test (as root;
//! skipped, with the reason printed, where mounting is not permitted). Training fills it during
//! a checkpoint, fails naming the file and the bytes it needs, leaves the earlier checkpoint
//! whole, and resumes once space is freed into the same adapter as an uninterrupted run; the
//! disk plan refuses the same run up front; a read-only mount is named as such.

use crate::preempt::{adapter_bytes, command, reference, resume_args, text, train_args};
use std::path::{Path, PathBuf};

/// A tmpfs mounted on a temporary directory, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (with the reason) where this process may not mount.
    fn mount(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let o = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).trim().to_string());
        }
        Ok(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount(&self, opts: &str) {
        let o = std::process::Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(self.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Bytes free on the filesystem of `p`.
fn free(p: &Path) -> u64 {
    qlora::fsx::disk::free_bytes(p).unwrap()
}

#[test]
fn a_full_tmpfs_fails_naming_the_bytes_keeps_the_checkpoint_and_resumes_once_freed() {
    let fs = match Tmpfs::mount("8m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("skipped: cannot mount a tmpfs here ({why})");
            return;
        }
    };
    let want = adapter_bytes(&reference().join("run"));
    let out = fs.path().join("run");
    // One checkpoint's size, from the plan.
    let mut plan = train_args(&out);
    plan[0] = "plan".into();
    plan.push("--json".into());
    let o = command(&plan, &[]).output().unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", text(&o)));
    let ck = v["disk"]["checkpoint_bytes"].as_u64().unwrap();
    // Leave room for the config, the metrics and one and a half checkpoints (tmpfs rounds each
    // file up to a page): the first checkpoint fits, the second does not.
    let ballast: PathBuf = fs.path().join("ballast");
    let room = ck * 3 / 2 + (64 << 10);
    std::fs::write(&ballast, vec![1u8; (free(fs.path()) - room) as usize]).unwrap();

    // The disk plan refuses the run up front.
    let o = command(&train_args(&out), &[]).output().unwrap();
    let msg = text(&o);
    assert_eq!(o.status.code(), Some(2), "{msg}");
    assert!(msg.contains("does not fit on disk"), "{msg}");

    // Forced, it fills the disk at the second checkpoint.
    let mut forced = train_args(&out);
    forced.push("--force".into());
    let o = command(&forced, &[]).output().unwrap();
    let msg = text(&o);
    assert_eq!(o.status.code(), Some(74), "{msg}");
    assert!(
        msg.contains("no space left on device")
            && msg.contains("the file needs")
            && msg.contains("checkpoints/.step-000006.tmp-")
            && msg.contains("the checkpoint")
            && msg.contains("step-000003 is intact")
            && msg.contains(&format!("resume with: {}", env!("CARGO_BIN_EXE_qlora"))),
        "{msg}"
    );
    let cks = qlora::train::trainer::list_checkpoints(&out).unwrap();
    assert_eq!(cks, vec![out.join("checkpoints/step-000003")]);
    let names: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["step-000003"], "no partial checkpoint remains");

    // Space freed, the run resumes to the adapter an uninterrupted run writes.
    std::fs::remove_file(&ballast).unwrap();
    let o = command(&resume_args(&out), &[]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(adapter_bytes(&out) == want, "the resumed adapter differs");

    // Read-only: named as such, exit 74.
    fs.remount("ro");
    let o = command(&train_args(&fs.path().join("other")), &[])
        .output()
        .unwrap();
    let msg = text(&o);
    assert_eq!(o.status.code(), Some(74), "{msg}");
    assert!(msg.contains("the filesystem is read-only"), "{msg}");
    assert!(
        msg.contains(&fs.path().join("other").display().to_string()),
        "{msg}"
    );
}
