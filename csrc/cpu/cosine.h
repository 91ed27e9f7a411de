#pragma once
// The cosine of a pooled student map x [C] (accumulation type) with a teacher embedding e [C], each norm
// clamped below by eps as in torch.nn.functional.cosine_similarity. Shared by the pooled_cosine kernels and
// the cosine that feature_kd computes from the same read of the maps (csrc/cpu/state_ops.cpp, feature_kd.cpp).
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace mtkd {

template <typename acc_t>
struct CosParts {
  acc_t dot, norm_x, norm_e, cos;
};

template <typename acc_t, typename emb_t>
CosParts<acc_t> cosine_parts(const acc_t* x, const emb_t* e, int64_t C, double eps) {
  acc_t dot = 0, xx = 0, ee = 0;
#pragma omp simd reduction(+ : dot, xx, ee)
  for (int64_t c = 0; c < C; ++c) {
    const acc_t ev = static_cast<acc_t>(e[c]);
    dot += x[c] * ev;
    xx += x[c] * x[c];
    ee += ev * ev;
  }
  const acc_t nx = std::sqrt(xx), ne = std::sqrt(ee);
  const acc_t cx = std::max(nx, static_cast<acc_t>(eps)), ce = std::max(ne, static_cast<acc_t>(eps));
  return {dot, nx, ne, (dot / cx) / ce};
}

}  // namespace mtkd
