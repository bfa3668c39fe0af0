// dtype.h: element types of the native kernels and portable fp16/bf16 <-> fp32 conversions.
//
// Dtype codes (the Python side passes these as ints):
//   0 = float32, 1 = float16 (IEEE binary16), 2 = bfloat16
//
// The CPU kernels keep half-precision values in plain 16-bit storage types (half_t, bfloat16_t)
// and convert with bit arithmetic, so nothing needs F16C or AVX512-BF16. Conversions are exact on
// load; stores round to nearest, ties to even, keep inf as inf and turn any NaN into a quiet NaN
// of the same sign (0x7e00 / 0x7fc0 | sign). Floats too large for fp16 become inf, as in IEEE.
//
// Each conversion is written once, as a template over an "Ops" policy that supplies the integer
// type U (uint32_t here, a W-lane vector in simd.h) and three primitives: as_f / as_u
// (reinterpret bits) and select(mask, a, b). The scalar and the vector code paths therefore run
// the same bit algorithm (after F. Giesen's "half <-> float" routines).
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace kernelrl {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "?";
}

inline int64_t dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

// Parse a dtype code; throws std::invalid_argument (-> ValueError) naming the argument.
inline DType dtype_from_code(int64_t code, const char* fn, const char* arg) {
  if (code < 0 || code > 2) {
    throw std::invalid_argument(std::string(fn) + ": " + arg +
                                ": expected 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                                std::to_string(code));
  }
  return static_cast<DType>(code);
}

// 16-bit storage types for the CPU code (the CUDA code uses __half / __nv_bfloat16).
struct half_t { uint16_t bits; };
struct bfloat16_t { uint16_t bits; };

namespace conv {

// ---- bit algorithms, generic over Ops (scalar or SIMD) --------------------------------------

// fp16 bits (low 16 bits of h) -> fp32. Exact, including subnormals, inf and NaN payloads.
template <class Ops>
inline typename Ops::F half_bits_to_float(typename Ops::U h) {
  using U = typename Ops::U;
  const uint32_t kShiftedExp = 0x7c00u << 13;         // fp16 exponent mask, shifted to fp32
  U o = (h & 0x7fffu) << 13;                          // exponent and mantissa
  const U e = o & kShiftedExp;
  o = o + ((127u - 15u) << 23);                       // rebias the exponent
  const U inf_nan = o + ((128u - 16u) << 23);         // fp16 exponent 31 -> fp32 exponent 255
  const U sub = Ops::as_u(Ops::as_f(o + (1u << 23)) - Ops::as_f(Ops::splat(113u << 23)));
  o = Ops::select(e == kShiftedExp, inf_nan, o);
  o = Ops::select(e == 0u, sub, o);                   // zero / subnormal: renormalize exactly
  o = o | ((h & 0x8000u) << 16);                      // sign
  return Ops::as_f(o);
}

// fp32 -> fp16 bits (in the low 16 bits), round to nearest even.
template <class Ops>
inline typename Ops::U float_to_half_bits(typename Ops::F f) {
  using U = typename Ops::U;
  const uint32_t kF16Max = (127u + 16u) << 23;        // first fp32 value that overflows fp16
  const uint32_t kDenormMagic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  U u = Ops::as_u(f);
  const U sign = u & 0x80000000u;
  u = u ^ sign;
  // inf or NaN (a quiet NaN for any NaN) for values that overflow
  const U big = Ops::select(u > 0x7f800000u, Ops::splat(0x7e00u), Ops::splat(0x7c00u));
  // result is subnormal or zero: let the FPU round by adding a magic number (needs RNE mode)
  const U sub = Ops::as_u(Ops::as_f(u) + Ops::as_f(Ops::splat(kDenormMagic))) - kDenormMagic;
  // normal: rebias, round to nearest even by adding 0xfff + the odd bit
  const U odd = (u >> 13) & 1u;
  const U nrm = (u - ((127u - 15u) << 23) + 0xfffu + odd) >> 13;
  U o = Ops::select(u < (113u << 23), sub, nrm);
  o = Ops::select(u >= kF16Max, big, o);
  return o | (sign >> 16);
}

// bf16 bits (low 16 bits of h) -> fp32. Exact.
template <class Ops>
inline typename Ops::F bf16_bits_to_float(typename Ops::U h) {
  return Ops::as_f(h << 16);
}

// fp32 -> bf16 bits (in the low 16 bits), round to nearest even; NaN stays a quiet NaN.
template <class Ops>
inline typename Ops::U float_to_bf16_bits(typename Ops::F f) {
  using U = typename Ops::U;
  const U u = Ops::as_u(f);
  const U rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const U quiet_nan = (u >> 16) | 0x40u;
  return Ops::select((u & 0x7fffffffu) > 0x7f800000u, quiet_nan, rounded);
}

// ---- scalar policy --------------------------------------------------------------------------

struct ScalarOps {
  using F = float;
  using U = uint32_t;
  static inline F as_f(U u) { F f; std::memcpy(&f, &u, sizeof f); return f; }
  static inline U as_u(F f) { U u; std::memcpy(&u, &f, sizeof u); return u; }
  static inline U splat(uint32_t c) { return c; }
  static inline U select(bool m, U a, U b) { return m ? a : b; }
};

}  // namespace conv

// ---- scalar API ---------------------------------------------------------------------------------

inline float half_to_float(half_t h) { return conv::half_bits_to_float<conv::ScalarOps>(h.bits); }
inline float bf16_to_float(bfloat16_t h) {
  return conv::bf16_bits_to_float<conv::ScalarOps>(h.bits);
}
inline half_t float_to_half(float f) {
  return half_t{static_cast<uint16_t>(conv::float_to_half_bits<conv::ScalarOps>(f))};
}
inline bfloat16_t float_to_bf16(float f) {
  return bfloat16_t{static_cast<uint16_t>(conv::float_to_bf16_bits<conv::ScalarOps>(f))};
}

// Generic load/store used by the kernels: to_float(T) and from_float<T>(float).
inline float to_float(float x) { return x; }
inline float to_float(half_t x) { return half_to_float(x); }
inline float to_float(bfloat16_t x) { return bf16_to_float(x); }

template <class T> inline T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline half_t from_float<half_t>(float x) { return float_to_half(x); }
template <> inline bfloat16_t from_float<bfloat16_t>(float x) { return float_to_bf16(x); }

// Converts n elements between dtypes: 4-lane vector code for the bulk and the scalar code above
// for the last n % 4 (so a test over every 16-bit pattern checks both). Defined in cast_cpu.cpp;
// exposed to Python as _native._cast_cpu for tests.
void cast_cpu(const void* src, void* dst, int64_t n, DType src_dtype, DType dst_dtype);

}  // namespace kernelrl
