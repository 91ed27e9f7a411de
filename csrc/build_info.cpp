#include "build_info.h"

#include <ATen/Parallel.h>

#include "cuda_info.h"

#ifndef MTKD_TORCH_VERSION
#define MTKD_TORCH_VERSION "unknown"
#endif

namespace mtkd {

std::vector<std::pair<std::string, BuildFact>> build_facts() {
  std::vector<std::pair<std::string, BuildFact>> f;
  f.emplace_back("torch_version", std::string(MTKD_TORCH_VERSION));  // the torch compiled against
#ifdef _OPENMP
  f.emplace_back("openmp", true);
  f.emplace_back("openmp_version", int64_t{_OPENMP});
#else
  f.emplace_back("openmp", false);
  f.emplace_back("openmp_version", int64_t{0});
#endif
  f.emplace_back("num_threads", int64_t{at::get_num_threads()});
#if defined(__clang__)
  f.emplace_back("compiler", std::string("clang ") + __clang_version__);
#elif defined(__GNUC__)
  f.emplace_back("compiler", std::string("gcc ") + __VERSION__);
#else
  f.emplace_back("compiler", std::string("unknown"));
#endif
#ifdef WITH_CUDA
  f.emplace_back("cuda_compiled", true);
  f.emplace_back("cuda_archs", std::string(MTKD_CUDA_ARCHS));
  f.emplace_back("cuda_compiled_version", int64_t{cuda_compiled_version()});
  f.emplace_back("cuda_runtime_version", int64_t{cuda_runtime_version()});
  f.emplace_back("cuda_device_count", int64_t{cuda_device_count()});
#else
  f.emplace_back("cuda_compiled", false);
  f.emplace_back("cuda_archs", std::string());
  f.emplace_back("cuda_compiled_version", int64_t{0});
  f.emplace_back("cuda_runtime_version", int64_t{0});
  f.emplace_back("cuda_device_count", int64_t{0});
#endif
  return f;
}

}  // namespace mtkd
