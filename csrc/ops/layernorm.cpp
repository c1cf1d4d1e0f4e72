// Torch-facing LayerNorm/RMSNorm ops: checks, allocation, and the call into the CPU or CUDA kernel.
// Registered as gptkernels::layernorm_fwd / layernorm_bwd for the CPU and CUDA dispatch keys; their fake
// implementations live in gptkernels/ops/layernorm.py.
#include "../kernels/cpu/layernorm.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "common.h"
#include "eager.h"
#ifdef GPTKERNELS_WITH_CUDA
#include "../kernels/cuda/layernorm.cuh"
#endif

namespace gptkernels {

namespace {

// Rows of a (..., N) tensor: numel / N, except that N == 0 leaves the leading dims' product.
// h is undefined without a residual, mean undefined for RMSNorm; stats = false (inference, no backward): mean and
// rstd are neither allocated nor written (undefined). Each allocation is ~0.5 us at decode sizes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_fwd_impl(const at::Tensor& x_,
                                                                              const at::Tensor& weight,
                                                                              const std::optional<at::Tensor>& bias,
                                                                              const std::optional<at::Tensor>& residual,
                                                                              double eps, bool rms, bool stats) {
  TORCH_CHECK(x_.dim() >= 1, "x: must have at least 1 dim");
  const int64_t N = x_.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == N, "weight: shape must be (", N, ",), got ", weight.sizes());
  TORCH_CHECK(weight.device() == x_.device(), "weight: must be on ", x_.device(), ", got ", weight.device());
  const DType dt = to_kernel_dtype(x_.scalar_type(), "x");
  const bool has_res = residual.has_value() && residual->defined();
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias: shape must be (", N, ",)");
    TORCH_CHECK(bias->device() == x_.device(), "bias: must be on ", x_.device(), ", got ", bias->device());
  }
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
  const int64_t M = rows_of(x);
  at::Tensor y = at::empty_like(x);
  at::Tensor h = has_res ? at::empty_like(x) : at::Tensor();
  at::Tensor mean, rstd;
  if (stats) {
    const auto f32 = x.options().dtype(at::kFloat);
    const auto stat_shape = x.sizes().slice(0, x.dim() - 1);
    if (!rms) mean = at::empty(stat_shape, f32);
    rstd = at::empty(stat_shape, f32);
  }
  if (M == 0 || N == 0) {
    // Rows of nothing: y and h are empty; the statistics are torch.native_layer_norm's (mean 0, rstd NaN).
    if (mean.defined()) mean.zero_();
    if (rstd.defined()) rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    return {y, h, mean, rstd};
  }

  float* mean_p = stats && !rms ? mean.data_ptr<float>() : nullptr;
  float* rstd_p = stats ? rstd.data_ptr<float>() : nullptr;
  if (x.is_cuda()) {
#ifdef GPTKERNELS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    check_cuda(launch_layernorm_fwd(dt, x.data_ptr(), opt_ptr(r), w.data_ptr<float>(), opt_float_ptr(b), y.data_ptr(),
                                    has_res ? h.data_ptr() : nullptr, mean_p, rstd_p, M, N, float(eps), rms,
                                    c10::cuda::getCurrentCUDAStream(x.get_device()).stream()),
               "launch_layernorm_fwd");
#else
    TORCH_CHECK(false, "gptkernels was built without CUDA");
#endif
  } else {
    prefault_output(y.data_ptr(), y.nbytes());
    if (has_res) prefault_output(h.data_ptr(), h.nbytes());
    layernorm_fwd_cpu(dt, x.data_ptr(), opt_ptr(r), w.data_ptr<float>(), opt_float_ptr(b), y.data_ptr(),
                      has_res ? h.data_ptr() : nullptr, mean_p, rstd_p, M, N, float(eps), rms);
  }
  return {y, h, mean, rstd};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layernorm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                                         const std::optional<at::Tensor>& bias,
                                                                         const std::optional<at::Tensor>& residual,
                                                                         double eps, bool rms) {
  auto [y, h, mean, rstd] = layernorm_fwd_impl(x, weight, bias, residual, eps, rms, true);
  // The schema returns four tensors: empty ones stand for the h and mean that do not exist.
  if (!h.defined()) h = at::empty({0}, x.options());
  if (!mean.defined()) mean = at::empty({0}, x.options().dtype(at::kFloat));
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_bwd(const at::Tensor& dy_,
                                                             const std::optional<at::Tensor>& dh_,
                                                             const at::Tensor& hin_, const at::Tensor& weight,
                                                             const at::Tensor& mean_, const at::Tensor& rstd_,
                                                             bool has_bias, bool rms) {
  TORCH_CHECK(hin_.dim() >= 1, "hin: must have at least 1 dim");
  const int64_t N = hin_.size(-1);
  const DType dt = to_kernel_dtype(hin_.scalar_type(), "hin");
  TORCH_CHECK(dy_.sizes() == hin_.sizes(), "dy: shape ", dy_.sizes(), " must match the input ", hin_.sizes());
  TORCH_CHECK_TYPE(dy_.scalar_type() == hin_.scalar_type(), "dy: dtype must match the input");
  const bool has_dh = dh_.has_value() && dh_->defined();
  if (has_dh) TORCH_CHECK(dh_->sizes() == hin_.sizes(), "dh: shape must match the input");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == N, "weight: shape must be (", N, ",)");
  const int64_t M = rows_of(hin_);
  TORCH_CHECK(rstd_.numel() == M, "rstd: must have ", M, " elements");
  if (!rms) TORCH_CHECK(mean_.numel() == M, "mean: must have ", M, " elements");
  TORCH_CHECK(dy_.device() == hin_.device(), "dy: must be on ", hin_.device(), ", got ", dy_.device());
  if (has_dh) TORCH_CHECK(dh_->device() == hin_.device(), "dh: must be on ", hin_.device(), ", got ", dh_->device());
  TORCH_CHECK(weight.device() == hin_.device(), "weight: must be on ", hin_.device(), ", got ", weight.device());
  TORCH_CHECK(rstd_.device() == hin_.device() && (rms || mean_.device() == hin_.device()), "mean, rstd: must be on ",
              hin_.device());
  TORCH_CHECK_TYPE(rstd_.scalar_type() == at::kFloat && (rms || mean_.scalar_type() == at::kFloat),
                   "mean, rstd: dtype must be float32");
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
  if (M == 0 || N == 0) {  // a sum over no rows is zero; with N == 0 everything is empty
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
    check_cuda(
        launch_layernorm_bwd(dt, dy.data_ptr(), opt_ptr(dh), hin.data_ptr(), w.data_ptr<float>(), opt_float_ptr(mean),
                             rstd.data_ptr<float>(), dx.data_ptr(), dw.data_ptr<float>(), db_p, ws.data_ptr<float>(), M,
                             N, rms, sms, c10::cuda::getCurrentCUDAStream(hin.get_device()).stream()),
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

namespace {

// Autograd of the eager entry: the same saves and the same glue calls as LayerNormFunction in
// gptkernels/ops/layernorm.py. Inputs (x, weight, bias, residual, eps, rms); bias and residual are optional.
struct LayerNormFn : public torch::autograd::Function<LayerNormFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                const std::optional<at::Tensor>& residual, double eps, bool rms) {
    auto [y, h, mean, rstd] = layernorm_fwd_impl(x, weight, bias, residual, eps, rms, true);
    const bool has_res = has_tensor(residual), has_bias = has_tensor(bias);
    ctx->save_for_backward({has_res ? h : x, weight, mean, rstd});  // mean undefined for RMSNorm
    // One saved word: bit 0 bias, bit 1 residual, bit 2 rms, bits 8.. the bias dtype.
    ctx->saved_data["f"] = int64_t(has_bias) | int64_t(has_res) << 1 | int64_t(rms) << 2 |
                           (has_bias ? int64_t(bias->scalar_type()) : 0) << 8;
    ctx->set_materialize_grads(false);
    if (has_res) return {y, h};
    return {y};  // no h output at all (not an empty placeholder): one allocation less
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &hin = saved[0], &weight = saved[1], &mean = saved[2], &rstd = saved[3];
    const int64_t f = ctx->saved_data["f"].toInt();
    const bool has_bias = f & 1, has_res = f & 2, rms = f & 4;
    const at::Tensor dy = grads[0].defined() ? grads[0] : at::zeros_like(hin);
    const std::optional<at::Tensor> dh = has_res && grads.size() > 1 ? opt(grads[1]) : std::nullopt;
    auto [dx, dw, db] = layernorm_bwd(dy, dh, hin, weight, mean, rstd, has_bias, rms);
    return {dx,
            dw.to(weight.scalar_type()),
            has_bias ? db.to(at::ScalarType(f >> 8)) : at::Tensor(),
            has_res ? dx : at::Tensor(),
            at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

EagerOut layernorm_eager(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, double eps,
                         bool rms) {
  // What the Python checks cover beyond the glue's: a weight (None is made a ones vector there), floating
  // parameters, eps >= 0. Anything else goes to that path, which raises its documented errors.
  if (!has_tensor(weight) || !eager_plain(x) || !eager_plain(weight) || !eager_plain(bias) || !eager_plain(residual) ||
      !eager_no_modes())
    return std::nullopt;
  if (!(eps >= 0) || !weight->is_floating_point() || (has_tensor(bias) && !bias->is_floating_point()))
    return std::nullopt;
  const bool has_res = has_tensor(residual);
  if (at::GradMode::is_enabled() &&
      (x.requires_grad() || weight->requires_grad() || needs_grad(bias) || needs_grad(residual))) {
    return LayerNormFn::apply(x, *weight, bias, residual, eps, rms);
  }
  auto [y, h, mean, rstd] = layernorm_fwd_impl(x, *weight, bias, residual, eps, rms, /*stats=*/false);
  if (has_res) return std::vector<at::Tensor>{y, h};
  return std::vector<at::Tensor>{y};
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
