// Helpers shared by the torch-facing glue in csrc/ops: dtype mapping and the CUDA context the launchers need.
#pragma once
#include <ATen/ATen.h>

#include "../kernels/common.h"

#ifdef GPTKERNELS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace gptkernels {

inline DType to_kernel_dtype(at::ScalarType t, const char* arg) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, arg, ": dtype must be float32, float16 or bfloat16, got ", t);
  }
  return DType::kFloat32;
}

inline const float* opt_float_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }
inline const void* opt_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// A (N,) parameter as contiguous fp32: kernels read weights in fp32 whatever the activation dtype, so fp32
// master weights with bf16 activations need no extra kernel variants. N floats: negligible traffic.
inline at::Tensor as_f32_vector(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

#ifdef GPTKERNELS_WITH_CUDA
inline void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

inline int sm_count(int device) {
  int n = 0;
  check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return n;
}
#endif

}  // namespace gptkernels
