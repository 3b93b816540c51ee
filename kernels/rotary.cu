// HF rotate_half RoPE applied in place to [N, H, D] rows with per-token positions; `sign` = +1
// for the forward, −1 for the backward (rotation by −angle). See src/ops/rotary.rs.
#include "layers.cuh"

template <typename T>
__device__ __forceinline__ void rotary_apply(T* x, const unsigned* pos, const float* inv_freq, int N,
                                             int H, int D, float sign) {
    const int half = D / 2;
    const size_t total = (size_t)N * H * half;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        const int i = (int)(idx % half);
        const size_t nh = idx / half;
        const size_t n = nh / H;
        // The angle is one f32 product as in HF (inv_freq.float() @ position_ids.float()).
        const float ang = (float)pos[n] * inv_freq[i];
        float s, c;
        sincosf(ang, &s, &c);
        s *= sign;
        T* row = x + nh * D;
        const float x1 = irb_to_float(row[i]), x2 = irb_to_float(row[i + half]);
        row[i] = irb_from_float<T>(x1 * c - x2 * s);
        row[i + half] = irb_from_float<T>(x2 * c + x1 * s);
    }
}

#define ROPE_INST(T, S)                                                                             \
    extern "C" __global__ void rotary_apply_##S(T* x, const unsigned* pos, const float* inv_freq,  \
                                                int N, int H, int D, float sign) {                 \
        rotary_apply<T>(x, pos, inv_freq, N, H, D, sign);                                           \
    }

ROPE_INST(float, f32)
ROPE_INST(__nv_bfloat16, bf16)
