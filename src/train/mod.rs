//! Training: the loss and its LoRA gradients (with per-block gradient checkpointing behind a
//! switch, in [`grads`]) and the AdamW optimizer ([`optim`]).

pub mod grads;
pub mod optim;
pub mod trainer;

pub use grads::{Batch, LossAndGrads, loss, loss_and_grads};
