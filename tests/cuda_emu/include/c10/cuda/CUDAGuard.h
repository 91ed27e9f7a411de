#pragma once
// Stub of c10/cuda/CUDAGuard.h for the CPU emulator (tests/cuda_emu): one device, nothing to switch.
#include <cuda_runtime.h>
namespace c10::cuda {
struct CUDAGuard {
  template <typename D>
  explicit CUDAGuard(const D&) {}
};
}  // namespace c10::cuda
