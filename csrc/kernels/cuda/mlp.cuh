// Torch-free CUDA FFN epilogues: bias + activation (GELU tanh/erf, ReLU) and SwiGLU's silu(g) * u, fwd and bwd.
// The torch glue in csrc/ops/mlp.cpp checks shapes, allocates, and calls these with raw device pointers.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../common.h"
#include "../cpu/mlp.h"  // enum class Act (torch-free, shared with the CPU kernels)

namespace gptkernels {

// y = act(x + bias) over a row-major (M, N) matrix, rows contiguous. bias: fp32 (N,) or nullptr. fp32 math.
// Reads x once, writes y once. 16-byte vectors when N and every pointer allow it.
cudaError_t launch_bias_gelu_fwd(DType dtype, Act act, const void* x, const float* bias, void* y, int64_t M,
                                 int64_t N, cudaStream_t stream);

// Bytes of fp32 scratch launch_bias_gelu_bwd needs for the dbias partial rows (0 when M <= 0).
size_t bias_gelu_bwd_workspace_bytes(int64_t M, int64_t N, int sm_count);

// dx = dy * act'(x + bias) (M, N); y (nullable) = act(x + bias) recomputed in the same pass; dbias (nullable) fp32
// (N,) = sum over rows of dx in fp32: per-block partial rows in `workspace`, then a second kernel adds them in a
// fixed order (deterministic, no atomics). bias and dbias are independent (either may be nullptr).
cudaError_t launch_bias_gelu_bwd(DType dtype, Act act, const void* dy, const void* x, const float* bias, void* dx,
                                 float* dbias, void* y, float* workspace, int64_t M, int64_t N, int sm_count,
                                 cudaStream_t stream);

// p = silu(g) * u over n contiguous elements.
cudaError_t launch_silu_mul_fwd(DType dtype, const void* g, const void* u, void* p, int64_t n, cudaStream_t stream);

// dg = dp * u * s * (1 + g * (1 - s)), du = dp * g * s with s = sigmoid(g); p (nullable) = g * s * u.
cudaError_t launch_silu_mul_bwd(DType dtype, const void* dp, const void* g, const void* u, void* dg, void* du,
                                void* p, int64_t n, cudaStream_t stream);

}  // namespace gptkernels
