// Torch-free CUDA LayerNorm / RMSNorm (optionally fused with a residual add): forward and backward launchers.
// The torch glue in csrc/ops/layernorm.cpp checks shapes, allocates, and calls these with raw device pointers.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../common.h"

namespace gptkernels {

// LayerNorm (rms=false) or RMSNorm (rms=true) over the last dim of a row-major (M, N) matrix, rows contiguous
// (row stride == N for every tensor below). All pointers are device pointers.
//   h = residual ? x + residual (rounded to the element type, as PyTorch would) : x
//   LayerNorm: y = (h - mean) * rstd * weight + bias,   rstd = 1/sqrt(var + eps), var biased (divide by N)
//   RMSNorm:   y = h * rstd * weight,                   rstd = 1/sqrt(mean(h^2) + eps)
// x, residual, y, h: element type `dtype`. weight, bias: fp32 (N,). bias may be nullptr (then no bias); a
// non-null bias is added in RMSNorm mode too.
// residual may be nullptr; then h is ignored (may be nullptr) and h == x for the math.
// If residual != nullptr, h (M, N) is written (the rounded sum) and the statistics come from the ROUNDED h.
// mean: fp32 (M,), written only when !rms. rstd: fp32 (M,). Either may be nullptr (inference: no backward).
// All math in fp32. y may alias x (in place); h must not alias x or residual.
// Returns cudaErrorInvalidValue for bad arguments, else cudaGetLastError() after the launch.
cudaError_t launch_layernorm_fwd(DType dtype, const void* x, const void* residual, const float* weight,
                                 const float* bias, void* y, void* h, float* mean, float* rstd, int64_t M,
                                 int64_t N, float eps, bool rms, cudaStream_t stream);

// Bytes of fp32 scratch launch_layernorm_bwd needs: 2 * min(M, sm_count * clamp(8192 / N, 2, 16)) * N * 4,
// integer division (one partial row of dw and one of db per backward block). 0 when M <= 0. Pass the same
// (M, N, sm_count) to launch_layernorm_bwd; a 16-byte aligned workspace keeps the vectorized path.
size_t layernorm_bwd_workspace_bytes(int64_t M, int64_t N, int sm_count);

// Backward. hin: the normalized input (the h from forward, or x when there was no residual), dtype `dtype`.
// dy: (M, N) grad of y. dh: (M, N) grad flowing into the h output (nullable; when non-null it is ADDED to dx).
// dx: (M, N) output, dtype `dtype`:  xhat = (h - mean)*rstd (rms: h*rstd), wdy = weight*dy,
//   LayerNorm: dx = rstd * (wdy - mean_j(wdy) - xhat * mean_j(wdy*xhat)) (+ dh)
//   RMSNorm:   dx = rstd * (wdy - xhat * mean_j(wdy*xhat)) (+ dh)
// dw: fp32 (N,) = sum over rows of dy*xhat.  db: fp32 (N,) = sum over rows of dy; db may be nullptr (skip).
// Row sums run in fp32: per-block partial rows go to `workspace` (layernorm_bwd_workspace_bytes(M, N,
// sm_count) bytes), then a second kernel adds them in a fixed order, so dw/db are bitwise reproducible on a
// given GPU (no float atomics). mean is nullptr when rms. dx may alias dy or dh (in place), not hin.
// M == 0 zeroes dw (and db) with cudaMemsetAsync and launches no kernel.
cudaError_t launch_layernorm_bwd(DType dtype, const void* dy, const void* dh, const void* hin,
                                 const float* weight, const float* mean, const float* rstd, void* dx,
                                 float* dw, float* db, float* workspace, int64_t M, int64_t N, bool rms,
                                 int sm_count, cudaStream_t stream);

}  // namespace gptkernels
