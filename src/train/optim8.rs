//! 8-bit AdamW (`training.optimizer = "adamw_8bit"`): bitsandbytes' block-wise 8-bit Adam
//! (`bnb.optim.AdamW8bit`), its moments stored in 8 bits with one f32 scale per 256 of them.
//!
//! Per parameter of `n` elements (bitsandbytes `optim/optimizer.py`, `Optimizer2State.init_state`):
//! `n < 4096` keeps f32 moments; otherwise `m` is 8-bit codes into the signed dynamic map, `v`
//! codes into the unsigned one, each with an f32 absmax per block of 256 (a trailing partial block
//! has its own): 2 + 8/256 ≈ 2.03 bytes per element instead of 8. Each step, per block
//! (`kOptimizerStatic8bit2StateBlockwise`):
//!
//! ```text
//! m ← map₁[c₁]·absmax₁        v ← map₂[c₂]·absmax₂                      (dequantize)
//! m ← β₁·m + (1 − β₁)·g      v ← β₂·v + (1 − β₂)·g²                   (f32)
//! p ← p − (lr·√(1 − β₂ᵗ) / (1 − β₁ᵗ)) · m / (√v + ε·√(1 − β₂ᵗ))        (from the f32 m, v)
//! p ← p · (1 − lr·λ)                                                    (decay AFTER the step)
//! absmax₁ ← max|m|            absmax₂ ← max|v|                           (over the block)
//! c₁ ← nearest(map₁, m/absmax₁), its sign fixed to m's    c₂ ← nearest(map₂, v/absmax₂)
//! ```
//!
//! A non-finite gradient element zeroes both its moments and leaves its parameter alone.
//!
//! Weight decay: bitsandbytes' CUDA kernel decays after the Adam step (as above), its CPU path
//! before, as `torch.optim.AdamW` does; the two differ by `lr²·λ` terms. Training follows the
//! CUDA kernel ([`BnbBackend::Cuda`], the default). [`BnbBackend::Cpu`] reproduces bitsandbytes
//! 0.50.2's CPU arithmetic instead, bit for bit on the states for finite gradients (a non-finite
//! one is guarded as in the CUDA mode, where bitsandbytes' CPU path would spread the NaN). With
//! `weight_decay = 0` both compute the same update from the same states, but round the states
//! differently (the CPU's lookup table cannot reach the codes nearest 0), so their parameters
//! drift apart a little (after 100 steps, by under 1% of how far they moved).
//!
//! The states live as tensors on the parameters' device (`u8` codes, `f32` absmax), so a checkpoint
//! holds exactly them; the update itself runs on the host, block by block ([`step_block`], the
//! scalar reference, mapped over blocks in parallel — blocks are independent, so the parallel
//! pass is the same arithmetic). On a GPU that is a copy of each parameter, its gradient and its
//! states to the host and back per step: correct, not fast.
//!
//! Facts, with their sources (bitsandbytes 0.50.2 as installed by `shared/tools/reference-venv.sh`;
//! its CPU backend is identical at commit 95f9af30 of bitsandbytes-foundation/bitsandbytes):
//! - `optim/optimizer.py`, `Optimizer2State.init_state`: `p.numel() < min_8bit_size` (4096) keeps
//!   f32 `state1`/`state2`; otherwise `uint8` ones over `qmap1 = create_dynamic_map(signed=True)`
//!   and `qmap2 = create_dynamic_map(signed=False)`, `blocksize = 256`, `absmax1`/`absmax2` f32 of
//!   `ceil(n/256)` blocks, all zeros. Golden: 4,095 elements stay f32, 4,096 go 8-bit.
//! - `functional.py::create_dynamic_map`: both maps, regenerated bit for bit
//!   (`qlora_quant::format`; golden `map.signed`, `map.unsigned`).
//! - `csrc/kernels.cu::kOptimizerStatic8bit2StateBlockwise<T, ADAM, 256, 1>` (read, not run here):
//!   the update above; the parameter from the f32 `s1`, `s2` before they are requantized;
//!   `quantize_2D` a binary search then a midpoint test (the nearest code); the sign fix for `m`
//!   only; a NaN/inf gradient zeroes `s1`, `s2` and skips the parameter, decay included.
//!   `kOptimizer32bit2State` (the f32 state) also decays after, but has no such guard: here the
//!   guard covers both.
//! - `backends/cpu/ops.py::_optimizer_update_8bit_blockwise_cpu` (the goldens' path): dequantize
//!   (`code[c]·absmax`, `csrc/cpu_ops.cpp`), `m.mul_(β₁).add_(g, alpha=1−β₁)` and
//!   `v.mul_(β₂).addcmul_(g, g, value=1−β₂)` in f32 with the Python constants cast to f32, decay
//!   first, `p.addcdiv_(m, √v/√(1−β₂ᵗ) + ε, value=−lr/(1−β₁ᵗ))`, then `quantize_blockwise`: the
//!   block's max |·|, `x·(1/absmax)` looked up in a 65,536-entry table (a zero block: absmax 0,
//!   codes 0); no sign fix, no non-finite guard. torch 2.15 on AVX-512 fuses both updates into
//!   multiply-adds (`fma(g, 1−β₁, m·β₁)`, `fma((1−β₂)·g, g, v·β₂)`): the unfused forms differ in
//!   `absmax2`'s last bit within 10 steps (tests/fixtures/gen_adamw8bit_goldens.py).
//!   `_optimizer_update_32bit_cpu` (f32 state): the same moments, decay first, then
//!   `p += (−lr·√(1−β₂ᵗ)/(1−β₁ᵗ))·m/(√v + ε·√(1−β₂ᵗ))` as one multiply-add.

use candle_core::{DType, Result, Tensor, Var};
use qlora_quant::BnbBackend;
use qlora_quant::backend::{build_cpu_lut, code8_cpu, code8_cuda};
use qlora_quant::format::{dynamic_map, dynamic_map_unsigned, n_blocks};
use rayon::prelude::*;
use std::sync::OnceLock;

use super::optim::AdamWConfig;

/// Elements per quantization block (bitsandbytes ≥ 0.44: `blocksize = 256`).
pub const BLOCK_ELEMS: usize = 256;
/// Parameters with fewer elements keep f32 moments (bitsandbytes' `min_8bit_size`).
pub const MIN_8BIT_ELEMS: usize = 4096;

/// Whether a parameter of `n_elems` elements gets 8-bit moments.
pub fn is_8bit(n_elems: usize) -> bool {
    n_elems >= MIN_8BIT_ELEMS
}

/// Bytes of 8-bit AdamW's state for a parameter of `n_elems` elements: two codes and two absmax
/// per block, or two f32 moments under [`MIN_8BIT_ELEMS`].
pub fn state_bytes(n_elems: usize) -> u64 {
    if is_8bit(n_elems) {
        2 * n_elems as u64 + 2 * 4 * n_blocks(n_elems, BLOCK_ELEMS) as u64
    } else {
        2 * 4 * n_elems as u64
    }
}

/// Bytes [`AdamW8bit::step`] allocates for a parameter of `n_elems` elements beyond its state:
/// on the host the parameter and gradient as f32 and the two code vectors (f32 moments: four
/// f32 vectors); on a GPU, where those host copies are not device memory, the new parameter,
/// codes and absmax uploaded while the old ones live.
pub fn step_temporaries(n_elems: usize, on_host: bool) -> u64 {
    let n = n_elems as u64;
    match (on_host, is_8bit(n_elems)) {
        (true, true) => 4 * n + 4 * n + 2 * n,
        (true, false) => 4 * 4 * n,
        (false, _) => 4 * n + state_bytes(n_elems),
    }
}

/// One parameter's moments.
#[derive(Debug, Clone)]
pub enum State {
    /// f32 `m`, `v`, shaped as the parameter (under [`MIN_8BIT_ELEMS`]).
    F32 { m: Tensor, v: Tensor },
    /// `u8` codes `[n]` into the signed (`m`) and unsigned (`v`) dynamic maps, f32 absmax
    /// `[n_blocks]` each.
    Q8 {
        m: Tensor,
        v: Tensor,
        m_absmax: Tensor,
        v_absmax: Tensor,
    },
}

impl State {
    /// Zero moments for a parameter like `p` (codes 0 with absmax 0 dequantize to 0).
    pub fn zeros(p: &Tensor) -> Result<Self> {
        let n = p.elem_count();
        let dev = p.device();
        if !is_8bit(n) {
            let z = Tensor::zeros(p.shape(), DType::F32, dev)?;
            return Ok(Self::F32 { m: z.clone(), v: z });
        }
        let codes = Tensor::zeros(n, DType::U8, dev)?;
        let absmax = Tensor::zeros(n_blocks(n, BLOCK_ELEMS), DType::F32, dev)?;
        Ok(Self::Q8 {
            m: codes.clone(),
            v: codes,
            m_absmax: absmax.clone(),
            v_absmax: absmax,
        })
    }

    /// Bytes these moments occupy.
    pub fn bytes(&self) -> u64 {
        let b = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        match self {
            Self::F32 { m, v } => b(m) + b(v),
            Self::Q8 {
                m,
                v,
                m_absmax,
                v_absmax,
            } => b(m) + b(v) + b(m_absmax) + b(v_absmax),
        }
    }
}

/// One step's constants, rounded as `backend` rounds them.
#[derive(Debug, Clone, Copy)]
pub struct Coeffs {
    backend: BnbBackend,
    b1: f32,
    b2: f32,
    /// `1 − β₁`, `1 − β₂`.
    c_b1: f32,
    c_b2: f32,
    /// CUDA: `−lr·√(1 − β₂ᵗ)/(1 − β₁ᵗ)`; CPU 8-bit: `−lr/(1 − β₁ᵗ)`; CPU f32: as CUDA.
    step_size: f32,
    step_size_f32_state: f32,
    /// CUDA and CPU f32: `ε·√(1 − β₂ᵗ)`; CPU 8-bit: `√(1 − β₂ᵗ)` (the divisor of √v).
    eps_scaled: f32,
    corr2: f32,
    eps: f32,
    /// `1 − lr·λ`, or 1 without decay.
    decay: f32,
}

impl Coeffs {
    /// The constants of step `t` (1-based).
    pub fn new(cfg: &AdamWConfig, lr: f64, t: u64, backend: BnbBackend) -> Self {
        let t = i32::try_from(t).unwrap_or(i32::MAX);
        let decay = if cfg.weight_decay > 0.0 {
            1.0 - lr * cfg.weight_decay
        } else {
            1.0
        };
        match backend {
            // The kernel receives f32 betas and computes its constants in f32.
            BnbBackend::Cuda => {
                let (b1, b2) = (cfg.beta1 as f32, cfg.beta2 as f32);
                let c1 = 1.0 - (b1 as f64).powi(t);
                let c2 = (1.0 - (b2 as f64).powi(t)).sqrt();
                let step = (-(lr as f32) * c2 as f32) / c1 as f32;
                Self {
                    backend,
                    b1,
                    b2,
                    c_b1: 1.0 - b1,
                    c_b2: 1.0 - b2,
                    step_size: step,
                    step_size_f32_state: step,
                    eps_scaled: c2 as f32 * cfg.eps as f32,
                    corr2: c2 as f32,
                    eps: cfg.eps as f32,
                    decay: 1.0 - lr as f32 * cfg.weight_decay as f32,
                }
            }
            // Python floats, each cast to f32 where it meets a tensor.
            BnbBackend::Cpu => {
                let (b1, b2) = (cfg.beta1, cfg.beta2);
                let c1 = 1.0 - b1.powi(t);
                let c2 = (1.0 - b2.powi(t)).sqrt();
                Self {
                    backend,
                    b1: b1 as f32,
                    b2: b2 as f32,
                    c_b1: (1.0 - b1) as f32,
                    c_b2: (1.0 - b2) as f32,
                    step_size: (-lr / c1) as f32,
                    step_size_f32_state: (-lr * c2 / c1) as f32,
                    eps_scaled: (cfg.eps * c2) as f32,
                    corr2: c2 as f32,
                    eps: cfg.eps as f32,
                    decay: decay as f32,
                }
            }
        }
    }

    /// The moments after gradient `g`, from the previous (dequantized) `m`, `v`.
    #[inline(always)]
    fn moments(&self, m: f32, v: f32, g: f32) -> (f32, f32) {
        match self.backend {
            BnbBackend::Cuda => (m * self.b1 + self.c_b1 * g, v * self.b2 + self.c_b2 * g * g),
            // `m.mul_(β₁).add_(g, alpha=1−β₁)`: torch's add is `fmadd(g, alpha, m)`;
            // `v.mul_(β₂).addcmul_(g, g, value=1−β₂)`: `(value·g)·g + v`, fused.
            BnbBackend::Cpu => (
                g.mul_add(self.c_b1, m * self.b1),
                (self.c_b2 * g).mul_add(g, v * self.b2),
            ),
        }
    }

    /// The parameter after the Adam step from the new `m`, `v` (8-bit states), decay included.
    #[inline(always)]
    fn param_8bit(&self, p: f32, m: f32, v: f32) -> f32 {
        match self.backend {
            BnbBackend::Cuda => {
                (p + self.step_size * (m / (v.sqrt() + self.eps_scaled))) * self.decay
            }
            BnbBackend::Cpu => {
                let denom = v.sqrt() / self.corr2 + self.eps;
                p * self.decay + (self.step_size * m) / denom
            }
        }
    }

    /// The parameter after the Adam step (f32 states: bitsandbytes' 32-bit update).
    #[inline(always)]
    fn param_f32(&self, p: f32, m: f32, v: f32) -> f32 {
        let update = m / (v.sqrt() + self.eps_scaled);
        match self.backend {
            BnbBackend::Cuda => (p + self.step_size_f32_state * update) * self.decay,
            BnbBackend::Cpu => update.mul_add(self.step_size_f32_state, p * self.decay),
        }
    }
}

/// The unsigned map's CPU lookup table (the signed one lives in `qlora_quant::backend`).
fn cpu_lut(signed: bool) -> &'static [u8; 65536] {
    static S: OnceLock<Box<[u8; 65536]>> = OnceLock::new();
    static U: OnceLock<Box<[u8; 65536]>> = OnceLock::new();
    if signed {
        S.get_or_init(|| build_cpu_lut(dynamic_map()))
    } else {
        U.get_or_init(|| build_cpu_lut(dynamic_map_unsigned()))
    }
}

/// Codes for `x` (one block) over `map` scaled by its absmax, as `backend` rounds: CUDA the
/// nearest entry of `x / absmax` (and, for the signed `m`, a code of `x`'s sign), the CPU its
/// table at `x · (1/absmax)`. An all-zero block gets the code of 0 (CUDA's `0/0` would be NaN;
/// any code dequantizes to 0 there).
fn quantize_block(backend: BnbBackend, signed: bool, x: &[f32], codes: &mut [u8]) -> f32 {
    let map = if signed {
        dynamic_map()
    } else {
        dynamic_map_unsigned()
    };
    let absmax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    if absmax == 0.0 {
        // The CPU writes 0; code 0 is -0.99 on the signed map, which dequantizes to -0.0.
        let zero = match backend {
            BnbBackend::Cpu => 0,
            BnbBackend::Cuda if signed => 127,
            BnbBackend::Cuda => 0,
        };
        codes.fill(zero);
        return 0.0;
    }
    match backend {
        BnbBackend::Cuda => {
            for (c, &v) in codes.iter_mut().zip(x) {
                let mut q = code8_cuda(map, v / absmax);
                // `kOptimizerStatic8bit2StateBlockwise`: m keeps its sign.
                if signed && map[q as usize].is_sign_negative() != v.is_sign_negative() {
                    q = if v > 0.0 { q + 1 } else { q - 1 };
                }
                *c = q;
            }
        }
        BnbBackend::Cpu => {
            let lut = cpu_lut(signed);
            let inv = 1.0 / absmax;
            for (c, &v) in codes.iter_mut().zip(x) {
                *c = code8_cpu(lut, v * inv);
            }
        }
    }
    absmax
}

/// One block of an 8-bit-state parameter: `p`, `g`, the codes `c1`, `c2` (all the block's length,
/// at most [`BLOCK_ELEMS`]) and the block's absmax `a1`, `a2`, updated in place. The scalar
/// reference of the whole update.
#[allow(clippy::too_many_arguments)]
pub fn step_block(
    k: &Coeffs,
    p: &mut [f32],
    g: &[f32],
    c1: &mut [u8],
    c2: &mut [u8],
    a1: &mut f32,
    a2: &mut f32,
) {
    let n = p.len();
    debug_assert!(n <= BLOCK_ELEMS && g.len() == n && c1.len() == n && c2.len() == n);
    let (map1, map2) = (dynamic_map(), dynamic_map_unsigned());
    let (mut m, mut v) = ([0f32; BLOCK_ELEMS], [0f32; BLOCK_ELEMS]);
    for j in 0..n {
        if !g[j].is_finite() {
            continue;
        }
        let (m0, v0) = (map1[c1[j] as usize] * *a1, map2[c2[j] as usize] * *a2);
        (m[j], v[j]) = k.moments(m0, v0, g[j]);
        p[j] = k.param_8bit(p[j], m[j], v[j]);
    }
    *a1 = quantize_block(k.backend, true, &m[..n], c1);
    *a2 = quantize_block(k.backend, false, &v[..n], c2);
}

/// An f32-state parameter (`n < 4096`): `p`, `g`, `m`, `v` of one length, updated in place.
pub fn step_f32(k: &Coeffs, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    for j in 0..p.len() {
        if !g[j].is_finite() {
            (m[j], v[j]) = (0.0, 0.0);
            continue;
        }
        (m[j], v[j]) = k.moments(m[j], v[j], g[j]);
        p[j] = k.param_f32(p[j], m[j], v[j]);
    }
}

/// An 8-bit-state parameter on the host: every block, in parallel.
pub fn step_8bit(
    k: &Coeffs,
    p: &mut [f32],
    g: &[f32],
    c1: &mut [u8],
    c2: &mut [u8],
    a1: &mut [f32],
    a2: &mut [f32],
) {
    p.par_chunks_mut(BLOCK_ELEMS)
        .zip(g.par_chunks(BLOCK_ELEMS))
        .zip(c1.par_chunks_mut(BLOCK_ELEMS))
        .zip(c2.par_chunks_mut(BLOCK_ELEMS))
        .zip(a1.par_iter_mut().zip(a2.par_iter_mut()))
        .for_each(|((((p, g), c1), c2), (a1, a2))| step_block(k, p, g, c1, c2, a1, a2));
}

/// 8-bit AdamW over a fixed list of parameters.
#[derive(Debug)]
pub struct AdamW8bit {
    pub cfg: AdamWConfig,
    /// Whose arithmetic the update reproduces (training: CUDA's).
    pub backend: BnbBackend,
    pub params: Vec<Var>,
    pub states: Vec<State>,
    /// Steps taken.
    pub step: u64,
}

impl AdamW8bit {
    pub fn new(params: Vec<Var>, cfg: AdamWConfig, backend: BnbBackend) -> Result<Self> {
        let states = params
            .iter()
            .map(|p| State::zeros(p.as_tensor()))
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg,
            backend,
            params,
            states,
            step: 0,
        })
    }

    /// Bytes of all moments.
    pub fn state_bytes(&self) -> u64 {
        self.states.iter().map(State::bytes).sum()
    }

    /// One update with learning rate `lr` and gradients aligned with the parameters.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, &[])
    }

    /// [`Self::step`] with parameter `i`'s learning rate `lr · scales[i]` (1 where `scales` has
    /// no entry).
    pub fn step_scaled(&mut self, grads: &[Tensor], lr: f64, scales: &[f64]) -> Result<()> {
        if grads.len() != self.params.len() {
            candle_core::bail!(
                "{} gradients for {} parameters",
                grads.len(),
                self.params.len()
            );
        }
        self.step += 1;
        for (i, ((p, state), g)) in self
            .params
            .iter()
            .zip(&mut self.states)
            .zip(grads)
            .enumerate()
        {
            let lr = lr * scales.get(i).copied().unwrap_or(1.0);
            let k = Coeffs::new(&self.cfg, lr, self.step, self.backend);
            let t = p.as_tensor();
            let (dev, shape, dtype) = (t.device().clone(), t.shape().clone(), t.dtype());
            let host = |x: &Tensor| x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
            let (mut pv, gv) = (host(t)?, host(g)?);
            if gv.len() != pv.len() {
                candle_core::bail!("gradient of {} elements for {shape:?}", gv.len());
            }
            match state {
                State::F32 { m, v } => {
                    let (mut mv, mut vv) = (host(m)?, host(v)?);
                    step_f32(&k, &mut pv, &gv, &mut mv, &mut vv);
                    *m = Tensor::from_vec(mv, &shape, &dev)?;
                    *v = Tensor::from_vec(vv, &shape, &dev)?;
                }
                State::Q8 {
                    m,
                    v,
                    m_absmax,
                    v_absmax,
                } => {
                    let (mut c1, mut c2) = (m.to_vec1::<u8>()?, v.to_vec1::<u8>()?);
                    let (mut a1, mut a2) = (m_absmax.to_vec1::<f32>()?, v_absmax.to_vec1::<f32>()?);
                    step_8bit(&k, &mut pv, &gv, &mut c1, &mut c2, &mut a1, &mut a2);
                    let (nc, nb) = (c1.len(), a1.len());
                    *m = Tensor::from_vec(c1, nc, &dev)?;
                    *v = Tensor::from_vec(c2, nc, &dev)?;
                    *m_absmax = Tensor::from_vec(a1, nb, &dev)?;
                    *v_absmax = Tensor::from_vec(a2, nb, &dev)?;
                }
            }
            p.set(&Tensor::from_vec(pv, &shape, &dev)?.to_dtype(dtype)?)?;
        }
        Ok(())
    }
}
