// LayerNorm / RMSNorm over the last dim of a row-major (M, N) matrix, torch-free C++ for the CPU.
// OpenMP over rows; each row is staged once into an fp32 buffer so the inner loops vectorize.
#pragma once
#include <cstdint>

#include "../common.h"

namespace gptkernels {

// h = residual ? x + residual (rounded to dtype) : x
// LayerNorm: y = (h - mean) * rstd * weight + bias;  RMSNorm (rms): y = h * rstd * weight.
// x, residual, y, h: (M, N) of `dtype`, rows contiguous. weight, bias: fp32 (N,). bias, residual nullable;
// h is written only when residual != nullptr. mean (M,) fp32 written unless rms; rstd (M,) fp32; either may be
// nullptr (inference: no backward).
void layernorm_fwd_cpu(DType dtype, const void* x, const void* residual, const float* weight, const float* bias,
                       void* y, void* h, float* mean, float* rstd, int64_t M, int64_t N, float eps, bool rms);

// hin: the forward's normalized input (h, or x without residual). dh: grad into h (nullable, added to dx).
// dx (M, N) of dtype; dw (N,) fp32 = sum_rows dy*xhat; db (N,) fp32 = sum_rows dy (nullable).
void layernorm_bwd_cpu(DType dtype, const void* dy, const void* dh, const void* hin, const float* weight,
                       const float* mean, const float* rstd, void* dx, float* dw, float* db, int64_t M, int64_t N,
                       bool rms);

}  // namespace gptkernels
