// C++ test run by ctest (CMake build): the build facts are complete and consistent with the build flags.
#include <cstdio>
#include <cstdlib>
#include <map>

#include "build_info.h"

#define CHECK(cond)                                                   \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                   \
    }                                                                 \
  } while (0)

int main() {
  std::map<std::string, mtkd::BuildFact> facts;
  for (auto& [k, v] : mtkd::build_facts()) facts[k] = v;
  for (const char* key : {"torch_version", "openmp", "num_threads", "compiler", "cuda_compiled", "cuda_archs"})
    CHECK(facts.count(key) == 1);
  CHECK(std::get<std::string>(facts["torch_version"]) != "unknown");
  CHECK(std::get<int64_t>(facts["num_threads"]) >= 1);
#ifdef WITH_CUDA
  CHECK(std::get<bool>(facts["cuda_compiled"]));
  CHECK(!std::get<std::string>(facts["cuda_archs"]).empty());
  CHECK(std::get<int64_t>(facts["cuda_compiled_version"]) >= 12000);
#else
  CHECK(!std::get<bool>(facts["cuda_compiled"]));
#endif
  std::printf("build facts ok (%zu facts)\n", facts.size());
  return 0;
}
