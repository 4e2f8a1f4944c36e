//! The by-value struct arguments of the fused kernels, `#[repr(C)]` as the C structs they mirror
//! (`SoftmaxRows` of fused.cu, `AttnGeom` of attention.cu), shared by the CUDA launches and the
//! emulated ones (feature `emulate`), so both pass the same bytes.

use super::attention::Geom;
use super::cpu::SoftmaxRows;
use candle_core::Result;

/// `v` as a kernel's u32 argument, or an error naming `what`.
pub(super) fn u32_of(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("fused op: {what} {v} > u32")))
}

/// `SoftmaxRows` of fused.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct SoftmaxRowsArg {
    len: u32,
    t_len: u32,
    heads: u32,
    mask_batch_stride: u32,
    has_mask: u32,
    scale: f32,
}
const _: () = assert!(std::mem::size_of::<SoftmaxRowsArg>() == 24);

impl SoftmaxRowsArg {
    pub(super) fn new(g: SoftmaxRows, has_mask: bool) -> Result<Self> {
        Ok(Self {
            len: u32_of(g.len, "row length")?,
            t_len: u32_of(g.t_len, "tokens")?,
            heads: u32_of(g.heads, "heads")?,
            mask_batch_stride: u32_of(g.mask_batch_stride, "mask stride")?,
            has_mask: u32::from(has_mask),
            scale: g.scale,
        })
    }

    /// The struct's bytes, as the kernel reads them (little-endian, no padding).
    #[cfg(feature = "emulate")]
    pub(super) fn to_bytes(self) -> Vec<u8> {
        [
            self.len,
            self.t_len,
            self.heads,
            self.mask_batch_stride,
            self.has_mask,
        ]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .chain(self.scale.to_le_bytes())
        .collect()
    }
}

/// `AttnGeom` of attention.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(super) struct GeomArg {
    b: u32,
    h: u32,
    hk: u32,
    t: u32,
    tk: u32,
    d: u32,
    mask_batch_stride: u32,
    has_mask: u32,
    scale: f32,
}
const _: () = assert!(std::mem::size_of::<GeomArg>() == 36);

impl GeomArg {
    pub(super) fn new(g: Geom, has_mask: bool) -> Result<Self> {
        Ok(Self {
            b: u32_of(g.b, "attention batch")?,
            h: u32_of(g.h, "attention heads")?,
            hk: u32_of(g.hk, "attention kv heads")?,
            t: u32_of(g.t, "attention queries")?,
            tk: u32_of(g.tk, "attention keys")?,
            d: u32_of(g.d, "attention head dim")?,
            mask_batch_stride: u32_of(g.mask_batch_stride, "attention mask stride")?,
            has_mask: u32::from(has_mask),
            scale: g.scale,
        })
    }

    /// The struct's bytes, as the kernel reads them (little-endian, no padding).
    #[cfg(feature = "emulate")]
    pub(super) fn to_bytes(self) -> Vec<u8> {
        let ints = [
            self.b,
            self.h,
            self.hk,
            self.t,
            self.tk,
            self.d,
            self.mask_batch_stride,
            self.has_mask,
        ];
        ints.iter()
            .flat_map(|v| v.to_le_bytes())
            .chain(self.scale.to_le_bytes())
            .collect()
    }
}
