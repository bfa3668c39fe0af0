// nf4.cu: the NF4 decode GEMV on CUDA, y [M, N] = x [M, K] . W^T for M <= 16 (format and math in
// nf4.h). Its C++ twin is the CPU GEMV in nf4_cpu.cpp; the correspondence:
//
//   CPU fast path (AVX-512, tiles of 16 rows)      CUDA fast kernel (K % B == 0, aligned data)
//   one 16-byte load = 32 codes of a tile           one 128-bit load per lane = 32 codes of a row
//   vpermps on a 16-entry table in a register       a 16-entry table in shared memory
//   block scales decoded once per block (in-kernel) a lane's 32 codes lie in one block: one
//                                                   scale decode per load (in-kernel)
//   w = code[c] * s (float32), FMA into float32     the same (no weight is rounded on CUDA)
//   accumulators per (row of x, row of W)           M accumulators per lane and row, summed
//                                                   over the warp by shuffles
//   x converted to float32 once per call            x staged in shared memory as float32, a
//                                                   chunk of 1024 columns at a time
//   CPU general path (row decoded, then dots)      CUDA general kernel (any K): a warp per row,
//                                                   a lane per column, scalar decode
//
// Fast kernel: kWarps warps per block, kRowsPerWarp rows of W per warp (they share every x value
// read from shared memory). Per chunk of kChunk = 1024 columns, the block stages x[:, chunk] in
// shared memory as float32, swizzled so that lane L's q-th float4 of row m sits at
// [m][q * 32 + L] (consecutive lanes read consecutive float4: no bank conflicts); then lane L
// loads bytes [16 L, 16 L + 16) of the chunk of each of its rows (columns 32 L .. 32 L + 31,
// coalesced 128-bit loads, streamed past L1 with ld.global.nc), decodes the 32 weights and FMAs
// them into M float32 accumulators per row. Bytes: N K / 2 + N K / B scale bytes once, x M K
// per block (from L2).
//
// Templated on the element type and MT in {1, 2, 4, 8, 16} (the smallest >= M; rows m >= M are
// skipped), so that the accumulators stay in registers.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_dtype.cuh"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "nf4/nf4.h"

namespace kernelrl {
namespace {

constexpr int kWarps = 4;          // warps per block
constexpr int kRowsPerWarp = 2;    // rows of W per warp in the fast kernel
constexpr int kChunk = 1024;       // columns of x staged per step: 32 lanes x 32 columns
constexpr int kChunkF4 = kChunk / 4;

struct ScaleArgs {
  const void* absmax;          // float32 [nblocks], or uint8 with nested_absmax
  const float* nested_absmax;  // null: plain scales
  const float* nested_code;
  float offset;
};

// s_b, decoded in the kernel: the product rounded before the add, as on the CPU and in torch.
__device__ __forceinline__ float block_scale(const ScaleArgs& s, int64_t b) {
  if (s.nested_absmax == nullptr) return __ldg(static_cast<const float*>(s.absmax) + b);
  const unsigned q = __ldg(static_cast<const unsigned char*>(s.absmax) + b);
  return __fadd_rn(__fmul_rn(__ldg(s.nested_code + q), __ldg(s.nested_absmax + (b >> 8))),
                   s.offset);
}

__device__ __forceinline__ uint4 load_stream16(const uint8_t* p) {
  return __ldcs(reinterpret_cast<const uint4*>(p));
}

template <int MT>
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- fast kernel: K % B == 0, data 16-byte aligned --------------------------------------

template <class T, int MT>
__global__ void __launch_bounds__(kWarps * 32)
nf4_gemv_fast_kernel(const T* __restrict__ x, T* __restrict__ y, const uint8_t* __restrict__ data,
                     ScaleArgs sc, const float* __restrict__ code, int m, int64_t n_rows,
                     int64_t n_cols, int64_t blocksize) {
  extern __shared__ float4 xs[];  // [MT][kChunkF4], swizzled
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = code[threadIdx.x];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kRowsPerWarp;
  const int64_t K = n_cols;

  float acc[kRowsPerWarp][MT];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int i = 0; i < MT; ++i) acc[r][i] = 0.0f;
  }

  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int cols = static_cast<int>(K - k0 < kChunk ? K - k0 : kChunk);  // a multiple of 32
    __syncthreads();  // the previous chunk is consumed (and lut is written, the first time)
    float* xsf = reinterpret_cast<float*>(xs);
    for (int idx = threadIdx.x; idx < m * cols; idx += blockDim.x) {
      const int i = idx / cols, c = idx % cols;
      const int slot = ((c % 32) / 4) * 32 + c / 32;  // float4 q = (c % 32) / 4 of lane c / 32
      xsf[(i * kChunkF4 + slot) * 4 + c % 4] = to_f32(x[i * K + k0 + c]);
    }
    __syncthreads();
    if (lane * 32 < cols) {
      float w[kRowsPerWarp][32];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int64_t row = row0 + r < n_rows ? row0 + r : n_rows - 1;  // clamped: not stored
        const int64_t i0 = row * K + k0 + lane * 32;                    // a multiple of 32
        const uint4 q = load_stream16(data + i0 / 2);
        const float s = block_scale(sc, i0 / blocksize);
        const unsigned words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int b = 0; b < 16; ++b) {
          const unsigned byte = (words[b / 4] >> (8 * (b % 4))) & 0xffu;
          w[r][2 * b] = __fmul_rn(lut[byte >> 4], s);
          w[r][2 * b + 1] = __fmul_rn(lut[byte & 15u], s);
        }
      }
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        if (i < m) {
#pragma unroll
          for (int qd = 0; qd < 8; ++qd) {
            const float4 xv = xs[i * kChunkF4 + qd * 32 + lane];
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r) {
              float a = acc[r][i];
              a = fmaf(w[r][4 * qd], xv.x, a);
              a = fmaf(w[r][4 * qd + 1], xv.y, a);
              a = fmaf(w[r][4 * qd + 2], xv.z, a);
              a = fmaf(w[r][4 * qd + 3], xv.w, a);
              acc[r][i] = a;
            }
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const float v = warp_sum<MT>(acc[r][i]);
      if (lane == 0 && i < m && row0 + r < n_rows) y[i * n_rows + row0 + r] = from_f32<T>(v);
    }
  }
}

// ---- general kernel: any K ----------------------------------------------------------------------

template <class T, int MT>
__global__ void __launch_bounds__(kWarps * 32)
nf4_gemv_general_kernel(const T* __restrict__ x, T* __restrict__ y,
                        const uint8_t* __restrict__ data, ScaleArgs sc,
                        const float* __restrict__ code, int m, int64_t n_rows, int64_t n_cols,
                        int64_t blocksize) {
  __shared__ float lut[16];
  if (threadIdx.x < 16) lut[threadIdx.x] = code[threadIdx.x];
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= n_rows) return;  // no barrier below
  const int64_t K = n_cols;
  float acc[MT];
#pragma unroll
  for (int i = 0; i < MT; ++i) acc[i] = 0.0f;
  for (int64_t k = lane; k < K; k += 32) {
    const int64_t e = row * K + k;
    const unsigned byte = __ldg(data + e / 2);
    const unsigned c = (e & 1) ? (byte & 15u) : (byte >> 4);
    const float w = __fmul_rn(lut[c], block_scale(sc, e / blocksize));
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      if (i < m) acc[i] = fmaf(w, to_f32(x[i * K + k]), acc[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    const float v = warp_sum<MT>(acc[i]);
    if (lane == 0 && i < m) y[i * n_rows + row] = from_f32<T>(v);
  }
}

template <class F>
void dispatch_rows(int64_t m, F&& f) {
  if (m <= 1) return f(std::integral_constant<int, 1>{});
  if (m <= 2) return f(std::integral_constant<int, 2>{});
  if (m <= 4) return f(std::integral_constant<int, 4>{});
  if (m <= 8) return f(std::integral_constant<int, 8>{});
  f(std::integral_constant<int, 16>{});
}

}  // namespace

void nf4_gemv_cuda(const void* x, void* y, const uint8_t* data, const void* absmax,
                   const float* nested_absmax, const float* nested_code, float offset,
                   const float* code, const uint8_t* repacked_data, const void* repacked_scales,
                   int64_t m, int64_t n_rows, int64_t n_cols, int64_t blocksize, DType dtype,
                   void* stream) {
  const char* fn = "nf4_gemv_cuda";
  nf4_detail::check_gemv_args(fn, x, y, data, absmax, nested_absmax, nested_code, code, m, n_rows,
                              n_cols, blocksize);
  if (repacked_data != nullptr || repacked_scales != nullptr) {
    nf4_detail::bad_arg(fn, repacked_data != nullptr ? "repacked_data" : "repacked_scales",
                        "0 (the CUDA kernel reads the standard layout)", "a pointer");
  }
  if (m == 0 || n_rows == 0) return;
  const ScaleArgs sc{absmax, nested_absmax, nested_code, offset};
  const bool fast = n_cols % blocksize == 0 && (reinterpret_cast<uintptr_t>(data) & 15u) == 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  dispatch_dtype<CudaTypes>(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* xt = static_cast<const T*>(x);
    T* yt = static_cast<T*>(y);
    dispatch_rows(m, [&](auto mt) {
      constexpr int MT = decltype(mt)::value;
      if (fast) {
        constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
        const int64_t blocks = (n_rows + kRowsPerBlock - 1) / kRowsPerBlock;
        const size_t smem = sizeof(float4) * kChunkF4 * MT;
        auto kernel = nf4_gemv_fast_kernel<T, MT>;
        if (smem > 48 * 1024) {
          cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)),
                     fn);
        }
        kernel<<<grid_for_rows(blocks), kWarps * 32, smem, st>>>(
            xt, yt, data, sc, code, static_cast<int>(m), n_rows, n_cols, blocksize);
      } else {
        const int64_t blocks = (n_rows + kWarps - 1) / kWarps;
        nf4_gemv_general_kernel<T, MT><<<grid_for_rows(blocks), kWarps * 32, 0, st>>>(
            xt, yt, data, sc, code, static_cast<int>(m), n_rows, n_cols, blocksize);
      }
    });
  });
  cuda_check_launch(fn);
}

}  // namespace kernelrl
