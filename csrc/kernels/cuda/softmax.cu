// CUDA softmax over the last dim (scale, additive fp32 mask, causal), forward and backward. See softmax.cuh.
//
// Two kernel shapes, chosen per launch from N:
//   - register path (N <= 16384): a row lives in registers, ITEMS groups of VEC elements per thread (VEC = one
//     16-byte vector: 4 fp32 or 8 fp16/bf16). A warp per row up to 32*4*VEC columns (4 rows per 128-thread
//     block), then a block of 128..1024 threads per row with 16 elements per thread. x is read once:
//     2*M*N*elsize bytes for the forward (causal rows read only their live columns: ~1.5*M*N*elsize).
//   - loop path (longer rows, any N): a 512-thread block per row walks the row in 512*VEC-element chunks, an
//     online pass (running max m, sum s rescaled by exp(m_old - m_new)) and then a normalize pass, so x is read
//     twice (3*M*N*elsize bytes; the second read hits L2 while the row is still there).
// Element mapping: with 16-byte-aligned rows (ALIGNED) thread `tid` owns the VEC consecutive columns
// base + tid*VEC ..., loaded with one 16-byte access; otherwise it owns base + k*TPR + tid (k < VEC), so the
// scalar fallback stays coalesced. Both mappings cover the same chunk [base, base + TPR*VEC).
// Math in fp32. exp is __expf (ex2.approx): 2 + 1.16*|x| ulp per the CUDA guide, so ~2 ulp for the entries near
// the row max that dominate the result, more only for entries exp(x) far below them; inside the fp32 test bound
// of 1e-5 relative.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "common.cuh"
#include "softmax.cuh"

namespace gptkernels {
namespace {

template <typename T>
__host__ __device__ constexpr int vec_of() {
  return int(16 / sizeof(T));
}

// Column of element k of thread tid's group in the chunk starting at `base` (see the mapping note above).
template <int TPR, int V, bool ALIGNED>
__device__ __forceinline__ int col_of(int base, int k, int tid) {
  return ALIGNED ? base + tid * V + k : base + k * TPR + tid;
}

// v[k] = row[col] as fp32, `fill` at columns >= n (n <= the row's length N). ALIGNED: 16-byte vector loads; the
// row is 16-byte aligned and N a multiple of V, so a group starting below n lies inside the row (a causal n that
// ends mid-group loads the whole group, and to_logits masks the tail).
template <int TPR, bool ALIGNED, typename T, int V>
__device__ __forceinline__ void load_group(const T* __restrict__ row, int base, int tid, int n, float (&v)[V],
                                           float fill) {
  if constexpr (ALIGNED) {
    const int c0 = base + tid * V;
    if (c0 < n) {
      if constexpr (sizeof(T) * V == 16) {
        const uint4 raw = *reinterpret_cast<const uint4*>(row + c0);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] = to_f(e[k]);
      } else {  // fp32 groups of 8 (the mask or dz of a 16-bit row): two 16-byte vectors
        static_assert(sizeof(T) == 4 && V % 4 == 0, "fp32 groups are whole float4s");
#pragma unroll
        for (int k = 0; k < V; k += 4) {
          const float4 f = *reinterpret_cast<const float4*>(row + c0 + k);
          v[k] = f.x, v[k + 1] = f.y, v[k + 2] = f.z, v[k + 3] = f.w;
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = fill;
    }
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int c = col_of<TPR, V, false>(base, k, tid);
      v[k] = c < n ? to_f(row[c]) : fill;
    }
  }
}

template <int TPR, bool ALIGNED, typename T, int V>
__device__ __forceinline__ void store_group(T* __restrict__ row, int base, int tid, int n, const float (&v)[V]) {
  if constexpr (ALIGNED) {
    const int c0 = base + tid * V;
    if (c0 < n) {
      if constexpr (sizeof(T) * V == 16) {
        uint4 raw;
        T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int k = 0; k < V; ++k) e[k] = from_f<T>(v[k]);
        *reinterpret_cast<uint4*>(row + c0) = raw;
      } else {
        static_assert(sizeof(T) == 4 && V % 4 == 0, "fp32 groups are whole float4s");
#pragma unroll
        for (int k = 0; k < V; k += 4) {
          *reinterpret_cast<float4*>(row + c0 + k) = make_float4(v[k], v[k + 1], v[k + 2], v[k + 3]);
        }
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int c = col_of<TPR, V, false>(base, k, tid);
      if (c < n) row[c] = from_f<T>(v[k]);
    }
  }
}

// The mask of one row: nothing, one value for the whole row (smn == 0), or a row of N floats (smn == 1).
struct MaskRow {
  const float* row;  // nullptr: no mask
  float value;       // the broadcast value when !per_column
  bool per_column;
};

// v = scale * v + mask; -inf at columns >= n_live (causal, and the padding beyond N since n_live <= N).
template <int TPR, bool ALIGNED, int V>
__device__ __forceinline__ void to_logits(float (&v)[V], int base, int tid, int n_live, const MaskRow& mr,
                                          float scale) {
  float add[V];
  if (mr.per_column) {
    load_group<TPR, ALIGNED>(mr.row, base, tid, n_live, add, 0.f);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) add[k] = mr.value;
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int c = col_of<TPR, V, ALIGNED>(base, k, tid);
    v[k] = c < n_live ? v[k] * scale + add[k] : neg_inf();
  }
}

// Reductions over the TPR threads of a row: warp shuffles, plus shared memory across warps when TPR > 32.
// `red` holds TPR/32 floats; the leading barrier keeps a previous reduction's readers ahead of the writes.
template <int TPR>
__device__ __forceinline__ float row_max(float v, float* red) {
  v = warp_max(v);
  if constexpr (TPR > 32) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = warp_max(lane < TPR / 32 ? red[lane] : neg_inf());
  }
  return v;
}

template <int TPR>
__device__ __forceinline__ float row_sum(float v, float* red) {
  v = warp_sum(v);
  if constexpr (TPR > 32) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = warp_sum(lane < TPR / 32 ? red[lane] : 0.f);
  }
  return v;
}

struct FwdArgs {
  const void* x;
  void* y;
  const float* mask;
  int64_t stride_xm;
  int64_t M, H, T;
  int64_t smb, smh, smt, smn;
  int N;
  float scale;
  bool causal;
};

struct BwdArgs {
  const void* y;
  const void* dy;
  void* dx;
  float* dz;
  int64_t stride_dym;
  int64_t M;
  int N;
  float scale;
};

// Row r's live length (causal: t + 1 columns) and its mask row.
__device__ __forceinline__ int row_setup(const FwdArgs& a, int64_t r, MaskRow& mr) {
  const int64_t t = r % a.T;
  mr.row = nullptr;
  mr.value = 0.f;
  mr.per_column = false;
  if (a.mask != nullptr) {
    const int64_t bh = r / a.T;
    const float* m = a.mask + (bh / a.H) * a.smb + (bh % a.H) * a.smh + t * a.smt;
    mr.per_column = a.smn != 0;
    mr.row = m;
    if (!mr.per_column) mr.value = __ldg(m);
  }
  return a.causal ? int(t + 1 < a.N ? t + 1 : a.N) : a.N;
}

// Register path: TPR threads per row, RPB rows per block (RPB > 1 only for warp-per-row), ITEMS groups of V per
// thread. Rows are grid-strided; the loop condition is uniform across a row's threads.
template <typename T, int TPR, int ITEMS, int RPB, bool ALIGNED>
__global__ void __launch_bounds__(TPR* RPB) softmax_fwd_reg_kernel(const FwdArgs a) {
  static_assert(TPR == 32 || RPB == 1, "block-wide rows use __syncthreads: one row per block");
  constexpr int V = vec_of<T>();
  __shared__ float red[TPR / 32];
  const int tid = threadIdx.x;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  for (int64_t r = int64_t(blockIdx.x) * RPB + threadIdx.y; r < a.M; r += int64_t(gridDim.x) * RPB) {
    MaskRow mr;
    const int n_live = row_setup(a, r, mr);
    const T* xr = x + r * a.stride_xm;
    float z[ITEMS][V];
    float mx = neg_inf();
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      load_group<TPR, ALIGNED>(xr, i * TPR * V, tid, n_live, z[i], 0.f);
      to_logits<TPR, ALIGNED>(z[i], i * TPR * V, tid, n_live, mr, a.scale);
#pragma unroll
      for (int k = 0; k < V; ++k) mx = fmaxf(mx, z[i][k]);
    }
    mx = row_max<TPR>(mx, red);
    // A fully masked row (max -inf) would give z - max = NaN; shifting by 0 gives exp(-inf) = 0 and sum 0.
    const float shift = mx == neg_inf() ? 0.f : mx;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        z[i][k] = __expf(z[i][k] - shift);
        s += z[i][k];
      }
    }
    s = row_sum<TPR>(s, red);
    // s == 0 only for a fully masked row. fmaxf skips a NaN logit, but its exp joins the sum, and a +inf logit
    // gives inf - inf: s is NaN and so is the whole row (a `s > 0` guard here zeroed every other entry).
    const float inv = s == 0.f ? 0.f : 1.0f / s;
    T* yr = y + r * int64_t(a.N);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
#pragma unroll
      for (int k = 0; k < V; ++k) z[i][k] *= inv;
      store_group<TPR, ALIGNED>(yr, i * TPR * V, tid, a.N, z[i]);
    }
  }
}

// Loop path: one TPR-thread block per row, any N.
template <typename T, int TPR, bool ALIGNED>
__global__ void __launch_bounds__(TPR) softmax_fwd_loop_kernel(const FwdArgs a) {
  constexpr int V = vec_of<T>();
  constexpr int CHUNK = TPR * V;
  __shared__ float red[TPR / 32];
  const int tid = threadIdx.x;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  for (int64_t r = blockIdx.x; r < a.M; r += gridDim.x) {
    MaskRow mr;
    const int n_live = row_setup(a, r, mr);
    const T* xr = x + r * a.stride_xm;
    // Pass 1, online: per thread a running max m and a sum s of exp(z - m), rescaled when m grows. Chunks past
    // the causal limit are skipped: their exp is 0.
    float m = neg_inf(), s = 0.f;
    for (int base = 0; base < n_live; base += CHUNK) {
      float z[V];
      load_group<TPR, ALIGNED>(xr, base, tid, n_live, z, 0.f);
      to_logits<TPR, ALIGNED>(z, base, tid, n_live, mr, a.scale);
      float cm = z[0];
#pragma unroll
      for (int k = 1; k < V; ++k) cm = fmaxf(cm, z[k]);
      const float m_new = fmaxf(m, cm);
      const float shift = m_new == neg_inf() ? 0.f : m_new;
      float cs = 0.f;
#pragma unroll
      for (int k = 0; k < V; ++k) cs += __expf(z[k] - shift);
      s = s * __expf(m - shift) + cs;  // m = -inf: s is 0 and exp(-inf) = 0
      m = m_new;
    }
    const float mx = row_max<TPR>(m, red);
    const float shift = mx == neg_inf() ? 0.f : mx;
    const float total = row_sum<TPR>(s * __expf(m - shift), red);
    const float inv = total == 0.f ? 0.f : 1.0f / total;  // NaN stays NaN, as in the register path
    // Pass 2: normalize. Chunks wholly past the causal limit are stored as zeros (NaN in a NaN row) without
    // reading x.
    T* yr = y + r * int64_t(a.N);
    for (int base = 0; base < a.N; base += CHUNK) {
      float z[V];
      if (base < n_live) {
        load_group<TPR, ALIGNED>(xr, base, tid, n_live, z, 0.f);
        to_logits<TPR, ALIGNED>(z, base, tid, n_live, mr, a.scale);
#pragma unroll
        for (int k = 0; k < V; ++k) z[k] = __expf(z[k] - shift) * inv;
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) z[k] = 0.f * inv;  // exp(-inf) * inv: 0, or NaN in a NaN row as elsewhere
      }
      store_group<TPR, ALIGNED>(yr, base, tid, a.N, z);
    }
  }
}

template <typename T, int TPR, int ITEMS, int RPB, bool ALIGNED>
__global__ void __launch_bounds__(TPR* RPB) softmax_bwd_reg_kernel(const BwdArgs a) {
  static_assert(TPR == 32 || RPB == 1, "block-wide rows use __syncthreads: one row per block");
  constexpr int V = vec_of<T>();
  __shared__ float red[TPR / 32];
  const int tid = threadIdx.x;
  const T* y = static_cast<const T*>(a.y);
  const T* dy = static_cast<const T*>(a.dy);
  T* dx = static_cast<T*>(a.dx);
  for (int64_t r = int64_t(blockIdx.x) * RPB + threadIdx.y; r < a.M; r += int64_t(gridDim.x) * RPB) {
    const T* yr = y + r * int64_t(a.N);
    const T* dyr = dy + r * a.stride_dym;
    float yv[ITEMS][V], g[ITEMS][V];
    float c = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      load_group<TPR, ALIGNED>(yr, i * TPR * V, tid, a.N, yv[i], 0.f);
      load_group<TPR, ALIGNED>(dyr, i * TPR * V, tid, a.N, g[i], 0.f);
#pragma unroll
      for (int k = 0; k < V; ++k) c += yv[i][k] * g[i][k];
    }
    c = row_sum<TPR>(c, red);
    T* dxr = dx + r * int64_t(a.N);
    float* dzr = a.dz != nullptr ? a.dz + r * int64_t(a.N) : nullptr;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
#pragma unroll
      for (int k = 0; k < V; ++k) g[i][k] = yv[i][k] * (g[i][k] - c);
      if (dzr != nullptr) store_group<TPR, ALIGNED>(dzr, i * TPR * V, tid, a.N, g[i]);
#pragma unroll
      for (int k = 0; k < V; ++k) g[i][k] *= a.scale;
      store_group<TPR, ALIGNED>(dxr, i * TPR * V, tid, a.N, g[i]);
    }
  }
}

template <typename T, int TPR, bool ALIGNED>
__global__ void __launch_bounds__(TPR) softmax_bwd_loop_kernel(const BwdArgs a) {
  constexpr int V = vec_of<T>();
  constexpr int CHUNK = TPR * V;
  __shared__ float red[TPR / 32];
  const int tid = threadIdx.x;
  const T* y = static_cast<const T*>(a.y);
  const T* dy = static_cast<const T*>(a.dy);
  T* dx = static_cast<T*>(a.dx);
  for (int64_t r = blockIdx.x; r < a.M; r += gridDim.x) {
    const T* yr = y + r * int64_t(a.N);
    const T* dyr = dy + r * a.stride_dym;
    float c = 0.f;
    for (int base = 0; base < a.N; base += CHUNK) {
      float yv[V], g[V];
      load_group<TPR, ALIGNED>(yr, base, tid, a.N, yv, 0.f);
      load_group<TPR, ALIGNED>(dyr, base, tid, a.N, g, 0.f);
#pragma unroll
      for (int k = 0; k < V; ++k) c += yv[k] * g[k];
    }
    c = row_sum<TPR>(c, red);
    T* dxr = dx + r * int64_t(a.N);
    float* dzr = a.dz != nullptr ? a.dz + r * int64_t(a.N) : nullptr;
    for (int base = 0; base < a.N; base += CHUNK) {
      float yv[V], g[V];
      load_group<TPR, ALIGNED>(yr, base, tid, a.N, yv, 0.f);
      load_group<TPR, ALIGNED>(dyr, base, tid, a.N, g, 0.f);
#pragma unroll
      for (int k = 0; k < V; ++k) g[k] = yv[k] * (g[k] - c);
      if (dzr != nullptr) store_group<TPR, ALIGNED>(dzr, base, tid, a.N, g);
#pragma unroll
      for (int k = 0; k < V; ++k) g[k] *= a.scale;
      store_group<TPR, ALIGNED>(dxr, base, tid, a.N, g);
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

unsigned grid_for(int64_t rows, int rows_per_block) {
  return unsigned(std::min<int64_t>((rows + rows_per_block - 1) / rows_per_block, INT_MAX));
}

// Longest row of the register path: 16 elements per thread at 1024 threads (fp32: 4 groups of 4, 16-bit: 2
// groups of 8), i.e. 16 fp32 registers per thread for the row (32 in the backward, which holds y and dy).
constexpr int kRegMaxN = 16384;
constexpr int kLoopThreads = 512;

// Picks the register-path instance for N, or the loop kernel: launch.reg<TPR, ITEMS, RPB>() / launch.loop<TPR>().
template <typename T, typename Launch>
cudaError_t dispatch_row_kernel(int64_t N, Launch& launch) {
  constexpr int V = vec_of<T>();
  constexpr int BIG = 16 / V;  // groups per thread once a block owns the row: 16 elements per thread
  if (N <= 32 * V) return launch.template reg<32, 1, 4>();
  if (N <= 64 * V) return launch.template reg<32, 2, 4>();
  if (N <= 128 * V) return launch.template reg<32, 4, 4>();
  if (N <= 128 * 16) return launch.template reg<128, BIG, 1>();
  if (N <= 256 * 16) return launch.template reg<256, BIG, 1>();
  if (N <= 512 * 16) return launch.template reg<512, BIG, 1>();
  if (N <= kRegMaxN) return launch.template reg<1024, BIG, 1>();
  return launch.template loop<kLoopThreads>();
}

template <typename T, bool ALIGNED>
struct FwdLaunch {
  const FwdArgs& a;
  cudaStream_t stream;
  template <int TPR, int ITEMS, int RPB>
  cudaError_t reg() {
    softmax_fwd_reg_kernel<T, TPR, ITEMS, RPB, ALIGNED><<<grid_for(a.M, RPB), dim3(TPR, RPB), 0, stream>>>(a);
    return cudaGetLastError();
  }
  template <int TPR>
  cudaError_t loop() {
    softmax_fwd_loop_kernel<T, TPR, ALIGNED><<<grid_for(a.M, 1), TPR, 0, stream>>>(a);
    return cudaGetLastError();
  }
};

template <typename T, bool ALIGNED>
struct BwdLaunch {
  const BwdArgs& a;
  cudaStream_t stream;
  template <int TPR, int ITEMS, int RPB>
  cudaError_t reg() {
    softmax_bwd_reg_kernel<T, TPR, ITEMS, RPB, ALIGNED><<<grid_for(a.M, RPB), dim3(TPR, RPB), 0, stream>>>(a);
    return cudaGetLastError();
  }
  template <int TPR>
  cudaError_t loop() {
    softmax_bwd_loop_kernel<T, TPR, ALIGNED><<<grid_for(a.M, 1), TPR, 0, stream>>>(a);
    return cudaGetLastError();
  }
};

// 16-byte vector access needs every row of every tensor 16-byte aligned: base pointers, row strides and N
// multiples of VEC (and of 4 floats for the fp32 mask and dz rows).
template <typename T>
cudaError_t fwd_typed(const FwdArgs& a, cudaStream_t stream) {
  constexpr int V = vec_of<T>();
  const bool mask_ok = a.mask == nullptr || a.smn == 0 ||
                       (aligned16(a.mask) && a.smb % 4 == 0 && a.smh % 4 == 0 && a.smt % 4 == 0);
  if (aligned16(a.x) && aligned16(a.y) && a.stride_xm % V == 0 && a.N % V == 0 && mask_ok) {
    FwdLaunch<T, true> l{a, stream};
    return dispatch_row_kernel<T>(a.N, l);
  }
  FwdLaunch<T, false> l{a, stream};
  return dispatch_row_kernel<T>(a.N, l);
}

template <typename T>
cudaError_t bwd_typed(const BwdArgs& a, cudaStream_t stream) {
  constexpr int V = vec_of<T>();
  if (aligned16(a.y) && aligned16(a.dy) && aligned16(a.dx) && (a.dz == nullptr || aligned16(a.dz)) &&
      a.stride_dym % V == 0 && a.N % V == 0) {
    BwdLaunch<T, true> l{a, stream};
    return dispatch_row_kernel<T>(a.N, l);
  }
  BwdLaunch<T, false> l{a, stream};
  return dispatch_row_kernel<T>(a.N, l);
}

}  // namespace

cudaError_t launch_softmax_fwd(DType dtype, const void* x, int64_t stride_xm, void* y, const float* mask, int64_t B,
                               int64_t H, int64_t T, int64_t N, int64_t smb, int64_t smh, int64_t smt, int64_t smn,
                               float scale, bool causal, cudaStream_t stream) {
  // Columns are int, with headroom for the last chunk step past N.
  if (B < 0 || H < 0 || T < 0 || N < 0 || N > INT_MAX / 2 || (smn != 0 && smn != 1)) return cudaErrorInvalidValue;
  const int64_t M = B * H * T;
  if (M == 0 || N == 0) return cudaSuccess;
  if (x == nullptr || y == nullptr) return cudaErrorInvalidValue;
  const FwdArgs a{x, y, mask, stride_xm, M, H, T, smb, smh, smt, smn, int(N), scale, causal};
  switch (dtype) {
    case DType::kFloat32: return fwd_typed<float>(a, stream);
    case DType::kFloat16: return fwd_typed<__half>(a, stream);
    case DType::kBFloat16: return fwd_typed<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_softmax_bwd(DType dtype, const void* y, const void* dy, int64_t stride_dym, void* dx, float* dz,
                               int64_t M, int64_t N, float scale, cudaStream_t stream) {
  if (M < 0 || N < 0 || N > INT_MAX / 2) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  if (y == nullptr || dy == nullptr || dx == nullptr) return cudaErrorInvalidValue;
  const BwdArgs a{y, dy, dx, dz, stride_dym, M, int(N), scale};
  switch (dtype) {
    case DType::kFloat32: return bwd_typed<float>(a, stream);
    case DType::kFloat16: return bwd_typed<__half>(a, stream);
    case DType::kBFloat16: return bwd_typed<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gptkernels
