// cuda_runtime_info.cu: see cuda_info.h.
#include <cuda_runtime.h>

#include "common/cuda_info.h"

namespace kernelrl {

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear it: "no driver" / "no device" just means zero GPUs here
    return 0;
  }
  return n;
}

}  // namespace kernelrl
