#!/usr/bin/env bash
# `qlora plan`'s predicted peak against the measured peak resident set (the process's VmHWM, from
# GNU time's %M; the median of 3 runs of 4 steps) of `qlora train` on the same settings, over a
# matrix of configurations: two model
# shapes (random bf16 Phi-3s, written under a temp dir), sequence 128-1024, batch 1-4, rank 8-64,
# gradient checkpointing on/off/selective and "auto" under budgets that mix the policies per
# block, NF4 and dense bases, AdamW and 8-bit AdamW, LoRA, DoRA and
# modules_to_save copies of the embedding and head ("copies"), DPO on preference pairs. Prints a markdown
# table with the ratio.
# Usage: scripts/plan_accuracy.sh [WORKDIR]   (CPU only; ~15 minutes on 2 cores)
#        PLAN_ROWS=REGEX scripts/plan_accuracy.sh   runs only the rows whose arguments match, e.g.
#        PLAN_ROWS=adamw_8bit for the 8-bit row
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
mkdir -p "$work"
cargo build --release -q --bin qlora --example phi3_mini_random
q=target/release/qlora
gen=target/release/examples/phi3_mini_random
# Model A: hidden 512, 8 layers, 8 heads, intermediate 1536. Model B: hidden 1024, 6 layers, 16
# heads, intermediate 2816. Both with Phi-3's vocabulary (32064).
[ -d "$work/A" ] || $gen "$work/A" "$work/A-adapter" --hidden 512 --layers 8 --heads 8 --intermediate 1536 >/dev/null
[ -d "$work/B" ] || $gen "$work/B" "$work/B-adapter" --hidden 1024 --layers 6 --heads 16 --intermediate 2816 >/dev/null
# Conversations long enough to fill every row to max_seq_len.
python3 - "$work/long.jsonl" <<'PY'
import json, random, sys
random.seed(0)
words = "the of and to in is was for on that with as by at from this be are or an it not have".split()
with open(sys.argv[1], "w") as f:
    for i in range(64):
        reply = " ".join(random.choice(words) for _ in range(3000))
        f.write(json.dumps({"messages": [{"role": "user", "content": f"Tell me story {i}."},
                                         {"role": "assistant", "content": reply}]}) + "\n")
PY
# Preference pairs whose chosen and rejected both fill max_seq_len (the DPO row).
python3 - "$work/pairs.jsonl" <<'PY'
import json, random, sys
random.seed(1)
words = "the of and to in is was for on that with as by at from this be are or an it not have".split()
with open(sys.argv[1], "w") as f:
    for i in range(64):
        side = lambda: [{"role": "assistant", "content": " ".join(random.choice(words) for _ in range(3000))}]
        f.write(json.dumps({"prompt": [{"role": "user", "content": f"Tell me story {i}."}],
                            "chosen": side(), "rejected": side()}) + "\n")
PY
echo "| model | base | seq × batch | rank | checkpointing | dropout | optimizer | adapter | predicted MiB | measured MiB, median (range of 3) | predicted / measured |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
run() {
  local model=$1 base=$2 seq=$3 batch=$4 rank=$5 ckpt=$6 dropout=$7 opt=${8:-adamw} kind=${9:-lora}
  [[ "$*" =~ ${PLAN_ROWS:-.} ]] || return 0
  local data="$work/long.jsonl"
  [ "$kind" = dpo ] && data="$work/pairs.jsonl"
  local flags=(--model "$work/$model" --data "$data" --max-seq-len "$seq" --batch-size "$batch"
    --rank "$rank" --dropout "$dropout" --targets all-linear --set "training.optimizer=\"$opt\"")
  [ "$base" = nf4 ] && flags+=(--4bit)
  # on / off / selective: every block the same; auto@SIZE: "auto" under a budget of SIZE, which
  # mixes the policies (plan and train both pick them; train --force keeps the budget for that).
  case "$ckpt" in
    on) flags+=(--gradient-checkpointing true) ;;
    off) flags+=(--gradient-checkpointing false) ;;
    selective) flags+=(--gradient-checkpointing selective) ;;
    auto@*) flags+=(--gradient-checkpointing auto --budget "${ckpt#auto@}") ;;
  esac
  [ "$kind" = dora ] && flags+=(--use-dora)
  [ "$kind" = copies ] && flags+=(--modules-to-save embed_tokens,lm_head)
  # DPO: pairs (a micro-batch of `batch` pairs is 2 × batch rows), the reference's values kept.
  [ "$kind" = dpo ] && flags+=(--objective dpo)
  local pred
  pred=$($q plan "${flags[@]}" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['peak_bytes'])")
  # The peak varies from run to run (which pool thread frees what first shapes glibc's heap):
  # the median of 3 runs, with their range.
  local kbs=()
  for _ in 1 2 3; do
    rm -rf "$work/out"
    /usr/bin/time -f %M -o "$work/maxrss" $q train "${flags[@]}" --max-steps 4 --output "$work/out" \
      --set training.save_every=0 --force >/dev/null 2>&1
    kbs+=("$(tail -1 "$work/maxrss")")
  done
  python3 -c "
import statistics
p = $pred / 2**20
runs = sorted(k / 1024 for k in [${kbs[0]}, ${kbs[1]}, ${kbs[2]}])
m = statistics.median(runs)
print(f'| $model | $base | $seq × $batch | $rank | $ckpt | $dropout | $opt | $kind | {p:.0f} | {m:.0f} ({runs[0]:.0f}–{runs[-1]:.0f}) | {p/m:.3f} |')"
}
run A nf4 128 1 16 on 0.05
run A nf4 1024 1 16 on 0
run A nf4 512 4 64 on 0.05
run A nf4 512 4 64 on 0.05 adamw_8bit
run A nf4 512 2 16 on 0.05 adamw dora
run A nf4 512 2 16 off 0 adamw dora
run A nf4 512 2 16 on 0.05 adamw copies
run A nf4 512 2 16 on 0.05 adamw_8bit copies
run A nf4 512 2 8 off 0
run A nf4 512 2 16 on 0 adamw dpo
run A dense 1024 1 16 on 0
run A dense 512 1 16 off 0.05
run B nf4 1024 2 16 on 0
run B nf4 1024 1 32 off 0
run B dense 256 4 8 on 0
run B nf4 1024 4 16 on 0.05
run A nf4 1024 1 16 selective 0
run A nf4 1024 2 16 selective 0.05
run A nf4 1024 2 16 auto@600MiB 0.05
run A nf4 1024 2 16 auto@900MiB 0.05
run B nf4 1024 2 16 auto@1100MiB 0
