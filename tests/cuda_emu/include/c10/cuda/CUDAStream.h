#pragma once
// Stub of c10/cuda/CUDAStream.h for the CPU emulator (tests/cuda_emu): launches run synchronously.
#include <cuda_runtime.h>
namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
}  // namespace c10::cuda
