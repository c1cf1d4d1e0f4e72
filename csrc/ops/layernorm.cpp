// Torch-facing LayerNorm/RMSNorm ops: checks, allocation, and the call into the CPU or CUDA kernel.
// Registered as gptkernels::layernorm_fwd / layernorm_bwd for the CPU and CUDA dispatch keys; their fake
// implementations live in gptkernels/ops/layernorm.py.
#include <torch/library.h>

#include <tuple>

#include "../kernels/cpu/layernorm.h"
#include "common.h"
#ifdef GPTKERNELS_WITH_CUDA
#include "../kernels/cuda/layernorm.cuh"
#endif

namespace gptkernels {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_fwd(const at::Tensor& x_, const at::Tensor& weight,
                                                                         const std::optional<at::Tensor>& bias,
                                                                         const std::optional<at::Tensor>& residual,
                                                                         double eps, bool rms) {
  TORCH_CHECK(x_.dim() >= 1, "x: must have at least 1 dim");
  const int64_t N = x_.size(-1);
  TORCH_CHECK(N >= 1, "x: last dim must be >= 1");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == N, "weight: shape must be (", N, ",), got ", weight.sizes());
  const DType dt = to_kernel_dtype(x_.scalar_type(), "x");
  const bool has_res = residual.has_value() && residual->defined();
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias: shape must be (", N, ",)");
  if (has_res) {
    TORCH_CHECK(residual->sizes() == x_.sizes(), "residual: shape ", residual->sizes(), " must match x ", x_.sizes());
    TORCH_CHECK_TYPE(residual->scalar_type() == x_.scalar_type(), "residual: dtype must match x");
    TORCH_CHECK(residual->device() == x_.device(), "residual: must be on ", x_.device());
  }
  // Kernels take rows with stride N; a non-contiguous input is copied here on purpose.
  const at::Tensor x = x_.contiguous();
  const at::Tensor r = has_res ? residual->contiguous() : at::Tensor();
  const at::Tensor w = as_f32_vector(weight);
  const at::Tensor b = has_bias ? as_f32_vector(*bias) : at::Tensor();
  const int64_t M = x.numel() / N;
  auto stat_shape = x.sizes().vec();
  stat_shape.pop_back();
  const auto f32 = x.options().dtype(at::kFloat);

  at::Tensor y = at::empty_like(x);
  at::Tensor h = has_res ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor mean = rms ? at::empty({0}, f32) : at::empty(stat_shape, f32);
  at::Tensor rstd = at::empty(stat_shape, f32);
  if (M == 0) return {y, h, mean, rstd};

  float* mean_p = rms ? nullptr : mean.data_ptr<float>();
  if (x.is_cuda()) {
#ifdef GPTKERNELS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    check_cuda(launch_layernorm_fwd(dt, x.data_ptr(), opt_ptr(r), w.data_ptr<float>(), opt_float_ptr(b),
                                    y.data_ptr(), has_res ? h.data_ptr() : nullptr, mean_p, rstd.data_ptr<float>(),
                                    M, N, float(eps), rms, c10::cuda::getCurrentCUDAStream(x.get_device()).stream()),
               "launch_layernorm_fwd");
#else
    TORCH_CHECK(false, "gptkernels was built without CUDA");
#endif
  } else {
    prefault_output(y.data_ptr(), y.nbytes());
    if (has_res) prefault_output(h.data_ptr(), h.nbytes());
    layernorm_fwd_cpu(dt, x.data_ptr(), opt_ptr(r), w.data_ptr<float>(), opt_float_ptr(b), y.data_ptr(),
                      has_res ? h.data_ptr() : nullptr, mean_p, rstd.data_ptr<float>(), M, N, float(eps), rms);
  }
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_bwd(const at::Tensor& dy_, const std::optional<at::Tensor>& dh_,
                                                             const at::Tensor& hin_, const at::Tensor& weight,
                                                             const at::Tensor& mean_, const at::Tensor& rstd_,
                                                             bool has_bias, bool rms) {
  const int64_t N = hin_.size(-1);
  const DType dt = to_kernel_dtype(hin_.scalar_type(), "hin");
  TORCH_CHECK(dy_.sizes() == hin_.sizes(), "dy: shape ", dy_.sizes(), " must match the input ", hin_.sizes());
  TORCH_CHECK_TYPE(dy_.scalar_type() == hin_.scalar_type(), "dy: dtype must match the input");
  const bool has_dh = dh_.has_value() && dh_->defined();
  if (has_dh) TORCH_CHECK(dh_->sizes() == hin_.sizes(), "dh: shape must match the input");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == N, "weight: shape must be (", N, ",)");
  const int64_t M = hin_.numel() / N;
  TORCH_CHECK(rstd_.numel() == M, "rstd: must have ", M, " elements");
  if (!rms) TORCH_CHECK(mean_.numel() == M, "mean: must have ", M, " elements");
  // A gradient can arrive expanded (stride 0) or transposed; the kernels want contiguous rows.
  const at::Tensor dy = dy_.contiguous();
  const at::Tensor dh = has_dh ? dh_->to(hin_.scalar_type()).contiguous() : at::Tensor();
  const at::Tensor hin = hin_.contiguous();
  const at::Tensor w = as_f32_vector(weight);
  const at::Tensor rstd = rstd_.contiguous();
  const at::Tensor mean = rms ? at::Tensor() : mean_.contiguous();
  const auto f32 = hin.options().dtype(at::kFloat);

  at::Tensor dx = at::empty_like(hin);
  at::Tensor dw = at::empty({N}, f32);
  at::Tensor db = has_bias ? at::empty({N}, f32) : at::empty({0}, f32);
  if (M == 0) {
    dw.zero_();
    db.zero_();
    return {dx, dw, db};
  }
  float* db_p = has_bias ? db.data_ptr<float>() : nullptr;
  if (hin.is_cuda()) {
#ifdef GPTKERNELS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(hin.device());
    const int sms = sm_count(hin.get_device());
    const size_t ws_bytes = layernorm_bwd_workspace_bytes(M, N, sms);
    at::Tensor ws = at::empty({int64_t((ws_bytes + sizeof(float) - 1) / sizeof(float))}, f32);
    check_cuda(launch_layernorm_bwd(dt, dy.data_ptr(), opt_ptr(dh), hin.data_ptr(), w.data_ptr<float>(),
                                    opt_float_ptr(mean), rstd.data_ptr<float>(), dx.data_ptr(), dw.data_ptr<float>(),
                                    db_p, ws.data_ptr<float>(), M, N, rms, sms,
                                    c10::cuda::getCurrentCUDAStream(hin.get_device()).stream()),
               "launch_layernorm_bwd");
#else
    TORCH_CHECK(false, "gptkernels was built without CUDA");
#endif
  } else {
    prefault_output(dx.data_ptr(), dx.nbytes());
    layernorm_bwd_cpu(dt, dy.data_ptr(), opt_ptr(dh), hin.data_ptr(), w.data_ptr<float>(), opt_float_ptr(mean),
                      rstd.data_ptr<float>(), dx.data_ptr(), dw.data_ptr<float>(), db_p, M, N, rms);
  }
  return {dx, dw, db};
}

TORCH_LIBRARY_FRAGMENT(gptkernels, m) {
  m.def(
      "layernorm_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, float eps, bool rms) "
      "-> (Tensor y, Tensor h, Tensor mean, Tensor rstd)");
  m.def(
      "layernorm_bwd(Tensor dy, Tensor? dh, Tensor hin, Tensor weight, Tensor mean, Tensor rstd, bool has_bias, "
      "bool rms) -> (Tensor dx, Tensor dweight, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(gptkernels, CPU, m) {
  m.impl("layernorm_fwd", &layernorm_fwd);
  m.impl("layernorm_bwd", &layernorm_bwd);
}

#ifdef GPTKERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(gptkernels, CUDA, m) {
  m.impl("layernorm_fwd", &layernorm_fwd);
  m.impl("layernorm_bwd", &layernorm_bwd);
}
#endif

}  // namespace gptkernels
