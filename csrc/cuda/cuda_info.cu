// Compiled by nvcc so build_info() reports what the CUDA part of the extension was really built with.
#include <cuda_runtime_api.h>

#include "cuda_info.h"

namespace mtkd {

int cuda_compiled_version() { return CUDART_VERSION; }

int cuda_runtime_version() {
  int v = 0;
  return cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver/no device" error so later CUDA calls start clean
    return 0;
  }
  return n;
}

}  // namespace mtkd
