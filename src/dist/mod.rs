//! Data-parallel training: a [`Communicator`] over the established collective libraries, with one
//! backend per transport:
//!
//! - [`Single`]: one process, always built; every collective is the identity.
//! - `Mpi` (cargo feature `mpi`): the `mpi` crate over the system's MPI (OpenMPI), for CPU ranks
//!   started by `mpirun`.
//! - `Nccl` (cargo features `cuda` + `nccl`): cudarc's NCCL on one GPU per rank (`LOCAL_RANK`),
//!   under `mpirun` or `torchrun --no-python`.
//!
//! What the trainer does with it (`train::trainer`): the global micro-batch of a step is the same
//! rows in any world size and rank `r` takes every `world`-th of them; each rank sums its loss and
//! gradients, one all-reduce sums them over ranks, and the sum is divided by the global count of
//! trained tokens; clipping and AdamW then run identically everywhere. Dropout masks are numbered
//! by (seed, step, micro-batch, global row), and rank 0 alone writes files.

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};

#[cfg(feature = "mpi")]
mod mpi_backend;
#[cfg(all(feature = "nccl", feature = "cuda"))]
mod nccl;

/// The collectives a data-parallel step needs. Every rank calls the same collectives in the same
/// order; a rank that fails calls [`Communicator::abort`], which ends every rank.
pub trait Communicator {
    /// This process's rank, `0..world`.
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// The rank among the processes on this machine (the GPU a rank takes).
    fn local_rank(&self) -> usize;
    /// Sums a flat f32 tensor over ranks (every rank gets the sum), on the tensor's device.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Sums a few f64 scalars over ranks, in place.
    fn all_reduce_scalars(&self, v: &mut [f64]) -> Result<()>;
    /// Rank 0's bytes, on every rank.
    fn broadcast(&self, bytes: Vec<u8>) -> Result<Vec<u8>>;
    fn barrier(&self) -> Result<()>;
    /// Ends every rank of the job with `code` (the library's abort); never returns.
    fn abort(&self, code: i32) -> !;
    /// The backend's name, for messages.
    fn name(&self) -> &'static str;
    /// Whether this is the one-process [`Single`], where the trainer skips the collectives
    /// (every other backend runs them, a world of one included: the whole path, testable on one
    /// device).
    fn is_single(&self) -> bool {
        false
    }
}

/// One process: rank 0 of 1.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }
    fn all_reduce_scalars(&self, _v: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        Ok(bytes)
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn name(&self) -> &'static str {
        "single"
    }
    fn is_single(&self) -> bool {
        true
    }
}

/// `--dist`: how the ranks talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One process (the default).
    None,
    /// MPI's collectives on the host (CPU training under `mpirun`).
    Mpi,
    /// NCCL on the GPUs (one per rank).
    Nccl,
}

impl std::str::FromStr for Backend {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" | "" => Ok(Self::None),
            "mpi" => Ok(Self::Mpi),
            "nccl" => Ok(Self::Nccl),
            "auto" => Ok(detect(&|k| std::env::var(k).ok())),
            other => bail!("unknown dist backend `{other}`; use none, auto, mpi or nccl"),
        }
    }
}

/// The launcher's environment → a backend: a world of more than one process under `mpirun`
/// (OpenMPI's `OMPI_COMM_WORLD_SIZE`, PMI's `PMI_SIZE`, as Slurm's srun sets it) gives MPI; under
/// `torchrun` (`WORLD_SIZE` with `LOCAL_RANK`) NCCL; anything else, a world of one included (a
/// single process in a Slurm step), none. Under `mpirun` on GPUs pass `--dist nccl`.
pub fn detect(env: &dyn Fn(&str) -> Option<String>) -> Backend {
    let many = |k: &str| {
        env(k)
            .and_then(|v| v.trim().parse::<usize>().ok())
            .is_some_and(|n| n > 1)
    };
    if many("OMPI_COMM_WORLD_SIZE") || many("PMI_SIZE") {
        return Backend::Mpi;
    }
    if many("WORLD_SIZE") && env("LOCAL_RANK").is_some() {
        return Backend::Nccl;
    }
    Backend::None
}

/// Opens the communicator of `backend` for a run on `device` (NCCL: the GPU of this rank's
/// `LOCAL_RANK`); `output` is where a file-based NCCL id exchange happens.
pub fn open(
    backend: Backend,
    device: &Device,
    output: &std::path::Path,
) -> Result<Box<dyn Communicator>> {
    let _ = (device, output);
    match backend {
        Backend::None => Ok(Box::new(Single)),
        #[cfg(feature = "mpi")]
        Backend::Mpi => Ok(Box::new(mpi_backend::Mpi::init()?)),
        #[cfg(not(feature = "mpi"))]
        Backend::Mpi => bail!(
            "--dist mpi: this qlora was built without MPI; rebuild with `cargo build --release --features mpi` (needs libopenmpi-dev and libclang-dev)"
        ),
        #[cfg(all(feature = "nccl", feature = "cuda"))]
        Backend::Nccl => Ok(Box::new(nccl::Nccl::init(device, output)?)),
        #[cfg(not(all(feature = "nccl", feature = "cuda")))]
        Backend::Nccl => bail!(
            "--dist nccl: this qlora was built without NCCL; rebuild with `--features cuda,nccl`"
        ),
    }
}

/// An error on one rank of a job of several: printed with the rank, then every rank ends (the
/// library's abort), so no rank waits forever in a collective. On a single process the error is
/// returned as it is.
pub fn fail(comm: &dyn Communicator, err: anyhow::Error) -> anyhow::Error {
    if comm.world() <= 1 {
        return err;
    }
    // One write: `eprintln!` writes each piece of its format on its own (stderr is unbuffered),
    // and the launcher's abort banner, printed meanwhile, could land in the middle of the line.
    let line = format!(
        "rank {} of {} ({}): error: {err:#}; ending every rank\n",
        comm.rank(),
        comm.world(),
        comm.name()
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    comm.abort(2)
}

/// The launcher's local rank: `LOCAL_RANK` (torchrun), `OMPI_COMM_WORLD_LOCAL_RANK` (OpenMPI),
/// `MPI_LOCALRANKID` (MPICH).
pub fn local_rank_from_env() -> Option<usize> {
    [
        "LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// The device of this rank for NCCL: `cuda:LOCAL_RANK` when the config says `auto` or `cuda`;
/// an explicit `cuda:N` is kept (one GPU per rank is then the user's job).
pub fn rank_device(configured: &str) -> Result<String> {
    match configured {
        "auto" | "cuda" => {
            let local = local_rank_from_env().context(
                "--dist nccl: no LOCAL_RANK (torchrun) or OMPI_COMM_WORLD_LOCAL_RANK (mpirun) in the environment; start the ranks with torchrun --no-python or mpirun",
            )?;
            Ok(format!("cuda:{local}"))
        }
        d if d.starts_with("cuda:") => Ok(d.to_string()),
        other => bail!("--dist nccl needs a CUDA device, not `{other}` (training.device)"),
    }
}

/// The f32 gradients of all parameters as one flat tensor (for one all-reduce), and back.
pub fn flatten(grads: &[Tensor]) -> Result<Tensor> {
    let flat = grads
        .iter()
        .map(|g| g.to_dtype(DType::F32)?.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&flat, 0)?)
}

/// Splits a flat tensor into tensors shaped (and typed) like `like`.
pub fn unflatten(flat: &Tensor, like: &[Tensor]) -> Result<Vec<Tensor>> {
    let mut at = 0;
    like.iter()
        .map(|g| {
            let n = g.elem_count();
            let t = flat
                .narrow(0, at, n)?
                .reshape(g.shape())?
                .to_dtype(g.dtype())?;
            at += n;
            Ok(t)
        })
        .collect()
}

/// A 64-bit FNV-1a hash of bytes (ranks compare their adapters and data with it).
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Checks that every rank holds the same `what` (by hash): rank 0's hash is broadcast and each
/// rank compares; a mismatch is an error on the rank that differs.
pub fn check_same(comm: &dyn Communicator, what: &str, hash: u64) -> Result<()> {
    let root = comm.broadcast(hash.to_le_bytes().to_vec())?;
    let root = u64::from_le_bytes(
        root.as_slice()
            .try_into()
            .context("broadcast returned a wrong length")?,
    );
    if root != hash {
        bail!(
            "this rank's {what} differs from rank 0's (hash {hash:016x} vs {root:016x}); every rank must run the same qlora, config, model and data"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launchers_are_detected_from_their_environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(detect(&env(&[])), Backend::None);
        assert_eq!(detect(&env(&[("OMPI_COMM_WORLD_SIZE", "2")])), Backend::Mpi);
        assert_eq!(detect(&env(&[("PMI_SIZE", "4")])), Backend::Mpi);
        // One process under a launcher trains alone.
        assert_eq!(
            detect(&env(&[("OMPI_COMM_WORLD_SIZE", "1")])),
            Backend::None
        );
        assert_eq!(detect(&env(&[("PMI_SIZE", "1")])), Backend::None);
        assert_eq!(
            detect(&env(&[("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")])),
            Backend::Nccl
        );
        assert_eq!(
            detect(&env(&[("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")])),
            Backend::None
        );
        assert!("bogus".parse::<Backend>().is_err());
    }

    #[test]
    fn flatten_and_unflatten_round_trip() {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 6.0, &dev)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::arange(10f32, 14.0, &dev)
            .unwrap()
            .reshape((4, 1))
            .unwrap();
        let flat = flatten(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(
            flat.to_vec1::<f32>().unwrap(),
            vec![0., 1., 2., 3., 4., 5., 10., 11., 12., 13.]
        );
        let back = unflatten(&flat, &[a.clone(), b.clone()]).unwrap();
        assert_eq!(
            back[0].to_vec2::<f32>().unwrap(),
            a.to_vec2::<f32>().unwrap()
        );
        assert_eq!(
            back[1].to_vec2::<f32>().unwrap(),
            b.to_vec2::<f32>().unwrap()
        );
    }

    #[test]
    fn fnv1a_matches_its_published_test_vectors() {
        // From the FNV reference (draft-eastlake-fnv): "" and "a" and "foobar".
        assert_eq!(fnv1a(*b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(*b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(*b"foobar"), 0x8594_4171_f739_67e8);
    }
}
