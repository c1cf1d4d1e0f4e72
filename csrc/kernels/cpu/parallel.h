// OpenMP thread queries that also compile without OpenMP (then everything runs on one thread).
#pragma once

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gptkernels {

// Below about this much work (elements of a row-wise op, multiply-adds of attention) one thread beats waking the
// OpenMP team. It matters most on a busy machine: with every core taken, a parallel region over a single decode
// row waits for a descheduled thread (measured: 37 ms vs 1.2 ms per token, tiny GPT, 2-core EPYC at load 5).
// Every parallel region of the CPU kernels carries `if (work >= kParallelMinWork)`; ATen's grain size is the same.
constexpr long long kParallelMinWork = 1 << 15;

inline int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// body(state, i) for i in [0, n), with one state = make_state() per thread: on the OpenMP team when `par`
// (kDynamicChunk > 0: dynamic schedule with that chunk, else static), else on the calling thread with no OpenMP call
// at all. Why not `#pragma omp parallel if (par)`: libgomp builds and tears down a team of one even when the
// condition is false, 350-480 ns per region (measured on the 2-core EPYC, g++ 12), a sixth of a decode-size
// LayerNorm call; an orphaned `omp for` still costs 50-180 ns.
template <int kDynamicChunk = 0, typename MakeState, typename Body>
inline void parallel_for(bool par, int64_t n, MakeState&& make_state, Body&& body) {
#ifdef _OPENMP
  if (par) {
#pragma omp parallel
    {
      auto state = make_state();
      if constexpr (kDynamicChunk > 0) {
#pragma omp for schedule(dynamic, kDynamicChunk)
        for (int64_t i = 0; i < n; ++i) body(state, i);
      } else {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; ++i) body(state, i);
      }
    }
    return;
  }
#else
  (void)par;
#endif
  auto state = make_state();
  for (int64_t i = 0; i < n; ++i) body(state, i);
}

// No per-thread state.
struct NoState {};
inline NoState no_state() { return {}; }

}  // namespace gptkernels
