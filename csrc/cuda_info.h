#pragma once
// Facts about the CUDA part of the build, implemented in csrc/cuda/cuda_info.cu (CUDA builds only).
namespace mtkd {
int cuda_compiled_version();  // CUDART_VERSION the .cu files were compiled with, e.g. 13000
int cuda_runtime_version();   // cudaRuntimeGetVersion(), 0 on error
int cuda_device_count();      // visible devices, 0 when none (or no driver)
}  // namespace mtkd
