// cuda_info.h: CUDA runtime queries, declared without CUDA headers so that bindings.cpp stays a
// plain C++ file. Defined in cuda_runtime_info.cu (built only with the CUDA part).
#pragma once

namespace kernelrl {

// Number of visible CUDA devices; 0 when there is no driver or no GPU. Never throws.
int cuda_device_count();

}  // namespace kernelrl
