//! The MPI backend (cargo feature `mpi`): the `mpi` crate (rsmpi) over the system's MPI, for
//! ranks started by `mpirun`. Collectives run on host buffers; a CUDA tensor is copied through the
//! host (NCCL is the GPU backend).

use super::Communicator;
use anyhow::{Context, Result, bail};
use candle_core::Tensor;
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::Communicator as _;
use mpi::traits::*;

/// `MPI_COMM_WORLD` of an initialized MPI (finalized when dropped).
pub struct Mpi {
    // Dropped after `world` (declaration order): MPI_Finalize last.
    world: SimpleCommunicator,
    local_rank: usize,
    _universe: Universe,
}

impl std::fmt::Debug for Mpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mpi")
            .field("rank", &self.world.rank())
            .field("world", &self.world.size())
            .finish()
    }
}

impl Mpi {
    /// `MPI_Init_thread` with `MPI_THREAD_SERIALIZED`: the trainer calls MPI from one thread at a
    /// time, though not the process's main thread (commands run on a pool worker).
    pub fn init() -> Result<Self> {
        let (universe, provided) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .context("--dist mpi: MPI is already initialized in this process")?;
        if provided < mpi::Threading::Serialized {
            bail!(
                "--dist mpi: this MPI provides thread level {provided:?}; qlora needs MPI_THREAD_SERIALIZED"
            );
        }
        let world = universe.world();
        // The rank among this machine's processes: the shared-memory split of the world.
        let local_rank = world.split_shared(world.rank()).rank() as usize;
        Ok(Self {
            world,
            local_rank,
            _universe: universe,
        })
    }
}

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn world(&self) -> usize {
        self.world.size() as usize
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let send: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let mut recv = vec![0f32; send.len()];
        self.world
            .all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
        Ok(Tensor::from_vec(recv, send.len(), t.device())?)
    }
    fn all_reduce_scalars(&self, v: &mut [f64]) -> Result<()> {
        let send = v.to_vec();
        self.world
            .all_reduce_into(&send[..], v, SystemOperation::sum());
        Ok(())
    }
    fn broadcast(&self, mut bytes: Vec<u8>) -> Result<Vec<u8>> {
        let root = self.world.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        root.broadcast_into(&mut bytes[..]);
        Ok(bytes)
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
    fn name(&self) -> &'static str {
        "mpi"
    }
}
