// CPU kernel of mtkd_fast::feature_kd: all M (student map, teacher map) pairs in ONE parallel region.
// Each (sample, teacher) task reads G and F once and writes dloss/dG in the same pass, so the per-sample
// MSE and the gradient come from one read of the inputs (docs/method.md sections 2-3); given the teacher embeddings,
// the same read also pools G for the agent state's cosine COS_{i,m} (docs/method.md section 2), sparing the pooled
// cosine its own pass over the maps. Tasks are ordered sample-major so every thread gets a mix of the
// teachers' (differently sized) maps. float32 gradients larger than the cache are written with streaming
// stores on x86-64 (csrc/cpu/simd.h, stream_gradient_stores below).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <unistd.h>
#endif

#include "cpu/cosine.h"
#include "cpu/op_checks.h"
#include "cpu/simd.h"

namespace mtkd {
namespace {

// Recycles the gradient buffers of the student maps between steps. A fresh multi-megabyte CPU tensor comes
// from mmap and every page faults (and is zero-filled by the kernel) on first write, which costs more than
// the kernel's own pass (ImageNet shape: ~270 ms of page faults vs ~90 ms of memory traffic on this host).
// The pool keeps storages, not tensors: each call gets a new tensor on a pooled storage, and a storage is
// handed out again only when the pool holds its only reference (the previous step's gradient tensors, its
// autograd graph and every user reference or view are gone), so a live gradient is never overwritten.
class GradBufferPool {
 public:
  at::Tensor empty_like(const at::Tensor& like) {  // like: dense, so its strides span exactly nbytes
    constexpr size_t kMinBytes = 1 << 20;  // small tensors come from malloc's free lists anyway
    const size_t nbytes = like.nbytes();
    if (nbytes < kMinBytes) return at::empty_like(like);
    c10::Storage storage;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (const c10::Storage& s : storages_)
        if (s.use_count() == 1 && s.nbytes() == nbytes && s.device() == like.device()) {
          storage = s;
          break;
        }
      if (!storage) {
        storage = at::empty({static_cast<int64_t>(nbytes)}, like.options().dtype(at::kByte)).storage();
        if (storages_.size() >= kMaxStorages) {  // forget the unused storages before growing further
          std::vector<c10::Storage> kept;
          for (const c10::Storage& s : storages_)
            if (s.use_count() > 1) kept.push_back(s);
          storages_.swap(kept);
        }
        if (storages_.size() < kMaxStorages) storages_.push_back(storage);
      }
    }
    return at::empty({0}, like.options()).set_(storage, 0, like.sizes(), like.strides());
  }

 private:
  static constexpr size_t kMaxStorages = 64;
  std::mutex mutex_;
  std::vector<c10::Storage> storages_;
};

GradBufferPool& grad_buffer_pool() {
  static GradBufferPool pool;
  return pool;
}

// sum_j (g_j - f_j)^2 over one sample, writing out_j = coef * (g_j - f_j). float32 partial sums over short
// blocks (vectorised), added into a double, so long maps (C*H*W ~ 1e5) keep float64-like accuracy.
template <typename scalar_t>
double sq_diff_and_grad(const scalar_t* __restrict g, const scalar_t* __restrict f, scalar_t* __restrict out,
                        int64_t n, at::opmath_type<scalar_t> coef) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kBlock = 2048;
  double total = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t stop = std::min(n, start + kBlock);
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = start; j < stop; ++j) {
      const acc_t diff = static_cast<acc_t>(g[j]) - static_cast<acc_t>(f[j]);
      s += diff * diff;
      out[j] = static_cast<scalar_t>(coef * diff);
    }
    total += static_cast<double>(s);
  }
  return total;
}

// The same for an NCHW-contiguous sample [C, H*W], also writing the channel means x[c] (the pooled map).
template <typename scalar_t>
double sq_diff_grad_and_pool_nchw(const scalar_t* __restrict g, const scalar_t* __restrict f, scalar_t* __restrict out,
                                  int64_t C, int64_t HW, at::opmath_type<scalar_t> coef,
                                  at::opmath_type<scalar_t>* __restrict x) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(HW);
  double total = 0;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t off = c * HW;
    acc_t s = 0, sum = 0;
#pragma omp simd reduction(+ : s, sum)
    for (int64_t p = off; p < off + HW; ++p) {
      const acc_t gv = static_cast<acc_t>(g[p]);
      const acc_t diff = gv - static_cast<acc_t>(f[p]);
      s += diff * diff;
      sum += gv;
      out[p] = static_cast<scalar_t>(coef * diff);
    }
    total += static_cast<double>(s);
    x[c] = sum * inv_hw;
  }
  return total;
}

// The last-level cache a core sees, in bytes. Linux's sysfs gives the cache instance of cpu0 (32 MiB on an
// AMD EPYC here), where sysconf(_SC_LEVEL3_CACHE_SIZE) reports every instance of the package together
// (384 MiB on the same machine); 32 MiB when neither is known.
int64_t last_level_cache_bytes() {
  int64_t bytes = 0;
#if defined(__linux__)
  for (const char* index : {"index3", "index2"}) {  // the highest level first
    const std::string path = std::string("/sys/devices/system/cpu/cpu0/cache/") + index + "/size";
    if (FILE* f = std::fopen(path.c_str(), "r")) {
      long long value = 0;
      char unit = 0;
      const int got = std::fscanf(f, "%lld%c", &value, &unit);
      std::fclose(f);
      if (got >= 1 && value > 0) {
        bytes = value * (unit == 'K' ? 1024LL : unit == 'M' ? 1024LL * 1024 : unit == 'G' ? 1024LL << 20 : 1LL);
        break;
      }
    }
  }
#if defined(_SC_LEVEL3_CACHE_SIZE)
  if (bytes <= 0) bytes = static_cast<int64_t>(sysconf(_SC_LEVEL3_CACHE_SIZE));
#endif
#endif
  return bytes > 0 ? bytes : int64_t(32) << 20;
}

// Whether this call streams its float32 gradient stores (csrc/cpu/simd.h). MTKD_FAST_STREAM_STORES=1 / 0
// forces it on / off (tests cover both paths at small sizes); otherwise the gradients stream when the op's
// traffic (read G and F, write the gradient: 3x the gradients' bytes) exceeds the last-level cache, where
// cached stores would only evict the maps, and stay cached below (the student's backward reads them next).
bool stream_gradient_stores(int64_t grad_bytes) {
#ifdef MTKD_SSE2
  const char* env = std::getenv("MTKD_FAST_STREAM_STORES");
  if (env && std::strcmp(env, "1") == 0) return true;
  if (env && std::strcmp(env, "0") == 0) return false;
  static const int64_t cache_bytes = last_level_cache_bytes();
  return 3 * grad_bytes > cache_bytes;
#else
  (void)grad_bytes;
  return false;
#endif
}

#ifdef MTKD_SSE2
// feature_kd's two float32 walks with streaming gradient stores: a whole sample, and an NCHW sample with its
// channel means (the pooled map). float32 partial sums over short runs, added into a double, as above.
inline double sq_diff_and_grad_stream(const float* g, const float* f, float* out, int64_t n, float coef) {
  constexpr int64_t kBlock = 2048;
  double total = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    total += static_cast<double>(sq_diff_grad_stream_run(g + start, f + start, out + start, len, coef));
  }
  return total;
}

inline double sq_diff_grad_and_pool_nchw_stream(const float* g, const float* f, float* out, int64_t C, int64_t HW,
                                                float coef, float* x) {
  // Channel means first, for a block of channels at a time, then ONE flat streaming run over the block (which
  // re-reads g from L1). Runs of one channel each (H*W = 49 at 7x7) would start and end inside cache lines and
  // mix cached stores with streaming stores in the same lines: about 4x slower than not streaming at all.
  // Blocks hold a multiple of 16 / gcd(H*W, 16) channels, so they start on a 64-byte line when the sample does.
  const float inv_hw = 1.0f / static_cast<float>(HW);
  const int64_t unit = 16 / std::gcd(HW, int64_t{16}), per_block = unit * std::max<int64_t>(1, 4096 / (unit * HW));
  double total = 0;
  for (int64_t c0 = 0; c0 < C; c0 += per_block) {
    const int64_t c1 = std::min(C, c0 + per_block);
    for (int64_t c = c0; c < c1; ++c) x[c] = row_sum(g + c * HW, HW) * inv_hw;
    total += sq_diff_and_grad_stream(g + c0 * HW, f + c0 * HW, out + c0 * HW, (c1 - c0) * HW, coef);
  }
  return total;
}
#endif

// Other dtypes (and builds without SSE2) never stream: these stubs only let every dispatched dtype compile.
template <typename T, typename A>
double sq_diff_and_grad_stream(const T*, const T*, T*, int64_t, A) {
  TORCH_INTERNAL_ASSERT(false, "feature_kd: streaming stores are float32 only");
  return 0;
}
template <typename T, typename A>
double sq_diff_grad_and_pool_nchw_stream(const T*, const T*, T*, int64_t, int64_t, A, A*) {
  TORCH_INTERNAL_ASSERT(false, "feature_kd: streaming stores are float32 only");
  return 0;
}

// ... and for a channels_last sample [H*W, C].
template <typename scalar_t>
double sq_diff_grad_and_pool_nhwc(const scalar_t* __restrict g, const scalar_t* __restrict f, scalar_t* __restrict out,
                                  int64_t C, int64_t HW, at::opmath_type<scalar_t> coef,
                                  at::opmath_type<scalar_t>* __restrict x) {
  using acc_t = at::opmath_type<scalar_t>;
  std::fill(x, x + C, acc_t(0));
  double total = 0;
  for (int64_t p = 0; p < HW; ++p) {
    const int64_t off = p * C;
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; ++c) {
      const acc_t gv = static_cast<acc_t>(g[off + c]);
      const acc_t diff = gv - static_cast<acc_t>(f[off + c]);
      s += diff * diff;
      x[c] += gv;
      out[off + c] = static_cast<scalar_t>(coef * diff);
    }
    total += static_cast<double>(s);
  }
  const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(HW);
  for (int64_t c = 0; c < C; ++c) x[c] *= inv_hw;
  return total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> feature_kd_cpu(
    at::TensorList students, at::TensorList teachers, const at::Tensor& weights, double beta,
    std::optional<at::TensorList> embeddings, double eps) {
  const int64_t B = check_feature_kd_args(students, teachers, weights, embeddings, eps);
  const int64_t M = static_cast<int64_t>(students.size());
  const bool with_cos = embeddings.has_value();
  const auto dtype = students[0].scalar_type();
  const auto opts = students[0].options().dtype(acc_dtype(dtype));
  at::Tensor loss = at::empty({}, opts), mse = at::empty({B, M}, opts);
  at::Tensor cos = with_cos ? at::empty({B, M}, opts) : at::empty({0}, opts);
  std::vector<at::Tensor> grads;
  grads.reserve(M);
  for (int64_t m = 0; m < M; ++m) grads.push_back(grad_buffer_pool().empty_like(students[m]));  // the map's strides

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mtkd_feature_kd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> g_ptr(M), f_ptr(M);
    std::vector<scalar_t*> out_ptr(M);
    std::vector<const acc_t*> e_ptr(M, nullptr);
    std::vector<int64_t> numel(M), channels(M), spatial(M);
    std::vector<char> channels_last(M);
    int64_t max_c = 0;
    for (int64_t m = 0; m < M; ++m) {
      g_ptr[m] = students[m].const_data_ptr<scalar_t>();
      f_ptr[m] = teachers[m].const_data_ptr<scalar_t>();
      out_ptr[m] = grads[m].data_ptr<scalar_t>();
      numel[m] = students[m].numel() / std::max<int64_t>(B, 1);
      channels[m] = students[m].size(1);
      spatial[m] = students[m].size(2) * students[m].size(3);
      channels_last[m] = is_channels_last_map(students[m]);
      if (with_cos) e_ptr[m] = (*embeddings)[m].const_data_ptr<acc_t>();
      max_c = std::max(max_c, channels[m]);
    }
    const acc_t* w = weights.const_data_ptr<acc_t>();
    acc_t* mse_out = mse.data_ptr<acc_t>();
    acc_t* cos_out = with_cos ? cos.data_ptr<acc_t>() : nullptr;
    int64_t grad_bytes = 0;
    for (const auto& t : grads) grad_bytes += static_cast<int64_t>(t.nbytes());
    const bool stream = std::is_same_v<scalar_t, float> && stream_gradient_stores(grad_bytes);
    // one parallel region over all (sample, teacher) tasks; a sample's values start at i * numel (dense)
    at::parallel_for(0, B * M, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> x(with_cos ? max_c : 0);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t i = task / M, m = task % M, n = numel[m];
        const acc_t coef = static_cast<acc_t>(2.0 * beta * static_cast<double>(w[i * M + m]) / (double(B) * double(n)));
        const int64_t off = i * n;
        double s = 0.0;
        if (with_cos && n) {
          const int64_t C = channels[m], HW = spatial[m];
          if (channels_last[m])
            s = sq_diff_grad_and_pool_nhwc<scalar_t>(g_ptr[m] + off, f_ptr[m] + off, out_ptr[m] + off, C, HW, coef, x.data());
          else if (stream)
            s = sq_diff_grad_and_pool_nchw_stream(g_ptr[m] + off, f_ptr[m] + off, out_ptr[m] + off, C, HW, coef, x.data());
          else
            s = sq_diff_grad_and_pool_nchw<scalar_t>(g_ptr[m] + off, f_ptr[m] + off, out_ptr[m] + off, C, HW, coef, x.data());
          cos_out[task] = cosine_parts<acc_t, acc_t>(x.data(), e_ptr[m] + i * C, C, eps).cos;
        } else if (n) {
          s = stream ? sq_diff_and_grad_stream(g_ptr[m] + off, f_ptr[m] + off, out_ptr[m] + off, n, coef)
                     : sq_diff_and_grad<scalar_t>(g_ptr[m] + off, f_ptr[m] + off, out_ptr[m] + off, n, coef);
        } else if (with_cos) {
          // as pooled_cosine and the reference: H*W = 0 has no mean (NaN), C = 0 pools to an empty vector (0)
          cos_out[task] = spatial[m] == 0 && channels[m] > 0 ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0);
        }
        mse_out[task] = static_cast<acc_t>(n ? s / double(n) : 0.0);
      }
#ifdef MTKD_SSE2
      if (stream) stream_fence();
#endif
    });
    double total = 0;
    for (int64_t i = 0; i < B; ++i)
      for (int64_t m = 0; m < M; ++m) total += double(w[i * M + m]) * double(mse_out[i * M + m]);
    loss.fill_(B > 0 ? beta * total / double(B) : 0.0);  // no samples: 0, as the CUDA kernel
  });
  return {loss, mse, cos, grads};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtkd_fast, CPU, m) { m.impl("feature_kd", &feature_kd_cpu); }

}  // namespace mtkd
