// The CUDA that quant/kernels/*.cu use, for host C++: the emulation harness compiles each .cu file
// with g++ (or clang++) against this header (force-included, as nvcc force-includes
// cuda_runtime.h; include/cuda_bf16.h and include/cuda_fp16.h stand in for the toolkit's), so the
// kernels run unchanged on the CPU under AddressSanitizer and UndefinedBehaviorSanitizer. All of it
// is ours; no third-party emulator.
//
//   - __global__ / __device__ / __forceinline__; a kernel is an extern "C" host function.
//   - threadIdx, blockIdx, blockDim, gridDim: per OS thread (one OS thread per CUDA thread).
//   - __shared__: a function-local static. Blocks run one after another, so one copy is one block's
//     shared memory; build.rs lists these statics (from the kernel objects' symbols) and the
//     launcher poisons them (0xFF bytes: NaN as f32) before every block, so a read before a write
//     shows up as garbage, as it would on a GPU.
//   - __syncthreads(): a barrier of the block's threads, which must all reach the same call site;
//     warp shuffles and votes: a rendezvous of the lanes their mask names, within one warp of 32.
//     runtime.cpp schedules the threads and detects divergence, deadlocks and timeouts.
//   - bf16 / f16 types and the round-to-nearest-even conversions; the _rn arithmetic intrinsics
//     (plain IEEE operations: the harness is built with -ffp-contract=off, so never an FMA).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#ifdef EMU_LIST_KERNELS
#define __global__ __emu_kernel__  // build.rs preprocesses with this to list the kernels
#else
#define __global__
#endif
#define __device__ inline
#define __host__
#define __forceinline__
#define __noinline__
#define __shared__ static __attribute__((aligned(16)))
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

namespace emu {
// The CUDA thread this OS thread runs (set by the launcher before each block).
extern thread_local uint3 t_threadIdx;
extern thread_local uint3 t_blockIdx;
extern thread_local dim3 t_blockDim;
extern thread_local dim3 t_gridDim;

// __syncthreads() at `file`:`line`.
void syncthreads(const char* file, int line);
// Lane exchange of the calling warp: every lane of `mask` deposits `v`; returns lane `src`'s.
uint64_t warp_exchange(unsigned mask, uint64_t v, unsigned src, const char* op);
// Vote of the calling warp: the mask of the lanes of `mask` whose `pred` is non-zero.
unsigned warp_ballot(unsigned mask, int pred, const char* op);

inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
inline float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

template <typename T> inline uint64_t to_lane_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a scalar");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof(T));
    return u;
}
template <typename T> inline T from_lane_bits(uint64_t u) {
    T v;
    memcpy(&v, &u, sizeof(T));
    return v;
}
inline unsigned lane_id() { return t_threadIdx.x & 31u; }
}  // namespace emu

#define threadIdx (::emu::t_threadIdx)
#define blockIdx (::emu::t_blockIdx)
#define blockDim (::emu::t_blockDim)
#define gridDim (::emu::t_gridDim)
#define warpSize 32

// ---- warp shuffles and votes ---------------------------------------------------------------------
template <typename T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    unsigned lane = emu::lane_id(), base = lane & ~(unsigned)(width - 1);
    unsigned from = base + ((unsigned)src & (unsigned)(width - 1));
    return emu::from_lane_bits<T>(emu::warp_exchange(mask, emu::to_lane_bits(v), from, "__shfl_sync"));
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    unsigned lane = emu::lane_id(), from = lane ^ (unsigned)lane_mask;
    if ((from & ~(unsigned)(width - 1)) != (lane & ~(unsigned)(width - 1))) from = lane;
    return emu::from_lane_bits<T>(
        emu::warp_exchange(mask, emu::to_lane_bits(v), from, "__shfl_xor_sync"));
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    unsigned lane = emu::lane_id(), from = lane + delta;
    if ((from & ~(unsigned)(width - 1)) != (lane & ~(unsigned)(width - 1))) from = lane;
    return emu::from_lane_bits<T>(
        emu::warp_exchange(mask, emu::to_lane_bits(v), from, "__shfl_down_sync"));
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    unsigned lane = emu::lane_id();
    unsigned from = (lane & (unsigned)(width - 1)) >= delta ? lane - delta : lane;
    return emu::from_lane_bits<T>(
        emu::warp_exchange(mask, emu::to_lane_bits(v), from, "__shfl_up_sync"));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    return emu::warp_ballot(mask, pred, "__ballot_sync");
}
inline int __all_sync(unsigned mask, int pred) {
    return emu::warp_ballot(mask, pred, "__all_sync") == mask;
}
inline int __any_sync(unsigned mask, int pred) {
    return emu::warp_ballot(mask, pred, "__any_sync") != 0;
}

// ---- arithmetic ----------------------------------------------------------------------------------
inline float __int_as_float(int i) { return emu::bits_f32((uint32_t)i); }
inline int __float_as_int(float f) { return (int)emu::f32_bits(f); }
inline float __uint_as_float(unsigned u) { return emu::bits_f32(u); }
inline unsigned __float_as_uint(float f) { return emu::f32_bits(f); }
// Correctly rounded IEEE operations (the harness never contracts them into an FMA).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
// CUDA's integer min/max overloads, for any pair of arithmetic types (the common type).
template <typename A, typename B>
inline typename std::common_type<A, B>::type min(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return (C)a < (C)b ? (C)a : (C)b;
}
template <typename A, typename B>
inline typename std::common_type<A, B>::type max(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return (C)a > (C)b ? (C)a : (C)b;
}

// ---- bf16 and f16 --------------------------------------------------------------------------------
struct __nv_bfloat16 {
    uint16_t bits;
};
struct __half {
    uint16_t bits;
};

// float -> bf16, round to nearest even; NaN -> the canonical 0x7FFF, as CUDA.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u = emu::f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {0x7fff};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(uint16_t)(u >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 h) { return emu::bits_f32((uint32_t)h.bits << 16); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return {u}; }

// float -> f16, round to nearest even, subnormals kept, overflow to infinity; NaN -> 0x7FFF.
inline __half __float2half_rn(float f) {
    uint32_t u = emu::f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return {0x7fff};
    if (a >= 0x47800000u) return {(uint16_t)(sign | 0x7c00u)};  // >= 65536: infinity
    if (a < 0x38800000u) {
        // Below 2^-14: a subnormal (or zero) of f16, m · 2^-24. Adding 0.5 (2^-1) moves the value
        // to the bottom of a binade whose ulp is 2^-24, where the FPU rounds it to nearest even.
        float r = emu::bits_f32(a) + 0.5f;
        return {(uint16_t)(sign | (emu::f32_bits(r) - 0x3f000000u))};
    }
    // Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to even; a
    // carry out of the mantissa bumps the exponent, up to infinity (values >= 65520).
    uint32_t odd = (a >> 13) & 1u;
    a += 0xc8000000u + 0x0fffu + odd;  // (15 - 127) << 23, plus the rounding increment
    return {(uint16_t)(sign | (a >> 13))};
}
inline float __half2float(__half h) {
    uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16;
    uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
    if (exp == 0x1f) return emu::bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        float v = (float)man * 5.9604644775390625e-8f;  // man · 2^-24, exact
        return sign ? -v : v;
    }
    return emu::bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __half __ushort_as_half(unsigned short u) { return {u}; }
