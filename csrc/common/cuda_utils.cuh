// cuda_utils.cuh: launch helpers and error checks for the CUDA launchers.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace kernelrl {

// Throws std::runtime_error (-> RuntimeError) "<fn>: CUDA error: <string>" if err is an error.
inline void cuda_check(cudaError_t err, const char* fn) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(fn) + ": CUDA error: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

// After a <<<...>>> launch: launch-configuration errors and errors such as a missing driver.
inline void cuda_check_launch(const char* fn) { cuda_check(cudaGetLastError(), fn); }

// Grid for kernels with one block per row and a grid-stride loop over rows: one block per row,
// capped at INT_MAX blocks (the grid's x limit); the loop covers the rest.
inline unsigned grid_for_rows(int64_t n_rows) {
  return static_cast<unsigned>(n_rows < INT_MAX ? n_rows : INT_MAX);
}

}  // namespace kernelrl
