// Torch-facing weight-only quantized linear: gptkernels::qlinear_fwd for CPU and CUDA, and its eager entry.
//   y (..., N) = x (..., K) @ dequant(qweight, scales)^T + bias, in x's dtype, fp32 accumulation.
// Formats: csrc/kernels/cpu/qlinear.h. Two paths, chosen by the caller (gptkernels/ops/qlinear.py, which records the
// choice for explain()):
//   gemv (dequant=false): the fused kernel, every weight byte read once per 16 rows of x (decode, M <= 16).
//   dequant (dequant=true): W dequantized to fp32 (CPU: in tiles of ~2 MB, each multiplied by the BLAS GEMM into its
//     columns of y; CUDA: whole, in x's dtype, then cuBLAS): compute-bound M, where a GEMM beats the GEMV kernel.
// No backward: gptkernels/ops/qlinear.py refuses a call that needs one. Fakes live there too.
#include "../kernels/cpu/qlinear.h"

#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "common.h"
#include "eager.h"
#ifdef GPTKERNELS_WITH_CUDA
#include "../kernels/cuda/qlinear.cuh"
#endif

namespace gptkernels {
namespace {

struct QShape {
  int64_t M, N, K, group;
};

// Every check of the op, in one place; the Python wrapper raises the same conditions as documented errors first.
QShape check_qlinear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales,
                     const std::optional<at::Tensor>& bias, int64_t group, int64_t bits) {
  to_kernel_dtype(x.scalar_type(), "x");
  TORCH_CHECK(x.dim() >= 1, "x: must have at least 1 dim (..., K)");
  TORCH_CHECK(bits == 4 || bits == 8, "bits: must be 4 or 8, got ", bits);
  const int64_t K = x.size(-1);
  TORCH_CHECK(K >= 1, "x: the last dim (K, in_features) must be >= 1");
  TORCH_CHECK(q.dim() == 2, "qweight: must be 2-D (N, K) int8 or (N, K / 2) uint8, got ", q.sizes());
  const int64_t N = q.size(0);
  TORCH_CHECK(group >= 1 && K % group == 0, "group_size: ", group, " must divide K = ", K);
  if (bits == 8) {
    TORCH_CHECK_TYPE(q.scalar_type() == at::kChar, "qweight: bits=8 needs int8, got ", q.scalar_type());
    TORCH_CHECK(q.size(1) == K, "qweight: shape must be (N, K) = (", N, ", ", K, "), got ", q.sizes());
  } else {
    TORCH_CHECK_TYPE(q.scalar_type() == at::kByte, "qweight: bits=4 needs uint8 (two values a byte), got ",
                     q.scalar_type());
    TORCH_CHECK(group % 32 == 0, "group_size: bits=4 needs a multiple of 32, got ", group);
    TORCH_CHECK(q.size(1) * 2 == K, "qweight: shape must be (N, K / 2) = (", N, ", ", K / 2, "), got ", q.sizes());
  }
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat, "scales: must be float32, got ", scales.scalar_type());
  const int64_t G = K / group;
  const bool scales_ok = (scales.dim() == 2 && scales.size(0) == N && scales.size(1) == G) ||
                         (scales.dim() == 1 && G == 1 && scales.size(0) == N);
  TORCH_CHECK(scales_ok, "scales: shape must be (N, K / group_size) = (", N, ", ", G, ")", G == 1 ? " or (N,)" : "",
              ", got ", scales.sizes());
  TORCH_CHECK(q.device() == x.device() && scales.device() == x.device(), "qweight and scales must be on ", x.device());
  if (has_tensor(bias)) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias: shape must be (", N, ",), got ", bias->sizes());
    TORCH_CHECK(bias->device() == x.device(), "bias: must be on ", x.device());
    TORCH_CHECK_TYPE(bias->is_floating_point(), "bias: must be a floating-point tensor");
  }
  return {rows_of(x), N, K, group};
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = N;
  return s;
}

// The dequant path on the CPU: tiles of W in fp32, each into its columns of y by the BLAS GEMM (the output slice has
// row stride N and unit column stride, which BLAS takes as ldc without a copy). Peak extra memory: one tile.
at::Tensor dequant_gemm_cpu(const at::Tensor& x2, const at::Tensor& q, const at::Tensor& scales, const at::Tensor& b,
                            int bits, const QShape& s) {
  const at::Tensor xf = x2.scalar_type() == at::kFloat ? x2 : x2.to(at::kFloat);
  at::Tensor y = at::empty({s.M, s.N}, xf.options());
  constexpr int64_t kTileBytes = int64_t(2) << 20;
  const int64_t rows = std::min(s.N, std::max<int64_t>(64, kTileBytes / (4 * std::max<int64_t>(s.K, 1)) / 64 * 64));
  at::Tensor w = at::empty({rows, s.K}, xf.options());
  const int64_t ldq = bits == 8 ? s.K : s.K / 2, G = s.K / s.group;
  const auto* qp = static_cast<const uint8_t*>(q.data_ptr());
  for (int64_t n0 = 0; n0 < s.N; n0 += rows) {
    const int64_t nt = std::min(rows, s.N - n0);
    qlinear_dequant_cpu(bits, qp + n0 * ldq, scales.data_ptr<float>() + n0 * G, w.data_ptr<float>(), nt, s.K,
                        s.group);
    at::Tensor wt = w.narrow(0, 0, nt).t();  // (K, nt)
    at::Tensor out = y.narrow(1, n0, nt);    // (M, nt), row stride N
    if (b.defined())
      at::addmm_out(out, b.narrow(0, n0, nt), xf, wt);
    else
      at::mm_out(out, xf, wt);
  }
  return y;
}

}  // namespace

at::Tensor qlinear_fwd(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias, int64_t group_size, int64_t bits, bool dequant) {
  const QShape s = check_qlinear(x, qweight, scales, bias, group_size, bits);
  // y is allocated in its final shape (..., N): contiguous, so its data is the (M, N) matrix the kernels write. x is
  // read through its data pointer as (M, K) when contiguous, no reshape: at decode sizes each dispatched view op
  // costs a few hundred ns of a call's few us.
  const auto shape = out_shape(x, s.N);
  if (s.M == 0 || s.N == 0) return at::empty(shape, x.options());
  const DType dt = to_kernel_dtype(x.scalar_type(), "x");
  at::Tensor x2 = x.is_contiguous() ? x : x.contiguous();  // the kernels read unit-stride rows
  at::Tensor q = qweight.is_contiguous() ? qweight : qweight.contiguous();
  const at::Tensor sc = scales.is_contiguous() ? scales : scales.contiguous();
  const at::Tensor b = has_tensor(bias) ? as_f32_vector(*bias) : at::Tensor();
  const int ibits = int(bits);
  if (x.is_cuda()) {
#ifdef GPTKERNELS_WITH_CUDA
    // The CUDA kernels read 16-byte vectors from the row starts; an offset view is copied (x: M*K elements, small
    // at the M the kernel serves; a weight that is a view of a larger buffer: once per call, rare).
    if (reinterpret_cast<uintptr_t>(x2.data_ptr()) % 16) x2 = x2.clone();
    if (reinterpret_cast<uintptr_t>(q.data_ptr()) % 16) q = q.clone();
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
    if (dequant) {
      // W in x's dtype (N*K elements), then cuBLAS with fp32 accumulation; the bias in x's dtype, as nn.Linear's.
      at::Tensor w = at::empty({s.N, s.K}, x.options());
      check_cuda(launch_qlinear_dequant(dt, ibits, q.data_ptr(), sc.data_ptr<float>(), w.data_ptr(), s.N, s.K, s.group,
                                        stream),
                 "launch_qlinear_dequant");
      const at::Tensor xm = x2.view({s.M, s.K});
      at::Tensor y = b.defined() ? at::addmm(b.to(x.scalar_type()), xm, w.t()) : at::mm(xm, w.t());
      return y.view(shape);
    }
    at::Tensor y = at::empty(shape, x.options());
    check_cuda(launch_qlinear_fwd(dt, ibits, x2.data_ptr(), q.data_ptr(), sc.data_ptr<float>(), opt_float_ptr(b),
                                  y.data_ptr(), s.M, s.N, s.K, s.group, stream),
               "launch_qlinear_fwd");
    return y;
#else
    TORCH_CHECK(false, "gptkernels was built without CUDA");
#endif
  }
  if (dequant) {
    at::Tensor y = dequant_gemm_cpu(x2.view({s.M, s.K}), q, sc, b, ibits, s);
    return (y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type())).view(shape);
  }
  at::Tensor y = at::empty(shape, x.options());
  qlinear_fwd_cpu(dt, ibits, x2.data_ptr(), q.data_ptr(), sc.data_ptr<float>(), opt_float_ptr(b), y.data_ptr(), s.M,
                  s.N, s.K, s.group);
  return y;
}

// No autograd here: a call that needs a gradient goes to the Python path, which raises the documented error.
EagerOut qlinear_eager(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias, int64_t group_size, int64_t bits, bool dequant) {
  if (!eager_plain(x) || !eager_plain(qweight) || !eager_plain(scales) || !eager_plain(bias) || !eager_no_modes())
    return std::nullopt;
  if (at::GradMode::is_enabled() && (x.requires_grad() || scales.requires_grad() || needs_grad(bias)))
    return std::nullopt;
  return std::vector<at::Tensor>{qlinear_fwd(x, qweight, scales, bias, group_size, bits, dequant)};
}

TORCH_LIBRARY_FRAGMENT(gptkernels, m) {
  m.def(
      "qlinear_fwd(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, int group_size, int bits, bool dequant) "
      "-> Tensor y");
}

TORCH_LIBRARY_IMPL(gptkernels, CPU, m) { m.impl("qlinear_fwd", &qlinear_fwd); }

#ifdef GPTKERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(gptkernels, CUDA, m) { m.impl("qlinear_fwd", &qlinear_fwd); }
#endif

}  // namespace gptkernels
