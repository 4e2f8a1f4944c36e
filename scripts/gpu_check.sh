#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU, the CUDA 13 driver and a PyTorch install (with
# its CUDA 13 libraries, transformers and peft) but no Rust and no network. It runs, in a copy of
# this repository holding gpu-artifacts/ from scripts/build_gpu_artifacts.sh, in at most ~9 min:
#   (a) qlora-quant's per-device tests on the GPU (dequantization bit-identical to the CPU
#       reference, the 4-bit matmul forward/backward, the fused ops against their compositions,
#       dropout masks) and qlora's (tests/it/gpu.rs: the model against transformers' logits in
#       f32/bf16, its LoRA gradients against the CPU's, training against the CPU curve, resume);
#   (a') `qlora train --4bit --config configs/demo.toml --device cuda` and `qlora eval` on the GPU;
#   (b) the dequantization kernel's GB/s against a device-to-device copy, and each fused op's
#       forward + backward time against the candle composition it replaces (quant/examples/kernel_bench);
#   (c) QLoRA training steps of a Phi-3-mini-shaped random model (hidden 3072, 32 layers, 32 heads,
#       intermediate 8192, vocab 32064; seq 2048, batch 1, r=16 on all four targets, gradient
#       checkpointing, bf16 compute, NF4 base): tokens/s and peak GPU memory (examples/train_bench);
#   (d) the same workload in PyTorch + PEFT (bf16 base; and bitsandbytes NF4 if it imports), with
#       the ratio, in a summary table;
#   (e) if time is left, (c) with the streaming attention kernel instead of blocked attention.
# Results (logs, JSON lines, summary.txt) go to $OUT (default gpu-results/).
#
# usage: scripts/gpu_check.sh [--quick]   (--quick: a 4-layer model, for a first smoke run)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
LAYERS=32
[ "${1:-}" = "--quick" ] && LAYERS=4
BUDGET_S=540
SECONDS=0
say() { echo "=== $* (t=${SECONDS}s)"; }
left() { echo $(( BUDGET_S - SECONDS )); }
# Seconds for a stage: at most $1, leaving $2 for the stages after it (at least 10).
cap() { local t=$(( $(left) - $2 )); (( t > $1 )) && t=$1; (( t < 10 )) && t=10; echo "$t"; }

# --- Python with torch, and the CUDA libraries of its install -----------------------------------
PY=""
for cand in "${PYTHON:-}" python3 python /opt/*/.venv/bin/python /opt/*/venv/bin/python /opt/conda/bin/python; do
  [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 || continue
  if "$cand" -c "import torch" >/dev/null 2>&1; then PY="$cand"; break; fi
done
[ -n "$PY" ] || { echo "no python with torch found (set PYTHON)"; exit 2; }
LIBS=$("$PY" - <<'EOF'
import glob, os, site, sys
import torch
roots = set(site.getsitepackages() + [site.getusersitepackages(), os.path.dirname(os.path.dirname(torch.__file__))])
dirs = []
for r in sorted(roots):
    dirs += sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib")))
dirs.append(os.path.join(os.path.dirname(torch.__file__), "lib"))
print(":".join(d for d in dirs if os.path.isdir(d)))
EOF
)
for d in /usr/lib/x86_64-linux-gnu /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib64 /usr/local/cuda/compat; do
  [ -e "$d/libcuda.so.1" ] && LIBS="$LIBS:$d"
done
export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

say "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi unavailable"
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

# --- the binaries --------------------------------------------------------------------------------
BIN=$(mktemp -d)
trap 'rm -rf "$BIN"' EXIT
if command -v xz >/dev/null 2>&1; then
  tar -C "$BIN" -xJf gpu-artifacts/bundle.tar.xz
else
  "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" gpu-artifacts/bundle.tar.xz "$BIN"
fi
cat "$BIN/MANIFEST"
missing=$(for b in "$BIN"/qlora "$BIN"/train_bench "$BIN"/kernel_bench "$BIN"/quant-it; do ldd "$b" | grep "not found"; done | sort -u)
if [ -n "$missing" ]; then
  echo "unresolved libraries (LD_LIBRARY_PATH=$LD_LIBRARY_PATH):"; echo "$missing"
fi

# --- (a) tests -----------------------------------------------------------------------------------
say "(a) per-device tests on the GPU"
export QLORA_REPO_DIR="$PWD"   # the test binaries read the committed fixtures from here
timeout "$(cap 100 420)" "$BIN/quant-it" devices:: fused:: dropout:: --test-threads 4 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
timeout "$(cap 80 360)" "$BIN/qlora-it" gpu:: --test-threads 1 2>&1 | tee -a "$OUT/tests.log"
rc=${PIPESTATUS[0]}; [ "$tests_rc" -eq 0 ] && tests_rc=$rc
grep -q "skipped: no CUDA device" "$OUT/tests.log" && echo "WARNING: the tests did not find the GPU"

say "(a') qlora train on the demo config, on the GPU (bf16), then eval"
timeout "$(cap 60 330)" "$BIN/qlora" train --4bit --config configs/demo.toml --device cuda \
  --output "$OUT/demo-cuda" 2>&1 | tail -4 | tee "$OUT/demo_cuda.txt"
timeout "$(cap 30 320)" "$BIN/qlora" eval --adapter "$OUT/demo-cuda/adapter" --4bit --device cuda \
  --data data/demo/eval.jsonl 2>&1 | tail -2 | tee -a "$OUT/demo_cuda.txt"
rm -rf "$OUT/demo-cuda/checkpoints"

# --- (b) dequantization bandwidth ----------------------------------------------------------------
say "(b) dequantization bandwidth vs device-to-device copy; fused ops vs compositions"
timeout "$(cap 90 320)" "$BIN/kernel_bench" | tee "$OUT/kernel_bench.txt"

# --- (c) our training steps ----------------------------------------------------------------------
model=(--hidden 3072 --layers "$LAYERS" --heads 32 --intermediate 8192 --vocab 32064 --seq 2048 --rank 16 --warmup 1)
shape=("${model[@]}" --steps 3)
say "(c) qlora QLoRA steps (NF4 base, bf16, checkpointing, blocked attention)"
timeout "$(cap 200 150)" "$BIN/train_bench" --device cuda --dtype bf16 --ops blocked "${shape[@]}" 2> "$OUT/train_bench.err" | tee "$OUT/train_bench.json"
tail -5 "$OUT/train_bench.err"

# --- (d) PyTorch + PEFT --------------------------------------------------------------------------
say "(d) PyTorch + PEFT, bf16 base"
timeout "$(cap 150 10)" "$PY" scripts/torch_train_bench.py "${shape[@]}" 2> "$OUT/torch.err" | tee "$OUT/torch.json"
tail -5 "$OUT/torch.err"
if "$PY" -c "import bitsandbytes" >/dev/null 2>&1 && [ "$(left)" -gt 100 ]; then
  say "(d') PyTorch + PEFT + bitsandbytes NF4"
  timeout "$(cap 150 15)" "$PY" scripts/torch_train_bench.py "${shape[@]}" --nf4 2> "$OUT/torch_nf4.err" | tee "$OUT/torch_nf4.json"
  tail -5 "$OUT/torch_nf4.err"
else
  echo "bitsandbytes NF4 run skipped (not importable, or under 100 s left)"
fi

# --- (e) the streaming-attention kernel in the same steps, when time is left ------------------------
if [ "$(left)" -gt 90 ]; then
  say "(e) qlora steps with the streaming attention kernel (CUDA cores, O(T) memory)"
  timeout "$(cap 120 20)" "$BIN/train_bench" --device cuda --dtype bf16 --ops streaming "${model[@]}" \
    --steps 1 2> "$OUT/train_bench_streaming.err" | tee "$OUT/train_bench_streaming.json"
  tail -3 "$OUT/train_bench_streaming.err"
else
  echo "streaming-attention run skipped (under 90 s left)"
fi

# --- summary -------------------------------------------------------------------------------------
say "summary"
"$PY" - "$OUT" "$tests_rc" <<'EOF' | tee "$OUT/summary.txt"
import json, os, sys
out, tests_rc = sys.argv[1], int(sys.argv[2])
def lines(name):
    try:
        with open(os.path.join(out, name)) as f:
            return [json.loads(l) for l in f if l.startswith("{")]
    except OSError:
        return []
print(f"tests (quant devices::, fused::, dropout::; qlora gpu::): {'PASS' if tests_rc == 0 else f'FAIL (exit {tests_rc})'}")
try:
    print("demo on the GPU:\n  " + "\n  ".join(open(os.path.join(out, "demo_cuda.txt")).read().strip().splitlines()))
except OSError:
    pass
bench = lines("kernel_bench.txt")
for r in (r for r in bench if r.get("bench") == "dequant_bw"):
    print(f"  {r['what']:<34} {r['gb_per_s']:8.0f} GB/s  {100 * r['of_copy']:5.1f}% of copy")
for r in (r for r in bench if r.get("bench") == "fused"):
    print(f"  fused {r['what']:<34} fwd+bwd {r['fused_ms']:8.2f} ms vs composition {r['composition_ms']:8.2f} ms")
runs = lines("train_bench.json") + lines("train_bench_streaming.json") + lines("torch.json") + lines("torch_nf4.json")
if runs:
    print(f"\n{'implementation':<44} {'tokens/s':>9} {'step s':>7} {'peak used MiB':>14} {'net MiB':>8} {'torch max alloc MiB':>20}")
    num = lambda v, w, p=0: f"{v:{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"
    for r in runs:
        name = r['impl'] + (f" {r['ops']}" if 'ops' in r else "")
        print(f"{name:<44} {num(r.get('tokens_per_s'), 9)} {num(r.get('median_step_s'), 7, 2)} "
              f"{num(r.get('peak_used_mib'), 14)} {num(r.get('peak_net_mib'), 8)} {num(r.get('max_allocated_mib'), 20)}")
    ours = lines("train_bench.json")
    for ref in lines("torch.json") + lines("torch_nf4.json"):
        if ours:
            print(f"qlora / {ref['impl']}: tokens/s x{ours[0]['tokens_per_s'] / ref['tokens_per_s']:.2f}, "
                  f"peak used x{ours[0]['peak_used_mib'] / ref['peak_used_mib']:.2f}, "
                  f"loss {ours[0]['loss']:.3f} vs {ref['loss']:.3f} (random models: ~ln(vocab) = 10.4 each)")
print("\ntargets: tokens/s >= 2x PyTorch+PEFT; peak < 4 GB at seq 2048; dequant >= 85% of copy")
EOF
say "done"
exit "$tests_rc"
