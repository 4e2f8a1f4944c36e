#!/usr/bin/env python3
"""Real-client check of the GGUF types and model kinds beyond check_llama_cpp.py: llama.cpp
(llama-cpp-python from ../shared/tools/reference-venv.sh) runs what `qlora export` writes for

- the tiny Phi-4-mini-like fixture (tests/fixtures/phi4-mini-tiny: BPE vocabulary, partial rotary,
  tied head, longrope): f32 and f16, whose greedy continuation must equal `qlora generate`'s;
- the 256-wide pattern Phi-3 of tests/fixtures/gen_kquant_goldens.py (rows that k-quants accept):
  q8_0, q6_k, q5_k_m and q4_k_m, each compared with llama.cpp's own run of our f32 export: the first
  step's logits (relative RMS difference, which must shrink as bits grow) and greedy agreement.

usage: check_llama_cpp_models.py QLORA_BIN [N_TOKENS]
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from llama_cpp import Llama

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(os.path.dirname(HERE), "fixtures")
sys.path.insert(0, FIXTURES)


def run(path, prompt_ids, n):
    llm = Llama(model_path=path, n_ctx=256, verbose=False, logits_all=True)
    llm.eval(prompt_ids)
    first = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    out = []
    for _ in range(n):
        tok = llm.sample(temp=0.0, top_k=1)
        out.append(tok)
        llm.eval([tok])
    return first, out


def export(qlora, model, path, ty, *extra):
    subprocess.run([qlora, "export", "--model", model, "--out", path, "--format", "gguf", "--type", ty, *extra],
                   check=True, capture_output=True)


def main(qlora, n=16):
    n = int(n)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        phi4 = os.path.join(FIXTURES, "phi4-mini-tiny")
        out = subprocess.run([qlora, "generate", "--model", phi4, "--prompt", "hello world", "--max-new-tokens",
                              str(n), "--json"], check=True, capture_output=True, text=True)
        ours = json.loads(out.stdout)
        for ty in ["f32", "f16"]:
            path = os.path.join(tmp, f"phi4-{ty}.gguf")
            # The fixture's synthetic vocabulary is in no llama.cpp table: name its pre-tokenizer.
            export(qlora, phi4, path, ty, "--gguf-pre", "gpt-4o")
            _, theirs = run(path, ours["prompt_token_ids"], len(ours["token_ids"]))
            same = theirs == ours["token_ids"]
            print(f"phi4-mini-tiny {ty}: {len(theirs)} greedy tokens, identical to qlora generate: {same}")
            if not same:
                print(f"  qlora    : {ours['token_ids']}\n  llama.cpp: {theirs}")
            ok &= same

        from gen_kquant_goldens import write_pattern_model
        pattern = os.path.join(tmp, "pattern-phi3")
        write_pattern_model(pattern)
        out = subprocess.run([qlora, "generate", "--model", pattern, "--prompt", "What is the capital of France?",
                              "--max-new-tokens", str(n), "--json"], check=True, capture_output=True, text=True)
        ours = json.loads(out.stdout)
        prompt, n = ours["prompt_token_ids"], len(ours["token_ids"])
        ref_path = os.path.join(tmp, "pattern-f32.gguf")
        export(qlora, pattern, ref_path, "f32")
        ref_logits, ref_tokens = run(ref_path, prompt, n)
        same = ref_tokens == ours["token_ids"]
        print(f"pattern-phi3 f32: {n} greedy tokens, identical to qlora generate: {same}")
        ok &= same
        errors = {}
        for ty in ["q8_0", "q6_k", "q5_k_m", "q4_k_m"]:
            path = os.path.join(tmp, f"pattern-{ty}.gguf")
            export(qlora, pattern, path, ty)
            logits, tokens = run(path, prompt, n)
            err = float(np.sqrt(np.mean((logits - ref_logits) ** 2) / np.mean(ref_logits ** 2)))
            agree = sum(a == b for a, b in zip(tokens, ref_tokens))
            errors[ty] = err
            print(f"pattern-phi3 {ty}: runs; first-step logits vs f32: relative RMS {err:.4f}; "
                  f"greedy tokens equal to f32's: {agree}/{n}")
        order = ["q8_0", "q6_k", "q5_k_m", "q4_k_m"]
        monotone = all(errors[a] <= errors[b] for a, b in zip(order, order[1:]))
        print(f"error grows as bits shrink (q8_0 <= q6_k <= q5_k_m <= q4_k_m): {monotone}")
        ok &= monotone and errors["q4_k_m"] < 0.1
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(*sys.argv[1:])
