// Token (+ learned position) embedding gather and its deterministic scatter-add backward.
// Tables are fp32 [rows, C]; activations are T (f32 / bf16). See src/ops/embedding.rs.
#include "layers.cuh"

// One block per token: out[n, :] = wte[ids[n], :] (+ wpe[pos[n], :]). An out-of-range id or
// position (the host validates them; this only guards memory) writes NaN so it cannot go unseen.
template <typename T>
__device__ __forceinline__ void embedding_forward(const unsigned* ids, const float* wte, int V,
                                                  const unsigned* pos, const float* wpe, int P,
                                                  T* out, int N, int C) {
    const int n = blockIdx.x;
    if (n >= N) return;
    const unsigned id = ids[n];
    const unsigned p = pos ? pos[n] : 0u;
    const bool ok = id < (unsigned)V && (!pos || p < (unsigned)P);
    const float* e = wte + (size_t)id * C;
    const float* w = pos ? wpe + (size_t)p * C : nullptr;
    T* o = out + (size_t)n * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float v = NAN;
        if (ok) {
            v = e[c];
            if (w) v += w[c];
        }
        o[c] = irb_from_float<T>(v);
    }
}

// One block per bucket (a table row that occurs in the batch): that row's gradient is the sum of
// its tokens' dout rows in ascending token order, added once into dW. Each row is owned by
// exactly one block, so there are no atomics and the result is bitwise reproducible.
template <typename T>
__device__ __forceinline__ void embedding_backward(const T* dout, const int* rows, const int* offsets,
                                                   const int* tokens, int n_buckets, int C, float* dW) {
    const int r = blockIdx.x;
    if (r >= n_buckets) return;
    const int beg = offsets[r], end = offsets[r + 1];
    float* g = dW + (size_t)rows[r] * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = 0.f;
        for (int k = beg; k < end; ++k) acc += irb_to_float(dout[(size_t)tokens[k] * C + c]);
        g[c] += acc;
    }
}

#define EMB_INST(T, S)                                                                              \
    extern "C" __global__ void embedding_forward_##S(const unsigned* ids, const float* wte, int V, \
                                                     T* out, int N, int C) {                       \
        embedding_forward<T>(ids, wte, V, nullptr, nullptr, 0, out, N, C);                         \
    }                                                                                               \
    extern "C" __global__ void embedding_forward_pos_##S(const unsigned* ids, const float* wte,    \
                                                         int V, const unsigned* pos,               \
                                                         const float* wpe, int P, T* out, int N,   \
                                                         int C) {                                  \
        embedding_forward<T>(ids, wte, V, pos, wpe, P, out, N, C);                                 \
    }                                                                                               \
    extern "C" __global__ void embedding_backward_##S(const T* dout, const int* rows,              \
                                                      const int* offsets, const int* tokens,       \
                                                      int n_buckets, int C, float* dW) {           \
        embedding_backward<T>(dout, rows, offsets, tokens, n_buckets, C, dW);                      \
    }

EMB_INST(float, f32)
EMB_INST(__nv_bfloat16, bf16)
