#include "cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "dtype.h"
#include "isa.h"
#include "parallel.h"

// As in softmax.cpp: without trapping math GCC may if-convert the comparisons of the row max and of vmath's
// clamps, and the AVX2 / AVX-512 clones of the loops below vectorize. Nothing here reads floating-point flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "vmath.h"  // NOLINT(build/include_order): after the pragma, so its inlined exp / tanh follow it

namespace gptkernels {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Columns per block of the online pass: a block is read from memory once into L1 (8 KiB of fp32), its max taken,
// then its exps summed from L1, the running sum rescaled when the max grows. A row is read from memory once.
constexpr int64_t kBlock = 2048;

#define GK_CE_INLINE inline __attribute__((always_inline))

// z of one logit: x, or softcap * tanh(x / softcap) (a NaN x stays NaN: tanh_finite would make it +-1). *t gets the
// tanh, for the softcap's derivative 1 - t^2.
template <bool CAP>
GK_CE_INLINE float z_of(float x, float cap, float inv_cap, float* t) {
  if constexpr (CAP) {
    *t = vmath::tanh_finite(x * inv_cap);
    return x == x ? cap * *t : x;
  } else {
    *t = 0.f;
    return x;
  }
}

// z_j of n columns into buf (fp32). Only for 16-bit logits or a softcap: GCC 12 leaves the max and sum reductions
// below scalar when they read 16-bit elements (the plain conversion loop vectorizes), and the softcap's tanh is then
// computed once per element instead of once per pass.
template <typename T, bool CAP>
GPTKERNELS_ISA_CLONES void stage_z(const T* __restrict x, int64_t n, float cap, float inv_cap, float* __restrict buf) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float t;
    buf[j] = z_of<CAP>(load_f32(x[j]), cap, inv_cap, &t);
  }
}

// max_j z_j over n columns; a NaN z is skipped here (the sum below catches it), -inf for an all -inf block.
GPTKERNELS_ISA_CLONES float block_max(const float* __restrict z, int64_t n) {
  float mx = kNegInf;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = z[j] > mx ? z[j] : mx;
  return mx;
}

// sum_j exp(z_j - m) over n columns (m >= every z_j), and sum_j z_j into *zsum when SUMZ (label smoothing).
template <bool SUMZ>
GPTKERNELS_ISA_CLONES float block_exp_sum(const float* __restrict z, int64_t n, float m, float* zsum) {
  float s = 0.f, zs = 0.f;
#pragma omp simd reduction(+ : s, zs)
  for (int64_t j = 0; j < n; ++j) {
    s += vmath::exp_nonpos(z[j] - m);
    if constexpr (SUMZ) zs += z[j];
  }
  if constexpr (SUMZ) *zsum += zs;
  return s;
}

struct RowStats {
  float lse;
  float zsum;  // sum_j z_j when label smoothing needs it, else 0
};

// lse = log sum_j exp(z_j) of one row, in one pass over memory: blocks of kBlock columns (L1-resident: fp32 logits
// are read in place, others staged as fp32 z), an online max and a sum rescaled by exp(m_old - m_new) when it grows.
// All -inf: lse = -inf. A NaN z, or a +inf one (inf - inf), makes the sum and so lse NaN.
template <typename T, bool CAP, bool SUMZ>
RowStats row_stats(const T* x, int64_t V, float cap, float inv_cap) {
  constexpr bool kDirect = std::is_same<T, float>::value && !CAP;
  float buf[kDirect ? 1 : kBlock];
  float m = kNegInf, s = 0.f, zs = 0.f;
  for (int64_t b = 0; b < V; b += kBlock) {
    const int64_t n = std::min(kBlock, V - b);
    const float* z;
    if constexpr (kDirect) {
      z = x + b;
    } else {
      stage_z<T, CAP>(x + b, n, cap, inv_cap, buf);
      z = buf;
    }
    const float bm = block_max(z, n);
    if (bm > m) {
      s *= vmath::exp_nonpos(m - bm);  // m = -inf: s is 0 and stays 0
      m = bm;
    }
    s += block_exp_sum<SUMZ>(z, n, m == kNegInf ? 0.f : m, &zs);
  }
  return {(m == kNegInf ? 0.f : m) + std::log(s), zs};
}

// d loss / d x of one element for the non-target columns: (a * p - b) * cap', a = dl * (1 + 2 z_loss lse),
// b = dl * ls / V, p = exp(z - lse) (z - lse <= 0: lse >= max z).
template <bool CAP>
GK_CE_INLINE float grad_of(float x, float cap, float inv_cap, float lse, float a, float b) {
  float t;
  const float z = z_of<CAP>(x, cap, inv_cap, &t);
  const float g = a * vmath::exp_nonpos(z - lse) - b;
  if constexpr (CAP) return g * (1.f - t * t);
  return g;
}

template <typename T, bool CAP>
GPTKERNELS_ISA_CLONES void grad_row(const T* __restrict x, T* __restrict g, int64_t V, float cap, float inv_cap,
                                    float lse, float a, float b) {
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) g[j] = store_f32<T>(grad_of<CAP>(load_f32(x[j]), cap, inv_cap, lse, a, b));
}

// The same, overwriting the logits (one pointer: with two equal __restrict pointers the loop would be undefined,
// without __restrict GCC would not vectorize it).
template <typename T, bool CAP>
GPTKERNELS_ISA_CLONES void grad_row_inplace(T* __restrict xg, int64_t V, float cap, float inv_cap, float lse, float a,
                                            float b) {
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) xg[j] = store_f32<T>(grad_of<CAP>(load_f32(xg[j]), cap, inv_cap, lse, a, b));
}

// Writes row r's gradient given its lse; zt_x is the target column's logit, read before an in-place write.
template <typename T, bool CAP>
void write_grad(const T* xr, T* gr, int64_t V, int64_t t, float xt, float lse, float dl, const CeSpec& spec,
                float cap, float inv_cap) {
  const float ls = spec.label_smoothing;
  const float a = dl * (1.f + 2.f * spec.z_loss * lse);
  const float b = dl * ls / float(V);
  if (gr == xr) {
    grad_row_inplace<T, CAP>(gr, V, cap, inv_cap, lse, a, b);
  } else {
    grad_row<T, CAP>(xr, gr, V, cap, inv_cap, lse, a, b);
  }
  // The target column: the one-hot term, computed as its own element (not as a correction of the stored value,
  // which is rounded to T).
  float tt;
  const float zt = z_of<CAP>(xt, cap, inv_cap, &tt);
  float gt = a * vmath::exp_nonpos(zt - lse) - b - dl * (1.f - ls);
  if constexpr (CAP) gt *= 1.f - tt * tt;
  gr[t] = store_f32<T>(gt);
}

inline bool bad_target(int64_t t, int64_t V, int64_t ignore_index) {
  return t != ignore_index && (t < 0 || t >= V);
}

template <typename T>
void fill_row(T* g, int64_t V, float v) {
  std::fill(g, g + V, store_f32<T>(v));
}

template <typename T, bool CAP, bool SUMZ>
void fwd_impl(const T* x, int64_t stride_m, const int64_t* target, int64_t M, int64_t V, const CeSpec& spec,
              float* loss, float* lse_out, T* grad, int64_t stride_gm, const float* dloss, int64_t stride_dl) {
  const float cap = spec.softcap, inv_cap = CAP ? 1.f / spec.softcap : 0.f;
  // Rows are long (V elements each) and few per thread: small dynamic chunks balance a shared machine.
  parallel_for<2>(M * V >= kParallelMinWork, M, no_state, [&](NoState&, int64_t r) {
    const T* xr = x + r * stride_m;
    T* gr = grad ? grad + r * stride_gm : nullptr;
    const int64_t t = target[r];
    if (t == spec.ignore_index) {
      loss[r] = 0.f;
      lse_out[r] = 0.f;
      if (gr) fill_row(gr, V, 0.f);
      return;
    }
    if (t < 0 || t >= V) {
      loss[r] = lse_out[r] = kNaN;
      if (gr) fill_row(gr, V, kNaN);
      return;
    }
    const float xt = load_f32(xr[t]);
    const RowStats st = row_stats<T, CAP, SUMZ>(xr, V, cap, inv_cap);
    float tt;
    loss[r] = ce_row_loss(st.lse, z_of<CAP>(xt, cap, inv_cap, &tt), st.zsum, V, spec);
    lse_out[r] = st.lse;
    if (gr) write_grad<T, CAP>(xr, gr, V, t, xt, st.lse, dloss ? dloss[r * stride_dl] : 1.f, spec, cap, inv_cap);
  });
}

template <typename T, bool CAP>
void bwd_impl(const T* x, int64_t stride_m, const int64_t* target, const float* lse, const float* dloss,
              int64_t stride_dl, T* dx, int64_t M, int64_t V, const CeSpec& spec) {
  const float cap = spec.softcap, inv_cap = CAP ? 1.f / spec.softcap : 0.f;
  parallel_for<2>(M * V >= kParallelMinWork, M, no_state, [&](NoState&, int64_t r) {
    const T* xr = x + r * stride_m;
    T* gr = dx + r * V;
    const int64_t t = target[r];
    if (t == spec.ignore_index) {
      fill_row(gr, V, 0.f);
    } else if (t < 0 || t >= V) {
      fill_row(gr, V, kNaN);
    } else {
      write_grad<T, CAP>(xr, gr, V, t, load_f32(xr[t]), lse[r], dloss[r * stride_dl], spec, cap, inv_cap);
    }
  });
}

template <typename T>
int64_t fwd_typed(const void* x, int64_t stride_m, const int64_t* target, int64_t M, int64_t V, const CeSpec& spec,
                  float* loss, float* lse, void* grad, int64_t stride_gm, const float* dloss, int64_t stride_dl) {
  const T* xt = static_cast<const T*>(x);
  T* g = static_cast<T*>(grad);
  const bool cap = spec.softcap > 0.f, sumz = spec.label_smoothing != 0.f;
  if (cap && sumz) {
    fwd_impl<T, true, true>(xt, stride_m, target, M, V, spec, loss, lse, g, stride_gm, dloss, stride_dl);
  } else if (cap) {
    fwd_impl<T, true, false>(xt, stride_m, target, M, V, spec, loss, lse, g, stride_gm, dloss, stride_dl);
  } else if (sumz) {
    fwd_impl<T, false, true>(xt, stride_m, target, M, V, spec, loss, lse, g, stride_gm, dloss, stride_dl);
  } else {
    fwd_impl<T, false, false>(xt, stride_m, target, M, V, spec, loss, lse, g, stride_gm, dloss, stride_dl);
  }
  for (int64_t r = 0; r < M; ++r) {
    if (bad_target(target[r], V, spec.ignore_index)) return r;
  }
  return -1;
}

template <typename T>
void bwd_typed(const void* x, int64_t stride_m, const int64_t* target, const float* lse, const float* dloss,
               int64_t stride_dl, void* dx, int64_t M, int64_t V, const CeSpec& spec) {
  const T* xt = static_cast<const T*>(x);
  T* g = static_cast<T*>(dx);
  if (spec.softcap > 0.f) {
    bwd_impl<T, true>(xt, stride_m, target, lse, dloss, stride_dl, g, M, V, spec);
  } else {
    bwd_impl<T, false>(xt, stride_m, target, lse, dloss, stride_dl, g, M, V, spec);
  }
}

}  // namespace

int64_t cross_entropy_fwd_cpu(DType dtype, const void* logits, int64_t stride_m, const int64_t* target, int64_t M,
                              int64_t V, const CeSpec& spec, float* loss, float* lse, void* grad, int64_t stride_gm,
                              const float* dloss, int64_t stride_dl) {
  if (M <= 0 || V <= 0) return -1;
  switch (dtype) {
    case DType::kFloat32:
      return fwd_typed<float>(logits, stride_m, target, M, V, spec, loss, lse, grad, stride_gm, dloss, stride_dl);
    case DType::kFloat16:
      return fwd_typed<half_t>(logits, stride_m, target, M, V, spec, loss, lse, grad, stride_gm, dloss, stride_dl);
    case DType::kBFloat16:
      return fwd_typed<bf16_t>(logits, stride_m, target, M, V, spec, loss, lse, grad, stride_gm, dloss, stride_dl);
  }
  return -1;
}

void cross_entropy_bwd_cpu(DType dtype, const void* logits, int64_t stride_m, const int64_t* target, const float* lse,
                           const float* dloss, int64_t stride_dl, void* dlogits, int64_t M, int64_t V,
                           const CeSpec& spec) {
  if (M <= 0 || V <= 0) return;
  switch (dtype) {
    case DType::kFloat32:
      bwd_typed<float>(logits, stride_m, target, lse, dloss, stride_dl, dlogits, M, V, spec);
      break;
    case DType::kFloat16:
      bwd_typed<half_t>(logits, stride_m, target, lse, dloss, stride_dl, dlogits, M, V, spec);
      break;
    case DType::kBFloat16:
      bwd_typed<bf16_t>(logits, stride_m, target, lse, dloss, stride_dl, dlogits, M, V, spec);
      break;
  }
}

}  // namespace gptkernels
