//! The NCCL backend (cargo features `cuda` + `nccl`): cudarc's NCCL communicator on this rank's
//! GPU, collectives on candle's stream of that GPU, so they order with the step's kernels.
//!
//! Rank and world come from the launcher: `RANK`/`WORLD_SIZE` (torchrun) or
//! `OMPI_COMM_WORLD_RANK`/`OMPI_COMM_WORLD_SIZE` (mpirun). The unique id of the communicator is
//! exchanged, in this order: through MPI's broadcast when built with `mpi` and launched by mpirun;
//! through NCCL itself when `NCCL_COMM_ID` is set (every rank then derives the same id from that
//! address); else through a file that rank 0 writes into the output directory (a shared
//! filesystem) and the others wait for.

use super::Communicator;
use anyhow::{Context, Result, bail};
use candle_core::cuda::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Device, Storage, Tensor};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long ranks wait for rank 0's id file.
const ID_FILE_TIMEOUT: Duration = Duration::from_secs(300);

pub struct Nccl {
    comm: Comm,
    dev: CudaDevice,
    local_rank: usize,
    /// The id file rank 0 wrote (removed when the run ends).
    id_file: Option<PathBuf>,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("rank", &self.comm.rank())
            .field("world", &self.comm.world_size())
            .finish()
    }
}

fn env_usize(keys: &[&str]) -> Option<usize> {
    keys.iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

fn nccl_err(e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow::anyhow!("NCCL: {e:?}")
}

impl Nccl {
    /// Joins the job's communicator on `device` (this rank's GPU).
    pub fn init(device: &Device, output: &Path) -> Result<Self> {
        let dev = device
            .as_cuda_device()
            .context("--dist nccl needs a CUDA device")?
            .clone();
        let rank = env_usize(&["RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"]).context(
            "--dist nccl: no RANK (torchrun) or OMPI_COMM_WORLD_RANK (mpirun) in the environment",
        )?;
        let world = env_usize(&["WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])
            .context("--dist nccl: no WORLD_SIZE or OMPI_COMM_WORLD_SIZE in the environment")?;
        if rank >= world {
            bail!("--dist nccl: rank {rank} is not below the world size {world}");
        }
        let local_rank = super::local_rank_from_env().unwrap_or(0);
        let (id, id_file) = exchange_id(rank, output)?;
        let comm = Comm::from_rank(dev.cuda_stream(), rank, world, id).map_err(nccl_err)?;
        Ok(Self {
            comm,
            dev,
            local_rank,
            id_file,
        })
    }

    /// Sums `data` (f32 or f64 on the host) over ranks through the GPU.
    fn all_reduce_host<T>(&self, data: &[T]) -> Result<Vec<T>>
    where
        T: candle_core::cuda::cudarc::driver::DeviceRepr
            + candle_core::cuda::cudarc::nccl::safe::NcclType
            + candle_core::cuda::cudarc::driver::ValidAsZeroBits
            + Default
            + Clone,
    {
        let stream = self.dev.cuda_stream();
        let mut buf = stream.clone_htod(data).map_err(nccl_err)?;
        self.comm
            .all_reduce_in_place(&mut buf, &ReduceOp::Sum)
            .map_err(nccl_err)?;
        stream.clone_dtoh(&buf).map_err(nccl_err)
    }
}

/// The communicator's unique id, made by rank 0 and shared with the others (see the module docs).
fn exchange_id(rank: usize, output: &Path) -> Result<(Id, Option<PathBuf>)> {
    #[cfg(feature = "mpi")]
    if super::detect(&|k| std::env::var(k).ok()) == super::Backend::Mpi {
        let mpi = super::mpi_backend::Mpi::init()?;
        let id = if rank == 0 {
            Some(Id::new().map_err(nccl_err)?)
        } else {
            None
        };
        let bytes = id
            .map(|id| id.internal().iter().map(|&c| c as u8).collect())
            .unwrap_or_default();
        let bytes = Communicator::broadcast(&mpi, bytes)?;
        // The MPI environment stays up for the process (finalized at exit).
        std::mem::forget(mpi);
        return Ok((id_from_bytes(&bytes)?, None));
    }
    if std::env::var_os("NCCL_COMM_ID").is_some() {
        return Ok((Id::new().map_err(nccl_err)?, None));
    }
    let run = std::env::var("TORCHELASTIC_RUN_ID")
        .or_else(|_| std::env::var("MASTER_PORT"))
        .unwrap_or_else(|_| "default".into());
    let path = output.join(format!(".nccl-id.{run}"));
    if rank == 0 {
        std::fs::create_dir_all(output)
            .with_context(|| format!("creating {}", output.display()))?;
        let id = Id::new().map_err(nccl_err)?;
        let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        crate::fsx::write_atomic(&path, &bytes)?;
        return Ok((id, Some(path)));
    }
    let t0 = Instant::now();
    loop {
        if let Ok(bytes) = std::fs::read(&path)
            && bytes.len() == 128
        {
            return Ok((id_from_bytes(&bytes)?, None));
        }
        if t0.elapsed() > ID_FILE_TIMEOUT {
            bail!(
                "--dist nccl: rank {rank} waited {}s for rank 0's NCCL id in {}; do the ranks share the output directory? (or set NCCL_COMM_ID=host:port, or launch with mpirun)",
                ID_FILE_TIMEOUT.as_secs(),
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn id_from_bytes(bytes: &[u8]) -> Result<Id> {
    let arr: [u8; 128] = bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("NCCL id of {} bytes, not 128", bytes.len()))?;
    Ok(Id::uninit(arr.map(|b| b as std::ffi::c_char)))
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world(&self) -> usize {
        self.comm.world_size()
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let t = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .contiguous()?;
        if !t.device().is_cuda() {
            let v: Vec<f32> = t.to_vec1()?;
            let sum = self.all_reduce_host(&v)?;
            return Ok(Tensor::from_vec(sum, v.len(), t.device())?);
        }
        let n = t.elem_count();
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            bail!("all-reduce: the tensor is not on a CUDA device")
        };
        let src = cs.as_cuda_slice::<f32>()?;
        let src = src.slice(layout.start_offset()..layout.start_offset() + n);
        let mut dst = self
            .dev
            .cuda_stream()
            .alloc_zeros::<f32>(n)
            .map_err(nccl_err)?;
        self.comm
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(nccl_err)?;
        drop(storage);
        let out = CudaStorage::wrap_cuda_slice(dst, self.dev.clone());
        Ok(Tensor::from_storage(
            Storage::Cuda(out),
            n,
            BackpropOp::none(),
            false,
        ))
    }
    fn all_reduce_scalars(&self, v: &mut [f64]) -> Result<()> {
        let sum = self.all_reduce_host(v)?;
        v.copy_from_slice(&sum);
        Ok(())
    }
    fn broadcast(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        // The length first (a sum where every rank but 0 adds zero), then the bytes as f64s.
        let len = if self.rank() == 0 {
            bytes.len() as f64
        } else {
            0.0
        };
        let len = self.all_reduce_host(&[len])?[0] as usize;
        let mine: Vec<f64> = if self.rank() == 0 {
            bytes.iter().map(|&b| f64::from(b)).collect()
        } else {
            vec![0.0; len]
        };
        Ok(self
            .all_reduce_host(&mine)?
            .into_iter()
            .map(|v| v as u8)
            .collect())
    }
    fn barrier(&self) -> Result<()> {
        self.all_reduce_host(&[0f64])?;
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        // The launcher (torchrun, mpirun) ends the other ranks when one exits with an error.
        std::process::exit(code)
    }
    fn name(&self) -> &'static str {
        "nccl"
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        if let Some(p) = &self.id_file {
            let _ = std::fs::remove_file(p);
        }
    }
}
