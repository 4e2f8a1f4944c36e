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

`--device cpu` runs the same steps on the CPU (f32 unless --dtype says otherwise; memory fields
null), for a smoke test of the script on a machine without a GPU:

    python3 scripts/torch_train_bench.py --device cpu --hidden 64 --layers 2 --heads 4 \
        --intermediate 128 --vocab 1000 --seq 32 --steps 1
"""

import argparse
import json
import sys
import threading
import time

import torch


def sampler(device):
    """Peak device-wide used memory (bytes), sampled on a thread until stopped (None on the CPU)."""
    if device.type != "cuda":
        return lambda: None
    state = {"peak": 0, "stop": False}

    def run():
        while not state["stop"]:
            free, total = torch.cuda.mem_get_info(device)
            state["peak"] = max(state["peak"], total - free)
            time.sleep(0.002)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def stop():
        state["stop"] = True
        thread.join()
        return state["peak"]

    return stop


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, device, dtype):
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
    torch.set_default_dtype(dtype)
    try:
        # Built where it runs: no host copy of 3.8 B parameters.
        with device:
            model = Phi3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model


def quantize_nf4(model, device, compute_dtype=None):
    """The four linears of every layer as bitsandbytes NF4 Linear4bit (double quant, blocksize
    64), computing in compute_dtype (default bf16); scripts/compare_cpu_step.py uses it too."""
    import bitsandbytes as bnb

    compute_dtype = compute_dtype or torch.bfloat16
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
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
            )
            q.weight = bnb.nn.Params4bit(
                lin.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
            )
            # Moving a Params4bit to a device is what quantizes it.
            setattr(parent, name, q.to(device))
            del lin
    if device.type == "cuda":
        torch.cuda.empty_cache()


def lora_training(model, rank, alpha, checkpointing, lr, weight_decay=0.01):
    """PEFT LoRA (dropout 0) on qkv_proj, o_proj, gate_up_proj and down_proj, in training mode,
    with non-reentrant gradient checkpointing if asked, and AdamW over the adapters:
    (peft model, optimizer). scripts/compare_cpu_step.py uses it too."""
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32064)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--nf4", action="store_true", help="bitsandbytes NF4 base")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (a smoke test)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bf16", "f32"],
        help="auto: bf16 on CUDA, f32 on the CPU",
    )
    args = p.parse_args()
    if args.steps < 1:
        p.error("--steps must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        # A clear line instead of a traceback from deep inside torch.
        print(
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device; "
            "use --device cpu for a smoke test",
            file=sys.stderr,
        )
        sys.exit(2)
    dtype_name = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "f32")
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype_name]

    context_used = None
    if device.type == "cuda":
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info(device)
        context_used = total - free
    stop = sampler(device)
    t0 = time.time()
    model = build(args, device, dtype)
    if args.nf4:
        quantize_nf4(model, device)
    model, opt = lora_training(model, args.rank, 2 * args.rank, checkpointing=True, lr=1e-4)
    sync(device)
    build_s = time.time() - t0

    ids = (torch.arange(args.seq, device=device) * 7919 + 13) % args.vocab
    ids = ids.unsqueeze(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s, loss = [], float("nan")
    for step in range(args.warmup + args.steps):
        t = time.time()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        secs = time.time() - t
        loss = out.loss.item()
        print(f"step {step}: {secs:.3f} s, loss {loss:.4f}", flush=True, file=sys.stderr)
        if step >= args.warmup:
            step_s.append(secs)
    peak_used = stop()
    step_s.sort()
    median = step_s[len(step_s) // 2]
    mib = float(1 << 20)
    on_gpu = device.type == "cuda"
    attn = getattr(model.config, "_attn_implementation", "?")
    print(
        json.dumps(
            {
                "impl": "PyTorch + PEFT" + (" + bitsandbytes NF4" if args.nf4 else f" ({dtype_name} base)"),
                "torch": torch.__version__,
                "device": str(device),
                "attention": attn,
                "dtype": dtype_name,
                "seq": args.seq,
                "layers": args.layers,
                "rank": args.rank,
                "build_s": build_s,
                "step_s": step_s,
                "median_step_s": median,
                "tokens_per_s": args.seq / median,
                "loss": loss,
                "max_allocated_mib": torch.cuda.max_memory_allocated(device) / mib if on_gpu else None,
                "max_reserved_mib": torch.cuda.max_memory_reserved(device) / mib if on_gpu else None,
                "peak_used_mib": peak_used / mib if on_gpu else None,
                "context_used_mib": context_used / mib if on_gpu else None,
                "peak_net_mib": (peak_used - context_used) / mib if on_gpu else None,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
