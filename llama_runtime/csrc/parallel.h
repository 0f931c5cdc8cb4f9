// The kernels' one parallel construct, over OpenMP and free of torch, so the same sources build
// into torch's extension (which shares torch's OpenMP runtime and thread count) and into a
// library that runs without torch.
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace llama_engine {

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// f(b0, b1) over [begin, end) cut into one contiguous chunk per thread, with at most one thread
// per `grain` items; serial when already inside a parallel region (at::parallel_for's contract).
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  const int64_t range = end - begin;
#ifdef _OPENMP
  const int64_t n = std::min<int64_t>(omp_get_max_threads(), (range + grain - 1) / grain);
  if (n > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(static_cast<int>(n))
    {
      const int64_t nt = omp_get_num_threads(), chunk = (range + nt - 1) / nt;
      const int64_t b0 = begin + omp_get_thread_num() * chunk;
      if (b0 < end) f(b0, std::min(end, b0 + chunk));
    }
    return;
  }
#endif
  f(begin, end);
}

}  // namespace llama_engine
