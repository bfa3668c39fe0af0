// nf4_cpu.cpp: the CPU kernels of the NF4 family (format, math and paths in nf4.h).
//
// ISA variants (common/cpu_features.h), picked per call:
//   quantize       W fp32 lanes of GCC vector code: 4 (generic), 8 (target avx2), 16 (avx512).
//   dequantize     a scalar 16-entry table (generic, avx2), vpermps on 16 dwords (avx512).
//   GEMV general   a row decoded as in dequantize, then W-lane FMA dot products (4 / 8 / 16).
//   GEMV fast      avx512 only, on the repacked layout: vpermps decode + float32 FMA, or
//                  vpshufb decode + bfloat16 dot products (vdpbf16ps, AVX512-BF16).
//   double quant   a branchless binary search (generic, avx2), two 16-wide compares (avx512).
// Measured on Zen 4: vpermps and the dword shifts / zero-extensions feeding it share the two
// shuffle pipes (about 4.8 cycles per 32 weights for a single row), while the vpshufb +
// vpunpck decode of 128 bfloat16 weights takes about 8 cycles; vdpbf16ps and the float32 FMA
// both retire one zmm per cycle (32 vs 16 multiply-adds). Hence bfloat16 x takes the vpshufb
// kernel for every M, and float32 / float16 x (whose weights must not be rounded) vpermps.
// Every function that uses AVX-512 intrinsics carries the target attribute itself (GCC does not
// inline a target-specific function into one without it, and lambdas do not inherit it), and the
// OpenMP regions stay in plain code, calling the ISA variants through function pointers on
// contiguous ranges of blocks / rows / tiles (static split: the results do not depend on it).
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/cpu_features.h"
#include "common/dispatch.h"
#include "common/dtype.h"
#include "common/row_loop.h"
#include "common/simd.h"
#include "nf4/nf4.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KERNELRL_NF4_X86 1
// GCC 12's avx512fintrin.h builds _mm512_undefined_*() as `__Y = __Y`, which -Wall reports as
// maybe-uninitialized wherever an intrinsic that uses it is inlined.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace kernelrl {
namespace {

using nf4_detail::bad_arg;
using nf4_detail::check_ptr;

constexpr int kZeroCode = 7;  // the code of 0.0: the pad nibble

// ---- parallel loop ------------------------------------------------------------------------------

// fn(begin, end) on contiguous ranges that split [0, n) over the OpenMP team (one range per
// thread), or once on the calling thread for small work (`work` elements, cf. row_loop.h).
template <class Fn>
void parallel_ranges(int64_t n, int64_t work, const Fn& fn) {
  if (n <= 0) return;
#ifdef _OPENMP
  const int64_t want = (n > 1 && work >= kParallelMinElements) ? cpu_num_threads() : 1;
  const int nt = static_cast<int>(std::min<int64_t>(want, n));
  if (nt > 1) {
#pragma omp parallel num_threads(nt)
    {
      const int64_t tid = omp_get_thread_num(), cnt = omp_get_num_threads();
      const int64_t b = n * tid / cnt, e = n * (tid + 1) / cnt;
      if (b < e) fn(b, e);
    }
    return;
  }
#else
  (void)work;
#endif
  fn(0, n);
}

// ---- block scales -------------------------------------------------------------------------------

struct Scales {
  const void* absmax;          // float32, or uint8 codes with nested_absmax
  const float* nested_absmax;  // null: plain
  const float* nested_code;
  float offset;

  KR_INLINE float operator()(int64_t b) const {
    if (nested_absmax == nullptr) return static_cast<const float*>(absmax)[b];
    const uint8_t q = static_cast<const uint8_t*>(absmax)[b];
    // product rounded, then the add (no FMA): as torch computes it
    return simd::rounded(nested_code[q] * nested_absmax[b >> 8]) + offset;
  }
};

// A weight [N, K] in the standard layout.
struct Weight {
  const uint8_t* data;
  Scales scales;
  const float* code;
  int64_t n_rows, n_cols, blocksize;
};

// ==== quantize ===================================================================================

struct QuantArgs {
  const void* weight;
  uint8_t* data;
  float* absmax;
  float mid[15];  // (code[j] + code[j + 1]) / 2 in float32
  int64_t n, blocksize;
};

KR_INLINE int bucket_scalar(const float* mid, float v) {
  int c = 15;
  for (int j = 0; j < 15; ++j) c -= (mid[j] >= v) ? 1 : 0;  // NaN: no midpoint is >= it: 15
  return c;
}

template <int W>
KR_INLINE simd::I<W> bucket(const simd::F<W>* mids, simd::F<W> v) {
  simd::I<W> c = simd::I<W>{} + 15;
  for (int j = 0; j < 15; ++j) c += (simd::I<W>)(mids[j] >= v);  // -1 where mid_j >= v
  return c;
}

// W codes (int32 lanes, element 2j and 2j + 1 in lanes 2j, 2j + 1) -> W / 2 bytes, the even
// element in the high nibble: per 64-bit lane (little-endian), (lo << 4 | hi >> 32) & 0xff.
template <int W>
struct PackLanes {
  typedef uint64_t Q __attribute__((vector_size(4 * W)));  // W / 2 x 64-bit
  typedef uint8_t B __attribute__((vector_size(W / 2)));   // W / 2 x 8-bit
};

template <int W>
KR_INLINE void pack_codes(simd::I<W> c, uint8_t* out) {
  using Q = typename PackLanes<W>::Q;
  using B = typename PackLanes<W>::B;
  Q q = (Q)c;
  q = ((q << 4) | (q >> 32)) & 0xffu;
  const B bytes = __builtin_convertvector(q, B);
  std::memcpy(out, &bytes, W / 2);
}

template <int W>
KR_INLINE simd::U<W> umax(simd::U<W> a, simd::U<W> b) {
  const simd::U<W> m = (simd::U<W>)(a > b);
  return (a & m) | (b & ~m);
}

KR_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
KR_INLINE float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <int W, class T>
KR_INLINE void quantize_blocks(const QuantArgs& a, int64_t b0, int64_t b1) {
  using F = simd::F<W>;
  using U = simd::U<W>;
  const T* w = static_cast<const T*>(a.weight);
  F mids[15];
  for (int j = 0; j < 15; ++j) mids[j] = simd::splat<W>(a.mid[j]);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t i0 = b * a.blocksize;
    const int64_t len = std::min(a.blocksize, a.n - i0);
    const T* wb = w + i0;
    // absmax: the max of |w| as uint32 bits (non-negative floats order as their bits, and any
    // NaN is above inf, so a NaN in the block gives a NaN absmax)
    U mx = U{};
    int64_t j = 0;
    for (; j + W <= len; j += W) mx = umax<W>(mx, (U)simd::load<W>(wb + j) & 0x7fffffffu);
    uint32_t m = 0;
    for (int k = 0; k < W; ++k) m = std::max(m, static_cast<uint32_t>(mx[k]));
    for (; j < len; ++j) m = std::max(m, float_bits(to_float(wb[j])) & 0x7fffffffu);
    const float am = bits_float(m);
    a.absmax[b] = am;
    const float inv = 1.0f / (am < 1e-38f ? 1e-38f : am);  // torch clamp(min=1e-38): NaN stays
    uint8_t* out = a.data + i0 / 2;
    j = 0;
    for (; j + 2 * W <= len; j += 2 * W) {
      pack_codes<W>(bucket<W>(mids, simd::load<W>(wb + j) * inv), out + j / 2);
      pack_codes<W>(bucket<W>(mids, simd::load<W>(wb + j + W) * inv), out + j / 2 + W / 2);
    }
    for (; j < len; j += 2) {
      const int hi = bucket_scalar(a.mid, to_float(wb[j]) * inv);
      const int lo = j + 1 < len ? bucket_scalar(a.mid, to_float(wb[j + 1]) * inv) : kZeroCode;
      out[j / 2] = static_cast<uint8_t>(hi << 4 | lo);
    }
  }
}

template <class T>
void quantize_generic(const QuantArgs& a, int64_t b0, int64_t b1) {
  quantize_blocks<4, T>(a, b0, b1);
}
#ifdef KERNELRL_NF4_X86
#define KR_T512 "avx512f,avx512bw,avx512vl,avx2,fma"
#define KR_AVX512_FN __attribute__((target(KR_T512)))
#define KR_AVX512BF16_FN __attribute__((target(KR_T512 ",avx512bf16")))
#define KR_AVX512_INLINE inline __attribute__((always_inline, target(KR_T512)))
template <class T>
__attribute__((target("avx2,fma"))) void quantize_avx2(const QuantArgs& a, int64_t b0,
                                                        int64_t b1) {
  quantize_blocks<8, T>(a, b0, b1);
}
template <class T>
KR_AVX512_FN void quantize_avx512(const QuantArgs& a, int64_t b0, int64_t b1) {
  quantize_blocks<16, T>(a, b0, b1);
}
#endif

// ==== decoding runs of the standard layout =======================================================

// lut[c] = code[c] * s: the 16 weights of a block.
KR_INLINE void scaled_table(const float* code, float s, float* lut) {
  for (int c = 0; c < 16; ++c) lut[c] = code[c] * s;
}

// Elements [i, i + len) of one block (all with the table lut) -> out[0, len).
template <class T>
KR_INLINE void decode_run_scalar(const uint8_t* data, int64_t i, int64_t len, const float* lut,
                                 T* out) {
  int64_t j = 0;
  if (len > 0 && (i & 1)) {
    out[0] = from_float<T>(lut[data[i >> 1] & 15]);
    j = 1;
  }
  const uint8_t* p = data + ((i + j) >> 1);
  for (; j + 2 <= len; j += 2, ++p) {
    out[j] = from_float<T>(lut[*p >> 4]);
    out[j + 1] = from_float<T>(lut[*p & 15]);
  }
  if (j < len) out[j] = from_float<T>(lut[*p >> 4]);
}

// Row r of the weight -> out[0, K), block run by block run.
template <class T>
KR_INLINE void decode_row_scalar(const Weight& wt, int64_t r, T* out) {
  const int64_t start = r * wt.n_cols, end = start + wt.n_cols;
  float lut[16];
  for (int64_t i = start; i < end;) {
    const int64_t b = i / wt.blocksize;
    const int64_t e = std::min((b + 1) * wt.blocksize, end);
    scaled_table(wt.code, wt.scales(b), lut);
    decode_run_scalar<T>(wt.data, i, e - i, lut, out + (i - start));
    i = e;
  }
}

#ifdef KERNELRL_NF4_X86
template <class T>
KR_AVX512_INLINE void store16(T* p, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_storeu_ps(p, v);
  } else {
    simd::store<16>(p, (simd::F<16>)v);
  }
}

// The first n (0 < n <= 16) lanes of v.
template <class T>
KR_AVX512_INLINE void store16_partial(T* p, __m512 v, int n) {
  if (n == 16) {
    store16<T>(p, v);
  } else if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
  } else {
    simd::store_partial<16>(p, (simd::F<16>)v, n);
  }
}

alignas(64) constexpr int32_t kInterleaveLo[16] = {0, 16, 1, 17, 2, 18, 3, 19,
                                                   4, 20, 5, 21, 6, 22, 7, 23};
alignas(64) constexpr int32_t kInterleaveHi[16] = {8,  24, 9,  25, 10, 26, 11, 27,
                                                   12, 28, 13, 29, 14, 30, 15, 31};

// decode_run_scalar with 32 elements per step: 16 bytes zero-extended to dwords, the high and
// the low nibbles looked up by vpermps (which reads the low 4 bits of each index), interleaved.
template <class T>
KR_AVX512_INLINE void decode_run_avx512(const uint8_t* data, int64_t i, int64_t len,
                                        const float* lut_mem, __m512 lut, T* out) {
  int64_t j = 0;
  if (len > 0 && (i & 1)) {
    out[0] = from_float<T>(lut_mem[data[i >> 1] & 15]);
    j = 1;
  }
  const __m512i ilo = _mm512_load_si512(kInterleaveLo), ihi = _mm512_load_si512(kInterleaveHi);
  for (; j + 32 <= len; j += 32) {
    const __m512i v = _mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(data + ((i + j) >> 1))));
    const __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
    const __m512 odd = _mm512_permutexvar_ps(v, lut);
    store16<T>(out + j, _mm512_permutex2var_ps(even, ilo, odd));
    store16<T>(out + j + 16, _mm512_permutex2var_ps(even, ihi, odd));
  }
  if (j < len) decode_run_scalar<T>(data, i + j, len - j, lut_mem, out + j);
}

template <class T>
KR_AVX512_INLINE void decode_row_avx512(const Weight& wt, int64_t r, T* out) {
  const int64_t start = r * wt.n_cols, end = start + wt.n_cols;
  const __m512 code = _mm512_loadu_ps(wt.code);
  alignas(64) float lut_mem[16];
  for (int64_t i = start; i < end;) {
    const int64_t b = i / wt.blocksize;
    const int64_t e = std::min((b + 1) * wt.blocksize, end);
    const __m512 lut = _mm512_mul_ps(code, _mm512_set1_ps(wt.scales(b)));
    _mm512_store_ps(lut_mem, lut);
    decode_run_avx512<T>(wt.data, i, e - i, lut_mem, lut, out + (i - start));
    i = e;
  }
}
#endif

// ==== dequantize rows ============================================================================

struct DequantArgs {
  Weight wt;
  void* out;  // [row1 - row0, K]
  int64_t row0;
};

template <class T>
void dequant_generic(const DequantArgs& a, int64_t r0, int64_t r1) {
  T* out = static_cast<T*>(a.out);
  for (int64_t r = r0; r < r1; ++r) decode_row_scalar<T>(a.wt, a.row0 + r, out + r * a.wt.n_cols);
}
#ifdef KERNELRL_NF4_X86
template <class T>
KR_AVX512_FN void dequant_avx512(const DequantArgs& a, int64_t r0, int64_t r1) {
  T* out = static_cast<T*>(a.out);
  for (int64_t r = r0; r < r1; ++r) decode_row_avx512<T>(a.wt, a.row0 + r, out + r * a.wt.n_cols);
}
#endif

// ==== GEMV: general path =========================================================================

struct GemvArgs {
  Weight wt;
  const float* x32;  // [M, K] float32
  void* y;           // [M, N] in T
  int64_t m;
};

// sum_k x[k] w[k], W lanes x 4 accumulators (FMA where the ISA has it), then the lanes.
template <int W>
KR_INLINE float dot(const float* x, const float* w, int64_t n) {
  using F = simd::F<W>;
  F acc0{}, acc1{}, acc2{}, acc3{};
  int64_t k = 0;
  for (; k + 4 * W <= n; k += 4 * W) {
    acc0 += simd::load<W>(x + k) * simd::load<W>(w + k);
    acc1 += simd::load<W>(x + k + W) * simd::load<W>(w + k + W);
    acc2 += simd::load<W>(x + k + 2 * W) * simd::load<W>(w + k + 2 * W);
    acc3 += simd::load<W>(x + k + 3 * W) * simd::load<W>(w + k + 3 * W);
  }
  for (; k + W <= n; k += W) acc0 += simd::load<W>(x + k) * simd::load<W>(w + k);
  float s = simd::hsum<W>((acc0 + acc1) + (acc2 + acc3));
  for (; k < n; ++k) s += x[k] * w[k];
  return s;
}

template <int W, class T>
KR_INLINE void gemv_rows_from(const GemvArgs& a, int64_t r, const float* row) {
  T* y = static_cast<T*>(a.y);
  const int64_t K = a.wt.n_cols, N = a.wt.n_rows;
  for (int64_t i = 0; i < a.m; ++i) y[i * N + r] = from_float<T>(dot<W>(a.x32 + i * K, row, K));
}

template <int W, class T>
KR_INLINE void gemv_general_scalar_decode(const GemvArgs& a, int64_t r0, int64_t r1) {
  std::vector<float> row(static_cast<size_t>(a.wt.n_cols));
  for (int64_t r = r0; r < r1; ++r) {
    decode_row_scalar<float>(a.wt, r, row.data());
    gemv_rows_from<W, T>(a, r, row.data());
  }
}

template <class T>
void gemv_general_generic(const GemvArgs& a, int64_t r0, int64_t r1) {
  gemv_general_scalar_decode<4, T>(a, r0, r1);
}
#ifdef KERNELRL_NF4_X86
template <class T>
__attribute__((target("avx2,fma"))) void gemv_general_avx2(const GemvArgs& a, int64_t r0,
                                                            int64_t r1) {
  gemv_general_scalar_decode<8, T>(a, r0, r1);
}
template <class T>
KR_AVX512_FN void gemv_general_avx512(const GemvArgs& a, int64_t r0, int64_t r1) {
  std::vector<float> row(static_cast<size_t>(a.wt.n_cols));
  for (int64_t r = r0; r < r1; ++r) {
    decode_row_avx512<float>(a.wt, r, row.data());
    gemv_rows_from<16, T>(a, r, row.data());
  }
}
#endif

// ==== repack (the fast path's layout) ============================================================

struct RepackArgs {
  const uint8_t* data;
  const void* absmax;
  uint8_t* out_data;
  void* out_scales;
  int64_t n_rows, n_cols, blocksize;
  bool double_quant;
};

// Tile t, chunk c (columns 8c .. 8c + 7), byte 16 L + i (nf4.h): row 4L + (i % 8) / 2 of the
// tile; the low nibble holds column 8c + 2 (i >= 8) + i % 2, the high nibble that column + 4.
// Row r = 4L + p of the tile has its 8 columns in source bytes b0..b3 (K even: byte-aligned),
// two codes each, the even column in the high nibble; rows past N read as code 7 (0x77).
void repack_tiles(const RepackArgs& a, int64_t t0, int64_t t1) {
  const int64_t K = a.n_cols, KB = K / a.blocksize, chunks = K / 8;
  for (int64_t t = t0; t < t1; ++t) {
    uint8_t* out = a.out_data + t * chunks * 64;
    const int64_t r0 = t * kNf4TileRows;
    for (int j = 0; j < 16; ++j) {
      const int64_t r = r0 + j;
      const uint8_t* src = r < a.n_rows ? a.data + r * (K / 2) : nullptr;
      uint8_t* o = out + 16 * (j / 4) + 2 * (j % 4);
      for (int64_t c = 0; c < chunks; ++c, o += 64) {
        uint8_t b[4] = {0x77, 0x77, 0x77, 0x77};
        if (src != nullptr) std::memcpy(b, src + 4 * c, 4);
        o[0] = static_cast<uint8_t>((b[2] & 0xf0) | (b[0] >> 4));   // columns 4 | 0
        o[1] = static_cast<uint8_t>((b[2] << 4) | (b[0] & 0x0f));   // columns 5 | 1
        o[8] = static_cast<uint8_t>((b[3] & 0xf0) | (b[1] >> 4));   // columns 6 | 2
        o[9] = static_cast<uint8_t>((b[3] << 4) | (b[1] & 0x0f));   // columns 7 | 3
      }
    }
    for (int64_t kb = 0; kb < KB; ++kb) {
      for (int j = 0; j < 16; ++j) {
        const int64_t row = r0 + j, dst = (t * KB + kb) * 16 + j;
        if (a.double_quant) {
          static_cast<uint8_t*>(a.out_scales)[dst] =
              row < a.n_rows ? static_cast<const uint8_t*>(a.absmax)[row * KB + kb] : 0;
        } else {
          static_cast<float*>(a.out_scales)[dst] =
              row < a.n_rows ? static_cast<const float*>(a.absmax)[row * KB + kb] : 0.0f;
        }
      }
    }
  }
}

// ==== GEMV: fast path (AVX-512, repacked layout) =================================================

#ifdef KERNELRL_NF4_X86
struct FastArgs {
  const uint8_t* rdata;         // [T][K/8][64]
  const void* rscales;          // [T][K/B][16] float32 or uint8
  const float* nested_absmax;   // null: plain
  const float* nested_code;
  float offset;
  const float* code;            // [16] float32
  const uint8_t* code_bf16;     // [2][64]: low / high bytes of bfloat16(code), per 16-byte lane
  int64_t n_rows, n_cols, blocksize, kblocks;  // N, K, B, K / B
  int64_t ngroups;                              // ceil(N K/B / 256)
  int64_t m;
  const void* xpack;  // x by chunk: [K/8][4][M] pairs (2 float32, or 2 bfloat16 as a uint32)
  void* y;            // [M, N]
};

alignas(64) constexpr int32_t kIota[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
// Row of lane i of a float32-path accumulator of 16-byte lane L: 4 L + (i % 8) / 2.
alignas(64) constexpr int32_t kRowOfLane[4][16] = {
    {0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 1, 1, 2, 2, 3, 3},
    {4, 4, 5, 5, 6, 6, 7, 7, 4, 4, 5, 5, 6, 6, 7, 7},
    {8, 8, 9, 9, 10, 10, 11, 11, 8, 8, 9, 9, 10, 10, 11, 11},
    {12, 12, 13, 13, 14, 14, 15, 15, 12, 12, 13, 13, 14, 14, 15, 15}};

// The scales of the 16 rows of tile t in block column kb (lane j: row 16t + j). Double-quantized:
// nested_code[q] by 16 scalar loads (on the load ports, cheaper than a gather here), and
// nested_absmax[b / 256] for b = row * K/B + kb by one load of the 16 groups from lane 0's on
// and a vpermps when the tile's rows span fewer than 16 groups (K/B < ~256), else a gather.
KR_AVX512_INLINE __m512 tile_scales_raw(const FastArgs& a, int64_t t, int64_t kb) {
  const int64_t at = (t * a.kblocks + kb) * 16;
  if (a.nested_absmax == nullptr) return _mm512_loadu_ps(static_cast<const float*>(a.rscales) + at);
  const uint8_t* q = static_cast<const uint8_t*>(a.rscales) + at;
  alignas(64) float nc_mem[16];
  for (int j = 0; j < 16; ++j) nc_mem[j] = a.nested_code[q[j]];
  const __m512 nc = _mm512_load_ps(nc_mem);
  // rows past N clamped: their lanes are never stored
  const int64_t last = std::min<int64_t>(t * 16 + 15, a.n_rows - 1);
  const __m512i rows = _mm512_min_epi32(
      _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(t * 16)), _mm512_load_si512(kIota)),
      _mm512_set1_epi32(static_cast<int32_t>(last)));
  const __m512i g = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_mullo_epi32(rows, _mm512_set1_epi32(static_cast<int32_t>(a.kblocks))),
                       _mm512_set1_epi32(static_cast<int32_t>(kb))),
      8);
  const int64_t g0 = (t * 16 * a.kblocks + kb) >> 8, g15 = (last * a.kblocks + kb) >> 8;
  __m512 na;
  if (g15 - g0 < 16) {
    const int64_t avail = std::min<int64_t>(16, a.ngroups - g0);
    const __m512 span = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << avail) - 1),
                                              a.nested_absmax + g0);
    na = _mm512_permutexvar_ps(_mm512_sub_epi32(g, _mm512_set1_epi32(static_cast<int32_t>(g0))),
                               span);
  } else {
    na = _mm512_i32gather_ps(g, a.nested_absmax, 4);
  }
  return _mm512_add_ps(simd::rounded_value(_mm512_mul_ps(nc, na)), _mm512_set1_ps(a.offset));
}

// The tile kernels scale a block's sum: an infinite scale becomes NaN, the value of the exact
// sum whenever the block holds a zero code (0 * inf; a quantized block with an inf always does)
// or products of both signs.
KR_AVX512_INLINE __m512 tile_scales(const FastArgs& a, int64_t t, int64_t kb) {
  const __m512 s = tile_scales_raw(a, t, kb);
  const __mmask16 inf = _mm512_cmp_ps_mask(_mm512_abs_ps(s),
                                           _mm512_set1_ps(__builtin_inff()), _CMP_EQ_OQ);
  return _mm512_mask_mov_ps(s, inf, _mm512_set1_ps(__builtin_nanf("")));
}

KR_AVX512_INLINE __m512 bcast_pair(const float* p) {  // (p[0], p[1]) in every lane pair
  double d;
  std::memcpy(&d, p, 8);
  return _mm512_castpd_ps(_mm512_set1_pd(d));
}

// float32 path, rows m0 .. m0 + MR - 1 of x, tile t -> out[MR][16] (lane j: row 16t + j).
// Per chunk and 16-byte lane L: the 16 bytes zero-extended to dwords, vpermps of the low and of
// the high nibbles: lane i of the first holds (row 4L + (i%8)/2, column 8c + 2 (i >= 8) + i%2),
// of the second that column + 4, so x enters as [pair 0 x4, pair 1 x4] and [pair 2 x4,
// pair 3 x4] (two broadcasts and a blend, shared by the 4 lanes L). Per block: sum_k code[c] x[k]
// in float32, then total = fma(block sum, s_b, total).
template <int MR>
KR_AVX512_INLINE void tile_f32(const FastArgs& a, int64_t t, int64_t m0, float* out) {
  const int64_t K = a.n_cols, M = a.m, per_block = a.blocksize / 8;
  const __m512 code = _mm512_loadu_ps(a.code);
  alignas(64) float tot[4][MR][16];
  std::memset(tot, 0, sizeof tot);
  const uint8_t* d = a.rdata + t * K * 8;
  const float* xq = static_cast<const float*>(a.xpack) + 2 * m0;
  for (int64_t kb = 0; kb < a.kblocks; ++kb) {
    const __m512 s = tile_scales(a, t, kb);  // first: its loads overlap the chunks
    __m512 blk[4][MR];
    for (int l = 0; l < 4; ++l) {
      for (int i = 0; i < MR; ++i) blk[l][i] = _mm512_setzero_ps();
    }
    for (int64_t c = kb * per_block; c < (kb + 1) * per_block; ++c) {
      const float* xc = xq + c * 8 * M;
      __m512 xlo[MR], xhi[MR];
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        xlo[i] = _mm512_mask_blend_ps(0xff00, bcast_pair(xc + 2 * i),
                                      bcast_pair(xc + 2 * (M + i)));
        xhi[i] = _mm512_mask_blend_ps(0xff00, bcast_pair(xc + 2 * (2 * M + i)),
                                      bcast_pair(xc + 2 * (3 * M + i)));
      }
#pragma GCC unroll 4
      for (int l = 0; l < 4; ++l) {
        const __m512i v = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(d + c * 64 + 16 * l)));
        const __m512 clo = _mm512_permutexvar_ps(v, code);
        const __m512 chi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), code);
#pragma GCC unroll 4
        for (int i = 0; i < MR; ++i) {
          blk[l][i] = _mm512_fmadd_ps(clo, xlo[i], blk[l][i]);
          blk[l][i] = _mm512_fmadd_ps(chi, xhi[i], blk[l][i]);
        }
      }
    }
#pragma GCC unroll 4
    for (int l = 0; l < 4; ++l) {
      const __m512 sl = _mm512_permutexvar_ps(_mm512_load_si512(kRowOfLane[l]), s);
      for (int i = 0; i < MR; ++i) {
        _mm512_store_ps(tot[l][i], _mm512_fmadd_ps(blk[l][i], sl, _mm512_load_ps(tot[l][i])));
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int l = 0; l < 4; ++l) {
      const float* v = tot[l][i];
      for (int r = 0; r < 4; ++r) {
        out[i * 16 + 4 * l + r] = (v[2 * r] + v[2 * r + 1]) + (v[8 + 2 * r] + v[9 + 2 * r]);
      }
    }
  }
}

template <class T>
KR_AVX512_INLINE void store_tile(const FastArgs& a, int64_t t, const float* out) {
  T* y = static_cast<T*>(a.y);
  const int n = static_cast<int>(std::min<int64_t>(16, a.n_rows - t * 16));
  for (int64_t i = 0; i < a.m; ++i) {
    store16_partial<T>(y + i * a.n_rows + t * 16, _mm512_loadu_ps(out + i * 16), n);
  }
}

// Rows of x per pass of the float32 path (its registers: 4 MR block sums, 2 MR x vectors).
constexpr int kF32PassRows = 4;
// Chunks (of 8 columns) the float32 path with M > kF32PassRows decodes at once into a buffer.
constexpr int kF32SubChunks = 8;

// One pass of rows m0 .. m0 + MR - 1 of x over n chunks decoded in `w` ([chunk][lane L][2]),
// from chunk c0 on: tot[L][m0 + i] += s_L * (block sum).
template <int MR>
KR_AVX512_INLINE void f32_pass(const FastArgs& a, const __m512 (*w)[4][2], int n, int64_t c0,
                               int64_t m0, const __m512* sl, float (*tot)[kNf4MaxRows][16]) {
  const int64_t M = a.m;
  const float* xq = static_cast<const float*>(a.xpack) + 2 * m0;
  __m512 blk[4][MR];
  for (int l = 0; l < 4; ++l) {
    for (int i = 0; i < MR; ++i) blk[l][i] = _mm512_setzero_ps();
  }
  for (int cl = 0; cl < n; ++cl) {
    const float* xc = xq + (c0 + cl) * 8 * M;
    __m512 xlo[MR], xhi[MR];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      xlo[i] = _mm512_mask_blend_ps(0xff00, bcast_pair(xc + 2 * i), bcast_pair(xc + 2 * (M + i)));
      xhi[i] = _mm512_mask_blend_ps(0xff00, bcast_pair(xc + 2 * (2 * M + i)),
                                    bcast_pair(xc + 2 * (3 * M + i)));
    }
#pragma GCC unroll 4
    for (int l = 0; l < 4; ++l) {
      const __m512 clo = w[cl][l][0], chi = w[cl][l][1];
#pragma GCC unroll 4
      for (int i = 0; i < MR; ++i) {
        blk[l][i] = _mm512_fmadd_ps(clo, xlo[i], blk[l][i]);
        blk[l][i] = _mm512_fmadd_ps(chi, xhi[i], blk[l][i]);
      }
    }
  }
#pragma GCC unroll 4
  for (int l = 0; l < 4; ++l) {
    for (int i = 0; i < MR; ++i) {
      float* tp = tot[l][m0 + i];
      _mm512_store_ps(tp, _mm512_fmadd_ps(blk[l][i], sl[l], _mm512_load_ps(tp)));
    }
  }
}

// float32 path for M > kF32PassRows: the chunks of a block, kF32SubChunks at a time, are
// decoded once into a 4 KB buffer (the codes' values, lanes as in tile_f32) that passes of up to
// 4 rows of x then read; each pass scales its block sums into the totals (a block wider than
// the buffer is scaled piece by piece).
template <int M>
KR_AVX512_INLINE void tile_f32_multi(const FastArgs& a, int64_t t, float* out) {
  const int64_t K = a.n_cols, per_block = a.blocksize / 8;
  const int sub = static_cast<int>(std::min<int64_t>(per_block, kF32SubChunks));
  const __m512 code = _mm512_loadu_ps(a.code);
  alignas(64) float tot[4][kNf4MaxRows][16];
  std::memset(tot, 0, sizeof tot);
  alignas(64) __m512 w[kF32SubChunks][4][2];
  const uint8_t* d = a.rdata + t * K * 8;
  for (int64_t kb = 0; kb < a.kblocks; ++kb) {
    const __m512 s = tile_scales(a, t, kb);
    __m512 sl[4];
    for (int l = 0; l < 4; ++l) sl[l] = _mm512_permutexvar_ps(_mm512_load_si512(kRowOfLane[l]), s);
    for (int64_t c0 = kb * per_block; c0 < (kb + 1) * per_block; c0 += sub) {
      for (int cl = 0; cl < sub; ++cl) {
#pragma GCC unroll 4
        for (int l = 0; l < 4; ++l) {
          const __m512i v = _mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(d + (c0 + cl) * 64 + 16 * l)));
          w[cl][l][0] = _mm512_permutexvar_ps(v, code);
          w[cl][l][1] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), code);
        }
      }
      f32_pass<kF32PassRows>(a, w, sub, c0, 0, sl, tot);
      if constexpr (M > 4) f32_pass<(M - 4 < 4 ? M - 4 : 4)>(a, w, sub, c0, 4, sl, tot);
      if constexpr (M > 8) f32_pass<(M - 8 < 4 ? M - 8 : 4)>(a, w, sub, c0, 8, sl, tot);
      if constexpr (M > 12) f32_pass<M - 12>(a, w, sub, c0, 12, sl, tot);
    }
  }
  for (int i = 0; i < M; ++i) {
    for (int l = 0; l < 4; ++l) {
      const float* v = tot[l][i];
      for (int r = 0; r < 4; ++r) {
        out[i * 16 + 4 * l + r] = (v[2 * r] + v[2 * r + 1]) + (v[8 + 2 * r] + v[9 + 2 * r]);
      }
    }
  }
}

template <class T, int M>
KR_AVX512_FN void fast_f32(const FastArgs& a, int64_t t0, int64_t t1) {
  alignas(64) float out[kNf4MaxRows * 16];
  for (int64_t t = t0; t < t1; ++t) {
    if constexpr (M <= kF32PassRows) {
      tile_f32<M>(a, t, 0, out);
    } else {
      tile_f32_multi<M>(a, t, out);
    }
    store_tile<T>(a, t, out);
  }
}

// bfloat16 path: all M rows of x, tile t. Per chunk, 64 bytes: the low and the high nibbles
// (bytes of 0..15) look up the low and the high bytes of bfloat16(code) with vpshufb (a 16-entry
// byte table per 16-byte lane), and vpunpck{l,h}bw interleaves them into 4 vectors of 32
// bfloat16: vector s holds, in dword lane j, row j's weights at columns 8c + 2s and 8c + 2s + 1
// (s = 0, 1 from the low nibbles of bytes 0..7 / 8..15 of each 16-byte lane, s = 2, 3 from the
// high ones). One vdpbf16ps per (s, row of x) with the broadcast pair (x[8c + 2s], x[8c + 2s + 1])
// adds into a float32 accumulator whose lane j is row j. Per block: total = fma(block sum, s_b,
// total). The codes are rounded to bfloat16 (the scale multiplies the float32 block sums).
template <int M>
KR_AVX512BF16_FN void fast_bf16(const FastArgs& a, int64_t t0, int64_t t1) {
  constexpr int A = M == 1 ? 4 : (M <= 3 ? 2 : 1);  // accumulator sets: >= 4 independent chains
  const int64_t K = a.n_cols, per_block = a.blocksize / 8;
  const __m512i tl = _mm512_loadu_si512(a.code_bf16), th = _mm512_loadu_si512(a.code_bf16 + 64);
  const __m512i nib = _mm512_set1_epi8(15);
  const uint32_t* xq = static_cast<const uint32_t*>(a.xpack);
  alignas(64) float out[kNf4MaxRows * 16];
  for (int64_t t = t0; t < t1; ++t) {
    alignas(64) float tot[M][16];
    std::memset(tot, 0, sizeof tot);
    const uint8_t* d = a.rdata + t * K * 8;
    for (int64_t kb = 0; kb < a.kblocks; ++kb) {
      const __m512 sc = tile_scales(a, t, kb);  // first: its loads overlap the chunks
      __m512 acc[A][M];
      for (int u = 0; u < A; ++u) {
        for (int i = 0; i < M; ++i) acc[u][i] = _mm512_setzero_ps();
      }
      for (int64_t c = kb * per_block; c < (kb + 1) * per_block; ++c) {
        const __m512i v = _mm512_loadu_si512(d + c * 64);
        const __m512i lo = _mm512_and_si512(v, nib);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
        const __m512i lo_l = _mm512_shuffle_epi8(tl, lo), lo_h = _mm512_shuffle_epi8(th, lo);
        const __m512i hi_l = _mm512_shuffle_epi8(tl, hi), hi_h = _mm512_shuffle_epi8(th, hi);
        const __m512i w[4] = {_mm512_unpacklo_epi8(lo_l, lo_h), _mm512_unpackhi_epi8(lo_l, lo_h),
                              _mm512_unpacklo_epi8(hi_l, hi_h), _mm512_unpackhi_epi8(hi_l, hi_h)};
        const uint32_t* xc = xq + c * 4 * M;
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) {
#pragma GCC unroll 16
          for (int i = 0; i < M; ++i) {
            acc[s % A][i] = _mm512_dpbf16_ps(
                acc[s % A][i], (__m512bh)w[s],
                (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(xc[s * M + i])));
          }
        }
      }
      for (int i = 0; i < M; ++i) {
        __m512 b = acc[0][i];
        for (int u = 1; u < A; ++u) b = _mm512_add_ps(b, acc[u][i]);
        _mm512_store_ps(tot[i], _mm512_fmadd_ps(b, sc, _mm512_load_ps(tot[i])));
      }
    }
    std::memcpy(out, tot, sizeof tot);
    store_tile<bfloat16_t>(a, t, out);
  }
}

using FastFn = void (*)(const FastArgs&, int64_t, int64_t);

template <class T, std::size_t... I>
constexpr std::array<FastFn, sizeof...(I)> f32_table(std::index_sequence<I...>) {
  return {&fast_f32<T, static_cast<int>(I) + 1>...};
}
template <std::size_t... I>
constexpr std::array<FastFn, sizeof...(I)> bf16_table(std::index_sequence<I...>) {
  return {&fast_bf16<static_cast<int>(I) + 1>...};
}

// x [M, K] -> by chunk: out[(c * 4 + s) * M + i] = the pair (x[i][8c + 2s], x[i][8c + 2s + 1]),
// as 2 float32 (F = float) or 2 bfloat16 (F = uint32_t, x bfloat16). With M = 1 this is x itself.
template <class T>
void pack_x_f32(const T* x, float* out, int64_t m, int64_t k) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t col = 0; col < k; ++col) {
      const int64_t c = col / 8, s = (col % 8) / 2;
      out[((c * 4 + s) * m + i) * 2 + col % 2] = to_float(x[i * k + col]);
    }
  }
}
void pack_x_bf16(const void* x, uint32_t* out, int64_t m, int64_t k) {  // k / 2 pairs a row
  const int64_t pairs = k / 2;
  const char* src = static_cast<const char*>(x);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t p = 0; p < pairs; ++p) std::memcpy(&out[p * m + i], src + 4 * (i * pairs + p), 4);
  }
}
#endif  // KERNELRL_NF4_X86

// ==== double quantization ========================================================================

constexpr int64_t kNestedGroup = 256;

struct DoubleQuantArgs {
  const float* absmax;
  uint8_t* codes;
  float* nested_absmax;
  alignas(64) float mid[272];  // the 255 midpoints of the table, then +inf
  int64_t nblocks;
  float offset;
};

// Group g: v = absmax - offset, its max |v| (bits: NaN above inf) and 1 / max(that, 1e-38).
KR_INLINE float nested_group(const DoubleQuantArgs& a, int64_t g, float* v, int64_t* len) {
  const int64_t b0 = g * kNestedGroup;
  *len = std::min(kNestedGroup, a.nblocks - b0);
  uint32_t mx = 0;
  for (int64_t i = 0; i < *len; ++i) {
    v[i] = a.absmax[b0 + i] - a.offset;
    mx = std::max(mx, float_bits(v[i]) & 0x7fffffffu);
  }
  const float am = bits_float(mx);
  a.nested_absmax[g] = am;
  return 1.0f / (am < 1e-38f ? 1e-38f : am);
}

// The number of midpoints with !(mid >= x) (all 255 for NaN): branchless binary search.
void double_quant_generic(const DoubleQuantArgs& a, int64_t g0, int64_t g1) {
  float v[kNestedGroup];
  for (int64_t g = g0; g < g1; ++g) {
    int64_t len;
    const float inv = nested_group(a, g, v, &len);
    for (int64_t i = 0; i < len; ++i) {
      const float x = v[i] * inv;
      int idx = 0;
      for (int step = 128; step >= 1; step >>= 1) idx += !(a.mid[idx + step - 1] >= x) ? step : 0;
      a.codes[g * kNestedGroup + i] = static_cast<uint8_t>(idx);
    }
  }
}

#ifdef KERNELRL_NF4_X86
// The same count in two compares of 16: against mid[16k + 15] (k = 0..15; the last is +inf)
// for the 16-group c, then against mid[16c .. 16c + 15]; NaN counts 16 + 16, clamped to 255.
KR_AVX512_FN void double_quant_avx512(const DoubleQuantArgs& a, int64_t g0, int64_t g1) {
  alignas(64) float pivots[16];
  for (int k = 0; k < 16; ++k) pivots[k] = a.mid[16 * k + 15];
  const __m512 piv = _mm512_load_ps(pivots);
  float v[kNestedGroup];
  for (int64_t g = g0; g < g1; ++g) {
    int64_t len;
    const float inv = nested_group(a, g, v, &len);
    for (int64_t i = 0; i < len; ++i) {
      const __m512 x = _mm512_set1_ps(v[i] * inv);
      const int c = __builtin_popcount(_mm512_cmp_ps_mask(piv, x, _CMP_NGE_UQ));
      const int base = std::min(c, 15) * 16;
      const int f = __builtin_popcount(
          _mm512_cmp_ps_mask(_mm512_load_ps(a.mid + base), x, _CMP_NGE_UQ));
      a.codes[g * kNestedGroup + i] = static_cast<uint8_t>(std::min(16 * c + f, 255));
    }
  }
}
#endif

}  // namespace

// ==== entry points ===============================================================================

void nf4_quantize_cpu(const void* weight, uint8_t* data, float* absmax, const float* code,
                      int64_t n, int64_t blocksize, DType dtype) {
  const char* fn = "nf4_quantize_cpu";
  if (n < 0) bad_arg(fn, "n", ">= 0", std::to_string(n));
  nf4_detail::check_blocksize(fn, blocksize);
  if (n == 0) return;
  check_ptr(fn, "weight", weight);
  check_ptr(fn, "data", data);
  check_ptr(fn, "absmax", absmax);
  check_ptr(fn, "code", code);
  QuantArgs a{weight, data, absmax, {}, n, blocksize};
  for (int j = 0; j < 15; ++j) {
    if (!(code[j] <= code[j + 1])) {
      bad_arg(fn, "code", "an ascending table", "code[" + std::to_string(j) + "] = " +
              std::to_string(code[j]) + " > code[" + std::to_string(j + 1) + "] = " +
              std::to_string(code[j + 1]));
    }
    a.mid[j] = (code[j] + code[j + 1]) / 2.0f;
  }
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const CpuIsa level = cpu_isa_level();
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto f = &quantize_generic<T>;
#ifdef KERNELRL_NF4_X86
    if (level == CpuIsa::kAvx512) f = &quantize_avx512<T>;
    if (level == CpuIsa::kAvx2) f = &quantize_avx2<T>;
#endif
    parallel_ranges(nblocks, n, [&](int64_t b0, int64_t b1) { f(a, b0, b1); });
  });
  (void)level;
}

void nf4_double_quantize_cpu(const float* absmax, uint8_t* codes, float* nested_absmax,
                             const float* table, int64_t nblocks, float offset) {
  const char* fn = "nf4_double_quantize_cpu";
  if (nblocks < 0) bad_arg(fn, "nblocks", ">= 0", std::to_string(nblocks));
  if (nblocks == 0) return;
  check_ptr(fn, "absmax", absmax);
  check_ptr(fn, "codes", codes);
  check_ptr(fn, "nested_absmax", nested_absmax);
  check_ptr(fn, "table", table);
  DoubleQuantArgs a{absmax, codes, nested_absmax, {}, nblocks, offset};
  for (int j = 0; j < 255; ++j) {
    if (!(table[j] <= table[j + 1])) {
      bad_arg(fn, "table", "an ascending table", "table[" + std::to_string(j) + "] = " +
              std::to_string(table[j]) + " > table[" + std::to_string(j + 1) + "] = " +
              std::to_string(table[j + 1]));
    }
    a.mid[j] = (table[j] + table[j + 1]) / 2.0f;
  }
  for (int j = 255; j < 272; ++j) a.mid[j] = __builtin_inff();  // never below a value
  const int64_t groups = (nblocks + kNestedGroup - 1) / kNestedGroup;
  auto f = &double_quant_generic;
#ifdef KERNELRL_NF4_X86
  if (cpu_isa_level() == CpuIsa::kAvx512) f = &double_quant_avx512;
#endif
  parallel_ranges(groups, nblocks * 16, [&](int64_t g0, int64_t g1) { f(a, g0, g1); });
}

void nf4_repack_cpu(const uint8_t* data, const void* absmax, uint8_t* out_data, void* out_scales,
                    int64_t n_rows, int64_t n_cols, int64_t blocksize, bool double_quant) {
  const char* fn = "nf4_repack_cpu";
  nf4_detail::check_shape(fn, n_rows, n_cols, blocksize);
  if (n_cols % blocksize != 0) {
    bad_arg(fn, "n_cols", "a multiple of blocksize (" + std::to_string(blocksize) + ")",
            std::to_string(n_cols));
  }
  if (n_rows == 0) return;
  check_ptr(fn, "data", data);
  check_ptr(fn, "absmax", absmax);
  check_ptr(fn, "out_data", out_data);
  check_ptr(fn, "out_scales", out_scales);
  const RepackArgs a{data, absmax, out_data, out_scales, n_rows, n_cols, blocksize, double_quant};
  const int64_t tiles = (n_rows + kNf4TileRows - 1) / kNf4TileRows;
  parallel_ranges(tiles, n_rows * n_cols,
                  [&](int64_t t0, int64_t t1) { repack_tiles(a, t0, t1); });
}

void nf4_dequantize_rows_cpu(const uint8_t* data, const void* absmax, const float* nested_absmax,
                             const float* nested_code, float offset, const float* code, void* out,
                             int64_t n_rows, int64_t n_cols, int64_t blocksize, int64_t row0,
                             int64_t row1, DType out_dtype) {
  const char* fn = "nf4_dequantize_rows_cpu";
  nf4_detail::check_shape(fn, n_rows, n_cols, blocksize);
  if (row0 < 0 || row0 > n_rows) {
    bad_arg(fn, "row0", "0 <= row0 <= n_rows (" + std::to_string(n_rows) + ")",
            std::to_string(row0));
  }
  if (row1 < row0 || row1 > n_rows) {
    bad_arg(fn, "row1", "row0 (" + std::to_string(row0) + ") <= row1 <= n_rows (" +
            std::to_string(n_rows) + ")", std::to_string(row1));
  }
  if (row1 == row0) return;
  check_ptr(fn, "data", data);
  nf4_detail::check_scales(fn, absmax, nested_absmax, nested_code, code);
  check_ptr(fn, "out", out);
  const DequantArgs a{{data, {absmax, nested_absmax, nested_code, offset}, code, n_rows, n_cols,
                       blocksize},
                      out, row0};
  const CpuIsa level = cpu_isa_level();
  dispatch_dtype(out_dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto f = &dequant_generic<T>;
#ifdef KERNELRL_NF4_X86
    if (level == CpuIsa::kAvx512) f = &dequant_avx512<T>;
#endif
    parallel_ranges(row1 - row0, (row1 - row0) * n_cols,
                    [&](int64_t r0, int64_t r1) { f(a, r0, r1); });
  });
  (void)level;
}

void nf4_gemv_cpu(const void* x, void* y, const uint8_t* data, const void* absmax,
                  const float* nested_absmax, const float* nested_code, float offset,
                  const float* code, const uint8_t* repacked_data, const void* repacked_scales,
                  int64_t m, int64_t n_rows, int64_t n_cols, int64_t blocksize, DType dtype) {
  const char* fn = "nf4_gemv_cpu";
  nf4_detail::check_gemv_args(fn, x, y, data, absmax, nested_absmax, nested_code, code, m,
                              n_rows, n_cols, blocksize);
  if ((repacked_data == nullptr) != (repacked_scales == nullptr)) {
    bad_arg(fn, repacked_data == nullptr ? "repacked_data" : "repacked_scales",
            "both repacked_data and repacked_scales, or neither", "only one");
  }
  if (m == 0 || n_rows == 0) return;
  const int64_t K = n_cols, N = n_rows;
  const CpuIsa level = cpu_isa_level();
  const bool fast = repacked_data != nullptr && level == CpuIsa::kAvx512 && K % blocksize == 0;
  const bool bf16_dot = fast && dtype == DType::kBFloat16 && m >= kNf4Bf16MinRows &&
                        cpu_has_avx512_bf16();
  (void)bf16_dot;  // (no fast path off x86)
#ifdef KERNELRL_NF4_X86
  if (fast) {
    // x by chunk (a copy of M K elements; M = 1 with float32 / bfloat16 x is already in order)
    thread_local std::vector<uint32_t> x_buffer;
    const void* xpack = x;
    if (bf16_dot) {
      if (m > 1 || (reinterpret_cast<uintptr_t>(x) & 3) != 0) {  // pairs read as uint32
        x_buffer.resize(static_cast<size_t>(m * K / 2));
        pack_x_bf16(x, x_buffer.data(), m, K);
        xpack = x_buffer.data();
      }
    } else if (m > 1 || dtype != DType::kFloat32) {
      x_buffer.resize(static_cast<size_t>(m * K));
      float* xf = reinterpret_cast<float*>(x_buffer.data());
      dispatch_dtype(dtype, [&](auto tag) {
        pack_x_f32(static_cast<const typename decltype(tag)::type*>(x), xf, m, K);
      });
      xpack = xf;
    }
    // bfloat16(code) (round to nearest even) as vpshufb tables: low bytes, then high bytes
    alignas(64) uint8_t code_bf16[128];
    for (int c = 0; c < 16; ++c) {
      const uint16_t b = float_to_bf16(code[c]).bits;
      for (int lane = 0; lane < 4; ++lane) {
        code_bf16[lane * 16 + c] = static_cast<uint8_t>(b & 0xff);
        code_bf16[64 + lane * 16 + c] = static_cast<uint8_t>(b >> 8);
      }
    }
    const FastArgs a{repacked_data, repacked_scales, nested_absmax, nested_code, offset, code,
                     code_bf16, N, K, blocksize, K / blocksize,
                     (N * (K / blocksize) + 255) / 256, m, xpack, y};
    FastFn f = nullptr;
    if (bf16_dot) {
      static constexpr auto kBf16 = bf16_table(std::make_index_sequence<kNf4MaxRows>{});
      f = kBf16[m - 1];
    } else {
      dispatch_dtype(dtype, [&](auto tag) {
        using T = typename decltype(tag)::type;
        static constexpr auto kF32 = f32_table<T>(std::make_index_sequence<kNf4MaxRows>{});
        f = kF32[m - 1];
      });
    }
    const int64_t tiles = (N + kNf4TileRows - 1) / kNf4TileRows;
    parallel_ranges(tiles, N * K, [&](int64_t t0, int64_t t1) { f(a, t0, t1); });
    return;
  }
#endif
  // x as float32 for the general path, converted once per call
  thread_local std::vector<float> x_f32;
  const float* x32 = static_cast<const float*>(x);
  if (dtype != DType::kFloat32) {
    x_f32.resize(static_cast<size_t>(m * K));
    cast_cpu(x, x_f32.data(), m * K, dtype, DType::kFloat32);
    x32 = x_f32.data();
  }
  const GemvArgs a{{data, {absmax, nested_absmax, nested_code, offset}, code, N, K, blocksize},
                   x32, y, m};
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto f = &gemv_general_generic<T>;
#ifdef KERNELRL_NF4_X86
    if (level == CpuIsa::kAvx512) f = &gemv_general_avx512<T>;
    if (level == CpuIsa::kAvx2) f = &gemv_general_avx2<T>;
#endif
    parallel_ranges(N, N * K, [&](int64_t r0, int64_t r1) { f(a, r0, r1); });
  });
}

}  // namespace kernelrl
