// dispatch.h: from run-time values to template instantiations, for the kernels' entry points.
//
// dispatch_dtype<Types>(dtype, f) calls f(TypeTag<T>{}) with T the element type of dtype in the
// type set Types: CpuTypes here (float, half_t, bfloat16_t; dtype.h), CudaTypes in
// common/cuda_dtype.cuh (float, __half, __nv_bfloat16). f is a generic lambda:
//   dispatch_dtype(dtype, [&](auto tag) { using T = typename decltype(tag)::type; ... });
// dispatch_bool(b, f) calls f(std::true_type{}) or f(std::false_type{}), so that a run-time flag
// picks a template instantiation: decltype(flag)::value is a constant expression inside f.
// Both return nothing: entry points write their results through pointers. dtype is assumed
// valid (dtype_from_code checked it at the Python boundary); an unknown value runs nothing.
#pragma once

#include <type_traits>

#include "common/dtype.h"

namespace kernelrl {

template <class T>
struct TypeTag {
  using type = T;
};

// The CPU kernels' element types (16-bit types are plain storage; see dtype.h).
struct CpuTypes {
  using f32 = float;
  using f16 = half_t;
  using bf16 = bfloat16_t;
};

template <class Types = CpuTypes, class F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(TypeTag<typename Types::f32>{}); return;
    case DType::kFloat16: f(TypeTag<typename Types::f16>{}); return;
    case DType::kBFloat16: f(TypeTag<typename Types::bf16>{}); return;
  }
}

template <class F>
void dispatch_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace kernelrl
