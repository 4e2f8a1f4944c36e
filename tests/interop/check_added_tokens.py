#!/usr/bin/env python3
"""Interop check for `data.add_tokens`: llama.cpp tokenizes the new tokens of a GGUF that `qlora
export` wrote from an adapter with added tokens as one id each, the ids the adapter's own
tokenizer (Hugging Face tokenizers, tokenizer.json beside the adapter) gives, with and without
llama.cpp's special-token parsing.

usage: check_added_tokens.py MODEL.gguf ADAPTER_DIR TOKEN [TOKEN ...]
Deps: ../shared/tools/reference-venv.sh (llama-cpp-python built from source, tokenizers).
Exit 1 on any difference.
"""
import sys

import llama_cpp
from tokenizers import Tokenizer


def main(gguf, adapter, *tokens):
    llm = llama_cpp.Llama(model_path=gguf, vocab_only=True, verbose=False)
    hf = Tokenizer.from_file(f"{adapter}/tokenizer.json")
    ok = True
    for t in tokens:
        want = hf.encode(t, add_special_tokens=False).ids
        texts = [t, f"x{t}y", f"call {t} now"]
        for text in texts:
            h = hf.encode(text, add_special_tokens=False).ids
            for special in (False, True):
                got = llm.tokenize(text.encode(), add_bos=False, special=special)
                same = got == h
                ok &= same
                print(f"{text!r:24} special={special!s:5} llama.cpp {got} {'==' if same else '!='} tokenizers {h}")
        if len(want) != 1:
            print(f"{t!r}: the adapter's tokenizer splits it: {want}")
            ok = False
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
