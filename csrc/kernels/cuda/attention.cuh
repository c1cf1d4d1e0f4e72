// Torch-free CUDA attention: forward, backward and split-K decode launchers (docs/attention_contract.md).
// The torch glue in csrc/ops/attention.cpp checks shapes, makes the tensors contiguous and 16-byte aligned,
// allocates, and calls these with raw device pointers.
//
// Layouts (row-major, contiguous, 16-byte aligned base pointers): q, out, dout, dq (B, H, Tq, D); k, v, dk, dv
// (B, Hkv, Tk, D); lse (B, H, Tq) fp32. Query head h reads kv head h / (H / Hkv). Element type `dtype` for all of
// them (fp32, fp16, bf16); math in fp32. fp16/bf16 products run on tensor cores (fp32 accumulation); fp32 inputs
// take a SIMT fp32 path (no TF32), so fp32 results match an fp64 reference to ~1e-6.
// Head dims: D % 8 == 0 and 16 <= D <= 256 (kernels are compiled for D padded to 32, 64, 128 or 256; the padded
// columns are zeros in shared memory).
// mask: fp32 additive mask or nullptr; element (b, h, i, j) at mask[b*smb + h*smh + i*smi + j*smj] (0 on broadcast
// dims). spec (AttnSpec, ../common.h): which keys row i sees and how its scores are modified, exactly as documented
// there:
//   pos_i = i + spec.offset (0: top-left, as SDPA; Tk - Tq: bottom-right, as FlashAttention)
//   key j visible iff (left < 0 or j >= pos_i - left) and (right < 0 or j <= pos_i + right) and 0 <= j < Tk
//   s_ij = scale * <q_i, k_j>; then softcap * tanh(s_ij / softcap) if softcap > 0; then - slope_bh * |pos_i - j| if
//   spec.alibi (fp32 device pointer, slope of (b, h) at alibi[b * alibi_sb + h]); then + mask_ij, where a mask entry
//   of -inf makes key j invisible whatever s_ij is.
//   p_ij = exp(s_ij - lse_i) over the visible keys, lse natural log.
// Only key tiles (and, in the dK/dV kernel, query tiles) that intersect the visible band are visited, so causal and
// sliding-window problems cost what their band costs, whatever the offset.
// dropout_p in [0, 1) with the keep mask of ../attention_rng.h (the CPU kernels' generator).
// A row with no visible key gives out = 0, lse = -inf and exactly zero gradients. NaN or inf in a visible score
// (e.g. an inf in q) makes the row's out, lse and dq NaN, and dk, dv NaN at every key visible to it; invisible keys
// get exactly zero p and dS from it (dk = dS^T q still picks up 0 * inf = NaN where the row's q is inf, as in any
// matmul). The backward treats lse == -inf, and only that, as a row without visible keys.
//
// Every launcher returns cudaErrorInvalidValue for arguments outside these limits, cudaErrorInvalidConfiguration
// when the device's opt-in shared memory per block is below attention_cuda_smem_bytes(dtype, D), else
// cudaGetLastError() after its launches. Empty problems (B*H*Tq == 0) launch nothing.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../common.h"

namespace gptkernels {

// The largest dynamic shared memory any attention kernel for (dtype, D) asks for, in bytes; 0 when D is
// unsupported. D <= 128 fits the 99 KB opt-in limit of sm_86 / sm_89 (at most 98304 bytes); D > 128 needs up to
// 152960 bytes, within sm_80's 163 KB and sm_90's 227 KB, and returns cudaErrorInvalidConfiguration on sm_86/89.
size_t attention_cuda_smem_bytes(DType dtype, int64_t D);

// out, lse. Tk == 0 gives out = 0, lse = -inf.
cudaError_t launch_attention_fwd(DType dtype, const void* q, const void* k, const void* v, const float* mask,
                                 int64_t smb, int64_t smh, int64_t smi, int64_t smj, void* out, float* lse,
                                 int64_t B, int64_t H, int64_t Hkv, int64_t Tq, int64_t Tk, int64_t D, float scale,
                                 const AttnSpec& spec, float dropout_p, uint64_t seed, cudaStream_t stream);

// Bytes of fp32 scratch launch_attention_bwd needs (delta = rowsum(dout * out), B*H*Tq floats).
size_t attention_bwd_workspace_bytes(int64_t B, int64_t H, int64_t Tq);

// dq (B, H, Tq, D); dk, dv (B, Hkv, Tk, D), summed over each group's query heads. out, lse: forward's outputs.
// Three kernels, deterministic (no atomics): delta; dK/dV with one block per (key tile, b, kv head) looping
// over the group's heads and query tiles; dQ with one block per (query tile, b, h) looping over key tiles.
// Tq == 0 or Tk == 0 zero-fills the outputs.
cudaError_t launch_attention_bwd(DType dtype, const void* dout, const void* q, const void* k, const void* v,
                                 const void* out, const float* lse, const float* mask, int64_t smb, int64_t smh,
                                 int64_t smi, int64_t smj, void* dq, void* dk, void* dv, float* workspace,
                                 int64_t B, int64_t H, int64_t Hkv, int64_t Tq, int64_t Tk, int64_t D, float scale,
                                 const AttnSpec& spec, float dropout_p, uint64_t seed, cudaStream_t stream);

// The number of key splits launch_decode_attention will use: num_splits clamped to [1, ceil(Tmax / 64)], or when
// num_splits <= 0, enough splits for about two blocks per SM (sm_count) with at least 256 keys each.
int decode_attention_num_splits(int64_t B, int64_t H, int64_t Hkv, int64_t Tn, int64_t Tmax, int64_t D,
                                int64_t num_splits, int sm_count);

// Bytes of fp32 scratch for `splits` splits: a partial output row and its lse per (b, h, t, split).
size_t decode_attention_workspace_bytes(int64_t B, int64_t H, int64_t Tn, int64_t D, int splits);

// q (B, H, Tn, D): the Tn newest tokens; k_cache, v_cache (B, Hkv, Tmax, D); seqlens (B,) int32 L_b, read on
// the device and clamped to [0, Tmax]. Query t of batch b sits at position L_b - Tn + t and sees keys
// j <= that position (keys >= L_b are never read). out (B, H, Tn, D). One block per (b, kv head, split, block
// of the group's Tn * H/Hkv query rows), then a merge kernel combines the splits' (out, lse).
cudaError_t launch_decode_attention(DType dtype, const void* q, const void* k_cache, const void* v_cache,
                                    const int32_t* seqlens, void* out, float* workspace, int64_t B, int64_t H,
                                    int64_t Hkv, int64_t Tn, int64_t Tmax, int64_t D, float scale, int splits,
                                    cudaStream_t stream);

}  // namespace gptkernels
