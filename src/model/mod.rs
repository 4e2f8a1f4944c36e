//! The Phi-3 model family: configuration, tensor names, the model itself and its loading.

pub mod config;
pub mod gguf;
pub mod linear;
pub mod load;
pub mod names;
pub mod phi3;
pub mod random;
pub mod rope;

pub use config::Phi3Config;
pub use phi3::{FusedAttention, OpPath, Phi3};
