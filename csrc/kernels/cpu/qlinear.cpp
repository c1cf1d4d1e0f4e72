// CPU quantized linear: the instruction-set dispatch, the threading and the entry points. The kernels are in
// qlinear_impl.inc, compiled here once per instruction set under a target pragma (as the attention kernels), because
// setup.py builds for baseline x86-64 and the int8 -> fp32 conversion is the inner loop's cost.
//
// Decode (M = 1..16) is bandwidth-bound on the weight: int8 moves N*K bytes, fp32 F.linear 4*N*K. The kernels read
// each weight vector once per call, convert it in registers, scale it, and FMA it into every row of x.
#include "qlinear.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GK_QLIN_X86 1
#include <immintrin.h>
#else
#define GK_QLIN_X86 0
#endif

#include "dtype.h"
#include "isa.h"
#include "parallel.h"

// The per-ISA helpers pass vectors by value between always-inlined functions: GCC's note that this changes the ABI
// concerns calls that never exist.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace gptkernels {
namespace qlin_cpu {

using RowsFn = void (*)(const uint8_t* q, const float* scales, const float* bias, const float* x, float* y,
                        int64_t ldy, int64_t n0, int64_t n1, int64_t N, int64_t K, int64_t group);
constexpr int kMaxTile = 8;  // rows of x per kernel call; 9..16 rows are two calls on the same cache-hot weights

// A software prefetch that stays: GCC 12 deleted every __builtin_prefetch of the tile loops as dead code (cddce),
// so on x86 it is an asm statement.
inline void prefetch_line(const void* p) {
#if GK_QLIN_X86
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p);
#endif
}

// ---- one copy of the kernels per instruction set ------------------------------------------------------------------

namespace generic {
constexpr int kW = 4;
constexpr int kMaxAcc = 8;
constexpr int kMaxR = 4;
typedef float vf __attribute__((vector_size(kW * 4)));
typedef int32_t vi __attribute__((vector_size(kW * 4)));
typedef int16_t vi16 __attribute__((vector_size(kW * 2)));
typedef int8_t vi8 __attribute__((vector_size(kW)));
typedef uint16_t vu16 __attribute__((vector_size(kW * 2)));
typedef uint8_t vu8 __attribute__((vector_size(kW)));

inline vf load_i8(const int8_t* p) {
  vi8 q;
  std::memcpy(&q, p, sizeof q);
  return __builtin_convertvector(__builtin_convertvector(__builtin_convertvector(q, vi16), vi), vf);
}

inline vf i4_table(float s) { return vf{} + s; }

inline void load_i4(const uint8_t* p, vf s, vf* v) {
  for (int i = 0; i < 16 / kW; ++i) {
    vu8 b;
    std::memcpy(&b, p + i * kW, sizeof b);
    const vi u = __builtin_convertvector(__builtin_convertvector(b, vu16), vi);
    v[i] = __builtin_convertvector((u & 15) - 8, vf) * s;
    v[i + 16 / kW] = __builtin_convertvector((u >> 4) - 8, vf) * s;
  }
}
#include "qlinear_impl.inc"
}  // namespace generic

#if GK_QLIN_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr int kW = 8;
constexpr int kMaxAcc = 8;  // + 4 weight vectors + 1 x of the 16 ymm registers
constexpr int kMaxR = 4;
typedef float vf __attribute__((vector_size(kW * 4)));

inline vf load_i8(const int8_t* p) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return reinterpret_cast<vf>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)));
}

inline vf i4_table(float s) { return vf{} + s; }

// The nibbles are split and re-centred on the 16 bytes (128-bit ops), then widened as int8.
inline void load_i4(const uint8_t* p, vf s, vf* v) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i low = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
  const __m128i lo = _mm_sub_epi8(_mm_and_si128(b, low), eight);                      // k 0..15 of the block
  const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), low), eight);  // k 16..31
  v[0] = reinterpret_cast<vf>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo))) * s;
  v[1] = reinterpret_cast<vf>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)))) * s;
  v[2] = reinterpret_cast<vf>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi))) * s;
  v[3] = reinterpret_cast<vf>(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)))) * s;
}
#include "qlinear_impl.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
namespace avx512 {
constexpr int kW = 16;
constexpr int kMaxAcc = 16;  // + up to 8 weight vectors + 1 x of the 32 zmm registers
constexpr int kMaxR = 8;
typedef float vf __attribute__((vector_size(kW * 4)));
typedef int32_t vi __attribute__((vector_size(kW * 4)));

// The widening loads and the permutes are intrinsics; the rest is vector-extension arithmetic, which GCC turns into
// the same instructions. (The maskz forms: the plain ones start from _mm512_undefined_*(), which GCC 12 reports as
// maybe-uninitialized at -O3 -Wall.)
inline vf load_i8(const int8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return __builtin_convertvector(reinterpret_cast<vi>(_mm512_maskz_cvtepi8_epi32(0xffff, b)), vf);
}

// int4 by table lookup: the 16 values a group's nibbles can take, (u - 8) * s, fill one zmm register, and vpermps
// picks them by the low 4 bits of each 32-bit lane (the high nibble is shifted down first). Per 32 weights:
// one widening, one shift, two permutes and two FMAs, with the scale already applied; converting and scaling took
// eight 512-bit ops (3072x768 g128, M = 1, one thread, 2-core EPYC, standalone harness: 152 -> 109 us).
inline vf i4_table(float s) {
  const vf iota = {0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f, 14.f, 15.f};
  return (iota - 8.f) * s;
}

inline void load_i4(const uint8_t* p, vf tab, vf* v) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m512i u = _mm512_maskz_cvtepu8_epi32(0xffff, b);
  const __m512 t = reinterpret_cast<__m512>(tab);
  v[0] = reinterpret_cast<vf>(_mm512_maskz_permutexvar_ps(0xffff, u, t));
  v[1] = reinterpret_cast<vf>(
      _mm512_maskz_permutexvar_ps(0xffff, reinterpret_cast<__m512i>(reinterpret_cast<vi>(u) >> 4), t));
}
#include "qlinear_impl.inc"
}  // namespace avx512
#pragma GCC pop_options
#endif

RowsFn rows_for(int bits, bool per_group, int mt) {
  switch (cpu_isa()) {
#if GK_QLIN_X86
    case CpuIsa::kAvx512: return avx512::rows_fn(bits, per_group, mt);
    case CpuIsa::kAvx2: return avx2::rows_fn(bits, per_group, mt);
#endif
    default: return generic::rows_fn(bits, per_group, mt);
  }
}

using DequantFn = void (*)(int bits, const uint8_t* q, const float* s, float* w, int64_t K, int64_t group);

DequantFn dequant_fn() {
  switch (cpu_isa()) {
#if GK_QLIN_X86
    case CpuIsa::kAvx512: return &avx512::dequant_row;
    case CpuIsa::kAvx2: return &avx2::dequant_row;
#endif
    default: return &generic::dequant_row;
  }
}

// Weight rows per parallel work item: small enough to balance the threads on GPT-2 shapes (3072 / 16 = 192 items),
// large enough that the block (16 * K bytes) is reused from L1/L2 by the second 8-row tile of x when M is 9..16.
constexpr int64_t kRowBlock = 16;

void gemv_f32(int bits, const float* x, const uint8_t* q, const float* scales, const float* bias, float* y, int64_t M,
              int64_t N, int64_t K, int64_t group) {
  const bool per_group = group != K;
  const int64_t nblocks = (N + kRowBlock - 1) / kRowBlock;
  // The work is M*N*K multiply-adds; the threshold is the row-wise ops' (parallel.h).
  const bool par = M * N * K >= kParallelMinWork && nblocks > 1;
  RowsFn fns[kMaxTile];
  for (int mt = 1; mt <= kMaxTile; ++mt) fns[mt - 1] = rows_for(bits, per_group, mt);
  for (int64_t m0 = 0; m0 < M; m0 += kQlinearGemvMaxRows) {
    const int64_t mc = std::min<int64_t>(kQlinearGemvMaxRows, M - m0);
    parallel_for(par, nblocks, no_state, [&](NoState&, int64_t b) {
      const int64_t n0 = b * kRowBlock, n1 = std::min(N, n0 + kRowBlock);
      for (int64_t m = 0; m < mc; m += kMaxTile) {
        const int64_t mt = std::min<int64_t>(kMaxTile, mc - m);
        fns[mt - 1](q, scales, bias, x + (m0 + m) * K, y + (m0 + m) * N, N, n0, n1, N, K, group);
      }
    });
  }
}

template <typename T>
void fwd_impl(int bits, const T* x, const uint8_t* q, const float* scales, const float* bias, T* y, int64_t M,
              int64_t N, int64_t K, int64_t group) {
  if constexpr (std::is_same_v<T, float>) {
    gemv_f32(bits, x, q, scales, bias, y, M, N, K, group);
  } else {
    // x and y are M*K and M*N elements: small next to the weight at the M this kernel is for.
    std::vector<float> xf(size_t(M * K)), yf(size_t(M * N));
    for (int64_t i = 0; i < M * K; ++i) xf[size_t(i)] = to_float(x[i]);
    gemv_f32(bits, xf.data(), q, scales, bias, yf.data(), M, N, K, group);
    for (int64_t i = 0; i < M * N; ++i) y[i] = from_float<T>(yf[size_t(i)]);
  }
}

}  // namespace qlin_cpu

using namespace qlin_cpu;

void qlinear_fwd_cpu(DType dtype, int bits, const void* x, const void* q, const float* scales, const float* bias,
                     void* y, int64_t M, int64_t N, int64_t K, int64_t group) {
  if (M == 0 || N == 0) return;
  const auto* qb = static_cast<const uint8_t*>(q);
  switch (dtype) {
    case DType::kFloat32:
      return fwd_impl(bits, static_cast<const float*>(x), qb, scales, bias, static_cast<float*>(y), M, N, K, group);
    case DType::kFloat16:
      return fwd_impl(bits, static_cast<const half_t*>(x), qb, scales, bias, static_cast<half_t*>(y), M, N, K, group);
    case DType::kBFloat16:
      return fwd_impl(bits, static_cast<const bf16_t*>(x), qb, scales, bias, static_cast<bf16_t*>(y), M, N, K, group);
  }
}

void qlinear_dequant_cpu(int bits, const void* q, const float* scales, float* w, int64_t rows, int64_t K,
                         int64_t group) {
  const auto* qb = static_cast<const uint8_t*>(q);
  const int64_t ldq = bits == 8 ? K : K / 2, ngroups = K / group;
  const DequantFn fn = dequant_fn();
  parallel_for(rows * K >= kParallelMinWork, rows, no_state,
               [&](NoState&, int64_t n) { fn(bits, qb + n * ldq, scales + n * ngroups, w + n * K, K, group); });
}

}  // namespace gptkernels
