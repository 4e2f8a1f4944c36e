//! AdamW with decoupled weight decay (Loshchilov & Hutter; PyTorch's `torch.optim.AdamW`), moments
//! in the parameters' master precision (f32), its whole state plain tensors so a checkpoint can
//! save and restore it exactly:
//!
//! ```text
//! p ← p − lr·λ·p
//! m ← β₁·m + (1 − β₁)·g          v ← β₂·v + (1 − β₂)·g²
//! p ← p − lr · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)
//! ```
//!
//! Beside it, [`Optimizer`] is what the trainer holds: AdamW or the 8-bit AdamW of
//! [`super::optim8`] (`training.optimizer`), with their states named for checkpoints.

use super::optim8::{AdamW8bit, State};
use candle_core::{Result, Tensor, Var};
use qlora_quant::BnbBackend;

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
        self.step_scaled(grads, lr, &[])
    }

    /// [`Self::step`] with parameter `i`'s learning rate `lr · scales[i]` (1 where `scales` has
    /// no entry): parameter groups.
    pub fn step_scaled(&mut self, grads: &[Tensor], lr: f64, scales: &[f64]) -> Result<()> {
        assert_eq!(grads.len(), self.params.len(), "one gradient per parameter");
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for (i, ((p, (m, v)), g)) in self
            .params
            .iter()
            .zip(self.moments.iter_mut())
            .zip(grads)
            .enumerate()
        {
            let lr = lr * scales.get(i).copied().unwrap_or(1.0);
            // Detached: a gradient that recorded ops would chain every step's graph into `m`.
            let g = g.detach().to_dtype(p.dtype())?;
            *m = ((&*m * b1)? + (&g * (1.0 - b1))?)?;
            *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let decayed = (p.as_tensor() * (1.0 - lr * self.cfg.weight_decay))?;
            let update = ((&*m / c1)? / ((&*v / c2)?.sqrt()? + self.cfg.eps)?)?;
            p.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }
}

/// `training.optimizer`: which optimizer trains the adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OptimizerKind {
    /// [`AdamW`]: f32 moments, 8 bytes of state per trainable parameter.
    #[default]
    AdamW,
    /// [`AdamW8bit`]: bitsandbytes' block-wise 8-bit moments, ≈ 2.03 bytes per parameter.
    AdamW8bit,
}

impl OptimizerKind {
    /// The accepted values of `training.optimizer`.
    pub const NAMES: [&'static str; 2] = ["adamw", "adamw_8bit"];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::AdamW => "adamw",
            Self::AdamW8bit => "adamw_8bit",
        }
    }
}

/// An unknown `training.optimizer`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "training.optimizer `{0}` is not an optimizer: use \"adamw\" (the default, f32 moments) or \"adamw_8bit\" (bitsandbytes' 8-bit AdamW)"
)]
pub struct UnknownOptimizer(pub String);

impl std::str::FromStr for OptimizerKind {
    type Err = UnknownOptimizer;

    fn from_str(s: &str) -> std::result::Result<Self, UnknownOptimizer> {
        match s {
            "adamw" => Ok(Self::AdamW),
            "adamw_8bit" => Ok(Self::AdamW8bit),
            other => Err(UnknownOptimizer(other.to_string())),
        }
    }
}

/// The trainer's optimizer: either kind behind one interface, with its state as named tensors
/// for checkpoints (`optimizer.safetensors`): AdamW writes `m.{i}`, `v.{i}` per parameter `i`;
/// 8-bit AdamW the same for its f32-state parameters and `m8.{i}`, `v8.{i}` (u8 codes),
/// `m8_absmax.{i}`, `v8_absmax.{i}` (f32) for the others.
#[derive(Debug)]
pub enum Optimizer {
    AdamW(AdamW),
    AdamW8bit(AdamW8bit),
}

impl Optimizer {
    /// The optimizer `kind` over `params` (8-bit AdamW with bitsandbytes' CUDA semantics).
    pub fn new(kind: OptimizerKind, params: Vec<Var>, cfg: AdamWConfig) -> Result<Self> {
        Ok(match kind {
            OptimizerKind::AdamW => Self::AdamW(AdamW::new(params, cfg)?),
            OptimizerKind::AdamW8bit => {
                Self::AdamW8bit(AdamW8bit::new(params, cfg, BnbBackend::Cuda)?)
            }
        })
    }

    pub fn kind(&self) -> OptimizerKind {
        match self {
            Self::AdamW(_) => OptimizerKind::AdamW,
            Self::AdamW8bit(_) => OptimizerKind::AdamW8bit,
        }
    }

    pub fn params(&self) -> &[Var] {
        match self {
            Self::AdamW(o) => &o.params,
            Self::AdamW8bit(o) => &o.params,
        }
    }

    pub fn cfg(&self) -> AdamWConfig {
        match self {
            Self::AdamW(o) => o.cfg,
            Self::AdamW8bit(o) => o.cfg,
        }
    }

    /// Sets the count of steps taken (on resume).
    pub fn set_step(&mut self, step: u64) {
        match self {
            Self::AdamW(o) => o.step = step,
            Self::AdamW8bit(o) => o.step = step,
        }
    }

    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, &[])
    }

    /// One update with parameter `i`'s learning rate `lr · scales[i]` (1 where `scales` has no
    /// entry).
    pub fn step_scaled(&mut self, grads: &[Tensor], lr: f64, scales: &[f64]) -> Result<()> {
        match self {
            Self::AdamW(o) => o.step_scaled(grads, lr, scales),
            Self::AdamW8bit(o) => o.step_scaled(grads, lr, scales),
        }
    }

    /// Bytes of the optimizer's state.
    pub fn state_bytes(&self) -> u64 {
        match self {
            Self::AdamW(o) => o
                .moments
                .iter()
                .map(|(m, v)| 4 * (m.elem_count() + v.elem_count()) as u64)
                .sum(),
            Self::AdamW8bit(o) => o.state_bytes(),
        }
    }

    /// The state as named tensors, for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        match self {
            Self::AdamW(o) => {
                for (i, (m, v)) in o.moments.iter().enumerate() {
                    out.push((format!("m.{i}"), m.clone()));
                    out.push((format!("v.{i}"), v.clone()));
                }
            }
            Self::AdamW8bit(o) => {
                for (i, s) in o.states.iter().enumerate() {
                    match s {
                        State::F32 { m, v } => {
                            out.push((format!("m.{i}"), m.clone()));
                            out.push((format!("v.{i}"), v.clone()));
                        }
                        State::Q8 {
                            m,
                            v,
                            m_absmax,
                            v_absmax,
                        } => {
                            out.push((format!("m8.{i}"), m.clone()));
                            out.push((format!("v8.{i}"), v.clone()));
                            out.push((format!("m8_absmax.{i}"), m_absmax.clone()));
                            out.push((format!("v8_absmax.{i}"), v_absmax.clone()));
                        }
                    }
                }
            }
        }
        out
    }

    /// Replaces the state with `saved` (a checkpoint's tensors, taken out of the map): every
    /// tensor this optimizer keeps must be there with its shape and dtype.
    pub fn load_state(
        &mut self,
        saved: &mut std::collections::HashMap<String, Tensor>,
    ) -> std::result::Result<(), StateError> {
        let kind = self.kind();
        let mut take = |name: String, like: &Tensor| -> std::result::Result<Tensor, StateError> {
            let t = saved.remove(&name).ok_or_else(|| {
                // A state of the other optimizer's layout names that optimizer.
                let other = match kind {
                    OptimizerKind::AdamW => name.replacen('.', "8.", 1),
                    OptimizerKind::AdamW8bit => name.replacen("8.", ".", 1),
                };
                StateError::Missing {
                    name: name.clone(),
                    kind,
                    other_layout: saved.contains_key(&other),
                }
            })?;
            if t.dims() != like.dims() || t.dtype() != like.dtype() {
                return Err(StateError::Shape {
                    name,
                    got: format!("{:?} {:?}", t.dtype(), t.dims()),
                    want: format!("{:?} {:?}", like.dtype(), like.dims()),
                });
            }
            Ok(t)
        };
        match self {
            Self::AdamW(o) => {
                for (i, (m, v)) in o.moments.iter_mut().enumerate() {
                    *m = take(format!("m.{i}"), m)?;
                    *v = take(format!("v.{i}"), v)?;
                }
            }
            Self::AdamW8bit(o) => {
                for (i, s) in o.states.iter_mut().enumerate() {
                    match s {
                        State::F32 { m, v } => {
                            *m = take(format!("m.{i}"), m)?;
                            *v = take(format!("v.{i}"), v)?;
                        }
                        State::Q8 {
                            m,
                            v,
                            m_absmax,
                            v_absmax,
                        } => {
                            *m = take(format!("m8.{i}"), m)?;
                            *v = take(format!("v8.{i}"), v)?;
                            *m_absmax = take(format!("m8_absmax.{i}"), m_absmax)?;
                            *v_absmax = take(format!("v8_absmax.{i}"), v_absmax)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The tensors `optimizer.safetensors` holds for parameter `i` of `shape` under `kind`: name,
/// dtype and shape, as [`Optimizer::state_tensors`] writes them (the disk plan sizes checkpoints
/// with it).
pub fn checkpoint_layout(
    kind: OptimizerKind,
    i: usize,
    shape: &[usize],
) -> Vec<(String, safetensors::Dtype, Vec<usize>)> {
    use safetensors::Dtype;
    let n: usize = shape.iter().product();
    if kind == OptimizerKind::AdamW || !super::optim8::is_8bit(n) {
        return vec![
            (format!("m.{i}"), Dtype::F32, shape.to_vec()),
            (format!("v.{i}"), Dtype::F32, shape.to_vec()),
        ];
    }
    let blocks = qlora_quant::format::n_blocks(n, super::optim8::BLOCK_ELEMS);
    vec![
        (format!("m8.{i}"), Dtype::U8, vec![n]),
        (format!("v8.{i}"), Dtype::U8, vec![n]),
        (format!("m8_absmax.{i}"), Dtype::F32, vec![blocks]),
        (format!("v8_absmax.{i}"), Dtype::F32, vec![blocks]),
    ]
}

/// A checkpoint's optimizer state that does not fit this run.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "no optimizer state `{name}`{}",
        if *other_layout {
            format!(
                ": the checkpoint was written by the other optimizer; set training.optimizer to \"{}\" to resume it",
                if *kind == OptimizerKind::AdamW { "adamw_8bit" } else { "adamw" }
            )
        } else {
            format!(" for training.optimizer \"{}\" (a checkpoint of another run?)", kind.as_str())
        }
    )]
    Missing {
        name: String,
        kind: OptimizerKind,
        other_layout: bool,
    },
    #[error(
        "optimizer state `{name}` is {got}, this run needs {want} (a checkpoint of another run?)"
    )]
    Shape {
        name: String,
        got: String,
        want: String,
    },
}
