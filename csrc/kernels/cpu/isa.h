// Per-ISA clones of the CPU kernels' hot loops.
//
// setup.py builds for baseline x86-64 (SSE2), which halves or quarters the vector width of the hot loops on the
// AVX2 / AVX-512 machines this runs on. GCC's target_clones compiles a function three times and picks one at load
// time from the CPU (an ifunc), so the same source runs 16-wide where AVX-512 exists. x86-64-v3 includes FMA.
// Not under ASan (the sanitizer build runs the plain code) nor where ifuncs are unavailable.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(__SANITIZE_ADDRESS__)
#define GPTKERNELS_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GPTKERNELS_ISA_CLONES
#endif

// Kernels compiled per instruction set under `#pragma GCC target` (a whole namespace of them, where target_clones'
// per-function copies would not reach the helpers they inline) pick their copy with this. Detected once; the
// environment variable GPTKERNELS_CPU_ISA=generic|avx2|avx512 caps it (for tests and measurements).
#include <cstdlib>
#include <cstring>

namespace gptkernels {

enum class CpuIsa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

inline CpuIsa detect_cpu_isa() {
  CpuIsa best = CpuIsa::kGeneric;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    best = CpuIsa::kAvx2;
  if (best == CpuIsa::kAvx2 && __builtin_cpu_supports("avx512f")) best = CpuIsa::kAvx512;
#endif
  if (const char* env = std::getenv("GPTKERNELS_CPU_ISA")) {
    CpuIsa cap = best;
    if (std::strcmp(env, "generic") == 0) cap = CpuIsa::kGeneric;
    if (std::strcmp(env, "avx2") == 0) cap = CpuIsa::kAvx2;
    if (cap < best) best = cap;
  }
  return best;
}

inline CpuIsa cpu_isa() {
  static const CpuIsa chosen = detect_cpu_isa();
  return chosen;
}

inline const char* cpu_isa_name(CpuIsa isa) {
  return isa == CpuIsa::kAvx512 ? "avx512" : isa == CpuIsa::kAvx2 ? "avx2" : "generic";
}

}  // namespace gptkernels
