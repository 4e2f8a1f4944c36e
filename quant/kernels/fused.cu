// Fused forward and backward kernels for the ops of QLoRA training that candle has no
// differentiable fast path for (candle-nn 0.11's rms_norm, rope, softmax_last_dim and sdpa have no
// backward). The math, its derivation and the CPU reference of each op are in
// quant/src/fused/mod.rs (`*_ref`, plain candle compositions) and quant/src/fused/cpu.rs (the same
// loops as here, in Rust); the per-device tests compare this file against both.
//
// Conventions: T is float, __nv_bfloat16 or __half; all arithmetic is f32; a value is rounded to T
// exactly where the candle composition it replaces rounds (so f32 results differ from the
// composition only by summation order, and half types by at most a rounding step). One CUDA block
// of threads (a multiple of 32, at most 1024; the launcher picks 256) per row for the row ops.
//
// Versions:
//   v1 (this file): one block per row, warp-shuffle + shared-memory block reductions; elementwise
//      ops one thread per output element (dropout: grid-stride, one 64-bit hash per element).
//      Rows are re-read from global memory (L1/L2-resident for the row lengths used here: hidden
//      3072, keys <= 4096, vocab 32064) instead of staged in shared memory.

#include "common.cuh"

// ---------------------------------------------------------------------------------------------
// RMSNorm with a frozen weight, rows of `h`:  den = sqrt(mean(x^2) + eps),  n = x / den,
// y = T(T(n) w).  Backward (dx only):  g = T(dy w),  dx = (g - n mean(g n)) / den.

template <typename T>
__device__ void rmsnorm_fwd(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                            uint32_t h, float eps) {
    __shared__ float scratch[32];
    const T* xr = x + (uint64_t)blockIdx.x * h;
    T* yr = y + (uint64_t)blockIdx.x * h;
    float ss = 0.f;
    for (uint32_t i = threadIdx.x; i < h; i += blockDim.x) {
        float v = to_f32(xr[i]);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    float den = sqrtf(ss / (float)h + eps);
    for (uint32_t i = threadIdx.x; i < h; i += blockDim.x) {
        float n = round_t<T>(to_f32(xr[i]) / den);
        yr[i] = from_f32<T>(n * to_f32(w[i]));
    }
}

template <typename T>
__device__ void rmsnorm_bwd(const T* __restrict__ x, const T* __restrict__ w,
                            const T* __restrict__ dy, T* __restrict__ dx, uint32_t h, float eps) {
    __shared__ float scratch[32];
    uint64_t row = (uint64_t)blockIdx.x * h;
    float ss = 0.f, gn = 0.f;
    for (uint32_t i = threadIdx.x; i < h; i += blockDim.x) {
        float v = to_f32(x[row + i]);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    float den = sqrtf(ss / (float)h + eps);
    for (uint32_t i = threadIdx.x; i < h; i += blockDim.x) {
        float g = round_t<T>(to_f32(dy[row + i]) * to_f32(w[i]));
        gn += g * (to_f32(x[row + i]) / den);
    }
    float mean_gn = block_sum(gn, scratch) / (float)h;
    for (uint32_t i = threadIdx.x; i < h; i += blockDim.x) {
        float g = round_t<T>(to_f32(dy[row + i]) * to_f32(w[i]));
        float n = to_f32(x[row + i]) / den;
        dx[row + i] = from_f32<T>((g - n * mean_gn) / den);
    }
}

// ---------------------------------------------------------------------------------------------
// Rotate-half rotary embedding on x [B, H, T, D] with cos/sin [Bc, 1, T, R] (Bc = B or 1), the
// first R dims rotated (R even, half = R/2), the rest passed through:
//   y_j = T(T(x_j c_j) + T(rot_j s_j)),  rot_j = -x_{j+half} (j < half), x_{j-half} (j < R).
// Backward (the transpose of the rotation):
//   dx_j = T(T(dy_j c_j) + T(dy_{j+half} s_{j+half}))    j < half
//   dx_j = T(T(dy_j c_j) - T(dy_{j-half} s_{j-half}))    half <= j < R
//   dx_j = dy_j                                           j >= R

template <typename T, bool BACKWARD>
__device__ void rope(const T* __restrict__ x, const T* __restrict__ cos,
                     const T* __restrict__ sin, T* __restrict__ y, uint64_t n, uint32_t heads,
                     uint32_t t_len, uint32_t d, uint32_t r, uint32_t cos_batch_stride) {
    uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n) return;
    uint32_t j = (uint32_t)(idx % d);
    uint64_t row = idx / d;  // (b, h, t)
    uint32_t t = (uint32_t)(row % t_len);
    uint64_t b = row / t_len / heads;
    if (j >= r) {
        y[idx] = x[idx];
        return;
    }
    uint32_t half = r / 2;
    uint64_t tab = b * cos_batch_stride + (uint64_t)t * r;
    float a = round_t<T>(to_f32(x[idx]) * to_f32(cos[tab + j]));
    float rotated;
    if (!BACKWARD) {
        rotated = j < half ? -to_f32(x[idx + half]) : to_f32(x[idx - half]);
        rotated = round_t<T>(rotated * to_f32(sin[tab + j]));
    } else {
        uint32_t k = j < half ? j + half : j - half;
        float p = round_t<T>(to_f32(x[idx - j + k]) * to_f32(sin[tab + k]));
        rotated = j < half ? p : -p;
    }
    y[idx] = from_f32<T>(a + rotated);
}

// ---------------------------------------------------------------------------------------------
// SwiGLU on a fused gate|up row of 2I values:  y_i = T(up_i T(silu(gate_i))),
// silu(g) = g / (1 + exp(-g)).  Backward:  d_up_i = dy_i silu(g_i),
// d_gate_i = dy_i up_i silu'(g_i),  silu'(g) = s (1 + g (1 - s)),  s = 1 / (1 + exp(-g)).
// (The composition rounds silu(g) to T; its backward rounds dy*up and dy*silu products to T.)

template <typename T>
__device__ void swiglu_fwd(const T* __restrict__ gu, T* __restrict__ y, uint64_t n,
                           uint32_t inter) {
    uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n) return;
    uint64_t row = idx / inter;
    uint32_t i = (uint32_t)(idx % inter);
    const T* g = gu + row * 2 * inter;
    float gate = to_f32(g[i]), up = to_f32(g[inter + i]);
    float silu = round_t<T>(gate / (1.f + expf(-gate)));
    y[idx] = from_f32<T>(up * silu);
}

template <typename T>
__device__ void swiglu_bwd(const T* __restrict__ gu, const T* __restrict__ dy,
                           T* __restrict__ dgu, uint64_t n, uint32_t inter) {
    uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n) return;
    uint64_t row = idx / inter;
    uint32_t i = (uint32_t)(idx % inter);
    const T* g = gu + row * 2 * inter;
    T* d = dgu + row * 2 * inter;
    float gate = to_f32(g[i]), up = to_f32(g[inter + i]), grad = to_f32(dy[idx]);
    float s = 1.f / (1.f + expf(-gate));
    float silu = round_t<T>(gate * s);
    float dsilu = round_t<T>(grad * up);
    d[inter + i] = from_f32<T>(grad * silu);
    d[i] = from_f32<T>(dsilu * (s * (1.f + gate * (1.f - s))));
}

// ---------------------------------------------------------------------------------------------
// Softmax over rows of `len` in f32, of the attention scores `x * scale + mask` (a plain softmax
// when scale = 1 and there is no mask):  v = T(T(x scale) + mask),  y = T(exp(v - max) / sum).
// The mask [Bm, 1, T, len] (Bm = B or 1; rows of x are (b, head, t)) is added as the composition
// adds it, after rounding the scaled scores. Backward from x (v recomputed in f32, not the rounded
// y), the mask being a constant:  dx = T(T(y (dy - sum(dy y))) scale).

struct SoftmaxRows {
    uint32_t len, t_len, heads, mask_batch_stride, has_mask;
    float scale;
};

// The softmax input of element i of row `row` (products and sums never contracted into an FMA).
template <typename T>
__device__ __forceinline__ float softmax_in(const T* __restrict__ x, const T* __restrict__ mask,
                                            const SoftmaxRows& g, uint64_t row, uint32_t i) {
    float v = round_t<T>(__fmul_rn(to_f32(x[row * g.len + i]), g.scale));
    if (g.has_mask) {
        uint64_t b = row / g.t_len / g.heads, t = row % g.t_len;
        v = round_t<T>(__fadd_rn(v, to_f32(mask[b * g.mask_batch_stride + t * g.len + i])));
    }
    return v;
}

// (max, sum of exp(v - max)) of row `row`, on every thread of the block.
template <typename T>
__device__ float2 softmax_stats(const T* __restrict__ x, const T* __restrict__ mask,
                                const SoftmaxRows& g, uint64_t row, float* scratch) {
    float m = NEG_INF;
    for (uint32_t i = threadIdx.x; i < g.len; i += blockDim.x)
        m = fmaxf(m, softmax_in(x, mask, g, row, i));
    m = block_max(m, scratch);
    float s = 0.f;
    for (uint32_t i = threadIdx.x; i < g.len; i += blockDim.x)
        s += expf(softmax_in(x, mask, g, row, i) - m);
    return make_float2(m, block_sum(s, scratch));
}

template <typename T>
__device__ void softmax_fwd(const T* __restrict__ x, const T* __restrict__ mask,
                            T* __restrict__ y, SoftmaxRows g) {
    __shared__ float scratch[32];
    uint64_t row = blockIdx.x;
    float2 ms = softmax_stats(x, mask, g, row, scratch);
    for (uint32_t i = threadIdx.x; i < g.len; i += blockDim.x)
        y[row * g.len + i] = from_f32<T>(expf(softmax_in(x, mask, g, row, i) - ms.x) / ms.y);
}

template <typename T>
__device__ void softmax_bwd(const T* __restrict__ x, const T* __restrict__ mask,
                            const T* __restrict__ dy, T* __restrict__ dx, SoftmaxRows g) {
    __shared__ float scratch[32];
    uint64_t row = blockIdx.x;
    float2 ms = softmax_stats(x, mask, g, row, scratch);
    float dot = 0.f;
    for (uint32_t i = threadIdx.x; i < g.len; i += blockDim.x)
        dot += to_f32(dy[row * g.len + i]) * (expf(softmax_in(x, mask, g, row, i) - ms.x) / ms.y);
    dot = block_sum(dot, scratch);
    for (uint32_t i = threadIdx.x; i < g.len; i += blockDim.x) {
        float p = expf(softmax_in(x, mask, g, row, i) - ms.x) / ms.y;
        float d = round_t<T>(p * (to_f32(dy[row * g.len + i]) - dot));
        dx[row * g.len + i] = from_f32<T>(__fmul_rn(d, g.scale));
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy per row of logits [N, V] against u32 targets, in f32:
//   loss_r = log(sum_v exp(x_v - max)) + max - x_t.   A target >= V gives NaN.
// Backward with the per-row upstream gradient g_r (f32):  dx_v = T(g_r (softmax_v - [v == t])).

template <typename T>
__device__ void xent_fwd(const T* __restrict__ x, const uint32_t* __restrict__ targets,
                         float* __restrict__ loss, uint32_t vocab) {
    __shared__ float scratch[32];
    uint64_t row = (uint64_t)blockIdx.x * vocab;
    float m = NEG_INF;
    for (uint32_t i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, to_f32(x[row + i]));
    m = block_max(m, scratch);
    float s = 0.f;
    for (uint32_t i = threadIdx.x; i < vocab; i += blockDim.x) s += expf(to_f32(x[row + i]) - m);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        uint32_t t = targets[blockIdx.x];
        loss[blockIdx.x] = t < vocab ? logf(s) + m - to_f32(x[row + t]) : QNAN;
    }
}

template <typename T>
__device__ void xent_bwd(const T* __restrict__ x, const uint32_t* __restrict__ targets,
                         const float* __restrict__ g, T* __restrict__ dx, uint32_t vocab) {
    __shared__ float scratch[32];
    uint64_t row = (uint64_t)blockIdx.x * vocab;
    float m = NEG_INF;
    for (uint32_t i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, to_f32(x[row + i]));
    m = block_max(m, scratch);
    float s = 0.f;
    for (uint32_t i = threadIdx.x; i < vocab; i += blockDim.x) s += expf(to_f32(x[row + i]) - m);
    s = block_sum(s, scratch);
    uint32_t t = targets[blockIdx.x];
    float gr = g[blockIdx.x];
    for (uint32_t i = threadIdx.x; i < vocab; i += blockDim.x) {
        float p = expf(to_f32(x[row + i]) - m) / s;
        dx[row + i] = from_f32<T>(gr * (p - (i == t ? 1.f : 0.f)));
    }
}

// ---------------------------------------------------------------------------------------------
// Inverted dropout with a counter-based mask (the contract is in quant/src/fused/mod.rs; the CPU
// loop in quant/src/fused/cpu.rs computes the same bits): element i = b * len + j (row b of rows
// of len elements, global row first + b * step) has the counter c = ((first + b * step) << 40) + j
// and is kept iff
//   (splitmix64(seed ^ c * 0x9E3779B97F4A7C15) >> 40) < threshold,
// and is then T(x * scale) (scale = 1 / keep in f32), else +0. Grid-stride, one hash per element.

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

template <typename T>
__device__ void dropout(const T* __restrict__ x, T* __restrict__ y, uint64_t n, uint64_t seed,
                        uint32_t threshold, float scale, uint64_t len, uint64_t first,
                        uint64_t step) {
    uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        uint64_t b = i / len;
        uint64_t c = ((first + b * step) << 40) + (i - b * len);
        uint32_t u = (uint32_t)(splitmix64(seed ^ (c * 0x9E3779B97F4A7C15ull)) >> 40);
        y[i] = u < threshold ? from_f32<T>(__fmul_rn(to_f32(x[i]), scale)) : from_f32<T>(0.f);
    }
}

// ---------------------------------------------------------------------------------------------

#define KERNELS(SUFFIX, T)                                                                     \
    extern "C" __global__ void rmsnorm_fwd_##SUFFIX(const T* x, const T* w, T* y, uint32_t h,  \
                                                    float eps) {                               \
        rmsnorm_fwd<T>(x, w, y, h, eps);                                                       \
    }                                                                                          \
    extern "C" __global__ void rmsnorm_bwd_##SUFFIX(const T* x, const T* w, const T* dy,       \
                                                    T* dx, uint32_t h, float eps) {            \
        rmsnorm_bwd<T>(x, w, dy, dx, h, eps);                                                  \
    }                                                                                          \
    extern "C" __global__ void rope_fwd_##SUFFIX(const T* x, const T* c, const T* s, T* y,     \
                                                 uint64_t n, uint32_t heads, uint32_t t_len,   \
                                                 uint32_t d, uint32_t r, uint32_t cbs) {       \
        rope<T, false>(x, c, s, y, n, heads, t_len, d, r, cbs);                                \
    }                                                                                          \
    extern "C" __global__ void rope_bwd_##SUFFIX(const T* dy, const T* c, const T* s, T* dx,   \
                                                 uint64_t n, uint32_t heads, uint32_t t_len,   \
                                                 uint32_t d, uint32_t r, uint32_t cbs) {       \
        rope<T, true>(dy, c, s, dx, n, heads, t_len, d, r, cbs);                               \
    }                                                                                          \
    extern "C" __global__ void swiglu_fwd_##SUFFIX(const T* gu, T* y, uint64_t n,              \
                                                   uint32_t inter) {                           \
        swiglu_fwd<T>(gu, y, n, inter);                                                        \
    }                                                                                          \
    extern "C" __global__ void swiglu_bwd_##SUFFIX(const T* gu, const T* dy, T* dgu,           \
                                                   uint64_t n, uint32_t inter) {               \
        swiglu_bwd<T>(gu, dy, dgu, n, inter);                                                  \
    }                                                                                          \
    extern "C" __global__ void softmax_fwd_##SUFFIX(const T* x, const T* mask, T* y,           \
                                                    SoftmaxRows g) {                           \
        softmax_fwd<T>(x, mask, y, g);                                                         \
    }                                                                                          \
    extern "C" __global__ void softmax_bwd_##SUFFIX(const T* x, const T* mask, const T* dy,    \
                                                    T* dx, SoftmaxRows g) {                    \
        softmax_bwd<T>(x, mask, dy, dx, g);                                                    \
    }                                                                                          \
    extern "C" __global__ void xent_fwd_##SUFFIX(const T* x, const uint32_t* t, float* loss,   \
                                                 uint32_t vocab) {                             \
        xent_fwd<T>(x, t, loss, vocab);                                                        \
    }                                                                                          \
    extern "C" __global__ void xent_bwd_##SUFFIX(const T* x, const uint32_t* t, const float* g, \
                                                 T* dx, uint32_t vocab) {                      \
        xent_bwd<T>(x, t, g, dx, vocab);                                                       \
    }                                                                                          \
    extern "C" __global__ void dropout_##SUFFIX(const T* x, T* y, uint64_t n, uint64_t seed,   \
                                                uint32_t threshold, float scale, uint64_t len, \
                                                uint64_t first, uint64_t step) {               \
        dropout<T>(x, y, n, seed, threshold, scale, len, first, step);                         \
    }

FOR_EACH_TYPE(KERNELS)
