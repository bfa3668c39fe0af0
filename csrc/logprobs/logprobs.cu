// logprobs.cu: fused token log-probabilities (and entropy) on CUDA. Math in logprobs.h; the CPU
// twin is logprobs_cpu.cpp and follows the same algorithm.
//
// Shape legend: N rows (tokens), V vocabulary size, Vt columns in a backward tile.
//
// Forward: one thread block per row (grid-stride over rows). Each thread walks the row with
// 16-byte loads (common/vec.cuh: 4 fp32 or 8 fp16/bf16 logits, kUnroll in flight; a few scalar
// loads peel the row to 16-byte alignment and finish its ragged end), keeping an online state
// (m, b, c, t) in fp32 relative to the running max m of the raw logits: per 16-byte group it
// takes the group max, rescales once if the max grew, then adds e^d (or counts the entry at the
// max) and e^d d, with d = (x - m) / tau. States merge with the operator of logprobs.h through
// warp shuffles, then through shared memory across warps; thread 0 writes logp,
// stats = (m, log s) and entropy.
// Bytes: N*V*sizeof(T) read once, 4N floats written.
//
// Backward: one thread block per row of the tile, the same 16-byte vectorized walk, one exp per
// element, no reduction. Every element is loaded before it is stored by the same thread, so
// grad_logits may alias logits (the pointers carry no __restrict__). The vector path needs
// logits and grad_logits rows with the same offset modulo 16 bytes (true for the in-place case
// and for equal strides); other rows take a scalar path.
// Bytes: N*C*sizeof(T) read and N*C*sizeof(T) written once.
//
// No --use_fast_math: __expf (ex2.approx: ~2 ulp, exactly 0 for -inf, NaN for NaN) is used
// explicitly; log1pf and IEEE arithmetic elsewhere keep NaN and inf semantics. (The CPU twin's
// exp flushes results below 2.7e-38 to 0; the GPU may return subnormals there. Both are ~0 next
// to s >= 1.)
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "common/cuda_dtype.cuh"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/vec.cuh"
#include "logprobs/logprobs.h"

namespace kernelrl {
namespace {

constexpr int kThreads = 256;  // threads per block (8 warps)
constexpr int kUnroll = 4;     // 16-byte loads in flight per thread

// d = (x - m) * inv_t, rounded on its own (never fused into a later add), so that forward and
// backward see the same d (e.g. a one-column row gives logp = 0 and a zero gradient exactly).
__device__ __forceinline__ float scaled_diff(float x, float m, float inv_t) {
  return __fmul_rn(x - m, inv_t);
}

// ---- online state ----------------------------------------------------------------------------

// Relative to the running max m of the raw logits, with d = (x - m) / tau:
// b = sum of e^d over entries below m, c = count of entries equal to m (each adds e^0 = 1),
// t = sum e^d d. Empty: (-inf, 0, 0, 0). A NaN logit makes b NaN (also while m is -inf).
struct RowState {
  float m, b, c, t;
};

// Folds n logits into the state: one rescale if the max grows, then one exp per logit.
__device__ __forceinline__ void state_add(RowState& st, const float* x, int n, float inv_t) {
  float cm = -INFINITY;
#pragma unroll
  for (int k = 0; k < n; ++k) cm = fmaxf(cm, x[k]);  // (fmaxf skips NaN; b catches it below)
  if (cm > st.m) {  // the old max entries fall below the new max
    if (st.m != -INFINITY) {
      const float shift = __fmul_rn(st.m - cm, inv_t);
      const float alpha = __expf(shift);
      const float total = st.b + st.c;
      st.t = alpha * (st.t + shift * total);
      st.b = alpha * total;
      st.c = 0.0f;
    }
    st.m = cm;
  }
  if (st.m == -INFINITY) {  // all -inf (masked) or NaN so far
#pragma unroll
    for (int k = 0; k < n; ++k) {
      if (x[k] != x[k]) st.b = NAN;
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < n; ++k) {
    const float d = scaled_diff(x[k], st.m, inv_t);
    const float e = __expf(d);         // 0 for d = -inf, NaN for NaN, 1 at the max
    const bool at_max = x[k] == st.m;
    st.c += at_max ? 1.0f : 0.0f;
    st.b += at_max ? 0.0f : e;
    st.t += e * fmaxf(d, -FLT_MAX);    // 0, not NaN, for d = -inf; 0 at the max
  }
}

// The merge operator (logprobs.h). Symmetric, so every lane of a butterfly gets the same result.
__device__ __forceinline__ RowState state_merge(const RowState& p, const RowState& q, float inv_t) {
  RowState r{fmaxf(p.m, q.m), 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const RowState& a = k == 0 ? p : q;
    if (a.m == r.m) {           // at the max (or both empty: adds b = 0 or NaN)
      r.b += a.b;
      r.c += a.c;
      r.t += a.t;
    } else if (a.m != -INFINITY) {
      const float shift = __fmul_rn(a.m - r.m, inv_t);
      const float alpha = __expf(shift);
      r.b += alpha * (a.b + a.c);
      r.t += alpha * (a.t + shift * (a.b + a.c));
    } else {
      r.b += a.b;               // empty side: 0, or NaN if it saw a NaN
    }
  }
  return r;
}

__device__ __forceinline__ RowState state_warp_reduce(RowState st, float inv_t) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    RowState o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
    o.b = __shfl_xor_sync(0xffffffffu, st.b, off);
    o.c = __shfl_xor_sync(0xffffffffu, st.c, off);
    o.t = __shfl_xor_sync(0xffffffffu, st.t, off);
    st = state_merge(st, o, inv_t);
  }
  return st;
}

// Block-wide merge; the result is valid in thread 0. Ends with a barrier so smem can be reused.
__device__ __forceinline__ RowState state_block_reduce(RowState st, RowState* smem, float inv_t) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;  // smem: [kThreads / 32]
  st = state_warp_reduce(st, inv_t);
  if (lane == 0) smem[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kThreads / 32 ? smem[lane] : RowState{-INFINITY, 0.0f, 0.0f, 0.0f};
    st = state_warp_reduce(st, inv_t);
  }
  __syncthreads();
  return st;
}

// ---- forward kernel --------------------------------------------------------------------------

template <class T>
__global__ void __launch_bounds__(kThreads) logprobs_fwd_kernel(
    const T* __restrict__ logits,         // [N, stride_row], V = n_cols used per row
    const int64_t* __restrict__ labels,   // [N]
    float* __restrict__ logp,             // [N]
    float* __restrict__ stats,            // [N, 2]: (m, log s)
    float* __restrict__ entropy,          // [N] or nullptr
    int64_t n_rows, int64_t n_cols,
    int64_t stride_row,
    float inv_t, int64_t ignore_index) {
  constexpr int kN = Vec16<T>::kN;
  __shared__ RowState smem[kThreads / 32];
  const int tid = threadIdx.x;

  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    // Stage 1: row -> label; ignored rows are not read (uniform across the block).
    const int64_t y = labels[row];
    if (y == ignore_index) {
      if (tid == 0) {
        logp[row] = 0.0f;
        stats[2 * row] = 0.0f;
        stats[2 * row + 1] = 0.0f;
        if (entropy != nullptr) entropy[row] = 0.0f;
      }
      continue;
    }
    const T* x = logits + row * stride_row;

    // Stage 2: pointers: scalar head up to 16-byte alignment, vector body, scalar tail.
    const int64_t head = align_head(x, n_cols);
    const int64_t n_vec = (n_cols - head) / kN;
    const int64_t tail = head + n_vec * kN;
    const T* xv = x + head;

    // Stage 3: loop, accumulating the state in fp32.
    RowState st{-INFINITY, 0.0f, 0.0f, 0.0f};
    for (int64_t j = tid; j < head; j += kThreads) {
      const float v = to_f32(x[j]);
      state_add(st, &v, 1, inv_t);
    }
    for (int64_t j = tail + tid; j < n_cols; j += kThreads) {
      const float v = to_f32(x[j]);
      state_add(st, &v, 1, inv_t);
    }
    for_each_vec16<kUnroll, kThreads>(xv, tid, n_vec, [&st, inv_t](int64_t, const Vec16<T>& r) {
      float f[kN];
#pragma unroll
      for (int k = 0; k < kN; ++k) f[k] = to_f32(r.e[k]);
      state_add(st, f, kN, inv_t);
    });

    // Stage 4: merge across the block; thread 0 stores. log s = log1p(s - 1), s - 1 = b + c - 1.
    st = state_block_reduce(st, smem, inv_t);
    if (tid == 0) {
      const float log_s = log1pf(st.b + (st.c - 1.0f));
      stats[2 * row] = st.m;
      stats[2 * row + 1] = log_s;
      if (entropy != nullptr) entropy[row] = log_s - st.t / (st.b + st.c);
      logp[row] = (y >= 0 && y < n_cols) ? scaled_diff(to_f32(x[y]), st.m, inv_t) - log_s : NAN;
    }
  }
}

// ---- backward kernel -------------------------------------------------------------------------

// grad_x of one element off the label column: g (0 - p) - ge p (log p + H), times 1/T.
template <bool HAS_ENTROPY>
__device__ __forceinline__ float bwd_elem(float x, float m, float log_s, float g, float ge,
                                          float h, float inv_t) {
  const float logq = scaled_diff(x, m, inv_t) - log_s;  // log p
  const float p = __expf(logq);
  float gz = -g * p;
  if (HAS_ENTROPY) gz -= ge * (p > 0.0f ? p * (logq + h) : 0.0f);
  return gz * inv_t;
}

// grad_x of the label's element: 1 - p as -expm1(log p), which keeps its digits when p ~ 1 (a
// confident token), where 1 - p would cancel.
template <bool HAS_ENTROPY>
__device__ __forceinline__ float bwd_label_elem(float x, float m, float log_s, float g, float ge,
                                             float h, float inv_t) {
  const float logq = scaled_diff(x, m, inv_t) - log_s;
  const float p = __expf(logq);
  float gz = g * -expm1f(logq);
  if (HAS_ENTROPY) gz -= ge * (p > 0.0f ? p * (logq + h) : 0.0f);
  return gz * inv_t;
}

// Lane of the label within a 16-byte group, given (label column - first column); -1 if outside.
template <int kN>
__device__ __forceinline__ int label_lane(int64_t rel) {
  return (rel >= 0 && rel < kN) ? static_cast<int>(rel) : -1;
}

// grad_x of one element at tile column j.
template <bool HAS_ENTROPY>
__device__ __forceinline__ float bwd_any(float x, bool is_label, float m, float log_s, float g,
                                         float ge, float h, float inv_t) {
  return is_label ? bwd_label_elem<HAS_ENTROPY>(x, m, log_s, g, ge, h, inv_t)
                  : bwd_elem<HAS_ENTROPY>(x, m, log_s, g, ge, h, inv_t);
}

// One 16-byte group: every element off the label, then (in at most one group per row) the
// label's element replaced by its expm1 form.
template <class T, bool HAS_ENTROPY>
__device__ __forceinline__ Vec16<T> bwd_group(const Vec16<T>& r, int k_label, float m,
                                              float log_s, float g, float ge, float h,
                                              float inv_t) {
  constexpr int kN = Vec16<T>::kN;
  Vec16<T> o;
  float x_label = 0.0f;
#pragma unroll
  for (int k = 0; k < kN; ++k) {
    const float xk = to_f32(r.e[k]);
    if (k == k_label) x_label = xk;
    o.e[k] = from_f32<T>(bwd_elem<HAS_ENTROPY>(xk, m, log_s, g, ge, h, inv_t));
  }
  if (k_label >= 0) {  // one expm1 for the group, then a select into the label's lane
    const T gl = from_f32<T>(bwd_label_elem<HAS_ENTROPY>(x_label, m, log_s, g, ge, h, inv_t));
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      if (k == k_label) o.e[k] = gl;
    }
  }
  return o;
}

template <class T, bool HAS_ENTROPY>
__global__ void __launch_bounds__(kThreads) logprobs_bwd_kernel(
    const T* logits,                            // [N, stride_row], tile of C = n_cols columns
    const int64_t* __restrict__ labels,         // [N]
    const float* __restrict__ stats,            // [N, 2]: (m, log s)
    const float* __restrict__ entropy,          // [N] (read with HAS_ENTROPY)
    const float* __restrict__ grad_logp,        // [N]
    const float* __restrict__ grad_entropy,     // [N] (read with HAS_ENTROPY)
    T* grad_logits,                             // [N, stride_grad_row]; may alias logits
    int64_t n_rows, int64_t n_cols, int64_t vocab_size, int64_t col_offset,
    int64_t stride_row, int64_t stride_grad_row,
    float inv_t, int64_t ignore_index) {
  constexpr int kN = Vec16<T>::kN;
  const int tid = threadIdx.x;

  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    // Stage 1: row -> label and per-row scalars. Ignored rows get 0, bad labels NaN.
    const int64_t y = labels[row];
    const T* x = logits + row * stride_row;
    T* gx = grad_logits + row * stride_grad_row;
    const bool fill = y == ignore_index || y < 0 || y >= vocab_size;
    if (fill) {
      const T value = from_f32<T>(y == ignore_index ? 0.0f : NAN);
      const int64_t head = align_head(gx, n_cols);
      const int64_t n_vec = (n_cols - head) / kN;
      Vec16<T> pack;
#pragma unroll
      for (int k = 0; k < kN; ++k) pack.e[k] = value;
      for (int64_t j = tid; j < head; j += kThreads) gx[j] = value;
      for (int64_t j = head + n_vec * kN + tid; j < n_cols; j += kThreads) gx[j] = value;
      for (int64_t v = tid; v < n_vec; v += kThreads) store16(gx + head + v * kN, pack);
      continue;
    }
    const float m = stats[2 * row];
    const float log_s = stats[2 * row + 1];
    const float g = grad_logp[row];
    const float ge = HAS_ENTROPY ? grad_entropy[row] : 0.0f;
    const float h = HAS_ENTROPY ? entropy[row] : 0.0f;
    const int64_t y_local = y - col_offset;  // label column in this tile, maybe outside [0, C)

    // Stage 2: pointers. Vector path only when both rows share their offset modulo 16 bytes.
    const int64_t head = align_head(x, n_cols);
    const bool vec_ok = align_head(gx, n_cols) == head;
    const int64_t n_vec = vec_ok ? (n_cols - head) / kN : 0;
    const int64_t scalar_end = vec_ok ? head : n_cols;  // scalar part: [0, scalar_end), [tail, C)
    const int64_t tail = vec_ok ? head + n_vec * kN : n_cols;

    // Stage 3: scalar head (or the whole row) and tail: load, compute, store.
    for (int64_t j = tid; j < scalar_end; j += kThreads) {
      const float xj = to_f32(x[j]);
      gx[j] = from_f32<T>(bwd_any<HAS_ENTROPY>(xj, j == y_local, m, log_s, g, ge, h, inv_t));
    }
    for (int64_t j = tail + tid; j < n_cols; j += kThreads) {
      const float xj = to_f32(x[j]);
      gx[j] = from_f32<T>(bwd_any<HAS_ENTROPY>(xj, j == y_local, m, log_s, g, ge, h, inv_t));
    }

    // Stage 4: vector body, kUnroll 16-byte loads in flight, then the masked remainder.
    const T* xv = x + head;
    T* gv = gx + head;
    for_each_vec16<kUnroll, kThreads>(xv, tid, n_vec, [&](int64_t v, const Vec16<T>& r) {
      const int k_label = label_lane<kN>(y_local - (head + v * kN));
      store16(gv + v * kN, bwd_group<T, HAS_ENTROPY>(r, k_label, m, log_s, g, ge, h, inv_t));
    });
  }
}

}  // namespace

void logprobs_fwd_cuda(const void* logits, const int64_t* labels, float* logp, float* stats,
                       float* entropy, int64_t n_rows, int64_t n_cols, int64_t stride_row,
                       DType dtype, float inv_temperature, int64_t ignore_index, void* stream) {
  const char* fn = "logprobs_fwd_cuda";
  detail::check_fwd_args(fn, logits, labels, logp, stats, n_rows, n_cols, stride_row);
  if (n_rows == 0) return;
  dispatch_dtype<CudaTypes>(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    logprobs_fwd_kernel<T><<<grid_for_rows(n_rows), kThreads, 0,
                             static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(logits), labels, logp, stats, entropy, n_rows, n_cols, stride_row,
        inv_temperature, ignore_index);
  });
  cuda_check_launch(fn);
}

// Without grad_entropy the kernel instance has no entropy term and reads neither entropy nor
// grad_entropy.
void logprobs_bwd_cuda(const void* logits, const int64_t* labels, const float* stats,
                       const float* entropy, const float* grad_logp, const float* grad_entropy,
                       void* grad_logits, int64_t n_rows, int64_t n_cols, int64_t vocab_size,
                       int64_t col_offset, int64_t stride_row, int64_t stride_grad_row,
                       DType dtype, float inv_temperature, int64_t ignore_index, void* stream) {
  const char* fn = "logprobs_bwd_cuda";
  detail::check_bwd_args(fn, logits, labels, stats, entropy, grad_logp, grad_entropy, grad_logits,
                         n_rows, n_cols, vocab_size, col_offset, stride_row, stride_grad_row);
  if (n_rows == 0) return;
  dispatch_dtype<CudaTypes>(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_bool(grad_entropy != nullptr, [&](auto has_entropy) {
      logprobs_bwd_kernel<T, decltype(has_entropy)::value>
          <<<grid_for_rows(n_rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
              static_cast<const T*>(logits), labels, stats, entropy, grad_logp, grad_entropy,
              static_cast<T*>(grad_logits), n_rows, n_cols, vocab_size, col_offset, stride_row,
              stride_grad_row, inv_temperature, ignore_index);
    });
  });
  cuda_check_launch(fn);
}

}  // namespace kernelrl
