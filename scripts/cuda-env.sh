# Source me (`. scripts/cuda-env.sh`): installs, once, the pinned CUDA 13.0 build toolchain from
# PyPI wheels (scripts/install-cuda-toolchain.sh --minimal: nvcc, headers, link-only stubs for
# libcuda/cublas/curand/nvrtc; ~270 MB) under $CUDA_TOOLCHAIN (default ~/.cache/cuda13-pypi), and
# exports what `cargo build --features cuda` needs on a machine without a GPU. Reruns only export.
# Needs python3 with pip, a C compiler (for the stubs) and the cargo registry (it runs cargo fetch
# so the stubs can be generated from cudarc's bindings).

_qlora_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_TOOLCHAIN="${CUDA_TOOLCHAIN:-$HOME/.cache/cuda13-pypi}"
_qlora_cuda="$CUDA_TOOLCHAIN/site/nvidia/cu13"
if [ ! -x "$_qlora_cuda/bin/nvcc" ] || [ ! -e "$_qlora_cuda/lib/stubs/libcuda.so" ] \
  || [ ! -e "$_qlora_cuda/lib/stubs/libnccl.so" ]; then
  echo "installing the CUDA 13.0 build toolchain into $CUDA_TOOLCHAIN (once)" >&2
  (cd "$_qlora_root" && cargo fetch --locked >/dev/null) || return 1
  "$_qlora_root/scripts/install-cuda-toolchain.sh" "$CUDA_TOOLCHAIN" --minimal >/dev/null || return 1
fi
export CUDA_ROOT="$_qlora_cuda" CUDA_HOME="$_qlora_cuda" CUDA_PATH="$_qlora_cuda"
export PATH="$_qlora_cuda/bin:$PATH"
# candle's own kernels are built for this compute capability (no GPU to query here): 90 = H100/H200.
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
unset _qlora_root _qlora_cuda
