// Scaled dot-product attention, torch-free C++ for the CPU: tiled online-softmax forward, FlashAttention-2
// backward and split-K decode, math in fp32 (16-bit inputs are widened tile by tile). The semantics are those
// of docs/attention_contract.md; the pointers are the glue's contiguous tensors.
//
// Layouts (row-major, contiguous): q, out, dout, dq (B, H, Tq, D); k, v, dk, dv (B, Hkv, Tk, D); lse, delta
// (B, H, Tq) fp32. Query head h reads kv head h / (H / Hkv).
// spec (../common.h's AttnSpec): which keys row i (at position i + spec.offset) sees, softcap and ALiBi; the NaN
// rule is there too. Here a non-finite score means one whose dot product <q_i, k_j> or final value (after
// softcap, ALiBi and mask) is inf or NaN: softcap does not turn an inf into a finite score.
// mask: fp32 additive mask or nullptr; element (b, h, i, j) at mask[b*smb + h*smh + i*smi + j*smj] (stride 0 on
// broadcast dims); -inf hides key j whatever the score. dropout_p in [0, 1); keep decisions from attention_rng.h
// with `seed`. A row with no visible key gives out = 0, lse = -inf and zero gradients.
// Non-finite q or k elements reach exactly the rows and keys the NaN rule names. Non-finite v or dout elements are
// not isolated that way: a row whose key tile holds such a key it does not see may still get NaN (0 * inf).
//
// Threads: OpenMP over independent tiles; results do not depend on the thread count (no cross-thread sums).
// GPTKERNELS_CPU_ISA=generic|avx2|avx512 caps the instruction set the kernels use (default: the best the CPU
// has); the tests use it to run every variant on one machine.
#pragma once
#include <cstdint>

#include "../common.h"

namespace gptkernels {

void attention_fwd_cpu(DType dtype, const void* q, const void* k, const void* v, const float* mask, int64_t smb,
                       int64_t smh, int64_t smi, int64_t smj, void* out, float* lse, int64_t B, int64_t H, int64_t Hkv,
                       int64_t Tq, int64_t Tk, int64_t D, float scale, const AttnSpec& spec, float dropout_p,
                       uint64_t seed);

// dq (B, H, Tq, D) of dtype; dk, dv (B, Hkv, Tk, D) of dtype, summed over the query heads of each group.
// out and lse are forward's outputs (out after dropout). Two passes, both deterministic: dk/dv per key tile
// (looping over query heads and tiles), then dq per query tile (looping over key tiles).
void attention_bwd_cpu(DType dtype, const void* dout, const void* q, const void* k, const void* v, const void* out,
                       const float* lse, const float* mask, int64_t smb, int64_t smh, int64_t smi, int64_t smj,
                       void* dq, void* dk, void* dv, int64_t B, int64_t H, int64_t Hkv, int64_t Tq, int64_t Tk,
                       int64_t D, float scale, const AttnSpec& spec, float dropout_p, uint64_t seed);

// Flash-decoding: q (B, H, Tn, D); k_cache, v_cache (B, Hkv, Tmax, D); seqlens (B,) int64 L_b (clamped to
// [0, Tmax]). Query t of batch b sits at position L_b - Tn + t and sees keys j <= that position, j < L_b.
// The key axis is cut into num_splits chunks (<= 0: chosen here) whose partial (out, lse) are merged with the
// log-sum-exp. out (B, H, Tn, D) of dtype.
void decode_attention_cpu(DType dtype, const void* q, const void* k_cache, const void* v_cache,
                          const int64_t* seqlens, void* out, int64_t B, int64_t H, int64_t Hkv, int64_t Tn,
                          int64_t Tmax, int64_t D, float scale, int64_t num_splits);

// The instruction set the kernels run with ("avx512", "avx2" or "generic"), after GPTKERNELS_CPU_ISA.
const char* attention_cpu_isa();

}  // namespace gptkernels
