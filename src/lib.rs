//! qlora: fine-tune Phi-3 with QLoRA in one binary.
