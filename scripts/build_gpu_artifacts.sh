#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything scripts/gpu_check.sh runs on a GPU machine that has
# no Rust: the release `qlora` binary, the train_bench and kernel_bench examples (release) and
# the test binaries of qlora-quant and of qlora (the model and trainer on CUDA, tests/it/gpu.rs),
# all with `--features cuda` (PyPI CUDA 13.0 toolchain from
# scripts/cuda-env.sh; candle's kernels for CUDA_COMPUTE_CAP, default 90 = H100/H200; our kernels
# are compute_80 PTX for any Ampere+ GPU). Binaries are stripped and packed, xz-compressed (they are
# mostly embedded kernels, the same in all four), into gpu-artifacts/bundle.tar.xz with a manifest;
# carry gpu-artifacts/ (it must stay under the 64 MiB the device tool carries).
#
# usage: scripts/build_gpu_artifacts.sh        (target dir: target-cuda/, or $CARGO_TARGET_DIR)
# A cold build took 17 min here (2 cores, shared): candle's CUDA kernels for two profiles, release
# codegen. The bundle is ~12 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cuda-env.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-cuda}"
ART=gpu-artifacts
start=$(date +%s)

cargo build --release --features cuda --bin qlora --example train_bench
cargo build --release -p qlora-quant --features cuda --example kernel_bench
# The integration-test binary ("it") of package $1.
test_binary() {
  cargo test -p "$1" --features cuda --test it --no-run --message-format=json \
    | python3 -c '
import json, sys
pkg = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    # package_id: "path+file:///…/main/quant#qlora-quant@0.1.0"
    if (m.get("reason") == "compiler-artifact" and m.get("executable")
            and m["target"]["name"] == "it" and f"#{pkg}@" in m["package_id"]):
        print(m["executable"])' "$1"
}
quant_test=$(test_binary qlora-quant)
root_test=$(test_binary qlora)
test -x "$quant_test" && test -x "$root_test"

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp "$CARGO_TARGET_DIR/release/qlora" "$stage/qlora"
cp "$CARGO_TARGET_DIR/release/examples/train_bench" "$stage/train_bench"
cp "$CARGO_TARGET_DIR/release/examples/kernel_bench" "$stage/kernel_bench"
cp "$quant_test" "$stage/quant-it"
cp "$root_test" "$stage/qlora-it"
strip "$stage"/*
{
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- quant src examples Cargo.toml Cargo.lock || echo '+dirty')"
  echo "nvcc: $(nvcc --version | grep release)"
  echo "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
  for f in "$stage"/qlora "$stage"/train_bench "$stage"/kernel_bench "$stage"/quant-it "$stage"/qlora-it; do
    echo "$(basename "$f"): $(stat -c %s "$f") bytes; needs: $(readelf -d "$f" | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
  done
} > "$stage/MANIFEST"

rm -rf "$ART"
mkdir -p "$ART"
# One xz stream with a dictionary larger than a binary: the five share candle's embedded PTX and
# kernels, which then compress to next to nothing after the first copy.
tar -C "$stage" -cf - . | xz -T1 --lzma2=preset=6,dict=256MiB > "$ART/bundle.tar.xz"
cp "$stage/MANIFEST" "$ART/MANIFEST"
cat "$ART/MANIFEST"
ls -la "$ART"
echo "built in $(( $(date +%s) - start ))s; carry: $ART ($(du -sh "$ART" | cut -f1), limit 64 MiB)"
