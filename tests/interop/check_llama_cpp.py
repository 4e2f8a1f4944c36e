#!/usr/bin/env python3
"""Real-client check: llama.cpp (PyPI's llama-cpp-python, built from source by
../shared/tools/reference-venv.sh) runs the GGUF that `qlora export` writes for a model + adapter,
and its greedy continuation equals `qlora generate`'s.

usage: check_llama_cpp.py QLORA_BIN ADAPTER_DIR PROMPT [N_TOKENS] [TYPES]
  exports ADAPTER_DIR merged into its base as GGUF for each type in TYPES (default "f16"), feeds
  llama.cpp the exact prompt token ids `qlora generate --json` used, decodes N_TOKENS (default 32)
  greedily, and compares token by token with qlora's (dense f32 base). Then the base alone as f32
  GGUF + the adapter as a LoRA GGUF (`--format gguf-lora`), loaded together by llama.cpp, against the
  merged f32 GGUF. Exit 1 on a difference.
"""
import json
import os
import subprocess
import sys
import tempfile

from llama_cpp import Llama


def greedy(prompt_ids, n, **kw):
    llm = Llama(n_ctx=512, verbose=False, **kw)
    llm.eval(prompt_ids)
    out = []
    for _ in range(n):
        tok = llm.sample(temp=0.0, top_k=1)
        out.append(tok)
        llm.eval([tok])
    return out


def main(qlora, adapter, prompt, n=32, types="f16"):
    n = int(n)
    out = subprocess.run([qlora, "generate", "--adapter", adapter, "--prompt", prompt, "--max-new-tokens", str(n),
                          "--json"], check=True, capture_output=True, text=True)
    ours = json.loads(out.stdout)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for ty in types.split(","):
            path = os.path.join(tmp, f"merged-{ty}.gguf")
            subprocess.run([qlora, "export", "--adapter", adapter, "--out", path, "--format", "gguf", "--type", ty],
                           check=True, capture_output=True)
            theirs = greedy(ours["prompt_token_ids"], len(ours["token_ids"]), model_path=path)
            same = theirs == ours["token_ids"]
            print(f"{ty}: {len(ours['token_ids'])} greedy tokens, identical: {same}")
            if not same:
                print(f"  qlora    : {ours['token_ids']}\n  llama.cpp: {theirs}")
            ok &= same
        base = json.load(open(os.path.join(adapter, "adapter_config.json")))["base_model_name_or_path"]
        paths = {k: os.path.join(tmp, f"{k}.gguf") for k in ["base", "lora", "merged"]}
        subprocess.run([qlora, "export", "--model", base, "--out", paths["base"], "--format", "gguf", "--type", "f32"], check=True, capture_output=True)
        subprocess.run([qlora, "export", "--adapter", adapter, "--out", paths["lora"], "--format", "gguf-lora", "--type", "f32"], check=True, capture_output=True)
        subprocess.run([qlora, "export", "--adapter", adapter, "--out", paths["merged"], "--format", "gguf", "--type", "f32"], check=True, capture_output=True)
        merged = greedy(ours["prompt_token_ids"], n, model_path=paths["merged"])
        with_lora = greedy(ours["prompt_token_ids"], n, model_path=paths["base"], lora_path=paths["lora"])
        same = merged == with_lora
        print(f"base f32 GGUF + LoRA GGUF vs merged f32 GGUF: {n} greedy tokens, identical: {same}")
        ok &= same
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
