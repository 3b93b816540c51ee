// LayerNorm and RMSNorm over the last dimension of row-major [N, C] activations, fp32 statistics
// and fp32 parameters. See src/ops/norm.rs for the exact semantics (HF LayerNorm / LlamaRMSNorm).
#include "layers.cuh"

// One block per row. LayerNorm: two passes (mean, then centred variance) for accuracy.
// RMSNorm follows HF: the normalised value is rounded to the storage type before the weight.
template <typename T, bool RMS>
__device__ __forceinline__ void norm_forward(const T* x, const float* w, const float* b, T* y,
                                             float* mean_out, float* rstd_out, int N, int C, float eps) {
    __shared__ float scratch[32];
    const int n = blockIdx.x;
    if (n >= N) return;
    const T* xr = x + (size_t)n * C;
    T* yr = y + (size_t)n * C;
    float mean = 0.f;
    if (!RMS) {
        float s = 0.f;
        for (int c = threadIdx.x; c < C; c += blockDim.x) s += irb_to_float(xr[c]);
        mean = irb_block_sum(s, scratch) / (float)C;
    }
    float s2 = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const float d = irb_to_float(xr[c]) - mean;
        s2 += d * d;
    }
    const float rstd = 1.f / sqrtf(irb_block_sum(s2, scratch) / (float)C + eps);
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const float xhat = (irb_to_float(xr[c]) - mean) * rstd;
        if (RMS) {
            yr[c] = irb_from_float<T>(w[c] * irb_to_float(irb_from_float<T>(xhat)));
        } else {
            yr[c] = irb_from_float<T>(xhat * w[c] + b[c]);
        }
    }
    if (threadIdx.x == 0) {
        if (!RMS) mean_out[n] = mean;
        rstd_out[n] = rstd;
    }
}

// One block per row: dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) with g = dy·w (RMS: no mean(g) term).
template <typename T, bool RMS>
__device__ __forceinline__ void norm_backward_dx(const T* dy, const T* x, const float* w, const float* mean,
                                                 const float* rstd, T* dx, int N, int C) {
    __shared__ float scratch[32];
    const int n = blockIdx.x;
    if (n >= N) return;
    const T* dyr = dy + (size_t)n * C;
    const T* xr = x + (size_t)n * C;
    T* dxr = dx + (size_t)n * C;
    const float mu = RMS ? 0.f : mean[n];
    const float rs = rstd[n];
    float s1 = 0.f, s2 = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const float g = irb_to_float(dyr[c]) * w[c];
        const float xhat = (irb_to_float(xr[c]) - mu) * rs;
        s1 += g;
        s2 += g * xhat;
    }
    const float m1 = RMS ? 0.f : irb_block_sum(s1, scratch) / (float)C;
    const float m2 = irb_block_sum(s2, scratch) / (float)C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const float g = irb_to_float(dyr[c]) * w[c];
        const float xhat = (irb_to_float(xr[c]) - mu) * rs;
        dxr[c] = irb_from_float<T>(rs * (g - m1 - xhat * m2));
    }
}

// dw[c] += Σ_n dy·x̂ (RMS: x̂ rounded to T as in the forward), db[c] += Σ_n dy; deterministic.
template <typename T, bool RMS>
__device__ __forceinline__ void norm_backward_params(const T* dy, const T* x, const float* mean,
                                                     const float* rstd, float* dw, float* db, int N, int C) {
    const int c = blockIdx.x * IRB_COL_TX + threadIdx.x;
    float out[2];
    irb_column_sums<2>(N, C, c, [&](int n, float (&acc)[2]) {
        const size_t i = (size_t)n * C + c;
        const float mu = RMS ? 0.f : mean[n];
        float xhat = (irb_to_float(x[i]) - mu) * rstd[n];
        if (RMS) xhat = irb_to_float(irb_from_float<T>(xhat));
        const float g = irb_to_float(dy[i]);
        acc[0] += g * xhat;
        acc[1] += g;
    }, out);
    if (threadIdx.y == 0 && c < C) {
        dw[c] += out[0];
        if (!RMS) db[c] += out[1];
    }
}

#define NORM_INST(T, S)                                                                             \
    extern "C" __global__ void layernorm_forward_##S(const T* x, const float* w, const float* b,   \
                                                     T* y, float* mean, float* rstd, int N, int C, \
                                                     float eps) {                                  \
        norm_forward<T, false>(x, w, b, y, mean, rstd, N, C, eps);                                  \
    }                                                                                               \
    extern "C" __global__ void rmsnorm_forward_##S(const T* x, const float* w, T* y, float* rstd,  \
                                                   int N, int C, float eps) {                      \
        norm_forward<T, true>(x, w, nullptr, y, nullptr, rstd, N, C, eps);                          \
    }                                                                                               \
    extern "C" __global__ void layernorm_backward_dx_##S(const T* dy, const T* x, const float* w,  \
                                                         const float* mean, const float* rstd,     \
                                                         T* dx, int N, int C) {                    \
        norm_backward_dx<T, false>(dy, x, w, mean, rstd, dx, N, C);                                 \
    }                                                                                               \
    extern "C" __global__ void rmsnorm_backward_dx_##S(const T* dy, const T* x, const float* w,    \
                                                       const float* rstd, T* dx, int N, int C) {   \
        norm_backward_dx<T, true>(dy, x, w, nullptr, rstd, dx, N, C);                               \
    }                                                                                               \
    extern "C" __global__ void layernorm_backward_params_##S(const T* dy, const T* x,              \
                                                             const float* mean, const float* rstd, \
                                                             float* dw, float* db, int N, int C) { \
        norm_backward_params<T, false>(dy, x, mean, rstd, dw, db, N, C);                            \
    }                                                                                               \
    extern "C" __global__ void rmsnorm_backward_params_##S(const T* dy, const T* x,                \
                                                           const float* rstd, float* dw, int N,    \
                                                           int C) {                                \
        norm_backward_params<T, true>(dy, x, nullptr, rstd, dw, nullptr, N, C);                     \
    }

NORM_INST(float, f32)
NORM_INST(__nv_bfloat16, bf16)
