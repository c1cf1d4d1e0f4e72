// Torch-facing softmax ops: checks, the (B, H, T, N) view of x and its broadcast mask, allocation, and the call
// into the CPU or CUDA kernel. Registered as gptkernels::softmax_fwd / softmax_bwd for the CPU and CUDA dispatch
// keys; their fake implementations live in gptkernels/ops/softmax.py.
#include "../kernels/cpu/softmax.h"

#include <ATen/Parallel.h>
#include <ATen/TensorUtils.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "common.h"
#include "eager.h"
#ifdef GPTKERNELS_WITH_CUDA
#include "../kernels/cuda/softmax.cuh"
#endif

namespace gptkernels {
namespace {

// x as rows of N with unit column stride: a view when x allows one (any row stride, 0 included), else a copy,
// on purpose (a transposed x is copied once here rather than read column-wise by the kernels).
at::Tensor as_rows(const at::Tensor& t, int64_t M, int64_t N) {
  at::Tensor r = t.reshape({M, N});
  if (N > 1 && r.stride(1) != 1) r = r.contiguous();
  return r;
}

// Strides of the additive mask in x's (B, H, T, N) view. The mask keeps its own shape: broadcast dims get
// stride 0, so a (T, N) mask on a (B, H, T, N) input is read from its T*N floats (L2-resident on the GPU) and
// never expanded. Only when x has more than 4 dims and the mask's broadcast pattern cannot be merged into B is
// it materialized at x's size (a copy, rare).
struct MaskView {
  at::Tensor mask;  // keeps the storage alive while the kernel runs
  int64_t smb = 0, smh = 0, smt = 0, smn = 0;
};

MaskView mask_view(const at::Tensor& mask_, const at::Tensor& x, int64_t B, int64_t H, int64_t T, int64_t N) {
  MaskView v;
  const at::Tensor m = mask_.contiguous();  // in its own shape, so a non-broadcast last dim has stride 1
  const at::Tensor e = m.expand(x.sizes());
  const std::vector<int64_t> shape4{B, H, T, N};
  auto strides = at::detail::computeStride(e.sizes(), e.strides(), shape4);
  if (strides) {
    v.mask = m;
  } else {
    v.mask = e.reshape(shape4).contiguous();
    strides = v.mask.strides().vec();
  }
  const auto& s = *strides;
  v.smb = B > 1 ? s[0] : 0;
  v.smh = H > 1 ? s[1] : 0;
  v.smt = T > 1 ? s[2] : 0;
  v.smn = N > 1 ? s[3] : 0;
  TORCH_CHECK(v.smn == 0 || v.smn == 1, "mask: internal error, last-dim stride ", v.smn, " is not 0 or 1");
  return v;
}

}  // namespace

at::Tensor softmax_fwd(const at::Tensor& x_, const std::optional<at::Tensor>& mask_, double scale, bool causal) {
  TORCH_CHECK(x_.dim() >= 1, "x: must have at least 1 dim");
  TORCH_CHECK(!causal || x_.dim() >= 2, "x: causal=True needs at least 2 dims (rows, columns), got shape ", x_.sizes());
  const DType dt = to_kernel_dtype(x_.scalar_type(), "x");
  const bool has_mask = mask_.has_value() && mask_->defined();
  if (has_mask) {
    TORCH_CHECK_TYPE(mask_->scalar_type() == at::kFloat, "mask: must be float32 (the additive form), got ",
                     mask_->scalar_type());
    TORCH_CHECK(mask_->device() == x_.device(), "mask: must be on ", x_.device(), ", got ", mask_->device());
    const auto ms = mask_->sizes();
    bool ok = mask_->dim() <= x_.dim();
    for (int64_t i = 1; ok && i <= mask_->dim(); ++i) {
      ok = ms[ms.size() - i] == 1 || ms[ms.size() - i] == x_.size(-i);
    }
    TORCH_CHECK(ok, "mask: shape ", ms, " is not broadcastable to x's shape ", x_.sizes());
  }
  const int64_t d = x_.dim();
  const int64_t N = x_.size(-1);
  const int64_t T = d >= 2 ? x_.size(-2) : 1;
  const int64_t H = d >= 3 ? x_.size(-3) : 1;
  const int64_t B = N * T * H == 0 ? 0 : x_.numel() / (N * T * H);
  const int64_t M = B * H * T;
  at::Tensor y = at::empty(x_.sizes(), x_.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || N == 0) return y;

  // Rows of a contiguous x are read in place (row stride N) without building a view: at decode sizes each view
  // is a measurable share of the call.
  const at::Tensor x = x_.is_contiguous() ? x_ : as_rows(x_, M, N);
  const int64_t x_row_stride = x_.is_contiguous() ? N : x.stride(0);
  MaskView mv;
  if (has_mask) mv = mask_view(*mask_, x_, B, H, T, N);
  const float* mask_p = has_mask ? mv.mask.data_ptr<float>() : nullptr;

  if (x.is_cuda()) {
#ifdef GPTKERNELS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    check_cuda(
        launch_softmax_fwd(dt, x.data_ptr(), x_row_stride, y.data_ptr(), mask_p, B, H, T, N, mv.smb, mv.smh, mv.smt,
                           mv.smn, float(scale), causal, c10::cuda::getCurrentCUDAStream(x.get_device()).stream()),
        "launch_softmax_fwd");
#else
    TORCH_CHECK(false, "gptkernels was built without CUDA");
#endif
  } else {
    prefault_output(y.data_ptr(), y.nbytes());
    softmax_fwd_cpu(dt, x.data_ptr(), x_row_stride, y.data_ptr(), mask_p, B, H, T, N, mv.smb, mv.smh, mv.smt, mv.smn,
                    float(scale), causal);
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor> softmax_bwd(const at::Tensor& y_, const at::Tensor& dy_, double scale,
                                               bool mask_grad) {
  TORCH_CHECK(y_.dim() >= 1, "y: must have at least 1 dim");
  const DType dt = to_kernel_dtype(y_.scalar_type(), "y");
  TORCH_CHECK(dy_.sizes() == y_.sizes(), "dy: shape ", dy_.sizes(), " must match y ", y_.sizes());
  TORCH_CHECK_TYPE(dy_.scalar_type() == y_.scalar_type(), "dy: dtype ", dy_.scalar_type(), " must match y ",
                   y_.scalar_type());
  TORCH_CHECK(dy_.device() == y_.device(), "dy: must be on ", y_.device());
  const int64_t N = y_.size(-1);
  const int64_t M = N == 0 ? 0 : y_.numel() / N;
  const auto f32 = y_.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dx = at::empty({M, N}, y_.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor dz = mask_grad ? at::empty({M, N}, f32) : at::empty({0}, f32);
  auto result = [&] { return std::make_tuple(dx.view(y_.sizes()), mask_grad ? dz.view(y_.sizes()) : dz); };
  if (M == 0 || N == 0) return result();

  // y comes from softmax_fwd (contiguous); a gradient can arrive expanded (row stride 0 is read in place) or
  // transposed (copied).
  const at::Tensor y = y_.reshape({M, N}).contiguous();
  const at::Tensor dy = as_rows(dy_, M, N);
  float* dz_p = mask_grad ? dz.data_ptr<float>() : nullptr;
  if (y.is_cuda()) {
#ifdef GPTKERNELS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(y.device());
    check_cuda(launch_softmax_bwd(dt, y.data_ptr(), dy.data_ptr(), dy.stride(0), dx.data_ptr(), dz_p, M, N,
                                  float(scale), c10::cuda::getCurrentCUDAStream(y.get_device()).stream()),
               "launch_softmax_bwd");
#else
    TORCH_CHECK(false, "gptkernels was built without CUDA");
#endif
  } else {
    prefault_output(dx.data_ptr(), dx.nbytes());
    if (mask_grad) prefault_output(dz.data_ptr(), dz.nbytes());
    softmax_bwd_cpu(dt, y.data_ptr(), dy.data_ptr(), dy.stride(0), dx.data_ptr(), dz_p, M, N, float(scale));
  }
  return result();
}

namespace {

// Autograd of the eager entry: saves y only, as SoftmaxFunction in gptkernels/ops/softmax.py. Inputs (x, mask,
// scale, causal); the mask here never requires grad (a float mask with grad takes the Python path, which returns
// dmask).
struct SoftmaxFn : public torch::autograd::Function<SoftmaxFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const std::optional<at::Tensor>& mask, double scale, bool causal) {
    at::Tensor y = softmax_fwd(x, mask, scale, causal);
    ctx->save_for_backward({y});
    ctx->saved_data["scale"] = scale;
    return {y};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor y = ctx->get_saved_variables()[0];
    auto [dx, dz] = softmax_bwd(y, grads[0], ctx->saved_data["scale"].toDouble(), false);
    return {dx, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

// A mask as the kernels read it: bool (True = keep) becomes 0 / -inf in fp32, a float mask is cast to fp32; both keep
// their own (broadcast) shape.
at::Tensor additive_mask_f32(const at::Tensor& mask) {
  if (mask.scalar_type() == at::kBool) {
    return at::zeros(mask.sizes(), mask.options().dtype(at::kFloat))
        .masked_fill_(mask.logical_not(), -std::numeric_limits<float>::infinity());
  }
  return mask.to(at::kFloat);
}

EagerOut softmax_eager(const at::Tensor& x, const std::optional<at::Tensor>& mask, double scale, bool causal) {
  if (!eager_plain(x) || !eager_plain(mask) || !eager_no_modes() || !std::isfinite(scale)) return std::nullopt;
  const bool grad_mode = at::GradMode::is_enabled();
  at::Tensor m;
  if (has_tensor(mask)) {
    if (mask->scalar_type() != at::kBool && !mask->is_floating_point()) return std::nullopt;
    if (grad_mode && mask->requires_grad()) return std::nullopt;  // dmask: the Python path
    m = additive_mask_f32(*mask);
  }
  if (grad_mode && x.requires_grad()) return SoftmaxFn::apply(x, opt(m), scale, causal);
  return std::vector<at::Tensor>{softmax_fwd(x, opt(m), scale, causal)};
}

TORCH_LIBRARY_FRAGMENT(gptkernels, m) {
  m.def("softmax_fwd(Tensor x, Tensor? mask, float scale, bool causal) -> Tensor y");
  m.def("softmax_bwd(Tensor y, Tensor dy, float scale, bool mask_grad) -> (Tensor dx, Tensor dz)");
}

TORCH_LIBRARY_IMPL(gptkernels, CPU, m) {
  m.impl("softmax_fwd", &softmax_fwd);
  m.impl("softmax_bwd", &softmax_bwd);
}

#ifdef GPTKERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(gptkernels, CUDA, m) {
  m.impl("softmax_fwd", &softmax_fwd);
  m.impl("softmax_bwd", &softmax_bwd);
}
#endif

}  // namespace gptkernels
