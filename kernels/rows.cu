// Row gathers and scatters by an index list, and per-row argmax + mean of logits: the glue of the
// chunked LM head (only rows with a target are projected; TRL's token accuracy and logits/*
// metrics need the argmax and the mean logit of those rows). See src/ops/rows.rs.
#include "layers.cuh"

// One block per listed row: dst[i, :] = src[idx[i], :]. Indices are validated on the host.
template <typename T>
__device__ __forceinline__ void gather_rows(const T* src, const unsigned* idx, T* dst, int n, int C) {
    const int i = blockIdx.x;
    if (i >= n) return;
    const T* s = src + (size_t)idx[i] * C;
    T* d = dst + (size_t)i * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) d[c] = s[c];
}

// One block per listed row: dst[idx[i], :] = src[i, :]. The host checks that the indices are
// distinct, so every destination row has exactly one writer (no atomics, deterministic).
template <typename T>
__device__ __forceinline__ void scatter_rows(const T* src, const unsigned* idx, T* dst, int n, int C) {
    const int i = blockIdx.x;
    if (i >= n) return;
    const T* s = src + (size_t)i * C;
    T* d = dst + (size_t)idx[i] * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) d[c] = s[c];
}

#define AM_THREADS 256
#define AM_NONE 0x7fffffff

// One block of AM_THREADS per row: the first index of the row maximum (as torch.argmax; NaNs
// never win, a row with no value above -inf gives 0) and the mean of the row accumulated in f64.
// Each thread scans a strided subsequence in increasing index order keeping its first maximum;
// the tree reduction keeps the larger value and, on ties, the smaller index.
template <typename T>
__device__ __forceinline__ void row_argmax_mean(const T* x, int V, unsigned* argmax, float* mean) {
    __shared__ float best_s[AM_THREADS];
    __shared__ int arg_s[AM_THREADS];
    __shared__ double sum_s[AM_THREADS];
    const int tid = threadIdx.x;
    const T* row = x + (size_t)blockIdx.x * V;
    float best = -INFINITY;
    int arg = AM_NONE;
    double sum = 0.0;
    for (int v = tid; v < V; v += AM_THREADS) {
        const float xv = irb_to_float(row[v]);
        if (xv > best) {
            best = xv;
            arg = v;
        }
        sum += (double)xv;
    }
    best_s[tid] = best;
    arg_s[tid] = arg;
    sum_s[tid] = sum;
    __syncthreads();
    for (int s = AM_THREADS / 2; s > 0; s >>= 1) {
        if (tid < s) {
            const float ob = best_s[tid + s];
            const int oa = arg_s[tid + s];
            if (ob > best_s[tid] || (ob == best_s[tid] && oa < arg_s[tid])) {
                best_s[tid] = ob;
                arg_s[tid] = oa;
            }
            sum_s[tid] += sum_s[tid + s];
        }
        __syncthreads();
    }
    if (tid == 0) {
        argmax[blockIdx.x] = arg_s[0] == AM_NONE ? 0u : (unsigned)arg_s[0];
        mean[blockIdx.x] = (float)(sum_s[0] / (double)V);
    }
}

#define ROWS_INST(T, S)                                                                             \
    extern "C" __global__ void gather_rows_##S(const T* src, const unsigned* idx, T* dst, int n,   \
                                               int C) {                                            \
        gather_rows<T>(src, idx, dst, n, C);                                                        \
    }                                                                                               \
    extern "C" __global__ void scatter_rows_##S(const T* src, const unsigned* idx, T* dst, int n,  \
                                                int C) {                                           \
        scatter_rows<T>(src, idx, dst, n, C);                                                       \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(AM_THREADS)                                        \
        row_argmax_mean_##S(const T* x, int V, unsigned* argmax, float* mean) {                    \
        row_argmax_mean<T>(x, V, argmax, mean);                                                     \
    }

ROWS_INST(float, f32)
ROWS_INST(__nv_bfloat16, bf16)
