#!/usr/bin/env python3
"""Side by side, in one run: qlora's data tokenization (`qlora data prepare`, into its cache on
disk) against `datasets`' (load_dataset, then map(apply_chat_template + tokenize, num_proc=2),
as TRL's SFTTrainer prepares chat data, into its Arrow cache on disk), on the same file with the
same tokenizer and chat template. Each side runs as its own process tree,
sampled every 50 ms for its resident memory (the sum over the tree: pool workers included; shared
pages count in each process, so a tree's sum can overstate it) and timed from start to exit.

usage: compare_data_encode.py QLORA_BIN DATA_FILE TOKENIZER_DIR [RUNS]
       python -m datasets must be importable (the reference venv: ../shared/tools/reference-venv.sh)

Prints a table of wall seconds, conversations/s, input tokens/s and peak RSS per side and run,
then the medians and the ratios (qlora / datasets).
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

REFERENCE = r'''
import sys, time
import datasets
from transformers import AutoTokenizer
path, tok_dir, nproc = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(tok_dir)
kind = "parquet" if path.endswith(".parquet") else "json"
t0 = time.time()
ds = datasets.load_dataset(kind, data_files=path, split="train")
t1 = time.time()
def encode(ex):
    text = tok.apply_chat_template(ex["messages"], tokenize=False)
    return tok(text, add_special_tokens=False)
out = ds.map(encode, num_proc=nproc, remove_columns=ds.column_names)
t2 = time.time()
import pyarrow.compute as pc
tokens = pc.sum(pc.list_value_length(out.data.column("input_ids"))).as_py()
print(f"reference: {len(out)} conversations, {tokens} tokens; load {t1-t0:.1f} s, map {t2-t1:.1f} s")
print(f"TOKENS {tokens}")
'''


def measure(cmd, env):
    """Runs cmd; returns (seconds, peak tree RSS bytes, stdout)."""
    t0 = time.time()
    # Output goes to files, not pipes: a progress bar filling an unread pipe would stall the child.
    out_f, err_f = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    p = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True, env=env)
    root = psutil.Process(p.pid)
    peak = 0
    while p.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
            rss = 0
            for q in procs:
                try:
                    rss += q.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    secs = time.time() - t0
    out_f.seek(0)
    err_f.seek(0)
    out, err = out_f.read(), err_f.read()[-4000:]
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed ({p.returncode}):\n{out}\n{err}")
    return secs, peak, out


def main():
    qlora, data, tok_dir = sys.argv[1:4]
    runs = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    n = sum(1 for _ in open(data)) if not data.endswith(".parquet") else None
    rows = {"qlora": [], "datasets": []}
    for r in range(runs):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, HF_DATASETS_CACHE=cache, HF_HUB_OFFLINE="1",
                       TOKENIZERS_PARALLELISM="false")
            secs, peak, out = measure(
                [sys.executable, "-c", REFERENCE, data, tok_dir, "2"], env)
            tokens = int(out.split("TOKENS ")[1].split()[0])
            rows["datasets"].append((secs, peak, tokens))
            print(f"run {r}: datasets {secs:.1f} s, peak RSS {peak / 2**20:.0f} MiB, {tokens} tokens"
                  f" ({out.splitlines()[0]})", flush=True)
        # Into qlora's cache on disk, as datasets writes its Arrow cache (a fresh one each run).
        with tempfile.TemporaryDirectory() as cache:
            secs, peak, out = measure(
                [qlora, "data", "prepare", "--data", data, "--model", tok_dir],
                dict(os.environ, XDG_CACHE_HOME=cache))
        tokens = int(out.split(" tokens (")[0].rsplit(" ", 1)[1])
        rows["qlora"].append((secs, peak, tokens))
        print(f"run {r}: qlora    {secs:.1f} s, peak RSS {peak / 2**20:.0f} MiB, {tokens} tokens"
              f" ({out.splitlines()[1]})", flush=True)
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v), v[0][2])
           for k, v in rows.items()}
    print()
    print(f"{'':10} {'seconds':>9} {'tokens/s':>12} {'peak RSS MiB':>13}")
    for k, (s, m, t) in med.items():
        print(f"{k:10} {s:9.1f} {t / s:12.0f} {m / 2**20:13.0f}")
    q, d = med["qlora"], med["datasets"]
    print(f"qlora is {d[0] / q[0]:.2f}x faster at {q[1] / d[1]:.2f}x the memory "
          f"(medians of {runs}; tokens: qlora {q[2]}, datasets {d[2]})")


if __name__ == "__main__":
    main()
