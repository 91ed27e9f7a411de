// CPU kernel of mtkd_fast::logit_kd: every row's softmaxes computed once, the loss, the per-sample
// statistics and dloss/dz_s produced in the same pass (docs/method.md sections 2-3). Rows run in parallel
// (at::parallel_for, OpenMP); accumulation in float32 (float64 for float64 inputs).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu/op_checks.h"
#include "cpu/simd.h"
#include "cpu/teacher_row.h"

namespace mtkd {
namespace {

template <typename scalar_t>
void logit_kd_rows(const at::Tensor& student, at::TensorList teachers, const at::Tensor& targets,
                   const at::Tensor& weights, double temperature, double alpha, const LogitDims& d,
                   at::Tensor& loss, at::Tensor& kl, at::Tensor& tce, at::Tensor& sce, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = d.B, K = d.K, M = d.M;
  const scalar_t* zs_all = student.const_data_ptr<scalar_t>();
  std::vector<const scalar_t*> zt_all(M);
  for (int64_t m = 0; m < M; ++m) zt_all[m] = teachers[m].const_data_ptr<scalar_t>();
  const int64_t* y_all = targets.const_data_ptr<int64_t>();
  const acc_t* w_all = weights.const_data_ptr<acc_t>();
  acc_t* kl_out = kl.data_ptr<acc_t>();
  acc_t* tce_out = tce.data_ptr<acc_t>();
  acc_t* sce_out = sce.data_ptr<acc_t>();
  scalar_t* grad_out = grad.data_ptr<scalar_t>();
  const acc_t T = static_cast<acc_t>(temperature), invT = acc_t(1) / T;
  const acc_t inv_B = acc_t(1) / static_cast<acc_t>(B);
  const acc_t kd_scale = static_cast<acc_t>(alpha) * T * inv_B;
  const int int_T = small_integer_temperature(temperature);  // csrc/cpu/teacher_row.h

  // Rows are independent; a chunk of rows shares its scratch buffers. The op is exp-bound (~5 ns a logit),
  // so ~4096 logits a chunk is ~20 us of work, well above a parallel region's cost: the CIFAR shape
  // (B = 64, K = 100, M = 4) splits over the threads rather than running on one.
  const int64_t grain = std::max<int64_t>(1, 4096 / (K * (M + 1)));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> ps(K), e(K), teach_sum(K), p1(K), e1(int_T ? 0 : K);
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* zs = zs_all + i * K;
      const int64_t y = y_all[i];
      TORCH_CHECK(y >= 0 && y < K, "targets: expected class indices in [0, ", K - 1, "], got ", y);
      // student: max, log-sum-exp at T = 1 and at T; ps = p^T(z_s)
      acc_t smax = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : smax)
      for (int64_t k = 0; k < K; ++k) smax = std::max(smax, static_cast<acc_t>(zs[k]));
      exp_shifted<scalar_t, acc_t>(zs, smax, invT, ps.data(), K);  // csrc/cpu/simd.h
      if (!int_T) exp_shifted<scalar_t, acc_t>(zs, smax, acc_t(1), p1.data(), K);
      acc_t s1 = 0, sT = 0;
#pragma omp simd reduction(+ : s1, sT)
      for (int64_t k = 0; k < K; ++k) {
        if (int_T) p1[k] = int_power(ps[k], int_T);
        s1 += p1[k];
        sT += ps[k];
      }
      const acc_t lse1 = std::log(s1), lseT = std::log(sT), inv_sT = acc_t(1) / sT, inv_s1 = acc_t(1) / s1;
      for (int64_t k = 0; k < K; ++k) {
        ps[k] *= inv_sT;
        teach_sum[k] = 0;
      }
      sce_out[i] = lse1 - (static_cast<acc_t>(zs[y]) - smax);
      acc_t w_total = 0;
      for (int64_t m = 0; m < M; ++m) {
        const scalar_t* zt = zt_all[m] + i * K;
        const acc_t w = w_all[i * M + m];
        w_total += w;
        acc_t* acc = teach_sum.data();  // sum_m w_m p^T(z_m), for the gradient below
        const TeacherRowStats<acc_t> r = teacher_row_stats<scalar_t, acc_t>(
            zt, zs, smax, lseT, y, K, invT, int_T, e.data(), e1.data(),
            [acc, w](int64_t k, acc_t p) { acc[k] += w * p; });
        tce_out[i * M + m] = r.tce;
        kl_out[i * M + m] = T * T * r.kl_sum;
      }
      // dL/dz_s = (p^1(z_s) - onehot(y)) / B + alpha T / B * sum_m w_m (p^T(z_s) - p^T(z_m))
      scalar_t* g = grad_out + i * K;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t ce_grad = p1[k] * inv_s1 - (k == y ? acc_t(1) : acc_t(0));
        g[k] = static_cast<scalar_t>(ce_grad * inv_B + kd_scale * (w_total * ps[k] - teach_sum[k]));
      }
    }
  });
  // The scalar loss from the per-sample statistics, in a fixed order (deterministic).
  double total = 0;
  for (int64_t i = 0; i < B; ++i) {
    double kd = 0;
    for (int64_t m = 0; m < M; ++m) kd += double(w_all[i * M + m]) * double(kl_out[i * M + m]);
    total += double(sce_out[i]) + alpha * kd;
  }
  loss.fill_(total / double(B));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> logit_kd_cpu(
    const at::Tensor& student, at::TensorList teachers, const at::Tensor& targets, const at::Tensor& weights,
    double temperature, double alpha) {
  const LogitDims d = check_logit_kd_args(student, teachers, targets, weights, temperature);
  const auto opts = student.options().dtype(acc_dtype(student.scalar_type()));
  at::Tensor loss = at::empty({}, opts), kl = at::empty({d.B, d.M}, opts), tce = at::empty({d.B, d.M}, opts);
  at::Tensor sce = at::empty({d.B}, opts), grad = at::empty({d.B, d.K}, student.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "mtkd_logit_kd_cpu", [&] {
    logit_kd_rows<scalar_t>(student, teachers, targets, weights, temperature, alpha, d, loss, kl, tce, sce, grad);
  });
  return {loss, kl, tce, sce, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtkd_fast, CPU, m) { m.impl("logit_kd", &logit_kd_cpu); }

}  // namespace mtkd
