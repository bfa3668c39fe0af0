"""ppo_loss in Triton: a forward pass over [B, ⌈T/BLOCK_T⌉] programs writing float64 partial
sums, a one-program finish kernel for the scalars, and one elementwise backward pass;
fp32 math, nothing saved between the passes."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernelrl import backend as _backend
from kernelrl.ops._triton_utils import downcast, exp_fp64
from kernelrl.ops.ppo_loss.common import (AGG_MODES, NCOLS, PPOConfig, PPOInputs, _finish,
                                          _row_scale)

_FINISH_ROWS = 64     # rows per step of the one-program finish kernel

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

