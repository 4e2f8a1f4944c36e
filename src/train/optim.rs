//! AdamW with decoupled weight decay (Loshchilov & Hutter; PyTorch's `torch.optim.AdamW`), moments
//! in the parameters' master precision (f32), its whole state plain tensors so a checkpoint can
//! save and restore it exactly:
//!
//! ```text
//! p ← p − lr·λ·p
//! m ← β₁·m + (1 − β₁)·g          v ← β₂·v + (1 − β₂)·g²
//! p ← p − lr · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)
//! ```

use candle_core::{Result, Tensor, Var};

/// Hyper-parameters (PyTorch's defaults but for the learning rate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// The optimizer over a fixed list of parameters.
#[derive(Debug)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub params: Vec<Var>,
    /// `(m, v)` per parameter.
    pub moments: Vec<(Tensor, Tensor)>,
    /// Steps taken.
    pub step: u64,
}

impl AdamW {
    pub fn new(params: Vec<Var>, cfg: AdamWConfig) -> Result<Self> {
        let moments = params
            .iter()
            .map(|p| Ok((p.as_tensor().zeros_like()?, p.as_tensor().zeros_like()?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg,
            params,
            moments,
            step: 0,
        })
    }

    /// One update with learning rate `lr` and gradients aligned with the parameters.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        assert_eq!(grads.len(), self.params.len(), "one gradient per parameter");
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for ((p, (m, v)), g) in self.params.iter().zip(self.moments.iter_mut()).zip(grads) {
            let g = g.to_dtype(p.dtype())?;
            *m = ((&*m * b1)? + (&g * (1.0 - b1))?)?;
            *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let decayed = (p.as_tensor() * (1.0 - lr * self.cfg.weight_decay))?;
            let update = ((&*m / c1)? / ((&*v / c2)?.sqrt()? + self.cfg.eps)?)?;
            p.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }
}
