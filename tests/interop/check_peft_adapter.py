#!/usr/bin/env python3
"""Interop check: an adapter written by `qlora train` loads in Hugging Face PEFT as-is and gives the
same greedy continuation as `qlora generate`.

usage: check_peft_adapter.py QLORA_BIN ADAPTER_DIR PROMPT [N_TOKENS]
Loads the adapter's base_model_name_or_path with transformers (f32, eager attention), applies the
adapter with PeftModel.from_pretrained (failing on any missing or unexpected key), greedily decodes
N_TOKENS (default 16) from the prompt ids that `qlora generate --json` reports, and compares them
with qlora's tokens (dense f32 base, so both sides run the same weights). Then `qlora export
--format safetensors --dtype f32` of the same adapter, loaded by transformers, against PEFT's
logits for those prompt ids: max |Δ| ≤ 1e-4, or 1e-6 of the largest logit when that is bigger. Exit 1 on any difference. Deps: ../shared/tools/reference-venv.sh (torch, transformers, peft).
"""
import json
import os
import subprocess
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main(qlora, adapter, prompt, n=16):
    n = int(n)
    cfg = json.load(open(f"{adapter}/adapter_config.json"))
    base_dir = cfg["base_model_name_or_path"]
    out = subprocess.run([qlora, "generate", "--adapter", adapter, "--prompt", prompt,
                          "--max-new-tokens", str(n), "--json"], check=True, capture_output=True, text=True)
    ours = json.loads(out.stdout)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, adapter, is_trainable=False).eval()
    missing = [k for k, _ in model.named_parameters() if "lora_" in k]
    print(f"PEFT loaded {len(missing)} LoRA tensors from {adapter} (base {base_dir})")
    ids = torch.tensor([ours["prompt_token_ids"]])
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=n, do_sample=False,
                             eos_token_id=[32000, 32001, 32007], pad_token_id=32000)
    theirs = gen[0, ids.shape[1]:].tolist()
    theirs = [t for t in theirs if t not in (32000, 32001, 32007)][: len(ours["token_ids"])]
    print(f"qlora : {ours['token_ids']}\nPEFT  : {theirs}")
    ok = theirs == ours["token_ids"]
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        merged_dir = os.path.join(tmp, "merged")
        subprocess.run([qlora, "export", "--adapter", adapter, "--out", merged_dir, "--format", "safetensors",
                        "--dtype", "f32"], check=True, capture_output=True)
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, attn_implementation="eager")
        with torch.no_grad():
            want = model(ids).logits
            d = (merged(ids).logits - want).abs().max().item()
    # f32 rounding of a merge grows with the logits: 1e-4, or 1e-6 of the largest logit when that
    # is bigger (PEFT's own merge_and_unload of a trained head copy, logits up to 1842, moved them
    # by 7.3e-4).
    bound = max(1e-4, 1e-6 * want.abs().max().item())
    print(f"transformers(qlora's merged export) vs PEFT(base + adapter): max |Δlogits| = {d:.2e} "
          f"(bound {bound:.1e})")
    ok &= d <= bound
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
