// bind.cpp (advantages): the family's entry points in kernelrl._native (math in advantages.h;
// the conversions from Python and the CUDA-less behaviour in common/bind.h):
//   advantages_fwd_cpu / advantages_fwd_cuda        kl, rewards, GAE, returns, row partials
//   advantages_whiten_cpu / advantages_whiten_cuda  combine the partials, whiten in place
#include <pybind11/pybind11.h>

#include "advantages/advantages.h"
#include "common/bind.h"

namespace kernelrl {
namespace {

constexpr const char* kDoc = R"doc(advantages: KL-penalized rewards and GAE advantages (PPO).

logprobs / ref_logprobs / values are [B, stride] in dtype (unit column stride); mask is uint8
[B, stride_mask] (0 = padding); scores is float32 [B]; advantages / returns / rewards / kl are
float32 contiguous [B, T]; partials is float64 contiguous [B, 3]; stats is float64 [2].

Per row i, real tokens t < L_i = #{t : mask[i, t] != 0}, d = logprobs - ref_logprobs:
  kl[t]      = d | d^2 / 2 | e^{-d} - 1 + d         (kl_estimator 0 k1 | 1 k2 | 2 k3)
  rewards[t] = -kl_coef kl[t] (+ clip(scores[i], +-reward_clip) at t = L_i - 1; inf: no clip)
  G[t]       = rewards[t] + gamma_one_minus_lambda V[t + 1] + gamma_lambda G[t + 1]
               (the lambda-return; V[L_i] = G[L_i] = 0)
  A[t]       = G[t] - V[t]   (= GAE: delta[t] + gamma lambda A[t + 1], delta[t] = rewards[t]
               + gamma V[t + 1] - V[t]),   returns[t] = G[t] + (V[t] - V[t])  (= A[t] + V[t])
  partials[i] = (count, mean, M2) of the row's A;  every output is 0 at t >= L_i.
Whitening: n, mean, M2 combined from the partials in row order (float64);
  var = M2 / (n - 1) if n > 1 else 0;  stats = (mean, rstd = 1 / sqrt(var + 1e-8));
  advantages[t] = (A[t] - mean) rstd for t < L_i, in place.
)doc";

constexpr auto kFwdArgs = bind::args(
    "logprobs", "ref_logprobs", "values", "scores", "mask", "advantages", "returns", "rewards",
    "kl", "partials", "n_rows", "n_cols", "stride_logprobs", "stride_ref_logprobs",
    "stride_values", "stride_mask", "dtype", "kl_estimator", "kl_coef", "gamma_lambda",
    "gamma_one_minus_lambda", "reward_clip");
constexpr auto kWhitenArgs = bind::args("advantages", "partials", "stats", "n_rows", "n_cols");

}  // namespace

void bind_advantages(pybind11::module_& m) {
  bind::append_doc(m, kDoc);
  bind::def_kernel(m, "advantages_fwd_cpu", &advantages_fwd_cpu, kFwdArgs,
                   "Forward on CPU: kl, rewards, advantages (not whitened), returns and the "
                   "rows' whitening partials. See the module doc.");
  bind::def_kernel(m, "advantages_whiten_cpu", &advantages_whiten_cpu, kWhitenArgs,
                   "Whitening on CPU: combine the partials into stats (mean, rstd), then whiten "
                   "the advantages in place. See the module doc.");
  KERNELRL_DEF_CUDA(m, "advantages_fwd_cuda", advantages_fwd_cuda, kFwdArgs,
                    "Forward on CUDA (device pointers; stream is a cudaStream_t as int). "
                    "Asynchronous.");
  KERNELRL_DEF_CUDA(m, "advantages_whiten_cuda", advantages_whiten_cuda, kWhitenArgs,
                    "Whitening on CUDA, in place. Asynchronous.");
}

}  // namespace kernelrl
