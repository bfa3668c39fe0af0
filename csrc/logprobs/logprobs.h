// logprobs.h: fused token log-probabilities (and entropy) from logits, forward and backward.
//
// Shape legend: N rows (tokens), V vocabulary size, Vt columns in a backward tile (Vt <= V).
//
// Forward, per row i with label y = labels[i], logits x_j (j in [0, V)) and 1/tau = inv_temperature.
// Everything is relative to the row max m = max_j x_j of the raw logits, so nothing cancels:
//   d_j  = (x_j - m) / tau                 (<= 0; exactly 0 at the max)
//   s    = sum_j e^{d_j}                 kept as b = sum_{x_j < m} e^{d_j} and c = #{x_j = m}
//   log s = log1p(b + (c - 1))           (keeps its digits when one token dominates)
//   t    = sum_j e^{d_j} d_j
//   logp = (x_y - m) / tau - log s         (= z_y - lse with z = x / tau, lse = m / tau + log s)
//   ent = log s - t / s                 (entropy of softmax(z))
//   stats = (m, log s)                   2 floats per row, all the backward needs besides ent
// One pass, online: partial states (m, b, c, t) merge as m' = max(m1, m2), and for each side k
// with shift_k = (m_k - m') / tau, alpha_k = e^{shift_k}:
//   at the new max (m_k = m'):  b += b_k, c += c_k, t += t_k
//   below it       (m_k < m'):  b += alpha_k (b_k + c_k), t += alpha_k (t_k + shift_k (b_k + c_k))
// x_j = -inf (masked vocab) adds 0 to b and t (not NaN); an all -inf row gives m = -inf,
// log s = -inf (lse = -inf) and NaN logp / entropy, as torch does; a NaN logit makes the row NaN.
//   y == ignore_index          -> logp = entropy = 0, stats = (0, 0), and the row is not read;
//   y outside [0, V) otherwise -> logp = NaN (stats and entropy are still computed).
//
// Backward, for a tile of Vt columns holding vocab ids col_offset .. col_offset + Vt - 1 of a
// vocabulary of vocab_size (stats and entropy are the forward's, for the full row):
//   log p_j  = (x_j - m) / tau - log s,  p_j = e^{log p_j}
//   grad_z_j = g_i (1[y == col_offset + j] - p_j) - ge_i (p_j > 0 ? p_j (log p_j + ent_i) : 0)
//   grad_x_j = inv_temperature * grad_z_j, stored in the logits dtype
// (at the label, 1 - p is computed as -expm1(log p): no cancellation for confident tokens)
// with g = grad_logp, ge = grad_entropy (no such term when grad_entropy is null), ent = entropy.
//   y == ignore_index                     -> the row's gradient is 0;
//   y outside [0, vocab_size) otherwise   -> the row's gradient is NaN.
// grad_logits MAY ALIAS logits (the same pointer and the same row stride, for an in-place
// backward): each element is read before it is written, by the same thread. Any other overlap
// is undefined.
//
// All arithmetic is fp32: loads upcast, stores downcast (round to nearest even). (x - m) / tau is
// rounded the same way in the forward and the backward, so e.g. a one-column row gives logp = 0
// and a zero gradient exactly.
// Arguments: pointers, then sizes, then strides, then meta (dtype, temperature, ignore_index).
// Strides are in elements. Pointers for the CUDA entry points are device pointers; `stream` is a
// cudaStream_t. Invalid arguments throw std::invalid_argument naming the argument; CUDA errors
// throw std::runtime_error with the CUDA error string.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/dtype.h"

namespace kernelrl {

void logprobs_fwd_cpu(
    const void* logits,      // [N, stride_row] in dtype; row i holds V = n_cols logits
    const int64_t* labels,   // [N]
    float* logp,             // [N] out
    float* stats,            // [N, 2] out: (m, log s), row-major
    float* entropy,          // [N] out, or nullptr: not computed
    int64_t n_rows, int64_t n_cols,
    int64_t stride_row,
    DType dtype, float inv_temperature, int64_t ignore_index);

void logprobs_bwd_cpu(
    const void* logits,         // [N, stride_row] in dtype; the C = n_cols columns of the tile
    const int64_t* labels,      // [N] vocab ids in [0, vocab_size)
    const float* stats,         // [N, 2] from the forward (full row): (m, log s)
    const float* entropy,       // [N] from the forward, or nullptr when grad_entropy is nullptr
    const float* grad_logp,     // [N]
    const float* grad_entropy,  // [N], or nullptr: no entropy term
    void* grad_logits,          // [N, stride_grad_row] out in dtype; may alias logits
    int64_t n_rows, int64_t n_cols, int64_t vocab_size, int64_t col_offset,
    int64_t stride_row, int64_t stride_grad_row,
    DType dtype, float inv_temperature, int64_t ignore_index);

// CUDA twins (compiled only with the CUDA part; see logprobs.cu). Same arguments plus a stream.
void logprobs_fwd_cuda(
    const void* logits, const int64_t* labels, float* logp, float* stats, float* entropy,
    int64_t n_rows, int64_t n_cols,
    int64_t stride_row,
    DType dtype, float inv_temperature, int64_t ignore_index, void* stream);

void logprobs_bwd_cuda(
    const void* logits, const int64_t* labels, const float* stats, const float* entropy,
    const float* grad_logp, const float* grad_entropy, void* grad_logits,
    int64_t n_rows, int64_t n_cols, int64_t vocab_size, int64_t col_offset,
    int64_t stride_row, int64_t stride_grad_row,
    DType dtype, float inv_temperature, int64_t ignore_index, void* stream);

// ---- argument checks shared by the CPU and CUDA entry points ----------------------------------

namespace detail {

[[noreturn]] inline void bad_arg(const char* fn, const char* arg, const std::string& expected,
                                 const std::string& got) {
  throw std::invalid_argument(std::string(fn) + ": " + arg + ": expected " + expected + ", got " +
                              got);
}

inline void check_ge(const char* fn, const char* arg, int64_t v, int64_t lo, const char* lo_s) {
  if (v < lo) bad_arg(fn, arg, std::string(">= ") + lo_s, std::to_string(v));
}

inline void check_ptr(const char* fn, const char* arg, const void* p) {
  if (p == nullptr) bad_arg(fn, arg, "a non-null pointer", "0");
}

inline void check_fwd_args(const char* fn, const void* logits, const int64_t* labels,
                           const float* logp, const float* stats, int64_t n_rows, int64_t n_cols,
                           int64_t stride_row) {
  check_ge(fn, "n_rows", n_rows, 0, "0");
  check_ge(fn, "n_cols", n_cols, 1, "1");
  if (stride_row < n_cols) {
    bad_arg(fn, "stride_row", ">= n_cols (" + std::to_string(n_cols) + ")",
            std::to_string(stride_row));
  }
  if (n_rows > 0) {
    check_ptr(fn, "logits", logits);
    check_ptr(fn, "labels", labels);
    check_ptr(fn, "logp", logp);
    check_ptr(fn, "stats", stats);
  }
}

inline void check_bwd_args(const char* fn, const void* logits, const int64_t* labels,
                           const float* stats, const float* entropy, const float* grad_logp,
                           const float* grad_entropy, const void* grad_logits, int64_t n_rows,
                           int64_t n_cols, int64_t vocab_size, int64_t col_offset,
                           int64_t stride_row, int64_t stride_grad_row) {
  check_ge(fn, "n_rows", n_rows, 0, "0");
  check_ge(fn, "n_cols", n_cols, 1, "1");
  check_ge(fn, "vocab_size", vocab_size, 1, "1");
  check_ge(fn, "col_offset", col_offset, 0, "0");
  if (col_offset > vocab_size - n_cols) {
    bad_arg(fn, "col_offset",
            "<= vocab_size - n_cols (" + std::to_string(vocab_size - n_cols) + ")",
            std::to_string(col_offset));
  }
  if (stride_row < n_cols) {
    bad_arg(fn, "stride_row", ">= n_cols (" + std::to_string(n_cols) + ")",
            std::to_string(stride_row));
  }
  if (stride_grad_row < n_cols) {
    bad_arg(fn, "stride_grad_row", ">= n_cols (" + std::to_string(n_cols) + ")",
            std::to_string(stride_grad_row));
  }
  if (n_rows > 0) {
    check_ptr(fn, "logits", logits);
    check_ptr(fn, "labels", labels);
    check_ptr(fn, "stats", stats);
    check_ptr(fn, "grad_logp", grad_logp);
    check_ptr(fn, "grad_logits", grad_logits);
    if (grad_entropy != nullptr) check_ptr(fn, "entropy (needed with grad_entropy)", entropy);
  }
  if (grad_logits == logits && stride_grad_row != stride_row) {
    bad_arg(fn, "stride_grad_row", "== stride_row (" + std::to_string(stride_row) +
            ") when grad_logits aliases logits", std::to_string(stride_grad_row));
  }
}

}  // namespace detail
}  // namespace kernelrl
