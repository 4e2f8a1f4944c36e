//! The QLoRA linear as one CPU op: `y = x · dequant(W)ᵀ + s · (drop(x) · Aᵀ) · Bᵀ` for `x: [.., in]`,
//! an NF4 `W: [out, in]`, the adapter `A: [r, in]`, `B: [out, r]` and scale `s`, differentiable in
//! `x`, `A` and `B`. The composition (`nf4_linear`, two matmuls, a scale and an add, plus candle's
//! gradient bookkeeping for each) makes five activation-sized passes and allocations per linear and
//! as many again in the backward; here the adapter's product is accumulated into the base's output
//! by gemm (`read_dst`), and the backward accumulates `dx` the same way:
//!
//! ```text
//! h  = drop(x) · Aᵀ                 [m, r]
//! y  = x · Wᵀ  (+)=  s · h · Bᵀ     [m, out]   (W dequantized tile by tile, as nf4_linear)
//! g  = s · dy · B                   [m, r]
//! dx = dy · W  (+)=  drop'(g · A)   [m, in]    (drop' replays the same mask and 1/keep)
//! dA = gᵀ · drop(x)                 [r, in]
//! dB = s · dyᵀ · h                  [out, r]
//! ```
//!
//! f32 on the CPU only (the model's CPU path); tests compare it with the composition, forward and
//! gradients, with and without dropout.

use super::cpu::{data, dropout_slice};
use super::gemm::{Threads, mm, rm};
use super::ops::Dropout;
use crate::Nf4Tensor;
use crate::op::{to_candle, x_w, x_wt};
use candle_core::{
    CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor, bail,
};

/// The f32 host data of an op's tensor.
fn host<'a>(s: &'a Storage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(s) => data::<f32>(s, l),
        _ => bail!("lora_nf4_linear: a tensor is not on the CPU"),
    }
}

/// `x · dequant(W)ᵀ + scale · drop(x) · Aᵀ · Bᵀ` with `dropout` (the mask of
/// [`super::dropout_rows`], rows being `x`'s first dimension), as one op. `x` f32 on the CPU, `in`
/// even.
pub fn lora_nf4_linear(
    x: &Tensor,
    w: &Nf4Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f32,
    dropout: Option<super::DropoutSpec>,
) -> Result<Tensor> {
    lora_nf4_linear_known(x, w, a, b, scale, dropout, None)
}

/// [`lora_nf4_linear`] whose output `known` an earlier forward of the same inputs computed: it is
/// handed over instead of computed, and the backward is the op's (selective recomputation).
pub fn lora_nf4_linear_known(
    x: &Tensor,
    w: &Nf4Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f32,
    dropout: Option<super::DropoutSpec>,
    known: Option<&Tensor>,
) -> Result<Tensor> {
    let (out, inp) = w.dims2().map_err(to_candle)?;
    let (r, a_in) = a.dims2()?;
    let (b_out, b_r) = b.dims2()?;
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        bail!("lora_nf4_linear: x must be f32 on the CPU");
    }
    if a_in != inp || b_out != out || b_r != r || x.dims().last() != Some(&inp) || inp % 2 == 1 {
        bail!(
            "lora_nf4_linear: x {:?}, W [{out}, {inp}], A {:?}, B {:?} do not fit (in even)",
            x.dims(),
            a.dims(),
            b.dims()
        );
    }
    // Rows are x's first dimension, as `dropout_rows` takes them.
    let row_len = (x.elem_count() / x.dims().first().copied().unwrap_or(1).max(1)).max(1);
    let dropout = match dropout {
        Some(d) if d.p > 0.0 => Some(Dropout::new(d.p, d.seed, row_len as u64, d.rows)?),
        _ => None,
    };
    let op = LoraNf4 {
        w: w.clone(),
        scale,
        dropout,
    };
    let (x, a, b) = (
        x.contiguous()?,
        a.to_dtype(DType::F32)?.contiguous()?,
        b.to_dtype(DType::F32)?.contiguous()?,
    );
    match known {
        None => x.apply_op3(&a, &b, op),
        Some(y) => {
            let mut shape = x.dims().to_vec();
            *shape.last_mut().expect("x has a last dim") = out;
            let out = super::known::known_output("lora_nf4_linear", y, &x, &shape)?;
            x.apply_op3(&a, &b, super::known::Known { op, out })
        }
    }
}

/// Bytes [`lora_nf4_linear`] holds at its peak beyond its input and output (`forward`) and beyond
/// the three gradients it returns (`backward`), for `x: [m, inp]`, `W: [out, inp]`, rank `r`, on a
/// pool of `threads` (`qlora plan` counts them; the terms are `cpu_fwd`'s and `bwd`'s buffers).
pub fn lora_nf4_linear_memory(
    (m, out, inp, r): (usize, usize, usize, usize),
    dropout: bool,
    threads: usize,
) -> (u64, u64) {
    let f = |n: usize| (n * 4) as u64;
    let dropped = if dropout { f(m * inp) } else { 0 };
    // Forward: W's tiles while `x · Wᵀ` runs, then `h` and `drop(x)`.
    let tiles_t = crate::op::nf4_tile_bytes(out, inp, true, threads);
    let forward = tiles_t.max(f(m * r) + dropped);
    // Backward: `drop(x)` and `g` throughout; W's column tiles while `dy · W` runs, with dropout
    // the adapter's part of dx and its masked copy, and at the end `h`.
    let tiles = crate::op::nf4_tile_bytes(out, inp, false, threads);
    let masked = if dropout { 2 * f(m * inp) } else { 0 };
    let backward = dropped + f(m * r) + tiles.max(masked).max(f(m * r));
    (forward, backward)
}

#[derive(Debug, Clone)]
struct LoraNf4 {
    w: Nf4Tensor,
    scale: f32,
    dropout: Option<Dropout>,
}

/// `h = drop(x) · Aᵀ`, `[m, r]`.
fn adapter_in(xd: &[f32], a: &[f32], (m, r, inp): (usize, usize, usize)) -> Vec<f32> {
    let mut h = vec![0f32; m * r];
    mm(
        (m, r, inp),
        &mut h,
        false,
        rm(xd, inp, false),
        rm(a, inp, true),
        1.0,
        Threads::Pool,
    );
    h
}

impl LoraNf4 {
    /// `drop(x)`: `x` itself without dropout.
    fn dropped<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match self.dropout {
            Some(op) => dropout_slice(x, op, |v| v * op.scale).into(),
            None => x.into(),
        }
    }

    fn dims(&self) -> Result<(usize, usize)> {
        self.w.dims2().map_err(to_candle)
    }
}

impl CustomOp3 for LoraNf4 {
    fn name(&self) -> &'static str {
        "qlora-lora-nf4-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, inp) = self.dims()?;
        let (x, a, b) = (
            data::<f32>(s1, l1)?,
            data::<f32>(s2, l2)?,
            data::<f32>(s3, l3)?,
        );
        let r = a.len() / inp;
        let m = x.len() / inp;
        let mut y = self
            .w
            .with_cpu(|view| x_wt(&view, x, m, out, inp))
            .map_err(to_candle)?;
        let h = adapter_in(&self.dropped(x), a, (m, r, inp));
        mm(
            (m, out, r),
            &mut y,
            true,
            rm(&h, r, false),
            rm(b, r, true),
            self.scale,
            Threads::Pool,
        );
        let mut dims = l1.shape().dims().to_vec();
        *dims.last_mut().expect("x has a last dim") = out;
        Ok((CpuStorage::F32(y), Shape::from_dims(&dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, inp) = self.dims()?;
        let r = a.dim(0)?;
        let m = x.elem_count() / inp;
        let dy = dy.contiguous()?;
        let (xg, xl) = x.storage_and_layout();
        let (ag, al) = a.storage_and_layout();
        let (bg, bl) = b.storage_and_layout();
        let (dg, dl) = dy.storage_and_layout();
        let (x, a, b, dy) = (
            host(&xg, xl)?,
            host(&ag, al)?,
            host(&bg, bl)?,
            host(&dg, dl)?,
        );
        let xd = self.dropped(x);
        let mut g = vec![0f32; m * r];
        mm(
            (m, r, out),
            &mut g,
            false,
            rm(dy, out, false),
            rm(b, r, false),
            self.scale,
            Threads::Pool,
        );
        let mut dx = self
            .w
            .with_cpu(|view| x_w(&view, dy, m, out, inp))
            .map_err(to_candle)?;
        match self.dropout {
            None => mm(
                (m, inp, r),
                &mut dx,
                true,
                rm(&g, r, false),
                rm(a, inp, false),
                1.0,
                Threads::Pool,
            ),
            Some(op) => {
                let mut gd = vec![0f32; m * inp];
                mm(
                    (m, inp, r),
                    &mut gd,
                    false,
                    rm(&g, r, false),
                    rm(a, inp, false),
                    1.0,
                    Threads::Pool,
                );
                let gd = dropout_slice(&gd, op, |v| v * op.scale);
                dx.iter_mut().zip(&gd).for_each(|(d, v)| *d += v);
            }
        }
        let mut da = vec![0f32; r * inp];
        mm(
            (r, inp, m),
            &mut da,
            false,
            rm(&g, r, true),
            rm(&xd, inp, false),
            1.0,
            Threads::Pool,
        );
        let h = adapter_in(&xd, a, (m, r, inp));
        let mut db = vec![0f32; out * r];
        mm(
            (out, r, m),
            &mut db,
            false,
            rm(dy, out, true),
            rm(&h, r, false),
            self.scale,
            Threads::Pool,
        );
        let dev = Device::Cpu;
        Ok((
            Some(Tensor::from_vec(dx, xl.shape(), &dev)?),
            Some(Tensor::from_vec(da, (r, inp), &dev)?),
            Some(Tensor::from_vec(db, (out, r), &dev)?),
        ))
    }
}
