// The Python module mtkd_fast._C: importing it registers the mtkd_fast::* operators (TORCH_LIBRARY blocks
// in the other sources of this extension) and exposes build_info().
#include <torch/extension.h>

#include "build_info.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mtkd_fast fused multi-teacher distillation kernels";
  m.def(
      "build_info",
      [] {
        pybind11::dict info;
        for (const auto& [name, value] : mtkd::build_facts())
          std::visit([&](const auto& v) { info[name.c_str()] = v; }, value);
        return info;
      },
      "What this extension was compiled with");
}
