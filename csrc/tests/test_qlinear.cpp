// Quantized linear CPU kernels (csrc/kernels/cpu/qlinear.h) against an fp64 reference written here: int8 per
// channel (odd K) and per group, int4 per group of 32 and 128; every tile width of x (M = 1..9, 16, 17: the 8-row
// tiles and the M > 16 loop), weight-row counts that leave remainder tiles, fp32 and bf16 activations, with and
// without bias; and the dequantize kernel bit for bit. The binary runs at OMP_NUM_THREADS=3 (CMakeLists.txt), so
// the row blocks also split unevenly over threads. The instruction-set copy is the best this CPU has (or
// GPTKERNELS_CPU_ISA's cap).
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "harness.h"
#include "kernels/cpu/qlinear.h"

namespace gptkernels {
namespace {

struct Format {
  int bits;
  int64_t K, group;
};
constexpr Format kFormats[] = {{8, 771, 771}, {8, 384, 64}, {4, 384, 32}, {4, 256, 128}};
constexpr int64_t kRows[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17};
constexpr int64_t kOutRows[] = {1, 7, 37, 100};

// The int4 block layout of qlinear.h: byte j of a 32-value block holds k = j (low nibble) and k = j + 16 (high).
std::vector<uint8_t> pack(const std::vector<int>& q, int64_t N, int64_t K, int bits) {
  if (bits == 8) {
    std::vector<uint8_t> out(size_t(N * K));
    for (size_t i = 0; i < out.size(); ++i) out[i] = uint8_t(int8_t(q[i]));
    return out;
  }
  std::vector<uint8_t> out(size_t(N * K / 2));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < K / 32; ++b)
      for (int64_t j = 0; j < 16; ++j) {
        const int lo = q[size_t(n * K + 32 * b + j)] + 8, hi = q[size_t(n * K + 32 * b + 16 + j)] + 8;
        out[size_t(n * K / 2 + 16 * b + j)] = uint8_t(lo | (hi << 4));
      }
  return out;
}

template <typename T>
void run_case(const std::string& name, Format f, int64_t N, int64_t M, bool with_bias) {
  const int64_t K = f.K, G = K / f.group;
  std::mt19937 gen = gk::rng_for(name);
  const int qmax = f.bits == 8 ? 127 : 7;
  std::uniform_int_distribution<int> qd(-qmax - 1, qmax);
  std::uniform_real_distribution<float> sd(0.001f, 0.02f);
  std::vector<int> q(size_t(N * K));
  for (auto& v : q) v = qd(gen);
  std::vector<float> scales(static_cast<size_t>(N * G)), bias(static_cast<size_t>(N));
  for (auto& v : scales) v = sd(gen);
  for (auto& v : bias) v = sd(gen) * 10.f;
  const std::vector<uint8_t> packed = pack(q, N, K, f.bits);
  const std::vector<T> x = gk::randn<T>(gen, size_t(M * K));

  std::vector<double> ref(size_t(M * N)), scale(size_t(M * N));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = with_bias ? bias[size_t(n)] : 0.0, mag = std::fabs(acc);
      for (int64_t k = 0; k < K; ++k) {
        const double term = double(q[size_t(n * K + k)]) * scales[size_t(n * G + k / f.group)] *
                            gk::as_double(x[size_t(m * K + k)]);
        acc += term;
        mag += std::fabs(term);
      }
      ref[size_t(m * N + n)] = acc;
      scale[size_t(m * N + n)] = mag;
    }

  gk::Output<T> y(size_t(M * N));
  qlinear_fwd_cpu(gk::Traits<T>::dtype, f.bits, x.data(), packed.data(), scales.data(),
                  with_bias ? bias.data() : nullptr, y.data(), M, N, K, f.group);
  if constexpr (std::is_same_v<T, float>) {
    gk::check_norm(name, y.data(), ref.data(), scale.data(), y.size(), 1e-5);
  } else {
    gk::check_ulp(name, y.data(), ref.data(), scale.data(), y.size(), 1e-5);
  }
  GK_CHECK_MSG(y.guard_intact(), name << ": wrote past the output");

  // The dequantize kernel (the large-M path's weight tiles): w = q * scale exactly in fp32.
  if (M == 1) {
    gk::Output<float> w(size_t(N * K));
    qlinear_dequant_cpu(f.bits, packed.data(), scales.data(), w.data(), N, K, f.group);
    std::vector<float> want(size_t(N * K));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k)
        want[size_t(n * K + k)] = float(q[size_t(n * K + k)]) * scales[size_t(n * G + k / f.group)];
    gk::check_bits(name + "/dequant", w.data(), want.data(), want.size());
    GK_CHECK_MSG(w.guard_intact(), name << "/dequant: wrote past the output");
  }
}

template <typename T>
void register_dtype() {
  for (const Format& f : kFormats)
    for (int64_t N : kOutRows)
      for (int64_t M : kRows) {
        const bool with_bias = (M + N) % 2 == 0;
        const std::string name = std::string("qlinear.fwd/") + gk::Traits<T>::name + "/int" +
                                 std::to_string(f.bits) + "-g" + std::to_string(f.group) + "/K=" +
                                 std::to_string(f.K) + "/N=" + std::to_string(N) + "/M=" + std::to_string(M) +
                                 (with_bias ? "/bias" : "");
        gk::add_test(name, [=] { run_case<T>(name, f, N, M, with_bias); });
      }
}

}  // namespace

GK_REGISTER(qlinear_cases) {
  register_dtype<float>();
  register_dtype<bf16_t>();
}

}  // namespace gptkernels
