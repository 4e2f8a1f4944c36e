//! Training: the objectives ([`objective`]: SFT, DPO, IPO, ORPO, SimPO), the loss and its LoRA gradients (with per-block gradient checkpointing behind a
//! switch, in [`grads`]), the AdamW optimizer ([`optim`]) and bitsandbytes' 8-bit AdamW
//! ([`optim8`]), the loop ([`trainer`]) and its clean stop on a signal ([`stop`]).

mod build;
pub mod grads;
pub mod objective;
pub mod optim;
pub mod optim8;
pub mod policy;
pub mod ranks;
pub mod stop;
pub mod trainer;

pub use grads::{Batch, LossAndGrads, loss, loss_and_grads};
