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

}  // namespace gptkernels
