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
