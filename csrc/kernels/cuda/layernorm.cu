// LayerNorm / RMSNorm forward and backward, optionally fused with a residual add. Both directions are
// memory-bound: the fast paths hold a whole row in registers so that every (M, N) tensor crosses DRAM
// exactly once; rows too long for registers take a row-loop fallback that re-reads the row (from L2 when the
// rows in flight fit there).
//
// Thread layout of the fast paths: a row is cut into nvec = N / VEC vectors of VEC elements (16 bytes when
// the row and every pointer allow it, else one element). Thread t of a block owns vectors t, t + threads,
// ..., t + (K-1) * threads, so each of the K loads of a warp is one contiguous, coalesced segment.
//
// Rows the fast paths take (wider rows go to the row-loop kernels):
//   forward:  N <= 32768 (fp16/bf16 in 16-byte vectors), 16384 (fp32 in vectors), 8192 (element-wise)
//   backward: N <= 8192 (fp16/bf16 in vectors), 4096 (fp32 in vectors, or element-wise)
// Vectors need N % (16 / elsize) == 0 and 16-byte aligned pointers; otherwise the element-wise variants run.
#include "layernorm.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace gptkernels {
namespace {

// kWarp, kMaxGrid, warp_sum, block_sum, round_up, min64, aligned16: common.cuh.
constexpr int kMaxThreads = 1024;
// Backward row-loop fallback: 2 blocks of 512 threads per SM keep two rows in flight per SM.
constexpr int kBwdLargeThreads = 512;
// Final dw/db reduction: 32 columns (one 128-byte line per partial row) x 32 row groups per block.
constexpr int kReduceRows = 32;

// ---------------------------------------------------------------------------------------------------------
// Element access. Rows live in registers as packed 32-bit words of the storage type (a 16-byte vector is
// 4 registers whatever the dtype) and are widened to fp32 where used, so K = 8 vectors of bf16 cost 32
// registers, not 64. Packing by hand matters: an array of __nv_bfloat16 is split by the compiler into one
// register per 16-bit element, which doubled the footprint and spilled.

// bits: the element's bit pattern in the low sizeof(T) bytes.
template <typename T>
__device__ __forceinline__ float bits_to_float(uint32_t bits);
template <>
__device__ __forceinline__ float bits_to_float<float>(uint32_t bits) {
  return __uint_as_float(bits);
}
template <>
__device__ __forceinline__ float bits_to_float<__half>(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}
template <>
__device__ __forceinline__ float bits_to_float<__nv_bfloat16>(uint32_t bits) {
  return __uint_as_float(bits << 16);
}

// Round to nearest even, as PyTorch's fp32 -> half / bfloat16 casts do.
template <typename T>
__device__ __forceinline__ uint32_t float_to_bits(float v);
template <>
__device__ __forceinline__ uint32_t float_to_bits<float>(float v) {
  return __float_as_uint(v);
}
template <>
__device__ __forceinline__ uint32_t float_to_bits<__half>(float v) {
  return __half_as_ushort(__float2half_rn(v));
}
template <>
__device__ __forceinline__ uint32_t float_to_bits<__nv_bfloat16>(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// VEC elements of T: VEC == 1, or 16 bytes moved by one instruction.
template <typename T, int VEC>
struct Pack {
  static_assert(VEC == 1 || sizeof(T) * VEC == 16, "Pack: one element or 16 bytes");
  static constexpr int kWords = VEC == 1 ? 1 : 4;
  uint32_t w[kWords];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> zero_pack() {
  Pack<T, VEC> r;
#pragma unroll
  for (int i = 0; i < Pack<T, VEC>::kWords; ++i) r.w[i] = 0u;  // +0.0 in every dtype
  return r;
}

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
  Pack<T, VEC> r;
  if constexpr (VEC > 1) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    r.w[0] = u.x;
    r.w[1] = u.y;
    r.w[2] = u.z;
    r.w[3] = u.w;
  } else if constexpr (sizeof(T) == 4) {
    r.w[0] = *reinterpret_cast<const uint32_t*>(p);
  } else {
    r.w[0] = *reinterpret_cast<const unsigned short*>(p);
  }
  return r;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& r) {
  if constexpr (VEC > 1) {
    *reinterpret_cast<uint4*>(p) = make_uint4(r.w[0], r.w[1], r.w[2], r.w[3]);
  } else if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<uint32_t*>(p) = r.w[0];
  } else {
    *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(r.w[0]);
  }
}

// Element j of a pack, as fp32 (j is a compile-time constant after unrolling).
template <typename T, int VEC>
__device__ __forceinline__ float get(const Pack<T, VEC>& r, int j) {
  if constexpr (sizeof(T) == 4) {
    return bits_to_float<T>(r.w[j]);
  } else {
    return bits_to_float<T>(j % 2 ? r.w[j / 2] >> 16 : r.w[j / 2] & 0xffffu);
  }
}

// The pack holding f rounded to T.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> pack(const float (&f)[VEC]) {
  Pack<T, VEC> r;
  if constexpr (sizeof(T) == 4 || VEC == 1) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) r.w[j] = float_to_bits<T>(f[j]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) r.w[i] = float_to_bits<T>(f[2 * i]) | (float_to_bits<T>(f[2 * i + 1]) << 16);
  }
  return r;
}

// fp32 weights/bias for one vector: VEC floats, one or two 16-byte loads (16-byte aligned whenever VEC > 1).
template <int VEC>
struct alignas(VEC == 1 ? 4 : 16) FVec {
  float v[VEC];
};

template <int VEC>
__device__ __forceinline__ FVec<VEC> load_fvec(const float* p) {
  return *reinterpret_cast<const FVec<VEC>*>(p);
}
template <int VEC>
__device__ __forceinline__ void store_fvec(float* p, const FVec<VEC>& v) {
  *reinterpret_cast<FVec<VEC>*>(p) = v;
}

// ---------------------------------------------------------------------------------------------------------
// Forward, row in registers. One row per block at a time, grid-stride over rows.
// Reads x (+ residual) once, writes y (+ h) once: (2 + 2 * has_residual) * M * N * elsize, plus 4 or 8
// bytes of statistics per row; weight and bias (N * 4 bytes each) are re-read from L2/L1 by every row.
// Requires N / VEC <= K * blockDim.x, N % VEC == 0, blockDim.x <= MAXT.
template <typename T, int VEC, int K, int MAXT>
__global__ void __launch_bounds__(MAXT)
    layernorm_fwd_kernel(const T* x, const T* residual, const float* weight, const float* bias, T* y, T* h,
                         float* mean, float* rstd, int64_t M, int N, float eps, bool rms) {
  using P = Pack<T, VEC>;
  __shared__ float smem[kWarp];
  const int nvec = N / VEC;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const int64_t base = row * N;
    // All K loads of x, then all K of residual, before the first use: K (or 2K) 16-byte loads in flight.
    P hv[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = threadIdx.x + k * blockDim.x;
      hv[k] = c < nvec ? load_pack<T, VEC>(x + base + c * VEC) : zero_pack<T, VEC>();
    }
    if (residual != nullptr) {
      P rv[K];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int c = threadIdx.x + k * blockDim.x;
        rv[k] = c < nvec ? load_pack<T, VEC>(residual + base + c * VEC) : zero_pack<T, VEC>();
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int c = threadIdx.x + k * blockDim.x;
        if (c < nvec) {
          // Rounded to T before the statistics, so they describe exactly the h that is stored.
          float f[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) f[j] = get(hv[k], j) + get(rv[k], j);
          hv[k] = pack<T, VEC>(f);
          store_pack(h + base + c * VEC, hv[k]);
        }
      }
    }

    // Padding lanes hold zeros, which add nothing to sum(h) or sum(h^2).
    float s[1] = {0.f};
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float f = get(hv[k], j);
        s[0] += rms ? f * f : f;
      }
    }
    block_sum(s, smem);
    float mu = 0.f;
    float rs;
    if (rms) {
      rs = rsqrtf(s[0] / N + eps);
    } else {
      // Two-pass variance on the register-held row: no cancellation when |mean| >> std.
      mu = s[0] / N;
      float q[1] = {0.f};
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int c = threadIdx.x + k * blockDim.x;
        if (c < nvec) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const float d = get(hv[k], j) - mu;
            q[0] += d * d;
          }
        }
      }
      block_sum(q, smem);
      rs = rsqrtf(q[0] / N + eps);
    }
    if (threadIdx.x == 0) {
      if (mean && !rms) mean[row] = mu;
      if (rstd) rstd[row] = rs;
    }

#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = threadIdx.x + k * blockDim.x;
      if (c < nvec) {
        const FVec<VEC> wv = load_fvec<VEC>(weight + c * VEC);
        float f[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) f[j] = (get(hv[k], j) - mu) * rs * wv.v[j];
        if (bias != nullptr) {
          const FVec<VEC> bv = load_fvec<VEC>(bias + c * VEC);
#pragma unroll
          for (int j = 0; j < VEC; ++j) f[j] += bv.v[j];
        }
        store_pack(y + base + c * VEC, pack<T, VEC>(f));
      }
    }
  }
}

// Forward fallback for rows that do not fit in registers: three passes over the row in global memory.
// Pass 1 reads x (+ residual, writing h), pass 2 (LayerNorm only) and pass 3 re-read h (or x), pass 3 writes
// y. DRAM traffic is the fast path's when the rows in flight fit in L2; each thread re-reads only addresses
// it wrote itself, so no fence is needed between the passes.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    layernorm_fwd_large_kernel(const T* x, const T* residual, const float* weight, const float* bias, T* y,
                               T* h, float* mean, float* rstd, int64_t M, int64_t N, float eps, bool rms) {
  using P = Pack<T, VEC>;
  __shared__ float smem[kWarp];
  const int64_t nvec = N / VEC;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const int64_t base = row * N;
    const T* src = residual != nullptr ? h + base : x + base;  // the row h after pass 1

    float s[1] = {0.f};
#pragma unroll 4
    for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x) {
      P a = load_pack<T, VEC>(x + base + c * VEC);
      if (residual != nullptr) {
        const P r = load_pack<T, VEC>(residual + base + c * VEC);
        float f[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) f[j] = get(a, j) + get(r, j);
        a = pack<T, VEC>(f);
        store_pack(h + base + c * VEC, a);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float f = get(a, j);
        s[0] += rms ? f * f : f;
      }
    }
    block_sum(s, smem);
    float mu = 0.f;
    float rs;
    if (rms) {
      rs = rsqrtf(s[0] / N + eps);
    } else {
      mu = s[0] / N;
      float q[1] = {0.f};
#pragma unroll 4
      for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x) {
        const P a = load_pack<T, VEC>(src + c * VEC);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = get(a, j) - mu;
          q[0] += d * d;
        }
      }
      block_sum(q, smem);
      rs = rsqrtf(q[0] / N + eps);
    }
    if (threadIdx.x == 0) {
      if (mean && !rms) mean[row] = mu;
      if (rstd) rstd[row] = rs;
    }

#pragma unroll 4
    for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x) {
      const P a = load_pack<T, VEC>(src + c * VEC);
      const FVec<VEC> wv = load_fvec<VEC>(weight + c * VEC);
      float f[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) f[j] = (get(a, j) - mu) * rs * wv.v[j];
      if (bias != nullptr) {
        const FVec<VEC> bv = load_fvec<VEC>(bias + c * VEC);
#pragma unroll
        for (int j = 0; j < VEC; ++j) f[j] += bv.v[j];
      }
      store_pack(y + base + c * VEC, pack<T, VEC>(f));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward, row in registers. gridDim.x = G <= M blocks; block g handles rows g, g + G, ...; its columns'
// dw/db sums stay in registers across those rows and are written once, as row g of the partials (G, N).
// Reads dy, hin (+ dh) once, writes dx once: (3 + has_dh) * M * N * elsize, plus 2 * G * N * 4 bytes of
// partials (written here, read by layernorm_bwd_reduce_kernel). The next row's dy and hin are loaded before
// this row's block reduction, so they are in flight while the block waits at the barriers.
// Requires N / VEC <= K * blockDim.x, N % VEC == 0.
template <typename T, int VEC, int K>
__global__ void __launch_bounds__(kMaxThreads)
    layernorm_bwd_kernel(const T* dy, const T* dh, const T* hin, const float* weight, const float* mean,
                         const float* rstd, T* dx, float* part_w, float* part_b, int64_t M, int N, bool rms) {
  using P = Pack<T, VEC>;
  __shared__ float smem[2 * kWarp];
  const int nvec = N / VEC;
  const int64_t G = gridDim.x;

  float wr[K][VEC];  // weight of this thread's columns, constant over rows
  float aw[K][VEC];  // sum over this block's rows of dy * xhat
  float ab[K][VEC];  // sum over this block's rows of dy
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = threadIdx.x + k * blockDim.x;
    FVec<VEC> wv;
    if (c < nvec) {
      wv = load_fvec<VEC>(weight + c * VEC);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) wv.v[j] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      wr[k][j] = wv.v[j];
      aw[k][j] = 0.f;
      ab[k][j] = 0.f;
    }
  }

  int64_t row = blockIdx.x;
  P dyc[K];
  P hc[K];
  float mu = 0.f;
  float rs = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = threadIdx.x + k * blockDim.x;
    const bool ok = row < M && c < nvec;
    dyc[k] = ok ? load_pack<T, VEC>(dy + row * N + c * VEC) : zero_pack<T, VEC>();
    hc[k] = ok ? load_pack<T, VEC>(hin + row * N + c * VEC) : zero_pack<T, VEC>();
  }
  if (row < M) {
    if (!rms) mu = mean[row];
    rs = rstd[row];
  }

  for (; row < M; row += G) {
    const int64_t base = row * N;
    const int64_t next = row + G;
    P dyn[K];
    P hn[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = threadIdx.x + k * blockDim.x;
      const bool ok = next < M && c < nvec;
      dyn[k] = ok ? load_pack<T, VEC>(dy + next * N + c * VEC) : zero_pack<T, VEC>();
      hn[k] = ok ? load_pack<T, VEC>(hin + next * N + c * VEC) : zero_pack<T, VEC>();
    }
    float mun = 0.f;
    float rsn = 0.f;
    if (next < M) {
      if (!rms) mun = mean[next];
      rsn = rstd[next];
    }
    // dh is only needed after the reduction; issuing it now hides its latency behind the barriers.
    P dhv[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = threadIdx.x + k * blockDim.x;
      dhv[k] = dh != nullptr && c < nvec ? load_pack<T, VEC>(dh + base + c * VEC) : zero_pack<T, VEC>();
    }

    float s[2] = {0.f, 0.f};  // sum_j wdy, sum_j wdy * xhat
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = threadIdx.x + k * blockDim.x;
      if (c < nvec) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = get(dyc[k], j);
          const float xh = (get(hc[k], j) - mu) * rs;
          const float wdy = wr[k][j] * d;
          s[0] += wdy;
          s[1] += wdy * xh;
          aw[k][j] += d * xh;
          ab[k][j] += d;
        }
      }
    }
    block_sum(s, smem);
    const float c1 = rms ? 0.f : s[0] / N;
    const float c2 = s[1] / N;

#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = threadIdx.x + k * blockDim.x;
      if (c < nvec) {
        float g[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float xh = (get(hc[k], j) - mu) * rs;
          const float wdy = wr[k][j] * get(dyc[k], j);
          g[j] = rs * (wdy - c1 - xh * c2) + get(dhv[k], j);
        }
        store_pack(dx + base + c * VEC, pack<T, VEC>(g));
      }
    }

#pragma unroll
    for (int k = 0; k < K; ++k) {
      dyc[k] = dyn[k];
      hc[k] = hn[k];
    }
    mu = mun;
    rs = rsn;
  }

  const int64_t prow = static_cast<int64_t>(blockIdx.x) * N;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = threadIdx.x + k * blockDim.x;
    if (c < nvec) {
      FVec<VEC> pw;
      FVec<VEC> pb;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        pw.v[j] = aw[k][j];
        pb.v[j] = ab[k][j];
      }
      store_fvec(part_w + prow + c * VEC, pw);
      if (part_b != nullptr) store_fvec(part_b + prow + c * VEC, pb);
    }
  }
}

// Backward fallback for long rows: pass 1 reads dy and hin, adds this row into the block's own partial rows
// (read-modify-write of row g of part_w/part_b; no other block touches it, so no atomics), and sums the two
// row reductions; pass 2 re-reads dy, hin (+ dh) and writes dx. Each thread re-reads only addresses it wrote
// itself, so the partials need no fence between rows.
template <typename T, int VEC>
__global__ void __launch_bounds__(kBwdLargeThreads)
    layernorm_bwd_large_kernel(const T* dy, const T* dh, const T* hin, const float* weight, const float* mean,
                               const float* rstd, T* dx, float* part_w, float* part_b, int64_t M, int64_t N,
                               bool rms) {
  using P = Pack<T, VEC>;
  __shared__ float smem[2 * kWarp];
  const int64_t nvec = N / VEC;
  float* pw_row = part_w + static_cast<int64_t>(blockIdx.x) * N;
  float* pb_row = part_b != nullptr ? part_b + static_cast<int64_t>(blockIdx.x) * N : nullptr;
  for (int64_t row = blockIdx.x; row < M; row += gridDim.x) {
    const int64_t base = row * N;
    const bool first = row == blockIdx.x;  // the partial rows hold garbage until this row stores them
    const float mu = rms ? 0.f : mean[row];
    const float rs = rstd[row];

    float s[2] = {0.f, 0.f};
#pragma unroll 2
    for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x) {
      const P d = load_pack<T, VEC>(dy + base + c * VEC);
      const P a = load_pack<T, VEC>(hin + base + c * VEC);
      const FVec<VEC> wv = load_fvec<VEC>(weight + c * VEC);
      FVec<VEC> pw;
      FVec<VEC> pb;
      if (first) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) pw.v[j] = pb.v[j] = 0.f;
      } else {
        pw = load_fvec<VEC>(pw_row + c * VEC);
        if (pb_row != nullptr) pb = load_fvec<VEC>(pb_row + c * VEC);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float df = get(d, j);
        const float xh = (get(a, j) - mu) * rs;
        const float wdy = wv.v[j] * df;
        s[0] += wdy;
        s[1] += wdy * xh;
        pw.v[j] += df * xh;
        pb.v[j] += df;
      }
      store_fvec(pw_row + c * VEC, pw);
      if (pb_row != nullptr) store_fvec(pb_row + c * VEC, pb);
    }
    block_sum(s, smem);
    const float c1 = rms ? 0.f : s[0] / N;
    const float c2 = s[1] / N;

#pragma unroll 2
    for (int64_t c = threadIdx.x; c < nvec; c += blockDim.x) {
      const P d = load_pack<T, VEC>(dy + base + c * VEC);
      const P a = load_pack<T, VEC>(hin + base + c * VEC);
      const P e = dh != nullptr ? load_pack<T, VEC>(dh + base + c * VEC) : zero_pack<T, VEC>();
      const FVec<VEC> wv = load_fvec<VEC>(weight + c * VEC);
      float g[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float xh = (get(a, j) - mu) * rs;
        const float wdy = wv.v[j] * get(d, j);
        g[j] = rs * (wdy - c1 - xh * c2) + get(e, j);
      }
      store_pack(dx + base + c * VEC, pack<T, VEC>(g));
    }
  }
}

// dw[n] = sum_g part_w[g, n] (and db from part_b) for the G partial rows of the backward, in a fixed order:
// thread (tx, ty) sums rows ty, ty + 32, ... of column n, then row ty == 0 adds the 32 sums in ty order.
// Reads 2 * G * N * 4 bytes, writes 2 * N * 4. Block (32, kReduceRows), grid-stride over 32-column tiles.
__global__ void __launch_bounds__(kWarp* kReduceRows)
    layernorm_bwd_reduce_kernel(const float* part_w, const float* part_b, float* dw, float* db, int G, int64_t N) {
  __shared__ float sw[kReduceRows][kWarp + 1];
  __shared__ float sb[kReduceRows][kWarp + 1];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarp; tile < N;
       tile += static_cast<int64_t>(gridDim.x) * kWarp) {
    const int64_t n = tile + tx;
    float aw = 0.f;
    float ab = 0.f;
    if (n < N) {
#pragma unroll 4
      for (int g = ty; g < G; g += kReduceRows) {
        aw += part_w[static_cast<int64_t>(g) * N + n];
        if (db != nullptr) ab += part_b[static_cast<int64_t>(g) * N + n];
      }
    }
    sw[ty][tx] = aw;
    sb[ty][tx] = ab;
    __syncthreads();
    if (ty == 0 && n < N) {
      float tw = 0.f;
      float tb = 0.f;
#pragma unroll
      for (int r = 0; r < kReduceRows; ++r) {
        tw += sw[r][tx];
        tb += sb[r][tx];
      }
      dw[n] = tw;
      if (db != nullptr) db[n] = tb;
    }
    __syncthreads();  // sw/sb are rewritten by the next tile
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side.

// Threads for K vectors per thread: a multiple of 32, at least one warp.
int64_t threads_for(int64_t nvec, int k) {
  const int64_t t = round_up((nvec + k - 1) / k, kWarp);
  return t < kWarp ? kWarp : t;
}

// Block-size cap of each forward instantiation, also its __launch_bounds__ (ptxas then fits it in
// 65536 / cap registers per thread). K = 8 vectors of 16 bytes takes 94 registers for sm_90 (ptxas, CUDA
// 13.0; it spilled when held to 64), so it is capped at 512 threads; every other forward instantiation fits
// in 64 registers without spilling at 1024.
constexpr int fwd_max_threads(int vec, int k) { return vec > 1 && k == 8 ? 512 : kMaxThreads; }

// Forward fast-path config for a row of nvec vectors; false when no K fits it (then the row-loop kernel).
// Rule: the largest K whose block has >= 128 threads (enough warps to cover one row's latency) with at most
// 1/8 of the K * threads slots idle; when none qualifies (short rows), the K with the fewest idle slots,
// larger K on ties. Short rows therefore get one- to three-warp blocks and more rows in flight per SM.
bool pick_fwd_config(int64_t nvec, int vec, int* k_out, int* threads_out) {
  int best_k = 0;
  int64_t best_t = 0;
  int64_t best_waste = 0;
  for (int k = 8; k >= 1; k /= 2) {
    const int64_t t = threads_for(nvec, k);
    if (t > fwd_max_threads(vec, k)) continue;
    const int64_t waste = t * k - nvec;
    if (t >= 128 && waste * 8 <= nvec) {
      *k_out = k;
      *threads_out = static_cast<int>(t);
      return true;
    }
    if (best_k == 0 || waste < best_waste) {
      best_k = k;
      best_t = t;
      best_waste = waste;
    }
  }
  if (best_k == 0) return false;
  *k_out = best_k;
  *threads_out = static_cast<int>(best_t);
  return true;
}

// Backward fast path: vectors per thread allowed at 1024 threads (64 registers). Each column costs about
// 5.5 (16-bit) to 8 (fp32) registers across the row loop (weight, dw and db sums, current and prefetched
// dy/hin); one 16-byte vector, or four single elements, is what fits without spilling (ptxas for sm_80
// and sm_90, CUDA 13.0: 58-64 registers; fp32 with two vectors spilled).
constexpr int bwd_max_k(int vec) { return vec > 1 ? 1 : 4; }

// Backward fast-path config: the smallest K (fewest columns, hence registers, per thread) that fits the row
// in 1024 threads; false when none does (then the row-loop kernel).
bool pick_bwd_config(int64_t nvec, int vec, int* k_out, int* threads_out) {
  for (int k = 1; k <= bwd_max_k(vec); k *= 2) {
    const int64_t t = threads_for(nvec, k);
    if (t <= kMaxThreads) {
      *k_out = k;
      *threads_out = static_cast<int>(t);
      return true;
    }
  }
  return false;
}

// Upper bound on backward blocks, hence on workspace rows. Up to 16 blocks per SM for short rows (where the
// workspace is small and one short row per block leaves an SM idle between barriers), 2 per SM from
// N = 4096 up, so that the partials (2 * G * N * 4 bytes, written then re-read) stay a small fraction of
// the 3 * M * N * elsize the backward must move.
int64_t bwd_max_blocks(int64_t M, int64_t N, int sm_count) {
  int64_t per_sm = 8192 / N;
  per_sm = per_sm < 2 ? 2 : (per_sm > 16 ? 16 : per_sm);
  return min64(M, static_cast<int64_t>(sm_count) * per_sm);
}

template <typename T, int VEC, int K>
void fwd_fast_launch(const T* x, const T* residual, const float* weight, const float* bias, T* y, T* h,
                     float* mean, float* rstd, int64_t M, int64_t N, float eps, bool rms, unsigned grid,
                     int threads, cudaStream_t stream) {
  layernorm_fwd_kernel<T, VEC, K, fwd_max_threads(VEC, K)><<<grid, threads, 0, stream>>>(
      x, residual, weight, bias, y, h, mean, rstd, M, static_cast<int>(N), eps, rms);
}

template <typename T, int VEC>
cudaError_t fwd_launch(const T* x, const T* residual, const float* weight, const float* bias, T* y, T* h,
                       float* mean, float* rstd, int64_t M, int64_t N, float eps, bool rms, cudaStream_t stream) {
  // One row per block (grid-stride past 2^31 - 1 rows): the hardware scheduler balances the rows.
  const unsigned grid = static_cast<unsigned>(min64(M, kMaxGrid));
  int k = 0;
  int threads = 0;
  if (!pick_fwd_config(N / VEC, VEC, &k, &threads)) {
    layernorm_fwd_large_kernel<T, VEC>
        <<<grid, kMaxThreads, 0, stream>>>(x, residual, weight, bias, y, h, mean, rstd, M, N, eps, rms);
  } else if (k == 1) {
    fwd_fast_launch<T, VEC, 1>(x, residual, weight, bias, y, h, mean, rstd, M, N, eps, rms, grid, threads, stream);
  } else if (k == 2) {
    fwd_fast_launch<T, VEC, 2>(x, residual, weight, bias, y, h, mean, rstd, M, N, eps, rms, grid, threads, stream);
  } else if (k == 4) {
    fwd_fast_launch<T, VEC, 4>(x, residual, weight, bias, y, h, mean, rstd, M, N, eps, rms, grid, threads, stream);
  } else {
    fwd_fast_launch<T, VEC, 8>(x, residual, weight, bias, y, h, mean, rstd, M, N, eps, rms, grid, threads, stream);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_typed(const void* x, const void* residual, const float* weight, const float* bias, void* y,
                      void* h, float* mean, float* rstd, int64_t M, int64_t N, float eps, bool rms,
                      cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  // With N % kVec == 0, 16-byte aligned bases keep every row's vectors 16-byte aligned (and the weight and
  // bias vectors, 4 * kVec bytes apart).
  const bool vec_ok = N % kVec == 0 && aligned16(x) && aligned16(residual) && aligned16(y) &&
                      (residual == nullptr || aligned16(h)) && aligned16(weight) && aligned16(bias);
  const T* xt = static_cast<const T*>(x);
  const T* rt = static_cast<const T*>(residual);
  T* yt = static_cast<T*>(y);
  T* ht = static_cast<T*>(h);
  if (vec_ok) return fwd_launch<T, kVec>(xt, rt, weight, bias, yt, ht, mean, rstd, M, N, eps, rms, stream);
  return fwd_launch<T, 1>(xt, rt, weight, bias, yt, ht, mean, rstd, M, N, eps, rms, stream);
}

// Grid of the backward: as many blocks as are resident on the GPU at once (a block holds its partial sums
// until its last row, so a second wave would run after the first instead of balancing it), capped by the
// workspace bound.
template <typename Kernel>
cudaError_t bwd_grid(Kernel kernel, int threads, int64_t M, int64_t N, int sm_count, int* grid) {
  int per_sm = 0;
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0);
  if (err != cudaSuccess) return err;
  if (per_sm < 1) return cudaErrorLaunchOutOfResources;
  *grid = static_cast<int>(min64(bwd_max_blocks(M, N, sm_count), static_cast<int64_t>(sm_count) * per_sm));
  return cudaSuccess;
}

template <typename T, int VEC, int K>
cudaError_t bwd_fast_launch(const T* dy, const T* dh, const T* hin, const float* weight, const float* mean,
                            const float* rstd, T* dx, float* workspace, int64_t M, int64_t N, bool rms,
                            int sm_count, int threads, bool want_db, cudaStream_t stream, int* grid) {
  const auto kernel = layernorm_bwd_kernel<T, VEC, K>;
  const cudaError_t err = bwd_grid(kernel, threads, M, N, sm_count, grid);
  if (err != cudaSuccess) return err;
  float* part_b = want_db ? workspace + static_cast<int64_t>(*grid) * N : nullptr;
  kernel<<<*grid, threads, 0, stream>>>(dy, dh, hin, weight, mean, rstd, dx, workspace, part_b, M,
                                        static_cast<int>(N), rms);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t bwd_launch(const T* dy, const T* dh, const T* hin, const float* weight, const float* mean,
                       const float* rstd, T* dx, float* dw, float* db, float* workspace, int64_t M, int64_t N,
                       bool rms, int sm_count, cudaStream_t stream) {
  const bool want_db = db != nullptr;
  int grid = 0;
  int k = 0;
  int threads = 0;
  cudaError_t err = cudaErrorInvalidValue;
  if (pick_bwd_config(N / VEC, VEC, &k, &threads)) {
    // Only the K <= bwd_max_k(VEC) that pick_bwd_config can return are instantiated.
    if (k == 1) {
      err = bwd_fast_launch<T, VEC, 1>(dy, dh, hin, weight, mean, rstd, dx, workspace, M, N, rms, sm_count,
                                       threads, want_db, stream, &grid);
    } else if (k == 2) {
      if constexpr (bwd_max_k(VEC) >= 2)
        err = bwd_fast_launch<T, VEC, 2>(dy, dh, hin, weight, mean, rstd, dx, workspace, M, N, rms, sm_count,
                                         threads, want_db, stream, &grid);
    } else {
      if constexpr (bwd_max_k(VEC) >= 4)
        err = bwd_fast_launch<T, VEC, 4>(dy, dh, hin, weight, mean, rstd, dx, workspace, M, N, rms, sm_count,
                                         threads, want_db, stream, &grid);
    }
  } else {
    const auto kernel = layernorm_bwd_large_kernel<T, VEC>;
    err = bwd_grid(kernel, kBwdLargeThreads, M, N, sm_count, &grid);
    if (err == cudaSuccess) {
      float* part_b = want_db ? workspace + static_cast<int64_t>(grid) * N : nullptr;
      kernel<<<grid, kBwdLargeThreads, 0, stream>>>(dy, dh, hin, weight, mean, rstd, dx, workspace, part_b, M, N,
                                                    rms);
      err = cudaGetLastError();
    }
  }
  if (err != cudaSuccess) return err;

  const unsigned rgrid = static_cast<unsigned>(min64((N + kWarp - 1) / kWarp, 65535));
  layernorm_bwd_reduce_kernel<<<rgrid, dim3(kWarp, kReduceRows), 0, stream>>>(
      workspace, want_db ? workspace + static_cast<int64_t>(grid) * N : nullptr, dw, db, grid, N);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const void* dy, const void* dh, const void* hin, const float* weight, const float* mean,
                      const float* rstd, void* dx, float* dw, float* db, float* workspace, int64_t M, int64_t N,
                      bool rms, int sm_count, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  // The partial rows are written kVec floats at a time, so the workspace must be 16-byte aligned too.
  const bool vec_ok = N % kVec == 0 && aligned16(dy) && aligned16(dh) && aligned16(hin) && aligned16(dx) &&
                      aligned16(weight) && aligned16(workspace);
  const T* dyt = static_cast<const T*>(dy);
  const T* dht = static_cast<const T*>(dh);
  const T* ht = static_cast<const T*>(hin);
  T* dxt = static_cast<T*>(dx);
  if (vec_ok) {
    return bwd_launch<T, kVec>(dyt, dht, ht, weight, mean, rstd, dxt, dw, db, workspace, M, N, rms, sm_count,
                               stream);
  }
  return bwd_launch<T, 1>(dyt, dht, ht, weight, mean, rstd, dxt, dw, db, workspace, M, N, rms, sm_count, stream);
}

}  // namespace

cudaError_t launch_layernorm_fwd(DType dtype, const void* x, const void* residual, const float* weight,
                                 const float* bias, void* y, void* h, float* mean, float* rstd, int64_t M,
                                 int64_t N, float eps, bool rms, cudaStream_t stream) {
  if (M < 0 || N <= 0) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  if (x == nullptr || weight == nullptr || y == nullptr || rstd == nullptr) return cudaErrorInvalidValue;
  if (!rms && mean == nullptr) return cudaErrorInvalidValue;
  if (residual != nullptr && h == nullptr) return cudaErrorInvalidValue;
  if (M > INT64_MAX / N) return cudaErrorInvalidValue;  // M * N must be addressable
  switch (dtype) {
    case DType::kFloat32:
      return fwd_typed<float>(x, residual, weight, bias, y, h, mean, rstd, M, N, eps, rms, stream);
    case DType::kFloat16:
      return fwd_typed<__half>(x, residual, weight, bias, y, h, mean, rstd, M, N, eps, rms, stream);
    case DType::kBFloat16:
      return fwd_typed<__nv_bfloat16>(x, residual, weight, bias, y, h, mean, rstd, M, N, eps, rms, stream);
  }
  return cudaErrorInvalidValue;
}

size_t layernorm_bwd_workspace_bytes(int64_t M, int64_t N, int sm_count) {
  if (M <= 0 || N <= 0 || sm_count <= 0) return 0;
  return 2 * static_cast<size_t>(bwd_max_blocks(M, N, sm_count)) * static_cast<size_t>(N) * sizeof(float);
}

cudaError_t launch_layernorm_bwd(DType dtype, const void* dy, const void* dh, const void* hin,
                                 const float* weight, const float* mean, const float* rstd, void* dx,
                                 float* dw, float* db, float* workspace, int64_t M, int64_t N, bool rms,
                                 int sm_count, cudaStream_t stream) {
  if (M < 0 || N <= 0 || dw == nullptr) return cudaErrorInvalidValue;
  if (M == 0) {
    // The sum over no rows is zero; no kernel runs.
    const size_t bytes = static_cast<size_t>(N) * sizeof(float);
    cudaError_t err = cudaMemsetAsync(dw, 0, bytes, stream);
    if (err == cudaSuccess && db != nullptr) err = cudaMemsetAsync(db, 0, bytes, stream);
    return err;
  }
  if (dy == nullptr || hin == nullptr || weight == nullptr || rstd == nullptr || dx == nullptr ||
      workspace == nullptr || sm_count <= 0)
    return cudaErrorInvalidValue;
  if (!rms && mean == nullptr) return cudaErrorInvalidValue;
  if (M > INT64_MAX / N) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return bwd_typed<float>(dy, dh, hin, weight, mean, rstd, dx, dw, db, workspace, M, N, rms, sm_count, stream);
    case DType::kFloat16:
      return bwd_typed<__half>(dy, dh, hin, weight, mean, rstd, dx, dw, db, workspace, M, N, rms, sm_count, stream);
    case DType::kBFloat16:
      return bwd_typed<__nv_bfloat16>(dy, dh, hin, weight, mean, rstd, dx, dw, db, workspace, M, N, rms, sm_count,
                                      stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gptkernels
