//! Compiles quant/kernels/*.cu to PTX in OUT_DIR, only when the `cuda` feature is on; the default
//! build never needs nvcc. With the `emulate` feature it builds the kernel emulation harness
//! instead (or as well): see `emulate::build` below. Headers (*.cuh, e.g. common.cuh) are found through `-I kernels`, and a
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
    if std::env::var_os("CARGO_FEATURE_EMULATE").is_some() {
        emulate::build();
    }
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

/// The emulation harness (feature `emulate`): every quant/kernels/*.cu (and the harness's own
/// emu/selftest.cu) compiled as host C++ by g++ (`QLORA_EMU_CXX` or `CXX` to change it) against
/// emu/cuda_emu.h, force-included as nvcc force-includes cuda_runtime.h, with AddressSanitizer and
/// UndefinedBehaviorSanitizer (any report aborts), no FMA contraction and no fast math; linked
/// with emu/runtime.cpp and emu/runner.cpp into OUT_DIR/emu/qlora-emu-runner (not position-
/// independent, so the kernels' shared variables have fixed addresses, listed next to it in
/// qlora-emu-runner.shared). Each kernel is registered under its name (the preprocessor lists
/// them: `__global__` becomes a marker). The crate gets the path as `QLORA_EMU_RUNNER`.
mod emulate {
    use super::{KERNEL_DIR, fail};
    use std::path::{Path, PathBuf};
    use std::process::Command;

    const EMU_DIR: &str = "emu";
    const FLAGS: &[&str] = &[
        "-std=c++17",
        "-O1",
        "-g",
        "-fno-omit-frame-pointer",
        "-ffp-contract=off",
        "-fno-fast-math",
        "-fno-strict-aliasing",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
        "-Wall",
        "-Wextra",
        "-Wno-unknown-pragmas",
        "-pthread",
    ];

    fn cxx() -> String {
        ["QLORA_EMU_CXX", "CXX"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| "g++".into())
    }

    fn run(cmd: &mut Command, what: &str) -> Vec<u8> {
        let out = cmd
            .output()
            .unwrap_or_else(|e| fail(&format!("{what}: cannot run {cmd:?}: {e}")));
        if !out.status.success() {
            fail(&format!(
                "{what} failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        out.stdout
    }

    fn includes(cmd: &mut Command) -> &mut Command {
        let dir = std::env::current_dir().expect("a working directory");
        cmd.arg("-include")
            .arg(dir.join(EMU_DIR).join("cuda_emu.h"))
            .arg("-I")
            .arg(dir.join(EMU_DIR).join("include"))
            .arg("-I")
            .arg(dir.join(EMU_DIR))
            .arg("-I")
            .arg(dir.join(KERNEL_DIR))
    }

    /// The kernels `src` defines (after macro expansion).
    fn kernel_names(cxx: &str, src: &Path) -> Vec<String> {
        let mut cmd = Command::new(cxx);
        cmd.args(["-E", "-P", "-DEMU_LIST_KERNELS", "-std=c++17", "-x", "c++"]);
        includes(&mut cmd).arg(src);
        let text = String::from_utf8_lossy(&run(&mut cmd, "listing kernels")).into_owned();
        let mut names: Vec<String> = text
            .split("__emu_kernel__")
            .skip(1)
            .filter_map(|rest| {
                let rest = rest.trim_start().strip_prefix("void")?.trim_start();
                let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_'))?;
                Some(rest[..end].to_string())
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    fn compile(cxx: &str, src: &Path, obj: &Path) {
        let mut cmd = Command::new(cxx);
        cmd.args(FLAGS).arg("-c");
        includes(&mut cmd).arg(src).arg("-o").arg(obj);
        run(&mut cmd, &format!("compiling {}", src.display()));
    }

    /// `nm -S --defined-only` of `path`: (address, size, type, name) of each sized symbol.
    fn symbols(path: &Path) -> Vec<(String, String, String, String)> {
        let nm = std::env::var("NM").unwrap_or_else(|_| "nm".into());
        let out = run(
            Command::new(nm).args(["-S", "--defined-only"]).arg(path),
            "listing symbols",
        );
        String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 4).then(|| (f[0].into(), f[1].into(), f[2].into(), f[3].into()))
            })
            .collect()
    }

    pub fn build() {
        println!("cargo:rerun-if-changed={KERNEL_DIR}");
        println!("cargo:rerun-if-changed={EMU_DIR}");
        for var in ["QLORA_EMU_CXX", "CXX", "NM"] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        let out =
            PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("emu");
        std::fs::create_dir_all(&out).unwrap_or_else(|e| fail(&format!("{}: {e}", out.display())));
        let cxx = cxx();
        let dir = std::env::current_dir().expect("a working directory");
        let mut kernel_srcs: Vec<PathBuf> = std::fs::read_dir(KERNEL_DIR)
            .unwrap_or_else(|e| fail(&format!("cannot list {KERNEL_DIR}/: {e}")))
            .filter_map(|e| e.ok().map(|e| dir.join(e.path())))
            .filter(|p| p.extension().is_some_and(|x| x == "cu"))
            .collect();
        kernel_srcs.sort();
        kernel_srcs.push(dir.join(EMU_DIR).join("selftest.cu"));
        for src in std::fs::read_dir(EMU_DIR).into_iter().flatten().flatten() {
            println!("cargo:rerun-if-changed={}", src.path().display());
        }

        // One translation unit per .cu: the file itself, then its kernels' registrations.
        let mut units = Vec::new();
        for src in &kernel_srcs {
            let stem = src
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("a .cu stem");
            let names = kernel_names(&cxx, src);
            let mut text = format!("#include \"{}\"\n#include \"runtime.h\"\n", src.display());
            for n in &names {
                text.push_str(&format!("EMU_KERNEL({n})\n"));
            }
            let unit = out.join(format!("kernels_{stem}.cpp"));
            std::fs::write(&unit, text)
                .unwrap_or_else(|e| fail(&format!("{}: {e}", unit.display())));
            units.push((unit, true));
        }
        units.push((dir.join(EMU_DIR).join("runtime.cpp"), false));
        units.push((dir.join(EMU_DIR).join("runner.cpp"), false));
        let objs: Vec<(PathBuf, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = units
                .iter()
                .map(|(unit, is_kernel)| {
                    let obj = out
                        .join(unit.file_name().expect("a file name"))
                        .with_extension("o");
                    let cxx = &cxx;
                    s.spawn(move || {
                        compile(cxx, unit, &obj);
                        (obj, *is_kernel)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a compile thread"))
                .collect()
        });

        let exe = out.join("qlora-emu-runner");
        let mut link = Command::new(&cxx);
        link.args(["-no-pie", "-fsanitize=address,undefined", "-pthread"]);
        link.args(objs.iter().map(|(o, _)| o)).arg("-o").arg(&exe);
        run(&mut link, "linking the emulation harness");

        // Shared memory: every function-local static (`_ZZ…`) of the kernel objects, at its
        // address in the executable.
        let mut statics: Vec<String> = objs
            .iter()
            .filter(|(_, k)| *k)
            .flat_map(|(o, _)| symbols(o))
            .filter(|(_, _, _, name)| name.starts_with("_ZZ"))
            .map(|(_, _, _, name)| name)
            .collect();
        statics.sort();
        statics.dedup();
        let table: String = symbols(&exe)
            .into_iter()
            .filter(|(_, _, _, name)| statics.binary_search(name).is_ok())
            .map(|(addr, size, _, name)| format!("{addr} {size} {name}\n"))
            .collect();
        let shared = out.join("qlora-emu-runner.shared");
        std::fs::write(&shared, table)
            .unwrap_or_else(|e| fail(&format!("{}: {e}", shared.display())));
        println!("cargo:rustc-env=QLORA_EMU_RUNNER={}", exe.display());
    }
}
