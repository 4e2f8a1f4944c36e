//! The README's shell blocks run as written, so the README cannot drift from the binary: every
//! block fenced as ```` ```sh ```` runs, in order, in a scratch copy of the repository's
//! `configs/`, `data/` and `assets/` with `qlora` on the PATH, after the README's first command
//! (the demo run, whose outputs the blocks use). Blocks fenced ```` ```sh no-run ```` (the
//! commands that need the network, a real model or `cargo`) are skipped.

use std::path::Path;
use std::process::Command;

/// `(line, text)` of each runnable block: fenced exactly ```` ```sh ````.
fn runnable_blocks(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut open: Option<(usize, bool, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start();
        match &mut open {
            None if fence.starts_with("```") => {
                let info = fence.trim_start_matches('`').trim();
                open = Some((i + 1, info == "sh", String::new()));
            }
            Some((start, runs, body)) if fence.starts_with("```") => {
                if *runs {
                    out.push((*start, std::mem::take(body)));
                }
                open = None;
            }
            Some((_, _, body)) => {
                body.push_str(line);
                body.push('\n');
            }
            None => {}
        }
    }
    assert!(open.is_none(), "README.md: a code block is not closed");
    out
}

fn run(dir: &Path, path: &str, script: &str) -> std::process::Output {
    Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .env("PATH", path)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

#[test]
fn the_readmes_shell_blocks_run_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let blocks = runnable_blocks(&readme);
    assert!(
        blocks.iter().any(|(_, b)| b.contains("qlora ")),
        "README.md has no runnable qlora block"
    );
    let tmp = tempfile::tempdir().unwrap();
    for d in ["configs", "data", "assets"] {
        std::os::unix::fs::symlink(root.join(d), tmp.path().join(d)).unwrap();
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_qlora")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let setup = "qlora train --4bit --config configs/demo.toml";
    assert!(
        readme.contains(&format!(
            "cargo run --release -- {}",
            &setup["qlora ".len()..]
        )),
        "the README's first command is not the demo run this test starts from"
    );
    let o = run(tmp.path(), &path, setup);
    assert!(
        o.status.success(),
        "the demo run failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for (line, block) in &blocks {
        let o = run(tmp.path(), &path, block);
        assert!(
            o.status.success(),
            "README.md:{line}: the block\n{block}failed ({}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

#[test]
fn only_sh_blocks_run() {
    let text = "a\n```sh\nqlora a\n```\n```sh no-run\nqlora b\n```\n```toml\nx = 1\n```\n";
    assert_eq!(runnable_blocks(text), vec![(2, "qlora a\n".to_string())]);
}
