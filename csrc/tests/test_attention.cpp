// Attention CPU kernels (csrc/kernels/cpu/attention.h) against an fp64 reference of kernels/common.h's AttnSpec written
// here: forward (out, lse), backward (dq, dk, dv) and decode, for fp32, fp16 and bf16. Top-left and bottom-right
// alignment with Tq < Tk and Tq > Tk (rows that see no key), (left, right) windows (causal, sliding, left-only,
// right > 0), softcap, ALiBi per head and per (b, h), additive masks with -inf entries, GQA, dropout, head dims that
// are not multiples of the SIMD width, few-row calls (attend_small); the NaN rule (inf in q or k, a visible -inf
// score, NaN behind a -inf mask), exact zeros for rows that see nothing and keys nobody sees (never read).
// Also: results do not depend on the OpenMP thread count (bitwise), dropout is a function of the seed, and fp32
// gradients are about as accurate as naive fp32 math.
#include <algorithm>
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

// What the mask, ALiBi and poison fields ask for; everything else is AttnSpec's (kernels/common.h).
enum MaskKind { kNoMask, kFullMask, kHoles, kRowsMasked, kCross };
enum AlibiKind { kNoAlibi, kPerHead, kPerBatchHead };
enum Poison {
  kClean,
  kQInf,         // +inf in one element of query rows 0 and Tq / 2 of (b 0, h 0)
  kKInf,         // +inf in one element of key Tk / 2 of (b 0, kv head 0)
  kNegInfScore,  // q[0, 0, 0, 0] = -inf, k[0, 0, j, 0] > 0: every score of (b 0, h 0) row 0 is -inf, not masked
  kNaNHidden,    // NaN in key Tk / 3 and query row Tq / 3 of every head, behind kCross's -inf column and row
  kUnseen,       // NaN in every element of the keys (and their v rows) that no query row sees by position
};

struct Case {
  int64_t B, H, Hkv, Tq, Tk, D;
  int64_t left, right;  // AttnSpec's window: -1 unbounded; causal is (-1, 0)
  bool bottom_right;    // offset Tk - Tq, else 0
  float softcap;
  int alibi;  // AlibiKind
  int mask;   // MaskKind
  float dropout;
  int poison;
  float scale;  // NaN: 1 / sqrt(D)
};

// Shorthands for the case table.
Case plain(int64_t B, int64_t H, int64_t Hkv, int64_t Tq, int64_t Tk, int64_t D, int64_t left = -1, int64_t right = -1,
           bool br = false) {
  return Case{B, H, Hkv, Tq, Tk, D, left, right, br, 0.f, kNoAlibi, kNoMask, 0.f, kClean, NAN};
}
Case scaled(Case c, float scale) {
  c.scale = scale;
  return c;
}
Case with(Case c, float softcap, int alibi, int mask, float dropout = 0.f, int poison = kClean) {
  c.softcap = softcap;
  c.alibi = alibi;
  c.mask = mask;
  c.dropout = dropout;
  c.poison = poison;
  return c;
}

std::string case_name(const char* dt, const Case& c) {
  static const char* kPoison[] = {"", "/inf-q", "/inf-k", "/neginf-score", "/nan-hidden", "/unseen-nan"};
  std::string n = std::string("attention.") + dt + "/B" + std::to_string(c.B) + "H" + std::to_string(c.H) + "kv" +
                  std::to_string(c.Hkv) + "Tq" + std::to_string(c.Tq) + "Tk" + std::to_string(c.Tk) + "D" +
                  std::to_string(c.D);
  if (c.left >= 0 || c.right >= 0) n += "/w(" + std::to_string(c.left) + "," + std::to_string(c.right) + ")";
  if (c.bottom_right) n += "/br";
  if (c.softcap > 0) n += "/cap";
  if (c.alibi) n += c.alibi == kPerHead ? "/alibiH" : "/alibiBH";
  if (c.mask) n += "/mask" + std::to_string(c.mask);
  if (c.dropout > 0) n += "/drop";
  if (!std::isnan(c.scale)) n += "/scale" + std::to_string(c.scale);
  return n + kPoison[c.poison];
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
  if (c.mask == kFullMask) {
    m.v.resize(size_t(c.B * c.H * c.Tq * c.Tk));
    for (auto& x : m.v) x = normal(gen);
    m.sb = c.H * c.Tq * c.Tk, m.sh = c.Tq * c.Tk, m.si = c.Tk, m.sj = 1;
  } else if (c.mask == kHoles) {
    m.v.resize(size_t(c.Tq * c.Tk));
    for (auto& x : m.v) x = unif(gen) < 0.3f ? -INFINITY : normal(gen);
    m.si = c.Tk, m.sj = 1;
  } else if (c.mask == kRowsMasked) {
    m.v.assign(size_t(c.B * c.Tq), 0.f);
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t i = 0; i < c.Tq; i += 3) m.v[size_t(b * c.Tq + i)] = -INFINITY;
    m.sb = c.Tq, m.si = 1;
  } else if (c.mask == kCross) {  // key Tk / 3 hidden from every row, row Tq / 3 sees nothing
    m.v.resize(size_t(c.Tq * c.Tk));
    for (auto& x : m.v) x = 0.5f * normal(gen);
    for (int64_t i = 0; i < c.Tq; ++i) m.v[size_t(i * c.Tk + c.Tk / 3)] = -INFINITY;
    for (int64_t j = 0; j < c.Tk; ++j) m.v[size_t(c.Tq / 3 * c.Tk + j)] = -INFINITY;
    m.si = c.Tk, m.sj = 1;
  }
  return m;
}

// ALiBi slopes and the spec of a case. Per (b, h): rows of H + 3 floats, so alibi_sb is not H.
struct Spec {
  AttnSpec s;
  std::vector<float> slopes;
};

Spec make_spec(std::mt19937& gen, const Case& c) {
  Spec sp;
  sp.s.offset = c.bottom_right ? c.Tk - c.Tq : 0;
  sp.s.left = c.left;
  sp.s.right = c.right;
  sp.s.softcap = c.softcap;
  std::uniform_real_distribution<float> unif(0.02f, 0.6f);
  if (c.alibi == kPerHead) {
    for (int64_t h = 0; h < c.H; ++h) sp.slopes.push_back(std::exp2(-8.f * float(h + 1) / float(c.H)));
    sp.s.alibi_sb = 0;
  } else if (c.alibi == kPerBatchHead) {
    sp.slopes.resize(size_t(c.B * (c.H + 3)));
    for (auto& x : sp.slopes) x = unif(gen);
    sp.s.alibi_sb = c.H + 3;
  }
  sp.s.alibi = sp.slopes.empty() ? nullptr : sp.slopes.data();
  return sp;
}

bool visible(const AttnSpec& s, int64_t i, int64_t j) {
  const int64_t pos = i + s.offset;
  return (s.left < 0 || j >= pos - s.left) && (s.right < 0 || j <= pos + s.right);
}

// Forward and backward of the spec on the (rounded) inputs with the kernels' dropout keep mask, in R: double for
// the reference, float for a naive fp32 implementation (the precision test's yardstick). NaN rule: a visible score
// whose scale * q.k or final value is not finite makes the row's out, lse and dq NaN and the dk, dv of every key it
// sees NaN. Invisible keys are never touched, so NaN behind them stays out.
struct Ref {
  std::vector<double> out, lse, dq, dk, dv;
  std::vector<char> row_sees, key_seen;  // (B, H, Tq): sees some key; (B, Hkv, Tk): seen by some row
};

template <typename R, typename T>
Ref reference(const Case& c, const std::vector<T>& q, const std::vector<T>& k, const std::vector<T>& v,
              const std::vector<T>& dout, const Mask& mask, const AttnSpec& sp, float scale, uint64_t seed) {
  const int64_t G = c.H / c.Hkv, D = c.D;
  const uint32_t thr = attn_dropout_threshold(c.dropout);
  const R inv_keep = R(1) / (R(1) - R(c.dropout)), cap = R(c.softcap), nan = R(NAN);
  Ref r;
  r.out.assign(q.size(), 0.0);
  r.dq.assign(q.size(), 0.0);
  r.dk.assign(k.size(), 0.0);
  r.dv.assign(k.size(), 0.0);
  r.lse.assign(size_t(c.B * c.H * c.Tq), -INFINITY);
  r.row_sees.assign(r.lse.size(), 0);
  r.key_seen.assign(size_t(c.B * c.Hkv * c.Tk), 0);
  std::vector<R> s(size_t(c.Tk)), p(size_t(c.Tk)), z(size_t(c.Tk)), ds(size_t(c.Tk)), dt(size_t(c.Tk));
  std::vector<char> vis(size_t(c.Tk));
  auto x = [](T e) { return R(gk::as_double(e)); };
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h) {
      const int64_t qo = (b * c.H + h) * c.Tq * D, ko = (b * c.Hkv + h / G) * c.Tk * D;
      const R slope = sp.alibi ? R(sp.alibi[b * sp.alibi_sb + h]) : R(0);
      for (int64_t i = 0; i < c.Tq; ++i) {
        const int64_t pos = i + sp.offset, row = (b * c.H + h) * c.Tq + i;
        bool any = false, bad = false;
        R mx = -INFINITY;
        for (int64_t j = 0; j < c.Tk; ++j) {
          vis[size_t(j)] = visible(sp, i, j) && mask.at(b, h, i, j) != -INFINITY;
          if (!vis[size_t(j)]) continue;
          any = true;
          R acc = 0;
          for (int64_t d = 0; d < D; ++d) acc += x(q[size_t(qo + i * D + d)]) * x(k[size_t(ko + j * D + d)]);
          const R raw = acc * R(scale);
          const R t = cap > 0 ? std::tanh(raw / cap) : R(0);
          R sv = cap > 0 ? cap * t : raw;
          sv -= slope * R(std::abs(pos - j));
          sv += R(mask.at(b, h, i, j));
          bad = bad || !std::isfinite(raw) || !std::isfinite(sv);
          s[size_t(j)] = sv;
          dt[size_t(j)] = cap > 0 ? (1 - t) * (1 + t) : R(1);
          mx = std::max(mx, sv);
        }
        if (!any) continue;  // no visible key: out 0, lse -inf, zero gradients
        r.row_sees[size_t(row)] = 1;
        for (int64_t j = 0; j < c.Tk; ++j)
          if (vis[size_t(j)]) r.key_seen[size_t((b * c.Hkv + h / G) * c.Tk + j)] = 1;
        if (bad) {
          r.lse[size_t(row)] = NAN;
          for (int64_t d = 0; d < D; ++d) r.out[size_t(qo + i * D + d)] = r.dq[size_t(qo + i * D + d)] = NAN;
          for (int64_t j = 0; j < c.Tk; ++j)
            if (vis[size_t(j)])
              for (int64_t d = 0; d < D; ++d) r.dk[size_t(ko + j * D + d)] = r.dv[size_t(ko + j * D + d)] = nan;
          continue;
        }
        R l = 0;
        for (int64_t j = 0; j < c.Tk; ++j) l += (p[size_t(j)] = vis[size_t(j)] ? std::exp(s[size_t(j)] - mx) : R(0));
        r.lse[size_t(row)] = double(mx + std::log(l));
        const uint64_t key = attn_dropout_row_key(seed, b, h, i);
        for (int64_t j = 0; j < c.Tk; ++j) {
          p[size_t(j)] /= l;
          z[size_t(j)] = c.dropout > 0 ? (attn_dropout_keep(key, j, thr) ? inv_keep : R(0)) : R(1);
        }
        R delta = 0;
        for (int64_t d = 0; d < D; ++d) {
          R acc = 0;
          for (int64_t j = 0; j < c.Tk; ++j)
            if (vis[size_t(j)]) acc += p[size_t(j)] * z[size_t(j)] * x(v[size_t(ko + j * D + d)]);
          r.out[size_t(qo + i * D + d)] = double(acc);
          delta += x(dout[size_t(qo + i * D + d)]) * acc;
        }
        for (int64_t j = 0; j < c.Tk; ++j) {
          if (!vis[size_t(j)]) continue;
          R acc = 0;
          for (int64_t d = 0; d < D; ++d) acc += x(dout[size_t(qo + i * D + d)]) * x(v[size_t(ko + j * D + d)]);
          ds[size_t(j)] = p[size_t(j)] * (acc * z[size_t(j)] - delta) * dt[size_t(j)];  // dS of q.k * scale
        }
        for (int64_t d = 0; d < D; ++d) {
          R acc = 0;
          for (int64_t j = 0; j < c.Tk; ++j)
            if (vis[size_t(j)]) acc += ds[size_t(j)] * x(k[size_t(ko + j * D + d)]);
          r.dq[size_t(qo + i * D + d)] = double(acc * R(scale));
        }
        for (int64_t j = 0; j < c.Tk; ++j) {
          if (!vis[size_t(j)]) continue;
          for (int64_t d = 0; d < D; ++d) {
            r.dk[size_t(ko + j * D + d)] += double(R(scale) * ds[size_t(j)] * x(q[size_t(qo + i * D + d)]));
            r.dv[size_t(ko + j * D + d)] += double(p[size_t(j)] * z[size_t(j)] * x(dout[size_t(qo + i * D + d)]));
          }
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

// NaN exactly where the reference has NaN (the NaN rule), check_rel on the other elements.
template <typename T>
void check_nan_rel(const std::string& label, const T* got, const std::vector<double>& ref, double tol) {
  std::vector<T> g;
  std::vector<double> r;
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const bool want_nan = std::isnan(ref[i]), is_nan = std::isnan(gk::as_double(got[i]));
    if (want_nan != is_nan && bad++ == 0) first = i;
    if (!want_nan && !is_nan) {
      g.push_back(got[i]);
      r.push_back(ref[i]);
    }
  }
  GK_CHECK_MSG(bad == 0, label << ": " << bad << " elements NaN where the reference is not or the reverse; first ["
                               << first << "] got " << gk::as_double(got[first]) << " ref " << ref[first]);
  check_rel(label, g.data(), r, tol);
}

// Exactly 0 in every row of D elements whose flag is 0 (rows that see no key, keys no row sees).
template <typename T>
void check_zero_rows(const std::string& label, const T* got, const std::vector<char>& flag, int64_t D) {
  size_t bad = 0;
  for (size_t row = 0; row < flag.size(); ++row)
    for (int64_t d = 0; d < D && !flag[row]; ++d) bad += gk::as_double(got[row * size_t(D) + size_t(d)]) != 0.0;
  GK_CHECK_MSG(bad == 0, label << ": " << bad << " elements not exactly 0 in rows that must be");
}

template <typename T>
void run_case(const std::string& name, const Case& c) {
  const DType dt = gk::Traits<T>::dtype;
  std::mt19937 gen = gk::rng_for(name);
  const size_t nq = size_t(c.B * c.H * c.Tq * c.D), nk = size_t(c.B * c.Hkv * c.Tk * c.D);
  auto q = gk::randn<T>(gen, nq), k = gk::randn<T>(gen, nk), v = gk::randn<T>(gen, nk);
  const auto dout = gk::randn<T>(gen, nq);
  const Mask mask = make_mask(gen, c);
  const Spec sp = make_spec(gen, c);
  const int64_t D = c.D;
  const T inf = from_float<T>(INFINITY), nan = from_float<T>(NAN);
  if (c.poison == kQInf) {  // (b 0, h 0): rows 0 and Tq / 2
    q[size_t(1 % D)] = inf;
    q[size_t(c.Tq / 2 * D + 3 % D)] = inf;
  } else if (c.poison == kKInf) {
    k[size_t((c.Tk / 2) * D + 5 % D)] = inf;
  } else if (c.poison == kNegInfScore) {
    q[0] = from_float<T>(-INFINITY);
    for (int64_t j = 0; j < c.Tk; ++j)
      k[size_t(j * D)] = from_float<T>(0.25f + std::fabs(gk::as_double(k[size_t(j * D)])));
  } else if (c.poison == kNaNHidden) {
    for (int64_t bg = 0; bg < c.B * c.Hkv; ++bg) k[size_t((bg * c.Tk + c.Tk / 3) * D)] = nan;
    for (int64_t bh = 0; bh < c.B * c.H; ++bh) q[size_t((bh * c.Tq + c.Tq / 3) * D)] = nan;
  } else if (c.poison == kUnseen) {
    for (int64_t j = 0; j < c.Tk; ++j) {
      bool seen = false;
      for (int64_t i = 0; i < c.Tq; ++i) seen = seen || visible(sp.s, i, j);
      if (seen) continue;
      for (int64_t bg = 0; bg < c.B * c.Hkv; ++bg)
        for (int64_t d = 0; d < D; ++d) k[size_t((bg * c.Tk + j) * D + d)] = v[size_t((bg * c.Tk + j) * D + d)] = nan;
    }
  }
  const float scale = std::isnan(c.scale) ? 1.0f / std::sqrt(float(c.D)) : c.scale;
  const uint64_t seed = 0x1234567ull + uint64_t(c.Tq);
  const Ref ref = reference<double>(c, q, k, v, dout, mask, sp.s, scale, seed);

  gk::Output<T> out(nq), dq(nq), dk(nk), dv(nk);
  gk::Output<float> lse(size_t(c.B * c.H * c.Tq));
  attention_fwd_cpu(dt, q.data(), k.data(), v.data(), mask.ptr(), mask.sb, mask.sh, mask.si, mask.sj, out.data(),
                    lse.data(), c.B, c.H, c.Hkv, c.Tq, c.Tk, c.D, scale, sp.s, c.dropout, seed);
  attention_bwd_cpu(dt, dout.data(), q.data(), k.data(), v.data(), out.data(), lse.data(), mask.ptr(), mask.sb, mask.sh,
                    mask.si, mask.sj, dq.data(), dk.data(), dv.data(), c.B, c.H, c.Hkv, c.Tq, c.Tk, c.D, scale, sp.s,
                    c.dropout, seed);
  GK_CHECK(out.guard_intact() && lse.guard_intact() && dq.guard_intact() && dk.guard_intact() && dv.guard_intact());
  // fp32: the house bound. 16-bit: the output rounding (0.5 ulp: 2^-11 fp16, 2^-8 bf16, relative) dominates.
  const double tol = std::is_same_v<T, float> ? 1e-5 : std::is_same_v<T, half_t> ? 1e-3 : 8e-3;
  const std::string tn = gk::Traits<T>::name;
  check_nan_rel(tn + " out", out.data(), ref.out, tol);
  check_nan_rel(tn + " dq", dq.data(), ref.dq, tol);
  check_nan_rel(tn + " dk", dk.data(), ref.dk, tol);
  check_nan_rel(tn + " dv", dv.data(), ref.dv, tol);
  check_zero_rows(tn + " out", out.data(), ref.row_sees, D);
  check_zero_rows(tn + " dq", dq.data(), ref.row_sees, D);
  check_zero_rows(tn + " dk", dk.data(), ref.key_seen, D);
  check_zero_rows(tn + " dv", dv.data(), ref.key_seen, D);
  // lse: -inf exactly where the reference has no visible key, NaN where it is NaN, else within fp32 rounding.
  for (size_t i = 0; i < ref.lse.size(); ++i) {
    if (std::isnan(ref.lse[i])) {
      GK_CHECK_MSG(std::isnan(lse[i]), "lse[" << i << "] = " << lse[i] << ", want NaN (the NaN rule)");
    } else if (std::isinf(ref.lse[i])) {
      GK_CHECK_MSG(lse[i] == -INFINITY, "lse[" << i << "] = " << lse[i] << ", want -inf (no visible key)");
    } else {
      GK_CHECK_MSG(std::fabs(lse[i] - ref.lse[i]) <= 1e-5 * (1.0 + std::fabs(ref.lse[i])),
                   "lse[" << i << "] = " << lse[i] << " want " << ref.lse[i]);
    }
  }
}

// Same bits with 1 thread and with 3 (the tiles are independent; no cross-thread sums), for the block path with the
// plain spec, the block path with every score modifier, and the few-rows path.
GK_TEST(attention, thread_count_independent) {
#ifdef _OPENMP
  const Case cases[] = {
      with(plain(2, 4, 2, 150, 170, 64, -1, 0, true), 0.f, kNoAlibi, kNoMask, 0.2f),
      with(plain(2, 4, 2, 150, 150, 40, 30, 5), 4.f, kPerBatchHead, kFullMask, 0.1f),
      with(plain(2, 4, 1, 2, 400, 64, -1, 0, true), 4.f, kPerHead, kHoles),
  };
  for (const Case& c : cases) {
    std::mt19937 gen = gk::rng_for("attention.threads");
    const size_t nq = size_t(c.B * c.H * c.Tq * c.D), nk = size_t(c.B * c.Hkv * c.Tk * c.D);
    const auto q = gk::randn<float>(gen, nq), k = gk::randn<float>(gen, nk), v = gk::randn<float>(gen, nk);
    const auto dout = gk::randn<float>(gen, nq);
    const Mask m = make_mask(gen, c);
    const Spec sp = make_spec(gen, c);
    std::vector<float> out[2], lse[2], dq[2], dk[2], dv[2];
    const int saved = omp_get_max_threads();
    for (int t = 0; t < 2; ++t) {
      omp_set_num_threads(t == 0 ? 1 : 3);
      out[t].resize(nq), lse[t].resize(size_t(c.B * c.H * c.Tq)), dq[t].resize(nq), dk[t].resize(nk), dv[t].resize(nk);
      attention_fwd_cpu(DType::kFloat32, q.data(), k.data(), v.data(), m.ptr(), m.sb, m.sh, m.si, m.sj, out[t].data(),
                        lse[t].data(), c.B, c.H, c.Hkv, c.Tq, c.Tk, c.D, 0.125f, sp.s, c.dropout, 7);
      attention_bwd_cpu(DType::kFloat32, dout.data(), q.data(), k.data(), v.data(), out[t].data(), lse[t].data(),
                        m.ptr(), m.sb, m.sh, m.si, m.sj, dq[t].data(), dk[t].data(), dv[t].data(), c.B, c.H, c.Hkv,
                        c.Tq, c.Tk, c.D, 0.125f, sp.s, c.dropout, 7);
    }
    omp_set_num_threads(saved);
    const std::string n = case_name("fp32", c) + " ";
    gk::check_bits(n + "out", out[1].data(), out[0].data(), nq);
    gk::check_bits(n + "lse", lse[1].data(), lse[0].data(), lse[0].size());
    gk::check_bits(n + "dq", dq[1].data(), dq[0].data(), nq);
    gk::check_bits(n + "dk", dk[1].data(), dk[0].data(), nk);
    gk::check_bits(n + "dv", dv[1].data(), dv[0].data(), nk);
  }
#endif
}

// fp32 gradients about as accurate as naive fp32 math: the reference above computed in float (scores, softmax,
// delta = dout . out, the gradient sums, all sequential) is the yardstick. Per gradient, the ratio of the kernel's
// relative error vs fp64 to the naive one's, over shapes, alignments and score spreads (std 2 and 3 of q and k make
// the softmax peaked: lse is then large and its rounding is most of p's error). Bound: 2 on average, 4 for any
// case; the distribution is printed.
GK_TEST(attention, fp32_grad_precision_vs_naive) {
  struct P {
    Case c;
    float sd;
  };
  const P shapes[] = {
      {plain(1, 1, 1, 64, 64, 64, -1, 0), 1.f},         {plain(1, 1, 1, 128, 128, 64), 1.f},
      {plain(1, 1, 1, 200, 200, 32, -1, 0), 1.f},       {plain(1, 1, 1, 97, 130, 80), 1.f},
      {plain(1, 1, 1, 256, 256, 64, -1, 0), 2.f},       {plain(1, 1, 1, 128, 300, 128), 1.f},
      {plain(1, 1, 1, 300, 300, 16, -1, 0), 3.f},       {plain(1, 1, 1, 64, 512, 64), 1.5f},
      {plain(1, 1, 1, 100, 230, 64, -1, 0, true), 1.f}, {plain(1, 1, 1, 180, 180, 48, 60, 0), 2.f},
  };
  const char* names[4] = {"out", "dq", "dk", "dv"};
  std::vector<double> ratios[4];
  int seed = 0;
  for (const P& sh : shapes)
    for (int rep = 0; rep < 3; ++rep) {
      const Case& c = sh.c;
      std::mt19937 gen = gk::rng_for("attention.precision/" + std::to_string(seed++));
      const size_t nq = size_t(c.Tq * c.D), nk = size_t(c.Tk * c.D);
      const auto q = gk::randn<float>(gen, nq, 0.f, sh.sd), k = gk::randn<float>(gen, nk, 0.f, sh.sd);
      const auto v = gk::randn<float>(gen, nk), dout = gk::randn<float>(gen, nq);
      const Spec sp = make_spec(gen, c);
      const float scale = 1.0f / std::sqrt(float(c.D));
      const Ref r64 = reference<double>(c, q, k, v, dout, Mask{}, sp.s, scale, 0);
      const Ref r32 = reference<float>(c, q, k, v, dout, Mask{}, sp.s, scale, 0);
      std::vector<float> out(nq), lse(size_t(c.Tq)), dq(nq), dk(nk), dv(nk);
      attention_fwd_cpu(DType::kFloat32, q.data(), k.data(), v.data(), nullptr, 0, 0, 0, 0, out.data(), lse.data(), 1,
                        1, 1, c.Tq, c.Tk, c.D, scale, sp.s, 0.f, 0);
      attention_bwd_cpu(DType::kFloat32, dout.data(), q.data(), k.data(), v.data(), out.data(), lse.data(), nullptr, 0,
                        0, 0, 0, dq.data(), dk.data(), dv.data(), 1, 1, 1, c.Tq, c.Tk, c.D, scale, sp.s, 0.f, 0);
      auto err = [](const float* got, const std::vector<double>& ref) {
        double e = 0, n = 0;
        for (size_t i = 0; i < ref.size(); ++i) e += (got[i] - ref[i]) * (got[i] - ref[i]), n += ref[i] * ref[i];
        return std::sqrt(e / n);
      };
      auto err64 = [](const std::vector<double>& got, const std::vector<double>& ref) {
        double e = 0, n = 0;
        for (size_t i = 0; i < ref.size(); ++i) e += (got[i] - ref[i]) * (got[i] - ref[i]), n += ref[i] * ref[i];
        return std::sqrt(e / n);
      };
      const float* ours[4] = {out.data(), dq.data(), dk.data(), dv.data()};
      const std::vector<double>* naive[4] = {&r32.out, &r32.dq, &r32.dk, &r32.dv};
      const std::vector<double>* exact[4] = {&r64.out, &r64.dq, &r64.dk, &r64.dv};
      for (int t = 0; t < 4; ++t) ratios[t].push_back(err(ours[t], *exact[t]) / err64(*naive[t], *exact[t]));
    }
  for (int t = 0; t < 4; ++t) {
    std::vector<double> r = ratios[t];
    std::sort(r.begin(), r.end());
    double mean = 0;
    for (double x : r) mean += x / double(r.size());
    std::printf("    fp32 %s error / naive fp32 error: mean %.2f median %.2f max %.2f (%zu cases)\n", names[t], mean,
                r[r.size() / 2], r.back(), r.size());
    GK_CHECK_MSG(mean <= 2.0 && r.back() <= 4.0, names[t] << ": mean " << mean << ", max " << r.back());
  }
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
      // Top-left alignment (SDPA's).
      plain(1, 2, 1, 1, 1, 7),               // one key: dq = dk = 0 exactly
      plain(1, 2, 1, 1, 1, 7, -1, 0),        //
      plain(2, 4, 2, 17, 17, 64, -1, 0),     // GQA
      plain(1, 2, 2, 97, 130, 80),           // Tq < Tk, D not a multiple of 16
      plain(1, 2, 1, 130, 33, 48, -1, 0),    // Tq > Tk causal: rows past Tk see all keys
      plain(1, 1, 1, 70, 70, 256, -1, 0),    //
      plain(1, 2, 1, 37, 41, 1, -1, 0),      //
      plain(1, 2, 1, 37, 41, 3),             //
      plain(1, 2, 1, 100, 100, 32, 16, 0),   // sliding window of 17 keys
      plain(1, 2, 1, 60, 150, 32, 49, 0),    //
      plain(1, 2, 1, 90, 90, 32, 15, -1),    // left-only: 15 earlier keys and every later one
      plain(1, 2, 1, 90, 120, 32, -1, 7),    // causal with 7 keys of lookahead
      plain(1, 2, 1, 200, 230, 24, 40, 25),  // both sides bounded: tiles skipped on both sides
      plain(1, 1, 1, 300, 300, 64, 20, 0),   // a narrow window across many tiles
      // Bottom-right alignment (FlashAttention's): offset Tk - Tq.
      plain(1, 2, 1, 37, 100, 32, -1, 0, true),   // Tq < Tk: row i sees keys <= i + 63
      plain(2, 2, 1, 100, 37, 40, -1, 0, true),   // Tq > Tk: the first 63 rows see no key
      plain(1, 2, 1, 80, 200, 64, 30, 0, true),   //
      plain(1, 2, 2, 150, 70, 16, 20, 10, true),  // Tq > Tk with a window: empty rows, both edges
      plain(1, 3, 1, 3, 300, 64, -1, 0, true),    // few rows (attend_small): a 3-token chunk of prefill
      plain(1, 2, 1, 5, 40, 24, 8, 2, true),      //
      // Score modifiers.
      with(plain(1, 2, 1, 70, 90, 64, -1, 0), 2.5f, kNoAlibi, kNoMask),             // softcap
      with(plain(2, 2, 1, 50, 70, 40), 1.f, kNoAlibi, kFullMask),                   //
      with(plain(1, 4, 2, 90, 90, 32, -1, 0), 0.f, kPerHead, kNoMask),              // ALiBi slopes (H,)
      with(plain(2, 4, 4, 60, 130, 48, 50, 0, true), 0.f, kPerBatchHead, kNoMask),  // (B, H), strided
      with(plain(2, 4, 2, 3, 70, 32, -1, 0, true), 3.f, kPerBatchHead, kHoles),     // all of them, few rows
      with(plain(2, 2, 1, 64, 140, 64, 40, 3, true), 5.f, kPerHead, kHoles, 0.2f),  // and dropout
      scaled(plain(1, 2, 1, 70, 90, 32, -1, 0), 0.f),                               // uniform over visible keys
      scaled(plain(1, 2, 1, 70, 90, 32, -1, 0), -0.2f),                             // reversed order
      scaled(plain(1, 2, 1, 3, 90, 32, -1, 0, true), -0.2f),                        //
      // Masks and dropout.
      with(plain(2, 2, 1, 50, 70, 64), 0.f, kNoAlibi, kFullMask),            // full additive mask
      with(plain(2, 2, 1, 50, 70, 64, -1, 0), 0.f, kNoAlibi, kHoles),        // broadcast, with -inf holes
      with(plain(2, 2, 1, 50, 70, 24), 0.f, kNoAlibi, kRowsMasked),          // fully masked rows: exact zeros
      with(plain(1, 2, 1, 40, 50, 32), 0.f, kNoAlibi, kNoMask, 0.3f),        // dropout
      with(plain(1, 2, 2, 70, 70, 24, -1, 0), 0.f, kNoAlibi, kHoles, 0.1f),  //
      // The NaN rule: NaN exactly in the rows that see a non-finite score and the keys those rows see.
      with(plain(1, 2, 1, 100, 100, 16), 0.f, kNoAlibi, kNoMask, 0.f, kQInf),
      with(plain(1, 2, 1, 100, 100, 16, -1, 0), 0.f, kNoAlibi, kNoMask, 0.f, kQInf),
      with(plain(1, 2, 2, 4, 4, 16, -1, 0), 0.f, kNoAlibi, kNoMask, 0.f, kQInf),          // few rows
      with(plain(1, 2, 1, 70, 150, 32, 30, 0, true), 2.f, kPerHead, kHoles, 0.f, kQInf),  // softcap too
      with(plain(1, 2, 1, 100, 100, 16, -1, 0), 0.f, kNoAlibi, kNoMask, 0.f, kKInf),
      with(plain(2, 4, 2, 90, 90, 16), 0.f, kNoAlibi, kFullMask, 0.f, kKInf),
      with(plain(1, 1, 1, 70, 70, 16, -1, 0), 0.f, kNoAlibi, kNoMask, 0.f, kNegInfScore),  // not "masked"
      with(plain(1, 1, 1, 70, 130, 16), 0.f, kNoAlibi, kNoMask, 0.f, kNegInfScore),        // in full tiles
      with(plain(1, 2, 1, 2, 130, 16), 0.f, kNoAlibi, kNoMask, 0.f, kNegInfScore),         // few rows
      with(plain(1, 2, 1, 90, 90, 16), 0.f, kNoAlibi, kCross, 0.f, kNaNHidden),            // -inf mask wins
      with(plain(1, 2, 1, 5, 9, 16, -1, 0), 0.f, kNoAlibi, kCross, 0.f, kNaNHidden),       //
      // Keys no row sees are never read (NaN in their k and v changes nothing) and get exactly zero gradients.
      with(plain(1, 2, 1, 70, 200, 32, 30, 0), 0.f, kNoAlibi, kNoMask, 0.f, kUnseen),
      with(plain(1, 2, 1, 50, 300, 32, 20, 0, true), 2.f, kPerHead, kNoMask, 0.f, kUnseen),
      with(plain(1, 2, 1, 3, 300, 64, 40, 0, true), 0.f, kNoAlibi, kNoMask, 0.f, kUnseen),  // few rows
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
