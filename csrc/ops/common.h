// Helpers shared by the torch-facing glue in csrc/ops: dtype mapping and the CUDA context the launchers need.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "../kernels/common.h"

#ifdef GPTKERNELS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace gptkernels {

inline DType to_kernel_dtype(at::ScalarType t, const char* arg) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, arg, ": dtype must be float32, float16 or bfloat16, got ", t);
  }
  return DType::kFloat32;
}

// The eager entry points (eager.h) run only on tensors whose every op call would reach the CPU or CUDA kernel
// directly: a tensor subclass or a functorch wrapper carries a dispatch key of its own, and an active
// TorchDispatchMode (FakeTensorMode, FlopCounterMode, ...) must see our registered custom op rather than the ATen
// calls inside it. Such calls take the Python path through torch.ops instead.
inline bool eager_plain(const at::Tensor& t) {
  constexpr c10::DispatchKeySet kForeign = c10::DispatchKeySet(
      {c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot, c10::DispatchKey::FuncTorchBatched,
       c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::Functionalize, c10::DispatchKey::Conjugate,
       c10::DispatchKey::Negative, c10::DispatchKey::ZeroTensor, c10::DispatchKey::BatchedNestedTensor});
  return t.defined() && t.layout() == at::kStrided && (t.is_cpu() || t.is_cuda()) && !t.key_set().has_any(kForeign);
}
inline bool eager_plain(const std::optional<at::Tensor>& t) {
  return !t.has_value() || !t->defined() || eager_plain(*t);
}
inline bool eager_no_modes() { return !c10::impl::TorchDispatchModeTLS::any_modes_set(); }
// The row count M of t viewed as (M, N) (the product of all dims but the last; fine when N == 0).
inline int64_t rows_of(const at::Tensor& t) {
  return c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1);
}
inline bool has_tensor(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }
inline bool needs_grad(const std::optional<at::Tensor>& t) { return has_tensor(t) && t->requires_grad(); }
inline std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

inline const float* opt_float_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }
inline const void* opt_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// A (N,) parameter as contiguous fp32: kernels read weights in fp32 whatever the activation dtype, so fp32
// master weights with bf16 activations need no extra kernel variants. N floats: negligible traffic.
inline at::Tensor as_f32_vector(const at::Tensor& t) {
  // The common case returns t itself without a dispatched no-op .to() (~0.2 us at decode sizes).
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t;
  return t.to(at::kFloat).contiguous();
}

// A freshly allocated large CPU output is not yet backed by memory: the kernel's first write to each 4 KiB page
// traps into the kernel. At (4096, 4096) fp32 those 16384 faults cost more than the softmax itself (on the 2-core
// EPYC VM: 45 ms per call with a fresh output vs 10 ms with a reused one, 1 thread, CPU time p50). One
// madvise(MADV_POPULATE_WRITE) per thread-slice maps the pages without the traps (37 ms). Pages already mapped
// (a reused allocation) are detected with mincore and left alone: populating them costs ~0.2 us per page for
// nothing. Linux >= 5.14; elsewhere, or on any error, the first touch just faults as usual.
inline void prefault_output(void* ptr, int64_t bytes) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  constexpr int64_t kMinBytes = int64_t(4) << 20;  // below this, the faults are noise
  if (bytes < kMinBytes) return;
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + page - 1) / page * page;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + uintptr_t(bytes)) / page * page;
  if (end <= begin) return;
  const int64_t pages = int64_t((end - begin) / page);
  std::vector<unsigned char> resident(size_t(pages), 0);
  if (mincore(reinterpret_cast<void*>(begin), end - begin, resident.data()) != 0) return;
  int64_t absent = 0;
  for (const unsigned char r : resident) absent += (r & 1) == 0;
  if (absent * 8 < pages) return;  // mostly mapped already: faulting in the rest is cheaper than populating
  // One contiguous slice per thread, so pages land on the NUMA node of a thread that will write them.
  const int64_t slices = std::max<int64_t>(1, at::get_num_threads());
  at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
    const int64_t p0 = pages * s0 / slices, p1 = pages * s1 / slices;
    if (p1 > p0)
      madvise(reinterpret_cast<void*>(begin + uintptr_t(p0) * page), uintptr_t(p1 - p0) * page, MADV_POPULATE_WRITE);
  });
#else
  (void)ptr;
  (void)bytes;
#endif
}

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
