#!/usr/bin/env bash
# Builds, on a machine without a GPU, everything scripts/gpu_check.sh runs on a GPU machine that has
# no Rust: the release `qlora` binary, the train_bench and kernel_bench examples (release) and
# the test binaries of qlora-quant and of qlora (the model and trainer on CUDA, tests/it/gpu.rs),
# all with `--features cuda` (PyPI CUDA 13.0 toolchain from
# scripts/cuda-env.sh; candle's kernels for CUDA_COMPUTE_CAP, default 90 = H100/H200; our kernels
# are compute_80 PTX for any Ampere+ GPU). Binaries are stripped and packed, xz-compressed (they are
# mostly embedded kernels, the same in all five), into gpu-artifacts/bundle.tar.xz with a manifest;
# carry gpu-artifacts/ (it must stay under the 64 MiB the device tool carries).
# It also carries libcurand.so.10 (CUDA 13.0's, from the nvidia-curand wheel, ~39 MiB as xz) in
# gpu-artifacts/lib/: the binaries link it (candle opens a cuRAND generator with every device), and
# recent PyTorch cu13 wheels no longer pull it in (torch 2.15+cu132 does not); gpu_check.sh uses it
# only when the machine has none.
#
# usage: scripts/build_gpu_artifacts.sh        (target dir: target-cuda/, or $CARGO_TARGET_DIR)
# A cold build took 17-23 min here (2 cores, shared): candle's CUDA kernels for two profiles, release
# codegen, then ~3 min of xz (a warm rebuild: ~3.5 min). The bundle is ~15 MiB; with libcurand
# ~53 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cuda-env.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-cuda}"
ART=gpu-artifacts
start=$(date +%s)

# qlora with NCCL as well, for gpu_check.sh's `--dist nccl` stage alone (it needs libnccl.so.2 to
# start, which a machine without NCCL lacks; the plain binary does not).
cargo build --release --features cuda,nccl --bin qlora
nccl_bin=$(mktemp)
cp "$CARGO_TARGET_DIR/release/qlora" "$nccl_bin"
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
trap 'rm -rf "$stage" "$nccl_bin"' EXIT
cp "$CARGO_TARGET_DIR/release/qlora" "$stage/qlora"
cp "$nccl_bin" "$stage/qlora-nccl"
cp "$CARGO_TARGET_DIR/release/examples/train_bench" "$stage/train_bench"
cp "$CARGO_TARGET_DIR/release/examples/kernel_bench" "$stage/kernel_bench"
cp "$quant_test" "$stage/quant-it"
cp "$root_test" "$stage/qlora-it"
strip "$stage"/*
{
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- quant src examples Cargo.toml Cargo.lock || echo '+dirty')"
  echo "nvcc: $(nvcc --version | grep release)"
  echo "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
  for f in "$stage"/qlora "$stage"/qlora-nccl "$stage"/train_bench "$stage"/kernel_bench "$stage"/quant-it "$stage"/qlora-it; do
    echo "$(basename "$f"): $(stat -c %s "$f") bytes; needs: $(readelf -d "$f" | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
  done
} > "$stage/MANIFEST"

rm -rf "$ART"
mkdir -p "$ART/lib"
# libcurand.so.10 of CUDA 13.0 (the toolchain's version), downloaded and compressed once into the
# toolchain's cache (xz -9e of 127 MiB takes a minute or two).
CURAND=nvidia-curand==10.4.0.35
curand_cache="$CUDA_TOOLCHAIN/curand-${CURAND#*==}"
if [ ! -s "$curand_cache/libcurand.so.10.xz" ]; then
  rm -rf "$curand_cache" && mkdir -p "$curand_cache"
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$curand_cache/site" "$CURAND"
  xz -T1 -9e -c "$curand_cache/site/nvidia/cu13/lib/libcurand.so.10" > "$curand_cache/libcurand.so.10.xz.tmp"
  mv "$curand_cache/libcurand.so.10.xz.tmp" "$curand_cache/libcurand.so.10.xz"
  rm -rf "$curand_cache/site"
fi
cp "$curand_cache/libcurand.so.10.xz" "$ART/lib/"
echo "lib/libcurand.so.10.xz: $CURAND, used by gpu_check.sh only where the machine lacks libcurand.so.10" >> "$stage/MANIFEST"
# One xz stream with a dictionary larger than a binary: the five share candle's embedded PTX and
# kernels, which then compress to next to nothing after the first copy.
tar -C "$stage" -cf - . | xz -T1 --lzma2=preset=6,dict=256MiB > "$ART/bundle.tar.xz"
cp "$stage/MANIFEST" "$ART/MANIFEST"
cat "$ART/MANIFEST"
ls -la "$ART" "$ART/lib"
bytes=$(du -sb "$ART" | cut -f1)
echo "built in $(( $(date +%s) - start ))s; carry: $ART ($(( bytes >> 20 )) MiB, limit 64 MiB)"
if (( bytes >= 64 << 20 )); then
  echo "ERROR: $ART is over the 64 MiB the device tool carries" >&2
  exit 1
fi
