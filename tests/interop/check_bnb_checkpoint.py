#!/usr/bin/env python3
"""Interop check: a checkpoint written by `qlora quantize` loads in transformers + bitsandbytes and
is the model transformers itself would have made.

usage: check_bnb_checkpoint.py DENSE_DIR OURS_DIR
  DENSE_DIR  the dense Phi-3 checkpoint that was quantized
  OURS_DIR   `qlora quantize --model DENSE_DIR --out OURS_DIR` (nf4, double quant)

Loads OURS_DIR with AutoModelForCausalLM (its quantization_config drives bitsandbytes), quantizes
DENSE_DIR with transformers' own load_in_4bit, and compares every 4-bit linear's dequantized weight
and the logits of a fixed prompt. Exit status 1 on any failure. Deps: see
../shared/tools/reference-venv.sh (torch, transformers, bitsandbytes, accelerate).
"""
import sys

import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def main(dense_dir, ours_dir):
    ours = AutoModelForCausalLM.from_pretrained(ours_dir, device_map="cpu")
    cfg = ours.config.quantization_config
    theirs = AutoModelForCausalLM.from_pretrained(
        dense_dir, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=cfg.bnb_4bit_compute_dtype))
    lo, lt = linears(ours), linears(theirs)
    ok = len(lo) == len(lt) and len(lo) > 0
    print(f"4-bit linears: ours {len(lo)}, transformers {len(lt)}")
    worst = 0.0
    for name in lt:
        a = F.dequantize_4bit(lo[name].weight.data, lo[name].weight.quant_state).float()
        b = F.dequantize_4bit(lt[name].weight.data, lt[name].weight.quant_state).float()
        same_codes = torch.equal(lo[name].weight.data, lt[name].weight.data)
        d = (a - b).abs().max().item()
        worst = max(worst, d)
        print(f"  {name}: codes identical {same_codes}, dequantized max|diff| {d:.3e}")
        ok &= same_codes
    ids = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 64]])
    with torch.no_grad():
        lo_ = ours(ids).logits.float()
        lt_ = theirs(ids).logits.float()
    dl = (lo_ - lt_).abs().max().item()
    scale = lt_.abs().max().item()
    print(f"logits max|diff| {dl:.3e} (max|logit| {scale:.3e}); dequantized weights max|diff| {worst:.3e}")
    # With `--match-bnb cpu` on a checkpoint bitsandbytes quantized on the CPU the bytes are equal;
    # with the default `cuda` only the 8-bit absmax codes may round to a neighbour (see
    # quant/src/backend.rs): one absmax step is ≤ 0.7% of a block's scale.
    ok &= dl <= 1e-2 * max(scale, 1.0)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
