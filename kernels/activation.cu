// Elementwise activations (gelu_new, SwiGLU), bias add with its deterministic column-sum
// gradient, and the residual add. fp32 math, T storage. See src/ops/activation.rs.
#include "layers.cuh"

#define GRID_STRIDE(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)(n); i += (size_t)gridDim.x * blockDim.x)

// gelu_new (GPT-2): 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
#define GELU_K0 0.7978845608028654f
#define GELU_K1 0.044715f

__device__ __forceinline__ float gelu_new(float x) {
    return 0.5f * x * (1.f + tanhf(GELU_K0 * (x + GELU_K1 * x * x * x)));
}

__device__ __forceinline__ float gelu_new_grad(float x) {
    const float th = tanhf(GELU_K0 * (x + GELU_K1 * x * x * x));
    return 0.5f * (1.f + th) + 0.5f * x * (1.f - th * th) * GELU_K0 * (1.f + 3.f * GELU_K1 * x * x);
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }

template <typename T>
__device__ __forceinline__ void bias_backward(const T* dy, float* db, int N, int C) {
    const int c = blockIdx.x * IRB_COL_TX + threadIdx.x;
    float out[1];
    irb_column_sums<1>(N, C, c, [&](int n, float (&acc)[1]) { acc[0] += irb_to_float(dy[(size_t)n * C + c]); }, out);
    if (threadIdx.y == 0 && c < C) db[c] += out[0];
}

#define ACT_INST(T, S)                                                                              \
    extern "C" __global__ void gelu_forward_##S(const T* x, T* y, long long n) {                   \
        GRID_STRIDE(i, n) y[i] = irb_from_float<T>(gelu_new(irb_to_float(x[i])));                  \
    }                                                                                               \
    extern "C" __global__ void gelu_backward_##S(const T* x, const T* dy, T* dx, long long n) {    \
        GRID_STRIDE(i, n) dx[i] = irb_from_float<T>(irb_to_float(dy[i]) * gelu_new_grad(irb_to_float(x[i]))); \
    }                                                                                               \
    extern "C" __global__ void swiglu_forward_##S(const T* gate, const T* up, T* h, long long n) { \
        GRID_STRIDE(i, n) {                                                                         \
            const float g = irb_to_float(gate[i]);                                                  \
            h[i] = irb_from_float<T>(g * sigmoidf(g) * irb_to_float(up[i]));                        \
        }                                                                                           \
    }                                                                                               \
    extern "C" __global__ void swiglu_backward_##S(const T* gate, const T* up, const T* dh,        \
                                                   T* dgate, T* dup, long long n) {                \
        GRID_STRIDE(i, n) {                                                                         \
            const float g = irb_to_float(gate[i]), u = irb_to_float(up[i]), d = irb_to_float(dh[i]); \
            const float sg = sigmoidf(g);                                                           \
            dgate[i] = irb_from_float<T>(d * u * sg * (1.f + g * (1.f - sg)));                      \
            dup[i] = irb_from_float<T>(d * g * sg);                                                 \
        }                                                                                           \
    }                                                                                               \
    extern "C" __global__ void bias_add_##S(T* y, const float* bias, int N, int C) {               \
        GRID_STRIDE(i, (size_t)N * C) y[i] = irb_from_float<T>(irb_to_float(y[i]) + bias[i % C]);  \
    }                                                                                               \
    extern "C" __global__ void bias_backward_##S(const T* dy, float* db, int N, int C) {           \
        bias_backward<T>(dy, db, N, C);                                                             \
    }                                                                                               \
    extern "C" __global__ void residual_add_##S(T* x, const T* r, long long n) {                   \
        GRID_STRIDE(i, n) x[i] = irb_from_float<T>(irb_to_float(x[i]) + irb_to_float(r[i]));       \
    }

ACT_INST(float, f32)
ACT_INST(__nv_bfloat16, bf16)
