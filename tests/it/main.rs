//! qlora's integration tests, one binary (link time matters with candle).

mod common;
mod model;
mod quantize;
mod train;
