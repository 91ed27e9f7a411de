#pragma once
// Spatial pooling of one sample's map with coalesced reads in either layout, shared by the agent_stats and
// pooled_cosine kernels (csrc/cuda/agent_stats.cu, state_ops.cu).
#include "cuda/common.cuh"

namespace mtkd {
namespace cuda {

// Sums each channel of one sample's map g ([C, HW] NCHW rows, or [HW, C] channels_last) and calls
// visit(c, sum) exactly once per channel, on one thread. Call from every thread of a kBlock-thread block
// (it may synchronise the block); part: kBlock values of shared memory.
// - NCHW: a group of S lanes (a power of two, S >= min(HW, 32)) per channel row, adjacent lanes on
//   adjacent pixels; short rows fill whole warps with several channels.
// - channels_last, C >= kBlock: a thread per channel, adjacent threads on adjacent channels.
// - channels_last, C < kBlock: R = kBlock / C rows of C threads split the pixels (no idle threads for
//   small C, no serial walk over H*W), their partial sums added through shared memory.
template <int kBlock, typename scalar_t, typename acc_t, typename Visit>
__device__ __forceinline__ void pool_channels(const scalar_t* __restrict__ g, int64_t C, int64_t HW,
                                              bool channels_last, acc_t* part, Visit visit) {
  if (!channels_last) {
    int S = 1;
    while (S < kWarp && S < HW) S <<= 1;
    const int groups = kBlock / S, gid = threadIdx.x / S, gl = threadIdx.x % S;
    for (int64_t c0 = 0; c0 < C; c0 += groups) {  // every lane runs the same iterations: full-warp shuffles
      const int64_t c = c0 + gid;
      acc_t sum = 0;
      if (c < C)
        for (int64_t p = gl; p < HW; p += S) sum += static_cast<acc_t>(g[c * HW + p]);
      for (int offset = S / 2; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
      if (c < C && gl == 0) visit(c, sum);
    }
  } else if (C >= kBlock) {
    for (int64_t c = threadIdx.x; c < C; c += kBlock) {
      acc_t sum = 0;
      for (int64_t p = 0; p < HW; ++p) sum += static_cast<acc_t>(g[p * C + c]);
      visit(c, sum);
    }
  } else if (C > 0) {
    const int64_t R = kBlock / C, c = threadIdx.x % C, r = threadIdx.x / C;
    acc_t sum = 0;
    if (r < R)
      for (int64_t p = r; p < HW; p += R) sum += static_cast<acc_t>(g[p * C + c]);
    part[threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.x < C) {
      acc_t total = 0;
      for (int64_t q = 0; q < R; ++q) total += part[q * C + threadIdx.x];
      visit(static_cast<int64_t>(threadIdx.x), total);
    }
    __syncthreads();  // part may be reused by the caller
  }
}

}  // namespace cuda
}  // namespace mtkd
