// C++ test run by ctest (CMake build): the CPU kernels of mtkd_fast::logit_kd, feature_kd and agent_stats,
// called through the dispatcher as any C++ user would, against the same maths in ATen ops (float64).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <cstdlib>
#include <tuple>
#include <vector>

#define EXPECT(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: EXPECT failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

static bool close(const at::Tensor& a, const at::Tensor& b) { return at::allclose(a, b, 1e-10, 1e-12); }

static void test_logit_kd() {
  at::manual_seed(0);
  const int64_t B = 7, K = 13, M = 3;
  const double T = 3.0, alpha = 0.7;
  auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor zs = at::randn({B, K}, opts) * 4, zt = at::randn({M, B, K}, opts) * 4;
  at::Tensor y = at::randint(0, K, {B}, at::TensorOptions().dtype(at::kLong)), w = at::rand({B, M}, opts) * 2;
  std::vector<at::Tensor> teachers;
  for (const auto& t : zt.unbind(0)) teachers.push_back(t.contiguous());
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("mtkd_fast::logit_kd", "")
                .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                    const at::Tensor&, at::TensorList, const at::Tensor&, const at::Tensor&, double, double)>();
  auto [loss, kl, tce, sce, grad] = op.call(zs, teachers, y, w, T, alpha);

  at::Tensor log_ps = at::log_softmax(zs / T, 1), log_pt = at::log_softmax(zt / T, 2);
  at::Tensor kl_ref = (log_pt.exp() * (log_pt - log_ps.unsqueeze(0))).sum(2).t() * (T * T);
  at::Tensor sce_ref = at::cross_entropy_loss(zs, y, {}, at::Reduction::None);
  at::Tensor tce_ref = at::cross_entropy_loss(zt.reshape({M * B, K}), y.repeat({M}), {}, at::Reduction::None)
                           .reshape({M, B})
                           .t();
  at::Tensor loss_ref = sce_ref.mean() + alpha * (w * kl_ref).mean(0).sum();
  at::Tensor onehot = at::one_hot(y, K).to(at::kDouble);
  at::Tensor kd = (w.t().unsqueeze(2) * (at::softmax(zs / T, 1).unsqueeze(0) - at::softmax(zt / T, 2))).sum(0);
  at::Tensor grad_ref = (at::softmax(zs, 1) - onehot) / B + alpha * T * kd / B;
  EXPECT(close(kl, kl_ref));
  EXPECT(close(sce, sce_ref));
  EXPECT(close(tce, tce_ref));
  EXPECT(close(loss, loss_ref));
  EXPECT(close(grad, grad_ref));
}

static void test_feature_kd() {
  at::manual_seed(1);
  const int64_t B = 5;
  const double beta = 2.5;
  auto opts = at::TensorOptions().dtype(at::kDouble);
  std::vector<at::Tensor> gs = {at::randn({B, 4, 3, 3}, opts), at::randn({B, 6, 2, 5}, opts).contiguous(at::MemoryFormat::ChannelsLast)};
  std::vector<at::Tensor> fs = {at::randn({B, 4, 3, 3}, opts), at::randn({B, 6, 2, 5}, opts).contiguous(at::MemoryFormat::ChannelsLast)};
  at::Tensor w = at::rand({B, 2}, opts);
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("mtkd_fast::feature_kd", "")
                .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>(
                    at::TensorList, at::TensorList, const at::Tensor&, double, std::optional<at::TensorList>, double)>();
  std::vector<at::Tensor> emb = {at::randn({B, 4}, opts), at::randn({B, 6}, opts)};
  auto [loss, mse, cos, grads] = op.call(gs, fs, w, beta, at::TensorList(emb), 1e-8);
  EXPECT(std::get<2>(op.call(gs, fs, w, beta, std::nullopt, 1e-8)).numel() == 0);  // no embeddings: no cosine
  at::Tensor loss_ref = at::zeros({}, opts);
  for (int64_t m = 0; m < 2; ++m) {
    at::Tensor diff = gs[m] - fs[m];
    at::Tensor mse_ref = diff.pow(2).flatten(1).mean(1);
    EXPECT(close(mse.select(1, m), mse_ref));
    loss_ref = loss_ref + beta * (w.select(1, m) * mse_ref).mean();
    const double n = static_cast<double>(gs[m][0].numel());
    EXPECT(close(grads[m], beta * w.select(1, m).view({B, 1, 1, 1}) * 2 * diff / (B * n)));
    EXPECT(grads[m].strides() == gs[m].strides());
    at::Tensor pooled = gs[m].mean({2, 3});
    EXPECT(close(cos.select(1, m), (pooled * emb[m]).sum(1) / (pooled.norm(2, 1) * emb[m].norm(2, 1))));
  }
  EXPECT(close(loss, loss_ref));
}

static void test_agent_stats() {
  at::manual_seed(2);
  const int64_t B = 5, K = 11, M = 2;
  const double T = 4.0;
  auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor zs = at::randn({B, K}, opts) * 3, zt = at::randn({M, B, K}, opts) * 3;
  at::Tensor y = at::randint(0, K, {B}, at::TensorOptions().dtype(at::kLong));
  std::vector<at::Tensor> teachers;
  for (const auto& t : zt.unbind(0)) teachers.push_back(t.contiguous());
  std::vector<at::Tensor> gs = {at::randn({B, 3, 2, 2}, opts),
                                at::randn({B, 4, 3, 1}, opts).contiguous(at::MemoryFormat::ChannelsLast)};
  std::vector<at::Tensor> emb = {at::randn({B, 3}, opts), at::randn({B, 4}, opts)};
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("mtkd_fast::agent_stats", "")
                .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, at::TensorList,
                                                                      const at::Tensor&, at::TensorList,
                                                                      at::TensorList, double, double)>();
  auto [kl, tce, cos] = op.call(zs, teachers, y, gs, emb, T, 1e-8);
  at::Tensor log_ps = at::log_softmax(zs / T, 1), log_pt = at::log_softmax(zt / T, 2);
  EXPECT(close(kl, (log_pt.exp() * (log_pt - log_ps.unsqueeze(0))).sum(2).t() * (T * T)));
  EXPECT(close(tce, at::cross_entropy_loss(zt.reshape({M * B, K}), y.repeat({M}), {}, at::Reduction::None)
                        .reshape({M, B})
                        .t()));
  for (int64_t m = 0; m < M; ++m) {
    at::Tensor pooled = gs[m].mean({2, 3});
    EXPECT(close(cos.select(1, m), (pooled * emb[m]).sum(1) / (pooled.norm(2, 1) * emb[m].norm(2, 1))));
  }
  EXPECT(at::equal(std::get<2>(op.call(zs, teachers, y, {}, {}, T, 1e-8)), at::zeros({B, M}, opts)));  // no maps
}

int main() {
  test_logit_kd();
  test_feature_kd();
  test_agent_stats();
  std::printf("fused CPU kernels ok\n");
  return 0;
}
