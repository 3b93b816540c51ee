// Shared helpers for every irbridge kernel: dtype conversion, warp/block reductions.
#pragma once
#include <cuda_bf16.h>

// NVRTC has no <math.h>, so INFINITY (used by the block max) is defined here.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#define IRB_IGNORE_INDEX (-100)

__device__ __forceinline__ float irb_to_float(float x) { return x; }
__device__ __forceinline__ float irb_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T irb_from_float(float x);
template <> __device__ __forceinline__ float irb_from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 irb_from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float irb_warp_sum(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float irb_warp_max(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum; every thread gets the result. `scratch` holds >= 32 floats.
__device__ __forceinline__ float irb_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = irb_warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < nwarps) ? scratch[lane] : 0.f;
    v = irb_warp_sum(v);
    return v;
}

// Block-wide max; every thread gets the result. `scratch` holds >= 32 floats.
__device__ __forceinline__ float irb_block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = irb_warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < nwarps) ? scratch[lane] : -INFINITY;
    v = irb_warp_max(v);
    return v;
}
