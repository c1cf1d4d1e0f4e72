// What every CUDA kernel file shares: warp and block reductions, launch-size helpers and constants. Conversions
// (to_f / from_f) are in convert.cuh, included here. Torch-free, like the kernels.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "convert.cuh"

namespace gptkernels {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Largest grid.x we launch; rows past it are covered by grid-stride loops.
constexpr int64_t kMaxGrid = 2147483647;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__host__ __device__ constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }
__host__ __device__ constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__host__ __device__ inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Xor butterflies over the 32 lanes: every lane ends with the identical result (fp32 addition is commutative and
// partners combine the same two values), so a later block-level step sees the same partials in every warp.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Sums each v[r] over the block (blockDim.x a multiple of 32, <= 1024), in place; every thread gets the bitwise
// identical total. smem: R * 32 floats. The leading barrier keeps a previous call's readers of smem ahead of the
// writes.
template <int R>
__device__ __forceinline__ void block_sum(float (&v)[R], float* smem) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
#pragma unroll
  for (int r = 0; r < R; ++r) v[r] = warp_sum(v[r]);
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) smem[r * kWarp + warp] = v[r];
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < R; ++r) v[r] = warp_sum(lane < nwarps ? smem[r * kWarp + lane] : 0.f);
}

// The max of v over the block (blockDim.x a multiple of 32, <= 1024); every thread gets it. fmaxf skips a NaN (callers
// that must see NaN carry it in a sum). smem: 32 floats; barriers as in block_sum.
__device__ __forceinline__ float block_max(float v, float* smem) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  return warp_max(lane < nwarps ? smem[lane] : neg_inf());
}

}  // namespace gptkernels
