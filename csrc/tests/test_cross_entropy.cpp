// Cross-entropy CPU kernels (csrc/kernels/cpu/cross_entropy.h) against an fp64 reference written here (CeSpec's
// math), for fp32, fp16 and bf16, with label smoothing, z-loss and softcap: the forward's loss and lse, the gradient
// fused into the forward (out of place with a per-row dloss, in place with dloss = 1) and the backward from the saved
// lse with a stride-0 dloss; ignored rows, an out-of-range target, and column counts on both sides of the kernel's
// 2048-column blocks.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "harness.h"
#include "kernels/cpu/cross_entropy.h"

namespace gptkernels {
namespace {

struct Shape {
  int64_t M, V;
};
constexpr Shape kShapes[] = {{7, 1}, {9, 3}, {6, 123}, {4, 2048}, {3, 2049}, {2, 4097}, {2, 65537}, {0, 7}};
constexpr int64_t kIgnore = -100;
constexpr double kRelTol = 1e-5;

struct Opts {
  const char* name;
  float ls, zl, cap;
};
constexpr Opts kOpts[] = {{"plain", 0.f, 0.f, 0.f},
                          {"ls", 0.1f, 0.f, 0.f},
                          {"zloss", 0.f, 1e-2f, 0.f},
                          {"softcap", 0.f, 0.f, 5.f},
                          {"all", 0.2f, 1e-3f, 3.f}};

struct RowRef {
  double lse, loss;
  std::vector<double> grad, scale;  // d loss / dx for dloss = 1, and the magnitude of its terms
};

template <typename T>
RowRef reference_row(const T* x, int64_t V, int64_t t, const CeSpec& s) {
  RowRef r;
  std::vector<double> z(static_cast<size_t>(V)), th(static_cast<size_t>(V));
  double m = -std::numeric_limits<double>::infinity(), zsum = 0;
  for (int64_t j = 0; j < V; ++j) {
    const double xv = gk::as_double(x[j]);
    th[size_t(j)] = s.softcap > 0 ? std::tanh(xv / s.softcap) : 0.0;
    z[size_t(j)] = s.softcap > 0 ? s.softcap * th[size_t(j)] : xv;
    m = std::max(m, z[size_t(j)]);
    zsum += z[size_t(j)];
  }
  double sum = 0;
  for (int64_t j = 0; j < V; ++j) sum += std::exp(z[size_t(j)] - m);
  r.lse = m + std::log(sum);
  const double ls = s.label_smoothing, nll = r.lse - z[size_t(t)];
  r.loss = (ls != 0 ? (1 - ls) * nll + ls * (r.lse - zsum / double(V)) : nll) + s.z_loss * r.lse * r.lse;
  r.grad.resize(size_t(V));
  r.scale.resize(size_t(V));
  for (int64_t j = 0; j < V; ++j) {
    const double p = std::exp(z[size_t(j)] - r.lse);
    const double d = s.softcap > 0 ? 1 - th[size_t(j)] * th[size_t(j)] : 1.0;
    const double a = p * (1 + 2 * s.z_loss * r.lse), b = ls / double(V), c = j == t ? 1 - ls : 0.0;
    r.grad[size_t(j)] = (a - b - c) * d;
    r.scale[size_t(j)] = (std::fabs(a) + b + c) * d;
  }
  return r;
}

template <typename T>
void check_grad(const std::string& label, const T* got, const std::vector<double>& ref,
                const std::vector<double>& scale) {
  if constexpr (std::is_same_v<T, float>) {
    gk::check_norm(label, got, ref.data(), scale.data(), ref.size(), kRelTol);
  } else {
    gk::check_ulp(label, got, ref.data(), scale.data(), ref.size(), kRelTol);
  }
}

template <typename T>
void run_case(const std::string& name, Shape shape, Opts o) {
  const int64_t M = shape.M, V = shape.V;
  const size_t MV = size_t(M * V), Ms = size_t(M);
  std::mt19937 gen = gk::rng_for(name);
  const std::vector<T> x = gk::randn<T>(gen, MV, 0.f, 3.f);
  std::uniform_int_distribution<int64_t> cls(0, V - 1);
  std::vector<int64_t> target(Ms);
  for (auto& t : target) t = cls(gen);
  if (M >= 2) target[1] = kIgnore;  // an ignored row: loss 0, gradient 0
  const std::vector<float> dloss = gk::randn<float>(gen, Ms);
  CeSpec spec;
  spec.ignore_index = kIgnore;
  spec.label_smoothing = o.ls;
  spec.z_loss = o.zl;
  spec.softcap = o.cap;
  const DType dt = gk::Traits<T>::dtype;

  // fp64 references; ignored rows are all zeros.
  std::vector<double> loss_ref(Ms, 0.0), loss_scale(Ms, 0.0), lse_ref(Ms, 0.0), g1(MV, 0.0), g1s(MV, 0.0),
      gd(MV, 0.0), gds(MV, 0.0), g0(MV, 0.0), g0s(MV, 0.0);
  const float dl0 = M > 0 ? dloss[0] : 0.f;  // the stride-0 dloss of the backward check
  for (int64_t i = 0; i < M; ++i) {
    if (target[size_t(i)] == kIgnore) continue;
    const RowRef r = reference_row(x.data() + i * V, V, target[size_t(i)], spec);
    loss_ref[size_t(i)] = r.loss;
    lse_ref[size_t(i)] = r.lse;
    loss_scale[size_t(i)] = std::fabs(r.lse) * (1 + spec.z_loss * std::fabs(r.lse)) + std::fabs(r.lse - r.loss);
    for (int64_t j = 0; j < V; ++j) {
      const size_t k = size_t(i * V + j);
      g1[k] = r.grad[size_t(j)];
      g1s[k] = r.scale[size_t(j)];
      gd[k] = dloss[size_t(i)] * r.grad[size_t(j)];
      gds[k] = std::fabs(dloss[size_t(i)]) * r.scale[size_t(j)];
      g0[k] = dl0 * r.grad[size_t(j)];
      g0s[k] = std::fabs(dl0) * r.scale[size_t(j)];
    }
  }

  // 1. forward only; 2. forward + gradient out of place with a per-row dloss.
  for (int with_grad = 0; with_grad < 2; ++with_grad) {
    gk::Output<float> loss(Ms), lse(Ms);
    gk::Output<T> grad(MV);
    const int64_t bad = cross_entropy_fwd_cpu(dt, x.data(), V, target.data(), M, V, spec, loss.data(), lse.data(),
                                              with_grad ? grad.data() : nullptr, V, dloss.data(), 1);
    const std::string l = name + (with_grad ? "/fused" : "/fwd");
    GK_CHECK_MSG(bad == -1, l << ": reported bad row " << bad);
    gk::check_norm(l + " loss", loss.data(), loss_ref.data(), loss_scale.data(), Ms, kRelTol);
    gk::check_norm(l + " lse", lse.data(), lse_ref.data(), nullptr, Ms, kRelTol);
    if (with_grad) check_grad(l + " grad", grad.data(), gd, gds);
    GK_CHECK(loss.guard_intact() && lse.guard_intact() && grad.guard_intact());
  }
  // 3. in place, dloss = 1.
  {
    gk::Output<T> xg(MV);
    std::copy(x.begin(), x.end(), xg.data());
    gk::Output<float> loss(Ms), lse(Ms);
    cross_entropy_fwd_cpu(dt, xg.data(), V, target.data(), M, V, spec, loss.data(), lse.data(), xg.data(), V, nullptr,
                          0);
    gk::check_norm(name + "/inplace loss", loss.data(), loss_ref.data(), loss_scale.data(), Ms, kRelTol);
    check_grad(name + "/inplace grad", xg.data(), g1, g1s);
    GK_CHECK(xg.guard_intact());
  }
  // 4. backward from the forward's lse, dloss read through stride 0.
  {
    gk::Output<float> loss(Ms), lse(Ms);
    cross_entropy_fwd_cpu(dt, x.data(), V, target.data(), M, V, spec, loss.data(), lse.data(), nullptr, 0, nullptr,
                          0);
    gk::Output<T> dx(MV);
    cross_entropy_bwd_cpu(dt, x.data(), V, target.data(), lse.data(), dloss.data(), 0, dx.data(), M, V, spec);
    check_grad(name + "/bwd grad", dx.data(), g0, g0s);
    GK_CHECK(dx.guard_intact());
  }
}

GK_REGISTER(cross_entropy_cases) {
  for (const Shape& s : kShapes) {
    for (const Opts& o : kOpts) {
      const std::string shape = "/M=" + std::to_string(s.M) + ",V=" + std::to_string(s.V) + "/" + o.name;
      gk::add_test("cross_entropy.fp32" + shape, [=] { run_case<float>("cross_entropy.fp32" + shape, s, o); });
      if (s.V > 4097) continue;  // the widest rows in fp32 only (time under ASan)
      gk::add_test("cross_entropy.fp16" + shape, [=] { run_case<half_t>("cross_entropy.fp16" + shape, s, o); });
      gk::add_test("cross_entropy.bf16" + shape, [=] { run_case<bf16_t>("cross_entropy.bf16" + shape, s, o); });
    }
  }
}

// A target outside [0, V) that is not ignore_index: reported (the first such row), its loss, lse and gradient NaN,
// the other rows untouched, and no read outside the row.
GK_TEST(cross_entropy, bad_target_is_reported_and_nan) {
  const int64_t M = 4, V = 10;
  std::mt19937 gen = gk::rng_for("cross_entropy.bad_target");
  const std::vector<float> x = gk::randn<float>(gen, size_t(M * V));
  const std::vector<int64_t> target = {3, 10, kIgnore, -1};
  CeSpec spec;
  spec.ignore_index = kIgnore;
  gk::Output<float> loss(M), lse(M), grad(size_t(M * V));
  const int64_t bad = cross_entropy_fwd_cpu(DType::kFloat32, x.data(), V, target.data(), M, V, spec, loss.data(),
                                            lse.data(), grad.data(), V, nullptr, 0);
  GK_CHECK_MSG(bad == 1, "first bad row " << bad);
  GK_CHECK(std::isfinite(loss[0]) && std::isnan(loss[1]) && loss[2] == 0.f && std::isnan(loss[3]));
  for (int64_t j = 0; j < V; ++j) {
    GK_CHECK(std::isnan(grad[size_t(V + j)]) && grad[size_t(2 * V + j)] == 0.f && std::isnan(grad[size_t(3 * V + j)]));
  }
}

// NaN in a counted row makes its loss and whole gradient NaN (never hidden by the max); NaN in an ignored row is
// never read.
GK_TEST(cross_entropy, nan_logit_poisons_its_row_only) {
  const int64_t M = 3, V = 3000;  // the NaN sits in the second 2048-column block
  std::mt19937 gen = gk::rng_for("cross_entropy.nan");
  std::vector<float> x = gk::randn<float>(gen, size_t(M * V));
  x[size_t(0 * V + 2500)] = std::numeric_limits<float>::quiet_NaN();
  x[size_t(2 * V + 7)] = std::numeric_limits<float>::quiet_NaN();
  const std::vector<int64_t> target = {5, 6, kIgnore};
  for (const float cap : {0.f, 4.f}) {
    CeSpec spec;
    spec.ignore_index = kIgnore;
    spec.softcap = cap;
    spec.label_smoothing = 0.1f;
    gk::Output<float> loss(M), lse(M), grad(size_t(M * V));
    cross_entropy_fwd_cpu(DType::kFloat32, x.data(), V, target.data(), M, V, spec, loss.data(), lse.data(),
                          grad.data(), V, nullptr, 0);
    GK_CHECK(std::isnan(loss[0]) && std::isfinite(loss[1]) && loss[2] == 0.f);
    for (int64_t j = 0; j < V; ++j) {
      GK_CHECK(std::isnan(grad[size_t(j)]) && std::isfinite(grad[size_t(V + j)]) && grad[size_t(2 * V + j)] == 0.f);
    }
  }
}

}  // namespace
}  // namespace gptkernels
