// cuda_dtype.cuh: the CUDA kernels' element types and their fp32 conversions.
//
// Kernels compute in fp32: to_f32 upcasts on load (exact), from_f32<T> downcasts on store with
// round to nearest even (__float2half_rn / __float2bfloat16_rn). CudaTypes maps the dtype codes
// of dtype.h to these types for dispatch_dtype<CudaTypes> (common/dispatch.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/dispatch.h"

namespace kernelrl {

struct CudaTypes {
  using f32 = float;
  using f16 = __half;
  using bf16 = __nv_bfloat16;
};

template <class T> __device__ __forceinline__ float to_f32(T x);
template <> __device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <class T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

}  // namespace kernelrl
