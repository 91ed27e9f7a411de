#pragma once
// Spatial pooling of one sample's map with coalesced reads in either layout, and the pooled cosine split over
// blocks of channels, shared by the agent_stats and pooled_cosine kernels (csrc/cuda/agent_stats.cu, state_ops.cu).
#include <ATen/ops/empty.h>

#include <algorithm>

#include "cuda/common.cuh"

namespace mtkd {
namespace cuda {

// Sums each channel of one sample's map g ([C, HW] NCHW rows, or HW rows of ld >= C values, channels_last:
// the first C channels of each) and calls
// visit(c, sum) exactly once per channel, on one thread. Call from every thread of a kBlock-thread block
// (it may synchronise the block); part: kBlock values of shared memory.
// - NCHW: a group of S lanes (a power of two, S >= min(HW, 32)) per channel row, adjacent lanes on
//   adjacent pixels; short rows fill whole warps with several channels.
// - channels_last, C >= kBlock: a thread per channel, adjacent threads on adjacent channels.
// - channels_last, C < kBlock: R = kBlock / C rows of C threads split the pixels (no idle threads for
//   small C, no serial walk over H*W), their partial sums added through shared memory.
template <int kBlock, typename scalar_t, typename acc_t, typename Visit>
__device__ __forceinline__ void pool_channels(const scalar_t* __restrict__ g, int64_t C, int64_t HW,
                                              bool channels_last, int64_t ld, acc_t* part, Visit visit) {
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
      for (int64_t p = 0; p < HW; ++p) sum += static_cast<acc_t>(g[p * ld + c]);
      visit(c, sum);
    }
  } else if (C > 0) {
    const int64_t R = kBlock / C, c = threadIdx.x % C, r = threadIdx.x / C;
    acc_t sum = 0;
    if (r < R)
      for (int64_t p = r; p < HW; p += R) sum += static_cast<acc_t>(g[p * ld + c]);
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

// The pooled cosine split over blocks of whole channels (as feature_kd splits the maps), so that B * M small
// tasks still give the GPU several blocks per SM: about kSplitValues values of a sample per block (NCHW), or
// about kBlock channels (channels_last: a thread per channel, or rows of threads splitting the pixels).
constexpr int64_t kSplitValues = 8192;

struct ChannelSplit {
  int64_t per_block[kMaxTeachers];        // channels per block
  int64_t chunks[kMaxTeachers];           // blocks per sample
  int64_t block_start[kMaxTeachers + 1];  // first block of map m; [M]: the grid
};

template <int kBlock>
inline ChannelSplit split_channels(int64_t B, int64_t M, const int64_t* channels, const int64_t* spatial,
                                   const bool* channels_last) {
  ChannelSplit s{};
  int64_t blocks = 0;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t C = channels[m], HW = spatial[m];
    const int64_t want = channels_last[m] ? kBlock : kSplitValues / std::max<int64_t>(HW, 1);
    const int64_t chunks = C > 0 ? (C + std::max<int64_t>(want, 1) - 1) / std::max<int64_t>(want, 1) : 1;
    s.per_block[m] = C > 0 ? (C + chunks - 1) / chunks : 0;  // spread evenly over the sample's blocks
    s.chunks[m] = chunks;
    s.block_start[m] = blocks;
    blocks += B * chunks;
  }
  s.block_start[M] = blocks;
  return s;
}

struct ChannelBlock {
  int m;
  int64_t i, chunk;
};

__device__ __forceinline__ ChannelBlock locate_channel_block(const ChannelSplit& s, int M) {
  const int64_t block = blockIdx.x;
  int m = 0;
  while (m + 1 < M && block >= s.block_start[m + 1]) ++m;
  const int64_t local = block - s.block_start[m];
  return {m, local / s.chunks[m], local % s.chunks[m]};
}

// One block of the split cosine: pools channels [c0, c1) of sample b.i of a [C, HW] (or channels_last) map,
// writes its terms of (x . e, |x|^2, |e|^2) to partial (3 * gridDim.x values); the last block of (i, m) to
// arrive sums the task's terms in block order (deterministic) and writes cos[i * M + m]. counter: B * M
// zeroed arrival counters; emb: sample i's embedding (C values). H*W = 0 gives NaN means, as the reference.
template <int kBlock, typename scalar_t, typename emb_t, typename acc_t>
__device__ __forceinline__ void cosine_channel_block(const scalar_t* __restrict__ map, const emb_t* __restrict__ emb,
                                                     int64_t C, int64_t HW, bool channels_last, const ChannelSplit& s,
                                                     const ChannelBlock& b, int M, acc_t eps, acc_t* part, acc_t* red,
                                                     acc_t* __restrict__ partial, unsigned int* counter,
                                                     acc_t* __restrict__ cos) {
  const int64_t c0 = b.chunk * s.per_block[b.m], c1 = min(C, c0 + s.per_block[b.m]);
  const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(HW);
  acc_t d = 0, xx = 0, ee = 0;
  pool_channels<kBlock>(map + (channels_last ? c0 : c0 * HW), c1 - c0, HW, channels_last, C, part,
                        [&](int64_t c, acc_t sum) {
                          const acc_t x = sum * inv_hw, e = static_cast<acc_t>(emb[c0 + c]);
                          d += x * e;
                          xx += x * x;
                          ee += e * e;
                        });
  d = block_allreduce(d, red, SumOp{}, acc_t(0));
  xx = block_allreduce(xx, red, SumOp{}, acc_t(0));
  ee = block_allreduce(ee, red, SumOp{}, acc_t(0));
  const int64_t block = blockIdx.x, blocks = gridDim.x;
  if (threadIdx.x == 0) {
    partial[block] = d;
    partial[blocks + block] = xx;
    partial[2 * blocks + block] = ee;
  }
  const int64_t task = b.i * M + b.m;
  if (!is_last_arrival(counter + task, static_cast<unsigned int>(s.chunks[b.m]))) return;
  if (threadIdx.x == 0) {
    const int64_t first = s.block_start[b.m] + b.i * s.chunks[b.m];
    acc_t dot = 0, x2 = 0, e2 = 0;
    for (int64_t q = first; q < first + s.chunks[b.m]; ++q) {
      dot += __ldcg(partial + q);
      x2 += __ldcg(partial + blocks + q);
      e2 += __ldcg(partial + 2 * blocks + q);
    }
    cos[task] = (dot / max(sqrt(x2), eps)) / max(sqrt(e2), eps);
  }
}

// The workspace of a split cosine launch: 3 partial sums per block, then B * M zeroed arrival counters.
struct SplitWorkspace {
  at::Tensor partial, counters;
};

inline SplitWorkspace split_workspace(const ChannelSplit& s, int64_t B, int64_t M, const at::TensorOptions& acc,
                                      cudaStream_t stream) {
  const int64_t blocks = s.block_start[M];
  TORCH_CHECK(blocks < (int64_t{1} << 31), "student_maps: too large for the CUDA kernel");
  SplitWorkspace w{at::empty({3 * blocks}, acc), at::empty({B * M}, acc.dtype(at::kInt))};
  C10_CUDA_CHECK(cudaMemsetAsync(w.counters.data_ptr<int>(), 0, w.counters.nbytes(), stream));
  return w;
}

}  // namespace cuda
}  // namespace mtkd
