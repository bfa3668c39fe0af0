"""The PPO / GRPO / DAPO loss over per-token log-probs, forward and backward fused.

Shapes (the package legend): B batch (sequences), T time (tokens per sequence). Every
per-token input is [B, T]; ``advantages`` may be [B] (one per sequence, as GRPO gives),
broadcast over the row. m is the mask (bool, integer or float: the token's weight, 0 on
padding).

Per token (d = logprobs − old_logprobs, A the advantage, ε_l, ε_h = clip_eps, clip_eps_high):

    r     = exp(d)
    l_pg  = max(−A·r, −A·clip(r, 1 − ε_l, 1 + ε_h))      PPO (Schulman et al. 2017, Eq. 7);
                                                         ε_h > ε_l: DAPO's clip-higher
    l_pg  = min(l_pg, −c·A) where A < 0                  dual clip c (Ye et al. 2020)
    l_pg  = w·l_pg, w = min(exp(old_logprobs − rollout_logprobs), C), detached: truncated
            importance sampling (Yao et al. 2025) for rollouts from another engine
    l_vf  = ½·max((V − R)², (clip(V, V_old ± ε_v) − R)²)  L^VF of PPO's Eq. 9, clipped
    l_kl  = exp(−k) − 1 + k, k = logprobs − ref_logprobs  the k3 estimator (GRPO, Shao et
                                                         al. 2024, Eq. 4)
    loss  = agg(l_pg) − entropy_coef·agg(entropy) + kl_loss_coef·agg(l_kl)
            + vf_coef·Σ m·l_vf / Σ m                     (the value term: a token mean)

agg, with n_b = Σ_t m and S_b(x) = Σ_t m·x per row (every row counts in B; a row or a
batch without real tokens adds 0, never 0/0):

    token-mean               Σ_b S_b / Σ_b n_b           PPO, DAPO (Yu et al. 2025)
    seq-mean-token-mean      (1/B)·Σ_b S_b / n_b         GRPO (Shao et al. 2024, Eq. 3)
    seq-mean-token-sum       (1/B)·Σ_b S_b
    seq-mean-token-sum-norm  Σ_b S_b / (B·L), L = norm_length (default T): Dr. GRPO

So agg(x) = Σ_b ω_b·S_b(x) with row weights ω_b, and the gradients are elementwise:

    ∂loss/∂logprobs = ω_b·m·(w·1[unclipped]·(−A·r) + kl_loss_coef·(1 − exp(−k)))
    ∂loss/∂entropy  = −entropy_coef·ω_b·m
    ∂loss/∂values   = vf_coef·m/Σm·1[unclipped]·(V − R)

("unclipped": the max/min kept the branch through r or V; a tie inside the clip range
counts as unclipped, as autograd through max and clamp has it). Only logprobs, values
and entropy get gradients. Padding is never read into a result: NaN or inf there does not
leak (as it would through m·x). NaN on a real token propagates to the loss, to the stats
it enters and to that token's gradient.

``stats`` (0-d tensors, no host sync): clipfrac (the clipped branch strictly larger),
approx_kl = ½·mean(d²), ratio_mean, vf_loss (before vf_coef), vf_clipfrac,
tis_weight_mean (after truncation), tis_clipfrac (fraction truncated): means over real
tokens; pg_loss, entropy, kl_loss: aggregated by ``agg``. So loss = pg_loss
− entropy_coef·entropy + kl_loss_coef·kl_loss + vf_coef·vf_loss.

Passes: the forward writes per-(row, tile) float64 sums [B, P, 11] (n_b and S_b of every
term); a few torch ops on [B, 11] finish the scalars and ω [B]; the backward is one
elementwise pass writing every gradient. Bytes moved, for k ≤ 10 [B, T] inputs of b
bytes: forward k·B·T·b read; backward the same plus B·T·b written per gradient.

Implementations (chosen per call, see kernelrl.backend):
    torch    plain torch, fp32 (fp64 for fp64 logprobs); the forward keeps the gradient
             coefficients, the backward scales them (the CPU default)
    triton   the two passes over [B, ⌈T/BLOCK_T⌉] programs, fp32 math, nothing saved
The oracle is ``ppo_loss_reference``: the formulas above, autograd, float64-capable.
"""

from __future__ import annotations

import math
from collections import namedtuple

import torch
import triton
import triton.language as tl

from kernelrl import backend as _backend
from kernelrl.ops._autograd import first_order_only
from kernelrl.ops._checks import (FLOAT_DTYPES, KERNEL_DTYPES, check_choice,
                                  check_same_device, check_tensor)
from kernelrl.ops._triton_utils import downcast, exp_fp64

__all__ = ["ppo_loss", "ppo_loss_reference", "AGG_MODES", "PPOLossFunction"]

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


# ---------------------------------------------------------------------------------------
# Triton: launch configuration (named so that a tuner can replace it; no device queries)
# ---------------------------------------------------------------------------------------

def _launch_config(T: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps). On a GPU a program takes 1024 tokens of a row (10 inputs of
    4 KiB each in flight); the interpreter pays per program, so it takes whole rows."""
    cap = 16384 if _backend.triton_interpret() else 1024
    block = min(triton.next_power_of_2(max(T, 16)), cap)
    return block, (4 if block <= 512 else 8)


@triton.jit
def _k3(k):
    """exp(−k) − 1 + k without the cancellation near 0: its Taylor series to k^16 for
    |k| < 2 (truncation < 1e-9 relative), where the formula would lose up to all digits
    of k²/2; the formula beyond, where the value is > 1 and it loses none."""
    s = tl.zeros(k.shape, tl.float32)
    c = 1.0 / 20922789888000.0                 # 1/16!
    for n in tl.static_range(16, 2, -1):       # Horner: s = 1/3! − k/4! + ... + k^13/16!
        s = c - k * s
        c = c * n                              # 1/(n−1)!
    s = 0.5 - k * s
    return tl.where(tl.abs(k) < 2.0, k * k * s, exp_fp64(-k) - 1.0 + k)


@triton.jit
def _token_terms(lp_ptr, old_ptr, adv_ptr, mask_ptr, val_ptr, oldval_ptr, ret_ptr, ent_ptr,
                 ref_ptr, roll_ptr, row, offs, lane,
                 lo, hi, dual_clip, value_clip, tis_cap,
                 ADV_PER_ROW: tl.constexpr, HAS_VALUES: tl.constexpr,
                 HAS_ENTROPY: tl.constexpr, HAS_REF: tl.constexpr, HAS_TIS: tl.constexpr):
    """Every per-token term of one tile, fp32, for the forward and the backward alike.
    ``real`` excludes padding and lanes past T; the caller multiplies by m where real and
    selects 0 elsewhere, so that nothing read on padding reaches a sum or a gradient."""
    m = tl.load(mask_ptr + offs, mask=lane, other=0).to(tl.float32)
    real = lane & (m != 0)
    lp = tl.load(lp_ptr + offs, mask=lane, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=lane, other=0.0).to(tl.float32)
    if ADV_PER_ROW:
        a = tl.load(adv_ptr + row).to(tl.float32) + tl.zeros(lp.shape, tl.float32)   # a tile
    else:
        a = tl.load(adv_ptr + offs, mask=lane, other=0.0).to(tl.float32)
    # -- policy: max(−A·r, −A·clip(r)), then the dual clip; "<"/">" are false on NaN,
    #    so a NaN ratio or advantage stays in l (and in its gradient)
    d = lp - old
    r = exp_fp64(d)
    l1 = -a * r
    l2 = -a * tl.where(r < lo, lo, tl.where(r > hi, hi, r))
    clipped = l2 > l1
    pg = tl.where(clipped, l2, l1)
    cap = -dual_clip * a                                   # +inf without a dual clip
    capped = (a < 0) & (pg > cap)
    pg = tl.where(capped, cap, pg)
    g_pg = tl.where(clipped | capped, 0.0, l1)             # ∂l/∂logprobs = −A·r unclipped
    # -- the optional terms, 0 (w: 1) when their inputs are absent
    zero = tl.zeros(d.shape, tl.float32)
    w, k3, g_kl, vf, g_v, ent = zero + 1.0, zero, zero, zero, zero, zero
    truncated, vclipped = zero != 0, zero != 0
    # -- truncated importance weight (detached): w = min(exp(old − rollout), C)
    if HAS_TIS:
        roll = tl.load(roll_ptr + offs, mask=lane, other=0.0).to(tl.float32)
        w = exp_fp64(old - roll)
        truncated = w > tis_cap
        w = tl.where(truncated, tis_cap, w)
    # -- k3 KL to the reference, and its gradient 1 − exp(−k)
    if HAS_REF:
        k = lp - tl.load(ref_ptr + offs, mask=lane, other=0.0).to(tl.float32)
        k3 = _k3(k)
        g_kl = (1.0 - tl.exp(-k.to(tl.float64))).to(tl.float32)
    # -- value: ½·max((V − R)², (clip(V, V_old ± ε_v) − R)²), exactly V inside the range
    if HAS_VALUES:
        v = tl.load(val_ptr + offs, mask=lane, other=0.0).to(tl.float32)
        v_old = tl.load(oldval_ptr + offs, mask=lane, other=0.0).to(tl.float32)
        ret = tl.load(ret_ptr + offs, mask=lane, other=0.0).to(tl.float32)
        v_lo, v_hi = v_old - value_clip, v_old + value_clip
        err = v - ret
        err_clip = tl.where(v < v_lo, v_lo, tl.where(v > v_hi, v_hi, v)) - ret
        vf1, vf2 = err * err, err_clip * err_clip
        vclipped = vf2 > vf1
        vf = 0.5 * tl.where(vclipped, vf2, vf1)
        g_v = tl.where(vclipped, 0.0, err)
    if HAS_ENTROPY:
        ent = tl.load(ent_ptr + offs, mask=lane, other=0.0).to(tl.float32)
    return (m, real, d, r, pg, clipped, g_pg, w, truncated, k3, g_kl, vf, vclipped, g_v, ent)


@triton.jit
def _masked_sum(real, m, x):
    """Σ m·x over the real tokens of a tile (0 elsewhere, whatever x holds there), summed
    in float64: the reductions then add no error of their own to the fp32 terms."""
    return tl.sum(tl.where(real, m * x, 0.0).to(tl.float64), axis=0)


@triton.jit
def _ppo_fwd_kernel(
    lp_ptr, old_ptr,       # [B, T] logprobs, old_logprobs
    adv_ptr,               # [B, T], or [B] if ADV_PER_ROW
    mask_ptr,              # [B, T] any dtype (bool viewed as uint8)
    val_ptr, oldval_ptr, ret_ptr, ent_ptr, ref_ptr, roll_ptr,   # [B, T] (if HAS_VALUES,
                           # HAS_ENTROPY, HAS_REF, HAS_TIS; else any pointer, never read)
    part_ptr,              # [B, P, NCOLS] fp64, out: the tile's masked sums
    T, P,
    lo, hi, dual_clip, value_clip, tis_cap,
    NCOLS: tl.constexpr, BLOCK_T: tl.constexpr, ADV_PER_ROW: tl.constexpr,
    HAS_VALUES: tl.constexpr, HAS_ENTROPY: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_TIS: tl.constexpr,
):
    # -- program (row, tile) -> offsets; the inputs are contiguous [B, T]
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    lane = t < T
    offs = row * T + t
    # -- every term (fp32), then its masked sum over the tile (fp64)
    m, real, d, r, pg, clipped, g_pg, w, truncated, k3, g_kl, vf, vclipped, g_v, ent = \
        _token_terms(lp_ptr, old_ptr, adv_ptr, mask_ptr, val_ptr, oldval_ptr, ret_ptr,
                     ent_ptr, ref_ptr, roll_ptr, row, offs, lane, lo, hi, dual_clip,
                     value_clip, tis_cap, ADV_PER_ROW, HAS_VALUES, HAS_ENTROPY, HAS_REF,
                     HAS_TIS)
    one = tl.full(d.shape, 1.0, tl.float32)
    out = part_ptr + (row * P + tile) * NCOLS
    tl.store(out + 0, _masked_sum(real, m, one))
    tl.store(out + 1, _masked_sum(real, m, pg * w))
    tl.store(out + 2, _masked_sum(real, m, clipped.to(tl.float32)))
    tl.store(out + 3, 0.5 * _masked_sum(real, m, d * d))
    tl.store(out + 4, _masked_sum(real, m, r))
    tl.store(out + 5, _masked_sum(real, m, vf))
    tl.store(out + 6, _masked_sum(real, m, vclipped.to(tl.float32)))
    tl.store(out + 7, _masked_sum(real, m, ent))
    tl.store(out + 8, _masked_sum(real, m, k3))
    tl.store(out + 9, _masked_sum(real, m, w))
    tl.store(out + 10, _masked_sum(real, m, truncated.to(tl.float32)))


@triton.jit
def _ppo_finish_kernel(
    part_ptr,              # [B, P, NCOLS] fp64: the forward's masked sums per (row, tile)
    loss_ptr,              # [] out dtype, out
    stats_ptr,             # [NCOLS] out dtype, out (entry j: COLUMNS[j])
    omega_ptr,             # [B] out dtype, out: the row weights ω_b
    vf_scale_ptr,          # [] out dtype, out: vf_coef / Σ m
    B, P,
    row_scale,             # 1/(B·L) for the token-sum modes (L = 1 or norm_length)
    vf_coef, entropy_coef, kl_loss_coef,     # 0 for a term that is absent
    NCOLS: tl.constexpr, COLS: tl.constexpr, BLOCK_B: tl.constexpr, AGG: tl.constexpr,
):
    """One program: the scalars of ``_finish`` from the partial sums, in float64, so that
    the forward is two launches and no torch op on the host (AGG: index in AGG_MODES)."""
    cols = tl.arange(0, COLS)
    col_ok = cols < NCOLS
    # -- pass 1: totals over rows and tiles, then 1/Σm (1 when no token counts)
    totals = tl.zeros([COLS], tl.float64)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        ok = (rows < B)[:, None] & col_ok[None, :]
        for p in range(0, P):
            x = tl.load(part_ptr + (rows[:, None] * P + p) * NCOLS + cols[None, :], mask=ok,
                        other=0.0)
            totals += tl.sum(x, axis=0)
    n = tl.sum(tl.where(cols == 0, totals, 0.0), axis=0)
    inv_n = 1.0 / tl.where(n == 0, 1.0, n)
    # -- pass 2: ω_b per row, and Σ_b ω_b·S_b
    aggregated = tl.zeros([COLS], tl.float64)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        ok = row_ok[:, None] & col_ok[None, :]
        s = tl.zeros([BLOCK_B, COLS], tl.float64)
        for p in range(0, P):
            s += tl.load(part_ptr + (rows[:, None] * P + p) * NCOLS + cols[None, :], mask=ok,
                         other=0.0)
        if AGG == 0:
            omega = inv_n + tl.zeros([BLOCK_B], tl.float64)
        elif AGG == 1:
            n_b = tl.sum(tl.where(cols[None, :] == 0, s, 0.0), axis=1)
            omega = 1.0 / (tl.where(n_b == 0, 1.0, n_b) * B)
        else:
            omega = row_scale + tl.zeros([BLOCK_B], tl.float64)
        aggregated += tl.sum(omega[:, None] * s, axis=0)
        tl.store(omega_ptr + rows, omega.to(omega_ptr.dtype.element_ty), mask=row_ok)
    # -- pg_loss, entropy and kl_loss aggregated by agg; the others token means
    by_agg = (cols == 1) | (cols == 7) | (cols == 8)
    stats = tl.where(by_agg, aggregated, totals * inv_n)
    tl.store(stats_ptr + cols, stats.to(stats_ptr.dtype.element_ty), mask=col_ok)
    coef = tl.where(cols == 1, 1.0, tl.where(cols == 5, vf_coef, tl.where(
        cols == 7, -entropy_coef, tl.where(cols == 8, kl_loss_coef, 0.0))))
    loss = tl.sum(tl.where(coef != 0, coef * stats, 0.0), axis=0)
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))
    tl.store(vf_scale_ptr, (inv_n * vf_coef).to(vf_scale_ptr.dtype.element_ty))


@triton.jit
def _ppo_bwd_kernel(
    lp_ptr, old_ptr, adv_ptr, mask_ptr, val_ptr, oldval_ptr, ret_ptr, ent_ptr, ref_ptr,
    roll_ptr,              # as in _ppo_fwd_kernel
    grad_loss_ptr,         # [] fp32: the upstream gradient
    omega_ptr,             # [B] fp32 row weights ω_b (stride omega_stride: 0 for token-mean)
    vf_scale_ptr,          # [] fp32: vf_coef / Σ m
    g_lp_ptr,              # [B, T] logprobs dtype, out
    g_val_ptr,             # [B, T] values dtype, out (if GRAD_VALUES)
    g_ent_ptr,             # [B, T] entropy dtype, out (if GRAD_ENTROPY)
    T, omega_stride,
    lo, hi, dual_clip, value_clip, tis_cap, entropy_coef, kl_loss_coef,
    BLOCK_T: tl.constexpr, ADV_PER_ROW: tl.constexpr, HAS_VALUES: tl.constexpr,
    HAS_ENTROPY: tl.constexpr, HAS_REF: tl.constexpr, HAS_TIS: tl.constexpr,
    GRAD_LOGPROBS: tl.constexpr, GRAD_VALUES: tl.constexpr, GRAD_ENTROPY: tl.constexpr,
):
    # -- program (row, tile) -> offsets, and the row's scalar weights
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    lane = t < T
    offs = row * T + t
    g = tl.load(grad_loss_ptr).to(tl.float32)
    g_row = g * tl.load(omega_ptr + row * omega_stride).to(tl.float32)
    # -- the terms (those not needed here are dead code to the compiler)
    m, real, d, r, pg, clipped, g_pg, w, truncated, k3, g_kl, vf, vclipped, g_v, ent = \
        _token_terms(lp_ptr, old_ptr, adv_ptr, mask_ptr, val_ptr, oldval_ptr, ret_ptr,
                     ent_ptr, ref_ptr, roll_ptr, row, offs, lane, lo, hi, dual_clip,
                     value_clip, tis_cap, ADV_PER_ROW, HAS_VALUES, HAS_ENTROPY, HAS_REF,
                     HAS_TIS)
    # -- gradients: 0 on padding, whatever the inputs hold there
    if GRAD_LOGPROBS:
        grad = tl.where(real, (g_row * m) * (w * g_pg + kl_loss_coef * g_kl), 0.0)
        tl.store(g_lp_ptr + offs, downcast(grad, g_lp_ptr.dtype.element_ty), mask=lane)
    if GRAD_VALUES:
        vf_scale = g * tl.load(vf_scale_ptr).to(tl.float32)
        grad = tl.where(real, (vf_scale * m) * g_v, 0.0)
        tl.store(g_val_ptr + offs, downcast(grad, g_val_ptr.dtype.element_ty), mask=lane)
    if GRAD_ENTROPY:
        grad = tl.where(real, (-entropy_coef * g_row) * m, 0.0)
        tl.store(g_ent_ptr + offs, downcast(grad, g_ent_ptr.dtype.element_ty), mask=lane)


def _operands(x: PPOInputs):
    """The ten kernel pointers in order (a present tensor stands in for an absent one:
    the kernels never read it), and the flags saying which are present."""
    mask = x.mask.view(torch.uint8) if x.mask.dtype == torch.bool else x.mask
    tensors = (x.logprobs, x.old_logprobs, x.advantages, mask, x.values, x.old_values,
               x.returns, x.entropy, x.ref_logprobs, x.rollout_logprobs)
    flags = dict(ADV_PER_ROW=x.advantages.dim() == 1, HAS_VALUES=x.values is not None,
                 HAS_ENTROPY=x.entropy is not None, HAS_REF=x.ref_logprobs is not None,
                 HAS_TIS=x.rollout_logprobs is not None)
    return tuple(x.logprobs if t is None else t for t in tensors), flags


def _triton_fwd(x: PPOInputs, cfg: PPOConfig, need_grads: bool, present: tuple, dtype):
    B, T = x.logprobs.shape
    device = x.logprobs.device
    block, warps = _launch_config(T)
    P = triton.cdiv(T, block)
    part = torch.empty(B, P, NCOLS, dtype=torch.float64, device=device)
    if B and P:
        ptrs, flags = _operands(x)
        _ppo_fwd_kernel[(B, P)](
            *ptrs, part, T, P, cfg.lo, cfg.hi, cfg.dual_clip, cfg.value_clip, cfg.tis_cap,
            NCOLS=NCOLS, BLOCK_T=block, num_warps=warps, **flags)
    if not (B and P):
        return (*_finish(part.sum(1), cfg, present, dtype), ())
    loss, stats = torch.empty((), dtype=dtype, device=device), torch.empty(NCOLS, dtype=dtype,
                                                                           device=device)
    omega, vf_scale = torch.empty(B, dtype=dtype, device=device), torch.empty((), dtype=dtype,
                                                                              device=device)
    coefs = [c if given else 0.0 for c, given in zip(
        (cfg.vf_coef, cfg.entropy_coef, cfg.kl_loss_coef), present)]
    _ppo_finish_kernel[(1,)](
        part, loss, stats, omega, vf_scale, B, P, _row_scale(cfg, B, T), *coefs,
        NCOLS=NCOLS, COLS=triton.next_power_of_2(NCOLS), BLOCK_B=_FINISH_ROWS,
        AGG=AGG_MODES.index(cfg.agg), num_warps=4)
    return loss, stats, omega, vf_scale, ()


def _triton_bwd(x: PPOInputs, saved, cfg: PPOConfig, grad_loss, omega, vf_scale, needs):
    B, T = x.logprobs.shape
    grads = [torch.empty_like(t) if need else None
             for t, need in zip((x.logprobs, x.values, x.entropy), needs)]
    if B and T:
        block, warps = _launch_config(T)
        ptrs, flags = _operands(x)
        _ppo_bwd_kernel[(B, triton.cdiv(T, block))](
            *ptrs, grad_loss.float().contiguous(), omega, vf_scale,
            *(x.logprobs if g is None else g for g in grads), T, omega.stride(0),
            cfg.lo, cfg.hi, cfg.dual_clip, cfg.value_clip, cfg.tis_cap, cfg.entropy_coef,
            cfg.kl_loss_coef, BLOCK_T=block, GRAD_LOGPROBS=needs[0], GRAD_VALUES=needs[1],
            GRAD_ENTROPY=needs[2], num_warps=warps, **flags)
    return tuple(grads)


# A backend's passes, (fwd, bwd):
#   fwd(inputs, cfg, need_grads, present, out dtype) -> (loss [], stats [NCOLS], ω [B],
#       vf_scale [], tensors to save); present: values, entropy, ref_logprobs given
#   bwd(inputs, saved, cfg, grad_loss [], ω [B], vf_scale [], needs: 3 bools) -> the
#       gradients of grad_loss·loss for (logprobs, values, entropy), None where not needed
_KERNELS = {"torch": (_torch_fwd, _torch_bwd), "triton": (_triton_fwd, _triton_bwd)}


# ---------------------------------------------------------------------------------------
# the scalars from the row sums (a few ops on [B, NCOLS], shared by the backends)
# ---------------------------------------------------------------------------------------

_FINISH_ROWS = 64     # rows per step of the one-program finish kernel


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


class PPOLossFunction(torch.autograd.Function):
    """(cfg, backend, *PPOInputs) -> (loss [], stats [NCOLS]); gradients to logprobs,
    values and entropy. First-order only (the backward is a fused pass)."""

    @staticmethod
    def forward(ctx, cfg, backend, *tensors):
        x = PPOInputs(*tensors)
        needs = (ctx.needs_input_grad[2], ctx.needs_input_grad[6], ctx.needs_input_grad[9])
        present = (x.values is not None, x.entropy is not None, x.ref_logprobs is not None)
        out_dtype = torch.float64 if x.logprobs.dtype == torch.float64 else torch.float32
        loss, stats, omega, vf_scale, saved = _KERNELS[backend][0](x, cfg, any(needs), present,
                                                                   out_dtype)
        ctx.save_for_backward(*tensors, omega, vf_scale, *saved)
        ctx.config = (cfg, backend, len(tensors))
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @first_order_only("ppo_loss")
    def backward(ctx, grad_loss, grad_stats):
        cfg, backend, n = ctx.config
        saved = ctx.saved_tensors
        x, (omega, vf_scale), rest = PPOInputs(*saved[:n]), saved[n:n + 2], saved[n + 2:]
        needs = (ctx.needs_input_grad[2], ctx.needs_input_grad[6], ctx.needs_input_grad[9])
        g_lp, g_v, g_ent = _KERNELS[backend][1](x, rest, cfg, grad_loss, omega, vf_scale,
                                                needs)
        return (None, None, g_lp, None, None, None, g_v, None, None, g_ent, None, None)


# ---------------------------------------------------------------------------------------
# the public op
# ---------------------------------------------------------------------------------------

def _number(name: str, value, low: float = -math.inf, strict: bool = False) -> float:
    """A finite Python number, >= ``low`` (> ``low`` when ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a Python number, got {type(value).__name__}")
    if not (math.isfinite(value) and (value > low if strict else value >= low)):
        bound = "" if low == -math.inf else f" {'>' if strict else '>='} {low:g}"
        raise ValueError(f"{name}: expected a finite number{bound}, got {value}")
    return float(value)


def _check_inputs(x: PPOInputs) -> None:
    check_tensor("logprobs", x.logprobs, dtypes=FLOAT_DTYPES, ndim=2)
    shape = x.logprobs.shape
    for name, t in zip(PPOInputs._fields[1:], x[1:]):
        if t is None:
            continue
        check_tensor(name, t, dtypes=None if name == "mask" else FLOAT_DTYPES)
        if t.dtype.is_complex:
            raise ValueError(f"mask: expected a bool, integer or float dtype, got {t.dtype}")
        check_same_device(name, t, x.logprobs.device)
        allowed = (shape, shape[:1]) if name == "advantages" else (shape,)
        if t.shape not in allowed:
            raise ValueError(f"{name}: expected shape " + " or ".join(
                str(tuple(a)) for a in allowed) + f" (as logprobs), got {tuple(t.shape)}")
    given = {n: getattr(x, n) is not None for n in ("values", "old_values", "returns")}
    if any(given.values()) and not all(given.values()):
        raise ValueError("values, old_values, returns: expected all three or none, got "
                         + ", ".join(f"{n}={'given' if g else 'None'}" for n, g in given.items()))


def _config(x: PPOInputs, clip_eps, clip_eps_high, dual_clip, value_clip, vf_coef,
            entropy_coef, kl_loss_coef, agg, norm_length, tis_cap) -> PPOConfig:
    """The scalar arguments checked (ValueError naming the argument) into a PPOConfig."""
    check_choice("agg", agg, AGG_MODES)
    clip_eps = _number("clip_eps", clip_eps, 0.0)
    high = clip_eps if clip_eps_high is None else _number("clip_eps_high", clip_eps_high, 0.0)
    if tis_cap is not None and x.rollout_logprobs is None:
        raise ValueError("tis_cap: given without rollout_logprobs (the weights it caps)")
    if norm_length is not None and agg != "seq-mean-token-sum-norm":
        raise ValueError(f"norm_length: used only with agg='seq-mean-token-sum-norm', "
                         f"got agg={agg!r}")
    for name, coef, what in (("entropy_coef", entropy_coef, "entropy"),
                             ("kl_loss_coef", kl_loss_coef, "ref_logprobs")):
        if _number(name, coef) != 0 and getattr(x, what) is None:
            raise ValueError(f"{name}: is {coef} but {what} was not given")
    T = x.logprobs.shape[1]
    return PPOConfig(
        lo=1.0 - clip_eps, hi=1.0 + high,
        dual_clip=math.inf if dual_clip is None else _number("dual_clip", dual_clip, 1.0, True),
        value_clip=_number("value_clip", value_clip, 0.0), vf_coef=_number("vf_coef", vf_coef),
        entropy_coef=float(entropy_coef), kl_loss_coef=float(kl_loss_coef),
        tis_cap=math.inf if tis_cap is None else _number("tis_cap", tis_cap, 0.0, True),
        agg=agg, norm_length=(float(T or 1) if norm_length is None
                              else _number("norm_length", norm_length, 0.0, True)))


def ppo_loss(logprobs, old_logprobs, advantages, mask, *, clip_eps=0.2, clip_eps_high=None,
             dual_clip=None, values=None, old_values=None, returns=None, value_clip=0.2,
             vf_coef=0.1, entropy=None, entropy_coef=0.0, ref_logprobs=None, kl_loss_coef=0.0,
             agg="token-mean", norm_length=None, rollout_logprobs=None, tis_cap=None):
    """The clipped PPO policy loss with optional value, entropy and k3 KL terms, forward and
    backward fused (the math: the module docstring).

    Args:
        logprobs: [B, T] float32, float16 or bfloat16 (float64: torch backend) log-probs
            of the sampled tokens under the policy being trained. Gets gradients.
        old_logprobs: [B, T], under the policy that sampled. advantages: [B, T], or [B]
            (one per sequence, GRPO). mask: [B, T] bool, integer or float, 0 on padding,
            else the token's weight.
        clip_eps, clip_eps_high: the ratio is clipped to [1 − clip_eps, 1 + clip_eps_high]
            (clip_eps_high defaults to clip_eps). dual_clip: c > 1 caps a term with A < 0
            at −c·A (None: no cap).
        values, old_values, returns: [B, T], all or none: the value term, a token mean
            times vf_coef, clipped by value_clip. ``values`` gets gradients.
        entropy: [B, T], for − entropy_coef·agg(entropy). Gets gradients.
        ref_logprobs: [B, T], for + kl_loss_coef·agg(k3).
        agg: one of AGG_MODES; norm_length: the constant of "seq-mean-token-sum-norm"
            (default T).
        rollout_logprobs: [B, T] from the rollout engine (vLLM, ...): each policy term is
            weighted by min(exp(old_logprobs − rollout_logprobs), tis_cap), detached
            (tis_cap None: not truncated).

    Returns:
        (loss, stats): loss 0-d float32 (float64 for float64 logprobs); stats a dict of
        detached 0-d tensors, no host sync: clipfrac, approx_kl, ratio_mean, pg_loss, and
        vf_loss, vf_clipfrac, entropy, kl_loss, tis_weight_mean, tis_clipfrac when their
        inputs are given.
    """
    x = PPOInputs(logprobs, old_logprobs, advantages, mask, values, old_values, returns,
                  entropy, ref_logprobs, rollout_logprobs)
    _check_inputs(x)
    cfg = _config(x, clip_eps, clip_eps_high, dual_clip, value_clip, vf_coef, entropy_coef,
                  kl_loss_coef, agg, norm_length, tis_cap)
    backend = _backend.select("ppo_loss", logprobs.device, logprobs.dtype)
    loss, stats = PPOLossFunction.apply(cfg, backend,
                                        *(None if t is None else t.contiguous() for t in x))
    given = {"vf_loss": values, "vf_clipfrac": values, "entropy": entropy,
             "kl_loss": ref_logprobs, "tis_weight_mean": rollout_logprobs,
             "tis_clipfrac": rollout_logprobs}
    values_ = stats.unbind(0)      # one op for all eleven views
    return loss, {name: values_[j] for j, name in enumerate(COLUMNS)
                  if j and given.get(name, logprobs) is not None}


def _examples(device: torch.device, dtype: torch.dtype) -> list:
    """For ``kernelrl tune``, at B = 256, T = 2048: PPO (token advantages, values, entropy,
    KL, dual clip) and GRPO (sequence advantages, KL, seq-mean-token-mean)."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0, grad=False):
        t = torch.randn(*shape, device=device, generator=gen) * scale
        return t.to(dtype).requires_grad_(grad)

    B, T = 256, 2048
    lp, old, mask = rand(B, T, scale=0.1, grad=True), rand(B, T, scale=0.1), rand(B, T) > -0.8
    ppo = dict(values=rand(B, T, grad=True), old_values=rand(B, T), returns=rand(B, T),
               entropy=rand(B, T, grad=True), entropy_coef=0.01,
               ref_logprobs=rand(B, T, scale=0.1), kl_loss_coef=0.05, dual_clip=3.0)
    grpo = dict(ref_logprobs=rand(B, T, scale=0.1), kl_loss_coef=0.04,
                agg="seq-mean-token-mean")
    return [(f"PPO B={B} T={T}", (lp, old, rand(B, T), mask), ppo),
            (f"GRPO B={B} T={T}", (lp, old, rand(B), mask), grpo)]


_backend.register_op(
    "ppo_loss",
    {"triton": _backend.Implementation(KERNEL_DTYPES, _KERNELS["triton"]),
     "torch": _backend.Implementation(FLOAT_DTYPES, _KERNELS["torch"])},
    # CUDA: on an H200 the Triton passes are 2-4x faster than the torch path
    # (benchmarks/results/nvidia-h200-2026-11-30.json), so nothing is skipped.
    examples=_examples, fn=ppo_loss)

_PTRS = {**{f"{n}_ptr": "*{dt}" for n in ("lp", "old", "adv", "val", "oldval", "ret", "ent",
                                           "ref", "roll")}, "mask_ptr": "*u8"}
_SCALARS = {n: "fp32" for n in ("lo", "hi", "dual_clip", "value_clip", "tis_cap")}
_FLAGS = ("ADV_PER_ROW", "HAS_VALUES", "HAS_ENTROPY", "HAS_REF", "HAS_TIS")
_GRADS = ("GRAD_LOGPROBS", "GRAD_VALUES", "GRAD_ENTROPY")
_PPO = dict(zip(_FLAGS + _GRADS, (False, True, True, True, True, True, True, True)))
_GRPO = dict(zip(_FLAGS + _GRADS, (True, False, False, True, False, True, False, False)))
#: Signatures for compiling every Triton kernel here ahead of time (tests/ops).
AOT_SIGNATURES = {
    "_ppo_fwd_kernel": (
        {**_PTRS, "part_ptr": "*fp64", "T": "i32", "P": "i32", **_SCALARS,
         **{n: "constexpr" for n in ("NCOLS", "BLOCK_T") + _FLAGS}},
        [{"NCOLS": NCOLS, "BLOCK_T": block, **{f: v[f] for f in _FLAGS}}
         for block, v in ((1024, _PPO), (256, _GRPO))]),
    "_ppo_bwd_kernel": (
        {**_PTRS, "grad_loss_ptr": "*fp32", "omega_ptr": "*fp32", "vf_scale_ptr": "*fp32",
         "g_lp_ptr": "*{dt}", "g_val_ptr": "*{dt}", "g_ent_ptr": "*{dt}", "T": "i32",
         "omega_stride": "i32", **_SCALARS, "entropy_coef": "fp32", "kl_loss_coef": "fp32",
         **{n: "constexpr" for n in ("BLOCK_T",) + _FLAGS + _GRADS}},
        [{"BLOCK_T": 1024, **_PPO}, {"BLOCK_T": 256, **_GRPO}]),
    "_ppo_finish_kernel": (
        {"part_ptr": "*fp64", "loss_ptr": "*fp32", "stats_ptr": "*fp32", "omega_ptr": "*fp32",
         "vf_scale_ptr": "*fp32", "B": "i32", "P": "i32", "row_scale": "fp64",
         "vf_coef": "fp32", "entropy_coef": "fp32", "kl_loss_coef": "fp32",
         **{n: "constexpr" for n in ("NCOLS", "COLS", "BLOCK_B", "AGG")}},
        [{"NCOLS": NCOLS, "COLS": 16, "BLOCK_B": _FINISH_ROWS, "AGG": agg}
         for agg in range(len(AGG_MODES))]),
}
