// Torch-free CUDA softmax over the last dim with scale, additive mask and causal masking: forward and backward
// launchers. The torch glue in csrc/ops/softmax.cpp checks shapes, allocates, and calls these with raw device
// pointers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common.h"

namespace gptkernels {

// y = softmax(scale * x + mask) over the last dim, rows seeing only columns j <= t when causal (top-left aligned,
// as PyTorch SDPA). All pointers are device pointers; math in fp32.
// x: M = B*H*T rows of N elements of `dtype`, row r at x + r * stride_xm (any stride, 0 included), columns
// contiguous. y: (M, N) contiguous, `dtype`. Row r is (b, h, t) = (r / (H*T), (r / T) % H, r % T).
// mask: fp32 additive mask (nullable); element (b, h, t, j) at mask[b*smb + h*smh + t*smt + j*smn], stride 0 on
// broadcast dims; smn is 0 or 1. A fully masked row (every z = -inf) gives zeros, not NaN; a NaN or +inf z in a
// visible column makes its row NaN.
// Rows up to 16384 elements are held in registers (x read once); longer rows take an online pass (running max
// and rescaled sum) and a normalize pass, x read twice. Returns cudaErrorInvalidValue for bad arguments, else
// cudaGetLastError() after the launch. M == 0 or N == 0 launches nothing.
cudaError_t launch_softmax_fwd(DType dtype, const void* x, int64_t stride_xm, void* y, const float* mask, int64_t B,
                               int64_t H, int64_t T, int64_t N, int64_t smb, int64_t smh, int64_t smt, int64_t smn,
                               float scale, bool causal, cudaStream_t stream);

// dz = y * (dy - sum_j dy * y), dx = scale * dz. y, dx: (M, N) contiguous, `dtype`; dy: rows at
// dy + r * stride_dym (stride 0 allowed), columns contiguous. dz: (M, N) fp32, nullable (written when non-null).
cudaError_t launch_softmax_bwd(DType dtype, const void* y, const void* dy, int64_t stride_dym, void* dx, float* dz,
                               int64_t M, int64_t N, float scale, cudaStream_t stream);

}  // namespace gptkernels
