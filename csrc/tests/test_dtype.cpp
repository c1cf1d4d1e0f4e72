// The fp16 / bf16 conversions of csrc/kernels/cpu/dtype.h: hand-picked values with known bit patterns (ties,
// subnormals, inf/nan, overflow), every 16-bit pattern decoded and re-encoded, and the float -> 16-bit rounding
// against an independent fp64 reference on every tie and its neighbours plus a million spread floats.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include "harness.h"

namespace gptkernels {
namespace {

float f32(uint32_t bits) { return bits_to_float(bits); }
float pow2(int e) { return std::ldexp(1.0f, e); }

bool half_is_nan(uint16_t b) { return (b & 0x7c00u) == 0x7c00u && (b & 0x3ffu) != 0; }
bool bf16_is_nan(uint16_t b) { return (b & 0x7f80u) == 0x7f80u && (b & 0x7fu) != 0; }

// Independent round-to-nearest-even of a float to a format with `mant` explicit mantissa bits, smallest normal
// exponent `emin` and all-ones exponent for inf/nan: scale |f| so one unit in the last place is 1, let
// nearbyint (ties to even in the default rounding mode) round it in fp64, where the scaling is exact.
// Returns the 16-bit pattern. Overflow (a rounded value at or past the all-ones exponent) gives inf.
uint16_t ref_round(float f, int mant, int emin, uint16_t inf_bits, uint16_t nan_bits) {
  const uint16_t sign = std::signbit(f) ? uint16_t(1u << 15) : uint16_t(0);
  if (std::isnan(f)) return uint16_t(sign | nan_bits);
  const double a = std::fabs(double(f));
  if (std::isinf(a)) return uint16_t(sign | inf_bits);
  if (a == 0.0) return sign;
  const int e = std::max(std::ilogb(a), emin);
  const double r = std::nearbyint(std::ldexp(a, mant - e));  // in [0, 2^(mant+1)]
  // bits = biased exponent (e - emin) << mant, plus r, which carries the implicit 1 (r >= 2^mant) into the
  // exponent field; r == 2^(mant+1) (rounded up to the next binade) and subnormals fall out of the same sum.
  const uint32_t bits = (uint32_t(e - emin) << mant) + uint32_t(r);
  if (bits >= inf_bits) return uint16_t(sign | inf_bits);
  return uint16_t(sign | bits);
}
uint16_t ref_half(float f) { return ref_round(f, 10, -14, 0x7c00u, 0x7e00u); }
uint16_t ref_bf16(float f) { return ref_round(f, 7, -126, 0x7f80u, 0x7fc0u); }

// fp16 decode from the IEEE definition, in fp64.
double ref_half_value(uint16_t b) {
  const int s = b >> 15, e = (b >> 10) & 0x1f, m = b & 0x3ff;
  double v;
  if (e == 0) {
    v = std::ldexp(double(m), -24);
  } else if (e == 31) {
    v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else {
    v = std::ldexp(1.0 + m / 1024.0, e - 15);
  }
  return s ? -v : v;
}

// Compares one float's encoding with the reference; NaN outputs only need to be NaN of the right sign.
template <typename T>
int check_encode(float f, uint16_t want, bool (*is_nan)(uint16_t)) {
  const uint16_t got = from_float<T>(f).bits;
  const bool ok = is_nan(want) ? (is_nan(got) && (got >> 15) == (want >> 15)) : got == want;
  GK_CHECK_MSG(ok, gk::Traits<T>::name << " from_float(" << f << " = 0x" << std::hex << float_to_bits(f) << ") = 0x"
                                       << got << ", want 0x" << want << std::dec);
  return ok ? 0 : 1;
}

struct Case {
  float value;
  uint16_t bits;
};

}  // namespace

GK_TEST(dtype, half_hand_picked) {
  const Case cases[] = {
      {0.0f, 0x0000},
      {-0.0f, 0x8000},
      {1.0f, 0x3c00},
      {-2.0f, 0xc000},
      {0.333251953125f, 0x3555},  // exactly representable
      {65504.0f, 0x7bff},         // largest finite
      // ties between neighbours go to the even mantissa
      {1.0f + pow2(-11), 0x3c00},              // 1 | 1+2^-10: even is 1
      {1.0f + 3 * pow2(-11), 0x3c02},          // 1+2^-10 | 1+2^-9: even is 1+2^-9
      {1.0f + pow2(-11) + pow2(-20), 0x3c01},  // just above a tie rounds up
      {1.0f + pow2(-11) - pow2(-20), 0x3c00},  // just below rounds down
      {-(1.0f + 3 * pow2(-11)), 0xbc02},
      // overflow: 65520 is the tie between 65504 (odd) and 65536 (even, not representable): inf
      {65519.99609375f, 0x7bff},
      {65520.0f, 0x7c00},
      {65536.0f, 0x7c00},
      {-65520.0f, 0xfc00},
      {1e10f, 0x7c00},
      {std::numeric_limits<float>::max(), 0x7c00},
      // subnormals: k * 2^-24
      {pow2(-24), 0x0001},
      {pow2(-25), 0x0000},              // tie 0 | 2^-24: even is 0
      {pow2(-25) + pow2(-40), 0x0001},  // above the tie
      {3 * pow2(-26), 0x0001},          // 0.75 * 2^-24
      {3 * pow2(-25), 0x0002},          // tie 1 | 2: even is 2
      {5 * pow2(-25), 0x0002},          // tie 2 | 3: even is 2
      {1023 * pow2(-24), 0x03ff},       // largest subnormal
      {1023.5f * pow2(-24), 0x0400},    // tie 0x3ff | 0x400 (smallest normal, even)
      {pow2(-14), 0x0400},              // smallest normal
      {-pow2(-24), 0x8001},
      {1e-10f, 0x0000},            // underflow to zero
      {-1e-10f, 0x8000},           // keeps the sign
      {f32(0x00000001u), 0x0000},  // fp32 subnormal
      {std::numeric_limits<float>::infinity(), 0x7c00},
      {-std::numeric_limits<float>::infinity(), 0xfc00},
      {std::numeric_limits<float>::quiet_NaN(), 0x7e00},
      {f32(0x7f800001u), 0x7e00},  // signalling NaN stays NaN, not inf
      {f32(0xffc00000u), 0xfe00},
  };
  for (const Case& c : cases) {
    check_encode<half_t>(c.value, c.bits, half_is_nan);
    GK_CHECK_MSG(ref_half(c.value) == c.bits || half_is_nan(c.bits), "reference itself disagrees on " << c.value);
  }
  // decode
  GK_CHECK(to_float(half_t{0x0001}) == pow2(-24));
  GK_CHECK(to_float(half_t{0x8001}) == -pow2(-24));
  GK_CHECK(to_float(half_t{0x03ff}) == 1023 * pow2(-24));
  GK_CHECK(to_float(half_t{0x0400}) == pow2(-14));
  GK_CHECK(to_float(half_t{0x3c00}) == 1.0f);
  GK_CHECK(to_float(half_t{0x7bff}) == 65504.0f);
  GK_CHECK(to_float(half_t{0x3555}) == 0.333251953125f);
  GK_CHECK(std::signbit(to_float(half_t{0x8000})) && to_float(half_t{0x8000}) == 0.0f);
  GK_CHECK(to_float(half_t{0x7c00}) == std::numeric_limits<float>::infinity());
  GK_CHECK(to_float(half_t{0xfc00}) == -std::numeric_limits<float>::infinity());
  GK_CHECK(std::isnan(to_float(half_t{0x7e00})));
  GK_CHECK(std::isnan(to_float(half_t{0x7c01})));
}

GK_TEST(dtype, bf16_hand_picked) {
  const Case cases[] = {
      {0.0f, 0x0000},
      {-0.0f, 0x8000},
      {1.0f, 0x3f80},
      {-2.0f, 0xc000},
      {1.0f + pow2(-8), 0x3f80},              // tie 1 | 1+2^-7: even is 1
      {1.0f + 3 * pow2(-8), 0x3f82},          // tie 1+2^-7 | 1+2^-6: even is 1+2^-6
      {1.0f + pow2(-8) + pow2(-20), 0x3f81},  // just above a tie
      {f32(0x3f808000u), 0x3f80},             // the same ties written as bits
      {f32(0x3f818000u), 0x3f82},
      {f32(0x3f807fffu), 0x3f80},
      {f32(0x7f7f0000u), 0x7f7f},  // largest finite bf16
      {f32(0x7f7f7fffu), 0x7f7f},  // below the tie with 2^128
      {f32(0x7f7f8000u), 0x7f80},  // the tie: 0x7f7f is odd, rounds to inf
      {std::numeric_limits<float>::max(), 0x7f80},
      {-std::numeric_limits<float>::max(), 0xff80},
      // fp32 subnormals are bf16 subnormals (same exponent range)
      {f32(0x00010000u), 0x0001},
      {f32(0x00000001u), 0x0000},
      {f32(0x00008000u), 0x0000},  // tie 0 | 0x0001: even is 0
      {f32(0x00018000u), 0x0002},  // tie 1 | 2: even is 2
      {f32(0x007f8000u), 0x0080},  // tie between the largest subnormal and the smallest normal
      {f32(0x80008001u), 0x8001},
      {std::numeric_limits<float>::infinity(), 0x7f80},
      {-std::numeric_limits<float>::infinity(), 0xff80},
      {std::numeric_limits<float>::quiet_NaN(), 0x7fc0},
      {f32(0x7f800001u), 0x7fc0},  // signalling NaN with only low payload bits: truncation alone would give inf
      {f32(0xff800001u), 0xffc0},
      {f32(0x7fffffffu), 0x7fc0},  // NaN with all mantissa bits set must not carry into the sign
  };
  for (const Case& c : cases) {
    check_encode<bf16_t>(c.value, c.bits, bf16_is_nan);
    GK_CHECK_MSG(ref_bf16(c.value) == c.bits || bf16_is_nan(c.bits), "reference itself disagrees on " << c.value);
  }
  GK_CHECK(to_float(bf16_t{0x3f80}) == 1.0f);
  GK_CHECK(to_float(bf16_t{0x0001}) == f32(0x00010000u));
  GK_CHECK(to_float(bf16_t{0x7f7f}) == f32(0x7f7f0000u));
  GK_CHECK(to_float(bf16_t{0x7f80}) == std::numeric_limits<float>::infinity());
  GK_CHECK(to_float(bf16_t{0xff80}) == -std::numeric_limits<float>::infinity());
  GK_CHECK(std::isnan(to_float(bf16_t{0x7fc0})));
  GK_CHECK(std::isnan(to_float(bf16_t{0x7f81})));
}

// Every fp16 pattern: decodes to its IEEE value, and encodes back to itself (NaNs to a NaN of the same sign).
GK_TEST(dtype, half_all_patterns_round_trip) {
  int bad = 0;
  for (uint32_t b = 0; b <= 0xffffu && bad < 8; ++b) {
    const float f = to_float(half_t{uint16_t(b)});
    const double want = ref_half_value(uint16_t(b));
    const bool decode_ok = std::isnan(want) ? std::isnan(f) : double(f) == want;
    GK_CHECK_MSG(decode_ok, "to_float(half 0x" << std::hex << b << std::dec << ") = " << f << ", want " << want);
    bad += !decode_ok;
    bad += check_encode<half_t>(f, uint16_t(b), half_is_nan);
  }
}

GK_TEST(dtype, bf16_all_patterns_round_trip) {
  int bad = 0;
  for (uint32_t b = 0; b <= 0xffffu && bad < 8; ++b) {
    const float f = to_float(bf16_t{uint16_t(b)});
    const bool decode_ok = float_to_bits(f) == (b << 16);
    GK_CHECK_MSG(decode_ok, "to_float(bf16 0x" << std::hex << b << std::dec << ") = " << f);
    bad += !decode_ok;
    bad += check_encode<bf16_t>(f, uint16_t(b), bf16_is_nan);
  }
}

// Every tie between consecutive 16-bit values (an exact float), the floats one ulp either side of it, and
// a million floats spread over all exponents, against the fp64 reference.
template <typename T>
void encode_matches_reference(uint16_t (*ref)(float), bool (*is_nan)(uint16_t)) {
  int bad = 0;
  for (uint32_t b = 0; b < 0xffffu && bad < 8; ++b) {
    const float lo = to_float(T{uint16_t(b)}), hi = to_float(T{uint16_t(b + 1)});
    if (!std::isfinite(lo) || !std::isfinite(hi) || std::signbit(lo) != std::signbit(hi)) continue;
    const float mid = float((double(lo) + double(hi)) / 2);  // exact: one more bit than T has
    for (float f : {std::nextafter(mid, -INFINITY), mid, std::nextafter(mid, INFINITY)}) {
      bad += check_encode<T>(f, ref(f), is_nan);
    }
  }
  std::mt19937 gen(12345);
  for (int i = 0; i < 1000000 && bad < 8; ++i) {
    const float f = bits_to_float(uint32_t(gen()));
    bad += check_encode<T>(f, ref(f), is_nan);
  }
  // 65504..65536 and the fp16 overflow edge, densely (every float there)
  for (uint32_t u = float_to_bits(65504.0f); u <= float_to_bits(65536.0f) && bad < 8; ++u) {
    bad += check_encode<T>(bits_to_float(u), ref(bits_to_float(u)), is_nan);
  }
}

GK_TEST(dtype, half_encode_matches_fp64_reference) { encode_matches_reference<half_t>(ref_half, half_is_nan); }
GK_TEST(dtype, bf16_encode_matches_fp64_reference) { encode_matches_reference<bf16_t>(ref_bf16, bf16_is_nan); }

}  // namespace gptkernels
