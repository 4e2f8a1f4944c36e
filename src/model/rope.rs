//! Rotary position embedding tables, rotate-half (NEOX) style as Phi-3 uses it (the rotation itself
//! is `qlora_quant::fused::rope`, differentiable; candle's fused `rope` has no backward). Tables
//! are gathered by position id, so packed sequences whose positions restart per conversation work
//! as well as plain ones. With a partial rotary factor (Phi-4-mini) only the first `rotary_dim`
//! dims of each head are rotated, the rest pass through, as transformers' `apply_rotary_pos_emb`
//! does.

use super::config::{RopeConfig, RopeScaling};
use candle_core::{DType, Device, Result, Tensor};

/// The inverse frequencies and cos/sin scale for a sequence whose largest position is `max_pos`.
/// Longrope picks the long factors when the sequence is longer than the original context
/// (`max_pos + 1 > original_max`), as transformers' dynamic longrope update does.
pub fn inv_freq(cfg: &RopeConfig, max_pos: usize) -> (Vec<f64>, f64) {
    let d = cfg.rotary_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / cfg.theta.powf((2 * i) as f64 / d as f64))
        .collect();
    match &cfg.scaling {
        RopeScaling::None => (base, 1.0),
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max,
            attention_factor,
        } => {
            let factors = if max_pos + 1 > *original_max {
                long_factor
            } else {
                short_factor
            };
            (
                base.iter().zip(factors).map(|(f, s)| f / s).collect(),
                *attention_factor,
            )
        }
    }
}

/// cos and sin for `positions` (u32 `[B, T]`): each `[B, 1, T, rotary_dim]` in `dtype`, the half
/// table repeated (`cat(freqs, freqs)`), scaled by the attention factor.
pub fn cos_sin(cfg: &RopeConfig, positions: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
    let pos: Vec<Vec<u32>> = positions.to_vec2()?;
    let max_pos = pos.iter().flatten().copied().max().unwrap_or(0) as usize;
    let (freqs, scale) = inv_freq(cfg, max_pos);
    let (b, t) = positions.dims2()?;
    let d = cfg.rotary_dim;
    let mut cos = Vec::with_capacity(b * t * d);
    let mut sin = Vec::with_capacity(b * t * d);
    for &p in pos.iter().flatten() {
        for _ in 0..2 {
            for f in &freqs {
                let angle = p as f64 * f;
                cos.push((angle.cos() * scale) as f32);
                sin.push((angle.sin() * scale) as f32);
            }
        }
    }
    let dev = positions.device();
    let shape = (b, 1, t, d);
    Ok((
        Tensor::from_vec(cos, shape, &Device::Cpu)?
            .to_device(dev)?
            .to_dtype(dtype)?,
        Tensor::from_vec(sin, shape, &Device::Cpu)?
            .to_device(dev)?
            .to_dtype(dtype)?,
    ))
}
