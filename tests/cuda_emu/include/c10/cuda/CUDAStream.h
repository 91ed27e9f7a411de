#pragma once
// Stub of c10/cuda/CUDAStream.h (and the CUDAFunctions.h it includes) for the CPU emulator (tests/cuda_emu):
// one device, launches run synchronously.
#include <cuda_runtime.h>
namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
inline int current_device() { return 0; }
}  // namespace c10::cuda
