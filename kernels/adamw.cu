// Fused AdamW (PyTorch torch.optim.AdamW, single-tensor formula) over flat fp32 buffers, the
// deterministic sum of squares behind global-norm gradient clipping, and a scale in place.
// The host precomputes the step scalars in f64 (as PyTorch does in Python). See src/ops/adamw.rs.
#include "layers.cuh"

#define GRID_STRIDE(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)(n); i += (size_t)gridDim.x * blockDim.x)

// decay = 1 − lr·wd, omb1 = 1 − β1, omb2 = 1 − β2 (formed in f64 on the host, as PyTorch forms
// them in Python), step_size = lr / (1 − β1^t), bc2_sqrt = sqrt(1 − β2^t).
template <bool COPY>
__device__ __forceinline__ void adamw(float* p, const float* g, float* m, float* v, __nv_bfloat16* p16,
                                      long long n, float decay, float omb1, float beta2, float omb2,
                                      float step_size, float bc2_sqrt, float eps) {
    GRID_STRIDE(i, n) {
        const float gi = g[i];
        float pi = p[i] * decay;
        const float mi = m[i] + omb1 * (gi - m[i]);  // torch lerp (weight < 0.5 branch)
        const float vi = v[i] * beta2 + omb2 * gi * gi;
        const float denom = sqrtf(vi) / bc2_sqrt + eps;
        pi = pi - step_size * (mi / denom);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
        if (COPY) p16[i] = __float2bfloat16_rn(pi);
    }
}

extern "C" __global__ void adamw_step(float* p, const float* g, float* m, float* v, long long n, float decay,
                                      float omb1, float beta2, float omb2, float step_size, float bc2_sqrt,
                                      float eps) {
    adamw<false>(p, g, m, v, nullptr, n, decay, omb1, beta2, omb2, step_size, bc2_sqrt, eps);
}

extern "C" __global__ void adamw_step_bf16copy(float* p, const float* g, float* m, float* v,
                                               __nv_bfloat16* p16, long long n, float decay, float omb1,
                                               float beta2, float omb2, float step_size, float bc2_sqrt,
                                               float eps) {
    adamw<true>(p, g, m, v, p16, n, decay, omb1, beta2, omb2, step_size, bc2_sqrt, eps);
}

// partials[blockIdx.x] = Σ x² over this block's grid-stride share. The grid size is fixed by the
// host (not by the GPU), so the partition and therefore the result are reproducible.
extern "C" __global__ void sum_squares_partial(const float* x, long long n, float* partials) {
    __shared__ float scratch[32];
    float s = 0.f;
    GRID_STRIDE(i, n) s += x[i] * x[i];
    s = irb_block_sum(s, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

extern "C" __global__ void scale_inplace(float* x, long long n, float s) {
    GRID_STRIDE(i, n) x[i] *= s;
}
