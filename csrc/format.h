// Error-message formatting for the hooklens operators.
//
// Shapes are formatted here instead of streaming `t.sizes()` (c10::IntArrayRef) into TORCH_CHECK: with the
// extension built against torch 2.11.0+cu130 on an H100 machine, every TORCH_CHECK message that streamed an
// IntArrayRef crashed the process (SIGSEGV) instead of raising, while messages with only strings, integers and
// dtypes raised normally (recorded in benchmarks/NOTES.md). Plain std::string building has no such dependency.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace hooklens {

// "[5, 3]" for a [5, 3] tensor, "[]" for a 0-d one.
inline std::string shape_str(const at::Tensor& t) {
  std::string out = "[";
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d > 0) out += ", ";
    out += std::to_string(t.size(d));
  }
  return out + "]";
}

inline std::string device_str(const at::Tensor& t) { return t.device().str(); }

}  // namespace hooklens
