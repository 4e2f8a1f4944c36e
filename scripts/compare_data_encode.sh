#!/usr/bin/env bash
# qlora's data tokenization against `datasets` (load_dataset + map(apply_chat_template + tokenize,
# num_proc=2), as TRL prepares chat data) on N generated conversations, side by side in one run:
# seconds, input tokens/s and peak RSS of each process tree, medians and ratios, and both sides'
# token counts (which must agree). Needs the reference venv (../shared/tools/reference-venv.sh).
#
# usage: scripts/compare_data_encode.sh [N=1000000] [RUNS=1] [jsonl|parquet]
#   env: PY (default /tmp/qlora-ref/venv/bin/python), DATA_DIR (default /tmp/qlora-data)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-1000000}"
RUNS="${2:-1}"
KIND="${3:-jsonl}"
PY="${PY:-/tmp/qlora-ref/venv/bin/python}"
DATA_DIR="${DATA_DIR:-/tmp/qlora-data}"
cargo build --release -q
data="$DATA_DIR/chat-$N.$KIND"
[ -f "$data" ] || "$PY" scripts/gen_chat_data.py "$N" "$DATA_DIR"
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $(grep -o 'avx512[a-z_]*\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "data: $data ($(du -h "$data" | cut -f1))"
"$PY" scripts/compare_data_encode.py target/release/qlora "$data" assets/phi3-tokenizer "$RUNS"
