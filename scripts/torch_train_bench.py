#!/usr/bin/env python3
"""The PyTorch side of scripts/gpu_check.sh: the workload of examples/train_bench.rs in
transformers + PEFT, for a side-by-side ratio. A Phi-3 of the given shape, random init, bf16 on the
GPU; LoRA r=16 (alpha 32, no dropout) on qkv_proj, o_proj, gate_up_proj and down_proj; gradient
checkpointing (non-reentrant); one sequence per step of loss + backward + AdamW over the adapters.
`--nf4` quantizes the four linears of every layer with bitsandbytes' Linear4bit (NF4, double
quant, blocksize 64, bf16 compute): QLoRA as PEFT users run it. Attention is transformers' default
(SDPA, which picks flash attention for bf16 on Hopper).

Prints one JSON line: tokens/s (median over the timed steps), peak memory as
torch.cuda.max_memory_allocated / max_memory_reserved, and the device's used memory (total - free,
sampled every 2 ms on a thread; context included) as the Rust side reports it.
"""

import argparse
import json
import sys
import threading
import time

import torch


def sampler():
    """Peak device-wide used memory (bytes), sampled on a thread until stopped."""
    state = {"peak": 0, "stop": False}

    def run():
        while not state["stop"]:
            free, total = torch.cuda.mem_get_info()
            state["peak"] = max(state["peak"], total - free)
            time.sleep(0.002)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def stop():
        state["stop"] = True
        thread.join()
        return state["peak"]

    return stop


def build(args):
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(4096, args.seq),
        original_max_position_embeddings=max(4096, args.seq),
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Phi3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model


def quantize_nf4(model):
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent, name in [
            (layer.self_attn, "qkv_proj"),
            (layer.self_attn, "o_proj"),
            (layer.mlp, "gate_up_proj"),
            (layer.mlp, "down_proj"),
        ]:
            lin = getattr(parent, name)
            q = bnb.nn.Linear4bit(
                lin.in_features,
                lin.out_features,
                bias=False,
                compute_dtype=torch.bfloat16,
                compress_statistics=True,
                quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(
                lin.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
            )
            setattr(parent, name, q.cuda())
            del lin
    torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32064)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--nf4", action="store_true")
    args = p.parse_args()

    from peft import LoraConfig, get_peft_model

    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    context_used = total - free
    stop = sampler()
    t0 = time.time()
    model = build(args)
    if args.nf4:
        quantize_nf4(model)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    torch.cuda.synchronize()
    build_s = time.time() - t0

    ids = (torch.arange(args.seq, device="cuda") * 7919 + 13) % args.vocab
    ids = ids.unsqueeze(0)
    torch.cuda.reset_peak_memory_stats()
    step_s, loss = [], float("nan")
    for step in range(args.warmup + args.steps):
        t = time.time()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        secs = time.time() - t
        loss = out.loss.item()
        print(f"step {step}: {secs:.3f} s, loss {loss:.4f}", flush=True, file=sys.stderr)
        if step >= args.warmup:
            step_s.append(secs)
    peak_used = stop()
    step_s.sort()
    median = step_s[len(step_s) // 2]
    mib = float(1 << 20)
    attn = getattr(model.config, "_attn_implementation", "?")
    print(
        json.dumps(
            {
                "impl": "PyTorch + PEFT" + (" + bitsandbytes NF4" if args.nf4 else " (bf16 base)"),
                "torch": torch.__version__,
                "attention": attn,
                "dtype": "bf16",
                "seq": args.seq,
                "layers": args.layers,
                "rank": args.rank,
                "build_s": build_s,
                "step_s": step_s,
                "median_step_s": median,
                "tokens_per_s": args.seq / median,
                "loss": loss,
                "max_allocated_mib": torch.cuda.max_memory_allocated() / mib,
                "max_reserved_mib": torch.cuda.max_memory_reserved() / mib,
                "peak_used_mib": peak_used / mib,
                "context_used_mib": context_used / mib,
                "peak_net_mib": (peak_used - context_used) / mib,
            }
        )
    )


if __name__ == "__main__":
    main()
