"""ppo_loss's shared pieces: the argument tuples, the columns of the per-row sums, the
float64 reference (the test oracle and the benchmarks' "eager" row), and the scalars finished
from the row sums. The math: the package docstring (kernelrl/ops/ppo_loss/__init__.py)."""

from __future__ import annotations

import math
from collections import namedtuple

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
             "seq-mean-token-sum-norm")
# Columns of the per-row partial sums, in this order.
COLUMNS = ("count", "pg_loss", "clipfrac", "approx_kl", "ratio_mean", "vf_loss",
           "vf_clipfrac", "entropy", "kl_loss", "tis_weight_mean", "tis_clipfrac")
NCOLS = len(COLUMNS)

#: The checked scalar arguments (lo, hi = 1 − clip_eps, 1 + clip_eps_high); dual_clip and
#: tis_cap are inf when not given, which makes them no-ops.
PPOConfig = namedtuple("PPOConfig", "lo hi dual_clip value_clip vf_coef entropy_coef "
                                    "kl_loss_coef tis_cap agg norm_length")
#: The tensors, [B, T] each (advantages [B, T] or [B]); None where not given.
PPOInputs = namedtuple("PPOInputs", "logprobs old_logprobs advantages mask values old_values "
                                    "returns entropy ref_logprobs rollout_logprobs",
                       defaults=(None,) * 6)


# ---------------------------------------------------------------------------------------
# reference (the test oracle, and the "eager" benchmark row): the formula, autograd
# ---------------------------------------------------------------------------------------

def _safe(n: torch.Tensor) -> torch.Tensor:
    """A denominator that is 1 where no token counted (the numerator is then 0)."""
    return torch.where(n == 0, torch.ones_like(n), n)


def ppo_loss_reference(logprobs, old_logprobs, advantages, mask, *, clip_eps=0.2,
                       clip_eps_high=None, dual_clip=None, values=None, old_values=None,
                       returns=None, value_clip=0.2, vf_coef=0.1, entropy=None,
                       entropy_coef=0.0, ref_logprobs=None, kl_loss_coef=0.0,
                       agg="token-mean", norm_length=None, rollout_logprobs=None,
                       tis_cap=None):
    """:func:`ppo_loss` in plain torch, term by term, with autograd. Computes in float32,
    or float64 when ``logprobs`` is float64. Arguments are not checked."""
    acc = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    real = mask != 0
    m = torch.where(real, mask.to(acc), 0.0)
    B, T = logprobs.shape
    n_b = m.sum(1)
    n = n_b.sum()

    def keep(x):        # padding is never read: a NaN there must not leak through m·x
        return torch.where(real, x.to(acc), 0.0)

    def token_mean(x):
        return (m * keep(x)).sum() / _safe(n)

    def aggregate(x):
        s_b = (m * keep(x)).sum(1)
        if agg == "token-mean":
            return s_b.sum() / _safe(n)
        if agg == "seq-mean-token-mean":
            return (s_b / _safe(n_b)).sum() / max(B, 1)
        if agg == "seq-mean-token-sum":
            return s_b.sum() / max(B, 1)
        return s_b.sum() / (max(B, 1) * (norm_length or T or 1))

    lp, old = logprobs.to(acc), old_logprobs.detach().to(acc)
    adv = advantages.detach().to(acc)
    adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv
    ratio = torch.exp(lp - old)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + eps_high)
    pg = torch.maximum(pg1, pg2)
    stats = {"clipfrac": token_mean((pg2 > pg1).to(acc)),
             "approx_kl": 0.5 * token_mean((lp - old).detach() ** 2),
             "ratio_mean": token_mean(ratio.detach())}
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -dual_clip * adv), pg)
    if rollout_logprobs is not None:
        w = torch.exp(old - rollout_logprobs.detach().to(acc))
        stats["tis_clipfrac"] = token_mean((w > (tis_cap or math.inf)).to(acc))
        w = w if tis_cap is None else w.clamp(max=tis_cap)
        stats["tis_weight_mean"] = token_mean(w)
        pg = pg * w
    stats["pg_loss"] = aggregate(pg)
    loss = stats["pg_loss"]
    if values is not None:
        v, v_old, ret = values.to(acc), old_values.detach().to(acc), returns.detach().to(acc)
        vf1 = (v - ret) ** 2
        vf2 = (torch.maximum(torch.minimum(v, v_old + value_clip), v_old - value_clip) - ret) ** 2
        stats["vf_loss"] = token_mean(0.5 * torch.maximum(vf1, vf2))
        stats["vf_clipfrac"] = token_mean((vf2 > vf1).to(acc))
        loss = loss + vf_coef * stats["vf_loss"]
    if entropy is not None:
        stats["entropy"] = aggregate(entropy)
        loss = loss - entropy_coef * stats["entropy"]
    if ref_logprobs is not None:
        k = lp - ref_logprobs.detach().to(acc)
        stats["kl_loss"] = aggregate(torch.exp(-k) - 1 + k)
        loss = loss + kl_loss_coef * stats["kl_loss"]
    return loss, {key: s.detach() for key, s in stats.items()}



# ---------------------------------------------------------------------------------------
# the scalars from the row sums (a few ops on [B, NCOLS], shared by the backends)
# ---------------------------------------------------------------------------------------

def _row_scale(cfg: PPOConfig, B: int, T) -> float:
    """ω_b of the token-sum modes: 1/B, or 1/(B·norm_length) for seq-mean-token-sum-norm
    (``norm_length`` is already resolved to T when not given)."""
    return 1.0 / (max(B, 1) * (cfg.norm_length if cfg.agg == "seq-mean-token-sum-norm"
                               else 1.0))


def _finish(rows: torch.Tensor, cfg: PPOConfig, present: tuple, dtype: torch.dtype):
    """float64 row sums [B, NCOLS] -> (loss [], stats [NCOLS] (entry j: COLUMNS[j]), ω [B],
    vf_scale [] = vf_coef / Σ m) in ``dtype``; ``present``: values, entropy, ref_logprobs
    given. Float64 is free at this size and adds no rounding; no host sync or tensor."""
    B = rows.shape[0]
    totals = rows.sum(0)
    inv_n = 1.0 / _safe(totals[0])
    if cfg.agg == "token-mean":
        omega = inv_n.expand(B)
    elif cfg.agg == "seq-mean-token-mean":
        omega = 1.0 / (_safe(rows[:, 0]) * max(B, 1))
    else:
        omega = torch.full((B,), _row_scale(cfg, B, None), dtype=torch.float64,
                           device=rows.device)
    means, aggregated = totals * inv_n, omega @ rows
    # columns 1, 7, 8 (pg_loss, entropy, kl_loss) are aggregated, the others token means
    stats = torch.cat([means[:1], aggregated[1:2], means[2:7], aggregated[7:9], means[9:]])
    loss = stats[1]
    for column, coef, given in zip((5, 7, 8), (cfg.vf_coef, -cfg.entropy_coef,
                                               cfg.kl_loss_coef), present):
        if given and coef != 0:
            loss = loss + coef * stats[column]
    return (loss.to(dtype), stats.to(dtype), omega.to(dtype), (inv_n * cfg.vf_coef).to(dtype))


