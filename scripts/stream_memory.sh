#!/usr/bin/env bash
# Peak RSS and wall time of loading, quantizing and exporting at Phi-3-mini's scale.
#
# Generates a random bf16 Phi-3-mini-shaped checkpoint (3.8B parameters, 7.6 GB, 2 shards + index,
# the Phi-3 tokenizer) and a random r=16 PEFT adapter for it with examples/phi3_mini_random.rs,
# under a temporary directory that is deleted at the end, then runs each command below once under
# /usr/bin/time -v and prints peak RSS, wall time and the streaming verdict: peak RSS at most the
# largest tensor in f32 (embed/lm_head, 32064 x 3072 x 4 B = 394 MB) + 1.5 GB, and train --4bit
# from bf16 at most 1.1x train from the pre-quantized directory.
#
# Usage: scripts/stream_memory.sh [WORK_DIR] [-- generator options, e.g. --layers 4 for a dry run]
#   WORK_DIR defaults to a fresh mktemp dir under /tmp; it is removed on exit unless KEEP=1.
#   WAIT_WHILE_EXISTS=FILE: before each command, wait while FILE exists (a shared machine's
#   "someone is timing" flag), so measurements do not overlap.
#   Needs ~30 GB of free disk (the checkpoint, plus one export at a time) and ~25 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d /tmp/stream-mem.XXXXXX)}
shift || true
[[ ${1:-} == -- ]] && shift
mkdir -p "$work"
[[ ${KEEP:-0} == 1 ]] || trap 'rm -rf "$work"' EXIT

target=${CARGO_TARGET_DIR:-target}
cargo build --release -q --bin qlora --example phi3_mini_random
qlora=$target/release/qlora
model=$work/model adapter=$work/adapter
if [[ ! -f $model/model.safetensors.index.json ]]; then
  echo "generating the checkpoint and adapter under $work ..."
  "$target/release/examples/phi3_mini_random" "$model" "$adapter" "$@"
fi
# The largest tensor in f32: vocab x hidden (embed_tokens and lm_head).
hidden=$(sed -nE 's/.*"hidden_size": ([0-9]+).*/\1/p' "$model/config.json")
vocab=$(sed -nE 's/.*"vocab_size": ([0-9]+).*/\1/p' "$model/config.json")
largest_mb=$((vocab * hidden * 4 / 1000000))
limit_mb=$((largest_mb + 1500))

rows=()
train_rss=()
# run LABEL OUTPUT -- COMMAND...: runs COMMAND under /usr/bin/time, records a row, removes OUTPUT.
run() {
  local label=$1 out=$2; shift 3
  local log=$work/$(tr ' /' '__' <<<"$label").log
  while [[ -n ${WAIT_WHILE_EXISTS:-} && -e $WAIT_WHILE_EXISTS ]]; do sleep 30; done
  echo "== $label: $*" >&2
  if ! /usr/bin/time -v "$@" >"$log" 2>&1; then
    echo "FAILED: $label (log: $log)" >&2; tail -20 "$log" >&2; exit 1
  fi
  local kb wall
  kb=$(sed -nE 's/.*Maximum resident set size \(kbytes\): ([0-9]+)/\1/p' "$log")
  wall=$(sed -nE 's/.*Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (.*)/\1/p' "$log")
  local mb=$((kb * 1024 / 1000000))
  local verdict=""
  case $label in
    train*) train_rss+=("$mb") ;;
    *) if ((mb <= limit_mb)); then verdict="yes (<= $limit_mb MB)"; else verdict="NO (> $limit_mb MB)"; fi ;;
  esac
  rows+=("$(printf '| %-34s | %8s | %9s | %-20s |' "$label" "$mb MB" "$wall" "$verdict")")
  [[ -n $out ]] && rm -rf "$out"
  return 0
}

nf4=$work/nf4
run "quantize (nf4)" "" -- "$qlora" quantize --model "$model" --out "$nf4"
run "train --4bit from bf16 (1 step)" "$work/run-bf16" -- "$qlora" train --4bit --model "$model" \
  --data data/demo/train.jsonl --max-steps 1 --max-seq-len 64 --output "$work/run-bf16"
run "train --4bit from nf4 dir (1 step)" "$work/run-nf4" -- "$qlora" train --4bit --model "$nf4" \
  --data data/demo/train.jsonl --max-steps 1 --max-seq-len 64 --output "$work/run-nf4"
rm -rf "$nf4"
run "export safetensors bf16" "$work/st" -- "$qlora" export --model "$model" --adapter "$adapter" \
  --out "$work/st" --format safetensors --dtype bf16
for ty in f16 q8_0 q4_k_m; do
  run "export gguf $ty" "$work/m.gguf" -- "$qlora" export --model "$model" --adapter "$adapter" \
    --out "$work/m.gguf" --format gguf --type "$ty"
done
run "export gguf-lora f16" "$work/lora.gguf" -- "$qlora" export --model "$model" --adapter "$adapter" \
  --out "$work/lora.gguf" --format gguf-lora --type f16

echo
echo "checkpoint: hidden $hidden, vocab $vocab; largest tensor (f32): $largest_mb MB; limit: largest + 1500 = $limit_mb MB"
echo
printf '| %-34s | %8s | %9s | %-20s |\n' "command" "peak RSS" "wall" "<= largest + 1.5 GB"
echo "|------------------------------------|----------|-----------|----------------------|"
printf '%s\n' "${rows[@]}"
ratio=$(awk -v a="${train_rss[0]}" -v b="${train_rss[1]}" 'BEGIN { printf "%.2f", a / b }')
ok=$(awk -v r="$ratio" 'BEGIN { print (r <= 1.1) ? "yes" : "NO" }')
echo
echo "train --4bit from bf16 / from nf4 dir: ${train_rss[0]} / ${train_rss[1]} MB = ${ratio}x (<= 1.1x: $ok)"
