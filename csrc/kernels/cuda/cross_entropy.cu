// CUDA cross-entropy (label smoothing, z-loss, softcap): forward, fused forward + gradient, backward. See
// cross_entropy.cuh and CeSpec in ../common.h for the math.
//
// One block per row (grid-strided), TPB threads. A row is split into a scalar head up to its first 16-byte boundary,
// whole 16-byte groups (4 fp32 or 8 fp16/bf16, one vector load each) and a scalar tail, so rows of any length and
// alignment (V = 50257 puts every row at a different offset) take vector loads. Bytes: the forward reads the logits
// once (M*V*elsize); the fused gradient reads them again (from L2 while the row is there) and writes them once;
// the backward reads the logits and writes dlogits once each.
// Per thread an online max m and sum s of exp(z - m), rescaled by exp(m_old - m_new) once per group; then a block max
// and a block sum of the rescaled s. fmaxf skips a NaN z but its exp joins the sum, so a NaN logit makes lse NaN; a
// +inf logit (inf - inf in the eager log_softmax) is made NaN explicitly. exp is __expf (2 + 1.16 |x| ulp, CUDA
// guide), log is logf and tanh is tanhf.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "common.cuh"
#include "cross_entropy.cuh"

namespace gptkernels {
namespace {

template <typename T>
__host__ __device__ constexpr int vec_of() {
  return int(16 / sizeof(T));
}

// Columns [0, head) scalar, [head, head + nvec * VEC) in 16-byte groups, the rest scalar.
struct RowSplit {
  int head, nvec;
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const void* row, int V) {
  constexpr int VEC = vec_of<T>();
  const uintptr_t a = reinterpret_cast<uintptr_t>(row);
  int head = a % sizeof(T) != 0 ? V : int(((16u - (a & 15u)) & 15u) / sizeof(T));
  head = head < V ? head : V;
  return {head, (V - head) / VEC};
}

// f(col0, v) for this thread's groups of the row: v a float[1] (scalar columns) or float[VEC] (a 16-byte group).
// With `out`, v as f leaves it is stored at the same columns of out (whose 16-byte offset must match row's).
template <typename T, int TPB, typename F>
__device__ __forceinline__ void visit_row(const T* row, T* out, int V, RowSplit sp, F&& f) {
  constexpr int VEC = vec_of<T>();
  for (int j = threadIdx.x; j < sp.head; j += TPB) {
    float v[1] = {to_f(row[j])};
    f(j, v);
    if (out != nullptr) out[j] = from_f<T>(v[0]);
  }
  for (int i = threadIdx.x; i < sp.nvec; i += TPB) {
    const int c0 = sp.head + i * VEC;
    const uint4 raw = *reinterpret_cast<const uint4*>(row + c0);
    const T* e = reinterpret_cast<const T*>(&raw);
    float v[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = to_f(e[k]);
    f(c0, v);
    if (out != nullptr) {
      uint4 w;
      T* o = reinterpret_cast<T*>(&w);
#pragma unroll
      for (int k = 0; k < VEC; ++k) o[k] = from_f<T>(v[k]);
      *reinterpret_cast<uint4*>(out + c0) = w;
    }
  }
  for (int j = sp.head + sp.nvec * VEC + threadIdx.x; j < V; j += TPB) {
    float v[1] = {to_f(row[j])};
    f(j, v);
    if (out != nullptr) out[j] = from_f<T>(v[0]);
  }
}

// z of a logit: x, or softcap * tanh(x / softcap); th = the tanh (for the derivative 1 - th^2).
template <bool CAP>
__device__ __forceinline__ float z_of(float x, float cap, float inv_cap, float& th) {
  if constexpr (CAP) {
    th = tanhf(x * inv_cap);
    return cap * th;
  } else {
    th = 0.f;
    return x;
  }
}

struct CeArgs {
  const void* x;
  int64_t stride_m;
  const int64_t* target;
  int64_t M;
  int V;
  CeSpec spec;
  float inv_cap;
  float* loss;         // FWD
  float* lse;          // FWD: written; !FWD: the saved lse, read
  void* grad;          // GRAD
  int64_t stride_gm;   // GRAD
  const float* dloss;  // nullable: 1 per row
  int64_t stride_dl;
};

// FWD: loss and lse from one pass (else lse is read from a.lse); GRAD: the gradient pass.
template <typename T, int TPB, bool CAP, bool FWD, bool GRAD>
__global__ void __launch_bounds__(TPB) cross_entropy_kernel(const CeArgs a) {
  __shared__ float smem[2 * kWarp];
  const T* x = static_cast<const T*>(a.x);
  T* g = static_cast<T*>(a.grad);
  const float cap = a.spec.softcap, inv_cap = a.inv_cap;
  const int V = a.V;
  for (int64_t r = blockIdx.x; r < a.M; r += gridDim.x) {
    const T* xr = x + r * a.stride_m;
    T* gr = GRAD ? g + r * a.stride_gm : nullptr;
    const int64_t t = a.target[r];
    const bool ignored = t == a.spec.ignore_index;
    if (ignored || t < 0 || t >= V) {  // never used as an index: loss 0 (ignored) or NaN (out of range)
      const float fill = ignored ? 0.f : __int_as_float(0x7fc00000);
      if (FWD && threadIdx.x == 0) a.loss[r] = a.lse[r] = fill;
      if (GRAD) {
        for (int j = threadIdx.x; j < V; j += TPB) gr[j] = from_f<T>(fill);
      }
      continue;
    }
    RowSplit sp = split_row<T>(xr, V);
    // Vector groups need the same 16-byte offset in the output row (always true in place).
    if (GRAD && ((reinterpret_cast<uintptr_t>(gr) ^ reinterpret_cast<uintptr_t>(xr)) & 15u) != 0) sp = {V, 0};
    float lse;
    if constexpr (FWD) {
      // The target's logit, read before the block reductions' barriers: after them, in place, another thread may
      // already have overwritten it with its gradient.
      const float xt = threadIdx.x == 0 ? to_f(xr[t]) : 0.f;
      float m = neg_inf(), s = 0.f, zs = 0.f;
      visit_row<T, TPB>(xr, static_cast<T*>(nullptr), V, sp, [&](int, auto& v) {
        constexpr int K = sizeof(v) / sizeof(v[0]);
        float z[K], th;
        float cm = neg_inf();
#pragma unroll
        for (int k = 0; k < K; ++k) {
          z[k] = z_of<CAP>(v[k], cap, inv_cap, th);
          cm = fmaxf(cm, z[k]);
          zs += z[k];
        }
        const float m_new = fmaxf(m, cm);
        const float shift = m_new == neg_inf() ? 0.f : m_new;  // all -inf so far: exp(-inf - 0) = 0, not NaN
        float cs = 0.f;
#pragma unroll
        for (int k = 0; k < K; ++k) cs += __expf(z[k] - shift);
        s = s * __expf(m - shift) + cs;  // m = -inf: s is 0
        m = m_new;
      });
      const float mx = block_max(m, smem);
      const float shift = mx == neg_inf() ? 0.f : mx;
      float red[2] = {s * __expf(m - shift), zs};
      block_sum<2>(red, smem);
      lse = shift + logf(red[0]);  // all -inf: log(0) = -inf
      if (mx == __int_as_float(0x7f800000)) lse = __int_as_float(0x7fc00000);  // +inf logit: NaN, as eager
      if (threadIdx.x == 0) {
        float th;
        a.loss[r] = ce_row_loss(lse, z_of<CAP>(xt, cap, inv_cap, th), red[1], V, a.spec);
        a.lse[r] = lse;
      }
    } else {
      lse = a.lse[r];
    }
    if constexpr (GRAD) {
      const float dl = a.dloss != nullptr ? a.dloss[r * a.stride_dl] : 1.f;
      const float ls = a.spec.label_smoothing;
      const float ga = dl * (1.f + 2.f * a.spec.z_loss * lse), gb = dl * ls / float(V), gt = dl * (1.f - ls);
      const int tc = int(t);
      visit_row<T, TPB>(xr, gr, V, sp, [&](int c0, auto& v) {
        constexpr int K = sizeof(v) / sizeof(v[0]);
#pragma unroll
        for (int k = 0; k < K; ++k) {
          float th;
          const float z = z_of<CAP>(v[k], cap, inv_cap, th);
          float gv = ga * __expf(z - lse) - gb - (c0 + k == tc ? gt : 0.f);
          if (CAP) gv *= 1.f - th * th;
          v[k] = gv;
        }
      });
    }
  }
}

unsigned grid_for(int64_t rows) { return unsigned(std::min<int64_t>(rows, INT_MAX)); }

template <typename T, bool FWD, bool GRAD>
cudaError_t launch_typed(const CeArgs& a, cudaStream_t stream) {
  const bool cap = a.spec.softcap > 0.f;
  // 128 threads for short rows (up to 8 fp32 groups per thread at V = 4096), 512 above (V = 50257: ~25 groups).
  if (a.V <= 4096) {
    if (cap) {
      cross_entropy_kernel<T, 128, true, FWD, GRAD><<<grid_for(a.M), 128, 0, stream>>>(a);
    } else {
      cross_entropy_kernel<T, 128, false, FWD, GRAD><<<grid_for(a.M), 128, 0, stream>>>(a);
    }
  } else {
    if (cap) {
      cross_entropy_kernel<T, 512, true, FWD, GRAD><<<grid_for(a.M), 512, 0, stream>>>(a);
    } else {
      cross_entropy_kernel<T, 512, false, FWD, GRAD><<<grid_for(a.M), 512, 0, stream>>>(a);
    }
  }
  return cudaGetLastError();
}

template <bool FWD, bool GRAD>
cudaError_t launch(DType dtype, const CeArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_typed<float, FWD, GRAD>(a, stream);
    case DType::kFloat16: return launch_typed<__half, FWD, GRAD>(a, stream);
    case DType::kBFloat16: return launch_typed<__nv_bfloat16, FWD, GRAD>(a, stream);
  }
  return cudaErrorInvalidValue;
}

bool bad_spec(const CeSpec& s) {
  return !(s.label_smoothing >= 0.f && s.label_smoothing <= 1.f) || !(s.z_loss >= 0.f) || !(s.softcap >= 0.f);
}

}  // namespace

cudaError_t launch_cross_entropy_fwd(DType dtype, const void* logits, int64_t stride_m, const int64_t* target,
                                     int64_t M, int64_t V, const CeSpec& spec, float* loss, float* lse, void* grad,
                                     int64_t stride_gm, const float* dloss, int64_t stride_dl, cudaStream_t stream) {
  // Columns are int, with headroom for a group past V.
  if (M < 0 || V < 1 || V > INT_MAX / 2 || bad_spec(spec)) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  if (logits == nullptr || target == nullptr || loss == nullptr || lse == nullptr) return cudaErrorInvalidValue;
  const CeArgs a{logits, stride_m, target, M, int(V), spec, spec.softcap > 0.f ? 1.f / spec.softcap : 0.f,
                 loss, lse, grad, stride_gm, dloss, stride_dl};
  return grad != nullptr ? launch<true, true>(dtype, a, stream) : launch<true, false>(dtype, a, stream);
}

cudaError_t launch_cross_entropy_bwd(DType dtype, const void* logits, int64_t stride_m, const int64_t* target,
                                     const float* lse, const float* dloss, int64_t stride_dl, void* dlogits, int64_t M,
                                     int64_t V, const CeSpec& spec, cudaStream_t stream) {
  if (M < 0 || V < 1 || V > INT_MAX / 2 || bad_spec(spec)) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  if (logits == nullptr || target == nullptr || lse == nullptr || dloss == nullptr || dlogits == nullptr) {
    return cudaErrorInvalidValue;
  }
  const CeArgs a{logits, stride_m, target, M, int(V), spec, spec.softcap > 0.f ? 1.f / spec.softcap : 0.f,
                 nullptr, const_cast<float*>(lse), dlogits, V, dloss, stride_dl};
  return launch<false, true>(dtype, a, stream);
}

}  // namespace gptkernels
