// Weight-only quantized linear layer, torch-free C++ for the CPU: y = x @ dequant(W)^T + bias.
//
// Weight formats (symmetric, no zero point; scales fp32, row-major (N, K / group)):
//   int8: q (N, K) int8;  w[n, k] = q[n, k] * scales[n, k / group]. Per output channel: group = K.
//   int4: q (N, K / 2) uint8, 32 values per 16 bytes: byte j (0..15) of block b (k = 32b .. 32b + 31) holds
//         k = 32b + j in its low nibble and k = 32b + 16 + j in its high nibble, each as u = q + 8 (q in -8..7);
//         w[n, k] = (u - 8) * scales[n, k / group]. group is a multiple of 32, so K is too.
//         Why not even/odd pairs: with this order one 16-byte load gives two runs of 16 consecutive k (the low and
//         the high nibbles), each a full vector against 16 consecutive x, with no shuffle.
#pragma once
#include <cstdint>

#include "../common.h"

namespace gptkernels {

// The fused kernel reads every weight byte from memory once per call for up to this many rows of x: all M rows
// are multiplied by each weight vector while it sits in registers. Above it the glue (csrc/ops/qlinear.cpp)
// dequantizes tiles of W and calls the BLAS GEMM instead.
constexpr int64_t kQlinearGemvMaxRows = 16;

// y (M, N) of `dtype`, contiguous = x (M, K) of `dtype`, contiguous @ dequant(q)^T + bias. bias: fp32 (N,) or
// nullptr. bits: 4 or 8. fp32 accumulation. Any M is correct; M > kQlinearGemvMaxRows re-reads W once per 16 rows.
void qlinear_fwd_cpu(DType dtype, int bits, const void* x, const void* q, const float* scales, const float* bias,
                     void* y, int64_t M, int64_t N, int64_t K, int64_t group);

// w (rows, K) fp32, contiguous = dequant of the `rows` weight rows starting at q (row strides as above: K bytes for
// int8, K / 2 for int4) with their scales (rows, K / group).
void qlinear_dequant_cpu(int bits, const void* q, const float* scales, float* w, int64_t rows, int64_t K,
                         int64_t group);

}  // namespace gptkernels
