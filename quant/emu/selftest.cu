// Kernels that test the emulation harness itself (quant/tests/it/emulated.rs launches them): the
// conversions against the half crate, warp shuffles and votes, and the faults the harness must
// report instead of hanging or passing: a __syncthreads in divergent code, a spin loop, a shuffle
// naming an exited lane, a read of shared memory no thread wrote, a write past a buffer.

#include "common.cuh"

// out16[2i] = bf16(x[i]), out16[2i + 1] = f16(x[i]); back[2i], back[2i + 1]: those widened again.
extern "C" __global__ void emu_selftest_convert(const float* x, uint16_t* out16, float* back,
                                                uint64_t n) {
    uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    __nv_bfloat16 b = __float2bfloat16_rn(x[i]);
    __half h = __float2half_rn(x[i]);
    out16[2 * i] = __bfloat16_as_ushort(b);
    out16[2 * i + 1] = __half_as_ushort(h);
    back[2 * i] = __bfloat162float(b);
    back[2 * i + 1] = __half2float(h);
}

// Per thread t of a 64-thread block: out[6t..6t+6] = xor-1 neighbour, lane 0's value (broadcast),
// lane + 1's value (down), lane − 1's (up), the ballot of odd lanes, and the block sum.
extern "C" __global__ void emu_selftest_warp(float* out) {
    __shared__ float scratch[32];
    unsigned t = threadIdx.x;
    float v = (float)t;
    out[6 * t] = __shfl_xor_sync(0xffffffffu, v, 1);
    out[6 * t + 1] = __shfl_sync(0xffffffffu, v, 0);
    out[6 * t + 2] = __shfl_down_sync(0xffffffffu, v, 1);
    out[6 * t + 3] = __shfl_up_sync(0xffffffffu, v, 1);
    out[6 * t + 4] = (float)__ballot_sync(0xffffffffu, t & 1);
    out[6 * t + 5] = block_sum(v, scratch);
}

// Threads of the first half reach one barrier, the others another: divergent.
extern "C" __global__ void emu_selftest_divergent_sync(float* out) {
    if (threadIdx.x < blockDim.x / 2) {
        __syncthreads();
        out[threadIdx.x] = 1.f;
    } else {
        __syncthreads();
        out[threadIdx.x] = 2.f;
    }
}

// Thread 0 returns early; the others wait for it at a barrier.
extern "C" __global__ void emu_selftest_exit_before_sync(float* out) {
    if (threadIdx.x == 0) return;
    __syncthreads();
    out[threadIdx.x] = 1.f;
}

// Every thread but lane 5 shuffles with a full mask.
extern "C" __global__ void emu_selftest_shuffle_exited_lane(float* out) {
    if (threadIdx.x == 5) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

// Block 1 spins on a flag no thread ever sets.
extern "C" __global__ void emu_selftest_spin(volatile uint32_t* flag) {
    if (blockIdx.x == 1) {
        while (flag[0] == 0) {
        }
    }
}

// Each thread reads the shared slot of the next thread, which nobody wrote.
extern "C" __global__ void emu_selftest_uninit_shared(float* out) {
    __shared__ float s[64];
    if (threadIdx.x % 2 == 0) s[threadIdx.x] = 1.f;
    __syncthreads();
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Writes one element past the end of `out` (n elements).
extern "C" __global__ void emu_selftest_out_of_bounds(float* out, uint32_t n) {
    uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = 1.f;
}
