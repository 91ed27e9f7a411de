#pragma once
// Shared device helpers of the mtkd_fast CUDA kernels: warp/block reductions, vector loads, the launch
// context. Only ATen/c10 headers (never torch/extension.h) so nvcc compiles these files quickly.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>

namespace mtkd {
namespace cuda {

// At most this many teachers per call: their pointers travel by value in the kernel parameters.
constexpr int kMaxTeachers = 32;
constexpr int kWarp = 32;

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Reduce v over the block (blockDim.x a multiple of 32) and return the result to every thread.
// smem: kWarp slots of T in shared memory, reusable by the next call.
template <typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, T* smem, Op op, T identity) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, num_warps = blockDim.x / kWarp;
  v = warp_reduce(v, op);
  __syncthreads();  // the previous call's readers are done with smem
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < num_warps ? smem[lane] : identity;
    w = warp_reduce(w, op);
    if (lane == 0) smem[kWarp - 1] = w;  // slot 31 is only read after the barrier below
  }
  __syncthreads();
  return smem[kWarp - 1];
}

// N values of T loaded/stored as one aligned access (16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// "Last block done": every block calls this after writing its results; it returns true in exactly one
// block (the last to finish), whose threads then see every other block's writes. counter: zeroed int.
__device__ __forceinline__ bool is_last_block(unsigned int* counter) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.x * gridDim.y * gridDim.z - 1;
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// The same for any group of arrivals: returns true in the block that brings counter to total.
__device__ __forceinline__ bool is_last_arrival(unsigned int* counter, unsigned int total) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == total - 1;
  __syncthreads();
  if (last) __threadfence();
  return last;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The current device's multiprocessor count, asked once per device (not a runtime call per op call).
inline int multiprocessor_count() {
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<int>, kMaxDevices> cache{};  // 0: not asked yet
  const int device = c10::cuda::current_device();
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "CUDA device index ", device, " out of range");
  int count = cache[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// The static shared memory of a kernel (fixed when nvcc compiles it), asked once per kernel.
template <auto Kernel>
int64_t static_shared_bytes() {
  static const int64_t bytes = [] {
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, Kernel));
    return static_cast<int64_t>(attr.sharedSizeBytes);
  }();
  return bytes;
}

}  // namespace cuda
}  // namespace mtkd
