// CPU attention: the argument structs, the instruction-set dispatch, and the entry points. The kernels themselves
// are in attention_impl.inc, compiled here once per instruction set (GCC vector extensions under a target
// pragma), because setup.py builds for the baseline x86-64 ISA and a kernel that only ever saw SSE2 would run at
// a quarter of AVX-512's width. The best variant the CPU supports runs; GPTKERNELS_CPU_ISA caps it.
//
// Measured on the 2-core AMD EPYC (Zen 4) VM, torch 2.14.1, causal fp32 forward, B=4 H=8 T=1024 D=64, wall p50 of
// 15 interleaved rounds: 27.9 ms here (154 GFLOP/s), 40.1 ms torch SDPA (its flash CPU kernel), 240 ms eager
// matmul-softmax-matmul. One thread, 1/4 of that shape, CPU time: avx512 12.4 ms (86 GFLOP/s, the micro-kernels
// near one zmm FMA per cycle), avx2 14.1 ms, generic (SSE2) 37.8 ms.
// With AttnSpec (natural-domain scores, unscaled Q, the NaN rule), same machine, one thread, avx512, CPU time p50 of
// alternating old/new processes at load 1-2.5: causal forward 12.8 ms (was 12.5), backward 47 ms (was 53).
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define GK_ATTN_X86 1
#include <immintrin.h>
#else
#define GK_ATTN_X86 0
#endif

#include "../attention_rng.h"
#include "dtype.h"
#include "parallel.h"
#include "vmath.h"

// vmath.h's templates are instantiated here for the AVX2 / AVX-512 vector types (always inlined): GCC's note that
// passing such vectors by value changes the ABI concerns calls that never exist.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace gptkernels {
namespace attn_cpu {

struct FwdArgs {
  const void *q, *k, *v;
  const float* mask;
  int64_t smb, smh, smi, smj;
  void* out;
  float* lse;
  int64_t B, H, Hkv, Tq, Tk, D;
  float scale;
  AttnSpec spec;
  float dropout_p;
  uint64_t seed;
};

struct BwdArgs {
  const void *dout, *q, *k, *v, *out;
  const float* lse;
  const float* mask;
  int64_t smb, smh, smi, smj;
  void *dq, *dk, *dv;
  int64_t B, H, Hkv, Tq, Tk, D;
  float scale;
  AttnSpec spec;
  float dropout_p;
  uint64_t seed;
};

struct DecodeArgs {
  const void *q, *k, *v;
  const int64_t* seqlens;
  void* out;
  int64_t B, H, Hkv, Tn, Tmax, D;
  float scale;
  int64_t num_splits;
};

// The query rows [lo, hi) of [0, Tq) that can see a key of [j_lo, j_hi): attn_key_range of the mirrored spec, since
// key j is visible at position p iff j - right <= p <= j + left.
inline void attn_query_range(const AttnSpec& s, int64_t j_lo, int64_t j_hi, int64_t Tq, int64_t* lo, int64_t* hi) {
  AttnSpec m;
  m.left = s.right;
  m.right = s.left;
  attn_key_range(m, j_lo - s.offset, j_hi - 1 - s.offset, Tq, lo, hi);
}

// ---- one copy of the kernels per instruction set ------------------------------------------------------------------

#define GK_ATTN_ENTRY_POINTS                                                                                       \
  void run_fwd(DType t, const FwdArgs& a) {                                                                       \
    switch (t) {                                                                                                  \
      case DType::kFloat32: fwd<float>(a); break;                                                                 \
      case DType::kFloat16: fwd<half_t>(a); break;                                                                \
      case DType::kBFloat16: fwd<bf16_t>(a); break;                                                               \
    }                                                                                                             \
  }                                                                                                               \
  void run_bwd(DType t, const BwdArgs& a) {                                                                       \
    switch (t) {                                                                                                  \
      case DType::kFloat32: bwd<float>(a); break;                                                                 \
      case DType::kFloat16: bwd<half_t>(a); break;                                                                \
      case DType::kBFloat16: bwd<bf16_t>(a); break;                                                               \
    }                                                                                                             \
  }                                                                                                               \
  void run_decode(DType t, const DecodeArgs& a) {                                                                 \
    switch (t) {                                                                                                  \
      case DType::kFloat32: decode<float>(a); break;                                                              \
      case DType::kFloat16: decode<half_t>(a); break;                                                             \
      case DType::kBFloat16: decode<bf16_t>(a); break;                                                            \
    }                                                                                                             \
  }

namespace generic {
constexpr int kW = 4;  // 16-byte vectors: SSE2 on x86-64, NEON on aarch64
constexpr int kNV = 2;
#define GK_ATTN_F16C 0
#define GK_ATTN_FMA 0
#include "attention_impl.inc"
#undef GK_ATTN_F16C
#undef GK_ATTN_FMA
GK_ATTN_ENTRY_POINTS
}  // namespace generic

#if GK_ATTN_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
constexpr int kW = 8;
constexpr int kNV = 2;  // 4 x 2 accumulators + 2 loads + 1 broadcast of the 16 ymm registers
#define GK_ATTN_F16C 1
#define GK_ATTN_FMA 1
#include "attention_impl.inc"
#undef GK_ATTN_F16C
#undef GK_ATTN_FMA
GK_ATTN_ENTRY_POINTS
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
namespace avx512 {
constexpr int kW = 16;
constexpr int kNV = 4;  // 4 x 4 accumulators + 4 loads + 1 broadcast of the 32 zmm registers
#define GK_ATTN_F16C 1
#define GK_ATTN_FMA 1
#include "attention_impl.inc"
#undef GK_ATTN_F16C
#undef GK_ATTN_FMA
GK_ATTN_ENTRY_POINTS
}  // namespace avx512
#pragma GCC pop_options
#endif

#undef GK_ATTN_ENTRY_POINTS

enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detect_isa() {
  Isa best = Isa::kGeneric;
#if GK_ATTN_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool f16c = __builtin_cpu_supports("f16c");
  if (avx2 && f16c) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f")) best = Isa::kAvx512;
#endif
  if (const char* env = std::getenv("GPTKERNELS_CPU_ISA")) {
    const std::string s(env);
    Isa cap = best;
    if (s == "generic") cap = Isa::kGeneric;
    if (s == "avx2") cap = Isa::kAvx2;
    if (s == "avx512") cap = Isa::kAvx512;
    best = static_cast<Isa>(std::min(static_cast<int>(best), static_cast<int>(cap)));
  }
  return best;
}

Isa isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

}  // namespace attn_cpu

using namespace attn_cpu;

const char* attention_cpu_isa() {
  switch (isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kGeneric: return "generic";
  }
  return "generic";
}

void attention_fwd_cpu(DType dtype, const void* q, const void* k, const void* v, const float* mask, int64_t smb,
                       int64_t smh, int64_t smi, int64_t smj, void* out, float* lse, int64_t B, int64_t H, int64_t Hkv,
                       int64_t Tq, int64_t Tk, int64_t D, float scale, const AttnSpec& spec, float dropout_p,
                       uint64_t seed) {
  if (B * H * Tq == 0) return;
  const FwdArgs a{q, k, v, mask, smb, smh, smi, smj, out, lse, B, H, Hkv, Tq, Tk, D, scale, spec, dropout_p, seed};
  switch (isa()) {
#if GK_ATTN_X86
    case Isa::kAvx512: avx512::run_fwd(dtype, a); break;
    case Isa::kAvx2: avx2::run_fwd(dtype, a); break;
#endif
    default: generic::run_fwd(dtype, a); break;
  }
}

void attention_bwd_cpu(DType dtype, const void* dout, const void* q, const void* k, const void* v, const void* out,
                       const float* lse, const float* mask, int64_t smb, int64_t smh, int64_t smi, int64_t smj,
                       void* dq, void* dk, void* dv, int64_t B, int64_t H, int64_t Hkv, int64_t Tq, int64_t Tk,
                       int64_t D, float scale, const AttnSpec& spec, float dropout_p, uint64_t seed) {
  if (B * Hkv == 0) return;  // no dk/dv (and dq empty, or zeroed by the passes below)
  const BwdArgs a{dout, q, k, v, out, lse, mask, smb, smh, smi, smj, dq, dk, dv, B, H, Hkv, Tq, Tk, D, scale,
                  spec, dropout_p, seed};
  switch (isa()) {
#if GK_ATTN_X86
    case Isa::kAvx512: avx512::run_bwd(dtype, a); break;
    case Isa::kAvx2: avx2::run_bwd(dtype, a); break;
#endif
    default: generic::run_bwd(dtype, a); break;
  }
}

void decode_attention_cpu(DType dtype, const void* q, const void* k_cache, const void* v_cache,
                          const int64_t* seqlens, void* out, int64_t B, int64_t H, int64_t Hkv, int64_t Tn,
                          int64_t Tmax, int64_t D, float scale, int64_t num_splits) {
  if (B * H * Tn == 0) return;
  const DecodeArgs a{q, k_cache, v_cache, seqlens, out, B, H, Hkv, Tn, Tmax, D, scale, num_splits};
  switch (isa()) {
#if GK_ATTN_X86
    case Isa::kAvx512: avx512::run_decode(dtype, a); break;
    case Isa::kAvx2: avx2::run_decode(dtype, a); break;
#endif
    default: generic::run_decode(dtype, a); break;
  }
}

}  // namespace gptkernels
