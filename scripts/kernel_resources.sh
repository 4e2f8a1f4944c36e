#!/usr/bin/env bash
# SASS for every card we claim: compiles quant/kernels/*.cu to PTX with the flags of quant/build.rs
# (compute_80, -O3, -std=c++17, no fast math), then runs ptxas on that PTX for each target GPU, so a
# PTX that a driver's JIT would reject fails here instead. Prints, per kernel and target, the
# registers per thread, the spill stores + loads (bytes) and the static shared memory per block.
#
# Targets: sm_80 (A100), sm_86 (RTX 30xx, A10/A40), sm_89 (RTX 40xx, L4, L40), sm_90 (H100/H200),
# sm_120 (RTX 50xx).
#
# usage: scripts/kernel_resources.sh [--check] [--markdown]
#   --check     exit 1 if any kernel spills on any target, or uses more static shared memory per
#               block than the smallest card allows (48 KiB: the static limit on every target; the
#               opt-in dynamic limit is larger everywhere, and the kernels use no dynamic shared
#               memory), or more than 255 registers per thread.
#   --markdown  print the table as markdown (docs/gpu-and-multi-machine.md carries it).
# Needs the CUDA toolchain: sources scripts/cuda-env.sh (installs the pinned PyPI one once).
set -euo pipefail
cd "$(dirname "$0")/.."
CHECK=0 MD=0
for a in "$@"; do
  case "$a" in
    --check) CHECK=1 ;;
    --markdown) MD=1 ;;
    *) echo "usage: $0 [--check] [--markdown]" >&2; exit 2 ;;
  esac
done
. scripts/cuda-env.sh
TARGETS=(80 86 89 90 120)
SMEM_LIMIT=49152 # bytes of static __shared__ per block, every target
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# One line per (kernel, target): kernel target registers spill_bytes smem_bytes stack_bytes
for cu in quant/kernels/*.cu; do
  stem="$(basename "$cu" .cu)"
  nvcc --ptx -arch=compute_80 -O3 -std=c++17 -I quant/kernels -o "$WORK/$stem.ptx" "$cu"
  for t in "${TARGETS[@]}"; do
    if ! ptxas -v -arch="sm_$t" -o /dev/null "$WORK/$stem.ptx" 2> "$WORK/$stem.$t.log"; then
      echo "ptxas failed on $stem.ptx for sm_$t:" >&2
      cat "$WORK/$stem.$t.log" >&2
      exit 1
    fi
    awk -v t="$t" '
      /Compiling entry function/ { split($0, q, "\x27"); k = q[2] }
      /bytes stack frame/ { stack = $1; spill = $5 + $9 }
      /Used [0-9]+ registers/ {
        regs = $5; smem = 0
        if (match($0, /[0-9]+ bytes smem/)) { split(substr($0, RSTART, RLENGTH), s, " "); smem = s[1] }
        print k, t, regs, spill, smem, stack
      }' "$WORK/$stem.$t.log" >> "$WORK/all.txt"
  done
done

n_kernels="$(cut -d' ' -f1 "$WORK/all.txt" | sort -u | wc -l)"
if [ "$MD" = 1 ]; then
  # One row per kernel and its three element types (f32, bf16, f16): registers as min–max.
  printf '| kernel (f32, bf16, f16) |'; for t in "${TARGETS[@]}"; do printf ' sm_%s |' "$t"; done
  printf ' spills | smem (B) |\n|---|'; for _ in "${TARGETS[@]}"; do printf -- '---:|'; done
  printf -- '---:|---:|\n'
  sed -E 's/_(f32|bf16|f16) / /' "$WORK/all.txt" | sort -k1,1 -k2,2n | awk -v nt="${#TARGETS[@]}" '
    { key = $1; t = $2
      if (!(key in seen)) { seen[key] = 1; order[++nk] = key }
      id = key SUBSEP t
      if (!(id in lo) || $3 < lo[id]) lo[id] = $3
      if (!(id in hi) || $3 > hi[id]) hi[id] = $3
      if ($4 > sp[key]) sp[key] = $4
      if ($5 > sm[key]) sm[key] = $5
      if (!(t in tseen)) { tseen[t] = 1; ts[++ntt] = t } }
    END {
      for (i = 1; i <= nk; i++) {
        k = order[i]; printf "| `%s` |", k
        for (j = 1; j <= ntt; j++) { id = k SUBSEP ts[j]
          if (lo[id] == hi[id]) printf " %s |", lo[id]; else printf " %s–%s |", lo[id], hi[id] }
        printf " %d | %d |\n", sp[k], sm[k] } }'
else
  printf '%-22s' kernel; for t in "${TARGETS[@]}"; do printf ' %7s' "sm_$t"; done
  printf ' %7s %9s %7s\n' spills smem_B stack_B
  # Registers per target; spills, shared memory and stack: the largest over targets.
  sort -k1,1 -k2,2n "$WORK/all.txt" | awk '
    function flush() {
      if (k == "") return
      printf "%-22s", k; for (i = 1; i <= n; i++) printf " %7s", r[i]; printf " %7d %9d %7d\n", sp, sm, st
    }
    $1 != k { flush(); k = $1; n = 0; sp = 0; sm = 0; st = 0 }
    { r[++n] = $3; if ($4 > sp) sp = $4; if ($5 > sm) sm = $5; if ($6 > st) st = $6 }
    END { flush() }'
fi
echo "($n_kernels kernels × ${#TARGETS[@]} targets; registers per thread per target; spills = spill store + load bytes)"

if [ "$CHECK" = 1 ]; then
  bad="$(awk -v lim="$SMEM_LIMIT" '$4 > 0 || $5 > lim || $3 > 255 {
    printf "  %s on sm_%s: %s registers, %s spill bytes, %s bytes smem\n", $1, $2, $3, $4, $5 }' \
    "$WORK/all.txt")"
  if [ -n "$bad" ]; then
    echo "FAIL: kernels that spill, exceed $SMEM_LIMIT bytes of shared memory or 255 registers:" >&2
    echo "$bad" >&2
    exit 1
  fi
  echo "ok: no spills, shared memory <= $SMEM_LIMIT bytes per block, on every target"
fi
