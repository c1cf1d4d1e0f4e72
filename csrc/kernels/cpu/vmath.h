// Vector-friendly exp for the CPU kernels: the one copy every kernel uses. Branch-free, so a plain loop over
// floats auto-vectorizes (libm's expf does not without -ffast-math / libmvec), and templated on the lane type F:
// float, or a GCC vector of floats (attention_impl.inc's vf), where the same source becomes zmm / ymm / xmm code.
//
// Two variants, by what the callers need at the ends of the range:
//   exp_nonpos(x), exp2_nonpos(x)  e^x and 2^x for softmax-style arguments (x = score - running max <= 0, up to
//                                  rounding). exp(-inf) == 0 exactly (a masked score contributes nothing), results
//                                  below 2^-126 flush to 0, NaN stays NaN; x is clamped above at 88 (2^x: 127).
//   exp_clamped(x)                 e^x with x clamped to [-87, 88] first, so 2^k stays normal and the result is
//                                  finite (>= e^-87 > 0): for sigmoid / GELU, 1 / (1 + e^x), where the clamp is
//                                  exact in fp32. No -inf / NaN handling beyond what the clamp does (NaN -> -87 or
//                                  88 depending on the compare; callers never pass NaN-sensitive values through).
// All of them: e^x = 2^k * e^r, k = round(x / ln2) (the 1.5 * 2^23 shifter rounds to nearest and leaves k in the
// low mantissa bits), r = x - k*ln2 in two parts (Cody-Waite; exact for |k| <= 128), |r| <= ln2/2, and e^r by its
// degree-7 Taylor polynomial (truncation r^8/8! < 6e-9). 2^x: k = round(x), r = (x - k) * ln2 (x - k is exact).
//
// Measured max relative error vs fp64 exp / exp2 (csrc/tests/test_vmath.cpp prints them), every 16th float bit
// pattern of the range, scalar and as an 8-lane vector (same numbers), GCC 12 on the 2-core EPYC (Zen 4):
//                                 no FMA (baseline x86-64, generic)   FMA (x86-64-v3: the avx2 / avx512 code)
//   exp_nonpos   on [-87, 0]      1.00e-7                             7.71e-8
//   exp2_nonpos  on [-126, 0]     1.00e-7                             7.72e-8
//   exp_clamped  on [-87, 88]     1.00e-7                             7.71e-8
// About 1 ulp; the test's bound is 1.5e-7. (The attention kernels' former 2^x, a degree-6 polynomial of 2^f,
// was documented at 1.3e-7.)
#pragma once

#include <cstdint>
#include <cstring>

// always_inline: the kernels call these from functions compiled for a wider ISA than the file's default
// (attention.cpp's target pragmas, softmax/mlp's target_clones); inlined, they are compiled for the caller's ISA.
#define GK_VMATH_INLINE inline __attribute__((always_inline))

// Instantiated for 32- and 64-byte vectors from AVX2 / AVX-512 code: GCC warns that passing such vectors by value
// from non-AVX code changes the ABI; these are always inlined, so no call with that ABI exists.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace gptkernels {
namespace vmath {

namespace detail {

template <class F>
struct int_of {
  using type = decltype(F{} < F{});  // a GCC float vector compares into the int vector of the same shape
};
template <>
struct int_of<float> {
  using type = int32_t;
};
template <class F>
using int_t = typename int_of<F>::type;

template <class F>
GK_VMATH_INLINE F splat(float c) {
  return F{} + c;  // broadcast for vectors; c itself for float
}

template <class F>
GK_VMATH_INLINE F vmin(F a, F b) {
  return a < b ? a : b;
}
template <class F>
GK_VMATH_INLINE F vmax(F a, F b) {
  return a > b ? a : b;
}

constexpr float kShifter = 12582912.f;  // 1.5 * 2^23
constexpr int32_t kShifterBits = 0x4B400000;

// e^r for |r| <= ln2/2: the degree-7 Taylor polynomial, Horner, highest power first.
template <class F>
GK_VMATH_INLINE F exp_poly(F r) {
  F p = splat<F>(1.f / 5040);
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  return p * r + 1.f;
}

// p(r) * 2^k for |r| <= ln2/2 (plus rounding), k (as the shifted float t's bits) in [-126, 127].
template <class F>
GK_VMATH_INLINE F exp_core(F r, F t) {
  const F p = exp_poly(r);
  const int_t<F> k = __builtin_bit_cast(int_t<F>, t) - kShifterBits;
  return p * __builtin_bit_cast(F, (k + 127) << 23);
}

// e^x for x already in [-87, 88].
template <class F>
GK_VMATH_INLINE F exp_in_range(F x) {
  const F t = x * 1.44269504088896341f + kShifter;
  const F k = t - kShifter;
  F r = x - k * 0.693145751953125f;  // ln2 high part: k * ln2_hi exact for |k| <= 128
  r = r - k * 1.428606765330187e-06f;  // ln2 low part
  return exp_core(r, t);
}

}  // namespace detail

template <class F>
GK_VMATH_INLINE F exp_clamped(F x) {
  using namespace detail;
  return exp_in_range(vmin(vmax(x, splat<F>(-87.f)), splat<F>(88.f)));
}

template <class F>
GK_VMATH_INLINE F exp_nonpos(F x) {
  using namespace detail;
  const F lo = splat<F>(-87.f);
  const F e = exp_in_range(vmin(vmax(x, lo), splat<F>(88.f)));
  return x >= lo ? e : (x == x ? F{} : x);  // below the range (and -inf): 0; NaN: NaN
}

template <class F>
GK_VMATH_INLINE F exp2_nonpos(F x) {
  using namespace detail;
  const F lo = splat<F>(-126.f);
  const F xc = vmin(vmax(x, lo), splat<F>(127.f));
  const F t = xc + kShifter;
  const F r = (xc - (t - kShifter)) * 0.693147180559945309f;
  const F e = exp_core(r, t);
  return x >= lo ? e : (x == x ? F{} : x);
}

// tanh for finite x (the attention softcap): x + x^3 P(x^2) below |x| = 0.625, P a degree-4 fit of relative error
// 4.4e-9 (Lawson-weighted least squares on [0, 0.625]), which keeps small arguments' relative digits; above,
// 1 - 2 / (e^{2|x|} + 1) with exp_clamped. Measured vs fp64 tanh on [-12, 12] every 2^-14 (2-core EPYC, GCC 12;
// FMA and SSE2 builds within 5% of each other): 7.5e-8 relative below 0.625, 7.9e-8 absolute above (1.4e-7
// relative at worst, near 0.64), about 1 ulp.
template <class F>
GK_VMATH_INLINE F tanh_finite(F x) {
  using namespace detail;
  const F ax = x < 0.f ? -x : x, t = x * x;
  F p = splat<F>(-5.704984383e-03f);
  p = p * t + 2.063908504e-02f;
  p = p * t - 5.373971446e-02f;
  p = p * t + 1.333144219e-01f;
  p = p * t - 3.333328194e-01f;
  const F small = ax + ax * t * p;
  const F big = 1.f - 2.f / (exp_clamped(ax + ax) + 1.f);
  const F r = ax < 0.625f ? small : big;
  return x < 0.f ? -r : r;
}

// Scalar float overloads (what the softmax and MLP loops call; GCC vectorizes the loops around them). Same math
// as the templates, written with plain scalar code: inlined into the target_clones loops of softmax.cpp and mlp.cpp,
// the template form ran GELU fwd/bwd and softmax fwd 6-13% slower at 1024x3072 fp32, one thread (2-core EPYC),
// for reasons in GCC's vectorizer this code does not pin down; these restore the previous speed.
inline float exp_clamped(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float t = x * 1.44269504088896341f + detail::kShifter;
  const float k = t - detail::kShifter;
  int32_t ki;
  std::memcpy(&ki, &t, sizeof ki);
  ki -= detail::kShifterBits;  // what remains of the shifter's bits is k
  float r = x - k * 0.693145751953125f;
  r = r - k * 1.428606765330187e-06f;
  const float p = detail::exp_poly(r);
  const int32_t sbits = (ki + 127) << 23;
  float scale;
  std::memcpy(&scale, &sbits, sizeof scale);
  return p * scale;
}

inline float exp_nonpos(float x) {
  // No upper clamp: for x <= 0 (softmax's z - rowmax is exactly <= 0 in fp32) 2^k stays <= 1.
  const float xc = x > -87.0f ? x : -87.0f;  // keeps 2^k normal and the int conversion in range
  const float kf = (xc * 1.44269504088896341f + detail::kShifter) - detail::kShifter;  // round(x / ln2)
  float r = xc - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  const float p = detail::exp_poly(r);
  const int32_t bits = (int32_t(kf) + 127) * (1 << 23);  // 2^k: k in [-126, 0]
  float two_k;
  std::memcpy(&two_k, &bits, sizeof two_k);
  const float e = p * two_k;
  return x >= -87.0f ? e : (x == x ? 0.0f : x);  // below the range (and -inf): 0; NaN: NaN
}

}  // namespace vmath
}  // namespace gptkernels

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
