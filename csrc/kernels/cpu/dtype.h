// Torch-free 16-bit float storage types for the CPU kernels, with round-to-nearest-even conversions.
// Their layout matches at::Half / at::BFloat16, so the glue can pass data pointers straight through.
#pragma once
#include <cstdint>
#include <cstring>

namespace gptkernels {

struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float to_float(float x) { return x; }
inline float to_float(bf16_t x) { return bits_to_float(uint32_t(x.bits) << 16); }
inline float to_float(half_t x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1fu;
  const uint32_t mant = x.bits & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    const float f = float(mant) * (1.0f / 16777216.0f);
    return sign ? -f : f;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

template <typename T>
T from_float(float f);

template <>
inline float from_float<float>(float f) {
  return f;
}

template <>
inline bf16_t from_float<bf16_t>(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40u)};  // keep NaN a (quiet) NaN
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);                           // round to nearest even
  return bf16_t{uint16_t(rounded >> 16)};
}

template <>
inline half_t from_float<half_t>(float f) {
  uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u >= 0x47800000u) {  // |f| >= 65536, inf or nan (65520..65536 overflow through rounding below)
    return half_t{uint16_t(sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  }
  if (u < 0x38800000u) {  // result is subnormal or zero: let the FPU round by adding 0.5f
    const float shifted = bits_to_float(u) + 0.5f;
    return half_t{uint16_t(sign | uint16_t(float_to_bits(shifted) - 0x3f000000u))};
  }
  const uint32_t mant_odd = (u >> 13) & 1u;
  u += 0xc8000fffu + mant_odd;  // rebias the exponent by -112 and round to nearest even
  return half_t{uint16_t(sign | uint16_t(u >> 13))};
}

// Loads of one element as fp32, written so that GCC inlines and vectorizes them in every ISA clone (to_float's
// half conversion above branches).
inline __attribute__((always_inline)) float load_f32(float v) { return v; }
inline __attribute__((always_inline)) float load_f32(bf16_t v) {
  const uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline __attribute__((always_inline)) float load_f32(half_t v) {
  // Shifting the 15 exponent+mantissa bits into fp32 position and multiplying by 2^112 rebiases the exponent;
  // subnormal halves land on fp32 subnormals and come out exact too. Inf/NaN (exponent 31) are set directly.
  const uint32_t em = uint32_t(v.bits & 0x7fffu);
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  float f;
  const uint32_t shifted = em << 13;
  std::memcpy(&f, &shifted, sizeof f);
  f *= 0x1p112f;
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u = em >= 0x7c00u ? (shifted | 0x7f800000u) : u;
  u |= sign;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Branch-free fp32 -> 16-bit stores, round to nearest even: from_float above (same results) branches.
// Every case is computed and the right one selected, so a row loop of them vectorizes.
template <typename T>
inline __attribute__((always_inline)) T store_f32(float f);
template <>
inline __attribute__((always_inline)) float store_f32<float>(float f) {
  return f;
}
template <>
inline __attribute__((always_inline)) bf16_t store_f32<bf16_t>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return bf16_t{uint16_t((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded)};
}
template <>
inline __attribute__((always_inline)) half_t store_f32<half_t>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  // |f| >= 65520 rounds to inf (the normal path below gets there too, except exactly at 2^16 and beyond)
  const uint32_t big = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // subnormal or zero result: adding 0.5f lets the FPU round at the 2^-24 position
  float a;
  std::memcpy(&a, &u, sizeof a);
  a += 0.5f;
  uint32_t ab;
  std::memcpy(&ab, &a, sizeof ab);
  const uint32_t small = ab - 0x3f000000u;
  const uint32_t normal = (u + 0xc8000fffu + ((u >> 13) & 1u)) >> 13;  // rebias by -112, round to nearest even
  const uint32_t h = u >= 0x47800000u ? big : (u < 0x38800000u ? small : normal);
  return half_t{uint16_t(sign | h)};
}

}  // namespace gptkernels
