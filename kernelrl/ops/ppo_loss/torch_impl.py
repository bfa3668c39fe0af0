"""ppo_loss on plain torch: fewer temporaries than the formula, and the gradient
coefficients of the backward computed while the forward has every term at hand (the
backward is one multiply). Used on every device; the CPU default when no faster backend is
built."""

from __future__ import annotations

import math

import torch

from kernelrl.ops.ppo_loss.common import NCOLS, PPOConfig, PPOInputs, _finish

# ---------------------------------------------------------------------------------------
# torch backend: fewer temporaries than the formula, and the gradient coefficients of the
# backward computed while the forward has every term at hand (backward: one multiply)
# ---------------------------------------------------------------------------------------

def _torch_fwd(x: PPOInputs, cfg: PPOConfig, need_grads: bool, present: tuple, dtype):
    """-> (loss, stats, ω, vf_scale) as :func:`_finish` gives them from the float64 row sums
    [B, NCOLS], then the tensors saved for :func:`_torch_bwd`. On a CPU,
    rows of ~2^17 tokens at a time, so that the ~40 elementwise passes run in cache (PPO
    fwd+bwd at B=256, T=2048 on one thread: 12 ms so, 20 ms on whole tensors; 2^16: 15,
    2^18: 13). One chunk on a GPU, or when compiled (the passes are fused then)."""
    B, T = x.logprobs.shape
    step = max(1, (1 << 17) // max(T, 1))
    if x.logprobs.device.type != "cpu" or torch.compiler.is_compiling() or step >= B:
        rows, saved = _torch_rows(x, cfg, need_grads)
    else:
        parts = [_torch_rows(PPOInputs(*(None if t is None else t[i:i + step] for t in x)),
                             cfg, need_grads) for i in range(0, B, step)]
        saved = tuple(None if s[0] is None else torch.cat(s) for s in zip(*(p[1] for p in parts)))
        rows = torch.cat([p[0] for p in parts])
    return (*_finish(rows, cfg, present, dtype), saved)


def _torch_rows(x: PPOInputs, cfg: PPOConfig, need_grads: bool):
    """:func:`_torch_fwd` on one chunk of rows. A select (where, masked_fill) costs ~10
    arithmetic passes on a CPU, so padding is zeroed by an AND with all-ones words (exact;
    NaN kept on real tokens) and branches are max/min."""
    acc = torch.float64 if x.logprobs.dtype == torch.float64 else torch.float32
    B, T = x.logprobs.shape
    real = x.mask if x.mask.dtype == torch.bool else x.mask != 0
    bits = torch.int64 if acc == torch.float64 else torch.int32
    ones = real.to(bits).neg_()                        # all bits set on real tokens, else 0

    def keep(t):          # t on real tokens, +0.0 on padding (whatever t holds there)
        t = t[:, None].expand(B, T) if t.dim() == 1 else t
        return (t.to(acc).view(bits) & ones).view(acc)

    weighted = x.mask.dtype != torch.bool
    m = keep(x.mask) if weighted else None

    def row_sum(t):       # S_b(t) = Σ_t m·t, t = 0 on padding (the same sum for any mask)
        return (t * m if weighted else t).sum(1, dtype=acc)

    rows = torch.zeros(B, NCOLS, dtype=torch.float64, device=x.logprobs.device)
    rows[:, 0] = m.sum(1, dtype=torch.float64) if weighted else real.sum(1, dtype=torch.float64)
    lp, old, neg_adv = keep(x.logprobs), keep(x.old_logprobs), keep(x.advantages).neg_()
    d = lp - old
    rows[:, 3] = row_sum(d * d).mul_(0.5)
    ratio = d.exp_()                                   # 1 on padding (d = 0 there)
    rows[:, 4] = row_sum(ratio if weighted else keep(ratio))     # m = 0 on padding
    l2 = ratio.clamp(cfg.lo, cfg.hi).mul_(neg_adv)     # −A·clip(r)
    l1 = ratio.mul_(neg_adv)                           # −A·r, also ∂l/∂logprobs
    rows[:, 2] = row_sum(l2 > l1)
    pg = torch.maximum(l1, l2)                         # NaN-propagating
    if not math.isinf(cfg.dual_clip):   # min(l, −c·A) for A < 0 is min(l, c·|A|) for any A:
        pg = torch.minimum(pg, neg_adv.abs_().mul_(cfg.dual_clip))  # l ≤ 0 ≤ c·|A| if A ≥ 0
    # ∂l/∂logprobs = −A·r where l took the r branch; times 0 elsewhere keeps a NaN
    grad_lp = l1.mul_(pg == l1) if need_grads else None
    if x.rollout_logprobs is not None:
        w = keep((old - keep(x.rollout_logprobs)).exp_())
        rows[:, 10] = row_sum(w > cfg.tis_cap)
        w = w.clamp_(max=cfg.tis_cap)
        rows[:, 9] = row_sum(w)
        pg.mul_(w)
        if need_grads:
            grad_lp.mul_(w)
    rows[:, 1] = row_sum(pg)
    if x.ref_logprobs is not None:
        # exp(−k) − 1 + k cancels to k²/2 near k = 0, where float32 keeps no digit of it
        # (|k| ~ 1e-3 is the usual distance to the reference); float64 keeps 12 of them
        k = lp.sub_(keep(x.ref_logprobs)).double()
        em1 = torch.expm1(k.neg())
        rows[:, 8] = row_sum(em1 + k)
        if need_grads and cfg.kl_loss_coef != 0:       # + c·(1 − exp(−k)) = − c·expm1(−k)
            grad_lp.sub_(em1.to(acc), alpha=cfg.kl_loss_coef)
    grad_v = None
    if x.values is not None:
        v, ret, v_old = keep(x.values), keep(x.returns), keep(x.old_values)
        err = v - ret
        err_clip = v.clamp_(v_old - cfg.value_clip, v_old.add_(cfg.value_clip)).sub_(ret)
        vf1, vf2 = err * err, err_clip.mul_(err_clip)
        rows[:, 6] = row_sum(vf2 > vf1)
        rows[:, 5] = row_sum(torch.maximum(vf1, vf2)).mul_(0.5)
        grad_v = err.mul_(vf2 <= vf1) if need_grads else None      # NaN kept
    if x.entropy is not None:
        rows[:, 7] = row_sum(keep(x.entropy))
    if weighted and need_grads:
        grad_lp.mul_(m)
        if grad_v is not None:
            grad_v.mul_(m)
    return rows, (grad_lp, grad_v, m if weighted else real)


def _torch_bwd(x, saved, cfg, grad_loss, omega, vf_scale, needs):
    """(∂/∂logprobs, ∂/∂values, ∂/∂entropy) of ``grad_loss · loss`` (None where not needed)."""
    grad_lp, grad_v, m = saved
    scale = (omega * grad_loss).unsqueeze(1)
    g_lp = (grad_lp * scale).to(x.logprobs.dtype) if needs[0] else None
    g_v = (grad_v * (vf_scale * grad_loss)).to(x.values.dtype) if needs[1] else None
    g_ent = (m * (scale * -cfg.entropy_coef)).to(x.entropy.dtype) if needs[2] else None
    return g_lp, g_v, g_ent


