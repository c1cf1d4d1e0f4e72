// vmath.h's exp variants against fp64 exp: the max relative errors quoted in vmath.h come from here (printed).
// Every 16th float bit pattern of each range, scalar and through a GCC vector (the attention kernels' lane type).
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

}  // namespace
}  // namespace test
}  // namespace gptkernels
