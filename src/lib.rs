//! qlora: fine-tune Phi-3 with QLoRA in one binary: NF4 base weights byte-identical to
//! bitsandbytes (crate `qlora-quant`), LoRA adapters in PEFT format, exports to safetensors and GGUF.
//!
//! - [`checkpoint`]: Hugging Face checkpoint dirs (config.json, safetensors shards) read and write.
//! - [`model`]: Phi-3 configuration and the tensor-name tables.
//! - [`data`]: chat JSONL, the chat template, tokenization with trained-token masks, packing.
//! - [`lora`]: LoRA adapters, their PEFT files.
//! - [`quantize`]: `qlora quantize`, a dense checkpoint into a bitsandbytes-4bit one.
//! - [`train`]: the loss and LoRA gradients (gradient checkpointing).
//! - [`export`]: the adapter merged into its base (safetensors).
//! - [`verify`]: `qlora verify`, an export against the model it came from.
//! - [`plan`]: `qlora plan`, a training run's peak memory predicted term by term before loading.
//! - [`fsx`]: atomic writes (temp file or dir, then rename), every artifact byte through one door
//!   ([`fsx::disk`]: a full disk or read-only output named with the bytes needed, fault injection).
//! - [`pathsafe`]: names from outside (Hub file lists, shard indexes) joined under a root, or refused.
//! - [`spill`]: writing a safetensors shard tensor by tensor when sizes are known only once encoded.
//! - [`config`], [`hub`], [`builtin`], [`plot`]: `qlora train`'s settings, model resolution, the
//!   built-in tiny model and the loss plot.
//! - [`device`]: `--device` / `--dtype` resolution (CPU or CUDA) and peak device memory.
//! - [`cli`]: the command line.

pub mod builtin;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod dist;
pub mod export;
pub mod fsx;
pub mod hub;
pub mod lora;
pub mod memstat;
pub mod model;
pub mod pathsafe;
pub mod plan;
pub mod plot;
pub mod quantize;
pub mod spill;
pub mod train;
pub mod verify;
