// row_loop.h: the CPU kernels' loop over independent rows, parallel on the OpenMP team.
//
// for_each_row(n_rows, n_cols, row_fn) calls row_fn(i) once for every row i in [0, n_rows).
// Rows must be independent (each call writes only its own row's outputs); then the results do
// not depend on the thread count or the schedule. The loop runs on cpu_num_threads() threads
// (cpu_features.h: set_num_threads, else the OpenMP default) when the call has at least
// kParallelMinElements elements (n_rows * n_cols) and more than one row; a smaller call stays on
// the calling thread, where starting the team would cost more than the rows. Without OpenMP it
// is a plain loop.
#pragma once

#include <cstdint>

#include "common/cpu_features.h"

namespace kernelrl {

inline constexpr int64_t kParallelMinElements = 1 << 15;

template <class RowFn>
void for_each_row(int64_t n_rows, int64_t n_cols, const RowFn& row_fn) {
#ifdef _OPENMP
  const bool parallel = n_rows > 1 && n_rows * n_cols >= kParallelMinElements;
  const int n_threads = parallel ? cpu_num_threads() : 1;
  // dynamic, 4: rows can differ in cost (ignored rows are not read), chunks of 4 keep the
  // scheduling overhead small next to a row of thousands of elements.
#pragma omp parallel for schedule(dynamic, 4) num_threads(n_threads) if (n_threads > 1)
  for (int64_t i = 0; i < n_rows; ++i) row_fn(i);
#else
  (void)n_cols;
  for (int64_t i = 0; i < n_rows; ++i) row_fn(i);
#endif
}

}  // namespace kernelrl
