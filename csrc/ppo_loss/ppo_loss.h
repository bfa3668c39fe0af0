// ppo_loss.h: the PPO / GRPO / DAPO policy loss with optional value, entropy and k3 KL terms:
// the forward's per-row masked sums and the scalars finished from them, and the backward's
// gradients, on CPU (ppo_loss_cpu.cpp) and on CUDA (ppo_loss.cu: the same outputs, one call per
// direction; see "CUDA twins" below). Both mirror the Triton kernels of
// kernelrl/ops/ppo_loss/triton_impl.py (_token_terms, _ppo_fwd_kernel, _ppo_finish_kernel,
// _ppo_bwd_kernel). The math and its sources: kernelrl/ops/ppo_loss/__init__.py.
//
// Shape legend: B rows (sequences), T columns (tokens per row).
//
// Per token, in fp32 (m the mask's value as fp32, real = m != 0; d = logprobs - old_logprobs;
// A the token's advantage, or its row's; lo, hi = 1 - clip_eps, 1 + clip_eps_high):
//   r       = exp(d)
//   l1, l2  = -A r, -A clip(r, lo, hi);  clipped = l2 > l1;  pg = clipped ? l2 : l1
//   capped  = A < 0 and pg > -c A (c = dual_clip; +inf: none);  pg = capped ? -c A : pg
//   w       = min(exp(old_logprobs - rollout_logprobs), tis_cap), truncated = the exp > tis_cap
//             (tis_cap +inf: no cap; w = 1 without rollout_logprobs)
//   k3      = exp(-k) - 1 + k,  k = logprobs - ref_logprobs
//   vf      = max(e^2, e_c^2) / 2,  e = V - R,  e_c = clip(V, V_old - value_clip,
//             V_old + value_clip) - R;  vclipped = e_c^2 > e^2
// ("<" and ">" are false on NaN: a NaN ratio, advantage or value stays in pg, vf and their
// gradients.) The forward sums per row b, in float64, S_b[j] = sum over real t of m x_j for the
// kPpoNumCols columns of kernelrl.ops.ppo_loss.COLUMNS:
//   0 count: 1 | 1 pg_loss: pg w | 2 clipfrac: clipped | 3 approx_kl: d^2 / 2 | 4 ratio_mean: r |
//   5 vf_loss: vf | 6 vf_clipfrac: vclipped | 7 entropy: entropy | 8 kl_loss: k3 |
//   9 tis_weight_mean: w | 10 tis_clipfrac: truncated
// (a column whose input is absent is 0, as in the torch backend: 5, 6 without values, 7 without
// entropy, 8 without ref_logprobs, 9, 10 without rollout_logprobs), and finishes them in float64
// as common.py's _finish: N = sum_b S_b[0], inv_n = 1 / N (1 if N = 0),
//   omega_b  = inv_n (agg 0, token-mean) | 1 / (B n_b) (1, seq-mean-token-mean; n_b = S_b[0],
//              1 if 0) | 1 / B (2, seq-mean-token-sum) | 1 / (B L) (3, seq-mean-token-sum-norm;
//              L = norm_length)
//   stats[j] = sum_b omega_b S_b[j] for j = 1, 7, 8, else inv_n sum_b S_b[j]
//   loss     = stats[1] + vf_coef stats[5] - entropy_coef stats[7] + kl_loss_coef stats[8] (a
//              term only where its input is given and its coefficient is not 0)
//   vf_scale = vf_coef inv_n
// The backward, g = grad_loss, per real token (every gradient is +0 on padding):
//   d/dlogprobs = (g omega_b m) (w g_pg + kl_loss_coef g_kl),  g_pg = 0 where clipped or capped,
//                 else -A r;  g_kl = 1 - exp(-k) (the kl_loss_coef term only with ref_logprobs
//                 and kl_loss_coef != 0: a 0 coefficient times an infinite g_kl adds no NaN)
//   d/dvalues   = (g vf_scale m) (vclipped ? 0 : V - R)
//   d/dentropy  = (-entropy_coef g omega_b) m
//
// Numerics (CPU): inputs upcast to fp32 (exactly); the terms are fp32; the sums and the finish are
// float64, the outputs stored as fp32. exp is simd::exp: within 1 ulp of exp over [-86.5, 88.72]
// (checked against float64 at every 7th float), exactly 0 below; the Triton kernels round a
// float64 exp, so the two differ by at most 1 ulp, or by < 3e-38 absolute. k3 for |k| < 2 is its
// Taylor series to k^16 as in the Triton kernel (< 1e-9 relative truncation; the formula cancels
// to no digit near 0), beyond (exp(-k) - 1) + k; g_kl for |k| < 2 is k - k3 (the Triton kernel
// rounds a float64 1 - exp(-k); this keeps its digits in fp32), beyond 1 - exp(-k). Padding is
// never read into a result (the m x terms are selected by real, not multiplied): NaN or inf there
// does not leak. Every row's sums have one fixed order, and the finish adds the rows in row order
// on the calling thread: nothing depends on the thread count.
//
// Bytes moved, b bytes per input element, k <= 9 [B, T] float inputs besides the mask
// (advantages [B] counts 0), mask 1 (uint8) or 4 (float32) bytes per token: the forward reads
// k B T b + B T mask bytes and writes 4 B + 52 bytes (omega, loss, stats, vf_scale; 88 B more
// with rows); the backward reads the same and writes B T b per gradient. Past a row's last real
// token only the mask is read (a run of padding is skipped), so right padding costs its mask.
//
// CUDA twins (ppo_loss.cu; compiled only with the CUDA part): the CPU entry points' arguments plus
// a trailing `stream` (a cudaStream_t); every pointer is a device pointer, the call is
// asynchronous on the stream (no host sync, no allocation). Differences: the forward's `rows` is
// a required float64 workspace of at least ppo_loss_cuda_workspace(B, T) doubles (it may be null
// only where that is 0), holding per-(row, tile) partial sums while the call runs: its content on
// return is unspecified (not S_b). The outputs are the CPU forward's and backward's (the same
// columns, finish, agg codes, NaN and padding rules). Per token the same fp32 formulas (nvcc
// contracts some multiply-adds into FMAs, so a term may differ in its last bits), except that
// every exp is a float64 exp rounded to fp32 (as the Triton kernels' exp_fp64: correctly rounded
// in practice; the CPU's simd::exp may differ by 1 ulp), k3 beyond |k| >= 2 uses that exp, and
// g_kl = -expm1(-k) in float64 rounded to fp32 (the Triton kernel's rounded 1 - exp(-k), without
// its cancellation for tiny k), everywhere. The sums are float64 in another fixed order (tiles
// of kPpoCudaTile tokens; ppo_loss.cu): results are bitwise reproducible run to run, and match
// the CPU's to within those last bits of the terms and float64 rounding of the sums. Outputs
// must not overlap the inputs.
//
// Arguments: pointers, then sizes, then meta. Every [B, T] tensor is contiguous (row stride T);
// the float inputs are all of `dtype`; advantages is [B] when adv_per_row. mask is uint8
// (mask_kind 0: bool as 0 / 1, or integer weights) or float32 (mask_kind 1). An optional input or
// gradient is nullptr when absent / not wanted (values, old_values and returns: all or none).
// Invalid arguments throw std::invalid_argument naming the argument.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/dtype.h"

namespace kernelrl {

inline constexpr int64_t kPpoNumCols = 11;  // the columns of the row sums (above)
inline constexpr int64_t kPpoNumAgg = 4;    // agg codes 0 .. 3 (above)
inline constexpr int64_t kPpoMaskU8 = 0;    // mask_kind codes
inline constexpr int64_t kPpoMaskF32 = 1;

void ppo_loss_fwd_cpu(
    const void* logprobs,          // [B, T] in dtype
    const void* old_logprobs,      // [B, T] in dtype
    const void* advantages,        // [B, T] in dtype, or [B] if adv_per_row
    const void* mask,              // [B, T] uint8 or float32 (mask_kind)
    const void* values,            // [B, T] in dtype, or nullptr (then old_values, returns too)
    const void* old_values,        // [B, T] in dtype, or nullptr
    const void* returns,           // [B, T] in dtype, or nullptr
    const void* entropy,           // [B, T] in dtype, or nullptr
    const void* ref_logprobs,      // [B, T] in dtype, or nullptr
    const void* rollout_logprobs,  // [B, T] in dtype, or nullptr
    double* rows,                  // [B, kPpoNumCols] out: S_b[j], or nullptr (not kept)
    float* loss,                   // [] out
    float* stats,                  // [kPpoNumCols] out
    float* omega,                  // [B] out: the row weights
    float* vf_scale,               // [] out: vf_coef / N
    int64_t n_rows, int64_t n_cols,
    DType dtype, int64_t mask_kind, bool adv_per_row, float lo, float hi, float dual_clip,
    float value_clip, float tis_cap, double vf_coef, double entropy_coef, double kl_loss_coef,
    int64_t agg, double norm_length);

void ppo_loss_bwd_cpu(
    const void* logprobs, const void* old_logprobs, const void* advantages, const void* mask,
    const void* values, const void* old_values, const void* returns, const void* entropy,
    const void* ref_logprobs, const void* rollout_logprobs,   // as in the forward
    const float* grad_loss,        // [] the upstream gradient g
    const float* omega,            // [B] the forward's row weights
    const float* vf_scale,         // [] the forward's vf_coef / N
    void* grad_logprobs,           // [B, T] in dtype out, or nullptr: not wanted
    void* grad_values,             // [B, T] in dtype out, or nullptr (needs values)
    void* grad_entropy,            // [B, T] in dtype out, or nullptr (needs entropy)
    int64_t n_rows, int64_t n_cols,
    DType dtype, int64_t mask_kind, bool adv_per_row, float lo, float hi, float dual_clip,
    float value_clip, float tis_cap, float entropy_coef, float kl_loss_coef);

// CUDA twins (see above): the CPU twins' arguments plus the stream; `rows` is the workspace.
void ppo_loss_fwd_cuda(
    const void* logprobs, const void* old_logprobs, const void* advantages, const void* mask,
    const void* values, const void* old_values, const void* returns, const void* entropy,
    const void* ref_logprobs, const void* rollout_logprobs,
    double* rows,                  // [ppo_loss_cuda_workspace(B, T)] scratch, content unspecified
    float* loss, float* stats, float* omega, float* vf_scale,
    int64_t n_rows, int64_t n_cols,
    DType dtype, int64_t mask_kind, bool adv_per_row, float lo, float hi, float dual_clip,
    float value_clip, float tis_cap, double vf_coef, double entropy_coef, double kl_loss_coef,
    int64_t agg, double norm_length, void* stream);

void ppo_loss_bwd_cuda(
    const void* logprobs, const void* old_logprobs, const void* advantages, const void* mask,
    const void* values, const void* old_values, const void* returns, const void* entropy,
    const void* ref_logprobs, const void* rollout_logprobs, const float* grad_loss,
    const float* omega, const float* vf_scale, void* grad_logprobs, void* grad_values,
    void* grad_entropy, int64_t n_rows, int64_t n_cols,
    DType dtype, int64_t mask_kind, bool adv_per_row, float lo, float hi, float dual_clip,
    float value_clip, float tis_cap, float entropy_coef, float kl_loss_coef, void* stream);

// ---- argument checks --------------------------------------------------------------------------

namespace detail {

[[noreturn]] inline void ppo_bad_arg(const char* fn, const char* arg, const std::string& expected,
                                     const std::string& got) {
  throw std::invalid_argument(std::string(fn) + ": " + arg + ": expected " + expected + ", got " +
                              got);
}

inline void ppo_check_ptr(const char* fn, const char* arg, const void* p) {
  if (p == nullptr) ppo_bad_arg(fn, arg, "a non-null pointer", "0");
}

// The checks the forward and the backward share: sizes, codes, the inputs.
inline void check_ppo_inputs(const char* fn, const void* logprobs, const void* old_logprobs,
                             const void* advantages, const void* mask, const void* values,
                             const void* old_values, const void* returns, int64_t n_rows,
                             int64_t n_cols, int64_t mask_kind, bool adv_per_row) {
  if (n_rows < 0) ppo_bad_arg(fn, "n_rows", ">= 0", std::to_string(n_rows));
  if (n_cols < 0) ppo_bad_arg(fn, "n_cols", ">= 0", std::to_string(n_cols));
  if (mask_kind != kPpoMaskU8 && mask_kind != kPpoMaskF32) {
    ppo_bad_arg(fn, "mask_kind", "0 (uint8) or 1 (float32)", std::to_string(mask_kind));
  }
  const bool v = values != nullptr, ov = old_values != nullptr, r = returns != nullptr;
  if (v != ov || v != r) {
    const char* arg = (ov != v && r == v)   ? "old_values"
                      : (r != v && ov == v) ? "returns"
                                            : "values";
    ppo_bad_arg(fn, arg, "values, old_values and returns all given or all null",
                std::string("values ") + (v ? "given" : "null") + ", old_values " +
                    (ov ? "given" : "null") + ", returns " + (r ? "given" : "null"));
  }
  if (n_rows == 0) return;
  if (adv_per_row) ppo_check_ptr(fn, "advantages", advantages);
  if (n_cols == 0) return;
  ppo_check_ptr(fn, "logprobs", logprobs);
  ppo_check_ptr(fn, "old_logprobs", old_logprobs);
  ppo_check_ptr(fn, "advantages", advantages);
  ppo_check_ptr(fn, "mask", mask);
}

inline void check_ppo_fwd_args(const char* fn, const void* logprobs, const void* old_logprobs,
                               const void* advantages, const void* mask, const void* values,
                               const void* old_values, const void* returns, const float* loss,
                               const float* stats, const float* omega,
                               const float* vf_scale, int64_t n_rows, int64_t n_cols,
                               int64_t mask_kind, bool adv_per_row, int64_t agg,
                               double norm_length) {
  check_ppo_inputs(fn, logprobs, old_logprobs, advantages, mask, values, old_values, returns,
                   n_rows, n_cols, mask_kind, adv_per_row);
  if (agg < 0 || agg >= kPpoNumAgg) {
    ppo_bad_arg(fn, "agg", "0 (token-mean), 1 (seq-mean-token-mean), 2 (seq-mean-token-sum) or "
                "3 (seq-mean-token-sum-norm)", std::to_string(agg));
  }
  if (agg == 3 && !(norm_length > 0.0 && std::isfinite(norm_length))) {
    ppo_bad_arg(fn, "norm_length", "a finite number > 0", std::to_string(norm_length));
  }
  ppo_check_ptr(fn, "loss", loss);
  ppo_check_ptr(fn, "stats", stats);
  ppo_check_ptr(fn, "vf_scale", vf_scale);
  if (n_rows > 0) ppo_check_ptr(fn, "omega", omega);
}

inline void check_ppo_bwd_args(const char* fn, const void* logprobs, const void* old_logprobs,
                               const void* advantages, const void* mask, const void* values,
                               const void* old_values, const void* returns, const void* entropy,
                               const float* grad_loss, const float* omega, const float* vf_scale,
                               const void* grad_values, const void* grad_entropy,
                               int64_t n_rows, int64_t n_cols,
                               int64_t mask_kind, bool adv_per_row) {
  check_ppo_inputs(fn, logprobs, old_logprobs, advantages, mask, values, old_values, returns,
                   n_rows, n_cols, mask_kind, adv_per_row);
  if (grad_values != nullptr && values == nullptr) {
    ppo_bad_arg(fn, "grad_values", "null without values", "a pointer");
  }
  if (grad_entropy != nullptr && entropy == nullptr) {
    ppo_bad_arg(fn, "grad_entropy", "null without entropy", "a pointer");
  }
  if (n_rows == 0 || n_cols == 0) return;
  ppo_check_ptr(fn, "grad_loss", grad_loss);
  ppo_check_ptr(fn, "omega", omega);
  ppo_check_ptr(fn, "vf_scale", vf_scale);
}

}  // namespace detail

// ---- the CUDA forward's workspace (a plain host function, in every build) -----------------------

inline constexpr int64_t kPpoCudaTile = 2048;  // tokens of a row per CUDA forward block

// Doubles of the workspace ppo_loss_fwd_cuda needs: kPpoNumCols partial sums per (row, tile),
// B ceil(T / kPpoCudaTile) kPpoNumCols; 0 when B or T is 0.
inline int64_t ppo_loss_cuda_workspace(int64_t n_rows, int64_t n_cols) {
  const char* fn = "ppo_loss_cuda_workspace";
  if (n_rows < 0) detail::ppo_bad_arg(fn, "n_rows", ">= 0", std::to_string(n_rows));
  if (n_cols < 0) detail::ppo_bad_arg(fn, "n_cols", ">= 0", std::to_string(n_cols));
  return n_rows * ((n_cols + kPpoCudaTile - 1) / kPpoCudaTile) * kPpoNumCols;
}

}  // namespace kernelrl
