// Weight-only quantized linear on the GPU: a GEMV / skinny GEMM for decode (M <= 16 per launch) and the dequantize
// kernel of the large-M path. Formats: csrc/kernels/cpu/qlinear.h.
//
// GEMV: one warp per output row n. Lane l reads 16-byte vectors of row n (16 int8 weights, or one 16-byte int4 block
// = 32 weights), 512 contiguous bytes per warp and step (coalesced, read once: __ldg), converts them to fp32 in
// registers with the group's scale, and multiplies them into the MT rows of x (fp32 accumulators, one per row of x;
// x is M*K elements, L1/L2-resident across the block's warps). A warp_sum per row of x finishes the dot products.
// Bytes: N*K (int8) or N*K/2 (int4) of weight + N*K/group*4 of scales, once per 16 rows of x.
// int8 with K or group_size not a multiple of 16 takes a scalar variant (one byte per lane and step).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "qlinear.cuh"

namespace gptkernels {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kMaxRowsPerLaunch = 16;

// 16 consecutive elements of T at p (16-byte aligned) as fp32: 4 (fp32) or 2 (16-bit) 16-byte loads.
template <typename T>
__device__ __forceinline__ void load16(const T* p, float (&f)[16]) {
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float4 v = *reinterpret_cast<const float4*>(p + 4 * i);
      f[4 * i] = v.x;
      f[4 * i + 1] = v.y;
      f[4 * i + 2] = v.z;
      f[4 * i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint4 v = *reinterpret_cast<const uint4*>(p + 8 * i);
      const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
      for (int j = 0; j < 8; ++j) f[8 * i + j] = to_f<T>(e[j]);
    }
  }
}

// Byte j (0..15) of a 16-byte vector, as an unsigned value.
__device__ __forceinline__ uint32_t byte_of(const uint4& v, int j) {
  const uint32_t w = j < 4 ? v.x : j < 8 ? v.y : j < 12 ? v.z : v.w;
  return (w >> (8 * (j % 4))) & 0xffu;
}

template <typename T, int MT>
__device__ __forceinline__ void finish(float (&acc)[MT], int M, int64_t N, int64_t n, const float* bias, T* y) {
  const float b = bias != nullptr ? bias[n] : 0.f;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const float v = warp_sum(acc[m]);
    if (threadIdx.x % kWarp == 0 && m < M) y[m * N + n] = from_f<T>(v + b);
  }
}

// int8, K and group multiples of 16: 16 weights per lane and step.
template <typename T, int MT>
__global__ void qlinear_i8_vec_kernel(const T* __restrict__ x, const int8_t* __restrict__ q,
                                      const float* __restrict__ scales, const float* __restrict__ bias,
                                      T* __restrict__ y, int M, int64_t N, int64_t K, int64_t group) {
  const int64_t n = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (n >= N) return;
  const int lane = threadIdx.x % kWarp;
  const int8_t* qr = q + n * K;
  const float* sr = scales + n * (K / group);
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;
  for (int64_t k = int64_t(lane) * 16; k < K; k += kWarp * 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(qr + k));
    const float s = __ldg(sr + k / group);
    float w[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) w[j] = float(int8_t(byte_of(raw, j))) * s;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {
        float xv[16];
        load16(x + m * K + k, xv);
#pragma unroll
        for (int j = 0; j < 16; ++j) acc[m] = fmaf(w[j], xv[j], acc[m]);
      }
    }
  }
  finish<T, MT>(acc, M, N, n, bias, y);
}

// int8, any K and group: one weight per lane and step.
template <typename T, int MT>
__global__ void qlinear_i8_scalar_kernel(const T* __restrict__ x, const int8_t* __restrict__ q,
                                         const float* __restrict__ scales, const float* __restrict__ bias,
                                         T* __restrict__ y, int M, int64_t N, int64_t K, int64_t group) {
  const int64_t n = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (n >= N) return;
  const int lane = threadIdx.x % kWarp;
  const int8_t* qr = q + n * K;
  const float* sr = scales + n * (K / group);
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;
  for (int64_t k = lane; k < K; k += kWarp) {
    const float w = float(qr[k]) * sr[k / group];
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < M) acc[m] = fmaf(w, to_f<T>(x[m * K + k]), acc[m]);
  }
  finish<T, MT>(acc, M, N, n, bias, y);
}

// int4: one 16-byte block (32 weights: byte j holds k = 32b + j low, 32b + 16 + j high, as q + 8) per lane and step.
template <typename T, int MT>
__global__ void qlinear_i4_kernel(const T* __restrict__ x, const uint8_t* __restrict__ q,
                                  const float* __restrict__ scales, const float* __restrict__ bias, T* __restrict__ y,
                                  int M, int64_t N, int64_t K, int64_t group) {
  const int64_t n = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (n >= N) return;
  const int lane = threadIdx.x % kWarp;
  const uint8_t* qr = q + n * (K / 2);
  const float* sr = scales + n * (K / group);
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;
  for (int64_t b = lane; b < K / 32; b += kWarp) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(qr + b * 16));
    const float s = __ldg(sr + b * 32 / group);
    float lo[16], hi[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int u = int(byte_of(raw, j));
      lo[j] = float((u & 15) - 8) * s;
      hi[j] = float((u >> 4) - 8) * s;
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {
        float xv[16];
        load16(x + m * K + b * 32, xv);
#pragma unroll
        for (int j = 0; j < 16; ++j) acc[m] = fmaf(lo[j], xv[j], acc[m]);
        load16(x + m * K + b * 32 + 16, xv);
#pragma unroll
        for (int j = 0; j < 16; ++j) acc[m] = fmaf(hi[j], xv[j], acc[m]);
      }
    }
  }
  finish<T, MT>(acc, M, N, n, bias, y);
}

template <typename T, int MT>
void launch_rows(int bits, bool vec, const T* x, const void* q, const float* scales, const float* bias, T* y, int M,
                 int64_t N, int64_t K, int64_t group, cudaStream_t stream) {
  const dim3 grid(unsigned(cdiv(N, kWarpsPerBlock))), block(kWarpsPerBlock * kWarp);
  if (bits == 4)
    qlinear_i4_kernel<T, MT><<<grid, block, 0, stream>>>(x, static_cast<const uint8_t*>(q), scales, bias, y, M, N, K,
                                                        group);
  else if (vec)
    qlinear_i8_vec_kernel<T, MT><<<grid, block, 0, stream>>>(x, static_cast<const int8_t*>(q), scales, bias, y, M, N,
                                                            K, group);
  else
    qlinear_i8_scalar_kernel<T, MT><<<grid, block, 0, stream>>>(x, static_cast<const int8_t*>(q), scales, bias, y, M,
                                                               N, K, group);
}

template <typename T>
cudaError_t fwd(int bits, const T* x, const void* q, const float* scales, const float* bias, T* y, int64_t M,
                int64_t N, int64_t K, int64_t group, cudaStream_t stream) {
  // Vector loads need 16-byte aligned rows: the glue passes aligned base pointers (it copies x otherwise).
  const bool vec = K % 16 == 0 && group % 16 == 0 && aligned16(x) && aligned16(q);
  if (bits == 4 && !(aligned16(x) && aligned16(q))) return cudaErrorMisalignedAddress;
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRowsPerLaunch) {
    const int mc = int(min64(kMaxRowsPerLaunch, M - m0));
    const T* xm = x + m0 * K;
    T* ym = y + m0 * N;
    // MT rounded up to a power of two: 5 instantiations per format and dtype; rows past M are skipped uniformly.
    if (mc == 1)
      launch_rows<T, 1>(bits, vec, xm, q, scales, bias, ym, mc, N, K, group, stream);
    else if (mc == 2)
      launch_rows<T, 2>(bits, vec, xm, q, scales, bias, ym, mc, N, K, group, stream);
    else if (mc <= 4)
      launch_rows<T, 4>(bits, vec, xm, q, scales, bias, ym, mc, N, K, group, stream);
    else if (mc <= 8)
      launch_rows<T, 8>(bits, vec, xm, q, scales, bias, ym, mc, N, K, group, stream);
    else
      launch_rows<T, 16>(bits, vec, xm, q, scales, bias, ym, mc, N, K, group, stream);
  }
  return cudaGetLastError();
}

// One weight byte per thread (grid-stride): int8 writes one element, int4 the two of its nibbles.
template <typename T>
__global__ void qlinear_dequant_kernel(int bits, const uint8_t* __restrict__ q, const float* __restrict__ scales,
                                       T* __restrict__ w, int64_t N, int64_t K, int64_t group) {
  const int64_t row_bytes = bits == 8 ? K : K / 2, total = N * row_bytes, G = K / group;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / row_bytes, j = i % row_bytes;
    if (bits == 8) {
      w[n * K + j] = from_f<T>(float(int8_t(q[i])) * scales[n * G + j / group]);
    } else {
      const int u = q[i];
      const int64_t k = (j / 16) * 32 + j % 16;
      const float s = scales[n * G + k / group];  // k and k + 16 share a group: group is a multiple of 32
      w[n * K + k] = from_f<T>(float((u & 15) - 8) * s);
      w[n * K + k + 16] = from_f<T>(float((u >> 4) - 8) * s);
    }
  }
}

template <typename T>
cudaError_t dequant(int bits, const void* q, const float* scales, T* w, int64_t N, int64_t K, int64_t group,
                    cudaStream_t stream) {
  const int64_t total = N * (bits == 8 ? K : K / 2);
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const unsigned blocks = unsigned(min64(cdiv(total, kThreads), 65535 * 16));
  qlinear_dequant_kernel<T><<<blocks, kThreads, 0, stream>>>(bits, static_cast<const uint8_t*>(q), scales, w, N, K,
                                                             group);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_qlinear_fwd(DType dtype, int bits, const void* x, const void* q, const float* scales,
                               const float* bias, void* y, int64_t M, int64_t N, int64_t K, int64_t group,
                               cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return fwd(bits, static_cast<const float*>(x), q, scales, bias, static_cast<float*>(y), M, N, K, group, stream);
    case DType::kFloat16:
      return fwd(bits, static_cast<const __half*>(x), q, scales, bias, static_cast<__half*>(y), M, N, K, group,
                 stream);
    case DType::kBFloat16:
      return fwd(bits, static_cast<const __nv_bfloat16*>(x), q, scales, bias, static_cast<__nv_bfloat16*>(y), M, N, K,
                 group, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_qlinear_dequant(DType dtype, int bits, const void* q, const float* scales, void* w, int64_t N,
                                   int64_t K, int64_t group, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return dequant(bits, q, scales, static_cast<float*>(w), N, K, group, stream);
    case DType::kFloat16: return dequant(bits, q, scales, static_cast<__half*>(w), N, K, group, stream);
    case DType::kBFloat16: return dequant(bits, q, scales, static_cast<__nv_bfloat16*>(w), N, K, group, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gptkernels
