// Torch-facing FFN elementwise ops: bias + activation (GELU tanh/erf, ReLU) and SwiGLU's silu(g) * u, fwd and bwd.
// Registered as gptkernels::bias_gelu_fwd / bias_gelu_bwd / silu_mul_fwd / silu_mul_bwd for CPU and CUDA; the GEMMs
// of fused_mlp and swiglu run in ATen (torch.mm from gptkernels/ops/mlp.py), around these epilogues. Fakes live in
// gptkernels/ops/mlp.py.
#include <torch/library.h>

#include <string>
#include <tuple>

#include "../kernels/cpu/mlp.h"
#include "common.h"
#ifdef GPTKERNELS_WITH_CUDA
#include "../kernels/cuda/mlp.cuh"
#endif

namespace gptkernels {
namespace {

Act to_act(const std::string& s) {
  if (s == "gelu_tanh") return Act::kGeluTanh;
  if (s == "gelu") return Act::kGeluErf;
  if (s == "relu") return Act::kRelu;
  TORCH_CHECK(false, "activation: must be one of gelu_tanh, gelu, relu; got '", s, "'");
  return Act::kGeluTanh;
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, ": shape ", t.sizes(), " must match ", ref_name, " ", ref.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, ": dtype must match ", ref_name);
  TORCH_CHECK(t.device() == ref.device(), name, ": must be on ", ref.device());
}

at::Tensor check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  const int64_t N = x.size(-1);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias: shape must be (", N, ",), got ", bias->sizes());
  TORCH_CHECK(bias->device() == x.device(), "bias: must be on ", x.device());
  return as_f32_vector(*bias);
}

}  // namespace

at::Tensor bias_gelu_fwd(const at::Tensor& x_, const std::optional<at::Tensor>& bias, const std::string& activation) {
  TORCH_CHECK(x_.dim() >= 1 && x_.size(-1) >= 1, "x: must have a non-empty last dim");
  const Act act = to_act(activation);
  const DType dt = to_kernel_dtype(x_.scalar_type(), "x");
  const at::Tensor b = check_bias(bias, x_);
  // Kernels take rows with stride N; a non-contiguous input is copied here on purpose.
  const at::Tensor x = x_.contiguous();
  const int64_t N = x.size(-1), M = x.numel() / N;
  at::Tensor y = at::empty_like(x);
  if (M == 0) return y;
  if (x.is_cuda()) {
#ifdef GPTKERNELS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    check_cuda(launch_bias_gelu_fwd(dt, act, x.data_ptr(), opt_float_ptr(b), y.data_ptr(), M, N,
                                    c10::cuda::getCurrentCUDAStream(x.get_device()).stream()),
               "launch_bias_gelu_fwd");
#else
    TORCH_CHECK(false, "gptkernels was built without CUDA");
#endif
  } else {
    prefault_output(y.data_ptr(), y.nbytes());
    bias_gelu_fwd_cpu(dt, act, x.data_ptr(), opt_float_ptr(b), y.data_ptr(), M, N);
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bias_gelu_bwd(const at::Tensor& dy_, const at::Tensor& x_,
                                                             const std::optional<at::Tensor>& bias,
                                                             const std::string& activation, bool want_dbias,
                                                             bool want_y) {
  const Act act = to_act(activation);
  const DType dt = to_kernel_dtype(x_.scalar_type(), "x");
  check_like(dy_, x_, "dy", "x");
  const at::Tensor b = check_bias(bias, x_);
  // A gradient can arrive expanded (stride 0) or transposed; the kernels want contiguous rows.
  const at::Tensor dy = dy_.contiguous();
  const at::Tensor x = x_.contiguous();
  const int64_t N = x.size(-1), M = x.numel() / N;
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty_like(x);
  at::Tensor db = want_dbias ? at::empty({N}, f32) : at::empty({0}, f32);
  at::Tensor y = want_y ? at::empty_like(x) : at::empty({0}, x.options());
  if (M == 0) {
    db.zero_();
    return {dx, db, y};
  }
  float* db_p = want_dbias ? db.data_ptr<float>() : nullptr;
  void* y_p = want_y ? y.data_ptr() : nullptr;
  if (x.is_cuda()) {
#ifdef GPTKERNELS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const int sms = sm_count(x.get_device());
    const size_t ws_bytes = bias_gelu_bwd_workspace_bytes(M, N, sms);
    at::Tensor ws = at::empty({int64_t((ws_bytes + sizeof(float) - 1) / sizeof(float))}, f32);
    check_cuda(launch_bias_gelu_bwd(dt, act, dy.data_ptr(), x.data_ptr(), opt_float_ptr(b), dx.data_ptr(), db_p,
                                    y_p, ws.data_ptr<float>(), M, N, sms,
                                    c10::cuda::getCurrentCUDAStream(x.get_device()).stream()),
               "launch_bias_gelu_bwd");
#else
    TORCH_CHECK(false, "gptkernels was built without CUDA");
#endif
  } else {
    prefault_output(dx.data_ptr(), dx.nbytes());
    bias_gelu_bwd_cpu(dt, act, dy.data_ptr(), x.data_ptr(), opt_float_ptr(b), dx.data_ptr(), db_p, y_p, M, N);
  }
  return {dx, db, y};
}

at::Tensor silu_mul_fwd(const at::Tensor& g_, const at::Tensor& u_) {
  const DType dt = to_kernel_dtype(g_.scalar_type(), "g");
  check_like(u_, g_, "u", "g");
  const at::Tensor g = g_.contiguous(), u = u_.contiguous();
  at::Tensor p = at::empty_like(g);
  const int64_t n = g.numel();
  if (n == 0) return p;
  if (g.is_cuda()) {
#ifdef GPTKERNELS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(g.device());
    check_cuda(launch_silu_mul_fwd(dt, g.data_ptr(), u.data_ptr(), p.data_ptr(), n,
                                   c10::cuda::getCurrentCUDAStream(g.get_device()).stream()),
               "launch_silu_mul_fwd");
#else
    TORCH_CHECK(false, "gptkernels was built without CUDA");
#endif
  } else {
    silu_mul_fwd_cpu(dt, g.data_ptr(), u.data_ptr(), p.data_ptr(), n);
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> silu_mul_bwd(const at::Tensor& dp_, const at::Tensor& g_,
                                                            const at::Tensor& u_, bool want_p) {
  const DType dt = to_kernel_dtype(g_.scalar_type(), "g");
  check_like(u_, g_, "u", "g");
  check_like(dp_, g_, "dp", "g");
  const at::Tensor dp = dp_.contiguous(), g = g_.contiguous(), u = u_.contiguous();
  at::Tensor dg = at::empty_like(g), du = at::empty_like(g);
  at::Tensor p = want_p ? at::empty_like(g) : at::empty({0}, g.options());
  const int64_t n = g.numel();
  if (n == 0) return {dg, du, p};
  void* p_p = want_p ? p.data_ptr() : nullptr;
  if (g.is_cuda()) {
#ifdef GPTKERNELS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(g.device());
    check_cuda(launch_silu_mul_bwd(dt, dp.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(), p_p,
                                   n, c10::cuda::getCurrentCUDAStream(g.get_device()).stream()),
               "launch_silu_mul_bwd");
#else
    TORCH_CHECK(false, "gptkernels was built without CUDA");
#endif
  } else {
    silu_mul_bwd_cpu(dt, dp.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(), p_p, n);
  }
  return {dg, du, p};
}

TORCH_LIBRARY_FRAGMENT(gptkernels, m) {
  m.def("bias_gelu_fwd(Tensor x, Tensor? bias, str activation) -> Tensor y");
  m.def(
      "bias_gelu_bwd(Tensor dy, Tensor x, Tensor? bias, str activation, bool want_dbias, bool want_y) "
      "-> (Tensor dx, Tensor dbias, Tensor y)");
  m.def("silu_mul_fwd(Tensor g, Tensor u) -> Tensor p");
  m.def("silu_mul_bwd(Tensor dp, Tensor g, Tensor u, bool want_p) -> (Tensor dg, Tensor du, Tensor p)");
}

TORCH_LIBRARY_IMPL(gptkernels, CPU, m) {
  m.impl("bias_gelu_fwd", &bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd);
  m.impl("silu_mul_fwd", &silu_mul_fwd);
  m.impl("silu_mul_bwd", &silu_mul_bwd);
}

#ifdef GPTKERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(gptkernels, CUDA, m) {
  m.impl("bias_gelu_fwd", &bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &bias_gelu_bwd);
  m.impl("silu_mul_fwd", &silu_mul_fwd);
  m.impl("silu_mul_bwd", &silu_mul_bwd);
}
#endif

}  // namespace gptkernels
