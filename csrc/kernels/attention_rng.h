// The attention dropout generator shared by the C++ CPU and the CUDA kernels: a counter-based hash of
// (seed, b, h, i, j), so backward regenerates forward's keep mask from the indices alone, whatever the tiling,
// the thread count or the device. Both backends include this header, so they drop the same elements for the
// same seed (the contract only promises reproducibility per backend; this is a bonus, and what the tests of one
// backend can lean on when they check the other).
//
// The mix is splitmix64's finalizer (Stafford's variant 13): a bijection on 64 bits with full avalanche, so
// neighbouring counters give independent-looking outputs. One call per element: the (seed, b, h) and the row i
// are folded into a per-row key once, and each element hashes row_key ^ j.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define GK_ATTN_HD __host__ __device__ __forceinline__
#else
#define GK_ATTN_HD inline
#endif

namespace gptkernels {

GK_ATTN_HD uint64_t attn_mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Key of query row i of (b, h). b, h < 2^32; i < 2^63.
GK_ATTN_HD uint64_t attn_dropout_row_key(uint64_t seed, int64_t b, int64_t h, int64_t i) {
  const uint64_t bh = attn_mix64(attn_mix64(seed) ^ ((uint64_t(b) << 32) | uint64_t(uint32_t(h))));
  return attn_mix64(bh ^ uint64_t(i));
}

// p_ij is kept iff the top 32 bits of the element hash are >= threshold, i.e. with probability
// 1 - threshold / 2^32.
GK_ATTN_HD bool attn_dropout_keep(uint64_t row_key, int64_t j, uint32_t threshold) {
  return uint32_t(attn_mix64(row_key ^ uint64_t(j)) >> 32) >= threshold;
}

// threshold for dropout_p in [0, 1): round(p * 2^32), so p = 0 keeps everything.
GK_ATTN_HD uint32_t attn_dropout_threshold(float dropout_p) {
  const double t = double(dropout_p) * 4294967296.0 + 0.5;
  return t >= 4294967295.0 ? 0xffffffffu : uint32_t(t);
}

}  // namespace gptkernels
