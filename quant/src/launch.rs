//! Launch configurations of our CUDA kernels (quant/kernels/*.cu): grid and block sizes as pure
//! functions of the shapes, in every build, so that the CUDA launches (`cuda`, `fused/cuda.rs`,
//! `fused/attention/cuda.rs`), the emulation harness (feature `emulate`) and the tests that hold
//! them to CUDA's limits all use the same numbers.

use candle_core::{Result, bail};

/// Threads per block, at most, on every GPU.
pub const MAX_THREADS_PER_BLOCK: u32 = 1024;
/// Largest `gridDim.x` (2³¹ − 1) and `gridDim.y` / `gridDim.z` (65535).
pub const MAX_GRID_X: u32 = i32::MAX as u32;
pub const MAX_GRID_YZ: u32 = 65535;
/// Static shared memory per block on the smallest target card (every target from sm_80 to sm_120
/// caps static `__shared__` at 48 KiB; more needs dynamic shared memory and an opt-in).
pub const SMALLEST_CARD_SHARED_BYTES: u32 = 48 << 10;

/// Elements per thread of the dequantization kernels (16 packed bytes); `RUN_ELEMS` in dequant.cu.
pub const DEQUANT_RUN_ELEMS: usize = 32;
/// Threads per block of the dequantization kernels.
pub const DEQUANT_THREADS: u32 = 256;
/// Threads per row of the row kernels of fused.cu (a multiple of 32: block reductions).
pub const ROW_THREADS: u32 = 256;
/// Threads per block of the elementwise kernels of fused.cu.
pub const ELEM_THREADS: u32 = 256;
/// Most blocks of a grid-stride kernel (dropout): ~8 full waves of 256-thread blocks on a 132-SM
/// H100/H200 (8 resident per SM); each thread's loop covers the rest.
pub const MAX_STRIDE_BLOCKS: u32 = 8192;
/// Warps per block of the attention kernels (one warp per row).
pub const WARPS_PER_BLOCK: u32 = 4;

/// One kernel launch's grid and block (x, y, z) and dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

impl LaunchDims {
    /// A one-dimensional launch of `blocks` blocks of `threads`, checked against CUDA's limits.
    fn linear(blocks: usize, threads: u32, what: &str) -> Result<Self> {
        let Ok(blocks) = u32::try_from(blocks) else {
            bail!("{what}: {blocks} blocks cannot be launched (at most {MAX_GRID_X})");
        };
        let dims = Self {
            grid: (blocks, 1, 1),
            block: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        dims.check(what)?;
        Ok(dims)
    }

    /// Threads per block.
    pub fn threads_per_block(&self) -> u64 {
        u64::from(self.block.0) * u64::from(self.block.1) * u64::from(self.block.2)
    }

    /// Errors unless CUDA can launch this on every target card: 1 to 1024 threads per block (z at
    /// most 64), grid x within 2³¹ − 1 and y, z within 65535 (none zero), dynamic shared memory
    /// within the smallest card's 48 KiB.
    pub fn check(&self, what: &str) -> Result<()> {
        let (bx, by, bz) = self.block;
        let (gx, gy, gz) = self.grid;
        let threads = self.threads_per_block();
        if bx == 0 || by == 0 || bz == 0 || threads > u64::from(MAX_THREADS_PER_BLOCK) || bz > 64 {
            bail!(
                "{what}: block {:?} is not 1 to {MAX_THREADS_PER_BLOCK} threads",
                self.block
            );
        }
        if gx == 0 || gy == 0 || gz == 0 || gx > MAX_GRID_X || gy > MAX_GRID_YZ || gz > MAX_GRID_YZ
        {
            bail!("{what}: grid {:?} is outside CUDA's limits", self.grid);
        }
        if self.shared_mem_bytes > SMALLEST_CARD_SHARED_BYTES {
            bail!(
                "{what}: {} bytes of shared memory per block, over the {} of the smallest card",
                self.shared_mem_bytes,
                SMALLEST_CARD_SHARED_BYTES
            );
        }
        Ok(())
    }
}

/// Dequantization of `n_elems` values: one thread per [`DEQUANT_RUN_ELEMS`].
pub fn dequant(n_elems: usize) -> Result<LaunchDims> {
    if n_elems == 0 {
        bail!("qlora-quant: cannot dequantize an empty weight on CUDA");
    }
    let threads = DEQUANT_THREADS as usize;
    LaunchDims::linear(
        n_elems.div_ceil(DEQUANT_RUN_ELEMS).div_ceil(threads),
        DEQUANT_THREADS,
        "dequantize",
    )
}

/// The row kernels: one block of [`ROW_THREADS`] per row.
pub fn rows(rows: usize) -> Result<LaunchDims> {
    if rows == 0 {
        bail!("fused op: 0 rows cannot be launched");
    }
    LaunchDims::linear(rows, ROW_THREADS, "fused op")
}

/// The elementwise kernels: one thread per element.
pub fn elems(n: usize) -> Result<LaunchDims> {
    if n == 0 {
        bail!("fused op: 0 elements cannot be launched");
    }
    LaunchDims::linear(n.div_ceil(ELEM_THREADS as usize), ELEM_THREADS, "fused op")
}

/// A grid-stride loop over `n` elements: blocks of [`ELEM_THREADS`], at most `max_blocks` of them
/// ([`MAX_STRIDE_BLOCKS`] in the ops).
pub fn grid_stride(n: usize, max_blocks: u32) -> Result<LaunchDims> {
    if n == 0 || max_blocks == 0 {
        bail!("fused op: 0 elements cannot be launched");
    }
    let blocks = n.div_ceil(ELEM_THREADS as usize).min(max_blocks as usize);
    LaunchDims::linear(blocks, ELEM_THREADS, "fused op")
}

/// The attention kernels: one warp per row, [`WARPS_PER_BLOCK`] warps per block.
pub fn warps(rows: usize) -> Result<LaunchDims> {
    if rows == 0 {
        bail!("attention: 0 rows cannot be launched");
    }
    LaunchDims::linear(
        rows.div_ceil(WARPS_PER_BLOCK as usize),
        32 * WARPS_PER_BLOCK,
        "attention",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Phi-3-mini: hidden 3072, intermediate 8192, 32 heads of 96 (rotary 96), vocabulary 32064;
    /// sequences up to 2048 tokens, batches up to 16.
    const HIDDEN: usize = 3072;
    const INTER: usize = 8192;
    const HEADS: usize = 32;
    const HEAD_DIM: usize = 96;
    const VOCAB: usize = 32064;
    const SEQ: usize = 2048;

    #[test]
    fn phi3_mini_launches_stay_within_cuda_limits_on_every_card() {
        for batch in [1usize, 2, 8, 16] {
            let tokens = batch * SEQ;
            let launches = [
                // The base's 4-bit weights: qkv, o, gate|up, down, and a quantized head.
                dequant(3 * HIDDEN * HIDDEN).unwrap(),
                dequant(2 * INTER * HIDDEN).unwrap(),
                dequant(VOCAB * HIDDEN).unwrap(),
                // RMSNorm rows, cross-entropy rows, softmax rows of a whole [B, H, T, T] call.
                rows(tokens).unwrap(),
                rows(batch * HEADS * SEQ).unwrap(),
                // RoPE on q and k, SwiGLU on [tokens, intermediate], dropout on the inputs.
                elems(tokens * HEADS * HEAD_DIM).unwrap(),
                elems(tokens * INTER).unwrap(),
                grid_stride(tokens * HIDDEN, MAX_STRIDE_BLOCKS).unwrap(),
                // Attention: query rows (forward, statistics, dq) and key rows (dk | dv).
                warps(batch * HEADS * SEQ).unwrap(),
            ];
            for l in launches {
                l.check("phi-3-mini").unwrap();
                assert!(l.threads_per_block() % 32 == 0, "{l:?}: whole warps");
                assert!(l.threads_per_block() <= u64::from(ROW_THREADS.max(DEQUANT_THREADS)));
            }
        }
        // The largest grid: one thread per 32 of the head's 98.5M weights.
        assert_eq!(dequant(VOCAB * HIDDEN).unwrap().grid.0, 12_024);
        assert_eq!(
            grid_stride(SEQ * HIDDEN, MAX_STRIDE_BLOCKS).unwrap().grid.0,
            8192
        );
    }

    #[test]
    fn launches_cover_every_element_and_row_exactly_once() {
        for n in [1usize, 31, 32, 33, 255, 256, 257, 8191, 8192 * 32 + 1] {
            let d = dequant(n).unwrap();
            let threads = u64::from(d.grid.0) * d.threads_per_block();
            assert!(
                threads * 32 >= n as u64 && (threads - 256) * 32 < n as u64,
                "{n}: {d:?}"
            );
            let e = elems(n).unwrap();
            let threads = u64::from(e.grid.0) * e.threads_per_block();
            assert!(
                threads >= n as u64 && threads - 256 < n as u64,
                "{n}: {e:?}"
            );
            let w = warps(n).unwrap();
            assert!(u64::from(w.grid.0) * 4 >= n as u64 && u64::from(w.grid.0 - 1) * 4 < n as u64);
            assert_eq!(rows(n).unwrap().grid.0 as usize, n);
            let g = grid_stride(n, 3).unwrap();
            assert!(g.grid.0 <= 3 && g.grid.0 >= 1);
        }
    }

    #[test]
    fn launches_past_cuda_limits_are_errors() {
        assert!(rows(0).is_err() && elems(0).is_err() && dequant(0).is_err() && warps(0).is_err());
        assert!(rows(1 << 31).is_err(), "grid x over 2^31 - 1");
        assert!(warps(4 << 31).is_err());
        let too_wide = LaunchDims {
            grid: (1, 1, 1),
            block: (1025, 1, 1),
            shared_mem_bytes: 0,
        };
        assert!(too_wide.check("t").is_err());
        let too_much_smem = LaunchDims {
            block: (32, 1, 1),
            shared_mem_bytes: SMALLEST_CARD_SHARED_BYTES + 1,
            ..too_wide
        };
        assert!(too_much_smem.check("t").is_err());
        let grid_y = LaunchDims {
            grid: (1, 65536, 1),
            block: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        assert!(grid_y.check("t").unwrap_err().to_string().contains("grid"));
    }
}
