// FFN elementwise kernels, torch-free C++ for the CPU: bias + activation (GELU tanh/erf, ReLU) and SwiGLU's
// silu(g) * u, forward and backward. The GEMMs around them run in ATen; these are the epilogues.
#pragma once
#include <cstdint>

#include "../common.h"

namespace gptkernels {

// Activation of bias_gelu / fused_mlp. Values match the strings of the Python API through ops/mlp.cpp.
enum class Act : int { kGeluTanh = 0, kGeluErf = 1, kRelu = 2 };

// y = act(x + bias). x, y: (M, N) of `dtype`, rows contiguous; bias: fp32 (N,) or nullptr (no bias).
// The sum x + bias is not rounded to dtype: act sees the fp32 value (the backward recomputes the same one).
void bias_gelu_fwd_cpu(DType dtype, Act act, const void* x, const float* bias, void* y, int64_t M, int64_t N);

// dx = dy * act'(x + bias); dbias (N,) fp32 = sum over rows of dx's fp32 value (nullable: skipped; it does not
// need a bias: fused_mlp adds b_fc in the GEMM and still wants its gradient from here).
// y (nullable): also writes act(x + bias), the forward's output recomputed in the same pass (fused_mlp's backward
// needs it for the proj weight gradient and saved only x). dy, x, dx, y: (M, N) of dtype, rows contiguous.
void bias_gelu_bwd_cpu(DType dtype, Act act, const void* dy, const void* x, const float* bias, void* dx,
                       float* dbias, void* y, int64_t M, int64_t N);

// p = silu(g) * u = g * sigmoid(g) * u. g, u, p: `numel` elements of dtype, contiguous.
void silu_mul_fwd_cpu(DType dtype, const void* g, const void* u, void* p, int64_t numel);

// dg = dp * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))), du = dp * silu(g); p (nullable) = silu(g) * u recomputed.
void silu_mul_bwd_cpu(DType dtype, const void* dp, const void* g, const void* u, void* dg, void* du, void* p,
                      int64_t numel);

}  // namespace gptkernels
