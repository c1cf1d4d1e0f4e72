// OpenMP thread queries that also compile without OpenMP (then everything runs on one thread).
#pragma once

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

}  // namespace gptkernels
