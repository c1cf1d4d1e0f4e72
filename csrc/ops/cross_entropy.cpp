// Torch-facing cross-entropy ops: checks, allocation, and the call into the CPU or CUDA kernel. Registered as
// gptkernels::cross_entropy_fwd / cross_entropy_bwd / cross_entropy_fwd_bwd for the CPU and CUDA dispatch keys; their
// fake implementations, the reductions and linear_cross_entropy's chunk loop live in gptkernels/ops/cross_entropy.py.
// cross_entropy_eager (eager.h) is the public op's eager fast path: checks, autograd and reduction in one C++ call.
#include "../kernels/cpu/cross_entropy.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "common.h"
#include "eager.h"
#ifdef GPTKERNELS_WITH_CUDA
#include "../kernels/cuda/cross_entropy.cuh"
#endif

namespace gptkernels {
namespace {

CeSpec make_spec(int64_t ignore_index, double label_smoothing, double z_loss, double softcap) {
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, "label_smoothing: must be in [0, 1], got ",
              label_smoothing);
  TORCH_CHECK(z_loss >= 0.0 && std::isfinite(z_loss), "z_loss: must be finite and >= 0, got ", z_loss);
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), "softcap: must be finite and > 0 (0: none), got ", softcap);
  CeSpec s;
  s.ignore_index = ignore_index;
  s.label_smoothing = float(label_smoothing);
  s.z_loss = float(z_loss);
  s.softcap = float(softcap);
  return s;
}

// logits (N, V) with V >= 1, target (N,) int64 on the same device.
void check_inputs(const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.dim() == 2, "logits: must be 2-D (N, V), got shape ", logits.sizes());
  TORCH_CHECK(logits.size(1) >= 1, "logits: the class dim V must be at least 1, got shape ", logits.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "target: dtype must be int64 (class indices), got ",
                   target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "target: shape must be (N,) = (",
              logits.size(0), ",), got ", target.sizes());
  TORCH_CHECK(target.device() == logits.device(), "target: must be on ", logits.device(), ", got ", target.device());
}

// Rows with unit column stride: any row stride (0 included) is read in place, a column-strided tensor is copied
// once here, on purpose.
at::Tensor unit_cols(const at::Tensor& t) { return t.size(1) > 1 && t.stride(1) != 1 ? t.contiguous() : t; }

// (N,) fp32 per-row gradient: read through its stride (0 for an expanded gradient).
void check_dloss(const at::Tensor& dloss, const at::Tensor& logits) {
  TORCH_CHECK_TYPE(dloss.scalar_type() == at::kFloat, "dloss: dtype must be float32, got ", dloss.scalar_type());
  TORCH_CHECK(dloss.dim() == 1 && dloss.size(0) == logits.size(0), "dloss: shape must be (N,) = (", logits.size(0),
              ",), got ", dloss.sizes());
  TORCH_CHECK(dloss.device() == logits.device(), "dloss: must be on ", logits.device(), ", got ", dloss.device());
}

// The CPU kernels report the first row whose target is out of range; a ValueError names it (the Python API turns it
// into gptkernels.ArgumentError). On CUDA such a row's loss is NaN (reading the target back would synchronize).
void raise_if_bad(int64_t row, const at::Tensor& target, int64_t V, int64_t ignore_index) {
  if (row < 0) return;
  TORCH_CHECK_VALUE(false, "target: class index ", target.data_ptr<int64_t>()[row], " at position ", row,
                    " is outside [0, ", V, ") (V = logits.size(-1)) and is not ignore_index (", ignore_index, ")");
}

// The shared forward: loss and lse per row, and the gradient into `grad` when defined (in place when it is the
// logits tensor itself). dloss: the per-row gradient (undefined: 1).
void run_fwd(const at::Tensor& x, const at::Tensor& tgt, const CeSpec& spec, const at::Tensor& loss,
             const at::Tensor& lse, const at::Tensor& grad, const at::Tensor& dloss) {
  const int64_t N = x.size(0), V = x.size(1);
  if (N == 0) return;
  const DType dt = to_kernel_dtype(x.scalar_type(), "logits");
  void* g = grad.defined() ? grad.data_ptr() : nullptr;
  const int64_t sg = grad.defined() ? grad.stride(0) : 0;
  const float* dl = dloss.defined() ? dloss.data_ptr<float>() : nullptr;
  const int64_t sdl = dloss.defined() ? dloss.stride(0) : 0;
  if (x.is_cuda()) {
#ifdef GPTKERNELS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    check_cuda(launch_cross_entropy_fwd(dt, x.data_ptr(), x.stride(0), tgt.data_ptr<int64_t>(), N, V, spec,
                                        loss.data_ptr<float>(), lse.data_ptr<float>(), g, sg, dl, sdl,
                                        c10::cuda::getCurrentCUDAStream(x.get_device()).stream()),
               "launch_cross_entropy_fwd");
#else
    TORCH_CHECK(false, "gptkernels was built without CUDA");
#endif
  } else {
    const int64_t bad = cross_entropy_fwd_cpu(dt, x.data_ptr(), x.stride(0), tgt.data_ptr<int64_t>(), N, V, spec,
                                              loss.data_ptr<float>(), lse.data_ptr<float>(), g, sg, dl, sdl);
    raise_if_bad(bad, tgt, V, spec.ignore_index);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                     int64_t ignore_index, double label_smoothing, double z_loss,
                                                     double softcap) {
  check_inputs(logits, target);
  const CeSpec spec = make_spec(ignore_index, label_smoothing, z_loss, softcap);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({logits.size(0)}, f32), lse = at::empty({logits.size(0)}, f32);
  run_fwd(unit_cols(logits), target.contiguous(), spec, loss, lse, at::Tensor(), at::Tensor());
  return {loss, lse};
}

at::Tensor cross_entropy_fwd_bwd(at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& dloss,
                                 int64_t ignore_index, double label_smoothing, double z_loss, double softcap) {
  check_inputs(logits, target);
  TORCH_CHECK(logits.size(1) == 1 || logits.stride(1) == 1,
              "logits: the in-place gradient needs a unit column stride, got strides ", logits.strides());
  const CeSpec spec = make_spec(ignore_index, label_smoothing, z_loss, softcap);
  at::Tensor dl;
  if (has_tensor(dloss)) {
    check_dloss(*dloss, logits);
    dl = *dloss;
  }
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({logits.size(0)}, f32), lse = at::empty({logits.size(0)}, f32);
  run_fwd(logits, target.contiguous(), spec, loss, lse, logits, dl);
  return loss;
}

at::Tensor cross_entropy_bwd(const at::Tensor& dloss, const at::Tensor& logits_, const at::Tensor& target_,
                             const at::Tensor& lse_, int64_t ignore_index, double label_smoothing, double z_loss,
                             double softcap) {
  check_inputs(logits_, target_);
  check_dloss(dloss, logits_);
  TORCH_CHECK_TYPE(lse_.scalar_type() == at::kFloat, "lse: dtype must be float32, got ", lse_.scalar_type());
  TORCH_CHECK(lse_.dim() == 1 && lse_.size(0) == logits_.size(0), "lse: shape must be (N,), got ", lse_.sizes());
  const CeSpec spec = make_spec(ignore_index, label_smoothing, z_loss, softcap);
  const int64_t N = logits_.size(0), V = logits_.size(1);
  at::Tensor dx = at::empty({N, V}, logits_.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return dx;
  const DType dt = to_kernel_dtype(logits_.scalar_type(), "logits");
  const at::Tensor x = unit_cols(logits_), tgt = target_.contiguous(), lse = lse_.contiguous();
  if (x.is_cuda()) {
#ifdef GPTKERNELS_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    check_cuda(launch_cross_entropy_bwd(dt, x.data_ptr(), x.stride(0), tgt.data_ptr<int64_t>(), lse.data_ptr<float>(),
                                        dloss.data_ptr<float>(), dloss.stride(0), dx.data_ptr(), N, V, spec,
                                        c10::cuda::getCurrentCUDAStream(x.get_device()).stream()),
               "launch_cross_entropy_bwd");
#else
    TORCH_CHECK(false, "gptkernels was built without CUDA");
#endif
  } else {
    prefault_output(dx.data_ptr(), dx.nbytes());
    cross_entropy_bwd_cpu(dt, x.data_ptr(), x.stride(0), tgt.data_ptr<int64_t>(), lse.data_ptr<float>(),
                          dloss.data_ptr<float>(), dloss.stride(0), dx.data_ptr(), N, V, spec);
  }
  return dx;
}

namespace {

enum Reduction : int64_t { kMean = 0, kSum = 1, kNone = 2 };

// The (N,) fp32 loss rows reduced to the 0-d fp32 loss ("mean": divided by the count of rows whose target is not
// ignore_index; 0 / 0 = NaN when there are none, as PyTorch), and that count as a 0-d int64 tensor when `count` is
// given. The sum is ATen's, as in the Python path's reduction, so both paths give the same bits; on CPU the count
// and the division are one loop here (ne, sum and div as ATen ops cost ~6 us, more than the kernel at a few rows).
// CUDA: all ATen (a host loop would synchronize).
at::Tensor reduce_rows(const at::Tensor& loss, const at::Tensor& target, int64_t ignore_index, int64_t reduction,
                       at::Tensor* count) {
  at::Tensor total = loss.sum();
  if (reduction != kMean) return total;
  if (loss.is_cuda()) {
    at::Tensor c = target.ne(ignore_index).sum();
    if (count) *count = c;
    return total / c;
  }
  const at::Tensor t = target.contiguous();
  const int64_t* tp = t.data_ptr<int64_t>();
  int64_t c = 0;
  for (int64_t i = 0; i < t.numel(); ++i) c += tp[i] != ignore_index;
  // float / float(count): the op ATen's float-by-int64 division performs (exact for counts below 2^24).
  total.data_ptr<float>()[0] /= static_cast<float>(c);
  if (count) {
    *count = at::empty({}, t.options());
    count->data_ptr<int64_t>()[0] = c;
  }
  return total;
}

// Autograd of the eager entry, as CrossEntropyFunction in gptkernels/ops/cross_entropy.py: (N, V) logits, (N,)
// target -> the fp32 loss reduced inside the node (the sum, divided by the count of counted rows for mean), or the
// (N,) rows for none. Saves the logits (by reference), the target and lse.
struct CrossEntropyFn : public torch::autograd::Function<CrossEntropyFn> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                                                const at::Tensor& target, int64_t ignore_index, double label_smoothing,
                                                double z_loss, double softcap, int64_t reduction) {
    auto [loss, lse] = cross_entropy_fwd(logits, target, ignore_index, label_smoothing, z_loss, softcap);
    ctx->save_for_backward({logits, target, lse});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["z_loss"] = z_loss;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["reduction"] = reduction;
    if (reduction == kNone) return {loss};
    at::Tensor count;
    at::Tensor total = reduce_rows(loss, target, ignore_index, reduction, &count);
    if (reduction == kMean) ctx->saved_data["count"] = count;
    return {total};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    at::Tensor dloss = grads[0].to(at::kFloat);
    if (reduction != kNone) {  // the same gradient for every row, read through stride 0
      if (reduction == kMean) dloss = dloss / ctx->saved_data["count"].toTensor();
      dloss = dloss.expand({saved[0].size(0)});
    }
    at::Tensor dx = cross_entropy_bwd(dloss, saved[0], saved[1], saved[2], ctx->saved_data["ignore_index"].toInt(),
                                      ctx->saved_data["label_smoothing"].toDouble(),
                                      ctx->saved_data["z_loss"].toDouble(), ctx->saved_data["softcap"].toDouble());
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

EagerOut cross_entropy_eager(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                             const std::string& reduction, double label_smoothing, double z_loss,
                             std::optional<double> softcap) {
  // What the Python checks cover beyond the glue's goes to that path, which raises its documented errors.
  if (!eager_plain(logits) || !eager_plain(target) || !eager_no_modes()) return std::nullopt;
  const int64_t red = reduction == "mean" ? kMean : reduction == "sum" ? kSum : reduction == "none" ? kNone : -1;
  if (red < 0 || logits.dim() < 1 || !logits.is_floating_point() || target.scalar_type() != at::kLong ||
      target.device() != logits.device())
    return std::nullopt;
  const int64_t V = logits.size(-1);
  if (V < 1 || target.sizes() != logits.sizes().slice(0, logits.dim() - 1)) return std::nullopt;
  if (!(label_smoothing >= 0.0 && label_smoothing <= 1.0) || !(z_loss >= 0.0 && std::isfinite(z_loss)))
    return std::nullopt;
  if (softcap && !(*softcap > 0.0 && std::isfinite(*softcap))) return std::nullopt;
  const double cap = softcap ? *softcap : 0.0;
  const at::Tensor x = logits.reshape({-1, V}), t = target.reshape({-1});
  at::Tensor out;
  if (at::GradMode::is_enabled() && logits.requires_grad()) {
    out = CrossEntropyFn::apply(x, t, ignore_index, label_smoothing, z_loss, cap, red)[0];
  } else {
    // No autograd: the same arithmetic as the node's forward.
    out = std::get<0>(cross_entropy_fwd(x, t, ignore_index, label_smoothing, z_loss, cap));
    if (red != kNone) out = reduce_rows(out, t, ignore_index, red, nullptr);
  }
  if (red == kNone) return std::vector<at::Tensor>{out.to(logits.scalar_type()).view(target.sizes())};
  return std::vector<at::Tensor>{out.to(logits.scalar_type())};
}

TORCH_LIBRARY_FRAGMENT(gptkernels, m) {
  m.def(
      "cross_entropy_fwd(Tensor logits, Tensor target, int ignore_index, float label_smoothing, float z_loss, "
      "float softcap) -> (Tensor loss, Tensor lse)");
  m.def(
      "cross_entropy_bwd(Tensor dloss, Tensor logits, Tensor target, Tensor lse, int ignore_index, "
      "float label_smoothing, float z_loss, float softcap) -> Tensor dlogits");
  m.def(
      "cross_entropy_fwd_bwd(Tensor(a!) logits, Tensor target, Tensor? dloss, int ignore_index, "
      "float label_smoothing, float z_loss, float softcap) -> Tensor loss");
}

TORCH_LIBRARY_IMPL(gptkernels, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd);
  m.impl("cross_entropy_fwd_bwd", &cross_entropy_fwd_bwd);
}

#ifdef GPTKERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(gptkernels, CUDA, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd);
  m.impl("cross_entropy_fwd_bwd", &cross_entropy_fwd_bwd);
}
#endif

}  // namespace gptkernels
