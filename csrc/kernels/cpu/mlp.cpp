#include "mlp.h"

#include <cstring>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "dtype.h"
#include "isa.h"
#include "parallel.h"

// The fp32 loops carry target_clones: the extension is built for baseline x86-64 (SSE2), and GELU's exp is
// compute-heavy enough on 2 cores that 4-wide vectors would leave it compute-bound. GCC emits an AVX-512, an AVX2
// and a baseline copy of each loop and picks one at load time (ifunc), so the build stays portable.

// The clamps and ternaries of the loops below are if-converted into vector blends only when a comparison may be
// executed speculatively; under the default -ftrapping-math GCC 12 refused, and left every loop except the
// AVX-512 (masked) copies scalar. Nothing here reads floating-point exception flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

// After the pragma: vmath.h's exp is inlined into the loops below and must be compiled under the same option,
// or its clamps stay branches and the loops scalar (measured: GELU fwd 15% slower at 1024x3072).
#include "vmath.h"  // NOLINT(build/include_order)

namespace gptkernels {
namespace {

// exp(x) for x <= 0 (vmath.h): exp(-inf) = 0 exactly, NaN stays NaN, results below e^-87 flush to 0.
using vmath::exp_nonpos;

// 1 / (1 + e^-z) from e = e^-|z| in (0, 1]: sigmoid(-inf) = 0 exactly and NaN stays NaN, so silu(-inf) and
// gelu(-inf) are -inf * 0 = NaN, as in eager PyTorch. (The former 1 / (1 + exp_clamped(-z)) capped e^-z at e^88:
// sigmoid(-inf) came out 6e-39 and those became -inf.) -|z| is written as a select: with std::fabs GCC left the
// GELU-tanh loops unvectorized (bias_gelu fwd at 1024x3072 fp32, one thread: 58 ms vs 3.2 ms, 2-core EPYC).
inline float sigmoid(float z) {
  const float e = exp_nonpos(z < 0.f ? z : -z);
  return (z < 0.f ? e : 1.f) / (1.f + e);
}

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCoef = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// Phi(v) = P(N(0,1) <= v) and the density phi(v), sharing one exp. Abramowitz & Stegun 7.1.26 for erfc of
// |v|/sqrt2 (absolute error <= 1.5e-7; Phi measured within 2.9e-7 of fp64 on [-10, 10]), mirrored for v < 0: no
// cancellation in the negative tail, where GELU is small.
inline void normal_cdf_pdf(float v, float* cdf, float* pdf) {
  const float z = (v < 0.f ? -v : v) * kInvSqrt2;
  const float t = 1.f / (1.f + 0.3275911f * z);
  const float e = exp_nonpos(-z * z);  // 0 at |v| = inf: GELU'(+-inf) = c + v * pdf is NaN, as in eager PyTorch
  const float poly =
      t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float half_erfc = 0.5f * poly * e;
  *cdf = v < 0.f ? half_erfc : 1.f - half_erfc;
  *pdf = kInvSqrt2Pi * e;
}

// act(v) and act'(v) for one value v = x + bias.
template <Act A>
inline float act_fwd(float v) {
  if constexpr (A == Act::kGeluTanh) {
    // 0.5 v (1 + tanh(u)) == v * sigmoid(2u): one exp, no tanh.
    return v * sigmoid(2.f * kSqrt2OverPi * (v + kGeluCoef * v * v * v));
  } else if constexpr (A == Act::kGeluErf) {
    float c, p;
    normal_cdf_pdf(v, &c, &p);
    return v * c;
  } else {
    return v < 0.f ? 0.f : v;  // relu(NaN) = NaN (`v > 0 ? v : 0` returned 0)
  }
}

// Returns dy * act'(v); *y = act(v).
template <Act A>
inline float act_bwd(float v, float dy, float* y) {
  if constexpr (A == Act::kGeluTanh) {
    const float s = sigmoid(2.f * kSqrt2OverPi * (v + kGeluCoef * v * v * v));
    *y = v * s;
    return dy * (s + v * s * (1.f - s) * (2.f * kSqrt2OverPi) * (1.f + 3.f * kGeluCoef * v * v));
  } else if constexpr (A == Act::kGeluErf) {
    float c, p;
    normal_cdf_pdf(v, &c, &p);
    *y = v * c;
    return dy * (c + v * p);
  } else {
    // A select, as eager's threshold_backward: dy passes where v > 0 or v is NaN, and an inf dy where v <= 0 gives
    // 0, not 0 * inf = NaN.
    *y = v < 0.f ? 0.f : v;
    return v <= 0.f ? 0.f : dy;
  }
}

// ---- fp32 row loops (the hot part). b may be nullptr.
template <Act A>
GPTKERNELS_ISA_CLONES void fwd_row(const float* x, const float* b, float* y, int64_t n) {
  if (b) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] = act_fwd<A>(x[j] + b[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] = act_fwd<A>(x[j]);
  }
}

// dx = dy * act'(x + b); y = act(x + b) when WY; acc += dx when WACC. The optional outputs are template flags
// because a conditional store inside the loop kept GCC from vectorizing the AVX2 and SSE2 copies.
template <Act A, bool WY, bool WACC>
GPTKERNELS_ISA_CLONES void bwd_row_t(const float* dy, const float* x, const float* b, float* dx, float* y, float* acc,
                                     int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float yv;
    const float g = act_bwd<A>(x[j] + b[j], dy[j], &yv);
    dx[j] = g;
    if constexpr (WY) y[j] = yv;
    if constexpr (WACC) acc[j] += g;
  }
}

// b must be non-null here: the callers pass a zero row when there is no bias (N floats, negligible).
template <Act A>
void bwd_row(const float* dy, const float* x, const float* b, float* dx, float* y, float* acc, int64_t n) {
  if (y && acc)
    bwd_row_t<A, true, true>(dy, x, b, dx, y, acc, n);
  else if (y)
    bwd_row_t<A, true, false>(dy, x, b, dx, y, acc, n);
  else if (acc)
    bwd_row_t<A, false, true>(dy, x, b, dx, y, acc, n);
  else
    bwd_row_t<A, false, false>(dy, x, b, dx, y, acc, n);
}

GPTKERNELS_ISA_CLONES void silu_mul_fwd_f32(const float* g, const float* u, float* p, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) p[j] = g[j] * sigmoid(g[j]) * u[j];
}

template <bool WP>
GPTKERNELS_ISA_CLONES void silu_mul_bwd_t(const float* dp, const float* g, const float* u, float* dg, float* du,
                                          float* p, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float s = sigmoid(g[j]);
    const float silu = g[j] * s;
    dg[j] = dp[j] * u[j] * s * (1.f + g[j] * (1.f - s));
    du[j] = dp[j] * silu;
    if constexpr (WP) p[j] = silu * u[j];
  }
}

void silu_mul_bwd_f32(const float* dp, const float* g, const float* u, float* dg, float* du, float* p, int64_t n) {
  if (p)
    silu_mul_bwd_t<true>(dp, g, u, dg, du, p, n);
  else
    silu_mul_bwd_t<false>(dp, g, u, dg, du, p, n);
}

// ---- dtype adapters: 16-bit rows are staged through fp32 buffers so the loops above run on floats.
template <typename T>
void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = to_float(src[j]);
}
template <typename T>
void store_row(const float* src, T* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = from_float<T>(src[j]);
}

template <typename T, Act A>
void bias_fwd_impl(const T* x, const float* b, T* y, int64_t M, int64_t N) {
  // Reads x once, writes y once: 2*M*N*elsize (the bias row stays in L1/L2).
  const bool par = M * N >= kParallelMinWork;
  if constexpr (std::is_same_v<T, float>) {
    parallel_for(par, M, no_state, [&](NoState&, int64_t i) { fwd_row<A>(x + i * N, b, y + i * N, N); });
  } else {
    parallel_for(
        par, M, [&] { return std::vector<float>(N); },
        [&](std::vector<float>& buf, int64_t i) {
          load_row(x + i * N, buf.data(), N);
          fwd_row<A>(buf.data(), b, buf.data(), N);
          store_row(buf.data(), y + i * N, N);
        });
  }
}

template <typename T, Act A>
void bias_bwd_impl(const T* dy, const T* x, const float* b, T* dx, float* dbias, T* y, int64_t M, int64_t N) {
  // Per-thread fp32 partial rows of dbias, reduced at the end in thread order: deterministic for a thread count.
  const int nt = num_threads();
  std::vector<float> partial(dbias ? size_t(nt) * size_t(N) : 0, 0.f);
  std::vector<float> zero_bias(b ? 0 : N, 0.f);
  if (!b) b = zero_bias.data();
#pragma omp parallel num_threads(nt) if (M * N >= kParallelMinWork)
  {
    float* acc = dbias ? partial.data() + size_t(thread_id()) * size_t(N) : nullptr;
    constexpr bool f32 = std::is_same_v<T, float>;
    std::vector<float> bdy(f32 ? 0 : N), bx(f32 ? 0 : N), bdx(f32 ? 0 : N), by(f32 || !y ? 0 : N);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      if constexpr (f32) {
        bwd_row<A>(dy + i * N, x + i * N, b, dx + i * N, y ? y + i * N : nullptr, acc, N);
      } else {
        load_row(dy + i * N, bdy.data(), N);
        load_row(x + i * N, bx.data(), N);
        bwd_row<A>(bdy.data(), bx.data(), b, bdx.data(), y ? by.data() : nullptr, acc, N);
        store_row(bdx.data(), dx + i * N, N);
        if (y) store_row(by.data(), y + i * N, N);
      }
    }
  }
  if (dbias) {
#pragma omp parallel for schedule(static) if (M * N >= kParallelMinWork)
    for (int64_t j = 0; j < N; ++j) {
      float s = 0.f;
      for (int t = 0; t < nt; ++t) s += partial[size_t(t) * size_t(N) + j];
      dbias[j] = s;
    }
  }
}

// Flat elementwise work is cut into chunks so 16-bit data can be staged through small fp32 buffers.
constexpr int64_t kChunk = 4096;

template <typename T>
void silu_fwd_impl(const T* g, const T* u, T* p, int64_t numel) {
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
  constexpr size_t kStaged = std::is_same_v<T, float> ? 0 : size_t(2 * kChunk);  // 16-bit: fp32 g and u chunks
  parallel_for(
      numel >= kParallelMinWork, chunks, [] { return std::vector<float>(kStaged); },
      [&](std::vector<float>& buf, int64_t c) {
        const int64_t o = c * kChunk, n = numel - o < kChunk ? numel - o : kChunk;
        if constexpr (std::is_same_v<T, float>) {
          silu_mul_fwd_f32(g + o, u + o, p + o, n);
        } else {
          float *bg = buf.data(), *bu = buf.data() + kChunk;
          load_row(g + o, bg, n);
          load_row(u + o, bu, n);
          silu_mul_fwd_f32(bg, bu, bg, n);
          store_row(bg, p + o, n);
        }
      });
}

template <typename T>
void silu_bwd_impl(const T* dp, const T* g, const T* u, T* dg, T* du, T* p, int64_t numel) {
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
#pragma omp parallel if (numel >= kParallelMinWork)
  {
    std::vector<float> bdp(kChunk), bg(kChunk), bu(kChunk), bdg(kChunk), bdu(kChunk), bp(kChunk);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t o = c * kChunk, n = numel - o < kChunk ? numel - o : kChunk;
      if constexpr (std::is_same_v<T, float>) {
        silu_mul_bwd_f32(dp + o, g + o, u + o, dg + o, du + o, p ? p + o : nullptr, n);
      } else {
        load_row(dp + o, bdp.data(), n);
        load_row(g + o, bg.data(), n);
        load_row(u + o, bu.data(), n);
        silu_mul_bwd_f32(bdp.data(), bg.data(), bu.data(), bdg.data(), bdu.data(), p ? bp.data() : nullptr, n);
        store_row(bdg.data(), dg + o, n);
        store_row(bdu.data(), du + o, n);
        if (p) store_row(bp.data(), p + o, n);
      }
    }
  }
}

// dtype x activation switch: calls f(T{}, std::integral_constant<Act, A>{}).
template <typename F>
void dispatch(DType dt, Act act, F&& f) {
  auto with_act = [&](auto tag) {
    switch (act) {
      case Act::kGeluTanh:
        f(tag, std::integral_constant<Act, Act::kGeluTanh>{});
        break;
      case Act::kGeluErf:
        f(tag, std::integral_constant<Act, Act::kGeluErf>{});
        break;
      case Act::kRelu:
        f(tag, std::integral_constant<Act, Act::kRelu>{});
        break;
    }
  };
  switch (dt) {
    case DType::kFloat32:
      with_act(float{});
      break;
    case DType::kFloat16:
      with_act(half_t{});
      break;
    case DType::kBFloat16:
      with_act(bf16_t{});
      break;
  }
}

}  // namespace

void bias_gelu_fwd_cpu(DType dtype, Act act, const void* x, const float* bias, void* y, int64_t M, int64_t N) {
  dispatch(dtype, act, [&](auto tag, auto a) {
    using T = decltype(tag);
    bias_fwd_impl<T, decltype(a)::value>(static_cast<const T*>(x), bias, static_cast<T*>(y), M, N);
  });
}

void bias_gelu_bwd_cpu(DType dtype, Act act, const void* dy, const void* x, const float* bias, void* dx, float* dbias,
                       void* y, int64_t M, int64_t N) {
  dispatch(dtype, act, [&](auto tag, auto a) {
    using T = decltype(tag);
    bias_bwd_impl<T, decltype(a)::value>(static_cast<const T*>(dy), static_cast<const T*>(x), bias, static_cast<T*>(dx),
                                         dbias, static_cast<T*>(y), M, N);
  });
}

void silu_mul_fwd_cpu(DType dtype, const void* g, const void* u, void* p, int64_t numel) {
  dispatch(dtype, Act::kGeluTanh, [&](auto tag, auto) {
    using T = decltype(tag);
    silu_fwd_impl<T>(static_cast<const T*>(g), static_cast<const T*>(u), static_cast<T*>(p), numel);
  });
}

void silu_mul_bwd_cpu(DType dtype, const void* dp, const void* g, const void* u, void* dg, void* du, void* p,
                      int64_t numel) {
  dispatch(dtype, Act::kGeluTanh, [&](auto tag, auto) {
    using T = decltype(tag);
    silu_bwd_impl<T>(static_cast<const T*>(dp), static_cast<const T*>(g), static_cast<const T*>(u), static_cast<T*>(dg),
                     static_cast<T*>(du), static_cast<T*>(p), numel);
  });
}

}  // namespace gptkernels
