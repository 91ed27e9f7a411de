#pragma once
// float32 inner loops of the CPU kernels written with SSE2 intrinsics (part of every x86-64 CPU, so the
// baseline build uses them without run-time dispatch; the loops are bound by memory traffic, not by the
// vector width). Elsewhere (other architectures, compilers without the intrinsics) MTKD_SSE2 is undefined and
// the kernels use their portable loops. No CUDA file includes this header.
//
// - row_sum: the sum of a row of a map, with four independent accumulators. The portable loop keeps one
//   vector accumulator, and its chain of dependent additions (not the memory) bounds the pooling of the agent
//   state's cosine (agent_stats) when the maps come from the cache.
// - sq_diff_grad_stream_run: feature_kd's sum_j (g_j - f_j)^2 (and sum_j g_j for the pooled cosine) over one
//   run of values, writing out_j = coef * (g_j - f_j) with streaming (non-temporal) stores. The gradient of a
//   student map is as large as the map and is written without being read; a plain store first reads each
//   destination cache line (read-for-ownership), so the op moves 4 bytes for every 3 it needs, and the
//   written lines push the maps out of the cache. A streaming store writes the line straight to memory: worth
//   it for gradients larger than the cache (feature_kd decides per call; csrc/cpu/feature_kd.cpp).
#if defined(__SSE2__) && (defined(__x86_64__) || defined(_M_X64))
#include <emmintrin.h>
#define MTKD_SSE2 1
#endif

#include <cstdint>

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

struct SqDiffSums {
  float sq, sum;  // sum (g - f)^2 and (with kWithSum) sum g over the run
};

// One run of n values (few enough for float32 partial sums: callers pass at most a few thousand). The stores
// stream from the first 16-byte-aligned out + j on; the values before it and the tail are stored as usual.
// Callers issue stream_fence() before another thread may read what was written.
template <bool kWithSum>
inline SqDiffSums sq_diff_grad_stream_run(const float* __restrict g, const float* __restrict f,
                                          float* __restrict out, int64_t n, float coef) {
  float sq = 0, sum = 0;
  int64_t j = 0;
  for (; j < n && (reinterpret_cast<uintptr_t>(out + j) & 15) != 0; ++j) {
    const float d = g[j] - f[j];
    sq += d * d;
    if (kWithSum) sum += g[j];
    out[j] = coef * d;
  }
  const __m128 vc = _mm_set1_ps(coef);
  __m128 q0 = _mm_setzero_ps(), q1 = q0, s0 = q0, s1 = q0;
  for (; j + 8 <= n; j += 8) {
    const __m128 g0 = _mm_loadu_ps(g + j), g1 = _mm_loadu_ps(g + j + 4);
    const __m128 d0 = _mm_sub_ps(g0, _mm_loadu_ps(f + j)), d1 = _mm_sub_ps(g1, _mm_loadu_ps(f + j + 4));
    q0 = _mm_add_ps(q0, _mm_mul_ps(d0, d0));
    q1 = _mm_add_ps(q1, _mm_mul_ps(d1, d1));
    if (kWithSum) {
      s0 = _mm_add_ps(s0, g0);
      s1 = _mm_add_ps(s1, g1);
    }
    _mm_stream_ps(out + j, _mm_mul_ps(vc, d0));
    _mm_stream_ps(out + j + 4, _mm_mul_ps(vc, d1));
  }
  sq += hsum(_mm_add_ps(q0, q1));
  if (kWithSum) sum += hsum(_mm_add_ps(s0, s1));
  for (; j < n; ++j) {
    const float d = g[j] - f[j];
    sq += d * d;
    if (kWithSum) sum += g[j];
    out[j] = coef * d;
  }
  return {sq, sum};
}

// Streaming stores are weakly ordered: fence them before the written values are handed to another thread.
inline void stream_fence() { _mm_sfence(); }

#endif  // MTKD_SSE2

}  // namespace mtkd
