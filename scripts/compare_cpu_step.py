#!/usr/bin/env python3
"""The reference side of scripts/compare_cpu_step.sh (run with the reference venv's python).

    compare_cpu_step.py make-model DIR   a random Phi-3 of the given shape, bf16 safetensors, with
                                         the real Phi-3 tokenizer (assets/phi3-tokenizer)
    compare_cpu_step.py make-data FILE   chat JSONL whose conversations outrun --seq tokens, so every
                                         row is exactly --seq tokens after truncation
    compare_cpu_step.py torch DIR FILE   QLoRA steps in PyTorch + PEFT + bitsandbytes on the CPU:
                                         NF4 Linear4bit (double quant, blocksize 64, f32 compute) on
                                         the four linears, LoRA r/alpha on the same four, dropout 0,
                                         AdamW over the adapters, one row of --seq tokens per step,
                                         loss on assistant tokens only; one JSON line on stdout

The data is rendered with the tokenizer's own chat template and truncated as qlora does (prompt
tokens untrained), so both sides see the same token ids. Each step is timed from the forward to
after the optimizer step; the JSON has every step's seconds and the median after --warmup.
"""

import argparse
import json
import os
import random
import resource
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "assets", "phi3-tokenizer")

WORDS = (
    "the model learns from data and tokens flow through layers while adapters change slowly "
    "a quiet machine measures steps gradients move weights stay frozen in four bits every block "
    "keeps its input the head projects rows to the vocabulary and the loss falls step by step"
).split()


def shape_args(p):
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--seq", type=int, default=256)


def make_model(a):
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        # A tied head, as the 135M checkpoint of issue 11 (SmolLM-135M in Phi-3 layout) has.
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=32000,
        pad_token_id=32000,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = Phi3ForCausalLM(cfg).to(torch.bfloat16)
    os.makedirs(a.dir, exist_ok=True)
    model.save_pretrained(a.dir, safe_serialization=True)
    for f in os.listdir(TOKENIZER):
        if f != "PROVENANCE.md":
            shutil.copy(os.path.join(TOKENIZER, f), a.dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"{a.dir}: random Phi-3, {n / 1e6:.1f}M parameters, bf16", file=sys.stderr)


def make_data(a):
    rng = random.Random(0)
    with open(a.file, "w") as f:
        for _ in range(a.rows):
            q = " ".join(rng.choice(WORDS) for _ in range(12)) + "?"
            # ~1.3 tokens per word: 2 × seq words outrun seq tokens whatever the prompt.
            ans = " ".join(rng.choice(WORDS) for _ in range(2 * a.seq)) + "."
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]
            f.write(json.dumps({"messages": msgs}) + "\n")


def rows(path, tok, seq):
    """(ids, labels) per conversation: the chat template rendered, truncated to seq tokens, prompt
    tokens (everything before the assistant's content) untrained."""
    out = []
    with open(path) as f:
        for line in f:
            msgs = json.loads(line)["messages"]
            prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(msgs, tokenize=False)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            ids = tok(full, add_special_tokens=False)["input_ids"][:seq]
            assert ids[: len(p_ids)] == p_ids, "the prompt must be a prefix of the conversation"
            labels = [-100] * len(p_ids) + ids[len(p_ids) :]
            out.append((ids, labels[:seq]))
    return out


def torch_steps(a):
    import torch
    from torch_train_bench import lora_training, quantize_nf4  # scripts/ is on sys.path
    from transformers import AutoTokenizer, Phi3ForCausalLM

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.dir)
    data = rows(a.file, tok, a.seq)
    t0 = time.time()
    # f32 compute on the CPU, as qlora's; the linears are quantized from the checkpoint's bf16.
    model = Phi3ForCausalLM.from_pretrained(a.dir, torch_dtype=torch.float32)
    quantize_nf4(model, torch.device("cpu"), torch.float32)
    model, opt = lora_training(model, a.rank, a.alpha, a.checkpointing, lr=2e-4, weight_decay=0.0)
    build_s = time.time() - t0
    step_s, losses, trained = [], [], 0
    for step in range(a.warmup + a.steps):
        ids, labels = data[step % len(data)]
        ids_t = torch.tensor([ids])
        lab_t = torch.tensor([labels])
        t = time.perf_counter()
        out = model(input_ids=ids_t, labels=lab_t)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        secs = time.perf_counter() - t
        losses.append(out.loss.item())
        print(f"torch step {step}: {secs:.3f} s, loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
        if step >= a.warmup:
            step_s.append(secs)
            trained += sum(1 for x in labels[1:] if x != -100)
    med = sorted(step_s)[len(step_s) // 2]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(
        json.dumps(
            {
                "impl": "PyTorch + PEFT + bitsandbytes NF4",
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "checkpointing": a.checkpointing,
                "seq": a.seq,
                "build_s": build_s,
                "step_s": step_s,
                "median_step_s": med,
                "tokens_per_s": a.seq / med,
                "trained_tokens_per_step": trained / len(step_s),
                "losses": losses,
                "peak_rss_mib": peak_mib,
            }
        ),
        flush=True,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("dir")
    shape_args(m)
    d = sub.add_parser("make-data")
    d.add_argument("file")
    d.add_argument("--rows", type=int, default=64)
    d.add_argument("--seq", type=int, default=256)
    t = sub.add_parser("torch")
    t.add_argument("dir")
    t.add_argument("file")
    t.add_argument("--seq", type=int, default=256)
    t.add_argument("--rank", type=int, default=16)
    t.add_argument("--alpha", type=float, default=32.0)
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--warmup", type=int, default=1)
    t.add_argument("--threads", type=int, default=os.cpu_count())
    t.add_argument("--checkpointing", action="store_true")
    a = p.parse_args()
    {"make-model": make_model, "make-data": make_data, "torch": torch_steps}[a.cmd](a)


if __name__ == "__main__":
    main()
