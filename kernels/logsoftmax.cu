// Fused log-softmax + target gather over logits [R, V] (f32 or bf16), and its in-place backward.
//
// Why this shape (see REFERENCE.md §8): the op is memory-bound, so every kernel reads each logit
// from HBM once per sweep and never writes an fp32 [R, V] tensor. The forward is an online
// softmax: a running max `m` (pre-scaled by log2 e), a running Σ 2^(x·log2e − m) and, for the
// entropy, a running Σ 2^(d)·d with d = x·log2e − m. Each element costs one `ex2`; the running
// sums are rescaled once per group of U 16-byte vectors (one extra `ex2` per group), not per
// element, so the special-function unit stays below the memory time.
//
// Layout: one block per row. Rows start at r·V, which is not 16-byte aligned for odd V, so each
// row is split into a scalar head (up to the first 16-byte boundary), a body of 16-byte vectors
// and a scalar tail; the split is computed from the actual address, so views at any element
// offset work.
//
// Targets: int64, IGNORE (-100) = ignored row. Any target outside [0, V) is treated exactly like
// an ignored row (logp 0, gradient row 0): the GPU path does not range-check targets on the host,
// and an out-of-range index must never address memory outside the row.
//
// Precision: fp32 accumulation; the gradient g·(1[v==t] − p) is formed in fp32 (the true-class
// term 1 − p included) and rounded to the storage type once.
#include "common.cuh"


#define LS_LOG2E 1.4426950408889634f
#define LS_LN2 0.6931471805599453f
// Finite start for the running max: rescale factors 2^(m_old − m_new) are then 0, never NaN
// from (−inf) − (−inf), and (m_old − m_new)·s is 0·finite.
#define LS_M_INIT (-1e30f)
// Exponent floor for the entropy sum: 2^-200 is 0 in f32, so clamping changes no exponential but
// keeps e·d = 0·(−200) finite for −inf logits (masked vocabulary entries).
#define LS_D_MIN (-200.f)

__device__ __forceinline__ float ls_ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// ---- 16-byte vectors of T --------------------------------------------------------------------

template <typename T> struct LsVec;

template <> struct LsVec<float> {
    static constexpr int N = 4;
    static constexpr unsigned int NEG_INF_WORD = 0xff800000u;
    static __device__ __forceinline__ void unpack(const uint4& v, float* f) {
        f[0] = __uint_as_float(v.x);
        f[1] = __uint_as_float(v.y);
        f[2] = __uint_as_float(v.z);
        f[3] = __uint_as_float(v.w);
    }
    static __device__ __forceinline__ uint4 pack(const float* f) {
        return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                          __float_as_uint(f[3]));
    }
};

__device__ __forceinline__ unsigned int ls_pack_bf16x2(float lo, float hi) {
    const unsigned int l = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
    const unsigned int h = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
    return l | (h << 16);
}

template <> struct LsVec<__nv_bfloat16> {
    static constexpr int N = 8;
    static constexpr unsigned int NEG_INF_WORD = 0xff80ff80u;
    static __device__ __forceinline__ void unpack_word(unsigned int w, float* f) {
        f[0] = __uint_as_float(w << 16);
        f[1] = __uint_as_float(w & 0xffff0000u);
    }
    static __device__ __forceinline__ void unpack(const uint4& v, float* f) {
        unpack_word(v.x, f);
        unpack_word(v.y, f + 2);
        unpack_word(v.z, f + 4);
        unpack_word(v.w, f + 6);
    }
    static __device__ __forceinline__ uint4 pack(const float* f) {
        return make_uint4(ls_pack_bf16x2(f[0], f[1]), ls_pack_bf16x2(f[2], f[3]),
                          ls_pack_bf16x2(f[4], f[5]), ls_pack_bf16x2(f[6], f[7]));
    }
};

// Cache policy of a sweep: KEEP caches in L2 only (ld.global.cg), leaving the lines there for a
// second sweep of the same row; STREAM marks them evict-first (the last read of those bytes).
// Both are coherent loads, never the read-only path: the fused kernel later writes the row.
enum { LS_KEEP = 0, LS_STREAM = 1 };

template <int P> __device__ __forceinline__ uint4 ls_ld16(const uint4* p) {
    if (P == LS_STREAM) return __ldcs(p);
    return __ldcg(p);
}

// Head / 16-byte body / tail of one row.
struct LsSplit {
    int head;  // scalar elements before the first 16-byte boundary
    int nvec;  // 16-byte vectors after the head
    int tail0; // first element of the scalar tail
    int tail;  // scalar elements after the body
};

template <typename T> __device__ __forceinline__ LsSplit ls_split(const T* row, int V) {
    constexpr int N = LsVec<T>::N;
    LsSplit s;
    const int mis = (int)(reinterpret_cast<unsigned long long>(row) & 15u);
    s.head = min(V, (int)(((16 - mis) & 15) / (int)sizeof(T)));
    s.nvec = (V - s.head) / N;
    s.tail0 = s.head + s.nvec * N;
    s.tail = V - s.tail0;
    return s;
}

__device__ __forceinline__ bool ls_valid_target(long long t, int V) { return t >= 0 && t < (long long)V; }

// ---- online softmax state ----------------------------------------------------------------------

// m: running max of x·log2e; s = Σ 2^d; sd = Σ 2^d·d, with d = x·log2e − m (sd only for entropy).
struct LsOnline {
    float m, s, sd;
};

__device__ __forceinline__ LsOnline ls_online_init() { return LsOnline{LS_M_INIT, 0.f, 0.f}; }

// Moves the reference point to m_new >= st.m: one ex2 for the whole state.
template <bool ENT> __device__ __forceinline__ void ls_rescale(LsOnline& st, float m_new) {
    const float delta = st.m - m_new;
    const float sc = ls_ex2(delta);
    if (ENT) st.sd = sc * fmaf(delta, st.s, st.sd);
    st.s *= sc;
    st.m = m_new;
}

// Adds one element (st.m must already cover it): one ex2.
template <bool ENT> __device__ __forceinline__ void ls_add(LsOnline& st, float x) {
    float d = fmaf(x, LS_LOG2E, -st.m);
    if (ENT) d = fmaxf(d, LS_D_MIN);
    const float e = ls_ex2(d);
    st.s += e;
    if (ENT) st.sd = fmaf(e, d, st.sd);
}

template <bool ENT> __device__ __forceinline__ LsOnline ls_merge(const LsOnline& a, const LsOnline& b) {
    LsOnline r;
    r.m = fmaxf(a.m, b.m);
    const float da = a.m - r.m, db = b.m - r.m;
    const float sa = ls_ex2(da), sb = ls_ex2(db);
    r.s = a.s * sa + b.s * sb;
    r.sd = ENT ? sa * fmaf(da, a.s, a.sd) + sb * fmaf(db, b.s, b.sd) : 0.f;
    return r;
}

// Block-wide merge; every thread gets the row's state. `scratch` holds >= 3·32 floats.
template <bool ENT> __device__ __forceinline__ LsOnline ls_block_reduce(LsOnline st, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        LsOnline other;
        other.m = __shfl_xor_sync(0xffffffffu, st.m, o);
        other.s = __shfl_xor_sync(0xffffffffu, st.s, o);
        other.sd = ENT ? __shfl_xor_sync(0xffffffffu, st.sd, o) : 0.f;
        st = ls_merge<ENT>(st, other);
    }
    if (lane == 0) {
        scratch[warp] = st.m;
        scratch[32 + warp] = st.s;
        scratch[64 + warp] = st.sd;
    }
    __syncthreads();
    st = (lane < nwarps) ? LsOnline{scratch[lane], scratch[32 + lane], scratch[64 + lane]} : ls_online_init();
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        LsOnline other;
        other.m = __shfl_xor_sync(0xffffffffu, st.m, o);
        other.s = __shfl_xor_sync(0xffffffffu, st.s, o);
        other.sd = ENT ? __shfl_xor_sync(0xffffffffu, st.sd, o) : 0.f;
        st = ls_merge<ENT>(st, other);
    }
    return st; // every warp reduced the same values in the same order: identical in all threads
}

// One thread's share of a row's online softmax. Groups of U vectors share one rescale; vectors
// past the end read as −inf so the group needs no per-element guard.
template <typename T, int U, int P, bool ENT>
__device__ __forceinline__ LsOnline ls_accumulate_row(const T* row, int V) {
    constexpr int N = LsVec<T>::N;
    const LsSplit sp = ls_split(row, V);
    const int tid = threadIdx.x, nt = blockDim.x;
    LsOnline st = ls_online_init();
    {
        // Head and tail (< N elements each, N <= blockDim): one element each for the first threads.
        const float hx = tid < sp.head ? irb_to_float(row[tid]) : -INFINITY;
        const float tx = tid < sp.tail ? irb_to_float(row[sp.tail0 + tid]) : -INFINITY;
        ls_rescale<ENT>(st, fmaxf(st.m, fmaxf(hx, tx) * LS_LOG2E));
        ls_add<ENT>(st, hx);
        ls_add<ENT>(st, tx);
    }
    const uint4* vp = reinterpret_cast<const uint4*>(row + sp.head);
    const unsigned int ni = LsVec<T>::NEG_INF_WORD;
    const uint4 neg_inf = make_uint4(ni, ni, ni, ni);
    for (int base = tid; base < sp.nvec; base += nt * U) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = base + u * nt;
            v[u] = i < sp.nvec ? ls_ld16<P>(vp + i) : neg_inf;
        }
        float f[U][N];
        float vmax = -INFINITY;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            LsVec<T>::unpack(v[u], f[u]);
#pragma unroll
            for (int k = 0; k < N; ++k) vmax = fmaxf(vmax, f[u][k]);
        }
        ls_rescale<ENT>(st, fmaxf(st.m, vmax * LS_LOG2E));
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int k = 0; k < N; ++k) ls_add<ENT>(st, f[u][k]);
    }
    return st;
}

// Row results from the reduced state: lse = ln2·m + ln s, entropy = ln s − ln2·sd/s.
struct LsRowStats {
    float lse, entropy;
};

__device__ __forceinline__ LsRowStats ls_row_stats(const LsOnline& st) {
    const float ln_s = logf(st.s);
    return LsRowStats{fmaf(st.m, LS_LN2, ln_s), ln_s - LS_LN2 * st.sd / st.s};
}

// ---- gradient sweeps -------------------------------------------------------------------------

// g·(1[c == t] − p) in f32, p = exp(x − lse) formed as 2^((x − lse)·log2e) (the subtraction first
// keeps p accurate to f32 rounding of the small difference, not of lse·log2e).
__device__ __forceinline__ float ls_grad(float x, bool is_target, float lse, float g) {
    const float p = ls_ex2((x - lse) * LS_LOG2E);
    return g * ((is_target ? 1.f : 0.f) - p);
}

// Overwrites the row with its gradient. REV walks the vectors from the end of the row: in the
// fused kernel the most recently read bytes are then re-read first, while they are likeliest
// still in L2.
template <typename T, int U, int P, bool REV>
__device__ __forceinline__ void ls_grad_row(T* row, int V, int t, float lse, float g) {
    constexpr int N = LsVec<T>::N;
    const LsSplit sp = ls_split(row, V);
    const int tid = threadIdx.x, nt = blockDim.x;
    if (tid < sp.head) row[tid] = irb_from_float<T>(ls_grad(irb_to_float(row[tid]), tid == t, lse, g));
    if (tid < sp.tail) {
        const int c = sp.tail0 + tid;
        row[c] = irb_from_float<T>(ls_grad(irb_to_float(row[c]), c == t, lse, g));
    }
    uint4* vp = reinterpret_cast<uint4*>(row + sp.head);
    for (int base = tid; base < sp.nvec; base += nt * U) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = base + u * nt;
            const int i = REV ? sp.nvec - 1 - j : j;
            if (j < sp.nvec) v[u] = ls_ld16<P>(vp + i);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = base + u * nt;
            const int i = REV ? sp.nvec - 1 - j : j;
            if (j < sp.nvec) {
                float f[N];
                LsVec<T>::unpack(v[u], f);
                const int dt = t - (sp.head + i * N); // target's lane in this vector, if any
#pragma unroll
                for (int k = 0; k < N; ++k) f[k] = ls_grad(f[k], k == dt, lse, g);
                __stcs(vp + i, LsVec<T>::pack(f));
            }
        }
    }
}

// Ignored rows: the gradient is 0 and nothing needs reading.
template <typename T> __device__ __forceinline__ void ls_zero_row(T* row, int V) {
    const LsSplit sp = ls_split(row, V);
    const int tid = threadIdx.x, nt = blockDim.x;
    if (tid < sp.head) row[tid] = irb_from_float<T>(0.f);
    if (tid < sp.tail) row[sp.tail0 + tid] = irb_from_float<T>(0.f);
    uint4* vp = reinterpret_cast<uint4*>(row + sp.head);
    for (int i = tid; i < sp.nvec; i += nt) __stcs(vp + i, make_uint4(0u, 0u, 0u, 0u));
}

// ---- kernels ---------------------------------------------------------------------------------

#define LS_FWD_THREADS 512
#define LS_FUSED_THREADS 1024
#define LS_UNROLL 4

// Forward: lse[R], logp[R] (0 for ignored rows) and, when ENT, entropy[R]. The target logit is
// loaded by thread 0 at the start of the same pass, its latency hidden behind the row sweep.
template <typename T, bool ENT>
__device__ __forceinline__ void ls_forward(const T* __restrict__ logits, const long long* __restrict__ targets,
                                           float* __restrict__ lse, float* __restrict__ logp,
                                           float* __restrict__ entropy, int V) {
    __shared__ float scratch[96];
    const int r = blockIdx.x;
    const T* row = logits + (size_t)r * (size_t)V;
    const long long t = targets[r];
    const bool valid = ls_valid_target(t, V);
    const float xt = (threadIdx.x == 0 && valid) ? irb_to_float(row[t]) : 0.f;
    LsOnline st = ls_accumulate_row<T, LS_UNROLL, LS_STREAM, ENT>(row, V);
    st = ls_block_reduce<ENT>(st, scratch);
    if (threadIdx.x == 0) {
        const LsRowStats rs = ls_row_stats(st);
        lse[r] = rs.lse;
        logp[r] = valid ? xt - rs.lse : 0.f;
        if (ENT) entropy[r] = rs.entropy;
    }
}

// In-place backward from saved lse[R] and upstream dlogp[R].
template <typename T>
__device__ __forceinline__ void ls_backward(T* __restrict__ logits, const long long* __restrict__ targets,
                                            const float* __restrict__ lse, const float* __restrict__ dlogp, int V) {
    const int r = blockIdx.x;
    T* row = logits + (size_t)r * (size_t)V;
    const long long t = targets[r];
    if (!ls_valid_target(t, V)) {
        ls_zero_row(row, V);
        return;
    }
    ls_grad_row<T, LS_UNROLL, LS_STREAM, false>(row, V, (int)t, lse[r], dlogp[r]);
}

// Forward + in-place backward in one launch (dlogp known in advance): the second sweep re-reads
// the row, walking backwards so the bytes read last in the first sweep are re-read first.
template <typename T, bool ENT>
__device__ __forceinline__ void ls_forward_backward(T* __restrict__ logits, const long long* __restrict__ targets,
                                                    const float* __restrict__ dlogp, float* __restrict__ lse,
                                                    float* __restrict__ logp, float* __restrict__ entropy, int V) {
    __shared__ float scratch[96];
    const int r = blockIdx.x;
    T* row = logits + (size_t)r * (size_t)V;
    const long long t = targets[r];
    const bool valid = ls_valid_target(t, V);
    const float xt = (threadIdx.x == 0 && valid) ? irb_to_float(row[t]) : 0.f;
    const float g = dlogp[r];
    LsOnline st = ls_accumulate_row<T, LS_UNROLL, LS_KEEP, ENT>(row, V);
    st = ls_block_reduce<ENT>(st, scratch);
    const LsRowStats rs = ls_row_stats(st);
    if (threadIdx.x == 0) {
        lse[r] = rs.lse;
        logp[r] = valid ? xt - rs.lse : 0.f;
        if (ENT) entropy[r] = rs.entropy;
    }
    // Every thread's reads of the row (xt included) precede the block reduction's barrier, so
    // overwriting the row now is safe.
    if (!valid) {
        ls_zero_row(row, V);
        return;
    }
    ls_grad_row<T, LS_UNROLL, LS_STREAM, true>(row, V, (int)t, rs.lse, g);
}

// ---- unfused baseline (benchmark only) -------------------------------------------------------
// What eager frameworks do: a log-softmax that writes an fp32 [R, V] tensor, a gather, and a
// backward that reads that tensor again. Coalesced scalar accesses; the row statistics use the
// same single online pass as the fused kernel, so the baseline differs only in the traffic.

template <typename T>
__device__ __forceinline__ void ls_unfused_log_softmax(const T* __restrict__ logits, float* __restrict__ out,
                                                       float* __restrict__ lse, int V) {
    __shared__ float scratch[96];
    const int r = blockIdx.x;
    const T* row = logits + (size_t)r * (size_t)V;
    LsOnline st = ls_accumulate_row<T, LS_UNROLL, LS_KEEP, false>(row, V);
    st = ls_block_reduce<false>(st, scratch);
    const float l = ls_row_stats(st).lse;
    if (threadIdx.x == 0) lse[r] = l;
    float* o = out + (size_t)r * (size_t)V;
    for (int c = threadIdx.x; c < V; c += blockDim.x) o[c] = irb_to_float(row[c]) - l;
}

template <typename T>
__device__ __forceinline__ void ls_unfused_backward(const float* __restrict__ logp_full,
                                                    const long long* __restrict__ targets,
                                                    const float* __restrict__ dlogp, T* __restrict__ grad, int V) {
    const int r = blockIdx.x;
    const long long t = targets[r];
    const bool valid = ls_valid_target(t, V);
    const float g = valid ? dlogp[r] : 0.f;
    const float* lp = logp_full + (size_t)r * (size_t)V;
    T* o = grad + (size_t)r * (size_t)V;
    for (int c = threadIdx.x; c < V; c += blockDim.x) {
        const float p = ls_ex2(lp[c] * LS_LOG2E);
        o[c] = irb_from_float<T>(valid ? g * ((c == t ? 1.f : 0.f) - p) : 0.f);
    }
}

#define LS_INSTANTIATE(T, SUF)                                                                            \
    extern "C" __global__ void __launch_bounds__(LS_FWD_THREADS)                                          \
        logsoftmax_fwd_##SUF(const T* logits, const long long* targets, float* lse, float* logp, int V) { \
        ls_forward<T, false>(logits, targets, lse, logp, nullptr, V);                                     \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(LS_FWD_THREADS) logsoftmax_fwd_entropy_##SUF(          \
        const T* logits, const long long* targets, float* lse, float* logp, float* entropy, int V) {      \
        ls_forward<T, true>(logits, targets, lse, logp, entropy, V);                                      \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(LS_FWD_THREADS)                                          \
        logsoftmax_bwd_##SUF(T* logits, const long long* targets, const float* lse, const float* dlogp,   \
                             int V) {                                                                     \
        ls_backward<T>(logits, targets, lse, dlogp, V);                                                   \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(LS_FUSED_THREADS)                                        \
        logsoftmax_fwd_bwd_##SUF(T* logits, const long long* targets, const float* dlogp, float* lse,     \
                                 float* logp, int V) {                                                    \
        ls_forward_backward<T, false>(logits, targets, dlogp, lse, logp, nullptr, V);                     \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(LS_FUSED_THREADS) logsoftmax_fwd_bwd_entropy_##SUF(    \
        T* logits, const long long* targets, const float* dlogp, float* lse, float* logp, float* entropy, \
        int V) {                                                                                          \
        ls_forward_backward<T, true>(logits, targets, dlogp, lse, logp, entropy, V);                      \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(LS_FWD_THREADS)                                          \
        logsoftmax_unfused_fwd_##SUF(const T* logits, float* logp_full, float* lse, int V) {              \
        ls_unfused_log_softmax<T>(logits, logp_full, lse, V);                                             \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(LS_FWD_THREADS) logsoftmax_unfused_bwd_##SUF(          \
        const float* logp_full, const long long* targets, const float* dlogp, T* grad, int V) {           \
        ls_unfused_backward<T>(logp_full, targets, dlogp, grad, V);                                       \
    }

LS_INSTANTIATE(float, f32)
LS_INSTANTIATE(__nv_bfloat16, bf16)

// Gather of the unfused baseline: logp[r] = logp_full[r, t_r] (0 for ignored rows).
extern "C" __global__ void logsoftmax_unfused_gather(const float* logp_full, const long long* targets, float* logp,
                                                     int R, int V) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= R) return;
    const long long t = targets[r];
    logp[r] = ls_valid_target(t, V) ? logp_full[(size_t)r * (size_t)V + t] : 0.f;
}
