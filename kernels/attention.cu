// Causal multi-head attention with GQA and right padding, flash-attention style: the forward
// keeps only lse[b,h,t]; the backward recomputes the probabilities from it. fp32 math in shared
// memory whatever the storage type. Layout: q/out [B,T,Hq,D], k/v [B,T,Hkv,D], lse/delta
// [B,Hq,T]. Query head h reads kv head h / (Hq/Hkv). Rows t >= lengths[b] produce zeros.
// Each block holds ATT_WARPS consecutive rows (one warp each) and streams tiles of ATT_TILE rows
// of the other operand through shared memory; within a tile lane j owns row j of the tile for the
// dot products, and lane d owns output dims d, d+32, ... . No atomics: every output row is owned
// by one warp, so results are deterministic. See src/ops/attention.rs.
#include "layers.cuh"

#define ATT_WARPS 8
#define ATT_TILE 32
#define ATT_MAXD 128
#define ATT_DPL (ATT_MAXD / 32)

__device__ __forceinline__ size_t qidx(int b, int t, int h, int T, int H, int D) {
    return (((size_t)b * T + t) * H + h) * D;
}

__device__ __forceinline__ int clamp_len(const int* lengths, int b, int T) {
    return min(max(lengths[b], 0), T);
}

// grid (ceil(T/ATT_WARPS), B*Hq), block 32*ATT_WARPS.
template <typename TT>
__device__ __forceinline__ void attn_forward(const TT* q, const TT* k, const TT* v, const int* lengths,
                                             TT* out, float* lse, int B, int T, int Hq, int Hk, int D,
                                             float scale) {
    __shared__ float ks[ATT_TILE][ATT_MAXD + 1];
    __shared__ float vs[ATT_TILE][ATT_MAXD];
    __shared__ float qs[ATT_WARPS][ATT_MAXD];
    const int b = blockIdx.y / Hq, h = blockIdx.y % Hq, hk = h / (Hq / Hk);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t0 = blockIdx.x * ATT_WARPS, t = t0 + warp;
    const int len = clamp_len(lengths, b, T);
    const bool active = t < len;
    if (t < T)
        for (int d = lane; d < D; d += 32) qs[warp][d] = active ? irb_to_float(q[qidx(b, t, h, T, Hq, D) + d]) : 0.f;
    float m = -INFINITY, l = 0.f, acc[ATT_DPL];
    #pragma unroll
    for (int i = 0; i < ATT_DPL; ++i) acc[i] = 0.f;
    const int kend = min(len, t0 + ATT_WARPS);
    for (int j0 = 0; j0 < kend; j0 += ATT_TILE) {
        __syncthreads();
        for (int e = threadIdx.x; e < ATT_TILE * D; e += blockDim.x) {
            const int jj = e / D, d = e % D, j = j0 + jj;
            float kv = 0.f, vv = 0.f;
            if (j < kend) {
                const size_t o = qidx(b, j, hk, T, Hk, D) + d;
                kv = irb_to_float(k[o]);
                vv = irb_to_float(v[o]);
            }
            ks[jj][d] = kv;
            vs[jj][d] = vv;
        }
        __syncthreads();
        if (!active || j0 > t) continue;  // warp-uniform
        const int j = j0 + lane;
        float s = -INFINITY;
        if (j <= t) {
            float dot = 0.f;
            for (int d = 0; d < D; ++d) dot += qs[warp][d] * ks[lane][d];
            s = dot * scale;
        }
        const float m_new = fmaxf(m, irb_warp_max(s));  // finite: key j0 <= t is always valid
        const float corr = expf(m - m_new);
        const float p = (j <= t) ? expf(s - m_new) : 0.f;
        l = l * corr + irb_warp_sum(p);
        #pragma unroll
        for (int i = 0; i < ATT_DPL; ++i) acc[i] *= corr;
        const int jmax = min(ATT_TILE, t - j0 + 1);
        for (int jj = 0; jj < jmax; ++jj) {
            const float pj = __shfl_sync(0xffffffffu, p, jj);
            #pragma unroll
            for (int i = 0; i < ATT_DPL; ++i) {
                const int d = lane + 32 * i;
                if (d < D) acc[i] += pj * vs[jj][d];
            }
        }
        m = m_new;
    }
    if (t >= T) return;
    const float inv_l = active ? 1.f / l : 0.f;
    #pragma unroll
    for (int i = 0; i < ATT_DPL; ++i) {
        const int d = lane + 32 * i;
        if (d < D) out[qidx(b, t, h, T, Hq, D) + d] = irb_from_float<TT>(acc[i] * inv_l);
    }
    if (lane == 0) lse[((size_t)b * Hq + h) * T + t] = active ? m + logf(l) : 0.f;
}

// dq and delta = rowsum(dout·out). grid (ceil(T/ATT_WARPS), B*Hq), block 32*ATT_WARPS.
template <typename TT>
__device__ __forceinline__ void attn_backward_dq(const TT* q, const TT* k, const TT* v, const TT* out,
                                                 const TT* dout, const float* lse, const int* lengths,
                                                 TT* dq, float* delta_out, int B, int T, int Hq, int Hk,
                                                 int D, float scale) {
    __shared__ float ks[ATT_TILE][ATT_MAXD + 1];
    __shared__ float vs[ATT_TILE][ATT_MAXD + 1];
    __shared__ float qs[ATT_WARPS][ATT_MAXD];
    __shared__ float dos[ATT_WARPS][ATT_MAXD];
    const int b = blockIdx.y / Hq, h = blockIdx.y % Hq, hk = h / (Hq / Hk);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t0 = blockIdx.x * ATT_WARPS, t = t0 + warp;
    const int len = clamp_len(lengths, b, T);
    const bool active = t < len;
    float delta = 0.f, L = 0.f;
    if (t < T) {
        float part = 0.f;
        for (int d = lane; d < D; d += 32) {
            const size_t o = qidx(b, t, h, T, Hq, D) + d;
            const float g = active ? irb_to_float(dout[o]) : 0.f;
            qs[warp][d] = active ? irb_to_float(q[o]) : 0.f;
            dos[warp][d] = g;
            part += g * (active ? irb_to_float(out[o]) : 0.f);
        }
        delta = irb_warp_sum(part);
        L = active ? lse[((size_t)b * Hq + h) * T + t] : 0.f;
        if (lane == 0) delta_out[((size_t)b * Hq + h) * T + t] = delta;
    }
    float acc[ATT_DPL];
    #pragma unroll
    for (int i = 0; i < ATT_DPL; ++i) acc[i] = 0.f;
    const int kend = min(len, t0 + ATT_WARPS);
    for (int j0 = 0; j0 < kend; j0 += ATT_TILE) {
        __syncthreads();
        for (int e = threadIdx.x; e < ATT_TILE * D; e += blockDim.x) {
            const int jj = e / D, d = e % D, j = j0 + jj;
            float kv = 0.f, vv = 0.f;
            if (j < kend) {
                const size_t o = qidx(b, j, hk, T, Hk, D) + d;
                kv = irb_to_float(k[o]);
                vv = irb_to_float(v[o]);
            }
            ks[jj][d] = kv;
            vs[jj][d] = vv;
        }
        __syncthreads();
        if (!active || j0 > t) continue;
        const int j = j0 + lane;
        float ds = 0.f;
        if (j <= t) {
            float s = 0.f, dp = 0.f;
            for (int d = 0; d < D; ++d) {
                s += qs[warp][d] * ks[lane][d];
                dp += dos[warp][d] * vs[lane][d];
            }
            const float p = expf(s * scale - L);
            ds = p * (dp - delta);
        }
        const int jmax = min(ATT_TILE, t - j0 + 1);
        for (int jj = 0; jj < jmax; ++jj) {
            const float dsj = __shfl_sync(0xffffffffu, ds, jj);
            #pragma unroll
            for (int i = 0; i < ATT_DPL; ++i) {
                const int d = lane + 32 * i;
                if (d < D) acc[i] += dsj * ks[jj][d];
            }
        }
    }
    if (t >= T) return;
    #pragma unroll
    for (int i = 0; i < ATT_DPL; ++i) {
        const int d = lane + 32 * i;
        if (d < D) dq[qidx(b, t, h, T, Hq, D) + d] = irb_from_float<TT>(active ? acc[i] * scale : 0.f);
    }
}

// dk, dv for each key row j of kv head hk, summed over the query heads of its group.
// grid (ceil(T/ATT_WARPS), B*Hkv), block 32*ATT_WARPS. Needs delta from attn_backward_dq.
template <typename TT>
__device__ __forceinline__ void attn_backward_dkv(const TT* q, const TT* k, const TT* v, const TT* dout,
                                                  const float* lse, const float* delta, const int* lengths,
                                                  TT* dk, TT* dv, int B, int T, int Hq, int Hk, int D,
                                                  float scale) {
    __shared__ float qs[ATT_TILE][ATT_MAXD + 1];
    __shared__ float dos[ATT_TILE][ATT_MAXD + 1];
    __shared__ float kr[ATT_WARPS][ATT_MAXD];
    __shared__ float vr[ATT_WARPS][ATT_MAXD];
    __shared__ float lse_s[ATT_TILE];
    __shared__ float delta_s[ATT_TILE];
    const int b = blockIdx.y / Hk, hk = blockIdx.y % Hk, group = Hq / Hk;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j0 = blockIdx.x * ATT_WARPS, j = j0 + warp;
    const int len = clamp_len(lengths, b, T);
    const bool active = j < len;
    if (j < T)
        for (int d = lane; d < D; d += 32) {
            const size_t o = qidx(b, j, hk, T, Hk, D) + d;
            kr[warp][d] = active ? irb_to_float(k[o]) : 0.f;
            vr[warp][d] = active ? irb_to_float(v[o]) : 0.f;
        }
    float acck[ATT_DPL], accv[ATT_DPL];
    #pragma unroll
    for (int i = 0; i < ATT_DPL; ++i) acck[i] = accv[i] = 0.f;
    for (int g = 0; g < group; ++g) {
        const int h = hk * group + g;
        const size_t row0 = ((size_t)b * Hq + h) * T;
        for (int i0 = j0; i0 < len; i0 += ATT_TILE) {
            __syncthreads();
            for (int e = threadIdx.x; e < ATT_TILE * D; e += blockDim.x) {
                const int ii = e / D, d = e % D, i = i0 + ii;
                float qv = 0.f, gv = 0.f;
                if (i < len) {
                    const size_t o = qidx(b, i, h, T, Hq, D) + d;
                    qv = irb_to_float(q[o]);
                    gv = irb_to_float(dout[o]);
                }
                qs[ii][d] = qv;
                dos[ii][d] = gv;
            }
            if (threadIdx.x < ATT_TILE) {
                const int i = i0 + threadIdx.x;
                lse_s[threadIdx.x] = i < len ? lse[row0 + i] : 0.f;
                delta_s[threadIdx.x] = i < len ? delta[row0 + i] : 0.f;
            }
            __syncthreads();
            if (!active) continue;
            const int i = i0 + lane;
            float p = 0.f, ds = 0.f;
            if (i >= j && i < len) {
                float s = 0.f, dp = 0.f;
                for (int d = 0; d < D; ++d) {
                    s += qs[lane][d] * kr[warp][d];
                    dp += dos[lane][d] * vr[warp][d];
                }
                p = expf(s * scale - lse_s[lane]);
                ds = p * (dp - delta_s[lane]);
            }
            const int iimax = min(ATT_TILE, len - i0);
            for (int ii = 0; ii < iimax; ++ii) {
                const float pi = __shfl_sync(0xffffffffu, p, ii);
                const float dsi = __shfl_sync(0xffffffffu, ds, ii);
                #pragma unroll
                for (int x = 0; x < ATT_DPL; ++x) {
                    const int d = lane + 32 * x;
                    if (d < D) {
                        accv[x] += pi * dos[ii][d];
                        acck[x] += dsi * qs[ii][d];
                    }
                }
            }
        }
    }
    if (j >= T) return;
    #pragma unroll
    for (int x = 0; x < ATT_DPL; ++x) {
        const int d = lane + 32 * x;
        if (d < D) {
            const size_t o = qidx(b, j, hk, T, Hk, D) + d;
            dk[o] = irb_from_float<TT>(active ? acck[x] * scale : 0.f);
            dv[o] = irb_from_float<TT>(active ? accv[x] : 0.f);
        }
    }
}

#define ATT_INST(TT, S)                                                                             \
    extern "C" __global__ void __launch_bounds__(32 * ATT_WARPS)                                    \
        attention_forward_##S(const TT* q, const TT* k, const TT* v, const int* lengths, TT* out,  \
                              float* lse, int B, int T, int Hq, int Hk, int D, float scale) {      \
        attn_forward<TT>(q, k, v, lengths, out, lse, B, T, Hq, Hk, D, scale);                       \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(32 * ATT_WARPS)                                    \
        attention_backward_dq_##S(const TT* q, const TT* k, const TT* v, const TT* out,            \
                                  const TT* dout, const float* lse, const int* lengths, TT* dq,    \
                                  float* delta, int B, int T, int Hq, int Hk, int D, float scale) { \
        attn_backward_dq<TT>(q, k, v, out, dout, lse, lengths, dq, delta, B, T, Hq, Hk, D, scale);  \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(32 * ATT_WARPS)                                    \
        attention_backward_dkv_##S(const TT* q, const TT* k, const TT* v, const TT* dout,          \
                                   const float* lse, const float* delta, const int* lengths,       \
                                   TT* dk, TT* dv, int B, int T, int Hq, int Hk, int D,            \
                                   float scale) {                                                  \
        attn_backward_dkv<TT>(q, k, v, dout, lse, delta, lengths, dk, dv, B, T, Hq, Hk, D, scale);  \
    }

ATT_INST(float, f32)
ATT_INST(__nv_bfloat16, bf16)

// Attention of new rows over a KV cache (incremental decoding), the CUDA twin of
// attention::decode_cpu. q/out [N, Hq, D]; k_cache/v_cache [B*cap, Hk, D]: slot b*cap + t holds
// token t of sequence b (keys after rotary). Row r is token pos[r] of sequence seq[r] and sees the
// slots seq[r]*cap + lo ..= seq[r]*cap + pos[r], lo = max(0, pos[r] + 1 - window) (window <= 0: no
// window); the caller has already written them, this step's rows included.
// One warp per (row, head), DEC_WARPS warps a block, grid (ceil(N/DEC_WARPS), Hq): lane l owns
// dims l, l+32, ... of q, the accumulator and the output, and each score is a warp-reduced dot
// product (coalesced reads of each cache row). As on the CPU: the max score first, then
// p = exp(s - max) once per score, their sum and sum(p v) in fp32, one division at the end. The
// second pass recomputes the scores (bitwise the same) rather than storing them, since a row may
// see any number of keys. No shared memory, no atomics, no block barrier. seq/pos are validated on
// the host; a row outside the cache writes NaN so that it cannot go unseen.
#define DEC_WARPS 4

template <typename TT>
__device__ __forceinline__ void attn_decode(const TT* q, const TT* kc, const TT* vc, const unsigned* seq,
                                            const unsigned* pos, TT* out, int N, int B, int cap, int Hq,
                                            int Hk, int D, float scale, int window) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int r = blockIdx.x * DEC_WARPS + warp, h = blockIdx.y;
    if (r >= N || h >= Hq) return;  // warp-uniform
    const int hk = h / (Hq / Hk);
    const unsigned b = seq[r], t = pos[r];
    TT* o = out + ((size_t)r * Hq + h) * D;
    if (b >= (unsigned)B || t >= (unsigned)cap) {
        for (int d = lane; d < D; d += 32) o[d] = irb_from_float<TT>(NAN);
        return;
    }
    const int last = (int)t;
    const int lo = window > 0 ? max(0, last + 1 - window) : 0;
    const size_t stride = (size_t)Hk * D;
    const size_t base = (size_t)b * cap * stride + (size_t)hk * D;
    const TT* qh = q + ((size_t)r * Hq + h) * D;
    float qr[ATT_DPL];
    #pragma unroll
    for (int i = 0; i < ATT_DPL; ++i) {
        const int d = lane + 32 * i;
        qr[i] = d < D ? irb_to_float(qh[d]) : 0.f;
    }
    float m = -INFINITY;
    for (int j = lo; j <= last; ++j) {
        const TT* kj = kc + base + (size_t)j * stride;
        float part = 0.f;
        #pragma unroll
        for (int i = 0; i < ATT_DPL; ++i) {
            const int d = lane + 32 * i;
            if (d < D) part += qr[i] * irb_to_float(kj[d]);
        }
        m = fmaxf(m, irb_warp_sum(part) * scale);
    }
    float l = 0.f, acc[ATT_DPL];
    #pragma unroll
    for (int i = 0; i < ATT_DPL; ++i) acc[i] = 0.f;
    for (int j = lo; j <= last; ++j) {
        const size_t off = base + (size_t)j * stride;
        float part = 0.f;
        #pragma unroll
        for (int i = 0; i < ATT_DPL; ++i) {
            const int d = lane + 32 * i;
            if (d < D) part += qr[i] * irb_to_float(kc[off + d]);
        }
        const float p = expf(irb_warp_sum(part) * scale - m);
        l += p;
        #pragma unroll
        for (int i = 0; i < ATT_DPL; ++i) {
            const int d = lane + 32 * i;
            if (d < D) acc[i] += p * irb_to_float(vc[off + d]);
        }
    }
    const float inv = 1.f / l;  // l >= 1: the max-score key contributes exp(0)
    #pragma unroll
    for (int i = 0; i < ATT_DPL; ++i) {
        const int d = lane + 32 * i;
        if (d < D) o[d] = irb_from_float<TT>(acc[i] * inv);
    }
}

#define ATT_DEC_INST(TT, S)                                                                         \
    extern "C" __global__ void __launch_bounds__(32 * DEC_WARPS)                                    \
        attention_decode_##S(const TT* q, const TT* k_cache, const TT* v_cache, const unsigned* seq, \
                             const unsigned* pos, TT* out, int N, int B, int cap, int Hq, int Hk,  \
                             int D, float scale, int window) {                                     \
        attn_decode<TT>(q, k_cache, v_cache, seq, pos, out, N, B, cap, Hq, Hk, D, scale, window);   \
    }

ATT_DEC_INST(float, f32)
ATT_DEC_INST(__nv_bfloat16, bf16)
