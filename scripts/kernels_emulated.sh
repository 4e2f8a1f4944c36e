#!/usr/bin/env bash
# Every CUDA kernel of quant/kernels executed without a GPU: builds qlora-quant with the `emulate`
# feature (build.rs compiles each .cu as host C++ against quant/emu/cuda_emu.h, under
# AddressSanitizer + UndefinedBehaviorSanitizer, with g++) and runs, with the CPU device running
# the kernels in that harness, the per-device test cases that a GPU runs (quant/tests/it:
# devices.rs, fused.rs, dropout.rs: one list of cases, three executors) plus the harness's own
# tests (emulated.rs). Each kernel gets the arguments and the grid and block (qlora_quant::launch)
# its CUDA launch gets, on the tests' small shapes; outputs are compared with the CPU references
# (dequantization bit for bit, the fused ops within the device tests' tolerances).
#
# Exit 0 only if every test passed and every kernel the .cu files define was launched at least
# once. Prints the launches per kernel. What it cannot see: docs/gpu-and-multi-machine.md, "The emulation harness".
#
# usage: scripts/kernels_emulated.sh [TEST_FILTER...]
#   With filters (e.g. fused::rms_norm), runs only the matching tests and skips the check that
#   every kernel ran. Env: CARGO_TARGET_DIR; QLORA_EMU_ORDER=reverse runs each block's threads
#   highest first.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
export QLORA_EMU_LOG="$LOG"

SECONDS=0
if [ $# -gt 0 ]; then
  cargo test -p qlora-quant --features emulate --test it -- "$@"
  echo "::: the emulated tests matching $* passed in ${SECONDS}s (kernel coverage not checked)"
  exit 0
fi
# All of devices.rs, fused.rs and dropout.rs but three attention tests whose subject is host-side
# Rust, not a kernel: the chunking test on the larger attention shape (~15 min here: 256 OS threads
# per softmax row; its chunkings run on a smaller shape instead,
# fused::blocked_attention_chunkings_on_a_small_shape, every device), the CPU backward's thread
# counts and waves (187 s here before it tried thread counts too; the waves are a CPU-only grouping
# of the chunks' partial sums, pinned bit for bit by the plain CPU run of `cargo test`, and the
# kernels it would launch run in the other fused:: tests), and the CPU f32 attention on slices
# over many chunks (no kernel: plain Rust and gemm, run by `cargo test`).
cargo test -p qlora-quant --features emulate --test it -- \
  emulated:: devices:: fused:: dropout:: \
  --skip fused::blocked_attention_matches_the_composition_for_every_chunking \
  --skip fused::blocked_attention_backward_threads_and_waves_change_no_bit \
  --skip fused::blocked_attention_on_cpu_slices_matches_the_composition_over_many_chunks
echo "::: emulated tests passed in ${SECONDS}s"

runner="$(ls -t "$TARGET"/debug/build/qlora-quant-*/out/emu/qlora-emu-runner 2>/dev/null | head -1)"
if [ -z "$runner" ]; then
  echo "FAIL: no emulation harness under $TARGET/debug/build (set CARGO_TARGET_DIR)" >&2
  exit 1
fi
missing=0
printf '%-22s %8s\n' kernel launches
while read -r k; do
  case "$k" in emu_selftest_*) continue ;; esac
  n="$(awk -v k="$k" '$1 == k' "$LOG" | wc -l)"
  printf '%-22s %8d\n' "$k" "$n"
  if [ "$n" = 0 ]; then missing=$((missing + 1)); fi
done < <("$runner" --list)
total="$(grep -vc '^emu_selftest_' "$LOG" || true)"
echo "($total launches of the kernels in quant/kernels)"
if [ "$missing" != 0 ]; then
  echo "FAIL: $missing kernels never ran in the harness" >&2
  exit 1
fi
echo "ok: every kernel ran in the emulation harness and matched the CPU references"
