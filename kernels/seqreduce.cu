// Per-sequence reductions of token values: padded [R,T] + u8 mask, or packed tokens + segment ids.
//
// Determinism: every sum is formed by one block with a fixed thread->token assignment (thread i
// takes tokens lo+i, lo+i+blockDim, ... in order) followed by the fixed tree of irb_block_sum, so
// the result does not depend on scheduling. Packed segments first get their token range
// [lo, hi] from integer atomicMin/atomicMax (order-independent), then one block per segment scans
// only that range. Segment ids outside [-1, S) are skipped (the host twin rejects them).
#include "common.cuh"

#define SEQ_BLOCK 256

// Block-wide integer sum (exact, unlike a float count past 2^24); every thread gets the result.
__device__ __forceinline__ int seq_block_sum_int(int v, int* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < nwarps) ? scratch[lane] : 0;
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Padded layout: one block per row.
extern "C" __global__ void __launch_bounds__(SEQ_BLOCK)
seq_padded_forward(const float* __restrict__ values, const unsigned char* __restrict__ mask,
                   int rows, int cols, float* __restrict__ sums, int* __restrict__ counts,
                   float* __restrict__ means) {
    __shared__ float scratch[32];
    __shared__ int iscratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const size_t base = (size_t)r * cols;
    float s = 0.f;
    int c = 0;
    for (int t = threadIdx.x; t < cols; t += blockDim.x) {
        if (mask[base + t]) {
            s += values[base + t];
            c += 1;
        }
    }
    s = irb_block_sum(s, scratch);
    c = seq_block_sum_int(c, iscratch);
    if (threadIdx.x == 0) {
        const int n = c;
        sums[r] = s;
        counts[r] = n;
        means[r] = s / (float)max(n, 1);
    }
}

// Packed layout, pass 1: lo[s] = cols (i.e. n), hi[s] = -1.
extern "C" __global__ void seg_range_init(int segments, int n, int* __restrict__ lo, int* __restrict__ hi) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s < segments) {
        lo[s] = n;
        hi[s] = -1;
    }
}

// Packed layout, pass 2: first and last token index of every segment.
extern "C" __global__ void seg_ranges(const int* __restrict__ seg, int n, int segments,
                                      int* __restrict__ lo, int* __restrict__ hi) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int s = seg[i];
    if (s >= 0 && s < segments) {
        atomicMin(&lo[s], i);
        atomicMax(&hi[s], i);
    }
}

// Packed layout, pass 3: one block per segment sums the tokens of its range that carry its id.
extern "C" __global__ void __launch_bounds__(SEQ_BLOCK)
seq_packed_forward(const float* __restrict__ values, const int* __restrict__ seg, int segments,
                   const int* __restrict__ lo, const int* __restrict__ hi,
                   float* __restrict__ sums, int* __restrict__ counts, float* __restrict__ means) {
    __shared__ float scratch[32];
    __shared__ int iscratch[32];
    const int s = blockIdx.x;
    if (s >= segments) return;
    const int a = lo[s], b = hi[s];
    float acc = 0.f;
    int c = 0;
    for (int i = a + (int)threadIdx.x; i <= b; i += blockDim.x) {
        if (seg[i] == s) {
            acc += values[i];
            c += 1;
        }
    }
    acc = irb_block_sum(acc, scratch);
    c = seq_block_sum_int(c, iscratch);
    if (threadIdx.x == 0) {
        const int k = c;
        sums[s] = acc;
        counts[s] = k;
        means[s] = acc / (float)max(k, 1);
    }
}

// Backward, padded: dvalues[r,t] = mask ? grad[r] * (mean ? 1/max(count,1) : 1) : 0.
extern "C" __global__ void seq_padded_backward(const float* __restrict__ grad, const int* __restrict__ counts,
                                               int mean, const unsigned char* __restrict__ mask,
                                               int rows, int cols, float* __restrict__ dvalues) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t total = (size_t)rows * cols;
    if (i >= total) return;
    const int r = (int)(i / cols);
    float g = 0.f;
    if (mask[i]) g = mean ? grad[r] / (float)max(counts[r], 1) : grad[r];
    dvalues[i] = g;
}

// Backward, packed: dvalues[i] = seg ? grad[seg] (/ max(count,1) for means) : 0.
extern "C" __global__ void seq_packed_backward(const float* __restrict__ grad, const int* __restrict__ counts,
                                               int mean, const int* __restrict__ seg, int n, int segments,
                                               float* __restrict__ dvalues) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int s = seg[i];
    float g = 0.f;
    if (s >= 0 && s < segments) g = mean ? grad[s] / (float)max(counts[s], 1) : grad[s];
    dvalues[i] = g;
}
