// logprobs_cpu.cpp: the CPU twin of logprobs.cu (math in logprobs.h).
//
// Same algorithm as the CUDA kernel: one pass per row with an online state (m, b, c, t) relative
// to the running max m of the raw logits. Rows run in parallel (OpenMP, common/row_loop.h);
// inside a row, W fp32 lanes (4 or 8) accumulate b, c and t. The row is walked in chunks of
// kChunk elements that stay in L1:
//   stage 1: load and upcast the chunk into a buffer, and take its max;
//   stage 2: if the max grew, rescale the state once (the merge operator with an empty chunk);
//   stage 3: accumulate e = exp((x - m) / tau) into b (or count it in c at the max) and e d into t.
// So the online rescale costs one exp per chunk instead of one per element.
//
// One kernel body per direction, templated on the element type (float, half_t, bfloat16_t) and
// the lane count, compiled twice: 4 lanes in plain functions (baseline x86-64 / any CPU) and 8
// lanes inside target("avx2,fma") wrappers; cpu_isa() picks one at run time. Bytes moved:
// forward reads N*V elements once and writes 4N floats; backward reads and writes N*Vt elements.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/cpu_features.h"
#include "common/dispatch.h"
#include "common/dtype.h"
#include "common/row_loop.h"
#include "common/simd.h"
#include "logprobs/logprobs.h"

namespace kernelrl {
namespace {

constexpr int64_t kChunk = 512;                       // elements per chunk: 2 KB of fp32 in L1
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct FwdArgs {
  const void* logits;      // [N, stride_row]
  const int64_t* labels;   // [N]
  float* logp;             // [N]
  float* stats;            // [N, 2]: (m, log s)
  float* entropy;          // [N] or nullptr
  int64_t n_cols;          // V
  int64_t stride_row;
  float inv_t;
  int64_t ignore_index;
};

struct BwdArgs {
  const void* logits;         // [N, stride_row], tile of C columns
  const int64_t* labels;      // [N]
  const float* stats;         // [N, 2]: (m, log s)
  const float* entropy;       // [N] (read only with HAS_ENTROPY)
  const float* grad_logp;     // [N]
  const float* grad_entropy;  // [N] (read only with HAS_ENTROPY)
  void* grad_logits;          // [N, stride_grad_row], may alias logits
  int64_t n_cols;             // C
  int64_t vocab_size;         // V
  int64_t col_offset;
  int64_t stride_row;
  int64_t stride_grad_row;
  float inv_t;
  int64_t ignore_index;
};

// ---- forward: one row ---------------------------------------------------------------------------

template <class T, int W>
KR_INLINE void fwd_row(const FwdArgs& a, int64_t i) {
  using F = simd::F<W>;
  // Stage 0: the row's label; ignored rows are not read.
  const int64_t y = a.labels[i];
  if (y == a.ignore_index) {
    a.logp[i] = 0.0f;
    a.stats[2 * i] = 0.0f;
    a.stats[2 * i + 1] = 0.0f;
    if (a.entropy != nullptr) a.entropy[i] = 0.0f;
    return;
  }
  const T* x = static_cast<const T*>(a.logits) + i * a.stride_row;
  const int64_t V = a.n_cols;
  const float inv_t = a.inv_t;

  // Online state, fp32: m (max raw logit) per row; per lane, b = sum of e^d over entries below
  // m, c = count of entries equal to m, t = sum e^d d, with d = (x - m) / tau. x_y: the label's
  // logit (NaN until seen, so an out-of-range label gives NaN).
  float m = -kInf;
  float x_y = kNaN;
  F b = simd::splat<W>(0.0f), c = simd::splat<W>(0.0f), t = simd::splat<W>(0.0f);
  F buf[kChunk / W];

  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    // Stage 1: load and upcast the chunk into the buffer; its max.
    const int64_t n = std::min<int64_t>(kChunk, V - c0);
    const int64_t nfull = n / W;
    const int rem = static_cast<int>(n % W);
    F cmax = simd::splat<W>(-kInf);
    for (int64_t k = 0; k < nfull; ++k) {
      const F xv = simd::load<W>(x + c0 + k * W);
      buf[k] = xv;
      cmax = simd::vmax<W>(cmax, xv);
    }
    int64_t nv = nfull;
    if (rem != 0) {  // ragged end: padding lanes are -inf, i.e. masked
      F xv = simd::load_partial<W>(x + c0 + nfull * W, rem);
      xv = simd::select<W>(simd::iota<W>() < rem, xv, simd::splat<W>(-kInf));
      buf[nv++] = xv;
      cmax = simd::vmax<W>(cmax, xv);
    }
    if (y >= c0 && y < c0 + n) x_y = buf[(y - c0) / W][(y - c0) % W];

    // Stage 2: a larger max rescales the state (the merge with an empty chunk): with
    // shift = (m - m') / tau and alpha = e^shift, the old max entries fall below the new max:
    //   t' = alpha (t + shift (b + c)),  b' = alpha (b + c),  c' = 0.
    const float cm = simd::hmax<W>(cmax);
    if (cm > m) {
      if (m != -kInf) {  // (while m is -inf nothing has been accumulated: b, t are 0 or NaN)
        const float shift = simd::rounded((m - cm) * inv_t);
        const float alpha = std::exp(shift);
        const F total = b + c;
        t = (t + total * shift) * alpha;
        b = total * alpha;
        c = simd::splat<W>(0.0f);
      }
      m = cm;
    }
    if (m == -kInf) {  // everything so far is -inf (masked) or NaN; a NaN must still poison b
      for (int64_t k = 0; k < nv; ++k) {
        if (simd::any_nan<W>(buf[k])) b = b + kNaN;
      }
      continue;
    }

    // Stage 3: accumulate into the chunk's own sums, then into the row's (a two-level sum keeps
    // the rounding error of long rows small). Entries at the max count in c (e^0 = 1 exactly),
    // the rest (and NaN) in b. d = -inf gives e = 0 and, clamped to -FLT_MAX, e d = 0.
    F cb = simd::splat<W>(0.0f), cc = simd::splat<W>(0.0f), ct = simd::splat<W>(0.0f);
    for (int64_t k = 0; k < nv; ++k) {
      const F xv = buf[k];
      const F d = simd::rounded<W>((xv - m) * inv_t);
      const F e = simd::exp<W>(d);
      const simd::I<W> at_max = xv == m;
      cb = cb + simd::select<W>(at_max, simd::splat<W>(0.0f), e);
      cc = cc + simd::select<W>(at_max, simd::splat<W>(1.0f), simd::splat<W>(0.0f));
      ct = ct + e * simd::vmax<W>(d, simd::splat<W>(-std::numeric_limits<float>::max()));
    }
    b = b + cb;
    c = c + cc;
    t = t + ct;
  }

  // Stage 4: finish and store. s = b + c; log s = log1p(s - 1) keeps its digits when one
  // entry dominates (s - 1 = b + (c - 1) is computed without cancellation).
  const float b_sum = simd::hsum<W>(b);
  const float c_sum = simd::hsum<W>(c);
  const float t_sum = simd::hsum<W>(t);
  const float log_s = std::log1p(b_sum + (c_sum - 1.0f));
  a.stats[2 * i] = m;
  a.stats[2 * i + 1] = log_s;
  if (a.entropy != nullptr) a.entropy[i] = log_s - t_sum / (b_sum + c_sum);
  a.logp[i] = simd::rounded((x_y - m) * inv_t) - log_s;  // NaN unless 0 <= y < V
}

// ---- backward: one row of a column tile --------------------------------------------------------

template <class T, int W>
KR_INLINE void fill_row(T* out, int64_t n, float value) {
  const simd::F<W> v = simd::splat<W>(value);
  int64_t j = 0;
  for (; j + W <= n; j += W) simd::store<W>(out + j, v);
  if (j < n) simd::store_partial<W>(out + j, v, static_cast<int>(n - j));
}

// grad_x for W columns of the tile from their logits xv; k_label is the lane of the label, or
// -1. Off the label, g (0 - p) = -g p. At the label, 1 - p is computed as -expm1(log p), which
// keeps its digits when p ~ 1 (a confident token), where 1 - p would cancel.
template <int W, bool HAS_ENTROPY>
KR_INLINE simd::F<W> bwd_group(simd::F<W> xv, int k_label, float m, float log_s, float g,
                               float ge, float h, float inv_t) {
  using F = simd::F<W>;
  // log p = (x - m) / tau - log s, with (x - m) / tau rounded exactly as in the forward
  const F logq = simd::rounded<W>((xv - m) * inv_t) - log_s;
  const F p = simd::exp<W>(logq);
  F gz = p * -g;
  if (HAS_ENTROPY) {
    gz = gz - simd::select<W>(p > 0.0f, p * (logq + h), simd::splat<W>(0.0f)) * ge;
  }
  if (k_label >= 0) {
    const float lq = logq[k_label], pk = p[k_label];
    float gk = g * -std::expm1(lq);
    if (HAS_ENTROPY && pk > 0.0f) gk -= ge * (pk * (lq + h));
    gz[k_label] = gk;
  }
  return gz * inv_t;
}

// Lane of the label in the W columns starting at tile column j, or -1.
template <int W>
KR_INLINE int label_lane(int64_t y_local, int64_t j) {
  const int64_t k = y_local - j;
  return (k >= 0 && k < W) ? static_cast<int>(k) : -1;
}

template <class T, int W, bool HAS_ENTROPY>
KR_INLINE void bwd_row(const BwdArgs& a, int64_t i) {
  // Stage 0: the row's label and scalars, copied to locals (the stores below may alias a's
  // memory as far as the compiler knows).
  const int64_t y = a.labels[i];
  const T* x = static_cast<const T*>(a.logits) + i * a.stride_row;
  T* gx = static_cast<T*>(a.grad_logits) + i * a.stride_grad_row;
  const int64_t C = a.n_cols;
  if (y == a.ignore_index) return fill_row<T, W>(gx, C, 0.0f);
  if (y < 0 || y >= a.vocab_size) return fill_row<T, W>(gx, C, kNaN);
  const float m = a.stats[2 * i];
  const float log_s = a.stats[2 * i + 1];
  const float g = a.grad_logp[i];
  const float ge = HAS_ENTROPY ? a.grad_entropy[i] : 0.0f;
  const float h = HAS_ENTROPY ? a.entropy[i] : 0.0f;
  const float inv_t = a.inv_t;
  const int64_t y_local = y - a.col_offset;  // label column in this tile, maybe outside [0, C)

  // Stage 1: the loop over the tile, then the ragged end. Each W-lane group is loaded entirely
  // before it is stored, so grad_logits may alias logits.
  int64_t j = 0;
  for (; j + W <= C; j += W) {
    const simd::F<W> xv = simd::load<W>(x + j);
    const int kl = label_lane<W>(y_local, j);
    simd::store<W>(gx + j, bwd_group<W, HAS_ENTROPY>(xv, kl, m, log_s, g, ge, h, inv_t));
  }
  if (j < C) {
    const int rem = static_cast<int>(C - j);
    const simd::F<W> xv = simd::load_partial<W>(x + j, rem);
    const int kl = label_lane<W>(y_local, j);
    simd::store_partial<W>(gx + j, bwd_group<W, HAS_ENTROPY>(xv, kl, m, log_s, g, ge, h, inv_t),
                           rem);
  }
}

// ---- ISA variants -------------------------------------------------------------------------------

// generic: 4 lanes (16-byte vectors: SSE2 / NEON); avx2: 8 lanes with FMA.
template <class T> void fwd_rows_generic(const FwdArgs& a, int64_t i) { fwd_row<T, 4>(a, i); }
template <class T, bool E>
void bwd_rows_generic(const BwdArgs& a, int64_t i) { bwd_row<T, 4, E>(a, i); }
#if defined(__x86_64__) || defined(__i386__)
#define KERNELRL_HAS_AVX2_VARIANT 1
template <class T> __attribute__((target("avx2,fma")))
void fwd_rows_avx2(const FwdArgs& a, int64_t i) { fwd_row<T, 8>(a, i); }
template <class T, bool E> __attribute__((target("avx2,fma")))
void bwd_rows_avx2(const BwdArgs& a, int64_t i) { bwd_row<T, 8, E>(a, i); }
#endif

template <class T>
void fwd_dispatch(const FwdArgs& a, int64_t n_rows) {
  auto fn = &fwd_rows_generic<T>;
#ifdef KERNELRL_HAS_AVX2_VARIANT
  if (cpu_isa() == CpuIsa::kAvx2) fn = &fwd_rows_avx2<T>;
#endif
  for_each_row(n_rows, a.n_cols, [&](int64_t i) { fn(a, i); });
}

template <class T, bool HAS_ENTROPY>
void bwd_dispatch(const BwdArgs& a, int64_t n_rows) {
  auto fn = &bwd_rows_generic<T, HAS_ENTROPY>;
#ifdef KERNELRL_HAS_AVX2_VARIANT
  if (cpu_isa() == CpuIsa::kAvx2) fn = &bwd_rows_avx2<T, HAS_ENTROPY>;
#endif
  for_each_row(n_rows, a.n_cols, [&](int64_t i) { fn(a, i); });
}

}  // namespace

// ---- entry points -------------------------------------------------------------------------------

void logprobs_fwd_cpu(const void* logits, const int64_t* labels, float* logp, float* stats,
                      float* entropy, int64_t n_rows, int64_t n_cols, int64_t stride_row,
                      DType dtype, float inv_temperature, int64_t ignore_index) {
  detail::check_fwd_args("logprobs_fwd_cpu", logits, labels, logp, stats, n_rows, n_cols,
                         stride_row);
  if (n_rows == 0) return;
  const FwdArgs a{logits, labels, logp, stats, entropy, n_cols, stride_row, inv_temperature,
                  ignore_index};
  dispatch_dtype(dtype, [&](auto tag) { fwd_dispatch<typename decltype(tag)::type>(a, n_rows); });
}

void logprobs_bwd_cpu(const void* logits, const int64_t* labels, const float* stats,
                      const float* entropy, const float* grad_logp, const float* grad_entropy,
                      void* grad_logits, int64_t n_rows, int64_t n_cols, int64_t vocab_size,
                      int64_t col_offset, int64_t stride_row, int64_t stride_grad_row,
                      DType dtype, float inv_temperature, int64_t ignore_index) {
  detail::check_bwd_args("logprobs_bwd_cpu", logits, labels, stats, entropy, grad_logp,
                         grad_entropy, grad_logits, n_rows, n_cols, vocab_size, col_offset,
                         stride_row, stride_grad_row);
  if (n_rows == 0) return;
  const BwdArgs a{logits, labels, stats, entropy, grad_logp, grad_entropy, grad_logits, n_cols,
                  vocab_size, col_offset, stride_row, stride_grad_row, inv_temperature,
                  ignore_index};
  dispatch_dtype(dtype, [&](auto tag) {
    dispatch_bool(a.grad_entropy != nullptr, [&](auto has_entropy) {
      bwd_dispatch<typename decltype(tag)::type, decltype(has_entropy)::value>(a, n_rows);
    });
  });
}

}  // namespace kernelrl
