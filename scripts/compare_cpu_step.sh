#!/usr/bin/env bash
# One QLoRA training step on the CPU, qlora against PyTorch + PEFT + bitsandbytes, side by side in one
# run on the same workload: a random Phi-3 of the 135M shape (hidden 576, 30 layers, 9 heads / 3 kv
# heads, intermediate 1536, vocab 49152, tied head, bf16 weights), one row of 256 tokens per step
# (chat data rendered with the Phi-3 template, truncated at 256, loss on the assistant's tokens),
# NF4 base (double quant, blocksize 64), LoRA r=16 α=32 on qkv/o/gate_up/down, dropout 0, f32
# compute, AdamW. Modes: "default" (qlora's defaults: checkpointing "auto", under a budget of
# PyTorch's measured peak RSS) against PyTorch with gradient checkpointing (the usual QLoRA setting);
# "ckpt" (every block recomputed, both sides); "plain" (no checkpointing, both sides). Prints each
# side's median step time (after a warm-up step), tokens/s (every input token), the speed ratio and
# peak RSS, at each sequence length of SEQS.
#
# usage: scripts/compare_cpu_step.sh [STEPS]        (timed steps per run, default 5)
# env:   QLORA_REF_VENV   the reference venv (default /tmp/qlora-ref/venv; ../shared/tools/reference-venv.sh
#                         builds it, QLORA_REF_NO_LLAMA=1 is enough here)
#        QLORA_BIN        a qlora binary to time instead of building target/release/qlora
#        WORK             scratch dir for the model, data and runs (default: a new temp dir, removed)
#        MODES            "default ckpt plain" (default), or some of them
#        SEQS             tokens per row, "256" (default); e.g. "256 1024 4096"
#        QLORA_CPU=avx2   qlora's AVX2 paths on an AVX-512 machine (see docs/measurements.md)
# Measure on a quiet machine: nothing else running (no builds), as contention skews the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-5}
PY=${QLORA_REF_VENV:-/tmp/qlora-ref/venv}/bin/python
[ -x "$PY" ] || { echo "no reference venv at $PY: run ../shared/tools/reference-venv.sh (QLORA_REF_NO_LLAMA=1)" >&2; exit 2; }
if [ -z "${QLORA_BIN:-}" ]; then
  cargo build --release --bin qlora -q
  QLORA_BIN=${CARGO_TARGET_DIR:-target}/release/qlora
fi
if [ -z "${WORK:-}" ]; then
  WORK=$(mktemp -d /tmp/compare-cpu-step.XXXXXX)
  trap 'rm -rf "$WORK"' EXIT
fi
MODES=${MODES:-default ckpt plain}
SEQS=${SEQS:-256}
[ -f "$WORK/model/config.json" ] || "$PY" scripts/compare_cpu_step.py make-model "$WORK/model" 2>/dev/null

# qlora: median of the per-step wall times in metrics.jsonl, the first (warm-up) step dropped.
qlora_run() { # mode [budget MiB]
  local flag=() out="$WORK/run-$1"
  [ "$1" = plain ] && flag=(--gradient-checkpointing false)
  [ "$1" = ckpt ] && flag=(--gradient-checkpointing true)
  # The defaults within PyTorch's peak: "auto" under a budget of PyTorch's measured peak RSS.
  [ -n "${2:-}" ] && flag=(--budget "${2}MiB")
  rm -rf "$out"
  "$QLORA_BIN" train --4bit --model "$WORK/model" --data "$WORK/train.jsonl" --output "$out" \
    --max-seq-len $SEQ --batch-size 1 --grad-accum 1 --rank 16 --alpha 32 --dropout 0 \
    --targets all-linear --max-steps $((STEPS + 1)) --device cpu --dtype f32 "${flag[@]}" \
    --set training.eval_every=0 --set training.save_every=0 --set training.warmup_steps=0 \
    --set data.pack=false >"$out.log" 2>&1 || { cat "$out.log" >&2; exit 1; }
  "$PY" - "$out/metrics.jsonl" <<'EOF'
import json, sys
m = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l]
s = sorted(x["seconds"] for x in m[1:])
print(json.dumps({"median_step_s": s[len(s) // 2], "tokens": m[-1]["tokens"],
                  "trained": m[-1]["trained_tokens"], "peak_rss_mib": max(x["peak_rss_mib"] for x in m),
                  "step_s": [round(x["seconds"], 3) for x in m]}))
EOF
}
torch_run() { # mode
  local flag=()
  [ "$1" = plain ] || flag=(--checkpointing)
  # With QLORA_CPU=avx2, PyTorch's own kernels (ATen, MKL, oneDNN) held to AVX2 too.
  local isa=()
  [ "${QLORA_CPU:-}" = avx2 ] && isa=(ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2)
  env "${isa[@]}" OMP_NUM_THREADS=$(nproc) "$PY" scripts/compare_cpu_step.py torch "$WORK/model" "$WORK/train.jsonl" \
    --seq $SEQ --steps "$STEPS" --warmup 1 "${flag[@]}" 2>"$WORK/torch-$1.log"
}

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores;" \
  "flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|avx512f|avx512bw|avx512_vnni|avx512_bf16|amx_tile)$' | tr '\n' ' ')" \
  "${QLORA_CPU:+(QLORA_CPU=$QLORA_CPU: AVX2 paths on both sides)}"
printf '%-34s %-8s %12s %10s %12s %10s\n' "" side "s/step" "tok/s" "trained/step" "peak RSS MiB"
for SEQ in $SEQS; do
[ -f "$WORK/train-$SEQ.jsonl" ] || "$PY" scripts/compare_cpu_step.py make-data "$WORK/train-$SEQ.jsonl" --seq $SEQ
ln -sf "train-$SEQ.jsonl" "$WORK/train.jsonl"
for mode in $MODES; do
  t=$(torch_run "$mode")
  budget=""
  [ "$mode" = default ] && budget=$("$PY" -c "import json,sys; print(int(json.loads(sys.argv[1])['peak_rss_mib']))" "$t")
  q=$(qlora_run "$mode" "$budget")
  "$PY" - "$mode" "$q" "$t" "$SEQ" "$(grep -m1 'gradient checkpointing' "$WORK/run-$mode.log" | sed 's/ *$//')" <<'EOF'
import json, sys
mode, q, t, seq, line = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
name = {"default": "defaults (PyTorch ckpt)", "ckpt": "gradient checkpointing",
        "plain": "no checkpointing"}[mode] + f" @{seq}"
if mode == "default":
    print(f"  qlora: {line}")
for side, r, tok in (("qlora", q, q["tokens"]), ("PyTorch", t, t["seq"])):
    print(f"{name:<34} {side:<8} {r['median_step_s']:12.3f} {tok / r['median_step_s']:10.1f} "
          f"{r.get('trained', r.get('trained_tokens_per_step')):12.0f} {r['peak_rss_mib']:10.0f}")
print(f"{name:<34} speed ratio qlora/PyTorch {t['median_step_s'] / q['median_step_s']:.2f}x, "
      f"peak RSS ratio {q['peak_rss_mib'] / t['peak_rss_mib']:.2f}x   "
      f"(qlora steps {q['step_s']}, PyTorch steps {[round(s, 3) for s in t['step_s']]})")
EOF
done
done
