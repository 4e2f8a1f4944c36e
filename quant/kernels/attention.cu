// Fused attention, forward and backward, for training: o = softmax(q kᵀ · scale + mask) v without
// materialising the [T, Tk] scores or probabilities (the composition keeps several of them per
// head, each [T, Tk], alive until the backward). The math and the CPU reference loops are in
// quant/src/fused/attention.rs; the per-device tests compare both against the candle composition.
//
// Shapes: q, o, do [B, H, T, D]; k, v [B, Hk, Tk, D] with H = Hk · rep (grouped-query attention:
// query head h reads key head h / rep); mask [Bm, 1, T, Tk] additive (Bm = B or 1; 0 or -inf), or
// none. D <= MAX_D. All arithmetic f32; inputs and outputs T (float, bf16, half).
//
// Forward (per query row i; online softmax, flash-attention style):
//   s_j = scale · q_i·k_j + mask_ij,   m = max_j s_j,   l = Σ_j exp(s_j − m),
//   o_i = Σ_j exp(s_j − m) v_j / l.
// Backward (from the row statistics L_i = m + log l and Δ_i = do_i·o_i, with p_ij = exp(s_ij − L_i)):
//   dv_j = Σ_i p_ij do_i,   dp_ij = do_i·v_j,   ds_ij = p_ij (dp_ij − Δ_i),
//   dq_i = scale Σ_j ds_ij k_j,   dk_j = scale Σ_i ds_ij q_i.
// A masked (-inf) entry contributes nothing and is skipped before its dot product.
//
// Versions:
//   v1 (this file): one warp per row (a query row for attn_fwd / attn_stats / attn_dq, a key row
//      for attn_dkv), lanes striding over D (<= 8 values each), dot products reduced with warp
//      shuffles, keys or queries walked one at a time from global memory (L2-resident for one
//      head: Tk·D·2 bytes). CUDA cores only: no tensor cores, no shared-memory tiling; correctness
//      and O(T) memory first. Four warps per block.

#include "common.cuh"

#define MAX_D 256
#define PER_LANE (MAX_D / 32)

struct AttnGeom {
    uint32_t b, h, hk, t, tk, d;
    uint32_t mask_batch_stride;  // elements between the mask's batches (0: shared), Tk per row
    uint32_t has_mask;
    float scale;
};

// Loads the D values of `row` (lanes stride over D) into registers, zero beyond D.
template <typename T>
__device__ __forceinline__ void load_row(const T* __restrict__ p, uint32_t d, float r[PER_LANE]) {
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int c = 0; c < PER_LANE; ++c) {
        uint32_t k = lane + 32 * c;
        r[c] = k < d ? to_f32(p[k]) : 0.f;
    }
}

template <typename T>
__device__ __forceinline__ float dot_row(const float a[PER_LANE], const T* __restrict__ p,
                                         uint32_t d) {
    int lane = threadIdx.x & 31;
    float s = 0.f;
#pragma unroll
    for (int c = 0; c < PER_LANE; ++c) {
        uint32_t k = lane + 32 * c;
        if (k < d) s += a[c] * to_f32(p[k]);
    }
    return warp_sum(s);
}

template <typename T>
__device__ __forceinline__ float mask_at(const T* __restrict__ mask, const AttnGeom& g,
                                         uint64_t b, uint64_t i, uint64_t j) {
    return g.has_mask ? to_f32(mask[b * g.mask_batch_stride + i * g.tk + j]) : 0.f;
}

// The warp's row index, or -1 past the end. Rows are (b, head, t) of the given counts.
__device__ __forceinline__ int64_t warp_row(uint64_t rows) {
    uint64_t r = ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    return r < rows ? (int64_t)r : -1;
}

// Online-softmax statistics (m, l) of query row (b, h, i) against every key.
template <typename T>
__device__ float2 row_stats(const float qv[PER_LANE], const T* __restrict__ k,
                            const T* __restrict__ mask, const AttnGeom& g, uint64_t b,
                            uint64_t kh, uint64_t i) {
    float m = NEG_INF, l = 0.f;
    const T* kb = k + (b * g.hk + kh) * (uint64_t)g.tk * g.d;
    for (uint32_t j = 0; j < g.tk; ++j) {
        float mk = mask_at(mask, g, b, i, j);
        if (mk == NEG_INF) continue;
        float s = dot_row(qv, kb + (uint64_t)j * g.d, g.d) * g.scale + mk;
        float m_new = fmaxf(m, s);
        l = l * expf(m - m_new) + expf(s - m_new);
        m = m_new;
    }
    return make_float2(m, l);
}

template <typename T>
__device__ void attn_fwd(const T* __restrict__ q, const T* __restrict__ k,
                         const T* __restrict__ v, const T* __restrict__ mask, T* __restrict__ o,
                         AttnGeom g) {
    int64_t row = warp_row((uint64_t)g.b * g.h * g.t);
    if (row < 0) return;
    uint64_t i = row % g.t, h = (row / g.t) % g.h, b = row / g.t / g.h;
    uint64_t kh = h / (g.h / g.hk);
    float qv[PER_LANE], acc[PER_LANE];
    load_row(q + row * g.d, g.d, qv);
#pragma unroll
    for (int c = 0; c < PER_LANE; ++c) acc[c] = 0.f;
    const T* kb = k + (b * g.hk + kh) * (uint64_t)g.tk * g.d;
    const T* vb = v + (b * g.hk + kh) * (uint64_t)g.tk * g.d;
    float m = NEG_INF, l = 0.f;
    int lane = threadIdx.x & 31;
    for (uint32_t j = 0; j < g.tk; ++j) {
        float mk = mask_at(mask, g, b, i, j);
        if (mk == NEG_INF) continue;
        float s = dot_row(qv, kb + (uint64_t)j * g.d, g.d) * g.scale + mk;
        float m_new = fmaxf(m, s);
        float corr = expf(m - m_new), p = expf(s - m_new);
        l = l * corr + p;
        const T* vj = vb + (uint64_t)j * g.d;
#pragma unroll
        for (int c = 0; c < PER_LANE; ++c) {
            uint32_t kk = lane + 32 * c;
            acc[c] = acc[c] * corr + (kk < g.d ? p * to_f32(vj[kk]) : 0.f);
        }
        m = m_new;
    }
#pragma unroll
    for (int c = 0; c < PER_LANE; ++c) {
        uint32_t kk = lane + 32 * c;
        if (kk < g.d) o[row * g.d + kk] = from_f32<T>(acc[c] / l);
    }
}

// stats[row] = (L, Δ) for the backward.
template <typename T>
__device__ void attn_stats(const T* __restrict__ q, const T* __restrict__ k,
                           const T* __restrict__ mask, const T* __restrict__ o,
                           const T* __restrict__ dout, float2* __restrict__ stats, AttnGeom g) {
    int64_t row = warp_row((uint64_t)g.b * g.h * g.t);
    if (row < 0) return;
    uint64_t i = row % g.t, h = (row / g.t) % g.h, b = row / g.t / g.h;
    float qv[PER_LANE], ov[PER_LANE];
    load_row(q + row * g.d, g.d, qv);
    float2 ml = row_stats(qv, k, mask, g, b, h / (g.h / g.hk), i);
    load_row(o + row * g.d, g.d, ov);
    float delta = dot_row(ov, dout + row * g.d, g.d);
    if ((threadIdx.x & 31) == 0) stats[row] = make_float2(ml.x + logf(ml.y), delta);
}

template <typename T>
__device__ void attn_dq(const T* __restrict__ q, const T* __restrict__ k,
                        const T* __restrict__ v, const T* __restrict__ mask,
                        const T* __restrict__ dout, const float2* __restrict__ stats,
                        T* __restrict__ dq, AttnGeom g) {
    int64_t row = warp_row((uint64_t)g.b * g.h * g.t);
    if (row < 0) return;
    uint64_t i = row % g.t, h = (row / g.t) % g.h, b = row / g.t / g.h;
    uint64_t kh = h / (g.h / g.hk);
    float qv[PER_LANE], dov[PER_LANE], acc[PER_LANE];
    load_row(q + row * g.d, g.d, qv);
    load_row(dout + row * g.d, g.d, dov);
#pragma unroll
    for (int c = 0; c < PER_LANE; ++c) acc[c] = 0.f;
    float2 st = stats[row];
    const T* kb = k + (b * g.hk + kh) * (uint64_t)g.tk * g.d;
    const T* vb = v + (b * g.hk + kh) * (uint64_t)g.tk * g.d;
    int lane = threadIdx.x & 31;
    for (uint32_t j = 0; j < g.tk; ++j) {
        float mk = mask_at(mask, g, b, i, j);
        if (mk == NEG_INF) continue;
        const T* kj = kb + (uint64_t)j * g.d;
        float p = expf(dot_row(qv, kj, g.d) * g.scale + mk - st.x);
        float ds = p * (dot_row(dov, vb + (uint64_t)j * g.d, g.d) - st.y);
#pragma unroll
        for (int c = 0; c < PER_LANE; ++c) {
            uint32_t kk = lane + 32 * c;
            if (kk < g.d) acc[c] += ds * to_f32(kj[kk]);
        }
    }
#pragma unroll
    for (int c = 0; c < PER_LANE; ++c) {
        uint32_t kk = lane + 32 * c;
        if (kk < g.d) dq[row * g.d + kk] = from_f32<T>(acc[c] * g.scale);
    }
}

// dkv[b, kh, j] = dk_j | dv_j (2·D values), summed over the rep query heads of key head kh.
template <typename T>
__device__ void attn_dkv(const T* __restrict__ q, const T* __restrict__ k,
                         const T* __restrict__ v, const T* __restrict__ mask,
                         const T* __restrict__ dout, const float2* __restrict__ stats,
                         T* __restrict__ dkv, AttnGeom g) {
    int64_t row = warp_row((uint64_t)g.b * g.hk * g.tk);
    if (row < 0) return;
    uint64_t j = row % g.tk, kh = (row / g.tk) % g.hk, b = row / g.tk / g.hk;
    uint32_t rep = g.h / g.hk;
    float kv[PER_LANE], vv[PER_LANE], dk[PER_LANE], dv[PER_LANE];
    load_row(k + row * g.d, g.d, kv);
    load_row(v + row * g.d, g.d, vv);
#pragma unroll
    for (int c = 0; c < PER_LANE; ++c) dk[c] = dv[c] = 0.f;
    int lane = threadIdx.x & 31;
    for (uint32_t r = 0; r < rep; ++r) {
        uint64_t h = kh * rep + r;
        uint64_t base = (b * g.h + h) * (uint64_t)g.t;
        for (uint32_t i = 0; i < g.t; ++i) {
            float mk = mask_at(mask, g, b, i, j);
            if (mk == NEG_INF) continue;
            const T* qi = q + (base + i) * g.d;
            const T* doi = dout + (base + i) * g.d;
            float2 st = stats[base + i];
            float p = expf(dot_row(kv, qi, g.d) * g.scale + mk - st.x);
            float ds = p * (dot_row(vv, doi, g.d) - st.y);
#pragma unroll
            for (int c = 0; c < PER_LANE; ++c) {
                uint32_t kk = lane + 32 * c;
                if (kk < g.d) {
                    dv[c] += p * to_f32(doi[kk]);
                    dk[c] += ds * to_f32(qi[kk]);
                }
            }
        }
    }
#pragma unroll
    for (int c = 0; c < PER_LANE; ++c) {
        uint32_t kk = lane + 32 * c;
        if (kk < g.d) {
            dkv[row * 2 * g.d + kk] = from_f32<T>(dk[c] * g.scale);
            dkv[row * 2 * g.d + g.d + kk] = from_f32<T>(dv[c]);
        }
    }
}

#define KERNELS(SUFFIX, T)                                                                      \
    extern "C" __global__ void attn_fwd_##SUFFIX(const T* q, const T* k, const T* v,            \
                                                 const T* mask, T* o, AttnGeom g) {             \
        attn_fwd<T>(q, k, v, mask, o, g);                                                       \
    }                                                                                           \
    extern "C" __global__ void attn_stats_##SUFFIX(const T* q, const T* k, const T* mask,       \
                                                   const T* o, const T* dout, float2* stats,    \
                                                   AttnGeom g) {                                \
        attn_stats<T>(q, k, mask, o, dout, stats, g);                                           \
    }                                                                                           \
    extern "C" __global__ void attn_dq_##SUFFIX(const T* q, const T* k, const T* v,             \
                                                const T* mask, const T* dout,                   \
                                                const float2* stats, T* dq, AttnGeom g) {       \
        attn_dq<T>(q, k, v, mask, dout, stats, dq, g);                                          \
    }                                                                                           \
    extern "C" __global__ void attn_dkv_##SUFFIX(const T* q, const T* k, const T* v,            \
                                                 const T* mask, const T* dout,                  \
                                                 const float2* stats, T* dkv, AttnGeom g) {     \
        attn_dkv<T>(q, k, v, mask, dout, stats, dkv, g);                                        \
    }

FOR_EACH_TYPE(KERNELS)
