#pragma once
// What this build of the extension was compiled with; module.cpp turns it into build_info() for Python.
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace mtkd {

using BuildFact = std::variant<bool, int64_t, std::string>;

// (name, value) pairs in a fixed order.
std::vector<std::pair<std::string, BuildFact>> build_facts();

}  // namespace mtkd
