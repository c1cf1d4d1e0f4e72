// Shared by the torch-free kernels (CPU and CUDA): the element types a kernel can be asked for.
// The torch glue in csrc/ops maps at::ScalarType onto this enum, so kernels never see torch headers.
#pragma once

namespace gptkernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

}  // namespace gptkernels
