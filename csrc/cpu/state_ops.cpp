// CPU kernels of the agent-state helpers (docs/method.md sections 2 and 5): the pooled cosine similarity COS_{i,m}
// (and its backward) and the per-sample loss with the normalised, clamped reward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/cosine.h"
#include "cpu/op_checks.h"

namespace mtkd {
namespace {

at::Tensor pooled_cosine_cpu(at::TensorList maps, at::TensorList embeddings, double eps) {
  const int64_t B = check_pooled_cosine_args(maps, embeddings, eps);
  const int64_t M = static_cast<int64_t>(maps.size());
  const auto dtype = maps[0].scalar_type();
  at::Tensor cos = at::empty({B, M}, maps[0].options().dtype(acc_dtype(dtype)));
  int64_t max_c = 0;
  for (const auto& g : maps) max_c = std::max(max_c, g.size(1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mtkd_pooled_cosine_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* out = cos.data_ptr<acc_t>();
    at::parallel_for(0, B * M, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> x(max_c);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t i = task / M, m = task % M, C = maps[m].size(1);
        pool_sample<scalar_t, acc_t>(maps[m], i, x.data());
        out[i * M + m] = cosine_parts<acc_t, scalar_t>(x.data(), embeddings[m].const_data_ptr<scalar_t>() + i * C, C, eps).cos;
      }
    });
  });
  return cos;
}

// With n_x = max(|x|, eps) (the clamp is not differentiated, as in torch's cosine_similarity):
//   dcos/dx = e / (n_x n_e) - cos * x / (n_x |x|)   (second term 0 when |x| = 0), likewise for e;
// the pooled x is the spatial mean, so each map value gets dcos/dx_c / (H W).
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> pooled_cosine_backward_cpu(
    const at::Tensor& grad, at::TensorList maps, at::TensorList embeddings, double eps) {
  const int64_t B = check_pooled_cosine_args(maps, embeddings, eps);
  const int64_t M = static_cast<int64_t>(maps.size());
  const auto dtype = maps[0].scalar_type();
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == B && grad.size(1) == M, "grad: expected shape [", B, ", ", M,
              "], got ", grad.sizes());
  TORCH_CHECK(grad.device() == maps[0].device(), "grad: expected device ", maps[0].device(), ", got ",
              grad.device());
  TORCH_CHECK(is_float_dtype(grad.scalar_type()), "grad: expected a floating dtype, got ", grad.scalar_type());
  const at::Tensor grad_acc = grad.to(acc_dtype(dtype)).contiguous();
  std::vector<at::Tensor> grad_maps, grad_emb;
  int64_t max_c = 0;
  for (int64_t m = 0; m < M; ++m) {
    grad_maps.push_back(at::empty_like(maps[m]));  // same layout as the map
    grad_emb.push_back(at::empty_like(embeddings[m]));
    max_c = std::max(max_c, maps[m].size(1));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mtkd_pooled_cosine_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* gout = grad_acc.const_data_ptr<acc_t>();
    at::parallel_for(0, B * M, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> x(max_c), dx(max_c);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t i = task / M, m = task % M;
        const at::Tensor& g = maps[m];
        const int64_t C = g.size(1), HW = g.size(2) * g.size(3);
        const scalar_t* e = embeddings[m].const_data_ptr<scalar_t>() + i * C;
        pool_sample<scalar_t, acc_t>(g, i, x.data());
        const auto p = cosine_parts<acc_t, scalar_t>(x.data(), e, C, eps);
        const acc_t cx = std::max(p.norm_x, static_cast<acc_t>(eps)), ce = std::max(p.norm_e, static_cast<acc_t>(eps));
        const acc_t go = gout[i * M + m];
        const acc_t a = go / (cx * ce);
        // only an exact zero norm is masked: a NaN norm (a NaN input) keeps its NaN gradient
        const acc_t bx = p.norm_x != acc_t(0) ? go * p.cos / (cx * p.norm_x) : acc_t(0);
        const acc_t be = p.norm_e != acc_t(0) ? go * p.cos / (ce * p.norm_e) : acc_t(0);
        scalar_t* ge = grad_emb[m].data_ptr<scalar_t>() + i * C;
        const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(HW);
        for (int64_t c = 0; c < C; ++c) {
          const acc_t ev = static_cast<acc_t>(e[c]);
          dx[c] = (a * ev - bx * x[c]) * inv_hw;
          ge[c] = static_cast<scalar_t>(a * x[c] - be * ev);
        }
        scalar_t* gm = grad_maps[m].data_ptr<scalar_t>() + i * g.stride(0);
        if (is_channels_last_map(g)) {
          for (int64_t q = 0; q < HW; ++q)
            for (int64_t c = 0; c < C; ++c) gm[q * C + c] = static_cast<scalar_t>(dx[c]);
        } else {
          for (int64_t c = 0; c < C; ++c)
            for (int64_t q = 0; q < HW; ++q) gm[c * HW + q] = static_cast<scalar_t>(dx[c]);
        }
      }
    });
  });
  return {grad_maps, grad_emb};
}

std::tuple<at::Tensor, at::Tensor> per_sample_loss_reward_cpu(const at::Tensor& sce, const at::Tensor& kl,
                                                              const at::Tensor& wl,
                                                              const std::optional<at::Tensor>& mse,
                                                              const std::optional<at::Tensor>& wf, double alpha,
                                                              double beta) {
  check_reward_args(sce, kl, wl, mse, wf);
  const int64_t B = kl.size(0), M = kl.size(1);
  at::Tensor loss = at::empty({B}, kl.options()), reward = at::empty({B}, kl.options());
  AT_DISPATCH_FLOATING_TYPES(kl.scalar_type(), "mtkd_per_sample_loss_reward_cpu", [&] {
    const scalar_t *s = sce.const_data_ptr<scalar_t>(), *k = kl.const_data_ptr<scalar_t>(),
                   *w = wl.const_data_ptr<scalar_t>();
    const scalar_t* q = mse ? mse->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* v = wf ? wf->const_data_ptr<scalar_t>() : nullptr;
    scalar_t *l = loss.data_ptr<scalar_t>(), *r = reward.data_ptr<scalar_t>();
    // a NaN/Inf loss gets reward 0 and stays out of the mean and std (docs/method.md section 5; as the reference)
    double mean = 0;
    int64_t n = 0;
    for (int64_t i = 0; i < B; ++i) {
      double kd = 0, fd = 0;
      for (int64_t m = 0; m < M; ++m) {
        kd += double(w[i * M + m]) * double(k[i * M + m]);
        if (q) fd += double(v[i * M + m]) * double(q[i * M + m]);
      }
      l[i] = static_cast<scalar_t>(double(s[i]) + alpha * kd + beta * fd);
      if (std::isfinite(double(l[i]))) {
        mean += double(l[i]);
        ++n;
      }
    }
    mean /= double(std::max<int64_t>(n, 1));
    double var = 0;
    for (int64_t i = 0; i < B; ++i)
      if (std::isfinite(double(l[i]))) var += (double(l[i]) - mean) * (double(l[i]) - mean);
    const double std_dev = n > 1 ? std::sqrt(var / double(n - 1)) : 0.0;
    for (int64_t i = 0; i < B; ++i) {
      // r = -l, so (r - mean r) / std = (mean l - l) / std
      const bool ok = std_dev > 0 && std::isfinite(double(l[i]));
      const double z = ok ? (mean - double(l[i])) / std_dev : 0.0;
      r[i] = static_cast<scalar_t>(std::min(1.0, std::max(0.0, z)));
    }
  });
  return {loss, reward};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtkd_fast, CPU, m) {
  m.impl("pooled_cosine", &pooled_cosine_cpu);
  m.impl("pooled_cosine_backward", &pooled_cosine_backward_cpu);
  m.impl("per_sample_loss_reward", &per_sample_loss_reward_cpu);
}

}  // namespace mtkd
