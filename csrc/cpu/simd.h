#pragma once
// float32 inner loops of the CPU kernels written with SSE2 intrinsics (part of every x86-64 CPU, so the
// baseline build uses them without run-time dispatch; the loops are bound by memory traffic, not by the
// vector width). Elsewhere (other architectures, compilers without the intrinsics) MTKD_SSE2 is undefined and
// the kernels use their portable loops. No CUDA file includes this header.
//
// - row_sum: the sum of a row of a map, with four independent accumulators. The portable loop keeps one
//   vector accumulator, and its chain of dependent additions (not the memory) bounds the pooling of the agent
//   state's cosine (agent_stats) when the maps come from the cache.
// - sq_diff_grad_stream_run: feature_kd's sum_j (g_j - f_j)^2 over one
//   run of values, writing out_j = coef * (g_j - f_j) with streaming (non-temporal) stores. The gradient of a
//   student map is as large as the map and is written without being read; a plain store first reads each
//   destination cache line (read-for-ownership), so the op moves 4 bytes for every 3 it needs, and the
//   written lines push the maps out of the cache. A streaming store writes the line straight to memory: worth
//   it for gradients larger than the cache (feature_kd decides per call; csrc/cpu/feature_kd.cpp).
#if defined(__SSE2__) && (defined(__x86_64__) || defined(_M_X64))
#include <emmintrin.h>
#define MTKD_SSE2 1
#endif

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace mtkd {

#ifdef MTKD_SSE2

inline float hsum(__m128 v) {
  __m128 hi = _mm_movehl_ps(v, v);
  v = _mm_add_ps(v, hi);
  hi = _mm_shuffle_ps(v, v, 0x1);
  return _mm_cvtss_f32(_mm_add_ss(v, hi));
}

inline float row_sum(const float* r, int64_t n) {
  __m128 a0 = _mm_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t p = 0;
  for (; p + 16 <= n; p += 16) {
    a0 = _mm_add_ps(a0, _mm_loadu_ps(r + p));
    a1 = _mm_add_ps(a1, _mm_loadu_ps(r + p + 4));
    a2 = _mm_add_ps(a2, _mm_loadu_ps(r + p + 8));
    a3 = _mm_add_ps(a3, _mm_loadu_ps(r + p + 12));
  }
  for (; p + 4 <= n; p += 4) a0 = _mm_add_ps(a0, _mm_loadu_ps(r + p));
  float s = hsum(_mm_add_ps(_mm_add_ps(a0, a1), _mm_add_ps(a2, a3)));
  for (; p < n; ++p) s += r[p];
  return s;
}

// One run of n values (few enough for float32 partial sums: callers pass at most a few thousand): returns
// sum (g - f)^2. The stores stream from the first 16-byte-aligned out + j on; the values before it and the tail
// are stored as usual. Callers issue stream_fence() before another thread may read what was written.
inline float sq_diff_grad_stream_run(const float* __restrict g, const float* __restrict f, float* __restrict out,
                                     int64_t n, float coef) {
  float sq = 0;
  int64_t j = 0;
  for (; j < n && (reinterpret_cast<uintptr_t>(out + j) & 15) != 0; ++j) {
    const float d = g[j] - f[j];
    sq += d * d;
    out[j] = coef * d;
  }
  const __m128 vc = _mm_set1_ps(coef);
  __m128 q0 = _mm_setzero_ps(), q1 = q0;
  for (; j + 8 <= n; j += 8) {
    const __m128 d0 = _mm_sub_ps(_mm_loadu_ps(g + j), _mm_loadu_ps(f + j));
    const __m128 d1 = _mm_sub_ps(_mm_loadu_ps(g + j + 4), _mm_loadu_ps(f + j + 4));
    q0 = _mm_add_ps(q0, _mm_mul_ps(d0, d0));
    q1 = _mm_add_ps(q1, _mm_mul_ps(d1, d1));
    _mm_stream_ps(out + j, _mm_mul_ps(vc, d0));
    _mm_stream_ps(out + j + 4, _mm_mul_ps(vc, d1));
  }
  sq += hsum(_mm_add_ps(q0, q1));
  for (; j < n; ++j) {
    const float d = g[j] - f[j];
    sq += d * d;
    out[j] = coef * d;
  }
  return sq;
}

// Streaming stores are weakly ordered: fence them before the written values are handed to another thread.
inline void stream_fence() { _mm_sfence(); }

// e^x for four floats x <= 0 (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-5 polynomial for e^r, and
// 2^n from the exponent bits): within 2 ulp of expf. x below ln(FLT_MIN) ~ -87.3 gives 0 (where expf returns
// a subnormal), so a probability that underflows is exactly 0 as the kernels' p != 0 tests expect; NaN stays NaN.
inline __m128 exp_nonpositive(__m128 x) {
  const __m128 underflow = _mm_cmplt_ps(x, _mm_set1_ps(-87.3365478515625f));
  x = _mm_max_ps(_mm_set1_ps(-88.0f), x);  // max(c, x) returns x when x is NaN
  x = _mm_min_ps(_mm_set1_ps(0.0f), x);
  // n = round(x log2 e): floor(x log2 e + 0.5) by truncation, corrected for negative values
  __m128 fx = _mm_add_ps(_mm_mul_ps(x, _mm_set1_ps(1.44269504088896341f)), _mm_set1_ps(0.5f));
  __m128 t = _mm_cvtepi32_ps(_mm_cvttps_epi32(fx));
  fx = _mm_sub_ps(t, _mm_and_ps(_mm_cmpgt_ps(t, fx), _mm_set1_ps(1.0f)));
  // r = x - n ln2, with ln2 split in two for exactness
  x = _mm_sub_ps(x, _mm_mul_ps(fx, _mm_set1_ps(0.693359375f)));
  x = _mm_sub_ps(x, _mm_mul_ps(fx, _mm_set1_ps(-2.12194440e-4f)));
  const __m128 z = _mm_mul_ps(x, x);
  __m128 y = _mm_set1_ps(1.9875691500e-4f);
  y = _mm_add_ps(_mm_mul_ps(y, x), _mm_set1_ps(1.3981999507e-3f));
  y = _mm_add_ps(_mm_mul_ps(y, x), _mm_set1_ps(8.3334519073e-3f));
  y = _mm_add_ps(_mm_mul_ps(y, x), _mm_set1_ps(4.1665795894e-2f));
  y = _mm_add_ps(_mm_mul_ps(y, x), _mm_set1_ps(1.6666665459e-1f));
  y = _mm_add_ps(_mm_mul_ps(y, x), _mm_set1_ps(5.0000001201e-1f));
  y = _mm_add_ps(_mm_add_ps(_mm_mul_ps(y, z), x), _mm_set1_ps(1.0f));
  const __m128i n = _mm_cvttps_epi32(fx);  // n in [-127, 0]: 2^n as the float with exponent bits n + 127
  const __m128 pow2n = _mm_castsi128_ps(_mm_slli_epi32(_mm_add_epi32(n, _mm_set1_epi32(127)), 23));
  return _mm_andnot_ps(underflow, _mm_mul_ps(y, pow2n));
}

#endif  // MTKD_SSE2

// out[k] = e^{(z_k - shift) * scale} for k < n, with shift >= max_k z_k and scale > 0 (a softmax's shifted
// logits, so every exponent is <= 0): the exps of the logit kernels. float32 takes four at a time with SSE2.
template <typename scalar_t, typename acc_t>
inline void exp_shifted(const scalar_t* z, acc_t shift, acc_t scale, acc_t* out, int64_t n) {
  int64_t k = 0;
#ifdef MTKD_SSE2
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    const __m128 vs = _mm_set1_ps(shift), vk = _mm_set1_ps(scale);
    for (; k + 4 <= n; k += 4)
      _mm_storeu_ps(out + k, exp_nonpositive(_mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(z + k), vs), vk)));
    if (k < n) {  // the tail through the same function (padded with exponent 0), so every value is alike
      float tail[4] = {shift, shift, shift, shift};
      for (int64_t j = k; j < n; ++j) tail[j - k] = z[j];
      _mm_storeu_ps(tail, exp_nonpositive(_mm_mul_ps(_mm_sub_ps(_mm_loadu_ps(tail), vs), vk)));
      for (int64_t j = k; j < n; ++j) out[j] = tail[j - k];
    }
    return;
  }
#endif
  for (; k < n; ++k) out[k] = std::exp((static_cast<acc_t>(z[k]) - shift) * scale);
}

// e^{x T} from e^x for a small integer T >= 1, by multiplication (the logit kernels need both e^{x/T} and e^x)
template <typename acc_t>
inline acc_t int_power(acc_t e, int T) {
  acc_t r = e;
  for (int q = 1; q < T; ++q) r *= e;
  return r;
}

}  // namespace mtkd
