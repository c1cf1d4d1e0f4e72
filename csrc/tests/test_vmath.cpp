// vmath.h's exp variants against fp64 exp: the max relative errors quoted in vmath.h come from here (printed).
// Every 16th float bit pattern of each range, scalar and through a GCC vector (the attention kernels' lane type).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "harness.h"
#include "kernels/cpu/vmath.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // v8f by value in non-AVX builds: all inlined
#endif

namespace gptkernels {
namespace test {
namespace {

typedef float v8f __attribute__((vector_size(32)));
#ifdef __FMA__
constexpr int kFma = 1;
#else
constexpr int kFma = 0;
#endif

// Max relative error of fn vs ref over every `step`-th float bit pattern in [lo, hi] (lo < 0 <= hi or hi <= 0).
template <class Fn, class Ref>
double max_rel_err(float lo, float hi, Fn fn, Ref ref, uint32_t step = 16) {
  double worst = 0;
  auto check = [&](float x) {
    const double r = ref(double(x));
    const double e = std::fabs(double(fn(x)) - r) / r;
    worst = e > worst || e != e ? e : worst;
  };
  auto walk = [&](float a, float sign) {  // |x| from 0 up to |a|
    const float mag = std::fabs(a);
    uint32_t end;
    std::memcpy(&end, &mag, 4);
    for (uint32_t u = 0; u <= end; u += step) {
      float x;
      std::memcpy(&x, &u, 4);
      check(sign * x);
    }
  };
  if (lo < 0) walk(lo, -1.f);
  if (hi > 0) walk(hi, 1.f);
  return worst;
}

GK_TEST(vmath, exp_accuracy_and_ends) {
  using namespace vmath;
  auto e = [](double x) { return std::exp(x); };
  auto e2 = [](double x) { return std::exp2(x); };
  const double nonpos = max_rel_err(-87.f, 0.f, [](float x) { return exp_nonpos(x); }, e);
  const double nonpos_v = max_rel_err(-87.f, 0.f, [](float x) { return exp_nonpos(x - v8f{})[5]; }, e);
  const double nonpos2 = max_rel_err(-126.f, 0.f, [](float x) { return exp2_nonpos(x); }, e2);
  const double nonpos2_v = max_rel_err(-126.f, 0.f, [](float x) { return exp2_nonpos(x - v8f{})[2]; }, e2);
  const double clamped = max_rel_err(-87.f, 88.f, [](float x) { return exp_clamped(x); }, e);
  std::printf("  vmath max rel err vs fp64: exp_nonpos [-87,0] %.3e (vector %.3e), exp2_nonpos [-126,0] %.3e "
              "(vector %.3e), exp_clamped [-87,88] %.3e (FMA: %d)\n", nonpos, nonpos_v, nonpos2, nonpos2_v, clamped, kFma);
  for (double err : {nonpos, nonpos_v, nonpos2, nonpos2_v, clamped}) GK_CHECK_MSG(err <= 1.5e-7, "max rel err " << err);
  GK_CHECK(exp_nonpos(-INFINITY) == 0.f && exp2_nonpos(-INFINITY) == 0.f);
  GK_CHECK(exp_nonpos(-100.f) == 0.f && exp2_nonpos(-200.f) == 0.f);
  GK_CHECK(std::isnan(exp_nonpos(NAN)) && std::isnan(exp2_nonpos(NAN)));
  GK_CHECK(exp_nonpos(0.f) == 1.f && exp2_nonpos(0.f) == 1.f && exp2_nonpos(-3.f) == 0.125f);
  const v8f v = exp2_nonpos(v8f{} - INFINITY);
  GK_CHECK(v[0] == 0.f && v[7] == 0.f);
  GK_CHECK(exp_clamped(-1000.f) > 0.f && std::isfinite(exp_clamped(1000.f)));
}

GK_TEST(vmath, tanh_finite_accuracy) {
  using namespace vmath;
  // Relative error below |x| = 0.625 (x = 0 excluded: tanh(0) = 0 exactly), absolute above, where tanh nears +-1.
  double rel = 0, abs_err = 0;
  for (float x = -12.f; x <= 12.f; x += 1.f / 16384) {
    const double r = std::tanh(double(x)), e = std::fabs(double(tanh_finite(x)) - r);
    if (std::fabs(x) < 0.625f) {
      if (x != 0.f) rel = std::max(rel, e / std::fabs(r));
    } else {
      abs_err = std::max(abs_err, e);
    }
  }
  std::printf("  tanh_finite: %.3e relative below 0.625, %.3e absolute above (FMA: %d)\n", rel, abs_err, kFma);
  GK_CHECK_MSG(rel <= 1.5e-7, "relative " << rel);
  GK_CHECK_MSG(abs_err <= 1.5e-7, "absolute " << abs_err);
  GK_CHECK(tanh_finite(0.f) == 0.f && tanh_finite(-0.3f) == -tanh_finite(0.3f));
  const v8f v = tanh_finite(v8f{-3.f, -0.5f, -0.1f, 0.f, 0.1f, 0.5f, 3.f, 12.f});
  const float xs[8] = {-3.f, -0.5f, -0.1f, 0.f, 0.1f, 0.5f, 3.f, 12.f};
  for (int i = 0; i < 8; ++i) GK_CHECK(v[i] == tanh_finite(xs[i]));  // the vector form is the scalar one
}

}  // namespace
}  // namespace test
}  // namespace gptkernels
