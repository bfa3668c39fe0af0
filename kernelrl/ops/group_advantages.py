"""Group-relative advantages for critic-free RL (GRPO, RLOO, Dr. GRPO): one score per completion.

Shapes (the package legend): B completions in the batch, G = ``group_size`` completions per
prompt, so B/G groups; consecutive rows form a group (rows g·G … g·G + G − 1 are the
completions of prompt g). The letter G is used for nothing else.

Math, per group with scores r_1 … r_G (mean_g and std_g over the group; std_g is the
unbiased standard deviation, Σ(r − mean_g)² / (G − 1) under the root, as TRL's
GRPOTrainer computes it):

    baseline="mean"  (GRPO, Shao et al. 2024, DeepSeekMath §4.1.2, outcome supervision)
        A_i = r_i − mean_g
    baseline="loo"   (RLOO, Ahmadian et al. 2024; Kool et al. 2019, leave-one-out)
        A_i = r_i − (Σ_j r_j − r_i) / (G − 1)  =  G / (G − 1) · (r_i − mean_g)
    normalize_std=True  divides either by (std_g + eps):  A_i ← A_i / (std_g + eps)

``normalize_std=None`` means True for "mean" (GRPO) and False for "loo" (RLOO);
``normalize_std=False`` with "mean" is Dr. GRPO (Liu et al. 2025). ``eps`` defaults to
TRL's 1e-4.

Edge cases, all without a host sync:
  * a group whose scores are all equal gives exactly 0 (never NaN, also its gradient): the
    scores are shifted by the group's first score before anything is summed, so equal
    scores give differences of exactly 0 (r − mean_g in floating point is not exactly 0:
    mean_g of three 0.1s rounds), and std_g's square root is taken of max(var, tiny) so
    its derivative at var = 0 is 0, not ∞·0 = NaN;
  * a group of one (G = 1) gives 0 for "mean" (std_g taken as 0), and is a ValueError for
    "loo" (no one to leave out);
  * NaN (or ±inf) in a score makes its own group's advantages NaN and no other group's;
    nothing clamps it away.

Computed in float32 (float64 for float64 scores); the result has that dtype. Differentiable:
plain torch under autograd (the scores of a learned reward model can take gradients).

Bytes moved (b = bytes per score): B·b read, 4·B written; a handful of elementwise passes
over [B/G, G] — cheap enough that plain torch is the right implementation (there is
nothing here for a fused kernel to save).
"""

from __future__ import annotations

import math

import torch

from kernelrl import backend as _backend
from kernelrl.ops._checks import FLOAT_DTYPES, check_choice, check_tensor

__all__ = ["group_advantages", "BASELINES"]

BASELINES = ("mean", "loo")


# ---------------------------------------------------------------------------------------
# torch (the only implementation; float64-capable, so it is its own float64 run)
# ---------------------------------------------------------------------------------------

def _group_advantages_torch(scores: torch.Tensor, group_size: int, loo: bool,
                            normalize_std: bool, eps: float) -> torch.Tensor:
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    r = scores.to(acc).reshape(-1, group_size)                        # [B/G, G]
    # Shift by the group's first score: equal scores give exact zeros below, and the sums
    # are of small differences rather than of large scores.
    d = r - r[:, :1]
    centered = d - d.mean(dim=1, keepdim=True)                        # r − mean_g
    advantages = centered * (group_size / (group_size - 1)) if loo else centered
    if normalize_std:
        if group_size > 1:
            var = centered.square().sum(dim=1, keepdim=True) / (group_size - 1)
            # max(var, tiny): d sqrt / d var is finite, so an all-equal group's gradient
            # is 0 rather than ∞·0 = NaN; NaN in var still propagates through clamp_min.
            std = var.clamp_min(torch.finfo(acc).tiny).sqrt()
        else:                                                         # std of one: 0
            std = torch.zeros_like(centered)
        advantages = advantages / (std + eps)
    return advantages.reshape(-1)


# ---------------------------------------------------------------------------------------
# public op
# ---------------------------------------------------------------------------------------

def _check_group_size(group_size, batch: int, shape: tuple) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected a positive int, got {group_size!r}")
    if batch % group_size:
        raise ValueError(f"group_size: expected a divisor of the batch size B={batch} "
                         f"(scores has shape {shape}), got {group_size}")
    return group_size


def group_advantages(scores: torch.Tensor, group_size: int, *, baseline: str = "mean",
                     normalize_std: bool | None = None, eps: float = 1e-4) -> torch.Tensor:
    """Advantages of B completions in groups of ``group_size`` consecutive rows.

    scores [B] (any float dtype) -> advantages [B], float32 (float64 for float64 scores).

    baseline: "mean" (GRPO: r − mean_g) or "loo" (RLOO: r − mean of the other G − 1).
    normalize_std: divide by (unbiased std_g + eps); None means True for "mean", False for
    "loo". See the module docstring for the formulas and the edge cases (all-equal groups
    give 0, a group of one gives 0 for "mean" and is a ValueError for "loo", NaN stays in
    its group).
    """
    check_tensor("scores", scores, dtypes=FLOAT_DTYPES, ndim=1)
    check_choice("baseline", baseline, BASELINES)
    group_size = _check_group_size(group_size, scores.shape[0], tuple(scores.shape))
    if baseline == "loo" and group_size == 1:
        raise ValueError("group_size: baseline='loo' needs at least 2 completions per group "
                         "(the leave-one-out mean of a group of one is undefined), got 1")
    if normalize_std is None:
        normalize_std = baseline == "mean"
    if not isinstance(normalize_std, bool):
        raise ValueError(f"normalize_std: expected None, True or False, got {normalize_std!r}")
    # Comparisons, not math.isfinite: under torch.compile a float may be symbolic.
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"eps: expected a finite Python float > 0, got {eps!r}")
    # Only torch is registered; select() still honours (and refuses) a forced backend.
    _backend.select("group_advantages", scores.device, scores.dtype)
    return _group_advantages_torch(scores, group_size, baseline == "loo", normalize_std,
                                   float(eps))


def _examples(device: torch.device, dtype: torch.dtype) -> list:
    """Representative inputs for ``kernelrl tune``: a GRPO and an RLOO batch (G = 16)."""
    batch = 4096 if device.type == "cpu" else 65536
    # A private generator: scores drawn from the global seed that ``kernelrl tune`` also
    # uses for the upstream gradient would equal it, and Σ r·A(r) is nearly flat in r.
    gen = torch.Generator(device).manual_seed(1234)
    scores = torch.randn(batch, device=device, generator=gen).to(dtype).requires_grad_()
    return [(f"B={batch} G=16 baseline={b}", (scores, 16), {"baseline": b})
            for b in BASELINES]


_backend.register_op(
    "group_advantages",
    # A few elementwise passes over B scores: plain torch, no kernel to fuse.
    {"torch": _backend.Implementation(FLOAT_DTYPES, _group_advantages_torch)},
    examples=_examples, fn=group_advantages)
