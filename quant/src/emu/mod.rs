//! Feature `emulate`: the CPU device runs our CUDA kernels themselves, in the emulation harness
//! (quant/emu: each quant/kernels/*.cu compiled as host C++ against our `cuda_emu.h`, under
//! AddressSanitizer and UndefinedBehaviorSanitizer; build.rs builds it). Every kernel-backed op
//! (dequantization, the fused ops, fused attention) then launches on the CPU what it launches on
//! CUDA: the same kernel, the same arguments and the same grid and block (`crate::launch`),
//! so the per-device tests, run in this build, check the kernels against the CPU references. This
//! module is the harness's client and the dequantization launch; the fused ops' launches sit
//! beside their CUDA ones (`fused/emu.rs`, `fused/attention/emu.rs`).
//!
//! The harness is a separate process (`QLORA_EMU_RUNNER`, default: the one build.rs built),
//! spoken to over pipes (protocol in quant/emu/runner.cpp); one per concurrent caller, reused. A
//! sanitizer report, a deadlock or a barrier timeout ends it, and the launch is an error carrying
//! its message. `QLORA_EMU=off` turns the emulation off at run time (the CPU loops run instead).

pub(crate) mod dequant;

use crate::launch::LaunchDims;
use candle_core::{Layout, Result, Tensor, bail};
use std::io::{BufReader, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

/// Whether the CPU device runs the emulated kernels (always, unless `QLORA_EMU=off`).
pub fn active() -> bool {
    std::env::var("QLORA_EMU").map_or(true, |v| v != "off")
}

/// One kernel argument.
#[derive(Debug, Clone)]
pub enum Arg {
    /// Input bytes, placed `offset` bytes past a 256-byte-aligned allocation (a view's offset).
    In {
        bytes: Vec<u8>,
        offset: u32,
    },
    /// An output of `n_bytes`, sent back; the harness fills it with 0xFF (NaN) first, so an
    /// element no thread writes shows.
    Out {
        n_bytes: usize,
    },
    U32(u32),
    U64(u64),
    F32(f32),
    /// A struct passed by value.
    Struct(Vec<u8>),
}

/// Element types with a little-endian byte form.
pub trait Elem: Copy {
    const SIZE: usize;
    fn put(self, out: &mut Vec<u8>);
    fn get(b: &[u8]) -> Self;
}
macro_rules! elem {
    ($t:ty, $n:expr, |$v:ident| $to:expr, |$b:ident| $from:expr) => {
        impl Elem for $t {
            const SIZE: usize = $n;
            fn put(self, out: &mut Vec<u8>) {
                let $v = self;
                out.extend_from_slice(&$to);
            }
            fn get($b: &[u8]) -> Self {
                $from
            }
        }
    };
}
elem!(u8, 1, |v| [v], |b| b[0]);
elem!(u32, 4, |v| v.to_le_bytes(), |b| u32::from_le_bytes([
    b[0], b[1], b[2], b[3]
]));
elem!(f32, 4, |v| v.to_le_bytes(), |b| f32::from_le_bytes([
    b[0], b[1], b[2], b[3]
]));
elem!(half::bf16, 2, |v| v.to_bits().to_le_bytes(), |b| {
    half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))
});
elem!(half::f16, 2, |v| v.to_bits().to_le_bytes(), |b| {
    half::f16::from_bits(u16::from_le_bytes([b[0], b[1]]))
});

/// The bytes of `v`.
pub fn bytes_of<T: Elem>(v: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * T::SIZE);
    v.iter().for_each(|x| x.put(&mut out));
    out
}

/// The elements of `b`.
pub fn elems_of<T: Elem>(b: &[u8]) -> Vec<T> {
    b.chunks_exact(T::SIZE).map(T::get).collect()
}

/// An input argument from a contiguous view of `T`s (`data` is the view's elements), at the
/// offset the view would have on a device (its start, in bytes, modulo the 256-byte alignment
/// of allocations).
pub(crate) fn input<T: Elem>(data: &[T], layout: &Layout) -> Arg {
    Arg::In {
        bytes: bytes_of(data),
        offset: ((layout.start_offset() * T::SIZE) % 256) as u32,
    }
}

/// An input argument from a CPU tensor of `T`s.
pub(crate) fn tensor_input<T: Elem + candle_core::WithDType>(
    t: &Tensor,
    what: &str,
) -> Result<Arg> {
    let (guard, layout) = t.storage_and_layout();
    match &*guard {
        candle_core::Storage::Cpu(s) => match layout.contiguous_offsets() {
            Some((start, end)) => Ok(input(&s.as_slice::<T>()?[start..end], layout)),
            None => bail!("emulated kernels: {what} is not contiguous"),
        },
        _ => bail!("emulated kernels: {what} is not on the CPU"),
    }
}

/// An output of `n` elements of `T`.
pub(crate) fn output<T: Elem>(n: usize) -> Arg {
    Arg::Out {
        n_bytes: n * T::SIZE,
    }
}

/// Launches `kernel` with `dims` in the harness; returns the output buffers in argument order.
/// (Public for the harness's own tests, which launch its self-test kernels.)
pub fn launch(kernel: &str, dims: LaunchDims, args: &[Arg]) -> Result<Vec<Vec<u8>>> {
    dims.check(kernel)?;
    log_launch(kernel, dims);
    let request = encode(kernel, dims, args)?;
    let n_out = args.iter().filter(|a| matches!(a, Arg::Out { .. })).count();
    let mut runner = take_runner()?;
    match runner.round_trip(&request, n_out) {
        Ok(outs) => {
            if let Ok(mut idle) = IDLE.lock() {
                idle.push(runner);
            }
            Ok(outs)
        }
        Err(e) => {
            let report = runner.finish();
            bail!("emulated kernel {kernel} ({dims:?}) failed: {e}\n{report}")
        }
    }
}

/// The launch request the harness reads (protocol in quant/emu/runner.cpp).
pub fn encode(kernel: &str, d: LaunchDims, args: &[Arg]) -> Result<Vec<u8>> {
    let mut b = Vec::new();
    b.extend_from_slice(b"EMU1");
    b.extend_from_slice(&(kernel.len() as u16).to_le_bytes());
    b.extend_from_slice(kernel.as_bytes());
    for v in [
        d.grid.0, d.grid.1, d.grid.2, d.block.0, d.block.1, d.block.2,
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&d.shared_mem_bytes.to_le_bytes());
    b.extend_from_slice(&(args.len() as u32).to_le_bytes());
    for a in args {
        match a {
            Arg::In { bytes, offset } => {
                b.push(1);
                b.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
                b.extend_from_slice(&offset.to_le_bytes());
                b.push(1);
                b.extend_from_slice(bytes);
            }
            Arg::Out { n_bytes } => {
                b.push(1);
                b.extend_from_slice(&(*n_bytes as u64).to_le_bytes());
                b.extend_from_slice(&0u32.to_le_bytes());
                b.push(2);
            }
            Arg::U32(v) => {
                b.push(2);
                b.extend_from_slice(&v.to_le_bytes());
            }
            Arg::U64(v) => {
                b.push(3);
                b.extend_from_slice(&v.to_le_bytes());
            }
            Arg::F32(v) => {
                b.push(4);
                b.extend_from_slice(&v.to_le_bytes());
            }
            Arg::Struct(bytes) => {
                b.push(5);
                b.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                b.extend_from_slice(bytes);
            }
        }
    }
    Ok(b)
}

/// With `QLORA_EMU_LOG` set, appends `kernel grid block` to that file per launch
/// (scripts/kernels_emulated.sh checks from it that every kernel ran).
fn log_launch(kernel: &str, d: LaunchDims) {
    let Some(path) = std::env::var_os("QLORA_EMU_LOG") else {
        return;
    };
    let line = format!("{kernel} {:?} {:?}\n", d.grid, d.block);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path);
    if let Ok(mut f) = file {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Idle harness processes, reused by the next launch.
static IDLE: Mutex<Vec<Runner>> = Mutex::new(Vec::new());

fn take_runner() -> Result<Runner> {
    if let Some(r) = IDLE.lock().ok().and_then(|mut idle| idle.pop()) {
        return Ok(r);
    }
    Runner::spawn()
}

/// The harness executable: `QLORA_EMU_RUNNER`, else the one build.rs built.
pub fn runner_path() -> std::path::PathBuf {
    std::env::var_os("QLORA_EMU_RUNNER")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("QLORA_EMU_RUNNER").into())
}

#[derive(Debug)]
struct Runner {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl Runner {
    fn spawn() -> Result<Self> {
        let path = runner_path();
        let mut child = Command::new(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                candle_core::Error::Msg(format!(
                    "cannot start the kernel emulation harness {}: {e} (build qlora-quant with \
                     --features emulate, or set QLORA_EMU_RUNNER)",
                    path.display()
                ))
            })?;
        let (Some(stdin), Some(stdout), Some(mut err)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            bail!("the kernel emulation harness has no pipes");
        };
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        let stderr_reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = sink.lock() {
                    s.extend_from_slice(&buf[..n]);
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            stderr,
            stderr_reader: Some(stderr_reader),
        })
    }

    fn round_trip(&mut self, request: &[u8], n_out: usize) -> std::io::Result<Vec<Vec<u8>>> {
        self.stdin.write_all(request)?;
        self.stdin.flush()?;
        let mut magic = [0u8; 4];
        self.stdout.read_exact(&mut magic)?;
        if &magic != b"EMUR" {
            return Err(std::io::Error::other("the harness answered something else"));
        }
        let mut outs = Vec::with_capacity(n_out);
        for _ in 0..n_out {
            let mut len = [0u8; 8];
            self.stdout.read_exact(&mut len)?;
            let mut out = vec![0u8; u64::from_le_bytes(len) as usize];
            self.stdout.read_exact(&mut out)?;
            outs.push(out);
        }
        Ok(outs)
    }

    /// Waits for the process to end (a failed launch ends it); returns its status and stderr.
    fn finish(mut self) -> String {
        let _ = self.child.kill();
        let status = match self.child.wait() {
            Ok(s) => s.to_string(),
            Err(e) => format!("unknown status ({e})"),
        };
        if let Some(h) = self.stderr_reader.take() {
            let _ = h.join();
        }
        let err = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        let text = String::from_utf8_lossy(&err);
        let tail: String = {
            let chars: Vec<char> = text.chars().collect();
            chars[chars.len().saturating_sub(6000)..].iter().collect()
        };
        format!("harness {status}; its stderr:\n{tail}")
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        // Closing stdin ends an idle harness; reap it.
        if self.stderr_reader.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
