// The Python module gptkernels._C. Loading it runs the TORCH_LIBRARY_FRAGMENT registrations of every op in
// csrc/ops (each op file declares its own schemas, so one stem's layers stay together). This file reports what the
// build contains and binds the eager entry points of csrc/ops/eager.h, the fast path of the public ops outside
// torch.compile.
#include <torch/extension.h>

#include <string>
#include <utility>

#include "ops/eager.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef GPTKERNELS_WITH_CUDA
#include "kernels/cuda/probe.cuh"
#endif

#ifndef GPTKERNELS_CUDA_ARCHS
#define GPTKERNELS_CUDA_ARCHS ""
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict d;
#ifdef GPTKERNELS_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(GPTKERNELS_CUDA_ARCHS);
  d["cuda_runtime_version"] = gptkernels::cuda_compiled_runtime_version();
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::string();
  d["cuda_runtime_version"] = 0;
#endif
#ifdef GPTKERNELS_CUDA_WHY
  d["cuda_why"] = std::string(GPTKERNELS_CUDA_WHY);  // why CUDA is in or out of this build (from setup.py)
#else
  d["cuda_why"] = std::string("built without setup.py");
#endif
#ifdef _OPENMP
  d["openmp"] = true;
  d["openmp_max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["openmp_max_threads"] = 1;
#endif
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = std::string("unknown");
#endif
  return d;
}

py::tuple cuda_probe(int device) {
#ifdef GPTKERNELS_WITH_CUDA
  const char* msg = nullptr;
  const int code = gptkernels::cuda_probe_device(device, &msg);
  return py::make_tuple(code, std::string(msg ? msg : ""));
#else
  (void)device;
  return py::make_tuple(-1, std::string("built without CUDA"));
#endif
}

// None (take the Python path), one tensor, or a tuple. Calls that move at least kReleaseGilElements elements run
// without the GIL, as ATen's own ops do; below that, releasing and retaking it costs more than other Python threads
// would gain.
constexpr int64_t kReleaseGilElements = int64_t(1) << 15;

// `name` is what torch.profiler shows for the call (a RecordFunction costs ~10 ns while no profiler runs).
template <typename F>
py::object eager_call(const char* name, int64_t elements, F&& f) {
  RECORD_FUNCTION(name, std::vector<c10::IValue>());
  gptkernels::EagerOut out;
  if (elements >= kReleaseGilElements) {
    py::gil_scoped_release no_gil;
    out = f();
  } else {
    out = f();
  }
  if (!out) return py::none();
  if (out->size() == 1) return py::cast(std::move((*out)[0]));
  py::tuple t(out->size());
  for (size_t i = 0; i < out->size(); ++i) t[i] = py::cast(std::move((*out)[i]));
  return t;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gptkernels C++/CUDA extension: op registrations and build information";
  m.def("build_info", &build_info, "What this build of the extension contains.");
  m.def("cuda_probe", &cuda_probe, py::arg("device"),
        "(code, message): code 0 when this build's CUDA kernels can load on the device.");

  using OptT = std::optional<at::Tensor>;
  m.def(
      "layernorm",
      [](const at::Tensor& x, const OptT& w, const OptT& b, const OptT& r, double eps, bool rms) {
        return eager_call("gptkernels::layer_norm", x.numel(),
                          [&] { return gptkernels::layernorm_eager(x, w, b, r, eps, rms); });
      },
      "Eager LayerNorm/RMSNorm: y, (y, h) with a residual, or None for the checked Python path.");
  m.def(
      "softmax",
      [](const at::Tensor& x, const OptT& mask, double scale, bool causal) {
        return eager_call("gptkernels::softmax", x.numel(),
                          [&] { return gptkernels::softmax_eager(x, mask, scale, causal); });
      },
      "Eager softmax: y, or None for the checked Python path.");
  m.def(
      "attention",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptT& mask, std::optional<double> scale,
         bool causal, bool enable_gqa, std::optional<int64_t> window) {
        return eager_call("gptkernels::scaled_dot_product_attention", q.numel() + k.numel(), [&] {
          return gptkernels::attention_eager(q, k, v, mask, scale, causal, enable_gqa, window);
        });
      },
      "Eager scaled_dot_product_attention (dropout 0): out, or None for the checked Python path.");
  m.def(
      "flash_attn",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::optional<double> softmax_scale,
         bool causal, int64_t window_left, int64_t window_right, double softcap) {
        return eager_call("gptkernels::flash_attn_func", q.numel() + k.numel(), [&] {
          return gptkernels::flash_attn_eager(q, k, v, softmax_scale, causal, window_left, window_right, softcap);
        });
      },
      "Eager flash_attn_func (no dropout, no ALiBi): out, or None for the checked Python path.");
  m.def(
      "decode_attention",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lens,
         std::optional<double> scale) {
        return eager_call("gptkernels::decode_attention", k.numel(),
                          [&] { return gptkernels::decode_attention_eager(q, k, v, lens, scale); });
      },
      "Eager decode_attention: out, or None for the checked Python path.");
  m.def(
      "bias_gelu",
      [](const at::Tensor& x, const OptT& bias, const std::string& activation) {
        return eager_call("gptkernels::bias_gelu", x.numel(),
                          [&] { return gptkernels::bias_gelu_eager(x, bias, activation); });
      },
      "Eager bias + activation: y, or None for the checked Python path.");
  m.def(
      "cross_entropy",
      [](const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index, const std::string& reduction,
         double label_smoothing, double z_loss, std::optional<double> softcap) {
        return eager_call("gptkernels::cross_entropy", logits.numel(), [&] {
          return gptkernels::cross_entropy_eager(logits, target, ignore_index, reduction, label_smoothing, z_loss,
                                                 softcap);
        });
      },
      "Eager cross_entropy: the loss, or None for the checked Python path.");
  m.def(
      "fused_mlp",
      [](const at::Tensor& x, const at::Tensor& w_fc, const OptT& b_fc, const at::Tensor& w_proj, const OptT& b_proj,
         const std::string& activation, const OptT& residual) {
        return eager_call("gptkernels::fused_mlp", w_fc.numel(), [&] {
          return gptkernels::fused_mlp_eager(x, w_fc, b_fc, w_proj, b_proj, activation, residual);
        });
      },
      "Eager fused_mlp without grad on the ATen-GEMM path: y, or None for the checked Python path.");
  m.def(
      "swiglu",
      [](const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down) {
        return eager_call("gptkernels::swiglu", w_gate.numel(),
                          [&] { return gptkernels::swiglu_eager(x, w_gate, w_up, w_down); });
      },
      "Eager swiglu without grad on the ATen-GEMM path: y, or None for the checked Python path.");
  m.def(
      "qlinear",
      [](const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, const OptT& bias, int64_t group_size,
         int64_t bits, bool dequant) {
        return eager_call("gptkernels::quantized_linear", qweight.numel(), [&] {
          return gptkernels::qlinear_eager(x, qweight, scales, bias, group_size, bits, dequant);
        });
      },
      "Eager quantized_linear without grad: y, or None for the checked Python path.");
}
