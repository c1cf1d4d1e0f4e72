// Shared by the torch-free kernels (CPU and CUDA): the element types a kernel can be asked for.
// The torch glue in csrc/ops maps at::ScalarType onto this enum, so kernels never see torch headers.
#pragma once

#include <cstdint>

// Functions that both the CPU and the CUDA kernels call (ce_row_loss below).
#if defined(__CUDACC__)
#define GK_HOST_DEVICE __host__ __device__
#else
#define GK_HOST_DEVICE
#endif

namespace gptkernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

// Which keys query row i of a (Tq, Tk) attention problem sees, and what modifies its scores before the softmax.
// The attention kernels of every backend (CPU, CUDA, Triton) implement exactly this:
//   pos_i = i + offset                      (offset 0: top-left alignment, as SDPA; Tk - Tq: bottom-right, as
//                                            FlashAttention, chunked prefill and speculative decoding)
//   key j is visible iff (left < 0 or j >= pos_i - left) and (right < 0 or j <= pos_i + right) and j < Tk
//                                           (causal: right = 0; a sliding window of w keys: left = w - 1)
//   s_ij = scale * <q_i, k_j>
//   s_ij = softcap * tanh(s_ij / softcap)   if softcap > 0
//   s_ij -= slope_bh * |pos_i - j|          if alibi (slopes fp32, slope of (b, h) at alibi[b * alibi_sb + h])
//   s_ij += mask_ij                         if mask; a mask entry of -inf makes key j invisible, whatever s_ij is
// p_ij = exp(s_ij - lse_i) over the visible keys; an invisible key has p = 0 and no gradient, even when the row's
// scores are NaN. A row with no visible key gets out = 0, lse = -inf and zero gradients. NaN or inf in a visible
// score makes that row's out, lse and gradients NaN (the forward never hides a NaN).
struct AttnSpec {
  int64_t offset = 0;
  int64_t left = -1;
  int64_t right = -1;
  float softcap = 0.f;
  const float* alibi = nullptr;
  int64_t alibi_sb = 0;
};

// The key range [lo, hi) that can be visible to query rows at positions [pos_lo, pos_hi] (Tk clamps it).
inline void attn_key_range(const AttnSpec& s, int64_t pos_lo, int64_t pos_hi, int64_t Tk, int64_t* lo, int64_t* hi) {
  int64_t a = s.left < 0 ? 0 : pos_lo - s.left;
  int64_t b = s.right < 0 ? Tk : pos_hi + s.right + 1;
  *lo = a < 0 ? 0 : (a > Tk ? Tk : a);
  *hi = b < *lo ? *lo : (b > Tk ? Tk : b);
}

// The options of one cross-entropy call, as the kernels of every backend read them (csrc/kernels/*/cross_entropy.*).
// Per row i with target t_i, z = softcap * tanh(x / softcap) when softcap > 0, else z = x (fp32 math):
//   lse_i  = log sum_j exp(z_ij)
//   loss_i = (1 - ls) * (lse_i - z_it) + ls * (lse_i - mean_j z_ij) + z_loss * lse_i^2     (ls = label_smoothing;
//            with ls == 0 exactly: lse_i - z_it + z_loss * lse_i^2, as PyTorch, whose smoothing term is then absent)
//   dloss_i/dx_ij = (p_ij * (1 + 2 z_loss lse_i) - ls / V - (1 - ls) [j == t_i]) * (1 - (z_ij / softcap)^2),
//            p_ij = exp(z_ij - lse_i)
// A row whose target equals ignore_index has loss 0, lse 0 and a zero gradient, whatever its logits (NaN included).
// A target outside [0, V) that is not ignore_index: NaN loss, lse and gradient for that row (never read out of
// bounds); the CPU kernels also report the first such row so the glue can raise.
struct CeSpec {
  int64_t ignore_index = -100;
  float label_smoothing = 0.f;
  float z_loss = 0.f;
  float softcap = 0.f;  // <= 0: none
};

// loss_i of CeSpec from the row's lse, its target's z and sum_j z_j (read only when label_smoothing != 0).
GK_HOST_DEVICE inline float ce_row_loss(float lse, float zt, float zsum, int64_t V, const CeSpec& s) {
  const float nll = lse - zt;
  const float ls = s.label_smoothing;
  // ls == 0: no smoothing term at all, as PyTorch (an inf or NaN in sum_j z cannot leak in through 0 * inf).
  float loss = ls != 0.f ? (1.f - ls) * nll + ls * (lse - zsum / float(V)) : nll;
  if (s.z_loss != 0.f) loss += s.z_loss * lse * lse;
  return loss;
}

}  // namespace gptkernels
