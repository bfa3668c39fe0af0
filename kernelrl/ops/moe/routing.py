"""The MoE router: top-k routing weights, the load-balancing loss and the router z-loss.

Shapes (the package legend): N tokens, E experts, K top-k. ``router_logits`` [N, E] is the
router's output (HF: ``F.linear(hidden, gate.weight)``); p = softmax(logits) per token,
computed in float32 (float64 for float64 logits).

topk_route (Hugging Face's ``MixtralTopKRouter`` and ``Qwen3MoeTopKRouter``, transformers 5):

    experts[n] = the K experts of largest p[n, e], largest first; ties: lower index first
    weights[n] = p[n, experts[n]]                        renormalize=False (Qwen3's
                                                         norm_topk_prob=False)
    weights[n] = p[n, experts[n]] / Σ_j p[n, experts[n, j]]     renormalize=True (Mixtral)

load_balancing_loss (Switch Transformer, Fedus et al. 2021, Eq. 4-6, for top-k), for ONE
layer, over the tokens the mask keeps (T of them):

    f_e  = #{(n, j): experts[n, j] = e} / (K·T)     fraction of routed slots; Σ_e f_e = 1
    P_e  = (1/T)·Σ_n p[n, e]                        mean router probability; Σ_e P_e = 1
    loss = E·Σ_e f_e·P_e

It is 1.0 at perfect balance (f_e = P_e = 1/E) for every K. f_e is a count: it carries no
gradient; P_e does. Relation to transformers' ``load_balancing_loss_func(gate_logits,
E, K, attention_mask)``, which pools L layers: it divides the counts by the number of
tokens, not slots (its f sums to K), and pools counts and probabilities over the layers
before taking the product, so

    HF(layers) = K · load_balancing_loss(cat(logits_l), cat(experts_l), cat(mask, L times))

(K at perfect balance). With one layer that is K · load_balancing_loss(logits, experts,
mask); with several it is not K times the mean of the per-layer losses (a product of
means is not a mean of products) unless every layer routes alike. HF re-derives the
experts from its own top-k of softmax(logits) (in the logits' dtype, its own tie order);
pass those experts to match it to the bit. With every token masked the loss is 0 (HF: NaN).

router_z_loss (ST-MoE, Zoph et al. 2022, Eq. 5): the mean over kept tokens of
logsumexp(logits[n])², in float32 (float64 for float64 logits); 0 with every token masked.

Masks: [N] (or any shape of N elements, e.g. an attention mask [B, T] for logits [B·T, E]),
bool or numeric; a nonzero entry keeps the token. Masked tokens' logits are never read
into a result (NaN there does not leak).
"""

from __future__ import annotations

from typing import Optional

import torch

from kernelrl import backend as _backend
from kernelrl.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor

__all__ = ["topk_route", "load_balancing_loss", "router_z_loss", "MAX_TOP_K"]

#: The largest top-k the MoE kernels take (Qwen3-MoE routes 8 of 128).
MAX_TOP_K = 8
#: The most experts the native and Triton moe_ffn kernels take (csrc/moe/moe.h
#: kMoeMaxExperts); the torch backend takes any number.
MAX_EXPERTS = 1024


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_logits(fn: str, router_logits) -> None:
    check_tensor(f"{fn}: router_logits", router_logits, dtypes=FLOAT_DTYPES, ndim=2)
    if router_logits.shape[1] < 1:
        raise ValueError(f"{fn}: router_logits: expected [N, E] with E >= 1 experts, got "
                         f"shape {tuple(router_logits.shape)}")


def check_expert_ids(name: str, experts: torch.Tensor, num_experts: int) -> None:
    """Expert ids must lie in [0, num_experts): checked always on CPU (no sync there), on
    other devices only with ``KERNELRL_DEBUG=1`` (reading the result back is a host sync)."""
    if experts.numel() == 0:
        return
    if experts.device.type != "cpu" and not _backend.debug_enabled():
        return
    bad = (experts < 0) | (experts >= num_experts)
    if bool(bad.any().item()):          # host sync: CPU, or debug mode only
        first = int(experts[bad][0].item())     # the error path: naming the bad id
        raise ValueError(f"{name}: expected expert ids in [0, {num_experts}), got {first} "
                         f"({int(bad.sum().item())} such ids)")


def _check_experts(fn: str, experts, router_logits: torch.Tensor) -> None:
    N, E = router_logits.shape
    check_tensor(f"{fn}: experts", experts, ndim=2)
    if experts.dtype.is_floating_point or experts.dtype.is_complex or experts.dtype == torch.bool:
        raise ValueError(f"{fn}: experts: expected an integer dtype, got "
                         f"{_backend.dtype_name(experts.dtype)}")
    if experts.shape[0] != N or experts.shape[1] < 1:
        raise ValueError(f"{fn}: experts: expected [N, K] = [{N}, K >= 1] (router_logits is "
                         f"{tuple(router_logits.shape)}), got {tuple(experts.shape)}")
    check_same_device(f"{fn}: experts", experts, router_logits.device)
    check_expert_ids(f"{fn}: experts", experts, E)


def _kept(fn: str, mask, router_logits: torch.Tensor) -> Optional[torch.Tensor]:
    """The mask as bool [N] (None: every token kept)."""
    if mask is None:
        return None
    N = router_logits.shape[0]
    check_tensor(f"{fn}: mask", mask)
    if mask.dtype.is_complex:
        raise ValueError(f"{fn}: mask: expected a bool, integer or float dtype, got "
                         f"{_backend.dtype_name(mask.dtype)}")
    if mask.numel() != N:
        raise ValueError(f"{fn}: mask: expected N = {N} elements (router_logits is "
                         f"{tuple(router_logits.shape)}), got shape {tuple(mask.shape)}")
    check_same_device(f"{fn}: mask", mask, router_logits.device)
    return mask.reshape(N) != 0


def _masked(logits: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """Masked tokens' logits replaced by 0, so that NaN there reaches neither the result
    nor (as 0·NaN) the gradient."""
    return logits if keep is None else torch.where(keep[:, None], logits, 0.0)


def topk_route(router_logits: torch.Tensor, k: int = 2, *, renormalize: bool = True,
               weights_dtype: Optional[torch.dtype] = None):
    """Top-k routing as Hugging Face's Mixtral and Qwen3-MoE routers do it (the math: the
    module docstring).

    Args:
        router_logits: [N, E] float32, float16, bfloat16 or float64. Gets gradients.
        k: experts per token, 1 <= k <= min(8, E).
        renormalize: divide the k weights by their sum (Mixtral; Qwen3-MoE's
            ``norm_topk_prob``). False keeps the raw softmax probabilities.
        weights_dtype: the dtype of ``weights``; None (the default) is the logits' dtype, as
            Qwen3-MoE casts them. Mixtral's router leaves them in float32: pass
            ``torch.float32`` to match it.

    Returns:
        (weights [N, K] in ``weights_dtype``, experts [N, K] int64), each row's experts in
        descending probability; ties are broken toward the lower expert index (a stable
        sort of −p, so the order is defined, where ``torch.topk``'s is not). Without ties
        this is exactly HF's output. The softmax runs in float32 (float64 for float64
        logits, where HF would compute in float32).
    """
    _check_logits("topk_route", router_logits)
    E = router_logits.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(MAX_TOP_K, E):
        raise ValueError(f"topk_route: k: expected an int in [1, min({MAX_TOP_K}, E = {E})], "
                         f"got {k!r}")
    if weights_dtype is not None and weights_dtype not in FLOAT_DTYPES:
        raise ValueError(f"topk_route: weights_dtype: expected one of float32, float16, "
                         f"bfloat16, float64 or None, got {weights_dtype}")
    probs = torch.softmax(router_logits.to(_compute_dtype(router_logits.dtype)), dim=-1)
    # stable descending sort: equal probabilities keep their index order (lower first)
    experts = torch.sort(probs.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    weights = probs.gather(1, experts)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(weights_dtype or router_logits.dtype), experts


def load_balancing_loss(router_logits: torch.Tensor, experts: torch.Tensor,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """E·Σ_e f_e·P_e for one MoE layer (the math, its value at balance, 1.0, and how it
    relates to transformers' pooled ``load_balancing_loss_func``: the module docstring).

    Args:
        router_logits: [N, E] (gets gradients, through P_e).
        experts: [N, K] integer, the experts each token was routed to (``topk_route``'s).
        mask: None, or N elements (bool or numeric, nonzero = the token counts).

    Returns:
        0-d float32 (float64 for float64 logits). No host sync on a GPU.
    """
    _check_logits("load_balancing_loss", router_logits)
    _check_experts("load_balancing_loss", experts, router_logits)
    keep = _kept("load_balancing_loss", mask, router_logits)
    N, E = router_logits.shape
    K = experts.shape[1]
    cdt = _compute_dtype(router_logits.dtype)
    logits = _masked(router_logits.to(cdt), keep)
    probs = torch.softmax(logits, dim=-1)
    ids = experts.reshape(-1).long()
    if keep is None:
        tokens = torch.full((), float(N), dtype=cdt, device=probs.device)
        prob_sum = probs.sum(0)
        slot_keep = torch.ones_like(ids)
    else:
        tokens = keep.sum().to(cdt)
        prob_sum = torch.where(keep[:, None], probs, 0.0).sum(0)
        slot_keep = keep[:, None].expand(N, K).reshape(-1).long()
    # integer counts: exact and order-independent, so deterministic on every device
    counts = torch.zeros(E, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, slot_keep)
    tokens = torch.where(tokens > 0, tokens, torch.ones_like(tokens))   # all masked: 0, not 0/0
    f = counts.to(cdt) / (K * tokens)
    P = prob_sum / tokens
    return E * (f * P).sum()


def router_z_loss(router_logits: torch.Tensor, mask: Optional[torch.Tensor] = None
                  ) -> torch.Tensor:
    """The ST-MoE router z-loss: mean over (kept) tokens of logsumexp(router_logits[n])².

    Args:
        router_logits: [N, E] (gets gradients). mask: None, or N elements (nonzero = kept).

    Returns:
        0-d float32 (float64 for float64 logits); 0 when no token is kept. No host sync.
    """
    _check_logits("router_z_loss", router_logits)
    keep = _kept("router_z_loss", mask, router_logits)
    cdt = _compute_dtype(router_logits.dtype)
    z2 = torch.logsumexp(_masked(router_logits.to(cdt), keep), dim=-1).square()
    if keep is None:
        return z2.sum() / max(router_logits.shape[0], 1)
    tokens = keep.sum().to(cdt)
    return torch.where(keep, z2, 0.0).sum() / torch.where(tokens > 0, tokens, 1.0)
