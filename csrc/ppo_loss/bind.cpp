// bind.cpp (ppo_loss): the family's entry points in kernelrl._native (math in ppo_loss.h; the
// conversions from Python and the CUDA-less behaviour in common/bind.h):
//   ppo_loss_fwd_cpu / ppo_loss_fwd_cuda   per-row masked sums, then loss, stats, row weights
//                                          omega, vf_scale
//   ppo_loss_bwd_cpu / ppo_loss_bwd_cuda   the gradients to logprobs, values and entropy
//   ppo_loss_cuda_workspace                doubles of the CUDA forward's workspace (every build)
#include <pybind11/pybind11.h>

#include "common/bind.h"
#include "ppo_loss/ppo_loss.h"

namespace kernelrl {
namespace {

constexpr const char* kDoc = R"doc(ppo_loss: the PPO / GRPO loss (+ value, entropy, KL).

The float inputs are contiguous [B, T] in dtype (advantages [B] if adv_per_row); 0 (null) for an
absent optional one (values, old_values, returns: all or none). mask is uint8 (mask_kind 0: bool
or integer weights) or float32 (mask_kind 1) [B, T]; m = its value, real = m != 0. Per token, fp32:
  r = exp(logprobs - old_logprobs);  l1, l2 = -A r, -A clip(r, lo, hi);  pg = max(l1, l2),
  then min(pg, -dual_clip A) where A < 0;  w = min(exp(old - rollout), tis_cap);
  k3 = exp(-k) - 1 + k, k = logprobs - ref;  vf = max((V - R)^2, (clip(V, V_old +- value_clip)
  - R)^2) / 2.
rows [B, 11] float64 (out; 0: not kept): S_b[j] = sum_t [real] m x_j, x = 1, pg w, clipped,
d^2/2, r, vf, vclipped, entropy, k3, w, truncated (kernelrl.ops.ppo_loss.COLUMNS; 0 where the
input is absent). The finish, float64:
omega_b = 1/N (agg 0) | 1/(B n_b) (1) | 1/B (2) | 1/(B norm_length) (3), N = sum_b n_b;
stats (float32 [11]) = sum_b omega_b S_b for pg_loss, entropy, kl_loss, else the token means;
loss = pg_loss + vf_coef vf_loss - entropy_coef entropy + kl_loss_coef kl_loss (given terms);
vf_scale = vf_coef / N.  Backward (g = grad_loss), 0 on padding:
  d/dlogprobs = g omega_b m (w [unclipped] (-A r) + kl_loss_coef (1 - exp(-k)))
  d/dvalues = g vf_scale m [unclipped] (V - R);  d/dentropy = -entropy_coef g omega_b m.
CUDA twins (*_cuda): the same arguments on device pointers plus stream (a cudaStream_t as int),
asynchronous, bitwise reproducible; the forward's rows is then a required float64 workspace of
ppo_loss_cuda_workspace(B, T) doubles (may be 0 only where that is 0), content unspecified on
return. Every exp is a float64 exp rounded to float32 (the CPU's may differ by 1 ulp).
)doc";

constexpr auto kInputs = bind::args("logprobs", "old_logprobs", "advantages", "mask", "values",
                                    "old_values", "returns", "entropy", "ref_logprobs",
                                    "rollout_logprobs");
constexpr auto kFwdRest = bind::args(
    "rows", "loss", "stats", "omega", "vf_scale", "n_rows", "n_cols", "dtype", "mask_kind",
    "adv_per_row", "lo", "hi", "dual_clip", "value_clip", "tis_cap", "vf_coef", "entropy_coef",
    "kl_loss_coef", "agg", "norm_length");
constexpr auto kBwdRest = bind::args(
    "grad_loss", "omega", "vf_scale", "grad_logprobs", "grad_values", "grad_entropy", "n_rows",
    "n_cols", "dtype", "mask_kind", "adv_per_row", "lo", "hi", "dual_clip", "value_clip",
    "tis_cap", "entropy_coef", "kl_loss_coef");

template <std::size_t N, std::size_t M>
constexpr bind::ArgNames<N + M> concat(const bind::ArgNames<N>& a, const bind::ArgNames<M>& b) {
  bind::ArgNames<N + M> out{};
  for (std::size_t i = 0; i < N; ++i) out[i] = a[i];
  for (std::size_t i = 0; i < M; ++i) out[N + i] = b[i];
  return out;
}

}  // namespace

void bind_ppo_loss(pybind11::module_& m) {
  bind::append_doc(m, kDoc);
  bind::def_kernel(m, "ppo_loss_fwd_cpu", &ppo_loss_fwd_cpu, concat(kInputs, kFwdRest),
                   "Forward on CPU: the rows' masked sums, then loss, stats, omega and vf_scale. "
                   "See the module doc.");
  bind::def_kernel(m, "ppo_loss_bwd_cpu", &ppo_loss_bwd_cpu, concat(kInputs, kBwdRest),
                   "Backward on CPU: the gradients wanted (null pointer: not wanted). See the "
                   "module doc.");
  KERNELRL_DEF_CUDA(m, "ppo_loss_fwd_cuda", ppo_loss_fwd_cuda, concat(kInputs, kFwdRest),
                    "Forward on CUDA (device pointers; stream is a cudaStream_t as int; rows is "
                    "the workspace, ppo_loss_cuda_workspace(n_rows, n_cols) doubles). "
                    "Asynchronous.");
  KERNELRL_DEF_CUDA(m, "ppo_loss_bwd_cuda", ppo_loss_bwd_cuda, concat(kInputs, kBwdRest),
                    "Backward on CUDA (device pointers; stream is a cudaStream_t as int). "
                    "Asynchronous.");
  m.def("ppo_loss_cuda_workspace", &ppo_loss_cuda_workspace, pybind11::arg("n_rows"),
        pybind11::arg("n_cols"),
        "float64 elements of the workspace (rows) ppo_loss_fwd_cuda needs for n_rows x n_cols: "
        "11 per row and tile of 2048 tokens; 0 when either is 0.");
}

}  // namespace kernelrl
