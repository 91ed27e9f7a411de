// The per-(sample, teacher) logit statistics that logit_kd and agent_stats share (docs/method.md section 2):
// teacher m's row against the student's row of the same sample gives TCE_{i,m} and KL_{i,m} (before the T^2
// factor) in one sweep of exps, the KL from the shifted logits so nothing cancels for logits of large magnitude.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/simd.h"

namespace mtkd {

// exp is these kernels' cost: for a small integer T (the usual 4), e^x = (e^{x/T})^T by multiplication, so a
// logit needs one exp (at T) instead of two (T = 1 and T). Returns T, or 0 when T is not such an integer.
inline int small_integer_temperature(double temperature) {
  return (temperature == std::floor(temperature) && temperature >= 1 && temperature <= 8)
             ? static_cast<int>(temperature) : 0;
}

template <typename acc_t>
struct TeacherRowStats {
  acc_t tce;     // cross-entropy of the teacher's row at T = 1
  acc_t kl_sum;  // sum_k p_t (log p_t - log p_s) at T (KL without its T^2)
};

// Teacher row zt against the student row zs, whose max and log-sum-exp at T are smax and lseT. `e` and (when
// int_T == 0) `e1` are K-long scratch. per_class(k, p) sees every class's teacher probability p^T(z_t)_k in
// the KL's sweep (logit_kd gathers its gradient term there; agent_stats passes a no-op).
template <typename scalar_t, typename acc_t, typename PerClass>
inline TeacherRowStats<acc_t> teacher_row_stats(const scalar_t* zt, const scalar_t* zs, acc_t smax, acc_t lseT,
                                                int64_t y, int64_t K, acc_t invT, int int_T, acc_t* e, acc_t* e1,
                                                PerClass per_class) {
  acc_t tmax = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : tmax)
  for (int64_t k = 0; k < K; ++k) tmax = std::max(tmax, static_cast<acc_t>(zt[k]));
  exp_shifted<scalar_t, acc_t>(zt, tmax, invT, e, K);
  if (!int_T) exp_shifted<scalar_t, acc_t>(zt, tmax, acc_t(1), e1, K);
  acc_t t1 = 0, tT = 0;
#pragma omp simd reduction(+ : t1, tT)
  for (int64_t k = 0; k < K; ++k) {
    t1 += int_T ? int_power(e[k], int_T) : e1[k];
    tT += e[k];
  }
  const acc_t tlseT = std::log(tT), inv_tT = acc_t(1) / tT;
  // KL = sum_k p_t (log p_t - log p_s); only an exact p_t == 0 contributes 0 (xlogy: a -inf logit). A NaN p_t
  // (a NaN or +inf teacher logit) must reach the sum, as in plain PyTorch, so the test is != 0, never > 0.
  acc_t kl_sum = 0;
  // a select, not a branch, so the loop vectorises (the unused product may be NaN for a -inf logit)
#pragma omp simd reduction(+ : kl_sum)
  for (int64_t k = 0; k < K; ++k) {
    const acc_t p = e[k] * inv_tT;
    const acc_t log_pt = (static_cast<acc_t>(zt[k]) - tmax) * invT - tlseT;
    const acc_t log_ps = (static_cast<acc_t>(zs[k]) - smax) * invT - lseT;
    kl_sum += p != acc_t(0) ? p * (log_pt - log_ps) : acc_t(0);
    per_class(k, p);
  }
  return {std::log(t1) - (static_cast<acc_t>(zt[y]) - tmax), kl_sum};
}

}  // namespace mtkd
