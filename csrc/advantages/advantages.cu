// advantages.cu: KL-penalized rewards, GAE advantages and batch whitening on CUDA. Math in
// advantages.h; the CPU twin is advantages_cpu.cpp.
//
// Shape legend: B rows, T tokens per row.
//
// Forward: one thread block per row (grid-stride over rows). The block counts the row's real
// tokens L (mask bytes != 0), writes zeros on the padding, then walks the real tokens backwards
// in tiles of kTile = kThreads * kPer tokens, the first tile ending at L. In a tile, thread j owns
// kPer consecutive tokens:
//   stage 1: load and upcast, kl, rewards (+ the clipped score at L - 1), and
//            rho = rewards + gamma_one_minus_lambda * V[t + 1]; store kl, rewards;
//   stage 2: its tokens' lambda-return recurrence G = rho + c G (c = gamma_lambda) with a zero
//            carry, as an affine map x -> a x + b (the G right of its last token to the G at
//            its first: a = c^n, b = that scan);
//   stage 3: the maps compose right to left across the block (a warp shuffle scan, then the warp
//            totals through shared memory), applied to the tile's carry (G right of the tile):
//            each thread gets the G right of its own tokens and reruns its kPer steps from it;
//            stores advantages A = G - V and returns;
//   stage 4: the tile's (count, mean, M2) of A (block sums in float64: the sum, then the squares
//            about the tile mean) merge into the row's (Chan et al.); thread 0 writes partials.
// The block reductions are in a fixed order, so the results do not depend on the schedule.
// Bytes: 3*B*T input elements + B*T mask bytes read, 4*B*T floats written (plus the re-read of
// V at each thread's right neighbour, from L1).
//
// Whitening: one block combines the partials in a fixed order (float64) into stats (mean, rstd);
// then one block per row applies (A - mean) * rstd to its real tokens. No atomics.
//
// No --use_fast_math, and expf rather than __expf in k3's direct branch: __expf's error grows
// with |d| (several ulps by |d| = 10); IEEE arithmetic keeps NaN and inf semantics.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "advantages/advantages.h"
#include "common/cuda_dtype.cuh"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"

namespace kernelrl {
namespace {

constexpr int kThreads = 128;             // threads per block (4 warps)
constexpr int kWarps = kThreads / 32;
constexpr int kPer = 8;                   // consecutive tokens per thread
constexpr int kTile = kThreads * kPer;    // tokens per tile

// x -> a x + b. compose(f, g) = f o g: g applies first (g is to the right of f in the row).
struct Affine {
  float a, b;
};

__device__ __forceinline__ Affine compose(const Affine& f, const Affine& g) {
  return Affine{f.a * g.a, f.a * g.b + f.b};
}

// Sum over the block, the same value in every thread. Ends with a barrier so smem can be reused.
template <class V>
__device__ __forceinline__ V block_sum(V v, V* smem) {  // smem: [kWarps]
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = v;
  __syncthreads();
  V total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += smem[w];
  __syncthreads();
  return total;
}

// The carry each thread's tokens start from: the maps of the threads to its right, composed and
// applied to `carry` (the G right of the tile). Ends with a barrier.
__device__ __forceinline__ float carry_from_right(Affine f, float carry, Affine* smem) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {  // f covers lanes [lane, lane + 2 off) after the step
    const Affine o{__shfl_down_sync(0xffffffffu, f.a, off),
                   __shfl_down_sync(0xffffffffu, f.b, off)};
    if (lane + off < 32) f = compose(f, o);
  }
  Affine next{__shfl_down_sync(0xffffffffu, f.a, 1), __shfl_down_sync(0xffffffffu, f.b, 1)};
  if (lane == 31) next = Affine{1.0f, 0.0f};
  if (lane == 0) smem[warp] = f;
  __syncthreads();
  float y = carry;  // G right of this warp
  for (int w = kWarps - 1; w > warp; --w) y = smem[w].a * y + smem[w].b;
  __syncthreads();
  return next.a * y + next.b;
}

template <int EST>
__device__ __forceinline__ float kl_value(float d) {
  if (EST == 0) return d;
  if (EST == 1) return d * d * 0.5f;
  return fabsf(d) <= 1.0f ? k3_series(d) : (expf(-d) - 1.0f) + d;  // NaN: the direct form
}

// ---- forward kernel --------------------------------------------------------------------------

template <class T, int EST>
__global__ void __launch_bounds__(kThreads) advantages_fwd_kernel(
    const T* __restrict__ logprobs,       // [B, stride_lp]
    const T* __restrict__ ref_logprobs,   // [B, stride_ref]
    const T* __restrict__ values,         // [B, stride_v]
    const float* __restrict__ scores,     // [B]
    const uint8_t* __restrict__ mask,     // [B, stride_mask]
    float* __restrict__ advantages,       // [B, T]
    float* __restrict__ returns,          // [B, T]
    float* __restrict__ rewards,          // [B, T]
    float* __restrict__ kl,               // [B, T]
    double* __restrict__ partials,        // [B, 3]
    int64_t n_rows, int64_t n_cols,
    int64_t stride_lp, int64_t stride_ref, int64_t stride_v, int64_t stride_mask,
    float kl_coef, float c, float b, float reward_clip) {
  __shared__ Affine s_maps[kWarps];
  __shared__ double s_sum[kWarps];
  __shared__ long long s_count[kWarps];
  __shared__ float s_carry;
  const int tid = threadIdx.x;

  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    // Stage 0: the row's length; zeros on the padding.
    const uint8_t* m = mask + row * stride_mask;
    long long cnt = 0;
    for (int64_t t = tid; t < n_cols; t += kThreads) cnt += m[t] != 0;
    const int64_t len = block_sum(cnt, s_count);
    float* adv = advantages + row * n_cols;
    float* ret = returns + row * n_cols;
    float* rew = rewards + row * n_cols;
    float* klr = kl + row * n_cols;
    for (int64_t t = len + tid; t < n_cols; t += kThreads) {
      adv[t] = 0.0f;
      ret[t] = 0.0f;
      rew[t] = 0.0f;
      klr[t] = 0.0f;
    }
    const T* lp = logprobs + row * stride_lp;
    const T* rf = ref_logprobs + row * stride_ref;
    const T* v = values + row * stride_v;
    const float score = len > 0 ? clip_score(scores[row], reward_clip) : 0.0f;

    double n_row = 0.0, mean_row = 0.0, m2_row = 0.0;  // the same in every thread
    float carry = 0.0f;                                 // G right of the tile
    for (int64_t tile_end = len; tile_end > 0; tile_end -= kTile) {
      const int64_t tile_start = tile_end - kTile;      // may be negative: those tokens are out
      const int64_t seg = tile_start + static_cast<int64_t>(tid) * kPer;

      // Stage 1: kl, rewards, rho of this thread's tokens.
      float vv[kPer + 1], rho[kPer];
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int64_t t = seg + k;
        vv[k] = 0.0f;
        rho[k] = 0.0f;
        if (t >= 0) {
          const float klv = kl_value<EST>(to_f32(lp[t]) - to_f32(rf[t]));
          float r = klv * -kl_coef;
          if (t == len - 1) r += score;
          klr[t] = klv;
          rew[t] = r;
          rho[k] = r;
          vv[k] = to_f32(v[t]);
        }
      }
      vv[kPer] = (seg + kPer >= 0 && seg + kPer < len) ? to_f32(v[seg + kPer]) : 0.0f;
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        if (seg + k >= 0) rho[k] = rho[k] + b * vv[k + 1];
      }

      // Stage 2: this thread's map, x -> a x + b.
      Affine f{1.0f, 0.0f};
#pragma unroll
      for (int k = kPer - 1; k >= 0; --k) {
        if (seg + k >= 0) f = Affine{f.a * c, rho[k] + c * f.b};
      }

      // Stage 3: the carry from the right, then the recurrence from it.
      float x = carry_from_right(f, carry, s_maps);
      double sum = 0.0;
      float a_tok[kPer];
#pragma unroll
      for (int k = kPer - 1; k >= 0; --k) {
        a_tok[k] = 0.0f;
        const int64_t t = seg + k;
        if (t >= 0) {
          x = rho[k] + c * x;
          a_tok[k] = x - vv[k];
          adv[t] = a_tok[k];
          ret[t] = x + (vv[k] - vv[k]);  // NaN where V is NaN or inf, as A + V
          sum += a_tok[k];
        }
      }
      if (tid == 0) s_carry = x;  // G at the tile's first token (the next tile's carry)

      // Stage 4: the tile's (count, mean, M2), merged into the row's.
      const double n_tile = static_cast<double>(tile_end - (tile_start > 0 ? tile_start : 0));
      const double mean_tile = block_sum(sum, s_sum) / n_tile;
      double sq = 0.0;
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        if (seg + k >= 0) {
          const double e = a_tok[k] - mean_tile;
          sq += e * e;
        }
      }
      const double m2_tile = block_sum(sq, s_sum);
      const double n_new = n_row + n_tile;
      const double dm = mean_tile - mean_row;
      mean_row += dm * (n_tile / n_new);
      m2_row += m2_tile + dm * dm * (n_row * n_tile / n_new);
      n_row = n_new;
      carry = s_carry;  // (block_sum's barriers ordered the write before this read)
    }
    if (tid == 0) {
      partials[3 * row] = n_row;
      partials[3 * row + 1] = mean_row;
      partials[3 * row + 2] = m2_row;
    }
    __syncthreads();  // s_carry is written again by the next row
  }
}

// ---- whitening kernels -----------------------------------------------------------------------

// One block: stats = (mean, rstd) from the partials, combined in a fixed order.
__global__ void __launch_bounds__(kThreads) advantages_stats_kernel(
    const double* __restrict__ partials,  // [B, 3]
    double* __restrict__ stats,           // [2]
    int64_t n_rows) {
  __shared__ double s_sum[kWarps];
  double n = 0.0, sum = 0.0;
  for (int64_t i = threadIdx.x; i < n_rows; i += kThreads) {
    n += partials[3 * i];
    sum += partials[3 * i] * partials[3 * i + 1];
  }
  n = block_sum(n, s_sum);
  sum = block_sum(sum, s_sum);
  const double mean = n > 0.0 ? sum / n : 0.0;
  double m2 = 0.0;
  for (int64_t i = threadIdx.x; i < n_rows; i += kThreads) {
    const double dm = partials[3 * i + 1] - mean;
    m2 += partials[3 * i + 2] + partials[3 * i] * dm * dm;
  }
  m2 = block_sum(m2, s_sum);
  if (threadIdx.x == 0) {
    const double var = n > 1.0 ? m2 / (n - 1.0) : 0.0;
    stats[0] = mean;
    stats[1] = 1.0 / sqrt(var + kWhitenEps);
  }
}

// One block per row: A = (A - mean) * rstd on the row's real tokens.
__global__ void __launch_bounds__(kThreads) advantages_apply_kernel(
    float* __restrict__ advantages,        // [B, T]
    const double* __restrict__ partials,   // [B, 3]
    const double* __restrict__ stats,      // [2]
    int64_t n_rows, int64_t n_cols) {
  const double mean = stats[0], rstd = stats[1];
  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const int64_t len = static_cast<int64_t>(partials[3 * row]);
    float* adv = advantages + row * n_cols;
    for (int64_t t = threadIdx.x; t < len; t += kThreads) {
      adv[t] = static_cast<float>((adv[t] - mean) * rstd);
    }
  }
}

}  // namespace

void advantages_fwd_cuda(const void* logprobs, const void* ref_logprobs, const void* values,
                         const float* scores, const uint8_t* mask, float* advantages,
                         float* returns, float* rewards, float* kl, double* partials,
                         int64_t n_rows, int64_t n_cols, int64_t stride_logprobs,
                         int64_t stride_ref_logprobs, int64_t stride_values, int64_t stride_mask,
                         DType dtype, int64_t kl_estimator, float kl_coef, float gamma_lambda,
                         float gamma_one_minus_lambda, float reward_clip, void* stream) {
  const char* fn = "advantages_fwd_cuda";
  detail::check_advantages_fwd_args(fn, logprobs, ref_logprobs, values, scores, mask, advantages,
                                    returns, rewards, kl, partials, n_rows, n_cols,
                                    stride_logprobs, stride_ref_logprobs, stride_values,
                                    stride_mask, kl_estimator);
  if (n_rows == 0) return;
  dispatch_dtype<CudaTypes>(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto launch = [&](auto kernel) {
      kernel<<<grid_for_rows(n_rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
          static_cast<const T*>(logprobs), static_cast<const T*>(ref_logprobs),
          static_cast<const T*>(values), scores, mask, advantages, returns, rewards, kl, partials,
          n_rows, n_cols, stride_logprobs, stride_ref_logprobs, stride_values, stride_mask,
          kl_coef, gamma_lambda, gamma_one_minus_lambda, reward_clip);
    };
    switch (kl_estimator) {
      case 0: launch(advantages_fwd_kernel<T, 0>); break;
      case 1: launch(advantages_fwd_kernel<T, 1>); break;
      default: launch(advantages_fwd_kernel<T, 2>); break;
    }
  });
  cuda_check_launch(fn);
}

void advantages_whiten_cuda(float* advantages, const double* partials, double* stats,
                            int64_t n_rows, int64_t n_cols, void* stream) {
  const char* fn = "advantages_whiten_cuda";
  detail::check_advantages_whiten_args(fn, advantages, partials, stats, n_rows, n_cols);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  advantages_stats_kernel<<<1, kThreads, 0, s>>>(partials, stats, n_rows);
  cuda_check_launch(fn);
  if (n_rows == 0 || n_cols == 0) return;
  advantages_apply_kernel<<<grid_for_rows(n_rows), kThreads, 0, s>>>(advantages, partials, stats,
                                                                    n_rows, n_cols);
  cuda_check_launch(fn);
}

}  // namespace kernelrl
