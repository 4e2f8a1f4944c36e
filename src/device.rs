//! Where a run computes and in what precision (`--device auto|cpu|cuda|cuda:N`,
//! `--dtype auto|f32|bf16|f16`), and the peak device memory it used.
//!
//! `auto` takes CUDA device 0 when this binary was built with `--features cuda` and a device
//! opens, else the CPU; the `auto` dtype is bf16 on CUDA and f32 on the CPU (candle's CPU matmul
//! has no bf16).

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};

/// The values `--device` takes, for help texts and errors.
pub const DEVICE_CHOICES: &str = "auto, cpu, cuda or cuda:N";

/// A `--device` value, parsed without opening anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => Self::Auto,
            "cpu" => Self::Cpu,
            "cuda" => Self::Cuda(0),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Self::Cuda(n),
                _ => bail!("device `{s}`: use {DEVICE_CHOICES}"),
            },
        })
    }
}

impl DeviceSpec {
    /// Opens the device.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => Ok(if cfg!(feature = "cuda") {
                Device::new_cuda(0).unwrap_or(Device::Cpu)
            } else {
                Device::Cpu
            }),
            Self::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    bail!(
                        "device cuda:{n}: this qlora was built without CUDA; rebuild with \
                         `cargo build --release --features cuda` (docs/gpu-and-multi-machine.md, \"GPU (CUDA)\") or use \
                         --device cpu"
                    );
                }
                Device::new_cuda(n).with_context(|| {
                    format!(
                        "device cuda:{n}: could not open it (is the NVIDIA driver loaded, do \
                         libcuda, libcublas, libcurand and libnvrtc 13 resolve, does the device \
                         exist?); or use --device cpu"
                    )
                })
            }
        }
    }
}

/// The compute dtype for `spec` (`auto`, `f32`, `bf16`, `f16`) on `device`.
pub fn compute_dtype(spec: &str, device: &Device) -> Result<DType> {
    Ok(match spec {
        "auto" if device.is_cuda() => DType::BF16,
        "auto" | "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => bail!("dtype `{other}`: use auto, f32, bf16 or f16"),
    })
}

/// A short name: `cpu`, `cuda:0`.
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Free memory on `device`'s GPU (the driver's figure); `None` on the CPU.
pub fn free_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::result::mem_get_info;
        d.cuda_stream().context().bind_to_thread().ok()?;
        return mem_get_info().ok().map(|(free, _)| free as u64);
    }
    let _ = device;
    None
}

/// Peak memory in use on a CUDA device (the driver's total − free: the CUDA context, candle's
/// allocations and the allocator's pool), sampled every 2 ms on a thread while it lives. On the
/// CPU it measures nothing (the process' peak RSS is `VmHWM`).
#[derive(Debug)]
pub struct MemorySampler {
    #[cfg(feature = "cuda")]
    inner: Option<cuda::Sampler>,
}

impl MemorySampler {
    pub fn start(device: &Device) -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            let inner = match device {
                Device::Cuda(d) => Some(cuda::Sampler::start(d)?),
                _ => None,
            };
            Ok(Self { inner })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            Ok(Self {})
        }
    }

    /// `(peak used, used when sampling started)` in MiB so far; `None` off CUDA.
    pub fn peak_mib(&self) -> Option<(f64, f64)> {
        #[cfg(feature = "cuda")]
        if let Some(s) = &self.inner {
            return Some(s.peak_mib());
        }
        None
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::CudaDevice;
    use candle_core::cuda_backend::cudarc::driver::result::mem_get_info;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    const MIB: f64 = (1 << 20) as f64;

    #[derive(Debug)]
    pub struct Sampler {
        stop: Arc<AtomicBool>,
        peak: Arc<AtomicU64>,
        start_used: u64,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Sampler {
        pub fn start(dev: &CudaDevice) -> anyhow::Result<Self> {
            let ctx = dev.cuda_stream().context().clone();
            ctx.bind_to_thread()?;
            let (free, total) = mem_get_info()?;
            let start_used = (total - free) as u64;
            let stop = Arc::new(AtomicBool::new(false));
            let peak = Arc::new(AtomicU64::new(start_used));
            let (stop2, peak2) = (stop.clone(), peak.clone());
            let thread = std::thread::spawn(move || {
                if ctx.bind_to_thread().is_err() {
                    return;
                }
                while !stop2.load(Ordering::Relaxed) {
                    if let Ok((free, total)) = mem_get_info() {
                        peak2.fetch_max((total - free) as u64, Ordering::Relaxed);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            });
            Ok(Self {
                stop,
                peak,
                start_used,
                thread: Some(thread),
            })
        }

        pub fn peak_mib(&self) -> (f64, f64) {
            (
                self.peak.load(Ordering::Relaxed) as f64 / MIB,
                self.start_used as f64 / MIB,
            )
        }
    }

    impl Drop for Sampler {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse_and_bad_ones_say_what_to_use() {
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        for bad in ["gpu", "cuda:", "cuda:x", "CPU"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains(DEVICE_CHOICES), "{e}");
        }
    }

    #[test]
    fn auto_dtype_is_f32_on_the_cpu() {
        assert_eq!(compute_dtype("auto", &Device::Cpu).unwrap(), DType::F32);
        assert_eq!(compute_dtype("bf16", &Device::Cpu).unwrap(), DType::BF16);
        assert!(compute_dtype("f64", &Device::Cpu).is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build() {
        let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
        assert!(DeviceSpec::Auto.open().unwrap().is_cpu());
    }
}
