// CUDA kernels of mtkd_fast::agent_stats (the agent state's KL, TCE and COS before the weights exist; same
// maths as csrc/cpu/agent_stats.cpp). One launch per tensor family:
// - logits: a warp per (sample, teacher); lanes walk the two rows with consecutive classes (coalesced): one
//   pass for the maxima, one for the sums (served from L1: a row is K values), warp shuffles only;
// - maps: a block per (sample, teacher) pools student map m of sample i with coalesced reads in either
//   layout (pool_channels, csrc/cuda/pool.cuh), then the cosine with e_m.
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

// Block per (sample, teacher): the spatial means x_c of student map m, sample i, and their cosine with e_m.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) agent_cosine_kernel(StatsMaps<scalar_t> maps,
                                                               StatsRows<acc_t> embeddings, int M, acc_t eps,
                                                               acc_t* __restrict__ cos) {
  __shared__ acc_t red[kWarp];
  __shared__ acc_t part[kThreads];
  const int64_t i = blockIdx.x / M;
  const int m = static_cast<int>(blockIdx.x % M);
  const int64_t C = maps.channels[m], HW = maps.spatial[m];
  const scalar_t* __restrict__ g = maps.map[m] + i * C * HW;
  const acc_t* __restrict__ e = embeddings.teacher[m] + i * C;
  const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(HW);  // H*W = 0: NaN means, as the reference
  acc_t dot = 0, xx = 0, ee = 0;
  const auto add = [&](int64_t c, acc_t sum) {
    const acc_t x = sum * inv_hw, ev = e[c];
    dot += x * ev;
    xx += x * x;
    ee += ev * ev;
  };
  pool_channels<kThreads>(g, C, HW, maps.channels_last[m], part, add);
  dot = block_allreduce(dot, red, SumOp{}, acc_t(0));
  xx = block_allreduce(xx, red, SumOp{}, acc_t(0));
  ee = block_allreduce(ee, red, SumOp{}, acc_t(0));
  if (threadIdx.x == 0) cos[blockIdx.x] = (dot / max(sqrt(xx), eps)) / max(sqrt(ee), eps);
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
    agent_cosine_kernel<scalar_t, acc_t><<<static_cast<unsigned>(tasks), kThreads, 0, stream>>>(
        mp, emb, static_cast<int>(d.M), static_cast<acc_t>(eps), cos.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {kl, tce, cos};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(mtkd_fast, CUDA, m) { m.impl("agent_stats", &cuda::agent_stats_cuda); }

}  // namespace mtkd
