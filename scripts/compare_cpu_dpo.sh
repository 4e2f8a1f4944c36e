#!/usr/bin/env bash
# A DPO step on the CPU, side by side in one run on the same workload: qlora's DPO step, qlora's SFT
# step over the same rows (what the preference objective costs on top), and TRL's DPOTrainer over
# PEFT + bitsandbytes NF4. The model is compare_cpu_step.sh's (a random Phi-3 of the 135M shape,
# bf16 weights, tied head); one pair per step, chosen and rejected each cut to 256 tokens (2 × 256
# input tokens a step); NF4 base, LoRA r=16 α=32 on qkv/o/gate_up/down, dropout 0, f32 compute,
# AdamW, reference = the adapter off; with gradient checkpointing and without. Prints each side's
# median step time after a warm-up step, tokens/s (every input token), the ratios and peak RSS.
#
# usage: scripts/compare_cpu_dpo.sh [STEPS]         (timed steps per run, default 5)
# env:   QLORA_REF_VENV, QLORA_BIN, WORK, MODES as in scripts/compare_cpu_step.sh
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
  WORK=$(mktemp -d /tmp/compare-cpu-dpo.XXXXXX)
  trap 'rm -rf "$WORK"' EXIT
fi
MODES=${MODES:-ckpt plain}
SEQ=256
[ -f "$WORK/model/config.json" ] || "$PY" scripts/compare_cpu_step.py make-model "$WORK/model" 2>/dev/null
[ -f "$WORK/pairs.jsonl" ] || "$PY" scripts/compare_cpu_dpo.py make-pairs "$WORK/pairs.jsonl" --seq $SEQ
# The SFT side trains on the same rows: each pair's chosen and rejected conversations.
[ -f "$WORK/sft.jsonl" ] || "$PY" - "$WORK/pairs.jsonl" "$WORK/sft.jsonl" <<'EOF2'
import json, sys
with open(sys.argv[1]) as f, open(sys.argv[2], "w") as g:
    for line in f:
        p = json.loads(line)
        for side in ("chosen", "rejected"):
            g.write(json.dumps({"messages": p["prompt"] + p[side]}) + "\n")
EOF2

qlora_run() { # mode objective
  local flag=() out="$WORK/run-$1-$2" data="$WORK/pairs.jsonl" batch=1
  [ "$1" = plain ] && flag=(--no-gradient-checkpointing)
  [ "$2" = sft ] && { data="$WORK/sft.jsonl"; batch=2; }
  rm -rf "$out"
  "$QLORA_BIN" train --4bit --model "$WORK/model" --data "$data" --output "$out" --objective "$2" \
    --max-seq-len $SEQ --batch-size $batch --grad-accum 1 --rank 16 --alpha 32 --dropout 0 \
    --targets all-linear --max-steps $((STEPS + 1)) --device cpu --dtype f32 "${flag[@]}" \
    --set training.eval_every=0 --set training.save_every=0 --set training.warmup_steps=0 \
    --set data.pack=false >"$out.log" 2>&1 || { cat "$out.log" >&2; exit 1; }
  "$PY" - "$out/metrics.jsonl" <<'EOF2'
import json, sys
m = [json.loads(l) for l in open(sys.argv[1]) if '"train"' in l]
s = sorted(x["seconds"] for x in m[1:])
print(json.dumps({"median_step_s": s[len(s) // 2], "tokens": m[-1]["tokens"],
                  "peak_rss_mib": max(x["peak_rss_mib"] for x in m),
                  "step_s": [round(x["seconds"], 3) for x in m]}))
EOF2
}
trl_run() { # mode
  local flag=()
  [ "$1" = ckpt ] && flag=(--checkpointing)
  OMP_NUM_THREADS=$(nproc) "$PY" scripts/compare_cpu_dpo.py trl "$WORK/model" "$WORK/pairs.jsonl" \
    --work "$WORK" --seq $SEQ --steps "$STEPS" --warmup 1 "${flag[@]}" 2>"$WORK/trl-$1.log" \
    >"$WORK/trl-$1.out" || { tail -20 "$WORK/trl-$1.log" >&2; exit 1; }
  # The trainer prints its log dicts on stdout too: the result is the last line.
  tail -1 "$WORK/trl-$1.out"
}

printf '%-24s %-10s %10s %10s %12s\n' "" side "s/step" "tok/s" "peak RSS MiB"
for mode in $MODES; do
  d=$(qlora_run "$mode" dpo); s=$(qlora_run "$mode" sft); t=$(trl_run "$mode")
  "$PY" - "$mode" "$d" "$s" "$t" <<'EOF2'
import json, sys
mode, d, s, t = sys.argv[1], *map(json.loads, sys.argv[2:])
name = "gradient checkpointing" if mode == "ckpt" else "no checkpointing"
for side, r, tok in (("qlora DPO", d, d["tokens"]), ("qlora SFT", s, s["tokens"]),
                     ("TRL DPO", t, t["tokens_per_step"])):
    print(f"{name:<24} {side:<10} {r['median_step_s']:10.3f} {tok / r['median_step_s']:10.1f} "
          f"{r['peak_rss_mib']:12.0f}")
print(f"{name:<24} qlora DPO/SFT step time {d['median_step_s'] / s['median_step_s']:.2f}x; "
      f"speed qlora/TRL {t['median_step_s'] / d['median_step_s']:.2f}x; "
      f"peak RSS qlora/TRL {d['peak_rss_mib'] / t['peak_rss_mib']:.2f}x   "
      f"(qlora DPO {d['step_s']}, SFT {s['step_s']}, TRL {[round(x, 3) for x in t['step_s']]})")
EOF2
done
