// NF4/FP4 dequantization (bitsandbytes' 4-bit layout) to f32, bf16 or f16, with plain or
// double-quantized absmax, in one pass. The CPU reference is `qlora_quant::cpu::dequantize_ref`
// (and the double-quant decode `qlora_quant::nested::decode`); the GPU tests pin this kernel
// bit-identical to it for every type, dtype and odd size.
//
// Layout (quant/src/format.rs): element 2i is the HIGH nibble of byte i; blocks of 2^block_shift
// consecutive elements of the row-major flattened tensor (32..4096) share one absmax; a nested
// absmax is `map[code[b]] * nested_absmax[b / 256] + offset`.
//
// Exactness: every product and sum uses the _rn intrinsics, which nvcc never contracts into an
// FMA, so each value is the f32 product `code[q] * absmax` (and the absmax the two f32 roundings of
// the reference), then rounded to nearest even into the output type (__float2bfloat16_rn,
// __float2half_rn). Denormals are kept (no --use_fast_math, so no flush-to-zero): the 1e-38 floor
// of an all-zero partial block dequantizes to the same subnormals as on the CPU.
//
// Versions:
//   v1 (this file): one thread per 32 elements = 16 packed bytes, one 16-byte (uint4) load; a
//      32-element run never crosses a quantization block (blocks are >= 32 and powers of two,
//      runs start at multiples of 32), so the absmax is decoded once per thread; the 16-entry code
//      table (and the 256-entry dynamic map for nested absmax) sit in shared memory, where the 16
//      entries occupy 16 distinct banks (lookups never conflict); the 32 outputs leave as 16-byte
//      stores (8 x float4 for f32, 4 x uint4 for 16-bit types). The last partial run, or any run
//      when a pointer is not 16-byte aligned, takes the scalar path (byte loads, element stores).

#include "common.cuh"

#define RUN_ELEMS 32
#define NESTED_BLOCK_SHIFT 8  // 256 absmax values per nested scale
#define MAP_LEN 256

__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 v) {
    return (uint32_t)__bfloat16_as_ushort(v);
}
__device__ __forceinline__ uint32_t bits16(__half v) { return (uint32_t)__half_as_ushort(v); }

// The absmax of quantization block `block`.
template <bool NESTED>
__device__ __forceinline__ float block_absmax(uint64_t block, const float* __restrict__ absmax,
                                              const uint8_t* __restrict__ codes,
                                              const float* __restrict__ nested_absmax,
                                              float offset, const float* s_map) {
    if (NESTED) {
        float scaled = __fmul_rn(s_map[codes[block]], nested_absmax[block >> NESTED_BLOCK_SHIFT]);
        return __fadd_rn(scaled, offset);
    } else {
        return absmax[block];
    }
}

// Stores the 32 values of 16 packed bytes (`w[0..4]`, little-endian) at `out` (16-byte aligned).
template <typename T>
__device__ __forceinline__ void store_run(T* out, const uint32_t w[4], const float* s_code,
                                          float am) {
    // 16-bit outputs: byte b -> one 32-bit word (element 2b in the low half: lower address).
    uint4* dst = reinterpret_cast<uint4*>(out);
#pragma unroll
    for (int v = 0; v < 4; ++v) {
        uint32_t word = w[v];
        uint32_t packed_out[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            uint32_t byte = (word >> (8 * j)) & 0xFFu;
            T hi = from_f32<T>(__fmul_rn(s_code[byte >> 4], am));
            T lo = from_f32<T>(__fmul_rn(s_code[byte & 0xFu], am));
            packed_out[j] = bits16(hi) | (bits16(lo) << 16);
        }
        dst[v] = make_uint4(packed_out[0], packed_out[1], packed_out[2], packed_out[3]);
    }
}

template <>
__device__ __forceinline__ void store_run<float>(float* out, const uint32_t w[4],
                                                 const float* s_code, float am) {
    float4* dst = reinterpret_cast<float4*>(out);
#pragma unroll
    for (int v = 0; v < 4; ++v) {
        uint32_t word = w[v];
        float vals[8];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            uint32_t byte = (word >> (8 * j)) & 0xFFu;
            vals[2 * j] = __fmul_rn(s_code[byte >> 4], am);
            vals[2 * j + 1] = __fmul_rn(s_code[byte & 0xFu], am);
        }
        dst[2 * v] = make_float4(vals[0], vals[1], vals[2], vals[3]);
        dst[2 * v + 1] = make_float4(vals[4], vals[5], vals[6], vals[7]);
    }
}

// tables: the 16 code values, then (NESTED only) the 256 entries of the dynamic map.
// vec_ok: packed and out are 16-byte aligned (checked on the host).
template <typename T, bool NESTED>
__device__ __forceinline__ void dequant(const uint8_t* __restrict__ packed,
                                        const float* __restrict__ absmax,
                                        const uint8_t* __restrict__ codes,
                                        const float* __restrict__ nested_absmax, float offset,
                                        const float* __restrict__ tables, T* __restrict__ out,
                                        uint64_t n_elems, uint32_t block_shift, uint32_t vec_ok) {
    __shared__ float s_code[16];
    __shared__ float s_map[NESTED ? MAP_LEN : 1];
    for (int i = threadIdx.x; i < 16; i += blockDim.x) s_code[i] = tables[i];
    if (NESTED) {
        for (int i = threadIdx.x; i < MAP_LEN; i += blockDim.x) s_map[i] = tables[16 + i];
    }
    __syncthreads();

    uint64_t run = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    uint64_t first = run * RUN_ELEMS;
    if (first >= n_elems) return;
    float am =
        block_absmax<NESTED>(first >> block_shift, absmax, codes, nested_absmax, offset, s_map);

    if (vec_ok && first + RUN_ELEMS <= n_elems) {
        uint4 bytes = reinterpret_cast<const uint4*>(packed)[run];
        uint32_t w[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
        store_run<T>(out + first, w, s_code, am);
        return;
    }
    // Scalar path: the trailing partial run (or unaligned buffers). Still inside one block.
    uint64_t end = min(first + RUN_ELEMS, n_elems);
    for (uint64_t i = first; i < end; ++i) {
        uint8_t byte = packed[i >> 1];
        uint32_t q = (i & 1) ? (byte & 0xFu) : (byte >> 4);
        out[i] = from_f32<T>(__fmul_rn(s_code[q], am));
    }
}

#define DEQUANT_KERNEL(NAME, T, NESTED)                                                        \
    extern "C" __global__ void NAME(const uint8_t* __restrict__ packed,                        \
                                    const float* __restrict__ absmax,                          \
                                    const uint8_t* __restrict__ codes,                         \
                                    const float* __restrict__ nested_absmax, float offset,     \
                                    const float* __restrict__ tables, T* __restrict__ out,     \
                                    uint64_t n_elems, uint32_t block_shift, uint32_t vec_ok) { \
        dequant<T, NESTED>(packed, absmax, codes, nested_absmax, offset, tables, out, n_elems,  \
                           block_shift, vec_ok);                                               \
    }

DEQUANT_KERNEL(dequant_plain_f32, float, false)
DEQUANT_KERNEL(dequant_plain_bf16, __nv_bfloat16, false)
DEQUANT_KERNEL(dequant_plain_f16, __half, false)
DEQUANT_KERNEL(dequant_nested_f32, float, true)
DEQUANT_KERNEL(dequant_nested_bf16, __nv_bfloat16, true)
DEQUANT_KERNEL(dequant_nested_f16, __half, true)
