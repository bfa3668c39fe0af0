// vec.cuh: 16-byte vector access for the CUDA kernels, generic over the element type T.
//
// Vec16<T> holds kN = 16 / sizeof(T) elements (4 fp32, 8 fp16 / bf16). load16 / store16 move one
// with a single 16-byte streaming access (__ldcs / __stcs: the data is touched once, so it should
// not displace reused lines in L2); the pointer must be 16-byte aligned. align_head gives the
// scalar elements before a row's first 16-byte boundary, so a row splits into a scalar head,
// a vector body and a scalar tail.
//
// for_each_vec16<kUnroll, kStride>(p, v0, n_vec, f) walks the vector body p[0 .. n_vec) (in
// units of Vec16<T>) from v0 in steps of kStride (a block's threads start at v0 = threadIdx.x
// with kStride = blockDim.x): it issues kUnroll loads before it calls f(v, vec) on each of them,
// so that kUnroll 16-byte loads per thread are in flight, then finishes the remainder one at a
// time. f sees v in increasing order; it may store to the loaded addresses (each element is
// loaded before f runs on it, by the same thread).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kernelrl {

template <class T>
struct alignas(16) Vec16 {
  static constexpr int kN = 16 / sizeof(T);
  T e[kN];
};

template <class T>
__device__ __forceinline__ Vec16<T> load16(const T* p) {  // p 16-byte aligned; streaming read
  const uint4 u = __ldcs(reinterpret_cast<const uint4*>(p));
  Vec16<T> v;
  memcpy(&v, &u, 16);
  return v;
}

template <class T>
__device__ __forceinline__ void store16(T* p, const Vec16<T>& v) {  // p 16-byte aligned
  uint4 u;
  memcpy(&u, &v, 16);
  __stcs(reinterpret_cast<uint4*>(p), u);
}

// Elements before the first 16-byte boundary of p, at most n.
template <class T>
__device__ __forceinline__ int64_t align_head(const T* p, int64_t n) {
  const int64_t mis = static_cast<int64_t>((reinterpret_cast<uintptr_t>(p) & 15u) / sizeof(T));
  const int64_t head = mis == 0 ? 0 : Vec16<T>::kN - mis;
  return head < n ? head : n;
}

template <int kUnroll, int kStride, class T, class F>
__device__ __forceinline__ void for_each_vec16(const T* p, int64_t v0, int64_t n_vec, F&& f) {
  constexpr int kN = Vec16<T>::kN;
  int64_t v = v0;
  for (; v + (kUnroll - 1) * kStride < n_vec; v += kUnroll * kStride) {
    Vec16<T> r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) r[u] = load16(p + (v + u * kStride) * kN);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) f(v + u * kStride, r[u]);
  }
  for (; v < n_vec; v += kStride) f(v, load16(p + v * kN));
}

}  // namespace kernelrl
