// The kernels' one parallel construct, over OpenMP and free of torch, so the same sources build
// into torch's extension (which shares torch's OpenMP runtime and thread count) and into a
// library that runs without torch.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace llama_engine {

// Threads a parallel region may use: set_threads(n) (the library's caller, once, for every
// thread that calls in: OpenMP's own setting is per calling thread, and the engine computes on
// its scheduler thread), else OpenMP's default for the calling thread (torch sets that one).
inline std::atomic<int>& thread_setting() {
  static std::atomic<int> n{0};
  return n;
}
inline void set_threads(int n) { thread_setting().store(n > 0 ? n : 0); }

inline int max_threads() {
  const int set = thread_setting().load(std::memory_order_relaxed);
  if (set > 0) return set;
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// f(b0, b1) over [begin, end) cut into one contiguous chunk per thread, with at most one thread
// per `grain` items; serial when already inside a parallel region (at::parallel_for's contract).
// An exception thrown by f (a failed allocation) reaches the caller.
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  const int64_t range = end - begin;
#ifdef _OPENMP
  const int64_t n = std::min<int64_t>(max_threads(), (range + grain - 1) / grain);
  if (n > 1 && !omp_in_parallel()) {
    // an exception must not leave a parallel region (that aborts the process): the first one
    // is kept and rethrown on the calling thread
    std::exception_ptr error;
#pragma omp parallel num_threads(static_cast<int>(n))
    {
      const int64_t nt = omp_get_num_threads(), chunk = (range + nt - 1) / nt;
      const int64_t b0 = begin + omp_get_thread_num() * chunk;
      try {
        if (b0 < end) f(b0, std::min(end, b0 + chunk));
      } catch (...) {
#pragma omp critical(llama_engine_parallel_error)
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  f(begin, end);
}

}  // namespace llama_engine
