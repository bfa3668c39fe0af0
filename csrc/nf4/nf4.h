// nf4.h: 4-bit NF4 weights (bitsandbytes' format): quantize, dequantize rows, decode GEMV.
//
// Shape legend: W is [N, K] row-major (N = n_rows output features, K = n_cols input features),
// flattened to n = N*K elements; M rows of x (the decode step: 1..16); B = blocksize.
//
// ---- the format (bit-compatible with bitsandbytes) ----------------------------------------------
//   data    uint8 [ceil(n/2)]: element i is in byte i/2, the HIGH nibble when i is even, the low
//           nibble when i is odd (a trailing odd element leaves low nibble 7, the code of 0.0).
//           With K odd a row starts mid-byte.
//   code    float32 [16], the NF4 table (ascending, code[7] = 0.0).
//   blocks  B consecutive elements of the flattened weight (B a power of two in [32, 4096]);
//           block b = i / B; the last block may be partial. Its scale s_b is either
//     plain:  absmax float32 [nblocks], s_b = absmax[b]
//     double-quantized (nested_absmax != null): absmax uint8 [nblocks] (codes into nested_code),
//             nested_absmax float32 [ceil(nblocks/256)], nested_code float32 [256], offset:
//             s_b = nested_code[absmax[b]] * nested_absmax[b / 256] + offset, in float32: the
//             product is rounded before the add (never fused into an FMA), as torch computes it.
//   w_i = code[c_i] * s_{b(i)} in float32 (rounded to the output dtype only where it is stored).
//
// ---- quantize (CPU) -----------------------------------------------------------------------------
// Per block: absmax = max |w| in float32 (16-bit inputs upcast exactly; a NaN anywhere in the
// block makes absmax NaN); inv = 1.0f / max(absmax, 1e-38f); scaled = w * inv (float32); the code
// index is the number of midpoints mid_j = (code[j] + code[j+1]) / 2 (float32) with
// !(mid_j >= scaled), i.e. torch.bucketize(clamp(scaled, -1, 1), mid, right=False): a value
// exactly on a midpoint goes to the LOWER code and NaN goes to index 15 (so a block holding a
// NaN is all 15s with a NaN absmax; a block holding +-inf has absmax inf, its finite values
// become code 7 and its infinities 15, as inf * 0 = NaN). The clamp changes no index and is not
// computed. An all-zero block has absmax 0 and codes 7. This is kernelrl.ops.nf4.format's
// quantize_reference bit for bit; it equals bitsandbytes' quantize_4bit on every full block
// (in a trailing partial block bitsandbytes divides by max(absmax, 1e-38) instead of
// multiplying by its reciprocal, and stores the clamped value: an all-zero trailing block gets
// absmax 1e-38 there, and a code can differ where the two roundings do).
// Blocks run in parallel (OpenMP); W fp32 lanes per step (4 generic, 8 AVX2, 16 AVX-512).
// Bytes: n elements read, n/2 + 4 n/B written.
//
// ---- dequantize rows (CPU) ------------------------------------------------------------------
// out [row1 - row0, K] in out_dtype = rows [row0, row1) of W: w_i in float32 rounded once
// (round to nearest even). Any K (rows that start mid-byte or mid-block included). Rows in
// parallel. AVX-512: a 16-entry vpermps table per block run; else a scalar 16-entry table.
//
// ---- decode GEMV (CPU and CUDA) -------------------------------------------------------------
// y [M, N] = x [M, K] . W^T, x and y contiguous in dtype, fp32 accumulation, y rounded once.
// Scales are decoded inside the kernels (no float32 absmax array is built per call).
//
// CPU, two paths (picked per call):
//   fast (AVX-512 level, K % B == 0, the repacked layout given). The repacked layout
//     (nf4_repack_cpu, made once from the standard one; the caller caches it): tiles of 16 rows
//     (rows past N hold code 7), each a run of K/8 chunks of 64 bytes. Chunk c of a tile holds
//     columns 8c .. 8c + 7 of its 16 rows; its byte 16 L + i (L = 0..3, i = 0..15) is row
//     4L + (i % 8) / 2 of the tile, the low nibble column 8c + 2 (i >= 8) + i % 2, the high
//     nibble that column + 4. Scales: [tile][K/B][16] in row order (plain: float32, double-
//     quantized: the uint8 codes; rows past N: 0). Per tile and block the 16 scales are decoded
//     once (double-quantized: nested_code[q] by scalar loads, nested_absmax[b / 256] by one
//     load and a vpermps, or a gather when a tile's rows span 16 groups or more); an infinite
//     scale is taken as NaN (the exact block sum is NaN whenever the block holds a zero code,
//     which a quantized block with an inf always does). Tiles run in parallel; a thread walks
//     its tiles' bytes sequentially. Two kernels, both summing each block in float32 and then
//     adding s_b * (block sum) into float32 totals:
//       bfloat16 path (x bfloat16 and AVX512-BF16; every M): per chunk, the 128 nibbles look up
//         the low and the high bytes of bfloat16(code) with vpshufb (16-entry tables) and
//         vpunpck{l,h}bw interleaves them into 4 x 32 bfloat16 weights: vector s holds, in
//         dword lane j, row j's weights at columns 8c + 2s, 8c + 2s + 1; one vdpbf16ps per
//         (s, row of x) with the broadcast pair (x[8c + 2s], x[8c + 2s + 1]) accumulates lane
//         j = row j. The decode is shared by all M rows. Numerics: the 16 codes are rounded to
//         bfloat16 (relative error < 2^-9, the size of torch's own rounding of W to bfloat16,
//         but fixed per code instead of per weight); the products are exact and summed in
//         float32 (vdpbf16ps treats denormal inputs as 0 and flushes denormal results); y is
//         within the float64 reference's error bound of eager F.linear(x, W_bf16) (the tests
//         measure it at about 0.9x eager's error).
//       float32 path (x float32 or float16, or bfloat16 without AVX512-BF16): per chunk and
//         16-byte lane L, vpmovzxbd + vpermps of the low and the high nibbles give the exact
//         float32 codes (lane i: row 4L + (i % 8) / 2, column 8c + 2 (i >= 8) + i % 2, + 4 for
//         the high nibbles), FMA'd with x as [pair 0 x4, pair 1 x4] / [pair 2 x4, pair 3 x4]
//         (broadcasts and a blend). M <= 4 rows of x in one pass; more: the chunks are decoded
//         once into a 4 KB buffer that passes of 4 rows read. No weight is rounded.
//   general (any K; any ISA; or no repack): a row of W is decoded to a float32 buffer (as in
//     dequantize rows), then M dot products with x (as float32), W lanes of FMA.
// CUDA (nf4.cu), the twin of the CPU paths (reading the standard layout, no repack):
//   fast (K % B == 0, 16-byte aligned data): a warp per 2 rows of W, the M rows of x staged in
//     shared memory as float32 a chunk of 1024 columns at a time (swizzled so that the float4
//     reads are conflict-free); a lane reads 16 bytes (32 codes) of a row with one 128-bit load
//     (the CPU's chunk load), looks them up in a 16-entry table in shared memory (the CPU's
//     vpermps / vpshufb table), scales them by the block scale it decodes in the kernel (the
//     CPU's per-block scale decode) and FMAs them into M float32 accumulators (the CPU's
//     float32 path, for every dtype: no weight is rounded on CUDA); warp shuffles sum lanes.
//   general (any K): a warp per row, a lane per column (stride 32), scalar decode.
//
// Arguments: pointers, then sizes, then meta. Pointers for CUDA are device pointers; stream is
// a cudaStream_t. Invalid arguments throw std::invalid_argument naming the argument; CUDA errors
// throw std::runtime_error.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/dtype.h"

namespace kernelrl {

// Rows of x from which the CPU fast path uses bfloat16 dot products for bfloat16 x (all: the
// vpshufb decode is also the faster one for a single row).
inline constexpr int64_t kNf4Bf16MinRows = 1;
// Most rows of x the GEMV takes.
inline constexpr int64_t kNf4MaxRows = 16;
// Rows of W in a tile of the repacked layout.
inline constexpr int64_t kNf4TileRows = 16;

void nf4_quantize_cpu(
    const void* weight,   // [n] in dtype
    uint8_t* data,        // [ceil(n/2)] out
    float* absmax,        // [ceil(n/blocksize)] out
    const float* code,    // [16] NF4 table
    int64_t n, int64_t blocksize, DType dtype);

// Double quantization of float32 absmax [nblocks] (the "nested" 8-bit codes of bitsandbytes'
// compress_statistics): per group g of 256 values v = absmax - offset (float32; offset is
// given, the caller's float32 mean), nested_absmax[g] = max |v| (NaN if any v is NaN), and
// codes[b] = the index of the nearest of the 256 ascending values of `table` to
// v * (1 / max(nested_absmax[g], 1e-38)), by the same rule as the NF4 codes: the number of
// midpoints (table[j] + table[j + 1]) / 2 with !(mid >= scaled), ties to the lower value, NaN
// to 255. Bit for bit kernelrl.ops.nf4.format.double_quantize given its offset. Groups in
// parallel; the count by a branchless binary search (generic) or two 16-wide compares
// (AVX-512: against every 16th midpoint, then the 16 of that stretch).
void nf4_double_quantize_cpu(
    const float* absmax, uint8_t* codes, float* nested_absmax, const float* table,
    int64_t nblocks, float offset);

// The fast path's layout (see above) from the standard one; needs n_cols % blocksize == 0.
// out_data: ceil(N/16) * 8 * K bytes; out_scales: ceil(N/16) * 16 * (K / blocksize) elements of
// float32 (plain) or uint8 (double_quant).
void nf4_repack_cpu(
    const uint8_t* data, const void* absmax, uint8_t* out_data, void* out_scales,
    int64_t n_rows, int64_t n_cols, int64_t blocksize, bool double_quant);

void nf4_dequantize_rows_cpu(
    const uint8_t* data,          // [ceil(N*K/2)]
    const void* absmax,           // [nblocks] float32, or uint8 when nested_absmax != null
    const float* nested_absmax,   // [ceil(nblocks/256)] or null (plain scales)
    const float* nested_code,     // [256] (with nested_absmax)
    float offset,
    const float* code,            // [16]
    void* out,                    // [row1 - row0, K] out in out_dtype
    int64_t n_rows, int64_t n_cols, int64_t blocksize, int64_t row0, int64_t row1,
    DType out_dtype);

void nf4_gemv_cpu(
    const void* x,                // [M, K] in dtype, contiguous
    void* y,                      // [M, N] out in dtype, contiguous
    const uint8_t* data, const void* absmax, const float* nested_absmax,
    const float* nested_code, float offset, const float* code,
    const uint8_t* repacked_data,   // nf4_repack_cpu's out_data, or null (general path)
    const void* repacked_scales,    // its out_scales (with repacked_data)
    int64_t m, int64_t n_rows, int64_t n_cols, int64_t blocksize, DType dtype);

// CUDA twin (compiled only with the CUDA part; see nf4.cu): the same arguments plus a stream.
// It reads the standard layout: repacked_data and repacked_scales must be null.
void nf4_gemv_cuda(
    const void* x, void* y, const uint8_t* data, const void* absmax, const float* nested_absmax,
    const float* nested_code, float offset, const float* code, const uint8_t* repacked_data,
    const void* repacked_scales, int64_t m, int64_t n_rows, int64_t n_cols, int64_t blocksize,
    DType dtype, void* stream);

// ---- argument checks shared by the CPU and CUDA entry points ----------------------------------

namespace nf4_detail {

[[noreturn]] inline void bad_arg(const char* fn, const char* arg, const std::string& expected,
                                 const std::string& got) {
  throw std::invalid_argument(std::string(fn) + ": " + arg + ": expected " + expected + ", got " +
                              got);
}

inline void check_ptr(const char* fn, const char* arg, const void* p) {
  if (p == nullptr) bad_arg(fn, arg, "a non-null pointer", "0");
}

inline void check_blocksize(const char* fn, int64_t blocksize) {
  if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) != 0) {
    bad_arg(fn, "blocksize", "a power of two in [32, 4096]", std::to_string(blocksize));
  }
}

// Sizes of a 2-D weight; nblocks must fit int32 (the kernels index blocks as int32).
inline void check_shape(const char* fn, int64_t n_rows, int64_t n_cols, int64_t blocksize) {
  if (n_rows < 0) bad_arg(fn, "n_rows", ">= 0", std::to_string(n_rows));
  if (n_cols < 1) bad_arg(fn, "n_cols", ">= 1", std::to_string(n_cols));
  check_blocksize(fn, blocksize);
  if (n_rows > (int64_t(1) << 62) / n_cols ||
      (n_rows * n_cols + blocksize - 1) / blocksize >= (int64_t(1) << 31)) {
    bad_arg(fn, "n_rows * n_cols", "fewer than 2^31 blocks",
            std::to_string(n_rows) + " x " + std::to_string(n_cols));
  }
}

inline void check_scales(const char* fn, const void* absmax, const float* nested_absmax,
                         const float* nested_code, const float* code) {
  check_ptr(fn, "absmax", absmax);
  check_ptr(fn, "code", code);
  if (nested_absmax != nullptr) check_ptr(fn, "nested_code (needed with nested_absmax)",
                                          nested_code);
}

inline void check_gemv_args(const char* fn, const void* x, const void* y, const uint8_t* data,
                            const void* absmax, const float* nested_absmax,
                            const float* nested_code, const float* code, int64_t m,
                            int64_t n_rows, int64_t n_cols, int64_t blocksize) {
  if (m < 0 || m > kNf4MaxRows) {
    bad_arg(fn, "m", "0 <= m <= " + std::to_string(kNf4MaxRows), std::to_string(m));
  }
  check_shape(fn, n_rows, n_cols, blocksize);
  if (m == 0 || n_rows == 0) return;
  check_ptr(fn, "x", x);
  check_ptr(fn, "y", y);
  check_ptr(fn, "data", data);
  check_scales(fn, absmax, nested_absmax, nested_code, code);
}

}  // namespace nf4_detail
}  // namespace kernelrl
