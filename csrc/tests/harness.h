// A self-contained test harness for the torch-free C++ kernels (no gtest: the build has no network), and the
// numerical helpers every kernel test needs: fixed-seed inputs, poisoned and guarded outputs, 16-bit dtype
// traits, and the error bounds of HOUSE_STYLE.md.
//
// A test file registers its cases at static-initialization time; test_cpu_kernels.cpp's main runs them all:
//
//   GK_TEST(softmax, rows_sum_to_one) { ... GK_CHECK(x == y); GK_CHECK_MSG(ok, "row " << i); ... }
//
//   GK_REGISTER(softmax_cases) {            // parametrized: one registered case per shape/dtype
//     for (int64_t N : kColumns) gk::add_test("softmax.fwd/N=" + std::to_string(N), [=] { run(N); });
//   }
//
// Checks do not abort a case: every failing check is counted, the first few of each case are printed.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "kernels/common.h"
#include "kernels/cpu/dtype.h"

namespace gptkernels {
namespace test {

// ---- registry and checks ---------------------------------------------------------------------------------------

struct TestCase {
  std::string name;
  std::function<void()> fn;
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> cases;  // function-local: safe to use from other files' static initializers
  return cases;
}

inline bool add_test(std::string name, std::function<void()> fn) {
  registry().push_back({std::move(name), std::move(fn)});
  return true;
}

struct CaseState {
  std::string name;
  int failures = 0;
};

inline CaseState*& current_case() {
  static CaseState* state = nullptr;
  return state;
}

constexpr int kMaxPrintedFailures = 8;

inline void fail(const char* file, int line, const std::string& message) {
  CaseState* s = current_case();
  if (s && s->failures >= kMaxPrintedFailures) {
    ++s->failures;
    return;
  }
  std::printf("    %s:%d: %s\n", file, line, message.c_str());
  if (s) ++s->failures;
}

// The largest (error / bound) seen per label over the whole run; main prints them, so a bound that is far too
// loose (or a kernel that sits just under its bound) is visible without failing.
inline std::map<std::string, double>& margins() {
  static std::map<std::string, double> m;
  return m;
}

inline void record_margin(const std::string& label, double ratio) {
  double& worst = margins()[label];
  if (!std::isnan(worst) && !(ratio <= worst)) worst = ratio;  // a NaN ratio sticks
}

}  // namespace test
}  // namespace gptkernels

namespace gk = gptkernels::test;

#define GK_CHECK(cond)                                                                    \
  do {                                                                                    \
    if (!(cond)) ::gptkernels::test::fail(__FILE__, __LINE__, "CHECK(" #cond ") failed"); \
  } while (0)

#define GK_CHECK_MSG(cond, stream_expr)                           \
  do {                                                            \
    if (!(cond)) {                                                \
      std::ostringstream gk_os_;                                  \
      gk_os_ << "CHECK(" #cond ") failed: " << stream_expr;       \
      ::gptkernels::test::fail(__FILE__, __LINE__, gk_os_.str()); \
    }                                                             \
  } while (0)

#define GK_CONCAT_(a, b) a##b
#define GK_CONCAT(a, b) GK_CONCAT_(a, b)

// GK_TEST(group, name) { body }: one case named "group.name".
#define GK_TEST(group, name)                                                                                     \
  static void GK_CONCAT(gk_test_, GK_CONCAT(group, GK_CONCAT(_, name)))();                                       \
  static const bool GK_CONCAT(gk_registered_, GK_CONCAT(group, GK_CONCAT(_, name))) =                            \
      ::gptkernels::test::add_test(#group "." #name, GK_CONCAT(gk_test_, GK_CONCAT(group, GK_CONCAT(_, name)))); \
  static void GK_CONCAT(gk_test_, GK_CONCAT(group, GK_CONCAT(_, name)))()

// GK_REGISTER(name) { body }: runs body at static-initialization time, to add_test() parametrized cases.
#define GK_REGISTER(name)                                                                      \
  static void GK_CONCAT(gk_register_, name)();                                                 \
  static const bool GK_CONCAT(gk_registered_, name) = (GK_CONCAT(gk_register_, name)(), true); \
  static void GK_CONCAT(gk_register_, name)()

namespace gptkernels {
namespace test {

// ---- dtypes ------------------------------------------------------------------------------------------------------

template <typename T>
struct Traits;
template <>
struct Traits<float> {
  static constexpr DType dtype = DType::kFloat32;
  static constexpr const char* name = "fp32";
  static constexpr int mant_bits = 23;  // explicit mantissa bits
  static constexpr int min_exp = -126;  // exponent of the smallest normal
};
template <>
struct Traits<half_t> {
  static constexpr DType dtype = DType::kFloat16;
  static constexpr const char* name = "fp16";
  static constexpr int mant_bits = 10;
  static constexpr int min_exp = -14;
};
template <>
struct Traits<bf16_t> {
  static constexpr DType dtype = DType::kBFloat16;
  static constexpr const char* name = "bf16";
  static constexpr int mant_bits = 7;
  static constexpr int min_exp = -126;
};

// Spacing of T's representable numbers at magnitude |v| (the ulp of the binade |v| is in; constant below the
// smallest normal).
template <typename T>
double ulp(double v) {
  v = std::fabs(v);
  const int e = v < std::ldexp(1.0, Traits<T>::min_exp) ? Traits<T>::min_exp : std::ilogb(v);
  return std::ldexp(1.0, e - Traits<T>::mant_bits);
}

inline double as_double(float v) { return v; }
inline double as_double(half_t v) { return to_float(v); }
inline double as_double(bf16_t v) { return to_float(v); }

// ---- inputs and outputs --------------------------------------------------------------------------------------------

// Fixed seed per case (from its name), so a failing case reproduces when run alone (main's filter argument).
inline std::mt19937 rng_for(const std::string& case_name) {
  std::seed_seq seq(case_name.begin(), case_name.end());
  return std::mt19937(seq);
}

// n values mean + stddev * N(0, 1), rounded to T (the reference then reads the rounded values).
template <typename T>
std::vector<T> randn(std::mt19937& gen, size_t n, float mean = 0.f, float stddev = 1.f) {
  std::normal_distribution<float> dist(mean, stddev);
  std::vector<T> v(n);
  for (auto& x : v) x = from_float<T>(dist(gen));
  return v;
}

// An output buffer: poisoned with all-ones bytes (NaN in fp32, fp16 and bf16) so an element the kernel never
// writes fails the comparison, followed by a guard region that must come back untouched (out-of-bounds writes
// are caught even without ASan).
template <typename T>
class Output {
 public:
  explicit Output(size_t n) : n_(n), v_(n + kGuard) {
    std::memset(static_cast<void*>(v_.data()), 0xff, n * sizeof(T));
    std::memset(static_cast<void*>(v_.data() + n), kGuardByte, kGuard * sizeof(T));
  }
  T* data() { return v_.data(); }
  const T* data() const { return v_.data(); }
  size_t size() const { return n_; }
  const T& operator[](size_t i) const { return v_[i]; }
  bool guard_intact() const {
    const auto* g = reinterpret_cast<const unsigned char*>(v_.data() + n_);
    for (size_t i = 0; i < kGuard * sizeof(T); ++i)
      if (g[i] != kGuardByte) return false;
    return true;
  }

 private:
  static constexpr size_t kGuard = 16;
  static constexpr unsigned char kGuardByte = 0xa5;
  size_t n_;
  std::vector<T> v_;
};

// ---- comparisons ---------------------------------------------------------------------------------------------------

// Norm-wise bound for outputs computed in fp32:  ||got - ref||_2 <= tol * ||scale||_2.
// scale[i] >= |ref[i]| is the magnitude of the terms that were summed to make ref[i] (e.g. |xhat*w| + |b|). It
// equals |ref| when nothing cancels, which makes this the house rule ||got - ref|| / ||ref|| <= tol; where the
// terms cancel, fp32 cannot return more digits of the difference than it had of the terms, in any
// implementation, so the bound follows the terms. Pass scale = nullptr to use |ref|. NaN never passes.
template <typename T>
bool check_norm(const std::string& label, const T* got, const double* ref, const double* scale, size_t n, double tol) {
  double err2 = 0.0, scale2 = 0.0;
  size_t worst = 0;
  double worst_err = -1.0;
  for (size_t i = 0; i < n; ++i) {
    const double e = std::fabs(as_double(got[i]) - ref[i]);
    if (!(e <= worst_err)) {
      worst_err = e;
      worst = i;
    }
    err2 += e * e;
    const double s = scale ? scale[i] : ref[i];
    scale2 += s * s;
  }
  const double err = std::sqrt(err2), bound = tol * std::sqrt(scale2);
  record_margin(label, bound > 0 ? err / bound : (err == 0 ? 0.0 : err));
  const bool ok = err <= bound;  // also fails on NaN; an all-zero reference needs an exact zero
  GK_CHECK_MSG(ok, label << ": ||err|| " << err << " > " << tol << " * ||scale|| = " << bound << "; worst [" << worst
                         << "] got " << (n ? as_double(got[worst]) : 0.0) << " ref " << (n ? ref[worst] : 0.0));
  return ok;
}

// Element-wise bound for 16-bit outputs of fp32 math:  |got - ref| <= ulp_T(|ref|) + abs_tol * scale.
// The kernel rounds an fp32 result once to T, which costs up to 0.5 ulp; another 0.5 ulp covers an fp32 result
// that lands on the other side of a rounding midpoint than the exact one, and at a binade edge where ref sits just
// below a power of two. abs_tol * scale is the fp32 arithmetic itself (relative to the terms, see check_norm).
template <typename T>
bool check_ulp(const std::string& label, const T* got, const double* ref, const double* scale, size_t n,
               double abs_tol) {
  size_t bad = 0, worst = 0;
  double worst_ratio = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double e = std::fabs(as_double(got[i]) - ref[i]);
    const double bound = ulp<T>(ref[i]) + abs_tol * scale[i];
    const double ratio = e / bound;
    if (!(ratio <= worst_ratio)) {
      worst_ratio = ratio;
      worst = i;
    }
    if (!(e <= bound)) ++bad;
  }
  record_margin(label, worst_ratio);
  GK_CHECK_MSG(bad == 0, label << ": " << bad << " of " << n << " elements exceed ulp + " << abs_tol
                               << " * scale; worst [" << worst << "] got " << as_double(got[worst]) << " ref "
                               << ref[worst] << " (" << worst_ratio << " x bound)");
  return bad == 0;
}

// Bitwise equality of 16-bit or fp32 storage.
template <typename T>
bool check_bits(const std::string& label, const T* got, const T* want, size_t n) {
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < n; ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0 && bad++ == 0) first = i;
  }
  GK_CHECK_MSG(bad == 0, label << ": " << bad << " of " << n << " elements differ; first [" << first << "] got "
                               << as_double(got[first]) << " want " << as_double(want[first]));
  return bad == 0;
}

}  // namespace test
}  // namespace gptkernels
