//! The Phi-3 model family: configuration and tensor names.

pub mod config;
pub mod names;

pub use config::Phi3Config;
