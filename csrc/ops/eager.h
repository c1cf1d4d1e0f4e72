// Eager entry points: what the public Python ops call outside torch.compile, straight through pybind11 (bindings.cpp).
//
// At decode sizes a kernel runs in microseconds and the host path is the cost of a call. The registered ops
// (torch.ops.gptkernels.*) stay what torch.compile, opcheck and tracing see; in eager mode these entry points do the
// same work without the Python op dispatch and the Python autograd.Function: the checks in C++, autograd as a C++
// torch::autograd::Function whose forward and backward call the same glue functions as the registered ops, so the
// numerics are identical.
//
// Contract with the Python side (gptkernels/ops/<stem>.py):
//   - std::nullopt: this call is not for the eager path (a tensor subclass or dispatch mode, an argument form the
//     entry does not cover). The caller takes its checked Python path, which handles every case.
//   - an exception: bad input. The caller re-runs its checked Python path, which raises the documented error.
//   - otherwise the outputs, with autograd attached when grad mode is on and an input requires grad.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace gptkernels {

using EagerOut = std::optional<std::vector<at::Tensor>>;

// LayerNorm / RMSNorm: {y} or, with a residual, {y, h}.
EagerOut layernorm_eager(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, double eps,
                         bool rms);

// A bool keep-mask as 0 / -inf in fp32, a float mask cast to fp32 (the additive form the kernels read).
at::Tensor additive_mask_f32(const at::Tensor& mask);

// softmax(scale * x + mask), causal: {y}. mask: None, bool (True = keep) or float without grad.
EagerOut softmax_eager(const at::Tensor& x, const std::optional<at::Tensor>& mask, double scale, bool causal);

// scaled_dot_product_attention on (..., H, Tq, D) / (..., Hkv, Tk, D) inputs (reshaped to 4-D here, as the Python
// path does), dropout 0: {out}. scale None: 1/sqrt(D). window: implies causal.
EagerOut attention_eager(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const std::optional<at::Tensor>& attn_mask, std::optional<double> scale, bool is_causal,
                         bool enable_gqa, std::optional<int64_t> window);

// flash_attn_func without dropout or ALiBi: q (B, Tq, H, E), k, v (B, Tk, Hkv, E); out (B, Tq, H, E) contiguous.
EagerOut flash_attn_eager(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          std::optional<double> softmax_scale, bool causal, int64_t window_left, int64_t window_right,
                          double softcap);

// decode_attention: {out}. scale None: 1/sqrt(D).
EagerOut decode_attention_eager(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& cache_seqlens, std::optional<double> scale);

// bias + activation: {y}. activation: "gelu_tanh", "gelu" or "relu".
EagerOut bias_gelu_eager(const at::Tensor& x, const std::optional<at::Tensor>& bias, const std::string& activation);

// cross_entropy over the last dim (class indices, reduction "mean" / "sum" / "none"): {loss}. softcap None: none.
EagerOut cross_entropy_eager(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index,
                             const std::string& reduction, double label_smoothing, double z_loss,
                             std::optional<double> softcap);

// fused_mlp / swiglu on the ATen-GEMM path, without grad (inference): {y}. With grad: std::nullopt.
EagerOut fused_mlp_eager(const at::Tensor& x, const at::Tensor& w_fc, const std::optional<at::Tensor>& b_fc,
                         const at::Tensor& w_proj, const std::optional<at::Tensor>& b_proj,
                         const std::string& activation, const std::optional<at::Tensor>& residual);
EagerOut swiglu_eager(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down);

// Weight-only quantized linear without grad: {y}. dequant: the dequantize + GEMM path instead of the fused kernel.
EagerOut qlinear_eager(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const std::optional<at::Tensor>& bias, int64_t group_size, int64_t bits, bool dequant);

}  // namespace gptkernels
