#pragma once
// The cosine of a pooled student map x [C] (accumulation type) with a teacher embedding e [C], each norm
// clamped below by eps as in torch.nn.functional.cosine_similarity. Shared by the pooled_cosine kernels and
// the cosine that feature_kd computes from the same read of the maps (csrc/cpu/state_ops.cpp, feature_kd.cpp).
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cpu/op_checks.h"
#include "cpu/simd.h"

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

// Spatial mean of sample i's map [C, H, W] into x (C values), for NCHW-contiguous or channels_last maps.
// H*W = 0 gives NaN means (as the reference's mean over an empty range).
template <typename scalar_t, typename acc_t>
void pool_sample(const at::Tensor& g, int64_t i, acc_t* x) {
  const int64_t C = g.size(1), HW = g.size(2) * g.size(3);
  const scalar_t* base = g.const_data_ptr<scalar_t>() + i * g.stride(0);
  const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(HW);
  if (is_channels_last_map(g)) {
    std::fill(x, x + C, acc_t(0));
    for (int64_t p = 0; p < HW; ++p)
      for (int64_t c = 0; c < C; ++c) x[c] += static_cast<acc_t>(base[p * C + c]);
    for (int64_t c = 0; c < C; ++c) x[c] *= inv_hw;
  } else {
#ifdef MTKD_SSE2
    if constexpr (std::is_same_v<scalar_t, float>) {  // four accumulators a row (csrc/cpu/simd.h)
      for (int64_t c = 0; c < C; ++c) x[c] = row_sum(base + c * HW, HW) * inv_hw;
      return;
    }
#endif
    for (int64_t c = 0; c < C; ++c) {
      acc_t s = 0;
      const scalar_t* row = base + c * HW;
#pragma omp simd reduction(+ : s)
      for (int64_t p = 0; p < HW; ++p) s += static_cast<acc_t>(row[p]);
      x[c] = s * inv_hw;
    }
  }
}

}  // namespace mtkd
