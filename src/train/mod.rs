//! Training: the loss and its LoRA gradients (with per-block gradient checkpointing behind a
//! switch, in [`grads`]).

pub mod grads;

pub use grads::{Batch, LossAndGrads, loss, loss_and_grads};
