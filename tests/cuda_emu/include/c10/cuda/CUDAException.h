#pragma once
// Stub of c10/cuda/CUDAException.h for the CPU emulator (tests/cuda_emu): a launch reports its errors itself.
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#define C10_CUDA_CHECK(expr)                                                                          \
  do {                                                                                                \
    const cudaError_t emu_err_ = (expr);                                                              \
    TORCH_CHECK(emu_err_ == cudaSuccess, "CUDA error (emulated): ", cudaGetErrorString(emu_err_)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())
