// f-divergence SFT objectives (token and sequence level). Mirrors src/ops/sftloss.rs in f32:
// s is clamped into the safe range [lo, hi] (computed on the host) before h and h' are evaluated,
// and every clamped token / sequence is counted in `clamped` (integer atomics: deterministic).
#include "common.cuh"

#define FDIV_BLOCK 256

enum { D_TV = 0, D_PEARSON, D_NEYMAN, D_HELLINGER, D_JS, D_RKL };

__device__ __forceinline__ float fdiv_h(int d, float s) {
    switch (d) {
    case D_PEARSON: return 2.f * s / (sqrtf(1.f + s) + 1.f);
    case D_NEYMAN: return s - 0.25f * s * s;
    case D_HELLINGER: return s / (1.f + s);
    case D_JS: return log1pf(-expm1f(-s));
    case D_RKL: return -expf(-1.f - s);
    default: return s;
    }
}

__device__ __forceinline__ float fdiv_h_prime(int d, float s) {
    switch (d) {
    case D_PEARSON: return rsqrtf(1.f + s);
    case D_NEYMAN: return 1.f - 0.5f * s;
    case D_HELLINGER: { const float q = 1.f + s; return 1.f / (q * q); }
    case D_JS: return 1.f / (1.f + 2.f * expm1f(s));
    case D_RKL: return expf(-1.f - s);
    default: return 1.f;
    }
}

// Clamps s into [lo, hi]; returns 1 when it had to.
__device__ __forceinline__ int fdiv_clamp(float* s, float lo, float hi) {
    if (*s < lo) { *s = lo; return 1; }
    if (*s > hi) { *s = hi; return 1; }
    return 0;
}

extern "C" __global__ void __launch_bounds__(FDIV_BLOCK)
fdiv_token_forward(int d, float beta, float lo, float hi, const float* __restrict__ logp,
                   const float* __restrict__ ref_logp, const unsigned char* __restrict__ mask, int n,
                   float* __restrict__ loss, float* __restrict__ dloss_dlogp, unsigned int* __restrict__ clamped) {
    __shared__ float scratch[32];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    float c = 0.f;
    if (i < n) {
        float l = 0.f, g = 0.f;
        if (mask[i]) {
            float s = beta * (logp[i] - ref_logp[i]);
            c = (float)fdiv_clamp(&s, lo, hi);
            l = -fdiv_h(d, s) / beta;
            g = -fdiv_h_prime(d, s);
        }
        loss[i] = l;
        dloss_dlogp[i] = g;
    }
    // One atomic per block (the count of a block is at most FDIV_BLOCK, exact in f32).
    c = irb_block_sum(c, scratch);
    if (threadIdx.x == 0 && c > 0.f) atomicAdd(clamped, (unsigned int)c);
}

// One block per segment: s = beta * sum over the segment's tokens of (logp - ref_logp).
extern "C" __global__ void __launch_bounds__(FDIV_BLOCK)
fdiv_seq_forward(int d, float beta, float lo_s, float hi_s, const float* __restrict__ logp,
                 const float* __restrict__ ref_logp, const int* __restrict__ seg, int segments,
                 const int* __restrict__ lo, const int* __restrict__ hi,
                 float* __restrict__ seq_loss, float* __restrict__ weights, unsigned int* __restrict__ clamped) {
    __shared__ float scratch[32];
    const int k = blockIdx.x;
    if (k >= segments) return;
    float acc = 0.f;
    for (int i = lo[k] + (int)threadIdx.x; i <= hi[k]; i += blockDim.x) {
        if (seg[i] == k) acc += logp[i] - ref_logp[i];
    }
    acc = irb_block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        float s = beta * acc;
        if (fdiv_clamp(&s, lo_s, hi_s)) atomicAdd(clamped, 1u);
        seq_loss[k] = -fdiv_h(d, s) / beta;
        weights[k] = -fdiv_h_prime(d, s);
    }
}

extern "C" __global__ void fdiv_seq_broadcast(const float* __restrict__ weights, const int* __restrict__ seg,
                                              int n, int segments, float* __restrict__ dloss_dlogp) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int s = seg[i];
    dloss_dlogp[i] = (s >= 0 && s < segments) ? weights[s] : 0.f;
}
