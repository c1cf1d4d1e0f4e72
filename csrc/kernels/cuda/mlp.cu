// FFN epilogues on the GPU: bias + activation (GELU tanh/erf, ReLU) and SwiGLU's silu(g) * u, forward and backward.
// All four are elementwise and bandwidth-bound: each (M, N) tensor crosses DRAM once, in 16-byte vectors when the
// row length and every pointer allow it. The bias backward also reduces dbias = sum_rows(dx) in fp32: every block
// keeps per-column sums over its rows in registers, folds its threadIdx.y rows through shared memory into one
// partial row of the workspace, and a second kernel adds the partial rows in a fixed order (no atomics).
//
// Thread layout of the bias kernels: threadIdx.x / blockIdx.x walk the VEC-wide column vectors of a row (so the
// bias vector a thread needs is loaded once), threadIdx.y / blockIdx.y walk rows, grid-stride past the grid.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "mlp.cuh"

namespace gptkernels {
namespace {

constexpr int kRowsPerBlock = 4;  // blockDim.y of the bias kernels
constexpr int kMaxColThreads = 128;  // blockDim.x cap of the bias kernels
constexpr int kFlatThreads = 256;
constexpr int64_t kMaxGridY = 65535;

// ---- element access: VEC elements of T as fp32, one 16-byte instruction when VEC > 1 (to_f/from_f: convert.cuh).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T e[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[VEC]) {
  const Vec<T, VEC> v = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) f[j] = to_f<T>(v.e[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[VEC]) {
  Vec<T, VEC> v;
#pragma unroll
  for (int j = 0; j < VEC; ++j) v.e[j] = from_f<T>(f[j]);
  *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

// ---- activations (fp32). GELU tanh as v * sigmoid(2u) == 0.5 v (1 + tanh(u)): one expf, no tanhf.
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCoef = 0.044715f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + expf(-z)); }

// Returns dy * act'(v); *y = act(v). NaN and inf follow eager PyTorch: sigmoid(-inf) = 1 / (1 + inf) = 0, so
// gelu(-inf) = -inf * 0 = NaN; ReLU is a select (see csrc/kernels/cpu/mlp.cpp).
template <Act A>
__device__ __forceinline__ float act_bwd(float v, float dy, float* y) {
  if constexpr (A == Act::kGeluTanh) {
    const float s = sigmoid(2.f * kSqrt2OverPi * (v + kGeluCoef * v * v * v));
    *y = v * s;
    return dy * (s + v * s * (1.f - s) * (2.f * kSqrt2OverPi) * (1.f + 3.f * kGeluCoef * v * v));
  } else if constexpr (A == Act::kGeluErf) {
    const float c = normcdff(v);
    *y = v * c;
    return dy * (c + v * kInvSqrt2Pi * expf(-0.5f * v * v));
  } else {
    *y = v < 0.f ? 0.f : v;      // relu(NaN) = NaN
    return v <= 0.f ? 0.f : dy;  // threshold_backward: dy where v > 0 or NaN; 0 (not 0 * inf) where v <= 0
  }
}

template <Act A>
__device__ __forceinline__ float act_fwd(float v) {
  if constexpr (A == Act::kGeluTanh) {
    return v * sigmoid(2.f * kSqrt2OverPi * (v + kGeluCoef * v * v * v));
  } else if constexpr (A == Act::kGeluErf) {
    return v * normcdff(v);
  } else {
    return v < 0.f ? 0.f : v;  // relu(NaN) = NaN (`v > 0 ? v : 0` returned 0)
  }
}

template <int VEC>
__device__ __forceinline__ void load_bias(const float* bias, int64_t col, float (&b)[VEC]) {
  if (bias == nullptr) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) b[j] = 0.f;
  } else {
    load_vec<float, VEC>(bias + col, b);  // 16-byte aligned when VEC > 1 (launcher checks)
  }
}

// ---- bias + activation forward. Bytes: reads x, writes y: 2*M*N*elsize (+ N*4 of bias per column tile).
template <typename T, int VEC, Act A>
__global__ void __launch_bounds__(kMaxColThreads* kRowsPerBlock)
    bias_gelu_fwd_kernel(const T* x, const float* bias, T* y, int64_t M, int64_t N) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // column vector
  if (c * VEC >= N) return;
  const int64_t col = c * VEC;
  float b[VEC];
  load_bias<VEC>(bias, col, b);
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < M;
       row += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    float f[VEC];
    load_vec<T, VEC>(x + row * N + col, f);
#pragma unroll
    for (int j = 0; j < VEC; ++j) f[j] = act_fwd<A>(f[j] + b[j]);
    store_vec<T, VEC>(y + row * N + col, f);
  }
}

// ---- bias + activation backward. Bytes: reads dy, x, writes dx (+ y): 3*M*N*elsize (4 with y), plus the
// partial rows (gridDim.y * N * 4, written once and read once).
template <typename T, int VEC, Act A, bool WANT_Y>
__global__ void __launch_bounds__(kMaxColThreads* kRowsPerBlock)
    bias_gelu_bwd_kernel(const T* dy, const T* x, const float* bias, T* dx, T* y, float* partial, int64_t M,
                         int64_t N) {
  __shared__ float smem[kRowsPerBlock][kMaxColThreads * (VEC > 4 ? 8 : 4)];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = c * VEC < N;
  const int64_t col = c * VEC;
  float b[VEC];
  float acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
  if (active) {
    load_bias<VEC>(bias, col, b);
    for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < M;
         row += static_cast<int64_t>(gridDim.y) * blockDim.y) {
      float g[VEC], v[VEC], yv[VEC];
      load_vec<T, VEC>(dy + row * N + col, g);
      load_vec<T, VEC>(x + row * N + col, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        g[j] = act_bwd<A>(v[j] + b[j], g[j], &yv[j]);
        acc[j] += g[j];
      }
      store_vec<T, VEC>(dx + row * N + col, g);
      if constexpr (WANT_Y) store_vec<T, VEC>(y + row * N + col, yv);
    }
  }
  if (partial == nullptr) return;  // uniform over the grid: no thread is left waiting at the barrier
#pragma unroll
  for (int j = 0; j < VEC; ++j) smem[threadIdx.y][threadIdx.x * VEC + j] = acc[j];
  __syncthreads();
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float s = 0.f;
#pragma unroll
      for (int r = 0; r < kRowsPerBlock; ++r) s += smem[r][threadIdx.x * VEC + j];
      partial[static_cast<int64_t>(blockIdx.y) * N + col + j] = s;
    }
  }
}

// dbias[n] = sum over g of partial[g][n], g ascending: one thread per column, coalesced across the warp.
__global__ void bias_reduce_kernel(const float* partial, float* dbias, int G, int64_t N) {
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n < N;
       n += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int g = 0; g < G; ++g) s += partial[static_cast<int64_t>(g) * N + n];
    dbias[n] = s;
  }
}

// ---- SwiGLU elementwise. fwd bytes: reads g, u, writes p: 3*n*elsize. bwd: reads dp, g, u, writes dg, du (+ p).
template <typename T, int VEC>
__global__ void silu_mul_fwd_kernel(const T* g, const T* u, T* p, int64_t nvec) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float a[VEC], b[VEC];
    load_vec<T, VEC>(g + i * VEC, a);
    load_vec<T, VEC>(u + i * VEC, b);
#pragma unroll
    for (int j = 0; j < VEC; ++j) a[j] = a[j] * sigmoid(a[j]) * b[j];
    store_vec<T, VEC>(p + i * VEC, a);
  }
}

template <typename T, int VEC, bool WANT_P>
__global__ void silu_mul_bwd_kernel(const T* dp, const T* g, const T* u, T* dg, T* du, T* p, int64_t nvec) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float d[VEC], a[VEC], b[VEC], rg[VEC], ru[VEC], rp[VEC];
    load_vec<T, VEC>(dp + i * VEC, d);
    load_vec<T, VEC>(g + i * VEC, a);
    load_vec<T, VEC>(u + i * VEC, b);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float s = sigmoid(a[j]);
      const float silu = a[j] * s;
      rg[j] = d[j] * b[j] * s * (1.f + a[j] * (1.f - s));
      ru[j] = d[j] * silu;
      rp[j] = silu * b[j];
    }
    store_vec<T, VEC>(dg + i * VEC, rg);
    store_vec<T, VEC>(du + i * VEC, ru);
    if constexpr (WANT_P) store_vec<T, VEC>(p + i * VEC, rp);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side.

// aligned16, min64, cdiv: common.cuh.

// Column threads: the row's vectors rounded up to a warp, at most kMaxColThreads.
int col_threads(int64_t nvec) { return static_cast<int>(min64(cdiv(nvec, 32) * 32, kMaxColThreads)); }

// Partial rows of the dbias reduction: about two row-blocks per SM, never more than the row-blocks that exist.
// Independent of dtype and vector width so the workspace size needs only (M, N, sm_count).
int64_t bwd_row_blocks(int64_t M, int sm_count) {
  return min64(min64(cdiv(M, kRowsPerBlock), static_cast<int64_t>(sm_count) * 2), kMaxGridY);
}

template <typename T, int VEC, Act A>
cudaError_t fwd_launch(const T* x, const float* bias, T* y, int64_t M, int64_t N, cudaStream_t stream) {
  const int64_t nvec = N / VEC;
  const int tx = col_threads(nvec);
  const dim3 grid(static_cast<unsigned>(cdiv(nvec, tx)),
                  static_cast<unsigned>(min64(cdiv(M, kRowsPerBlock), kMaxGridY)));
  bias_gelu_fwd_kernel<T, VEC, A><<<grid, dim3(tx, kRowsPerBlock), 0, stream>>>(x, bias, y, M, N);
  return cudaGetLastError();
}

template <typename T, int VEC, Act A>
cudaError_t bwd_launch(const T* dy, const T* x, const float* bias, T* dx, float* dbias, T* y, float* ws, int64_t M,
                       int64_t N, int sm_count, cudaStream_t stream) {
  const int64_t nvec = N / VEC;
  const int tx = col_threads(nvec);
  const int64_t gy = dbias != nullptr ? bwd_row_blocks(M, sm_count) : min64(cdiv(M, kRowsPerBlock), kMaxGridY);
  const dim3 grid(static_cast<unsigned>(cdiv(nvec, tx)), static_cast<unsigned>(gy));
  const dim3 block(tx, kRowsPerBlock);
  float* partial = dbias != nullptr ? ws : nullptr;
  if (y != nullptr) {
    bias_gelu_bwd_kernel<T, VEC, A, true><<<grid, block, 0, stream>>>(dy, x, bias, dx, y, partial, M, N);
  } else {
    bias_gelu_bwd_kernel<T, VEC, A, false><<<grid, block, 0, stream>>>(dy, x, bias, dx, y, partial, M, N);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || dbias == nullptr) return err;
  const unsigned rgrid = static_cast<unsigned>(min64(cdiv(N, 256), 65535));
  bias_reduce_kernel<<<rgrid, 256, 0, stream>>>(ws, dbias, static_cast<int>(gy), N);
  return cudaGetLastError();
}

template <typename T, Act A>
cudaError_t fwd_typed(const void* x, const float* bias, void* y, int64_t M, int64_t N, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  // N % kVec == 0 with 16-byte aligned bases keeps every row's vectors (and the bias vectors) 16-byte aligned.
  const bool vec_ok = N % kVec == 0 && aligned16(x) && aligned16(y) && aligned16(bias);
  if (vec_ok) return fwd_launch<T, kVec, A>(static_cast<const T*>(x), bias, static_cast<T*>(y), M, N, stream);
  return fwd_launch<T, 1, A>(static_cast<const T*>(x), bias, static_cast<T*>(y), M, N, stream);
}

template <typename T, Act A>
cudaError_t bwd_typed(const void* dy, const void* x, const float* bias, void* dx, float* dbias, void* y, float* ws,
                      int64_t M, int64_t N, int sm_count, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec_ok = N % kVec == 0 && aligned16(dy) && aligned16(x) && aligned16(dx) && aligned16(y) &&
                      aligned16(bias);
  const T* dyt = static_cast<const T*>(dy);
  const T* xt = static_cast<const T*>(x);
  T* dxt = static_cast<T*>(dx);
  T* yt = static_cast<T*>(y);
  if (vec_ok) return bwd_launch<T, kVec, A>(dyt, xt, bias, dxt, dbias, yt, ws, M, N, sm_count, stream);
  return bwd_launch<T, 1, A>(dyt, xt, bias, dxt, dbias, yt, ws, M, N, sm_count, stream);
}

// Calls f(T{}, integral_constant<Act>) for the runtime dtype and activation.
template <typename F>
cudaError_t dispatch(DType dt, Act act, F&& f) {
  auto with_act = [&](auto tag) -> cudaError_t {
    switch (act) {
      case Act::kGeluTanh: return f(tag, std::integral_constant<Act, Act::kGeluTanh>{});
      case Act::kGeluErf: return f(tag, std::integral_constant<Act, Act::kGeluErf>{});
      case Act::kRelu: return f(tag, std::integral_constant<Act, Act::kRelu>{});
    }
    return cudaErrorInvalidValue;
  };
  switch (dt) {
    case DType::kFloat32: return with_act(float{});
    case DType::kFloat16: return with_act(__half{});
    case DType::kBFloat16: return with_act(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

unsigned flat_grid(int64_t nvec) { return static_cast<unsigned>(min64(cdiv(nvec, kFlatThreads), 65535 * 8)); }

}  // namespace

cudaError_t launch_bias_gelu_fwd(DType dtype, Act act, const void* x, const float* bias, void* y, int64_t M,
                                 int64_t N, cudaStream_t stream) {
  if (M < 0 || N <= 0) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  if (x == nullptr || y == nullptr) return cudaErrorInvalidValue;
  return dispatch(dtype, act, [&](auto tag, auto a) {
    return fwd_typed<decltype(tag), decltype(a)::value>(x, bias, y, M, N, stream);
  });
}

size_t bias_gelu_bwd_workspace_bytes(int64_t M, int64_t N, int sm_count) {
  if (M <= 0 || N <= 0 || sm_count <= 0) return 0;
  return static_cast<size_t>(bwd_row_blocks(M, sm_count)) * static_cast<size_t>(N) * sizeof(float);
}

cudaError_t launch_bias_gelu_bwd(DType dtype, Act act, const void* dy, const void* x, const float* bias, void* dx,
                                 float* dbias, void* y, float* workspace, int64_t M, int64_t N, int sm_count,
                                 cudaStream_t stream) {
  if (M < 0 || N <= 0) return cudaErrorInvalidValue;
  if (dbias != nullptr && (workspace == nullptr || sm_count <= 0)) return cudaErrorInvalidValue;
  if (M == 0) return dbias != nullptr ? cudaMemsetAsync(dbias, 0, static_cast<size_t>(N) * sizeof(float), stream)
                                      : cudaSuccess;
  if (dy == nullptr || x == nullptr || dx == nullptr) return cudaErrorInvalidValue;
  return dispatch(dtype, act, [&](auto tag, auto a) {
    return bwd_typed<decltype(tag), decltype(a)::value>(dy, x, bias, dx, dbias, y, workspace, M, N, sm_count,
                                                        stream);
  });
}

cudaError_t launch_silu_mul_fwd(DType dtype, const void* g, const void* u, void* p, int64_t n, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  return dispatch(dtype, Act::kGeluTanh, [&](auto tag, auto) -> cudaError_t {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const T* gt = static_cast<const T*>(g);
    const T* ut = static_cast<const T*>(u);
    T* pt = static_cast<T*>(p);
    if (n % kVec == 0 && aligned16(g) && aligned16(u) && aligned16(p)) {
      silu_mul_fwd_kernel<T, kVec><<<flat_grid(n / kVec), kFlatThreads, 0, stream>>>(gt, ut, pt, n / kVec);
    } else {
      silu_mul_fwd_kernel<T, 1><<<flat_grid(n), kFlatThreads, 0, stream>>>(gt, ut, pt, n);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_silu_mul_bwd(DType dtype, const void* dp, const void* g, const void* u, void* dg, void* du,
                                void* p, int64_t n, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  return dispatch(dtype, Act::kGeluTanh, [&](auto tag, auto) -> cudaError_t {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const T* a = static_cast<const T*>(dp);
    const T* b = static_cast<const T*>(g);
    const T* c = static_cast<const T*>(u);
    T* o1 = static_cast<T*>(dg);
    T* o2 = static_cast<T*>(du);
    T* o3 = static_cast<T*>(p);
    const bool vec = n % kVec == 0 && aligned16(dp) && aligned16(g) && aligned16(u) && aligned16(dg) &&
                     aligned16(du) && aligned16(p);
    const int64_t nv = n / kVec;
    if (vec && p != nullptr) {
      silu_mul_bwd_kernel<T, kVec, true><<<flat_grid(nv), kFlatThreads, 0, stream>>>(a, b, c, o1, o2, o3, nv);
    } else if (vec) {
      silu_mul_bwd_kernel<T, kVec, false><<<flat_grid(nv), kFlatThreads, 0, stream>>>(a, b, c, o1, o2, o3, nv);
    } else if (p != nullptr) {
      silu_mul_bwd_kernel<T, 1, true><<<flat_grid(n), kFlatThreads, 0, stream>>>(a, b, c, o1, o2, o3, n);
    } else {
      silu_mul_bwd_kernel<T, 1, false><<<flat_grid(n), kFlatThreads, 0, stream>>>(a, b, c, o1, o2, o3, n);
    }
    return cudaGetLastError();
  });
}

}  // namespace gptkernels
