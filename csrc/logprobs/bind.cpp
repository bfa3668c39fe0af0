// bind.cpp (logprobs): the family's entry points in kernelrl._native (math in logprobs.h; the
// conversions from Python and the CUDA-less behaviour in common/bind.h):
//   logprobs_fwd_cpu / logprobs_fwd_cuda    forward (+ stream)
//   logprobs_bwd_cpu / logprobs_bwd_cuda    backward over a column tile (+ stream)
#include <pybind11/pybind11.h>

#include "common/bind.h"
#include "logprobs/logprobs.h"

namespace kernelrl {
namespace {

constexpr const char* kDoc = R"doc(logprobs: token log-probabilities (and entropy) from logits.

logits / grad_logits are [N, stride] in dtype; labels are int64 [N]; logp, entropy, grad_logp,
grad_entropy are float32 contiguous [N]; stats is float32 contiguous [N, 2]. A pointer of 0 means
"absent" for entropy (forward: not computed) and grad_entropy (backward: no entropy term).

Per row i with label y, logits x_j (j in [0, V)), tau = 1 / inv_temperature, all relative to the
row max m = max_j x_j, d_j = (x_j - m) / tau (one online pass):
  log s = log1p(sum_j e^{d_j} - 1)      (the max's own e^0 = 1 kept out of the sum)
  logp  = (x_y - m) / tau - log s         (= log softmax(x / tau)[y]; NaN if y is outside [0, V))
  ent = log s - sum_j e^{d_j} d_j / s (entropy of softmax(x / tau))
  stats = (m, log s)                    (lse = m / tau + log s)
  rows with y == ignore_index: logp = entropy = 0, stats = (0, 0).
Backward over a tile of n_cols columns holding vocab ids col_offset .. col_offset + n_cols - 1:
  log p_j = (x_j - m) / tau - log s
  grad_x_j = inv_temperature * (g_i (1[y == col_offset + j] - p_j)
                                - ge_i (p_j > 0 ? p_j (log p_j + ent_i) : 0))
  with g = grad_logp, ge = grad_entropy, ent = entropy; ignored rows get 0, out-of-range labels NaN.
  grad_logits may alias logits (same pointer and row stride).
All arithmetic is fp32.
)doc";

constexpr auto kFwdArgs = bind::args("logits", "labels", "logp", "stats", "entropy", "n_rows",
                                     "n_cols", "stride_row", "dtype", "inv_temperature",
                                     "ignore_index");
constexpr auto kBwdArgs = bind::args("logits", "labels", "stats", "entropy", "grad_logp",
                                     "grad_entropy", "grad_logits", "n_rows", "n_cols",
                                     "vocab_size", "col_offset", "stride_row", "stride_grad_row",
                                     "dtype", "inv_temperature", "ignore_index");

}  // namespace

void bind_logprobs(pybind11::module_& m) {
  bind::append_doc(m, kDoc);
  bind::def_kernel(m, "logprobs_fwd_cpu", &logprobs_fwd_cpu, kFwdArgs,
                   "Forward on CPU: logp, stats (m, log s) and (if entropy != 0) entropy per "
                   "row. See the module doc.");
  bind::def_kernel(m, "logprobs_bwd_cpu", &logprobs_bwd_cpu, kBwdArgs,
                   "Backward on CPU for a column tile; grad_logits may alias logits. See the "
                   "module doc.");
  KERNELRL_DEF_CUDA(m, "logprobs_fwd_cuda", logprobs_fwd_cuda, kFwdArgs,
                    "Forward on CUDA (device pointers; stream is a cudaStream_t as int). "
                    "Asynchronous.");
  KERNELRL_DEF_CUDA(m, "logprobs_bwd_cuda", logprobs_bwd_cuda, kBwdArgs,
                    "Backward on CUDA for a column tile; grad_logits may alias logits. "
                    "Asynchronous.");
}

}  // namespace kernelrl
