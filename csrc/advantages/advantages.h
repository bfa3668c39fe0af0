// advantages.h: KL-penalized rewards and GAE advantages for PPO, fused, with batch whitening.
//
// Shape legend: B rows (sequences), T columns (response tokens per row).
//
// Forward, per row i. Its real tokens are the prefix t < L_i with L_i = #{t : mask[i, t] != 0}
// (right padding; a mask with holes is read as that prefix). With d = logprobs - ref_logprobs:
//   kl[t]      = d (estimator 0, "k1"),  d^2 / 2 (1, "k2"),  e^{-d} - 1 + d (2, "k3")
//   rewards[t] = -kl_coef * kl[t]  (+ clip(scores[i]) at t = L_i - 1;
//                clip(s) = min(max(s, -reward_clip), reward_clip), NaN stays NaN; +inf: none)
//   GAE:  delta[t] = rewards[t] + gamma V[t + 1] - V[t],  A[t] = delta[t] + gamma lambda A[t + 1],
//         returns[t] = A[t] + V[t]                           (V[L_i] = A[L_i] = 0)
// computed through the lambda-returns, which follow the same recurrence without V[t] in it:
//   G[t]       = rewards[t] + gamma_one_minus_lambda * V[t + 1] + gamma_lambda * G[t + 1]
//   A[t]       = G[t] - V[t],   returns[t] = G[t] + (V[t] - V[t])
// (G[t] = A[t] + V[t] exactly in exact arithmetic; in fp32 the G form never cancels V[t] against
// the sum, which the delta form does when the values telescope, and V[t] - V[t] gives returns the
// reference's NaN where V[t] is NaN or inf). gamma_lambda = gamma * lambda and
// gamma_one_minus_lambda = gamma * (1 - lambda) come rounded from float64.
// All four outputs are 0 at t >= L_i, where no input is read (a NaN there does not leak); a NaN on
// a real token propagates (to A and returns at that and every earlier token of the row).
// k3 is computed as a degree-11 Taylor polynomial for |d| <= 1 (e^{-d} - 1 + d cancels there) and
// as (e^{-d} - 1) + d otherwise.
// The same pass writes the row's whitening partials (count, mean, M2) of its A[t], t < L_i, into
// partials[i] (float64; M2 = sum (A - mean)^2; (0, 0, 0) for an empty row).
//
// Whitening (a second, elementwise pass): the partials combine, in a fixed order (no atomics, so
// the result does not depend on the thread count), as
//   n = sum n_i,  mean = sum n_i mean_i / n,  M2 = sum (M2_i + n_i (mean_i - mean)^2)
//   var = M2 / (n - 1) (the unbiased variance) if n > 1, else 0 (a batch of one real token, or
//   none: A - mean is then 0 and nothing is divided by zero)
//   rstd = 1 / sqrt(var + kWhitenEps),  stats = (mean, rstd)
// and A[t] = (A[t] - mean) * rstd for t < L_i, in place (padding stays 0).
//
// Arithmetic: loads upcast to fp32; the rewards, the scan and the outputs are fp32; the partials,
// their combination and stats are float64 (the squares of |A| up to ~1e150 neither overflow nor
// lose the mean's digits at B*T ~ 1e6 elements).
// Arguments: pointers, then sizes, then strides (in elements; unit column stride), then meta.
// Outputs are contiguous [B, T] float32. Pointers of the CUDA entry points are device pointers;
// `stream` is a cudaStream_t. Invalid arguments throw std::invalid_argument naming the argument;
// CUDA errors throw std::runtime_error with the CUDA error string.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/dtype.h"

namespace kernelrl {

inline constexpr double kWhitenEps = 1e-8;  // added to the variance (as TRL's masked_whiten)
inline constexpr int64_t kNumEstimators = 3;  // 0 "k1", 1 "k2", 2 "k3"

void advantages_fwd_cpu(
    const void* logprobs,       // [B, stride_logprobs] in dtype
    const void* ref_logprobs,   // [B, stride_ref_logprobs] in dtype
    const void* values,         // [B, stride_values] in dtype
    const float* scores,        // [B]
    const uint8_t* mask,        // [B, stride_mask]: 0 = padding
    float* advantages,          // [B, T] out (not whitened)
    float* returns,             // [B, T] out
    float* rewards,             // [B, T] out
    float* kl,                  // [B, T] out
    double* partials,           // [B, 3] out: (count, mean, M2) of the row's A
    int64_t n_rows, int64_t n_cols,
    int64_t stride_logprobs, int64_t stride_ref_logprobs, int64_t stride_values,
    int64_t stride_mask,
    DType dtype, int64_t kl_estimator, float kl_coef, float gamma_lambda,
    float gamma_one_minus_lambda, float reward_clip);

void advantages_whiten_cpu(
    float* advantages,          // [B, T] in/out
    const double* partials,     // [B, 3] from the forward
    double* stats,              // [2] out: (mean, rstd)
    int64_t n_rows, int64_t n_cols);

// CUDA twins (compiled only with the CUDA part; see advantages.cu). Same arguments plus a stream.
void advantages_fwd_cuda(
    const void* logprobs, const void* ref_logprobs, const void* values, const float* scores,
    const uint8_t* mask, float* advantages, float* returns, float* rewards, float* kl,
    double* partials,
    int64_t n_rows, int64_t n_cols,
    int64_t stride_logprobs, int64_t stride_ref_logprobs, int64_t stride_values,
    int64_t stride_mask,
    DType dtype, int64_t kl_estimator, float kl_coef, float gamma_lambda,
    float gamma_one_minus_lambda, float reward_clip, void* stream);

void advantages_whiten_cuda(float* advantages, const double* partials, double* stats,
                            int64_t n_rows, int64_t n_cols, void* stream);

// ---- math shared by the CPU and CUDA code (plain fp32 expressions; host and device) ----------

#if defined(__CUDACC__)
#define KR_HD __host__ __device__ __forceinline__
#else
#define KR_HD inline
#endif

// e^{-d} - 1 + d for |d| <= 1: sum_{k=2}^{11} x^k / k! with x = -d, by Horner. The truncation is
// below 1e-8 relative there; the direct form would lose ~|d| digits to cancellation.
template <class F>
KR_HD F k3_series(F d) {
  const F x = -d;
  F p = x * (1.0f / 39916800) + (1.0f / 3628800);
  p = p * x + (1.0f / 362880);
  p = p * x + (1.0f / 40320);
  p = p * x + (1.0f / 5040);
  p = p * x + (1.0f / 720);
  p = p * x + (1.0f / 120);
  p = p * x + (1.0f / 24);
  p = p * x + (1.0f / 6);
  p = p * x + 0.5f;
  return p * (x * x);
}

// clip(s) to [-c, c]; a NaN score stays NaN (comparisons, not min/max, which may drop it).
KR_HD float clip_score(float s, float c) { return s > c ? c : (s < -c ? -c : s); }

// ---- argument checks shared by the CPU and CUDA entry points ----------------------------------

namespace detail {

[[noreturn]] inline void adv_bad_arg(const char* fn, const char* arg, const std::string& expected,
                                     const std::string& got) {
  throw std::invalid_argument(std::string(fn) + ": " + arg + ": expected " + expected + ", got " +
                              got);
}

inline void adv_check_stride(const char* fn, const char* arg, int64_t stride, int64_t n_cols) {
  if (stride < n_cols) {
    adv_bad_arg(fn, arg, ">= n_cols (" + std::to_string(n_cols) + ")", std::to_string(stride));
  }
}

inline void adv_check_ptr(const char* fn, const char* arg, const void* p) {
  if (p == nullptr) adv_bad_arg(fn, arg, "a non-null pointer", "0");
}

inline void check_advantages_fwd_args(const char* fn, const void* logprobs,
                                      const void* ref_logprobs, const void* values,
                                      const float* scores, const uint8_t* mask,
                                      const float* advantages, const float* returns,
                                      const float* rewards, const float* kl,
                                      const double* partials, int64_t n_rows, int64_t n_cols,
                                      int64_t stride_logprobs, int64_t stride_ref_logprobs,
                                      int64_t stride_values, int64_t stride_mask,
                                      int64_t kl_estimator) {
  if (n_rows < 0) adv_bad_arg(fn, "n_rows", ">= 0", std::to_string(n_rows));
  if (n_cols < 0) adv_bad_arg(fn, "n_cols", ">= 0", std::to_string(n_cols));
  if (kl_estimator < 0 || kl_estimator >= kNumEstimators) {
    adv_bad_arg(fn, "kl_estimator", "0 (k1), 1 (k2) or 2 (k3)", std::to_string(kl_estimator));
  }
  adv_check_stride(fn, "stride_logprobs", stride_logprobs, n_cols);
  adv_check_stride(fn, "stride_ref_logprobs", stride_ref_logprobs, n_cols);
  adv_check_stride(fn, "stride_values", stride_values, n_cols);
  adv_check_stride(fn, "stride_mask", stride_mask, n_cols);
  if (n_rows == 0) return;
  adv_check_ptr(fn, "scores", scores);
  adv_check_ptr(fn, "partials", partials);
  if (n_cols == 0) return;
  adv_check_ptr(fn, "logprobs", logprobs);
  adv_check_ptr(fn, "ref_logprobs", ref_logprobs);
  adv_check_ptr(fn, "values", values);
  adv_check_ptr(fn, "mask", mask);
  adv_check_ptr(fn, "advantages", advantages);
  adv_check_ptr(fn, "returns", returns);
  adv_check_ptr(fn, "rewards", rewards);
  adv_check_ptr(fn, "kl", kl);
}

inline void check_advantages_whiten_args(const char* fn, const float* advantages,
                                         const double* partials, const double* stats,
                                         int64_t n_rows, int64_t n_cols) {
  if (n_rows < 0) adv_bad_arg(fn, "n_rows", ">= 0", std::to_string(n_rows));
  if (n_cols < 0) adv_bad_arg(fn, "n_cols", ">= 0", std::to_string(n_cols));
  adv_check_ptr(fn, "stats", stats);
  if (n_rows == 0) return;
  adv_check_ptr(fn, "partials", partials);
  if (n_cols > 0) adv_check_ptr(fn, "advantages", advantages);
}

}  // namespace detail
}  // namespace kernelrl
