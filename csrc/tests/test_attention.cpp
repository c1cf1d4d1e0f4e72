// Attention CPU kernels (csrc/kernels/cpu/attention.h) against an fp64 reference written here: forward (out, lse),
// backward (dq, dk, dv) and decode, for fp32, fp16 and bf16, with causal / sliding-window / additive-mask /
// GQA / dropout / Tq != Tk, head dims that are not multiples of the SIMD width, and rows with no visible key.
// Also: results do not depend on the OpenMP thread count (bitwise), and dropout is a function of the seed.
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "harness.h"
#include "kernels/attention_rng.h"
#include "kernels/cpu/attention.h"

namespace gptkernels {
namespace {

struct Case {
  int64_t B, H, Hkv, Tq, Tk, D;
  bool causal;
  int64_t window;  // -1: none
  int mask;        // 0 none, 1 full (B,H,Tq,Tk), 2 (1,1,Tq,Tk) with -inf holes, 3 (B,1,Tq,1) every third row -inf
  float dropout;
};

std::string case_name(const char* dt, const Case& c) {
  return std::string("attention.") + dt + "/B" + std::to_string(c.B) + "H" + std::to_string(c.H) + "kv" +
         std::to_string(c.Hkv) + "Tq" + std::to_string(c.Tq) + "Tk" + std::to_string(c.Tk) + "D" +
         std::to_string(c.D) + (c.causal ? "/causal" : "") + (c.window > 0 ? "/w" + std::to_string(c.window) : "") +
         (c.mask ? "/mask" + std::to_string(c.mask) : "") + (c.dropout > 0 ? "/drop" : "");
}

struct Mask {
  std::vector<float> v;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;
  const float* ptr() const { return v.empty() ? nullptr : v.data(); }
  double at(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return v.empty() ? 0.0 : v[size_t(b * sb + h * sh + i * si + j * sj)];
  }
};

Mask make_mask(std::mt19937& gen, const Case& c) {
  Mask m;
  std::normal_distribution<float> normal;
  std::uniform_real_distribution<float> unif;
  if (c.mask == 1) {
    m.v.resize(size_t(c.B * c.H * c.Tq * c.Tk));
    for (auto& x : m.v) x = normal(gen);
    m.sb = c.H * c.Tq * c.Tk, m.sh = c.Tq * c.Tk, m.si = c.Tk, m.sj = 1;
  } else if (c.mask == 2) {
    m.v.resize(size_t(c.Tq * c.Tk));
    for (auto& x : m.v) x = unif(gen) < 0.3f ? -INFINITY : normal(gen);
    m.si = c.Tk, m.sj = 1;
  } else if (c.mask == 3) {
    m.v.assign(size_t(c.B * c.Tq), 0.f);
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t i = 0; i < c.Tq; i += 3) m.v[size_t(b * c.Tq + i)] = -INFINITY;
    m.sb = c.Tq, m.si = 1;
  }
  return m;
}

// fp64 reference of forward and backward on the (rounded) inputs, with the kernels' dropout keep mask.
struct Ref {
  std::vector<double> out, lse, dq, dk, dv;
};

template <typename T>
Ref reference(const Case& c, const std::vector<T>& q, const std::vector<T>& k, const std::vector<T>& v,
              const std::vector<T>& dout, const Mask& mask, float scale, uint64_t seed) {
  const int64_t G = c.H / c.Hkv, D = c.D;
  const uint32_t thr = attn_dropout_threshold(c.dropout);
  const double inv_keep = 1.0 / (1.0 - double(c.dropout));
  Ref r;
  r.out.assign(q.size(), 0.0);
  r.dq.assign(q.size(), 0.0);
  r.dk.assign(k.size(), 0.0);
  r.dv.assign(k.size(), 0.0);
  r.lse.assign(size_t(c.B * c.H * c.Tq), -INFINITY);
  std::vector<double> s(size_t(c.Tk)), p(size_t(c.Tk)), z(size_t(c.Tk)), dp(size_t(c.Tk));
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h) {
      const int64_t qo = (b * c.H + h) * c.Tq * D, ko = (b * c.Hkv + h / G) * c.Tk * D;
      for (int64_t i = 0; i < c.Tq; ++i) {
        double mx = -INFINITY;
        for (int64_t j = 0; j < c.Tk; ++j) {
          const bool vis = (!(c.causal || c.window > 0) || j <= i) && (c.window <= 0 || j > i - c.window);
          double acc = 0;
          for (int64_t d = 0; d < D; ++d) acc += gk::as_double(q[size_t(qo + i * D + d)]) * gk::as_double(k[size_t(ko + j * D + d)]);
          s[size_t(j)] = vis ? acc * scale + mask.at(b, h, i, j) : -INFINITY;
          mx = std::max(mx, s[size_t(j)]);
        }
        if (mx == -INFINITY) continue;  // no visible key: out 0, lse -inf, zero gradients
        double l = 0;
        for (int64_t j = 0; j < c.Tk; ++j) l += (p[size_t(j)] = std::exp(s[size_t(j)] - mx));
        r.lse[size_t((b * c.H + h) * c.Tq + i)] = mx + std::log(l);
        const uint64_t key = attn_dropout_row_key(seed, b, h, i);
        for (int64_t j = 0; j < c.Tk; ++j) {
          p[size_t(j)] /= l;
          z[size_t(j)] = c.dropout > 0 ? (attn_dropout_keep(key, j, thr) ? inv_keep : 0.0) : 1.0;
        }
        for (int64_t d = 0; d < D; ++d) {
          double acc = 0;
          for (int64_t j = 0; j < c.Tk; ++j) acc += p[size_t(j)] * z[size_t(j)] * gk::as_double(v[size_t(ko + j * D + d)]);
          r.out[size_t(qo + i * D + d)] = acc;
        }
        double delta = 0;
        for (int64_t d = 0; d < D; ++d) delta += gk::as_double(dout[size_t(qo + i * D + d)]) * r.out[size_t(qo + i * D + d)];
        for (int64_t j = 0; j < c.Tk; ++j) {
          double acc = 0;
          for (int64_t d = 0; d < D; ++d) acc += gk::as_double(dout[size_t(qo + i * D + d)]) * gk::as_double(v[size_t(ko + j * D + d)]);
          dp[size_t(j)] = p[size_t(j)] * (acc * z[size_t(j)] - delta);  // dS
        }
        for (int64_t j = 0; j < c.Tk; ++j)
          for (int64_t d = 0; d < D; ++d) {
            r.dq[size_t(qo + i * D + d)] += scale * dp[size_t(j)] * gk::as_double(k[size_t(ko + j * D + d)]);
            r.dk[size_t(ko + j * D + d)] += scale * dp[size_t(j)] * gk::as_double(q[size_t(qo + i * D + d)]);
            r.dv[size_t(ko + j * D + d)] += p[size_t(j)] * z[size_t(j)] * gk::as_double(dout[size_t(qo + i * D + d)]);
          }
      }
    }
  return r;
}

// ||got - ref|| <= tol * max(||ref||, 1e-3 * sqrt(n)) (the floor: a reference that is exactly 0, e.g. dq of a row
// that sees one key, comes out as rounding noise).
template <typename T>
void check_rel(const std::string& label, const T* got, const std::vector<double>& ref, double tol) {
  const size_t n = ref.size();
  double r2 = 0;
  for (double x : ref) r2 += x * x;
  const double floor = 1e-3 * std::sqrt(double(std::max<size_t>(n, 1)));
  const double s = std::max(std::sqrt(r2), floor) / std::sqrt(double(std::max<size_t>(n, 1)));
  const std::vector<double> scale(n, s);  // constant per element: ||scale|| = max(||ref||, floor)
  gk::check_norm(label, got, ref.data(), scale.data(), n, tol);
}

template <typename T>
void run_case(const std::string& name, const Case& c) {
  const DType dt = gk::Traits<T>::dtype;
  std::mt19937 gen = gk::rng_for(name);
  const size_t nq = size_t(c.B * c.H * c.Tq * c.D), nk = size_t(c.B * c.Hkv * c.Tk * c.D);
  const auto q = gk::randn<T>(gen, nq), k = gk::randn<T>(gen, nk), v = gk::randn<T>(gen, nk);
  const auto dout = gk::randn<T>(gen, nq);
  const Mask mask = make_mask(gen, c);
  const float scale = 1.0f / std::sqrt(float(c.D));
  const uint64_t seed = 0x1234567ull + uint64_t(c.Tq);
  const Ref ref = reference(c, q, k, v, dout, mask, scale, seed);

  gk::Output<T> out(nq), dq(nq), dk(nk), dv(nk);
  gk::Output<float> lse(size_t(c.B * c.H * c.Tq));
  attention_fwd_cpu(dt, q.data(), k.data(), v.data(), mask.ptr(), mask.sb, mask.sh, mask.si, mask.sj, out.data(),
                    lse.data(), c.B, c.H, c.Hkv, c.Tq, c.Tk, c.D, scale, c.causal, c.window, c.dropout, seed);
  attention_bwd_cpu(dt, dout.data(), q.data(), k.data(), v.data(), out.data(), lse.data(), mask.ptr(), mask.sb,
                    mask.sh, mask.si, mask.sj, dq.data(), dk.data(), dv.data(), c.B, c.H, c.Hkv, c.Tq, c.Tk, c.D,
                    scale, c.causal, c.window, c.dropout, seed);
  GK_CHECK(out.guard_intact() && lse.guard_intact() && dq.guard_intact() && dk.guard_intact() && dv.guard_intact());
  // fp32: the house bound. 16-bit: the output rounding (0.5 ulp: 2^-11 fp16, 2^-8 bf16, relative) dominates.
  const double tol = std::is_same_v<T, float> ? 1e-5 : std::is_same_v<T, half_t> ? 1e-3 : 8e-3;
  const std::string tn = gk::Traits<T>::name;
  check_rel(tn + " out", out.data(), ref.out, tol);
  check_rel(tn + " dq", dq.data(), ref.dq, tol);
  check_rel(tn + " dk", dk.data(), ref.dk, tol);
  check_rel(tn + " dv", dv.data(), ref.dv, tol);
  // lse: -inf exactly where the reference has no visible key, else within fp32 rounding of the scores.
  for (size_t i = 0; i < ref.lse.size(); ++i) {
    if (std::isinf(ref.lse[i])) {
      GK_CHECK_MSG(lse[i] == -INFINITY, "lse[" << i << "] = " << lse[i] << ", want -inf (no visible key)");
    } else {
      GK_CHECK_MSG(std::fabs(lse[i] - ref.lse[i]) <= 1e-5 * (1.0 + std::fabs(ref.lse[i])),
                   "lse[" << i << "] = " << lse[i] << " want " << ref.lse[i]);
    }
  }
}

// Same bits with 1 thread and with 3 (the tiles are independent; no cross-thread sums).
GK_TEST(attention, thread_count_independent) {
#ifdef _OPENMP
  const Case c{2, 4, 2, 150, 150, 64, true, -1, 0, 0.2f};
  std::mt19937 gen = gk::rng_for("attention.threads");
  const size_t nq = size_t(c.B * c.H * c.Tq * c.D), nk = size_t(c.B * c.Hkv * c.Tk * c.D);
  const auto q = gk::randn<float>(gen, nq), k = gk::randn<float>(gen, nk), v = gk::randn<float>(gen, nk);
  const auto dout = gk::randn<float>(gen, nq);
  std::vector<float> out[2], lse[2], dq[2], dk[2], dv[2];
  const int saved = omp_get_max_threads();
  for (int t = 0; t < 2; ++t) {
    omp_set_num_threads(t == 0 ? 1 : 3);
    out[t].resize(nq), lse[t].resize(size_t(c.B * c.H * c.Tq)), dq[t].resize(nq), dk[t].resize(nk), dv[t].resize(nk);
    attention_fwd_cpu(DType::kFloat32, q.data(), k.data(), v.data(), nullptr, 0, 0, 0, 0, out[t].data(),
                      lse[t].data(), c.B, c.H, c.Hkv, c.Tq, c.Tk, c.D, 0.125f, c.causal, c.window, c.dropout, 7);
    attention_bwd_cpu(DType::kFloat32, dout.data(), q.data(), k.data(), v.data(), out[t].data(), lse[t].data(),
                      nullptr, 0, 0, 0, 0, dq[t].data(), dk[t].data(), dv[t].data(), c.B, c.H, c.Hkv, c.Tq, c.Tk,
                      c.D, 0.125f, c.causal, c.window, c.dropout, 7);
  }
  omp_set_num_threads(saved);
  gk::check_bits("out", out[1].data(), out[0].data(), nq);
  gk::check_bits("lse", lse[1].data(), lse[0].data(), lse[0].size());
  gk::check_bits("dq", dq[1].data(), dq[0].data(), nq);
  gk::check_bits("dk", dk[1].data(), dk[0].data(), nk);
  gk::check_bits("dv", dv[1].data(), dv[0].data(), nk);
#endif
}

// Dropout keeps about 1 - p of the elements, and the same seed gives the same elements.
GK_TEST(attention, dropout_rate) {
  const float p = 0.3f;
  const uint32_t thr = attn_dropout_threshold(p);
  int64_t kept = 0, n = 0;
  for (int64_t i = 0; i < 200; ++i) {
    const uint64_t key = attn_dropout_row_key(99, 1, 2, i);
    for (int64_t j = 0; j < 500; ++j, ++n) kept += attn_dropout_keep(key, j, thr);
  }
  const double rate = double(kept) / double(n);
  GK_CHECK_MSG(std::fabs(rate - (1.0 - p)) < 0.01, "keep rate " << rate << ", want " << 1.0 - p);
  GK_CHECK(attn_dropout_threshold(0.f) == 0u);  // p = 0 keeps everything
}

template <typename T>
void run_decode(const std::string& name, int64_t B, int64_t H, int64_t Hkv, int64_t Tn, int64_t Tmax, int64_t D,
                int64_t splits) {
  const DType dt = gk::Traits<T>::dtype;
  std::mt19937 gen = gk::rng_for(name);
  const auto q = gk::randn<T>(gen, size_t(B * H * Tn * D));
  const auto k = gk::randn<T>(gen, size_t(B * Hkv * Tmax * D)), v = gk::randn<T>(gen, size_t(B * Hkv * Tmax * D));
  std::vector<int64_t> lens(static_cast<size_t>(B));
  std::uniform_int_distribution<int64_t> u(Tn, Tmax);
  for (int64_t b = 0; b < B; ++b) lens[size_t(b)] = b == 0 ? Tmax : u(gen);
  const float scale = 1.0f / std::sqrt(float(D));
  gk::Output<T> out(q.size());
  decode_attention_cpu(dt, q.data(), k.data(), v.data(), lens.data(), out.data(), B, H, Hkv, Tn, Tmax, D, scale,
                       splits);
  GK_CHECK(out.guard_intact());
  std::vector<double> ref(q.size(), 0.0);
  const int64_t G = H / Hkv;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < Tn; ++t) {
        const int64_t L = lens[size_t(b)], pos = L - Tn + t;
        const T* qr = q.data() + ((b * H + h) * Tn + t) * D;
        const T* kb = k.data() + (b * Hkv + h / G) * Tmax * D;
        const T* vb = v.data() + (b * Hkv + h / G) * Tmax * D;
        std::vector<double> s(size_t(pos + 1));
        double mx = -INFINITY, l = 0;
        for (int64_t j = 0; j <= pos; ++j) {
          double acc = 0;
          for (int64_t d = 0; d < D; ++d) acc += gk::as_double(qr[d]) * gk::as_double(kb[j * D + d]);
          mx = std::max(mx, s[size_t(j)] = acc * scale);
        }
        for (int64_t j = 0; j <= pos; ++j) l += (s[size_t(j)] = std::exp(s[size_t(j)] - mx));
        for (int64_t j = 0; j <= pos; ++j)
          for (int64_t d = 0; d < D; ++d)
            ref[size_t(((b * H + h) * Tn + t) * D + d)] += s[size_t(j)] / l * gk::as_double(vb[j * D + d]);
      }
  const double tol = std::is_same_v<T, float> ? 1e-5 : std::is_same_v<T, half_t> ? 1e-3 : 8e-3;
  check_rel(std::string(gk::Traits<T>::name) + " decode out", out.data(), ref, tol);
}

GK_REGISTER(attention_cases) {
  static const Case kCases[] = {
      {1, 2, 1, 1, 1, 7, false, -1, 0, 0.f},       // one key: dq = dk = 0 exactly
      {1, 2, 1, 1, 1, 7, true, -1, 0, 0.f},
      {2, 4, 2, 17, 17, 64, true, -1, 0, 0.f},     // GQA
      {1, 2, 2, 97, 130, 80, false, -1, 0, 0.f},   // Tq < Tk, D not a multiple of 16
      {1, 2, 1, 130, 33, 48, true, -1, 0, 0.f},    // Tq > Tk causal: rows past Tk see all keys
      {1, 1, 1, 70, 70, 256, true, -1, 0, 0.f},
      {1, 2, 1, 37, 41, 1, true, -1, 0, 0.f},
      {1, 2, 1, 37, 41, 3, false, -1, 0, 0.f},
      {1, 2, 1, 100, 100, 32, true, 17, 0, 0.f},   // sliding window
      {1, 2, 1, 60, 150, 32, false, 50, 0, 0.f},   // window implies causal
      {2, 2, 1, 50, 70, 64, false, -1, 1, 0.f},    // full additive mask
      {2, 2, 1, 50, 70, 64, true, -1, 2, 0.f},     // broadcast mask with -inf holes
      {2, 2, 1, 50, 70, 24, false, -1, 3, 0.f},    // fully masked rows: zeros, lse -inf
      {1, 2, 1, 40, 50, 32, false, -1, 0, 0.3f},   // dropout
      {1, 2, 2, 70, 70, 24, true, -1, 2, 0.1f},
  };
  for (const Case& c : kCases) {
    gk::add_test(case_name("fp32", c), [c] { run_case<float>(case_name("fp32", c), c); });
    gk::add_test(case_name("fp16", c), [c] { run_case<half_t>(case_name("fp16", c), c); });
    gk::add_test(case_name("bf16", c), [c] { run_case<bf16_t>(case_name("bf16", c), c); });
  }
  gk::add_test("attention.decode/fp32", [] { run_decode<float>("attention.decode/fp32", 3, 8, 2, 1, 300, 64, 0); });
  gk::add_test("attention.decode/fp32/splits3", [] { run_decode<float>("attention.decode/fp32/s3", 2, 4, 4, 3, 129, 80, 3); });
  gk::add_test("attention.decode/fp16", [] { run_decode<half_t>("attention.decode/fp16", 2, 8, 1, 5, 200, 128, 7); });
  gk::add_test("attention.decode/bf16", [] { run_decode<bf16_t>("attention.decode/bf16", 1, 2, 2, 1, 17, 32, 100); });
}

}  // namespace
}  // namespace gptkernels
