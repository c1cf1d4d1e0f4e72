// Torch-free CUDA weight-only quantized linear: y = x @ dequant(W)^T + bias. Formats as csrc/kernels/cpu/qlinear.h
// (int8 (N, K) or int4 (N, K / 2) in 32-value blocks, fp32 scales (N, K / group)). The torch glue in
// csrc/ops/qlinear.cpp checks shapes, allocates, and calls these with raw device pointers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common.h"

namespace gptkernels {

// y (M, N) of dtype = x (M, K) of dtype @ dequant(q)^T + bias (fp32 (N,) or nullptr); x, y contiguous, fp32
// accumulation. One warp per output row, all rows of x (up to 16 per launch; larger M loops on the host): each lane
// reads 16-byte vectors of the weight row (16 int8 or one 32-value int4 block), converts them in registers and
// multiplies them into every row of x, so every weight byte crosses DRAM once per 16 rows of x.
cudaError_t launch_qlinear_fwd(DType dtype, int bits, const void* x, const void* q, const float* scales,
                               const float* bias, void* y, int64_t M, int64_t N, int64_t K, int64_t group,
                               cudaStream_t stream);

// w (N, K) of dtype, contiguous = dequant(q): the large-M path's weight for cuBLAS.
cudaError_t launch_qlinear_dequant(DType dtype, int bits, const void* q, const float* scales, void* w, int64_t N,
                                   int64_t K, int64_t group, cudaStream_t stream);

}  // namespace gptkernels
