#include "softmax.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "dtype.h"
#include "isa.h"
#include "parallel.h"

// The row loops below are plain C++ that GCC vectorizes, but only if it may if-convert the float comparisons of
// the exp's range check and of the row max: with trapping math (GCC's default) it must not evaluate a
// comparison the source evaluates conditionally, and the AVX2 build of a loop stays scalar. Nothing here reads
// floating-point exception flags. After the includes, so the library headers keep their own options.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

// After the pragma: vmath.h's exp is inlined into the loops below and must be compiled under the same option,
// or its clamps stay branches and the loops scalar (measured: GELU fwd 15% slower at 1024x3072).
#include "vmath.h"  // NOLINT(build/include_order)

namespace gptkernels {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for x <= 0 (x = z - rowmax): vmath.h's, exp(-inf) = 0 exactly, NaN stays NaN.
using vmath::exp_nonpos;

// The forward makes three passes over a row, the eager-PyTorch structure: (1) the max of the logits, reading x
// only; (2) e = exp(logit - max) and its sum, re-reading x from L1/L2 and writing e (into y itself for fp32, into
// an fp32 row buffer for 16-bit, which is rounded only once, after normalizing); (3) y = e / sum. The logits
// scale * x + mask are recomputed in pass 2 rather than staged: measured at (4096, 4096) fp32 on the 2-core EPYC
// VM, 1 thread, CPU time p50 of 30: 9.9 ms this way, 12.9 ms with an fp32 staging buffer written in pass 1.
// `add` is a constant added to every logit (a mask broadcast along the row, else 0); `mask` (nullable) a row of
// per-column additive values.

// max_j (scale * x[j] + add + mask[j]) for j < n; -inf when every logit is -inf.
template <typename T>
GPTKERNELS_ISA_CLONES float logits_max(const T* __restrict x, const float* __restrict mask, float add, float scale,
                                       int64_t n) {
  float mx = kNegInf;
  if (mask == nullptr) {
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; ++j) {
      const float v = scale * load_f32(x[j]) + add;
      mx = v > mx ? v : mx;
    }
  } else {
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; ++j) {
      const float v = scale * load_f32(x[j]) + mask[j];
      mx = v > mx ? v : mx;
    }
  }
  return mx;
}

// e[j] = exp(scale * x[j] + add + mask[j] - m) for j < n; returns sum_j e[j].
template <typename T>
GPTKERNELS_ISA_CLONES float logits_exp_sum(const T* __restrict x, const float* __restrict mask, float add, float scale,
                                           float m, float* __restrict e, int64_t n) {
  float s = 0.f;
  // The logits are rounded exactly as in logits_max, so logit - m <= 0 and the max entry gives exp(0) = 1.
  if (mask == nullptr) {
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) {
      const float v = exp_nonpos((scale * load_f32(x[j]) + add) - m);
      e[j] = v;
      s += v;
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) {
      const float v = exp_nonpos((scale * load_f32(x[j]) + mask[j]) - m);
      e[j] = v;
      s += v;
    }
  }
  return s;
}

GPTKERNELS_ISA_CLONES void scale_inplace(float* __restrict y, float a, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] *= a;
}

template <typename T>
GPTKERNELS_ISA_CLONES void store_scaled(const float* __restrict e, float a, T* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] = store_f32<T>(e[j] * a);
}

// sum_j y[j] * dy[j] in fp32.
template <typename T>
GPTKERNELS_ISA_CLONES float dot(const T* __restrict y, const T* __restrict dy, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += load_f32(y[j]) * load_f32(dy[j]);
  return s;
}

// dx[j] = scale * y[j] * (dy[j] - c), dz[j] = y[j] * (dy[j] - c) when dz != nullptr. Re-reads y and dy from
// L1/L2 (dot just pulled them in).
template <typename T>
GPTKERNELS_ISA_CLONES void bwd_row(const T* __restrict y, const T* __restrict dy, float c, float scale,
                                   T* __restrict dx, float* __restrict dz, int64_t n) {
  if (dz) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float g = load_f32(y[j]) * (load_f32(dy[j]) - c);
      dz[j] = g;
      dx[j] = store_f32<T>(scale * g);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dx[j] = store_f32<T>(scale * (load_f32(y[j]) * (load_f32(dy[j]) - c)));
  }
}

template <typename T>
void fwd_impl(const T* x, int64_t stride_xm, T* y, const float* mask, int64_t B, int64_t H, int64_t T_, int64_t N,
              int64_t smb, int64_t smh, int64_t smt, int64_t smn, float scale, bool causal) {
  const int64_t M = B * H * T_;
  constexpr bool kF32 = std::is_same<T, float>::value;
  // Rows are handed out in small dynamic chunks: causal rows vary in length (t + 1 live columns), and on a shared
  // machine a preempted thread's rows are picked up by the others instead of stalling the call.
  parallel_for<16>(
      M * N >= kParallelMinWork, M,
      [&] { return std::vector<float>(kF32 ? 0 : static_cast<size_t>(N)); },  // 16-bit: the fp32 row of exps
      [&](std::vector<float>& buf, int64_t r) {
        const int64_t t = r % T_;
        const int64_t n = causal ? std::min(N, t + 1) : N;  // the live columns; the rest is exactly 0
        const float* mrow = nullptr;
        float add = 0.f;
        if (mask) {
          const int64_t bh = r / T_;
          const float* m = mask + (bh / H) * smb + (bh % H) * smh + t * smt;
          if (smn == 0) {
            add = m[0];
          } else {
            mrow = m;
          }
        }
        const T* xr = x + r * stride_xm;
        T* yr = y + r * N;
        const float mx = logits_max<T>(xr, mrow, add, scale, n);
        // A fully masked row (max -inf) would give logit - max = NaN; shifting by 0 gives exp(-inf) = 0, sum 0.
        const float shift = mx == kNegInf ? 0.f : mx;
        // fp32: the exps go straight into y and are scaled in place; 16-bit: into the fp32 row buffer.
        float* e = buf.data();
        if constexpr (kF32) e = yr;
        const float s = logits_exp_sum<T>(xr, mrow, add, scale, shift, e, n);
        // s == 0 only for a fully masked row (e is all 0; y stays 0). A NaN or +inf logit makes s NaN (the max
        // above skips a NaN, but its exp joins the sum; +inf gives inf - inf), and then the whole row is NaN, as in
        // eager PyTorch: a `s > 0 ? 1 / s : 0` guard here turned those rows into zeros around one NaN.
        const float inv = s == 0.f ? 0.f : 1.0f / s;
        if constexpr (kF32) {
          scale_inplace(yr, inv, n);
        } else {
          store_scaled<T>(e, inv, yr, n);
        }
        // Columns past the causal limit: exp(-inf - max) * inv, i.e. 0, or NaN in a NaN row (as torch.softmax on
        // logits masked_fill'ed with -inf, and as the Triton and CUDA kernels).
        std::fill(yr + n, yr + N, store_f32<T>(0.f * inv));
      });
}

template <typename T>
void bwd_impl(const T* y, const T* dy, int64_t stride_dym, T* dx, float* dz, int64_t M, int64_t N, float scale) {
  parallel_for<16>(M * N >= kParallelMinWork, M, no_state, [&](NoState&, int64_t r) {
    const T* yr = y + r * N;
    const T* dyr = dy + r * stride_dym;
    const float c = dot<T>(yr, dyr, N);
    bwd_row<T>(yr, dyr, c, scale, dx + r * N, dz ? dz + r * N : nullptr, N);
  });
}

}  // namespace

void softmax_fwd_cpu(DType dtype, const void* x, int64_t stride_xm, void* y, const float* mask, int64_t B, int64_t H,
                     int64_t T, int64_t N, int64_t smb, int64_t smh, int64_t smt, int64_t smn, float scale,
                     bool causal) {
  switch (dtype) {
    case DType::kFloat32:
      fwd_impl<float>(static_cast<const float*>(x), stride_xm, static_cast<float*>(y), mask, B, H, T, N, smb, smh, smt,
                      smn, scale, causal);
      break;
    case DType::kFloat16:
      fwd_impl<half_t>(static_cast<const half_t*>(x), stride_xm, static_cast<half_t*>(y), mask, B, H, T, N, smb, smh,
                       smt, smn, scale, causal);
      break;
    case DType::kBFloat16:
      fwd_impl<bf16_t>(static_cast<const bf16_t*>(x), stride_xm, static_cast<bf16_t*>(y), mask, B, H, T, N, smb, smh,
                       smt, smn, scale, causal);
      break;
  }
}

void softmax_bwd_cpu(DType dtype, const void* y, const void* dy, int64_t stride_dym, void* dx, float* dz, int64_t M,
                     int64_t N, float scale) {
  switch (dtype) {
    case DType::kFloat32:
      bwd_impl<float>(static_cast<const float*>(y), static_cast<const float*>(dy), stride_dym, static_cast<float*>(dx),
                      dz, M, N, scale);
      break;
    case DType::kFloat16:
      bwd_impl<half_t>(static_cast<const half_t*>(y), static_cast<const half_t*>(dy), stride_dym,
                       static_cast<half_t*>(dx), dz, M, N, scale);
      break;
    case DType::kBFloat16:
      bwd_impl<bf16_t>(static_cast<const bf16_t*>(y), static_cast<const bf16_t*>(dy), stride_dym,
                       static_cast<bf16_t*>(dx), dz, M, N, scale);
      break;
  }
}

}  // namespace gptkernels
