// simd.h: W-lane fp32 SIMD for the CPU kernels, on GCC/Clang vector extensions.
//
// Kernels are templated on the lane count W and instantiated twice: W = 4 (16-byte vectors: SSE2
// on baseline x86-64, NEON on Arm) in plain functions, and W = 8 (32-byte vectors) inside
// functions marked __attribute__((target("avx2,fma"))), where they become AVX2 registers with
// FMA. Every helper here is always_inline, so a kernel body is compiled for the ISA of the
// function it is inlined into, while every out-of-line symbol stays baseline (no -march flags,
// and no ODR mixing of ISA variants).
//
// Contents: Lanes<W> (the vector types) and the conv::VecOps<W> policy (so the dtype.h
// conversions run on W lanes), full and partial W-element loads/stores of float / half_t /
// bfloat16_t, select, max, horizontal reductions, exp: a Cephes-style exp with ~1 ulp error
// that returns exactly 0 below -86.5 (and for -inf), inf above ~88.72 and NaN for NaN, and D4,
// 4 float64 lanes for sums of fp32 terms.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/dtype.h"

#if !defined(__GNUC__)
#error "kernelrl's CPU kernels need GCC or Clang (vector extensions)"
#endif

#define KR_INLINE inline __attribute__((always_inline))

namespace kernelrl {
namespace simd {

template <int W>
struct Lanes {
  static constexpr int kW = W;
  typedef float F __attribute__((vector_size(4 * W)));      // W x fp32
  typedef int32_t I __attribute__((vector_size(4 * W)));    // W x int32 (compare masks)
  typedef uint32_t U __attribute__((vector_size(4 * W)));   // W x uint32 (bits)
  typedef uint16_t H __attribute__((vector_size(2 * W)));   // W x 16-bit storage
};

template <int W> using F = typename Lanes<W>::F;
template <int W> using I = typename Lanes<W>::I;
template <int W> using U = typename Lanes<W>::U;

template <int W> KR_INLINE F<W> splat(float x) { return F<W>{} + x; }
template <int W> KR_INLINE I<W> iota() {
  I<W> v{};
  for (int k = 0; k < W; ++k) v[k] = k;
  return v;
}
template <int W> KR_INLINE F<W> select(I<W> m, F<W> a, F<W> b) {
  return (F<W>)(((I<W>)a & m) | ((I<W>)b & ~m));
}
// max that ignores a NaN in b (like maxps): NaN logits are caught by the sums instead.
template <int W> KR_INLINE F<W> vmax(F<W> a, F<W> b) { return select<W>(a > b, a, b); }
template <int W> KR_INLINE float hmax(F<W> v) {
  float m = v[0];
  for (int k = 1; k < W; ++k) m = v[k] > m ? v[k] : m;
  return m;
}
template <int W> KR_INLINE float hsum(F<W> v) {  // pairwise tree over the lanes
  for (int half = W / 2; half >= 1; half /= 2) {
    for (int k = 0; k < half; ++k) v[k] = v[k] + v[k + half];
  }
  return v[0];
}
template <int W> KR_INLINE bool any_nan(F<W> v) {
  bool r = false;
  for (int k = 0; k < W; ++k) r |= (v[k] != v[k]);
  return r;
}

}  // namespace simd

namespace conv {
template <int W>
struct VecOps {
  using F = simd::F<W>;
  using U = simd::U<W>;
  static KR_INLINE F as_f(U u) { return (F)u; }
  static KR_INLINE U as_u(F f) { return (U)f; }
  static KR_INLINE U splat(uint32_t c) { return U{} + c; }
  static KR_INLINE U select(simd::I<W> m, U a, U b) { return (a & (U)m) | (b & ~(U)m); }
};
}  // namespace conv

namespace simd {

// The value of v as a plain fp32 vector: an empty asm statement stops the compiler from fusing
// the multiply that produced v into a later add (FMA contraction is on for the kernels). The
// kernels compute d = (x - m) / T through it so that d is rounded the same way everywhere.
template <class V> KR_INLINE V rounded_value(V v) {
#if defined(__x86_64__) || defined(__i386__)
  __asm__("" : "+x"(v));
#elif defined(__aarch64__) || defined(__arm__)
  __asm__("" : "+w"(v));
#else
  __asm__("" : "+m"(v));
#endif
  return v;
}
template <int W> KR_INLINE F<W> rounded(F<W> v) { return rounded_value(v); }
KR_INLINE float rounded(float v) { return rounded_value(v); }

// ---- loads and stores of W elements -------------------------------------------------------------

template <int W> KR_INLINE F<W> load(const float* p) {
  F<W> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <int W> KR_INLINE F<W> load(const bfloat16_t* p) {
  typename Lanes<W>::H h;
  std::memcpy(&h, p, sizeof h);
  return conv::bf16_bits_to_float<conv::VecOps<W>>(__builtin_convertvector(h, U<W>));
}
template <int W> KR_INLINE F<W> load(const half_t* p) {
  typename Lanes<W>::H h;
  std::memcpy(&h, p, sizeof h);
  return conv::half_bits_to_float<conv::VecOps<W>>(__builtin_convertvector(h, U<W>));
}

template <int W> KR_INLINE void store(float* p, F<W> v) { std::memcpy(p, &v, sizeof v); }
template <int W> KR_INLINE void store(bfloat16_t* p, F<W> v) {
  const auto h = __builtin_convertvector(conv::float_to_bf16_bits<conv::VecOps<W>>(v),
                                         typename Lanes<W>::H);
  std::memcpy(p, &h, sizeof h);
}
template <int W> KR_INLINE void store(half_t* p, F<W> v) {
  const auto h = __builtin_convertvector(conv::float_to_half_bits<conv::VecOps<W>>(v),
                                         typename Lanes<W>::H);
  std::memcpy(p, &h, sizeof h);
}

// The first n (0 < n < W) elements; the other lanes read as 0.
template <int W, class T>
KR_INLINE F<W> load_partial(const T* p, int n) {
  T tmp[W];
  std::memset(static_cast<void*>(tmp), 0, sizeof tmp);
  std::memcpy(static_cast<void*>(tmp), p, sizeof(T) * n);
  return load<W>(static_cast<const T*>(tmp));
}
// Writes only the first n (0 < n < W) elements.
template <int W, class T>
KR_INLINE void store_partial(T* p, F<W> v, int n) {
  T tmp[W];
  store<W>(tmp, v);
  std::memcpy(static_cast<void*>(p), tmp, sizeof(T) * n);
}

// ---- exp ----------------------------------------------------------------------------------------

// exp(x) on W lanes. Range reduction x = n ln2 + r, |r| <= ln2/2 (ln2 split in two parts), a
// degree-7 polynomial for e^r (Cephes expf coefficients), and 2^n built in the exponent bits.
// Results below 2.7e-38 (x < -86.5, incl. -inf) are exactly 0, as with a flush-to-zero GPU exp.
template <int W>
KR_INLINE F<W> exp(F<W> x) {
  const float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  F<W> xc = select<W>(x > 88.8f, splat<W>(88.8f), x);  // NaN passes through both clamps
  xc = select<W>(xc < -86.5f, splat<W>(-86.5f), xc);
  const F<W> kn = xc * 1.44269504088896341f + kMagic;
  const F<W> n = kn - kMagic;
  const I<W> ni = (I<W>)kn - (I<W>)splat<W>(kMagic);  // n as an integer, in [-125, 128]
  F<W> r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F<W> p = splat<W>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const F<W> scale = (F<W>)((ni + 126) << 23);  // 2^(n-1): valid for n in [-125, 128]
  const F<W> y = p * scale * 2.0f;
  return select<W>(x < -86.5f, splat<W>(0.0f), y);
}

// ---- float64 accumulation -----------------------------------------------------------------------

// 4 lanes of float64 (sums that must not round like fp32; one AVX2 register, two SSE2 ones).
// Fixed at 4 whatever W is: a wider double vector would not fit a register and be spilled.
typedef double D4 __attribute__((vector_size(32)));
KR_INLINE D4 load_wide(const float* p) { return __builtin_convertvector(load<4>(p), D4); }
KR_INLINE double hsum(D4 v) { return (v[0] + v[1]) + (v[2] + v[3]); }
// The W fp32 lanes of v in 4 float64 lanes: lane j holds v[j] (W = 4), or v[j] + v[j + 4] added
// in float64 (W = 8). Added to a D4 sum, it keeps every lane's sum in a fixed order. (Element by
// element, not __builtin_convertvector, which GCC 12 splits into 2-lane conversions.)
template <int W>
KR_INLINE D4 widen_sum(F<W> v) {
  static_assert(W == 4 || W == 8, "widen_sum: 4 or 8 lanes");
  const D4 lo = {double(v[0]), double(v[1]), double(v[2]), double(v[3])};
  if constexpr (W == 4) {
    return lo;
  } else {
    const D4 hi = {double(v[4]), double(v[5]), double(v[6]), double(v[7])};
    return lo + hi;
  }
}

}  // namespace simd
}  // namespace kernelrl
