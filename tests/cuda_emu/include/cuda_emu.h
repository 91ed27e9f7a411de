#pragma once
// The CUDA dialect of csrc/cuda/*.cu as host C++ for the CPU SIMT emulator (tests/cuda_emu, docs/ops.md).
// Included first by every translated .cu/.cuh (tests/cuda_emu/__init__.py rewrites launches and __shared__
// declarations); the scheduler, barriers and warp collectives live in runtime.cpp. One fiber per CUDA thread,
// one block at a time on the launching OS thread, so threadIdx & co. are thread-locals the scheduler sets
// before resuming a fiber, and static shared memory is per-(OS thread, block) storage.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

extern thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace cuda_emu {

enum Op : int { kShflXor, kShflDown, kShflUp, kShflIdx, kBallot, kAny, kAll, kSyncwarp };

void syncthreads(const char* file, int line);
// One warp collective of this lane: stores `size` bytes of `in` (<= 16), waits for every lane of `mask`, and
// copies the source lane's bytes to `out` (shuffles) or returns the vote over the mask (ballot/any/all).
unsigned warp_collective(Op op, unsigned mask, const void* in, void* out, size_t size, int arg, int width,
                         const char* file, int line);
[[noreturn]] void fail(const char* file, int line, const char* what);
unsigned char* dynamic_smem();
void* shared_alloc(size_t size, size_t align, uint64_t* serial);
uint64_t block_serial();

// A __shared__ variable: one per (declaration site, block); NaN bytes until written (runtime.cpp).
template <typename T, typename Site>
inline T& shared_var() {
  static thread_local uint64_t serial = 0;
  static thread_local void* p = nullptr;
  if (serial != block_serial()) p = shared_alloc(sizeof(T), alignof(T), &serial);
  return *static_cast<T*>(p);
}

template <typename T>
inline T shfl(const char* file, int line, Op op, unsigned mask, T v, int arg, int width = 32) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>, "cuda_emu: shuffle of a type over 16 bytes");
  T out;
  warp_collective(op, mask, &v, &out, sizeof(T), arg, width, file, line);
  return out;
}

// The kernel launch `k<<<grid, block, smem, stream>>>(args)`, rewritten at build time to
// Launcher(file, line, "k", grid, block, smem, stream)(k)(args).
void launch(const char* file, int line, const char* kernel, dim3 grid, dim3 block, size_t smem, void* key,
            void (*body)(void*), void* ctx);

struct Launcher {
  const char* file;
  int line;
  const char* name;
  dim3 grid, block;
  size_t smem;
  template <typename Stream = std::nullptr_t>
  Launcher(const char* f, int l, const char* n, dim3 g, dim3 b, size_t s = 0, Stream = {})
      : file(f), line(l), name(n), grid(g), block(b), smem(s) {}
  template <typename... P>
  auto operator()(void (*kernel)(P...)) const {
    return [self = *this, kernel](auto&&... args) {
      struct Call {
        void (*kernel)(P...);
        std::tuple<std::decay_t<P>...> params;
      } call{kernel, std::tuple<std::decay_t<P>...>(std::forward<decltype(args)>(args)...)};
      launch(self.file, self.line, self.name, self.grid, self.block, self.smem, reinterpret_cast<void*>(kernel),
             [](void* c) {
               auto* k = static_cast<Call*>(c);
               std::apply(k->kernel, k->params);  // every CUDA thread gets its own copy of the parameters
             },
             &call);
    };
  }
};

}  // namespace cuda_emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::cuda_emu::syncwarp_at(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_xor_sync(...) ::cuda_emu::shfl(__FILE__, __LINE__, ::cuda_emu::kShflXor, __VA_ARGS__)
#define __shfl_down_sync(...) ::cuda_emu::shfl(__FILE__, __LINE__, ::cuda_emu::kShflDown, __VA_ARGS__)
#define __shfl_up_sync(...) ::cuda_emu::shfl(__FILE__, __LINE__, ::cuda_emu::kShflUp, __VA_ARGS__)
#define __shfl_sync(...) ::cuda_emu::shfl(__FILE__, __LINE__, ::cuda_emu::kShflIdx, __VA_ARGS__)
#define __ballot_sync(mask, pred) \
  ::cuda_emu::warp_collective(::cuda_emu::kBallot, mask, nullptr, nullptr, 0, !!(pred), 32, __FILE__, __LINE__)
#define __any_sync(mask, pred) \
  (::cuda_emu::warp_collective(::cuda_emu::kAny, mask, nullptr, nullptr, 0, !!(pred), 32, __FILE__, __LINE__) != 0)
#define __all_sync(mask, pred) \
  (::cuda_emu::warp_collective(::cuda_emu::kAll, mask, nullptr, nullptr, 0, !!(pred), 32, __FILE__, __LINE__) != 0)
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  if (!(cond)) ::cuda_emu::fail(__FILE__, __LINE__, "CUDA_KERNEL_ASSERT failed: " #cond)

namespace cuda_emu {
inline void syncwarp_at(const char* file, int line, unsigned mask = 0xffffffffu) {
  warp_collective(kSyncwarp, mask, nullptr, nullptr, 0, 0, 32, file, line);
}
}  // namespace cuda_emu

// Device math as CUDA overloads it: float stays float; min/max of floats are fminf/fmaxf (a NaN operand
// loses), as CUDA's are.
using std::exp;
using std::isfinite;
using std::isnan;
using std::log;
using std::sqrt;
template <typename A, typename B, std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
inline auto max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmax(C(a), C(b));
  else return a > b ? C(a) : C(b);
}
template <typename A, typename B, std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
inline auto min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmin(C(a), C(b));
  else return a < b ? C(a) : C(b);
}

template <typename T>
inline T __ldcg(const T* p) { return *p; }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
template <typename T>
inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
