//! qlora's integration tests, one binary (link time matters with candle).

mod cli;
mod common;
mod data;
mod diskfull;
mod dora;
mod export;
mod fused_model;
mod fuzz;
mod gguf;
mod gguf_bpe;
mod gguf_phi4;
mod gpu;
mod hub;
mod hub_hostile;
mod kquant;
mod model;
mod optim8;
mod optim8_train;
mod plan;
mod preempt;
mod quantize;
mod train;
mod trainer;
mod verify;
mod verify_gguf;
mod wild;
