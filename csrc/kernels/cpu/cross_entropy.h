// Cross-entropy over the last dim of (M, V) logits with integer targets, torch-free C++ for the CPU: the loss and
// log-sum-exp per row, the gradient of the logits (fused into the forward, in place or not, or from a saved lse),
// with label smoothing, z-loss and a tanh softcap. The math is CeSpec's (../common.h). OpenMP over rows.
#pragma once
#include <cstdint>

#include "../common.h"

namespace gptkernels {

// Per row r: loss[r], lse[r] (fp32), and when grad != nullptr, grad row r = dloss[r * stride_dl] * dloss_r/dx
// (dloss == nullptr: a gradient of 1 per row), in `dtype`. One pass over a row for the loss (an online max and sum
// per block of columns); the gradient re-reads the row once (from L1/L2) and writes it once.
// logits: M rows of V elements of `dtype`, row r at logits + r * stride_m, columns contiguous.
// target: (M,) int64, contiguous. grad: rows at grad + r * stride_gm; grad == logits (same stride) is allowed: each
// row is read before it is overwritten.
// Returns the first row whose target is outside [0, V) and not spec.ignore_index (that row's loss, lse and
// gradient are NaN), or -1.
int64_t cross_entropy_fwd_cpu(DType dtype, const void* logits, int64_t stride_m, const int64_t* target, int64_t M,
                              int64_t V, const CeSpec& spec, float* loss, float* lse, void* grad, int64_t stride_gm,
                              const float* dloss, int64_t stride_dl);

// dlogits row r = dloss[r * stride_dl] * dloss_r/dx from the forward's lse (fp32, (M,)); one read of the logits,
// one write of dlogits ((M, V) contiguous, `dtype`). Rows as in cross_entropy_fwd_cpu; stride_dl may be 0 (an
// expanded gradient). A row with an out-of-range target gets NaN (the forward already reported it).
void cross_entropy_bwd_cpu(DType dtype, const void* logits, int64_t stride_m, const int64_t* target, const float* lse,
                           const float* dloss, int64_t stride_dl, void* dlogits, int64_t M, int64_t V,
                           const CeSpec& spec);

}  // namespace gptkernels
