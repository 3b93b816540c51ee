// Shared header of the transformer-layer kernels: common.cuh, NAN (NVRTC does not predefine it),
// then the deterministic column sums used for parameter gradients (norm weight/bias, linear bias).
#pragma once

#ifndef NAN
#define NAN __int_as_float(0x7fffffff)
#endif

#include "common.cuh"

// Launch the column sums with blockDim (IRB_COL_TX, IRB_COL_TY) and one block per IRB_COL_TX
// columns. Thread (tx, ty) strides rows ty, ty+TY, ...; the TY partials are then added in a fixed
// order by ty == 0, so the result does not depend on scheduling and no atomics are used.
#define IRB_COL_TX 32
#define IRB_COL_TY 16

// `f(n, acc)` adds row n's contributions for column `c` into acc[0..K). It is only called when
// c < C. On return, thread ty == 0 holds the column totals in `out` (other threads: undefined).
template <int K, typename F>
__device__ __forceinline__ void irb_column_sums(int N, int C, int c, F f, float (&out)[K]) {
    __shared__ float sh[K][IRB_COL_TY][IRB_COL_TX + 1];
    float acc[K];
    #pragma unroll
    for (int k = 0; k < K; ++k) acc[k] = 0.f;
    if (c < C) {
        for (int n = threadIdx.y; n < N; n += IRB_COL_TY) f(n, acc);
    }
    #pragma unroll
    for (int k = 0; k < K; ++k) sh[k][threadIdx.y][threadIdx.x] = acc[k];
    __syncthreads();
    if (threadIdx.y == 0) {
        #pragma unroll
        for (int k = 0; k < K; ++k) {
            float s = 0.f;
            for (int j = 0; j < IRB_COL_TY; ++j) s += sh[k][j][threadIdx.x];
            out[k] = s;
        }
    }
}
