// Softmax over the last dim with scale, additive mask and causal masking, torch-free C++ for the CPU.
// OpenMP over rows; each row is staged once into an fp32 buffer so the inner loops vectorize.
#pragma once
#include <cstdint>

#include "../common.h"

namespace gptkernels {

// y = softmax(scale * x + mask) over the last dim, rows seeing only columns j <= t when causal.
// x: M = B*H*T rows of N elements of `dtype`, row r at x + r * stride_xm, columns contiguous.
// y: (M, N) contiguous, `dtype`. Row r is (b, h, t) = (r / (H*T), (r / T) % H, r % T).
// mask: fp32 additive mask (nullable), element (b, h, t, j) at mask[b*smb + h*smh + t*smt + j*smn]; broadcast
// dims have stride 0 (so a (T, N) mask is never expanded to (B, H, T, N)). smn must be 0 or 1.
// causal: column j of row t is masked (-inf) when j > t (top-left aligned, as PyTorch SDPA).
// A row with every column masked (max = -inf) gives zeros, not NaN; a NaN or +inf logit in a visible column makes
// its row NaN (as torch.softmax). Math in fp32.
void softmax_fwd_cpu(DType dtype, const void* x, int64_t stride_xm, void* y, const float* mask, int64_t B,
                     int64_t H, int64_t T, int64_t N, int64_t smb, int64_t smh, int64_t smt, int64_t smn, float scale,
                     bool causal);

// dz = y * (dy - sum_j(dy * y)) (the gradient of the logits scale*x + mask), dx = scale * dz.
// y, dx: (M, N) contiguous of `dtype`; dy: rows at dy + r * stride_dym (stride 0 allowed), columns contiguous.
// dz: (M, N) fp32, nullable; written only when non-null (the additive mask's gradient before its reduction).
// Masked positions have y == 0, so they get dx == 0 without knowing the mask.
void softmax_bwd_cpu(DType dtype, const void* y, const void* dy, int64_t stride_dym, void* dx, float* dz, int64_t M,
                     int64_t N, float scale);

}  // namespace gptkernels
