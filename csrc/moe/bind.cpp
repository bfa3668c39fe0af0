// bind.cpp (moe): the family's entry points in kernelrl._native (contract and algorithm in moe.h;
// the conversions from Python and the CUDA-less behaviour in common/bind.h):
//   moe_permute_cpu / moe_permute_cuda   the stable counting sort of the slots by expert
//   moe_permute_workspace_size           int32 elements of the workspace table they need
#include <pybind11/pybind11.h>

#include "common/bind.h"
#include "moe/moe.h"

namespace kernelrl {
namespace {

constexpr const char* kDoc = R"doc(moe: the MoE token permutation (stable counting sort by expert).

experts is int32 or int64 (id_bytes 4 or 8) contiguous [N, K], K <= 8, 1 <= E <= 1024,
S = N K <= 2^31 - 1 slots, slot s = n K + j. Outputs int32: offsets [E + 1] (the exclusive scan
of the per-expert counts), order [S] (the slots sorted by expert, ties by slot), position [S]
(position[order[p]] = p), bad [1] (slots with an id outside [0, E): they sort after every expert,
offsets[E] = S - bad). workspace: int32 [moe_permute_workspace_size(S, E)], scratch.
Phases: per-tile histograms, one exclusive scan, per-tile ranks in slot order; no atomics.
)doc";

constexpr auto kPermuteArgs = bind::args(
    "experts", "order", "offsets", "position", "bad", "workspace", "n_tokens", "top_k",
    "num_experts", "id_bytes", "workspace_size");

int64_t workspace_size(int64_t n_slots, int64_t num_experts) {
  const char* fn = "moe_permute_workspace_size";
  if (n_slots < 0 || n_slots > kMoeMaxSlots) {
    detail::moe_bad_arg(fn, "n_slots", "0 <= n_slots <= 2^31 - 1", std::to_string(n_slots));
  }
  if (num_experts < 1 || num_experts > kMoeMaxExperts) {
    detail::moe_bad_arg(fn, "num_experts", "1 <= num_experts <= " +
                        std::to_string(kMoeMaxExperts), std::to_string(num_experts));
  }
  return moe_permute_workspace_size(n_slots, num_experts);
}

}  // namespace

void bind_moe(pybind11::module_& m) {
  using pybind11::arg;
  bind::append_doc(m, kDoc);
  bind::def_kernel(m, "moe_permute_cpu", &moe_permute_cpu, kPermuteArgs,
                   "The permutation on CPU: offsets, order, position and bad. See the module "
                   "doc.");
  KERNELRL_DEF_CUDA(m, "moe_permute_cuda", moe_permute_cuda, kPermuteArgs,
                    "The permutation on CUDA (device pointers; stream is a cudaStream_t as "
                    "int). Asynchronous: three launches (two when S = 0).");
  m.def("moe_permute_workspace_size", &workspace_size, arg("n_slots"), arg("num_experts"),
        "int32 elements of the workspace moe_permute_* needs for n_slots slots and num_experts "
        "experts: (num_experts + 1) * tiles.");
  m.attr("moe_max_experts") = kMoeMaxExperts;
  m.attr("moe_max_top_k") = kMoeMaxTopK;
}

}  // namespace kernelrl
