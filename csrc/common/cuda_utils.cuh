// cuda_utils.cuh: error checks for the CUDA launchers.
#pragma once

#include <cuda_runtime.h>

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

}  // namespace kernelrl
