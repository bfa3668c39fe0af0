// advantages_cpu.cpp: the CPU twin of advantages.cu (math in advantages.h).
//
// One pass per row (rows in parallel: OpenMP, common/row_loop.h): the row's length L from its
// mask, zeros on the padding, then the real tokens backwards in chunks of kChunk that stay in L1:
//   stage 1 (W lanes): d = logprobs - ref_logprobs, kl, rewards; the values upcast into a buffer;
//   stage 2 (scalar):  the reverse recurrence of the lambda-return G = rho + gamma_lambda * G,
//                      rho = rewards + gamma_one_minus_lambda * V[t + 1]; A = G - V, returns.
//                      The only serial chain is one FMA per token; the chunk's other work is
//                      independent of it and overlaps;
//   stage 3 (once per row, W lanes, float64): the row's whitening partials (count, mean, M2) from
//                      its A, still in cache: the sum, then the squares about the mean.
// The CUDA kernel scans a row tile by a block of threads (a sequential scan per thread, carries
// composed across threads); here one thread owns the row, so the scan is the sequential one.
// Whitening: the partials combine sequentially in row order (float64), then (A - mean) * rstd is
// applied in parallel over rows. Nothing depends on the thread count.
//
// Kernel bodies are templated on the element type, the lane count and the KL estimator, and
// compiled twice as in logprobs_cpu.cpp: 4 lanes in plain functions and 8 lanes inside
// target("avx2,fma") wrappers, picked at run time by cpu_isa().
// Bytes moved: 3*B*T input elements + B*T mask bytes read, 4*B*T floats written; whitening reads
// and writes B*T floats again (from cache at the sizes of a PPO batch).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "advantages/advantages.h"
#include "common/cpu_features.h"
#include "common/dispatch.h"
#include "common/dtype.h"
#include "common/row_loop.h"
#include "common/simd.h"

namespace kernelrl {
namespace {

constexpr int64_t kChunk = 256;  // tokens per chunk: 5 KB of fp32 buffers and outputs in L1

struct FwdArgs {
  const void* logprobs;      // [B, stride_lp]
  const void* ref;           // [B, stride_ref]
  const void* values;        // [B, stride_v]
  const float* scores;       // [B]
  const uint8_t* mask;       // [B, stride_mask]
  float* adv;                // [B, T]
  float* ret;                // [B, T]
  float* rew;                // [B, T]
  float* kl;                 // [B, T]
  double* partials;          // [B, 3]
  int64_t n_cols;            // T
  int64_t stride_lp, stride_ref, stride_v, stride_mask;
  float kl_coef, gamma_lambda, gamma_one_minus_lambda, reward_clip;
};

// 4 lanes of float64 for the whitening sums (common/simd.h).
using simd::D4;
using simd::hsum;
using simd::load_wide;

// ---- the KL estimator on W lanes ----------------------------------------------------------------

template <int EST, int W>
KR_INLINE simd::F<W> kl_value(simd::F<W> d) {
  if (EST == 0) return d;
  if (EST == 1) return d * d * 0.5f;
  const simd::F<W> direct = (simd::exp<W>(-d) - 1.0f) + d;
  const simd::I<W> small = (d <= 1.0f) & (d >= -1.0f);  // false for NaN: direct gives NaN
  return simd::select<W>(small, k3_series(d), direct);
}

// d, kl and rewards for n (1 <= n <= W) tokens at offset k of the chunk; values into vbuf.
template <class T, int EST, int W>
KR_INLINE void chunk_group(const FwdArgs& a, const T* lp, const T* ref, const T* v, float* kl,
                           float* rew, float* vbuf, int64_t k, int n) {
  using F = simd::F<W>;
  const bool full = n == W;
  const F x = full ? simd::load<W>(lp + k) : simd::load_partial<W>(lp + k, n);
  const F y = full ? simd::load<W>(ref + k) : simd::load_partial<W>(ref + k, n);
  const F val = full ? simd::load<W>(v + k) : simd::load_partial<W>(v + k, n);
  const F klv = kl_value<EST, W>(x - y);
  const F r = klv * -a.kl_coef;
  if (full) {
    simd::store<W>(kl + k, klv);
    simd::store<W>(rew + k, r);
    simd::store<W>(vbuf + k, val);
  } else {
    simd::store_partial<W>(kl + k, klv, n);
    simd::store_partial<W>(rew + k, r, n);
    simd::store_partial<W>(vbuf + k, val, n);
  }
}

// (count, mean, M2) of x[0, n), n >= 1, in float64: the sum, then the squares about the mean
// (two accumulators each, so that consecutive adds do not wait on each other).
KR_INLINE void row_moments(const float* x, int64_t n, double* out) {
  D4 s0 = {}, s1 = {};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    s0 += load_wide(x + k);
    s1 += load_wide(x + k + 4);
  }
  double sum = hsum(s0 + s1);
  for (int64_t j = k; j < n; ++j) sum += x[j];
  const double mean = sum / static_cast<double>(n);
  D4 q0 = {}, q1 = {};
  for (k = 0; k + 8 <= n; k += 8) {
    const D4 e0 = load_wide(x + k) - mean, e1 = load_wide(x + k + 4) - mean;
    q0 += e0 * e0;
    q1 += e1 * e1;
  }
  double m2 = hsum(q0 + q1);
  for (int64_t j = k; j < n; ++j) m2 += (x[j] - mean) * (x[j] - mean);
  out[0] = static_cast<double>(n);
  out[1] = mean;
  out[2] = m2;
}

// ---- forward: one row ---------------------------------------------------------------------------

template <class T, int EST, int W>
KR_INLINE void fwd_row(const FwdArgs& a, int64_t i) {
  const int64_t n_cols = a.n_cols;
  // Stage 0: the row's length (its count of real tokens) and zeros on the padding.
  const uint8_t* m = a.mask + i * a.stride_mask;
  int64_t len = 0;
  for (int64_t t = 0; t < n_cols; ++t) len += m[t] != 0;
  float* adv = a.adv + i * n_cols;
  float* ret = a.ret + i * n_cols;
  float* rew = a.rew + i * n_cols;
  float* kl = a.kl + i * n_cols;
  const size_t pad_bytes = sizeof(float) * static_cast<size_t>(n_cols - len);
  for (float* out : {adv, ret, rew, kl}) std::memset(out + len, 0, pad_bytes);
  double* part = a.partials + 3 * i;
  if (len == 0) {
    part[0] = part[1] = part[2] = 0.0;
    return;
  }
  const T* lp = static_cast<const T*>(a.logprobs) + i * a.stride_lp;
  const T* ref = static_cast<const T*>(a.ref) + i * a.stride_ref;
  const T* v = static_cast<const T*>(a.values) + i * a.stride_v;
  const float c = a.gamma_lambda, b = a.gamma_one_minus_lambda;

  // Chunks from the end; carried between them: G and V at the first token of the chunk after.
  float vbuf[kChunk + 1];
  float g_next = 0.0f, v_next = 0.0f;
  for (int64_t end = len; end > 0; end -= kChunk) {
    const int64_t start = std::max<int64_t>(0, end - kChunk);
    const int64_t n = end - start;
    // Stage 1: kl, rewards and the values, W lanes at a time.
    for (int64_t k = 0; k < n; k += W) {
      chunk_group<T, EST, W>(a, lp + start, ref + start, v + start, kl + start, rew + start,
                             vbuf, k, static_cast<int>(std::min<int64_t>(W, n - k)));
    }
    vbuf[n] = v_next;
    if (end == len) rew[len - 1] += clip_score(a.scores[i], a.reward_clip);
    // Stage 2: the reverse recurrence of the lambda-return (advantages.h).
    float G = g_next;
    for (int64_t k = n - 1; k >= 0; --k) {
      G = (rew[start + k] + b * vbuf[k + 1]) + c * G;
      adv[start + k] = G - vbuf[k];
      ret[start + k] = G + (vbuf[k] - vbuf[k]);  // NaN where V is NaN or inf, as A + V
    }
    g_next = G;
    v_next = vbuf[0];
  }
  // Stage 3: the row's whitening partials.
  row_moments(adv, len, part);
}

// ---- whitening: apply to one row ----------------------------------------------------------------

KR_INLINE void whiten_row(float* x, int64_t n, double mean, double rstd) {
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    const D4 e = (load_wide(x + k) - mean) * rstd;
    simd::store<4>(x + k, __builtin_convertvector(e, simd::F<4>));
  }
  for (; k < n; ++k) x[k] = static_cast<float>((x[k] - mean) * rstd);
}

// ---- ISA variants -------------------------------------------------------------------------------

template <class T, int E>
void fwd_rows_generic(const FwdArgs& a, int64_t i) { fwd_row<T, E, 4>(a, i); }
void whiten_rows_generic(float* x, int64_t n, double mean, double rstd) {
  whiten_row(x, n, mean, rstd);
}
#if defined(__x86_64__) || defined(__i386__)
#define KERNELRL_HAS_AVX2_VARIANT 1
template <class T, int E> __attribute__((target("avx2,fma")))
void fwd_rows_avx2(const FwdArgs& a, int64_t i) { fwd_row<T, E, 8>(a, i); }
__attribute__((target("avx2,fma")))
void whiten_rows_avx2(float* x, int64_t n, double mean, double rstd) {
  whiten_row(x, n, mean, rstd);
}
#endif

template <class T, int E>
void fwd_dispatch(const FwdArgs& a, int64_t n_rows) {
  auto fn = &fwd_rows_generic<T, E>;
#ifdef KERNELRL_HAS_AVX2_VARIANT
  if (cpu_isa() == CpuIsa::kAvx2) fn = &fwd_rows_avx2<T, E>;
#endif
  for_each_row(n_rows, a.n_cols, [&](int64_t i) { fn(a, i); });
}

}  // namespace

// ---- entry points -------------------------------------------------------------------------------

void advantages_fwd_cpu(const void* logprobs, const void* ref_logprobs, const void* values,
                        const float* scores, const uint8_t* mask, float* advantages,
                        float* returns, float* rewards, float* kl, double* partials,
                        int64_t n_rows, int64_t n_cols, int64_t stride_logprobs,
                        int64_t stride_ref_logprobs, int64_t stride_values, int64_t stride_mask,
                        DType dtype, int64_t kl_estimator, float kl_coef, float gamma_lambda,
                        float gamma_one_minus_lambda, float reward_clip) {
  detail::check_advantages_fwd_args("advantages_fwd_cpu", logprobs, ref_logprobs, values, scores,
                                    mask, advantages, returns, rewards, kl, partials, n_rows,
                                    n_cols, stride_logprobs, stride_ref_logprobs, stride_values,
                                    stride_mask, kl_estimator);
  if (n_rows == 0) return;
  if (n_cols == 0) {  // every row is empty (and the [B, 0] buffers may be null)
    std::memset(partials, 0, sizeof(double) * 3 * static_cast<size_t>(n_rows));
    return;
  }
  const FwdArgs a{logprobs, ref_logprobs, values, scores, mask, advantages, returns, rewards, kl,
                  partials, n_cols, stride_logprobs, stride_ref_logprobs, stride_values,
                  stride_mask, kl_coef, gamma_lambda, gamma_one_minus_lambda, reward_clip};
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    switch (kl_estimator) {
      case 0: fwd_dispatch<T, 0>(a, n_rows); break;
      case 1: fwd_dispatch<T, 1>(a, n_rows); break;
      default: fwd_dispatch<T, 2>(a, n_rows); break;
    }
  });
}

void advantages_whiten_cpu(float* advantages, const double* partials, double* stats,
                           int64_t n_rows, int64_t n_cols) {
  detail::check_advantages_whiten_args("advantages_whiten_cpu", advantages, partials, stats,
                                       n_rows, n_cols);
  // Combine the partials in row order (advantages.h), float64.
  double n = 0.0, sum = 0.0;
  for (int64_t i = 0; i < n_rows; ++i) {
    n += partials[3 * i];
    sum += partials[3 * i] * partials[3 * i + 1];
  }
  const double mean = n > 0.0 ? sum / n : 0.0;
  double m2 = 0.0;
  for (int64_t i = 0; i < n_rows; ++i) {
    const double dm = partials[3 * i + 1] - mean;
    m2 += partials[3 * i + 2] + partials[3 * i] * dm * dm;
  }
  const double var = n > 1.0 ? m2 / (n - 1.0) : 0.0;
  const double rstd = 1.0 / std::sqrt(var + kWhitenEps);
  stats[0] = mean;
  stats[1] = rstd;
  if (n_rows == 0 || n_cols == 0) return;
  auto fn = &whiten_rows_generic;
#ifdef KERNELRL_HAS_AVX2_VARIANT
  if (cpu_isa() == CpuIsa::kAvx2) fn = &whiten_rows_avx2;
#endif
  for_each_row(n_rows, n_cols, [&](int64_t i) {
    fn(advantages + i * n_cols, static_cast<int64_t>(partials[3 * i]), mean, rstd);
  });
}

}  // namespace kernelrl
