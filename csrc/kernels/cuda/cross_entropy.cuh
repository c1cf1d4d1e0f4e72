// Torch-free CUDA cross-entropy over the last dim of (M, V) logits with int64 targets: the loss and lse per row, the
// gradient of the logits fused into the forward (in place or not) or from a saved lse. The math is CeSpec's
// (../common.h). The torch glue in csrc/ops/cross_entropy.cpp checks shapes, allocates, and calls these with raw
// device pointers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common.h"

namespace gptkernels {

// Per row r: loss[r], lse[r] (fp32), and when grad != nullptr, grad row r = dloss[r * stride_dl] * dloss_r/dx
// (dloss == nullptr: 1 per row) in `dtype`. logits: rows at logits + r * stride_m (any stride, 0 included), columns
// contiguous. target: (M,) int64 contiguous. grad: rows at grad + r * stride_gm; grad == logits with the same stride
// (the in-place gradient) is allowed. A target outside [0, V) that is not ignore_index is never used as an index:
// that row's loss, lse and gradient are NaN (reporting it would need a host sync).
// One block per row: an online max and rescaled sum per thread over 16-byte vector loads (a scalar head up to the
// first 16-byte boundary and a scalar tail), block reductions, then the gradient pass re-reads the row (from L2).
// Returns cudaErrorInvalidValue for bad arguments, else cudaGetLastError() after the launch.
cudaError_t launch_cross_entropy_fwd(DType dtype, const void* logits, int64_t stride_m, const int64_t* target,
                                     int64_t M, int64_t V, const CeSpec& spec, float* loss, float* lse, void* grad,
                                     int64_t stride_gm, const float* dloss, int64_t stride_dl, cudaStream_t stream);

// dlogits row r = dloss[r * stride_dl] * dloss_r/dx from the forward's lse ((M,) fp32): one read of the logits, one
// write of dlogits ((M, V) contiguous, `dtype`). stride_dl may be 0 (an expanded gradient).
cudaError_t launch_cross_entropy_bwd(DType dtype, const void* logits, int64_t stride_m, const int64_t* target,
                                     const float* lse, const float* dloss, int64_t stride_dl, void* dlogits, int64_t M,
                                     int64_t V, const CeSpec& spec, cudaStream_t stream);

}  // namespace gptkernels
