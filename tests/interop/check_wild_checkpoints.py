#!/usr/bin/env python3
"""Real-client check of the Phi checkpoints found in the wild, end to end: for each kind, a tiny
checkpoint is made by the real tools in its real config layout, `qlora train --4bit` trains on it,
and what qlora writes is loaded by the clients users run:

- llamafied-bnb: Unsloth's re-upload layout (`unsloth/Phi-3-mini-4k-instruct-bnb-4bit`):
  the built-in Phi-3 split into a LlamaForCausalLM (q/k/v, gate/up apart) by transformers, then
  loaded with BitsAndBytesConfig(load_in_4bit, nf4, double quant) and saved with save_pretrained;
- medium: Phi-3-medium's 40 heads / 10 kv heads (Phi3ForCausalLM, the Phi-3 tokenizer);
- phi4: microsoft/phi-4's traits: the cl100k vocabulary (tests/fixtures/bpe/cl100k plus Phi-4's
  <|im_sep|>), 100,352 rows, rope theta 250,000, its <|im_start|>…<|im_sep|>…<|im_end|> template;
- phi35: Phi-3.5-mini-instruct's longrope (128k positions, 4k original, short/long factors);
- phi4-mini: tests/fixtures/phi4-mini-tiny (BPE, partial rotary 0.75, tied head, longrope); its
  synthetic vocabulary is in no llama.cpp table, so its GGUFs are written with --gguf-pre gpt-4o.

For each: (1) PEFT loads the trained adapter onto the checkpoint as-is (every key used) and its
logits equal transformers' logits of qlora's merged f32 export (max |Δ| ≤ 1e-4); (2) llama.cpp runs
qlora's merged f32 GGUF and its greedy continuation equals `qlora generate`'s; (3) llama.cpp
applies qlora's LoRA GGUF on qlora's base GGUF with the same greedy continuation. For
llamafied-bnb also (4): `qlora export --format peft --fuse` loads in PEFT onto the fused (Microsoft
layout) checkpoint that `qlora export --fuse` writes, with the logits of (1).

usage: check_wild_checkpoints.py QLORA_BIN [N_TOKENS]   (reference venv; about a minute)
"""
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from llama_cpp import Llama
from peft import PeftModel
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM,
                          Phi3Config, Phi3ForCausalLM)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PROMPT = "What is the capital of France?"
PHI4_TEMPLATE = ("{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + "
                 "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + "
                 "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>' + "
                 "message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}")


def q(qlora, *args):
    r = subprocess.run([qlora, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"qlora {' '.join(args)} failed:\n{r.stderr}")
    return r.stdout


def copy_tokenizer(src, dst):
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "generation_config.json"]:
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))


def randomize(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape) if name.endswith("norm.weight") else 0.05 * torch.randn(p.shape))
    return model


def make_llamafied_bnb(qlora, tmp):
    phi = os.path.join(tmp, "builtin")
    q(qlora, "export", "--model", "builtin:tiny-phi3", "--out", phi, "--format", "safetensors", "--dtype", "f32")
    src = AutoModelForCausalLM.from_pretrained(phi, dtype=torch.float32)
    pc = src.config
    cfg = LlamaConfig(vocab_size=pc.vocab_size, hidden_size=pc.hidden_size, intermediate_size=pc.intermediate_size,
                      num_hidden_layers=pc.num_hidden_layers, num_attention_heads=pc.num_attention_heads,
                      num_key_value_heads=pc.num_key_value_heads, max_position_embeddings=pc.max_position_embeddings,
                      rms_norm_eps=pc.rms_norm_eps, tie_word_embeddings=False, bos_token_id=pc.bos_token_id,
                      eos_token_id=pc.eos_token_id, pad_token_id=pc.pad_token_id, hidden_act="silu",
                      attention_bias=False, mlp_bias=False, pretraining_tp=1,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    llama = LlamaForCausalLM(cfg)
    hd = pc.hidden_size // pc.num_attention_heads
    nq, nkv, i = pc.num_attention_heads * hd, pc.num_key_value_heads * hd, pc.intermediate_size
    sd = {}
    for k, v in src.state_dict().items():
        if k.endswith("qkv_proj.weight"):
            p = k[: -len("qkv_proj.weight")]
            sd[p + "q_proj.weight"], sd[p + "k_proj.weight"], sd[p + "v_proj.weight"] = v[:nq], v[nq:nq + nkv], v[nq + nkv:]
        elif k.endswith("gate_up_proj.weight"):
            p = k[: -len("gate_up_proj.weight")]
            sd[p + "gate_proj.weight"], sd[p + "up_proj.weight"] = v[:i], v[i:]
        else:
            sd[k] = v
    llama.load_state_dict(sd, strict=True)
    dense = os.path.join(tmp, "llamafied")
    llama.save_pretrained(dense)
    copy_tokenizer(phi, dense)
    bnb = AutoModelForCausalLM.from_pretrained(
        dense, device_map="cpu", dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.float32))
    out = os.path.join(tmp, "llamafied-bnb")
    bnb.save_pretrained(out)
    copy_tokenizer(phi, out)
    return out, phi


def make_medium(qlora, tmp, phi):
    cfg = Phi3Config(vocab_size=32064, hidden_size=160, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=40, num_key_value_heads=10, max_position_embeddings=4096,
                     original_max_position_embeddings=4096, sliding_window=2047, tie_word_embeddings=False,
                     bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    out = os.path.join(tmp, "medium")
    randomize(Phi3ForCausalLM(cfg), 7).save_pretrained(out)
    copy_tokenizer(phi, out)
    return out


def make_phi4(tmp):
    cfg = Phi3Config(vocab_size=100352, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=16384,
                     original_max_position_embeddings=16384, sliding_window=None, tie_word_embeddings=False,
                     bos_token_id=100257, eos_token_id=100265, pad_token_id=100349,
                     rope_parameters={"rope_type": "default", "rope_theta": 250000.0})
    out = os.path.join(tmp, "phi4")
    randomize(Phi3ForCausalLM(cfg), 8).save_pretrained(out)
    tj = json.load(open(os.path.join(REPO, "tests/fixtures/bpe/cl100k/tokenizer.json")))
    tj["added_tokens"].append({"id": 100266, "content": "<|im_sep|>", "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": True})
    tj["model"]["vocab"]["<|im_sep|>"] = 100266  # as the other added tokens are (else it is renumbered)
    json.dump(tj, open(os.path.join(out, "tokenizer.json"), "w"))
    json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
               "model_max_length": 16384, "tokenizer_class": "GPT2Tokenizer", "chat_template": PHI4_TEMPLATE},
              open(os.path.join(out, "tokenizer_config.json"), "w"))
    return out


def make_phi35(tmp, phi):
    hd = 32
    short = [1.0 + 0.03 * i for i in range(hd // 2)]
    long = [1.0 + 0.4 * i for i in range(hd // 2)]
    cfg = Phi3Config(vocab_size=32064, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=131072,
                     original_max_position_embeddings=4096, sliding_window=262144, tie_word_embeddings=False,
                     bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
                     rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                      "short_factor": short, "long_factor": long})
    out = os.path.join(tmp, "phi35")
    randomize(Phi3ForCausalLM(cfg), 9).save_pretrained(out)
    copy_tokenizer(phi, out)
    return out


def llama_greedy(path, prompt_ids, n, lora=None):
    kw = {"lora_path": lora} if lora else {}
    llm = Llama(model_path=path, n_ctx=256, verbose=False, **kw)
    llm.eval(prompt_ids)
    out = []
    for _ in range(n):
        tok = llm.sample(temp=0.0, top_k=1)
        out.append(tok)
        llm.eval([tok])
    return out


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits.float()


def check(qlora, name, model, tmp, n, gguf_args=()):
    ok = True
    run = os.path.join(tmp, f"run-{name}")
    q(qlora, "train", "--4bit", "--model", model, "--data", os.path.join(REPO, "data/demo/train.jsonl"),
      "--output", run, "--max-steps", "4", "--lr", "0.01", "--max-seq-len", "128")
    adapter = os.path.join(run, "adapter")
    ours = json.loads(q(qlora, "generate", "--model", model, "--adapter", adapter, "--prompt", PROMPT,
                        "--max-new-tokens", str(n), "--json"))
    ids = torch.tensor([ours["prompt_token_ids"]])
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, device_map="cpu")
    for m in base.modules():  # bitsandbytes' portable CPU path (see gen_phi3_goldens.py)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    n_file = len(load_file(os.path.join(adapter, "adapter_model.safetensors")))
    pm = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    n_loaded = sum(1 for k, _ in pm.named_parameters() if "lora_" in k)
    peft_logits = logits(pm, ids)
    merged = os.path.join(tmp, f"merged-{name}")
    q(qlora, "export", "--model", model, "--adapter", adapter, "--out", merged, "--format", "safetensors", "--dtype", "f32")
    d = (logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), ids) - peft_logits).abs().max().item()
    good = n_loaded == n_file and d <= 1e-4
    print(f"{name}: PEFT loaded {n_loaded}/{n_file} LoRA tensors as-is; qlora merged vs PEFT max |Δlogits| = {d:.2e}: "
          f"{'ok' if good else 'FAILED'}")
    ok &= good

    gguf, base_gguf, lora_gguf = (os.path.join(tmp, f"{name}-{k}.gguf") for k in ("merged", "base", "lora"))
    q(qlora, "export", "--model", model, "--adapter", adapter, "--out", gguf, "--format", "gguf", "--type", "f32",
      *gguf_args)
    q(qlora, "export", "--model", model, "--out", base_gguf, "--format", "gguf", "--type", "f32", *gguf_args)
    q(qlora, "export", "--model", model, "--adapter", adapter, "--out", lora_gguf, "--format", "gguf-lora", "--type", "f32")
    want = ours["token_ids"]
    got = llama_greedy(gguf, ours["prompt_token_ids"], len(want))
    got_lora = llama_greedy(base_gguf, ours["prompt_token_ids"], len(want), lora=lora_gguf)
    good = got == want and got_lora == want
    print(f"{name}: llama.cpp greedy on merged GGUF == qlora generate: {got == want}; "
          f"base GGUF + LoRA GGUF: {got_lora == want}")
    if not good:
        print(f"  qlora: {want}\n  gguf : {got}\n  lora : {got_lora}")
    ok &= good

    if name == "llamafied-bnb":
        fused_adapter, fused_base = os.path.join(tmp, "fused-adapter"), os.path.join(tmp, "fused-base")
        q(qlora, "export", "--model", model, "--adapter", adapter, "--out", fused_adapter, "--format", "peft", "--fuse")
        q(qlora, "export", "--model", model, "--out", fused_base, "--format", "safetensors", "--dtype", "f32", "--fuse")
        fb = AutoModelForCausalLM.from_pretrained(fused_base, dtype=torch.float32)
        assert type(fb).__name__ == "Phi3ForCausalLM", type(fb)
        fpm = PeftModel.from_pretrained(fb, fused_adapter).eval()
        cfg = json.load(open(os.path.join(fused_adapter, "adapter_config.json")))
        d = (logits(fpm, ids) - peft_logits).abs().max().item()
        good = d <= 1e-4
        print(f"{name}: fused adapter (r={cfg['r']}, alpha={cfg['lora_alpha']}, {sorted(cfg['target_modules'])}) "
              f"on the fused Phi3ForCausalLM vs the split adapter on the 4-bit Llama: max |Δlogits| = {d:.2e}: "
              f"{'ok' if good else 'FAILED'}")
        ok &= good
    return ok


def main(qlora, n=16):
    n = int(n)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        llamafied, phi = make_llamafied_bnb(qlora, tmp)
        for name, model, gguf_args in [
            ("llamafied-bnb", llamafied, ()),
            ("medium", make_medium(qlora, tmp, phi), ()),
            ("phi4", make_phi4(tmp), ()),
            ("phi35", make_phi35(tmp, phi), ()),
            ("phi4-mini", os.path.join(REPO, "tests/fixtures/phi4-mini-tiny"), ("--gguf-pre", "gpt-4o")),
        ]:
            ok &= check(qlora, name, model, tmp, n, gguf_args)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
