#!/usr/bin/env bash
# Provenance: copied from the shared workspace's tools/install-cuda-toolchain.sh (the recipe the
# CUDA feasibility study found and a previous session verified with `cargo check --features cuda`),
# so that CI on a clean clone (no ../shared) can install it; keep the two in step.
# Install a GPU-less CUDA 13.0 build toolchain (nvcc + headers + link-time libs)
# from PyPI wheels into PREFIX, for building candle (cuda feature) on a machine
# without a GPU / driver / system CUDA toolkit.
#
# usage: install-cuda-toolchain.sh PREFIX [--minimal]
#   --minimal : only nvcc/headers/cudart (enough for `cargo check --features cuda`
#               and for nvcc --ptx); cublas/curand/nvrtc are replaced by link stubs
#               (enough to LINK, not to run). ~270 MB instead of ~1.2 GB.
# After it finishes it prints the env exports to `eval` / paste.
#
# Version choice: everything pinned to CUDA 13.0.x because the GPU box has
# driver 580 (= CUDA 13.0) and a torch cu130 venv (libcublas.so.13, libnvrtc.so.13,
# libcudart.so.13). PTX from nvcc >= 13.1 would NOT JIT on driver 580, and
# nvidia-cuda-nvcc's own deps are unpinned (pip would pull nvvm/crt 13.5!),
# so every piece is pinned explicitly. The cu12 nvcc wheels (nvidia-cuda-nvcc-cu12)
# contain only ptxas + libnvvm, no `nvcc` driver, so 12.x is not an option from PyPI.
set -euo pipefail

PREFIX="${1:?usage: $0 PREFIX [--minimal]}"
MODE="${2:-full}"
PY="${PYTHON:-python3}"
mkdir -p "$PREFIX"
PREFIX="$(cd "$PREFIX" && pwd)"
SITE="$PREFIX/site"

PKGS=(
  "nvidia-cuda-nvcc==13.0.88"    # nvcc, ptxas, fatbinary, nvlink, cudafe++
  "nvidia-nvvm==13.0.88"         # cicc + libnvvm + libdevice (nvcc needs it)
  "nvidia-cuda-crt==13.0.88"     # include/crt/*.h (host_config.h, ...)
  "nvidia-cuda-runtime==13.0.96" # cuda_runtime.h, cuda.h, cuda_fp16/bf16.h, libcudart.so.13
  "nvidia-cuda-cccl==13.0.85"    # include/nv/target (needed by cuda_fp16.h/cuda_bf16.h), cub, thrust
)
if [ "$MODE" != "--minimal" ]; then
  PKGS+=(
    "nvidia-cublas==13.0.0.19"     # libcublas.so.13 + libcublasLt.so.13 (~590 MB)
    "nvidia-curand==10.4.0.35"     # libcurand.so.10 (~130 MB)
    "nvidia-cuda-nvrtc==13.0.88"   # libnvrtc.so.13 (~110 MB)
  )
fi

"$PY" -m pip install --quiet --disable-pip-version-check --no-deps \
  --target "$SITE" "${PKGS[@]}"

CUDA_ROOT="$SITE/nvidia/cu13"
LIB="$CUDA_ROOT/lib"
test -x "$CUDA_ROOT/bin/nvcc"

# Unversioned names so that `-lcudart -lcublas ...` resolve at link time.
for so in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
  if [ -e "$LIB/$so" ]; then ln -sf "$so" "$LIB/${so%%.so.*}.so"; fi
done

# Link stubs. There is no GPU driver here, and no wheel ships libcuda.so,
# so build a stub libcuda.so (SONAME libcuda.so.1, like the toolkit's
# lib64/stubs/libcuda.so) exporting every driver-API symbol declared in cuda.h.
mkdir -p "$LIB/stubs"
mkstub() { # mkstub <name> <soname> <symbol-regex> <file...>
  local name="$1" soname="$2" re="$3"; shift 3
  # Over-inclusion (type names etc.) is harmless: it is a link-only stub.
  grep -ohE "\\b${re}\\b" "$@" | sort -u \
    | awk '{print "void " $1 "(void) {}"}' > "$LIB/stubs/$name.c"
  cc -shared -fPIC -o "$LIB/stubs/lib$name.so" -Wl,-soname,"$soname" "$LIB/stubs/$name.c"
}
# Every cuXxx token of cuda.h: covers both `cuCtxCreate` and the versioned
# targets of `#define cuCtxCreate cuCtxCreate_v4` that cudarc actually links.
mkstub cuda libcuda.so.1 'cu[A-Z][A-Za-z0-9_]*' "$CUDA_ROOT/include/cuda.h"
if [ "$MODE" = "--minimal" ]; then
  # Stubs (SONAMEs identical to the real cu13 wheels) so that `cargo build` links.
  # The symbol names are scraped from cudarc's sys bindings (needs `cargo fetch`
  # done first, or CUDARC_SRC pointing at the cudarc-0.19.x source dir).
  CUDARC_SRC="${CUDARC_SRC:-$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | tail -1)}"
  test -d "$CUDARC_SRC" || { echo "minimal mode needs cudarc sources (run cargo fetch first) or CUDARC_SRC" >&2; exit 1; }
  mkstub cublas   libcublas.so.13   'cublas[A-Z][A-Za-z0-9_]*'   "$CUDARC_SRC/src/cublas/sys/mod.rs"
  mkstub cublasLt libcublasLt.so.13 'cublasLt[A-Z][A-Za-z0-9_]*' "$CUDARC_SRC/src/cublaslt/sys/mod.rs"
  mkstub curand   libcurand.so.10   'curand[A-Z][A-Za-z0-9_]*'   "$CUDARC_SRC/src/curand/sys/mod.rs"
  mkstub nvrtc    libnvrtc.so.13    'nvrtc[A-Z][A-Za-z0-9_]*'    "$CUDARC_SRC/src/nvrtc/sys/mod.rs"
  # libnccl (`--features nccl`): PyPI's nvidia-nccl-cu13 ships libnccl.so.2 only; at run time
  # that one is found (gpu_check.sh puts every nvidia/*/lib of the Python install on the path).
  mkstub nccl     libnccl.so.2      'nccl[A-Z][A-Za-z0-9_]*'     "$CUDARC_SRC/src/nccl/sys/mod.rs"
fi

"$CUDA_ROOT/bin/nvcc" --version | tail -2 >&2
cat <<EOF
# --- paste / eval these before cargo build --features cuda ---
export CUDA_ROOT="$CUDA_ROOT"
export CUDA_HOME="$CUDA_ROOT"     # cudarc build.rs: link search in \$CUDA_HOME/{lib,lib/stubs}
export CUDA_PATH="$CUDA_ROOT"
export PATH="$CUDA_ROOT/bin:\$PATH"  # cudarc runs 'nvcc --version'; cudaforge finds nvcc on PATH
export CUDA_COMPUTE_CAP=90        # no GPU/nvidia-smi to query; H200 = sm_90 (candle makes it sm_90a)
# (LIBRARY_PATH is not needed: cudarc's build.rs adds \$CUDA_HOME/lib and lib/stubs to the link search.)
EOF
