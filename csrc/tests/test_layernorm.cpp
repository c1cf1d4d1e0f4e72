// LayerNorm / RMSNorm CPU kernels (csrc/kernels/cpu/layernorm.h) against an fp64 reference written here, for
// fp32, fp16 and bf16, every combination of residual / bias / rms, forward and backward (dx with and without dh,
// dw, db), on the column counts that break kernels.
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "harness.h"
#include "kernels/cpu/layernorm.h"

namespace gptkernels {
namespace {

struct Shape {
  int64_t M, N;
};
// The 65537-column row is kept to M = 2 so a case stays in milliseconds under ASan; M = 1 and M = 0 check
// that a thread with no rows and an empty batch (dw, db must come back zero, not poison) are handled.
constexpr Shape kShapes[] = {{67, 1},   {67, 3},   {67, 7},    {33, 123}, {19, 781},
                             {9, 1023}, {5, 4097}, {2, 65537}, {1, 123},  {0, 7}};
constexpr float kEps = 1e-5f;

// fp32 outputs: the house bound, relative to the magnitude of the summed terms (see gk::check_norm).
constexpr double kRelTol = 1e-5;
// fp16 / bf16 outputs: ulp_T(|ref|) + kRelTol * terms (see gk::check_ulp). The reference runs on the same
// rounded 16-bit inputs, so only the output rounding and the fp32 arithmetic are measured.
constexpr double kAbsTolTerms = kRelTol;

struct Flags {
  bool residual, bias, rms;
};

template <typename T>
void check_out(const std::string& label, const T* got, const double* ref, const double* scale, size_t n) {
  if constexpr (std::is_same_v<T, float>) {
    gk::check_norm(label, got, ref, scale, n, kRelTol);
  } else {
    gk::check_ulp(label, got, ref, scale, n, kAbsTolTerms);
  }
}

template <typename T>
void run_case(const std::string& name, Shape shape, Flags f) {
  const int64_t M = shape.M, N = shape.N;
  const size_t Ms = size_t(M), Ns = size_t(N), MN = Ms * Ns;
  const DType dt = gk::Traits<T>::dtype;
  const std::string tn = gk::Traits<T>::name;
  std::mt19937 gen = gk::rng_for(name);

  // Inputs. Each row gets its own offset in [-4, 4], so LayerNorm's mean is far from zero next to a unit spread
  // (a one-pass E[h^2] - E[h]^2 would lose digits there).
  std::uniform_real_distribution<float> offset(-4.f, 4.f);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<T> x(MN);
  for (int64_t i = 0; i < M; ++i) {
    const float off = offset(gen);
    for (int64_t j = 0; j < N; ++j) x[size_t(i * N + j)] = from_float<T>(off + normal(gen));
  }
  const std::vector<T> residual = gk::randn<T>(gen, f.residual ? MN : 0, 0.f, 0.5f);
  const std::vector<float> weight = gk::randn<float>(gen, Ns, 1.f, 0.5f);
  const std::vector<float> bias = gk::randn<float>(gen, Ns, 0.f, 1.f);
  const std::vector<T> dy = gk::randn<T>(gen, MN);
  const std::vector<T> dh = gk::randn<T>(gen, MN);

  // h = x + residual rounded to T the way the op defines it (PyTorch's x + r: an fp32 add, one rounding); the
  // kernel must produce these exact bits, and all statistics come from the rounded h.
  std::vector<T> h_ref(x);
  for (size_t k = 0; k < residual.size(); ++k) h_ref[k] = from_float<T>(to_float(x[k]) + to_float(residual[k]));

  // ---- fp64 forward reference. *_scale: the magnitudes of the terms each output sums (see gk::check_norm).
  std::vector<double> y_ref(MN), y_scale(MN), xhat(MN), mean_ref(Ms), mean_scale(Ms), rstd_ref(Ms);
  for (int64_t i = 0; i < M; ++i) {
    const T* hr = h_ref.data() + i * N;
    double s = 0, sa = 0;
    for (int64_t j = 0; j < N; ++j) {
      s += gk::as_double(hr[j]);
      sa += std::fabs(gk::as_double(hr[j]));
    }
    const double mu = f.rms ? 0.0 : s / double(N);
    double ss = 0;
    for (int64_t j = 0; j < N; ++j) ss += (gk::as_double(hr[j]) - mu) * (gk::as_double(hr[j]) - mu);
    const double rs = 1.0 / std::sqrt(ss / double(N) + double(kEps));
    mean_ref[size_t(i)] = mu;
    mean_scale[size_t(i)] = sa / double(N);
    rstd_ref[size_t(i)] = rs;
    for (int64_t j = 0; j < N; ++j) {
      const size_t k = size_t(i * N + j);
      const double hv = gk::as_double(hr[j]), b = f.bias ? bias[size_t(j)] : 0.0;
      xhat[k] = (hv - mu) * rs;
      y_ref[k] = xhat[k] * weight[size_t(j)] + b;
      // mean's sum runs over |h| sized terms, so it carries an error relative to mean|h|, not to |mean|
      y_scale[k] =
          (std::fabs(hv) + (f.rms ? 0.0 : mean_scale[size_t(i)])) * rs * std::fabs(weight[size_t(j)]) + std::fabs(b);
    }
  }

  // ---- forward
  gk::Output<T> y(MN), h(f.residual ? MN : 0);
  gk::Output<float> mean(Ms), rstd(Ms);
  layernorm_fwd_cpu(dt, x.data(), f.residual ? residual.data() : nullptr, weight.data(), f.bias ? bias.data() : nullptr,
                    y.data(), f.residual ? h.data() : nullptr, f.rms ? nullptr : mean.data(), rstd.data(), M, N, kEps,
                    f.rms);
  check_out("layernorm.fwd.y " + tn, y.data(), y_ref.data(), y_scale.data(), MN);
  if (f.residual) gk::check_bits("layernorm.fwd.h " + tn, h.data(), h_ref.data(), MN);
  if (!f.rms) {
    gk::check_norm("layernorm.fwd.mean " + tn, mean.data(), mean_ref.data(), mean_scale.data(), Ms, kRelTol);
  }
  gk::check_norm("layernorm.fwd.rstd " + tn, rstd.data(), rstd_ref.data(), nullptr, Ms, kRelTol);
  GK_CHECK(y.guard_intact() && h.guard_intact() && mean.guard_intact() && rstd.guard_intact());

  // ---- backward, fed the reference statistics rounded to fp32 (what a correct forward saves), so it is tested
  // on its own. Run without and with dh; dw and db must not depend on dh, bit for bit.
  std::vector<float> mean_f(Ms), rstd_f(Ms);
  for (int64_t i = 0; i < M; ++i) {
    mean_f[size_t(i)] = float(mean_ref[size_t(i)]);
    rstd_f[size_t(i)] = float(rstd_ref[size_t(i)]);
  }
  std::vector<double> dw_ref(Ns, 0.0), dw_scale(Ns, 0.0), db_ref(Ns, 0.0), db_scale(Ns, 0.0);
  for (size_t k = 0; k < MN; ++k) {
    const size_t j = k % Ns;
    const double g = gk::as_double(dy[k]);
    dw_ref[j] += g * xhat[k];
    dw_scale[j] += std::fabs(g * xhat[k]);
    db_ref[j] += g;
    db_scale[j] += std::fabs(g);
  }
  std::vector<float> dw_first;
  for (const bool with_dh : {false, true}) {
    std::vector<double> dx_ref(MN), dx_scale(MN);
    for (int64_t i = 0; i < M; ++i) {
      // c1 = mean_j(wdy * xhat), c2 = mean_j(wdy); a1, a2: the means of their terms' magnitudes, which set the
      // fp32 error of c1 and c2 (the sums cancel: |c1| ~ a1 / sqrt(N) for random dy).
      double c1 = 0, c2 = 0, a1 = 0, a2 = 0;
      for (int64_t j = 0; j < N; ++j) {
        const size_t k = size_t(i * N + j);
        const double wdy = weight[size_t(j)] * gk::as_double(dy[k]);
        c1 += wdy * xhat[k];
        c2 += wdy;
        a1 += std::fabs(wdy * xhat[k]);
        a2 += std::fabs(wdy);
      }
      c1 /= double(N);
      a1 /= double(N);
      c2 = f.rms ? 0.0 : c2 / double(N);
      a2 = f.rms ? 0.0 : a2 / double(N);
      const double rs = rstd_ref[size_t(i)];
      for (int64_t j = 0; j < N; ++j) {
        const size_t k = size_t(i * N + j);
        const double wdy = weight[size_t(j)] * gk::as_double(dy[k]);
        const double d = with_dh ? gk::as_double(dh[k]) : 0.0;
        dx_ref[k] = rs * (wdy - c2 - xhat[k] * c1) + d;
        dx_scale[k] = rs * (std::fabs(wdy) + a2 + std::fabs(xhat[k]) * a1) + std::fabs(d);
      }
    }
    gk::Output<T> dx(MN);
    gk::Output<float> dw(Ns), db(Ns);
    layernorm_bwd_cpu(dt, dy.data(), with_dh ? dh.data() : nullptr, h_ref.data(), weight.data(),
                      f.rms ? nullptr : mean_f.data(), rstd_f.data(), dx.data(), dw.data(),
                      f.bias ? db.data() : nullptr, M, N, f.rms);
    check_out(std::string("layernorm.bwd.dx ") + (with_dh ? "+dh " : "") + tn, dx.data(), dx_ref.data(),
              dx_scale.data(), MN);
    gk::check_norm("layernorm.bwd.dw " + tn, dw.data(), dw_ref.data(), dw_scale.data(), Ns, kRelTol);
    if (f.bias) gk::check_norm("layernorm.bwd.db " + tn, db.data(), db_ref.data(), db_scale.data(), Ns, kRelTol);
    GK_CHECK(dx.guard_intact() && dw.guard_intact() && db.guard_intact());
    if (dw_first.empty()) {
      dw_first.assign(dw.data(), dw.data() + N);
    } else {
      gk::check_bits("layernorm.bwd.dw repeat " + tn, dw.data(), dw_first.data(), Ns);
    }
  }
}

template <typename T>
void register_dtype() {
  for (const Shape& s : kShapes) {
    for (int bits = 0; bits < 8; ++bits) {
      const Flags f{bool(bits & 1), bool(bits & 2), bool(bits & 4)};
      const std::string name = std::string("layernorm.") + gk::Traits<T>::name + ".M" + std::to_string(s.M) + ".N" +
                               std::to_string(s.N) + ".res" + std::to_string(f.residual) + ".bias" +
                               std::to_string(f.bias) + (f.rms ? ".rms" : ".ln");
      gk::add_test(name, [=] { run_case<T>(name, s, f); });
    }
  }
}

}  // namespace

GK_REGISTER(layernorm_cases) {
  register_dtype<float>();
  register_dtype<half_t>();
  register_dtype<bf16_t>();
}

}  // namespace gptkernels
