// CPU kernel of mtkd_fast::agent_stats: the agent state's per-sample statistics (docs/method.md section 2), computed
// before the teacher weights exist: KL_{i,m}, TCE_{i,m} from the logits and COS_{i,m} from the student maps
// and the teacher embeddings. One parallel region over the (sample, teacher) tasks, sample-major: task
// (i, m) reads teacher m's row i and pools student map m of sample i once; the student row's log-normaliser
// is computed once per sample a thread meets (tasks of one sample are adjacent). No gradients.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu/cosine.h"
#include "cpu/op_checks.h"
#include "cpu/simd.h"
#include "cpu/teacher_row.h"

namespace mtkd {
namespace {

template <typename scalar_t>
void agent_stats_tasks(const at::Tensor& student, at::TensorList teachers, const at::Tensor& targets,
                       at::TensorList maps, at::TensorList embeddings, double temperature, double eps,
                       const LogitDims& d, at::Tensor& kl, at::Tensor& tce, at::Tensor& cos) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = d.B, K = d.K, M = d.M;
  const bool with_maps = !maps.empty();
  const scalar_t* zs_all = student.const_data_ptr<scalar_t>();
  std::vector<const scalar_t*> zt_all(M);
  for (int64_t m = 0; m < M; ++m) zt_all[m] = teachers[m].const_data_ptr<scalar_t>();
  const int64_t* y_all = targets.const_data_ptr<int64_t>();
  acc_t* kl_out = kl.data_ptr<acc_t>();
  acc_t* tce_out = tce.data_ptr<acc_t>();
  acc_t* cos_out = cos.data_ptr<acc_t>();
  int64_t max_c = 0, map_values = 0;
  for (const auto& g : maps) {
    max_c = std::max(max_c, g.size(1));
    map_values += g.numel();
  }
  const acc_t T = static_cast<acc_t>(temperature), invT = acc_t(1) / T;
  const int int_T = small_integer_temperature(temperature);  // csrc/cpu/teacher_row.h
  // a task is one teacher row (~K exps, ~5 ns each) plus one pooled sample (~1 ns a value): chunks of
  // ~20 us of work, well above a parallel region's cost
  const int64_t per_task = 5 * K + (B * M > 0 ? map_values / (B * M) : 0);
  const int64_t grain = std::max<int64_t>(1, 20000 / std::max<int64_t>(per_task, 1));
  at::parallel_for(0, B * M, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> e(K), e1(int_T ? 0 : K), x(max_c);
    int64_t row = -1;
    acc_t smax = 0, lseT = 0;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / M, m = task % M;
      const scalar_t* zs = zs_all + i * K;
      const int64_t y = y_all[i];
      TORCH_CHECK(y >= 0 && y < K, "targets: expected class indices in [0, ", K - 1, "], got ", y);
      if (i != row) {  // the student's max and log-sum-exp at T, once per sample
        row = i;
        smax = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : smax)
        for (int64_t k = 0; k < K; ++k) smax = std::max(smax, static_cast<acc_t>(zs[k]));
        exp_shifted<scalar_t, acc_t>(zs, smax, invT, e.data(), K);
        acc_t sT = 0;
#pragma omp simd reduction(+ : sT)
        for (int64_t k = 0; k < K; ++k) sT += e[k];
        lseT = std::log(sT);
      }
      const scalar_t* zt = zt_all[m] + i * K;
      const TeacherRowStats<acc_t> r = teacher_row_stats<scalar_t, acc_t>(
          zt, zs, smax, lseT, y, K, invT, int_T, e.data(), e1.data(), [](int64_t, acc_t) {});
      tce_out[task] = r.tce;
      kl_out[task] = T * T * r.kl_sum;
      if (with_maps) {
        const int64_t C = maps[m].size(1);
        pool_sample<scalar_t, acc_t>(maps[m], i, x.data());  // H*W = 0: NaN means, as the reference
        cos_out[task] = cosine_parts<acc_t, acc_t>(x.data(), embeddings[m].const_data_ptr<acc_t>() + i * C, C, eps).cos;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> agent_stats_cpu(const at::Tensor& student, at::TensorList teachers,
                                                               const at::Tensor& targets, at::TensorList maps,
                                                               at::TensorList embeddings, double temperature,
                                                               double eps) {
  const LogitDims d = check_agent_stats_args(student, teachers, targets, maps, embeddings, temperature, eps);
  const auto opts = student.options().dtype(acc_dtype(student.scalar_type()));
  at::Tensor kl = at::empty({d.B, d.M}, opts), tce = at::empty({d.B, d.M}, opts);
  at::Tensor cos = maps.empty() ? at::zeros({d.B, d.M}, opts) : at::empty({d.B, d.M}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "mtkd_agent_stats_cpu", [&] {
    agent_stats_tasks<scalar_t>(student, teachers, targets, maps, embeddings, temperature, eps, d, kl, tce, cos);
  });
  return {kl, tce, cos};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtkd_fast, CPU, m) { m.impl("agent_stats", &agent_stats_cpu); }

}  // namespace mtkd
