#pragma once
// The CUDA runtime calls csrc/cuda makes, for the CPU emulator (tests/cuda_emu): memory is host memory,
// the one "device" has cuda_emu_sms() multiprocessors (the emulated H100's 132 unless configured).
#include <cstddef>
#include <cstring>

#include "cuda_emu.h"

typedef enum cudaError { cudaSuccess = 0, cudaErrorInvalidValue = 1 } cudaError_t;
typedef struct CUstream_st* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0;
  int maxThreadsPerBlock = 1024;
};
#define CUDART_VERSION 13000

namespace cuda_emu {
int sms();
// nvcc knows a kernel's static shared memory before it runs; the emulator learns it only by running, so it
// reports this bound, and a launch fails when the shared memory really used exceeds 48 KiB.
constexpr size_t kStaticSharedEstimate = 4096;
}  // namespace cuda_emu

inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid value"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *v = cuda_emu::sms();
  return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F*) {
  *a = cudaFuncAttributes{};
  a->sharedSizeBytes = cuda_emu::kStaticSharedEstimate;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  std::memset(p, v, n);
  return cudaSuccess;
}
