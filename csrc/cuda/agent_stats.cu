// CUDA kernels of mtkd_fast::agent_stats (the agent state's KL, TCE and COS before the weights exist; same
// maths as csrc/cpu/agent_stats.cpp). One launch per tensor family:
// - logits: a warp per (sample, teacher); lanes walk the two rows with consecutive classes (coalesced): one
//   pass for the maxima, one for the sums (served from L1: a row is K values), warp shuffles only;
// - maps: blocks of channels per (sample, teacher) pool student map m of sample i with coalesced reads in
//   either layout (pool_channels and ChannelSplit, csrc/cuda/pool.cuh), then the cosine with e_m.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/op_checks.h"
#include "cuda/common.cuh"
#include "cuda/pool.cuh"

namespace mtkd {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;

template <typename scalar_t>
struct StatsRows {
  const scalar_t* teacher[kMaxTeachers];
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) agent_logit_stats_kernel(const scalar_t* __restrict__ student,
                                                                    StatsRows<scalar_t> rows,
                                                                    const int64_t* __restrict__ targets, int64_t B,
                                                                    int K, int M, acc_t T, acc_t* __restrict__ kl,
                                                                    acc_t* __restrict__ tce) {
  const int lane = threadIdx.x % kWarp;
  const int64_t task = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (task >= B * M) return;  // whole warps leave together
  const int64_t i = task / M;
  const int m = static_cast<int>(task % M);
  const scalar_t* __restrict__ zs = student + i * K;
  const scalar_t* __restrict__ zt = rows.teacher[m] + i * K;
  const int64_t y = targets[i];
  CUDA_KERNEL_ASSERT(y >= 0 && y < K && "targets: class index out of range");
  const acc_t invT = acc_t(1) / T, inf = INFINITY;
  acc_t smax = -inf, tmax = -inf;
  for (int k = lane; k < K; k += kWarp) {
    smax = max(smax, static_cast<acc_t>(zs[k]));
    tmax = max(tmax, static_cast<acc_t>(zt[k]));
  }
  smax = warp_reduce(smax, MaxOp{});
  tmax = warp_reduce(tmax, MaxOp{});
  // sT, tT: softmax sums at T; t1: the teacher's at T = 1; num: sum_k e_k ((zt_k - tmax) - (zs_k - smax)) / T,
  // so KL / T^2 = num / tT - log tT + log sT (the CPU kernel's per-class terms, summed)
  acc_t sT = 0, tT = 0, t1 = 0, num = 0;
  for (int k = lane; k < K; k += kWarp) {
    const acc_t xs = static_cast<acc_t>(zs[k]) - smax, xt = static_cast<acc_t>(zt[k]) - tmax;
    const acc_t e = exp(xt * invT);
    sT += exp(xs * invT);
    tT += e;
    t1 += exp(xt);
    if (e != 0) num += e * (xt - xs) * invT;  // only p == 0 contributes 0 (xlogy): NaN stays NaN
  }
  sT = warp_reduce(sT, SumOp{});
  tT = warp_reduce(tT, SumOp{});
  t1 = warp_reduce(t1, SumOp{});
  num = warp_reduce(num, SumOp{});
  if (lane == 0) {
    kl[task] = T * T * (num / tT - log(tT) + log(sT));
    tce[task] = log(t1) - (static_cast<acc_t>(zt[y]) - tmax);
  }
}

template <typename scalar_t>
struct StatsMaps {
  const scalar_t* map[kMaxTeachers];
  int64_t channels[kMaxTeachers];
  int64_t spatial[kMaxTeachers];  // H * W
  bool channels_last[kMaxTeachers];
};

// Blocks of channels per (sample, teacher) (ChannelSplit, csrc/cuda/pool.cuh): the spatial means x_c of student
// map m, sample i, and their cosine with e_m, the last block of each (sample, teacher) adding up its blocks' terms.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) agent_cosine_kernel(StatsMaps<scalar_t> maps,
                                                               StatsRows<acc_t> embeddings, ChannelSplit split,
                                                               int M, acc_t eps, acc_t* __restrict__ partial,
                                                               unsigned int* counter, acc_t* __restrict__ cos) {
  __shared__ acc_t red[kWarp];
  __shared__ acc_t part[kThreads];
  const ChannelBlock b = locate_channel_block(split, M);
  const int64_t C = maps.channels[b.m], HW = maps.spatial[b.m];
  cosine_channel_block<kThreads>(maps.map[b.m] + b.i * C * HW, embeddings.teacher[b.m] + b.i * C, C, HW,
                                 maps.channels_last[b.m], split, b, M, eps, part, red, partial, counter, cos);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> agent_stats_cuda(const at::Tensor& student, at::TensorList teachers,
                                                                const at::Tensor& targets, at::TensorList maps,
                                                                at::TensorList embeddings, double temperature,
                                                                double eps) {
  const LogitDims d = check_agent_stats_args(student, teachers, targets, maps, embeddings, temperature, eps);
  TORCH_CHECK(d.M <= kMaxTeachers, "teacher_logits: the CUDA kernel takes at most ", kMaxTeachers,
              " teachers, got ", d.M);
  TORCH_CHECK(d.K < (int64_t{1} << 31) && d.B * d.M < (int64_t{1} << 31),
              "student_logits: too large for the CUDA kernel");
  c10::cuda::CUDAGuard guard(student.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto opts = student.options().dtype(acc_dtype(student.scalar_type()));
  at::Tensor kl = at::empty({d.B, d.M}, opts), tce = at::empty({d.B, d.M}, opts);
  at::Tensor cos = maps.empty() ? at::zeros({d.B, d.M}, opts) : at::empty({d.B, d.M}, opts);
  if (d.B == 0) return {kl, tce, cos};  // no empty launches
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "mtkd_agent_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    StatsRows<scalar_t> rows{};
    for (int64_t m = 0; m < d.M; ++m) rows.teacher[m] = teachers[m].const_data_ptr<scalar_t>();
    const int64_t tasks = d.B * d.M;
    agent_logit_stats_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>((tasks + kWarpsPerBlock - 1) / kWarpsPerBlock), kThreads, 0, stream>>>(
            student.const_data_ptr<scalar_t>(), rows, targets.const_data_ptr<int64_t>(), d.B,
            static_cast<int>(d.K), static_cast<int>(d.M), static_cast<acc_t>(temperature), kl.data_ptr<acc_t>(),
            tce.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (maps.empty()) return;
    StatsMaps<scalar_t> mp{};
    StatsRows<acc_t> emb{};
    for (int64_t m = 0; m < d.M; ++m) {
      mp.map[m] = maps[m].const_data_ptr<scalar_t>();
      mp.channels[m] = maps[m].size(1);
      mp.spatial[m] = maps[m].size(2) * maps[m].size(3);
      mp.channels_last[m] = is_channels_last_map(maps[m]);
      emb.teacher[m] = embeddings[m].const_data_ptr<acc_t>();
    }
    const auto split = split_channels<kThreads>(d.B, d.M, mp.channels, mp.spatial, mp.channels_last);
    const auto work = split_workspace(split, d.B, d.M, opts, stream);
    agent_cosine_kernel<scalar_t, acc_t><<<static_cast<unsigned>(split.block_start[d.M]), kThreads, 0, stream>>>(
        mp, emb, split, static_cast<int>(d.M), static_cast<acc_t>(eps), work.partial.data_ptr<acc_t>(),
        reinterpret_cast<unsigned int*>(work.counters.data_ptr<int>()), cos.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {kl, tce, cos};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(mtkd_fast, CUDA, m) { m.impl("agent_stats", &cuda::agent_stats_cuda); }

}  // namespace mtkd
