#!/usr/bin/env python3
"""The reference side of scripts/compare_cpu_dpo.sh (run with the reference venv's python).

    compare_cpu_dpo.py make-pairs FILE   preference JSONL ({"prompt", "chosen", "rejected"} as
                                         messages) whose sequences outrun --seq tokens, so every
                                         row is exactly --seq tokens after keep_start truncation
    compare_cpu_dpo.py trl DIR FILE      DPO steps with TRL's DPOTrainer (loss_type sigmoid, beta
                                         0.1) over PEFT LoRA on a bitsandbytes NF4 base (the four
                                         linears, double quant, blocksize 64, f32 compute), on the
                                         CPU: one pair (2 rows of --seq tokens) per step, the
                                         reference = the adapter off; one JSON line on stdout

Each step is timed by a trainer callback from on_step_begin to on_step_end (forward of both rows,
the reference forward, backward, optimizer); the JSON has every step's seconds and the median after
--warmup. TRL casts the LoRA weights of a 4-bit base to bf16 (its own rule), kept as is: this is
what a TRL user runs.
"""

import argparse
import json
import os
import random
import resource
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from compare_cpu_step import WORDS  # noqa: E402


def make_pairs(a):
    rng = random.Random(0)
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    with open(a.file, "w") as f:
        for _ in range(a.rows):
            # ~1.3 tokens per word: completions of 2 × seq words outrun seq tokens.
            p = [{"role": "user", "content": words(12) + "?"}]
            c = [{"role": "assistant", "content": words(2 * a.seq) + "."}]
            r = [{"role": "assistant", "content": words(2 * a.seq) + "!"}]
            f.write(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n")


def trl_steps(a):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch_train_bench import quantize_nf4
    from transformers import AutoTokenizer, Phi3ForCausalLM, TrainerCallback
    import trl
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.dir)
    pairs = [json.loads(line) for line in open(a.file)]
    t0 = time.time()
    model = Phi3ForCausalLM.from_pretrained(a.dir, torch_dtype=torch.float32)
    quantize_nf4(model, torch.device("cpu"), torch.float32)
    peft_config = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, bias="none",
                             task_type="CAUSAL_LM",
                             target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    args = DPOConfig(
        output_dir=os.path.join(a.work, "trl-out"), per_device_train_batch_size=1,
        gradient_accumulation_steps=1, max_steps=a.warmup + a.steps, learning_rate=2e-4,
        lr_scheduler_type="constant", warmup_steps=0, bf16=False, fp16=False, use_cpu=True,
        max_length=a.seq, truncation_mode="keep_start", beta=0.1, loss_type=["sigmoid"],
        gradient_checkpointing=a.checkpointing, logging_steps=1, save_strategy="no",
        report_to=[], dataloader_num_workers=0, max_grad_norm=1.0, weight_decay=0.0, seed=0,
    )
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)
            print(f"trl step {len(times)}: {times[-1]:.3f} s", file=sys.stderr, flush=True)

    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=tok, peft_config=peft_config, callbacks=[Clock()])
    build_s = time.time() - t0
    trainer.train()
    step_s = times[a.warmup:]
    med = sorted(step_s)[len(step_s) // 2]
    batch = next(iter(trainer.get_train_dataloader()))
    tokens = int(batch["attention_mask"].sum())
    print(json.dumps({
        "impl": "TRL DPOTrainer + PEFT + bitsandbytes NF4", "trl": trl.__version__,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "checkpointing": a.checkpointing, "seq": a.seq, "build_s": build_s, "step_s": step_s,
        "median_step_s": med, "tokens_per_step": tokens, "tokens_per_s": tokens / med,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("make-pairs")
    d.add_argument("file")
    d.add_argument("--rows", type=int, default=16)
    d.add_argument("--seq", type=int, default=256)
    t = sub.add_parser("trl")
    t.add_argument("dir")
    t.add_argument("file")
    t.add_argument("--work", default="/tmp")
    t.add_argument("--seq", type=int, default=256)
    t.add_argument("--rank", type=int, default=16)
    t.add_argument("--alpha", type=float, default=32.0)
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--warmup", type=int, default=1)
    t.add_argument("--threads", type=int, default=os.cpu_count())
    t.add_argument("--checkpointing", action="store_true")
    a = p.parse_args()
    {"make-pairs": make_pairs, "trl": trl_steps}[a.cmd](a)


if __name__ == "__main__":
    main()
