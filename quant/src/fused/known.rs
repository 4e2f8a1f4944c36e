//! Ops replayed with their output already known: selective gradient checkpointing keeps the
//! output of an expensive op (an adapted linear, the attention) from the forward, and the
//! recomputed forward hands that output over instead of computing it again. The graph is the same
//! as a computed one: the op's own backward runs on the same inputs and the same output, so the
//! gradients are the same bits.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};

/// `op` over inputs whose output `out` an earlier forward computed: the forward copies `out`
/// (exactly its buffer: contiguous from offset 0), the backward is `op`'s.
#[derive(Debug, Clone)]
pub(crate) struct Known<O> {
    pub op: O,
    pub out: Tensor,
}

/// `out` as a buffer a [`Known`] op can hand over: checked against the output the op would make
/// (`shape`, `x`'s dtype and device), copied only when it is a view of a larger buffer.
pub(crate) fn known_output(
    what: &str,
    out: &Tensor,
    x: &Tensor,
    shape: &[usize],
) -> Result<Tensor> {
    if out.dims() != shape || out.dtype() != x.dtype() || !out.device().same_device(x.device()) {
        bail!(
            "{what}: the known output is {:?} {:?} on {:?}, the op makes {shape:?} {:?} on {:?}",
            out.dims(),
            out.dtype(),
            out.device(),
            x.dtype(),
            x.device()
        );
    }
    let l = out.layout();
    if l.is_contiguous() && l.start_offset() == 0 {
        Ok(out.detach())
    } else {
        out.copy()
    }
}

impl<O> Known<O> {
    fn copy_out<S: BackendStorage>(
        &self,
        pick: impl FnOnce(&candle_core::Storage) -> Option<&S>,
    ) -> Result<S> {
        let (storage, layout) = self.out.storage_and_layout();
        match pick(&storage) {
            Some(s) => s.try_clone(layout),
            None => bail!("a known output lives on another device than the op's inputs"),
        }
    }
}

impl<O: CustomOp3> CustomOp3 for Known<O> {
    fn name(&self) -> &'static str {
        self.op.name()
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = self.copy_out(|s| match s {
            candle_core::Storage::Cpu(s) => Some(s),
            _ => None,
        })?;
        Ok((out, self.out.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = self.copy_out(|s| match s {
            candle_core::Storage::Cuda(s) => Some(s),
            _ => None,
        })?;
        Ok((out, self.out.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.op.bwd(a, b, c, res, grad)
    }
}
