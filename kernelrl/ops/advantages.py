"""KL-penalized rewards and GAE advantages for PPO, fused, with batch whitening.

Shapes: B batch (sequences), T time (response tokens per sequence).

Math, per row i with real tokens t < L_i = #{t : mask[i, t] != 0} (right padding: a row's
real tokens are a prefix; a mask with holes is read as that prefix, and ``KERNELRL_DEBUG=1``
raises on one), d = logprobs − ref_logprobs:

    kl[t]      = d  (k1) | d²/2  (k2) | e^(−d) − 1 + d  (k3)     (Schulman, "Approximating
                                                                  KL divergence", 2020)
    rewards[t] = −kl_coef·kl[t]  + clip(score_i) at t = L_i − 1  (Ziegler et al. 2019, eq. 2;
                 clip(s) = min(max(s, −reward_clip), reward_clip))
    δ[t]       = rewards[t] + γ·V[t+1] − V[t]                    (V[L_i] = 0)
    A[t]       = δ[t] + γλ·A[t+1] = Σ_l (γλ)^l δ[t+l]            (A[L_i] = 0; GAE, Schulman
                                                                  et al. 2016, eq. 16)
    returns[t] = A[t] + V[t]                                     (A before whitening, as TRL)
    whiten:    A ← (A − mean)·rsqrt(var + 1e-8) over every real token of the batch, var the
               unbiased variance (TRL's ``masked_whiten`` with ``shift_mean=True``)

The scan runs on the λ-return G[t] = A[t] + V[t] (Sutton & Barto 2018, §12.1):

    G[t] = r[t] + γ(1−λ)·V[t+1] + γλ·G[t+1],   A = G − V,   returns = G + (V − V)

the same linear recurrence without V[t] in it. The δ form cancels V[t] against the running
sum at every token, and when the values telescope a tile-wise sum of δ lost up to 5× the
loop's own fp32 rounding error; the G form never cancels there. (V − V is 0, or NaN where
V[t] is NaN or inf, so that returns is NaN exactly where the loop's A + V is.)

Every output is exactly 0 on padding, where no input is read: a NaN there does not leak. A NaN
on a real token propagates (to A and returns at that token and every earlier one of its row,
and through the whitening mean to the whole batch), never hidden by the clip. The whitening
of a batch with fewer than two real tokens takes var = 0: A − mean is then 0, nothing is
divided by zero. k3 is evaluated as a Taylor polynomial for |d| ≤ 1 (e^(−d) − 1 + d cancels
there), as (e^(−d) − 1) + d elsewhere.

Forward-only: in PPO the advantages and returns are regression and policy-gradient targets,
not differentiated. The outputs are detached (no gradient flows into any input).

One fused pass per row computes kl, rewards, the reverse scan, A and returns, and gathers the
row's whitening partials (count, mean, M2 of its A, float64); a tiny second stage combines the
partials in a fixed order (no atomics: the result does not depend on the thread count) and
applies the whitening elementwise. Nothing syncs with the host.

Bytes moved (b = bytes per input element): 3·B·T·b + B·T (mask) read, 16·B·T written; the
whitening reads and writes 4·B·T bytes again. The reversed Python loop it replaces (TRL,
OpenRLHF, veRL) launches ~5 ops per token column.

Implementations (chosen per call, see kernelrl.backend):
    torch    the rows' scan as log2(T) shifted multiply-adds (Hillis–Steele); the oracle is
             ``kl_penalized_advantages_reference``, the reversed loop itself
    triton   one program per row; tiles of BLOCK_T tokens backwards, each tile's scan as a
             masked [BLOCK_T, BLOCK_T] sum of (γλ)^(s−t)·ρ[s] (ρ = r + γ(1−λ)·V[t+1]), plus
             (γλ)^(distance) times the carry G from the right
    native   kernelrl._native (csrc/advantages): a CUDA kernel (one block per row, a scan
             across threads) and its C++ CPU twin (sequential scan, rows in parallel)
All accumulate in float32 (the whitening statistics in float64); fp16/bf16 inputs give float32
outputs, float64 inputs (torch backend) float64 outputs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernelrl import backend as _backend
from kernelrl.ops import _native
from kernelrl.ops._checks import (FLOAT_DTYPES, KERNEL_DTYPES, check_choice, check_same_device,
                                  check_tensor)
from kernelrl.ops._triton_utils import exp_fp64

__all__ = ["kl_penalized_advantages", "kl_penalized_advantages_reference", "Advantages",
           "KL_ESTIMATORS"]

KL_ESTIMATORS = ("k1", "k2", "k3")
WHITEN_EPS = 1e-8


class Advantages(NamedTuple):
    """The outputs of :func:`kl_penalized_advantages`, each [B, T], 0 on padding."""

    advantages: torch.Tensor   # GAE advantages, whitened if asked
    returns: torch.Tensor      # value targets: A + V, A before whitening
    rewards: torch.Tensor      # per-token rewards: −kl_coef·kl, plus the score on the last token
    kl: torch.Tensor           # the per-token KL estimate


# ---------------------------------------------------------------------------------------
# reference (the test oracle): the reversed loop of TRL / OpenRLHF / veRL, then masked_whiten
# ---------------------------------------------------------------------------------------

def _real_and_last(mask: torch.Tensor, n_cols: int):
    """([B, T] real tokens, [B, T] each row's last real token): a row's real tokens are the
    prefix as long as its count of nonzero mask entries."""
    lengths = (mask != 0).sum(-1)
    cols = torch.arange(n_cols, device=mask.device)
    return cols < lengths[:, None], cols == (lengths - 1)[:, None]


def _clip(scores: torch.Tensor, reward_clip: float) -> torch.Tensor:
    """Clamp to [−c, c] with comparisons, so that a NaN score stays NaN."""
    return torch.where(scores > reward_clip, reward_clip,
                       torch.where(scores < -reward_clip, -reward_clip, scores))


def _masked_whiten(adv: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """TRL's masked_whiten (shift_mean=True) in ``dtype``: (A − mean)·rsqrt(var + 1e-8) with
    the unbiased variance over the real tokens, taken as 0 below two of them. No host sync."""
    a = torch.where(valid, adv.to(dtype), 0.0)
    n = valid.sum()
    mean = a.sum() / n.clamp_min(1)
    centered = torch.where(valid, a - mean, 0.0)
    var = torch.where(n > 1, (centered * centered).sum() / (n - 1).clamp_min(1), 0.0)
    return (a - mean) * torch.rsqrt(var + WHITEN_EPS)


def kl_penalized_advantages_reference(logprobs, ref_logprobs, values, scores, mask, *,
                                      kl_coef=0.05, kl_estimator="k1", gamma=1.0, lam=0.95,
                                      reward_clip=None, whiten=True) -> Advantages:
    """Plain-torch reversed loop. Computes in float32, or float64 for float64 logprobs."""
    acc = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    n_cols = logprobs.shape[1]
    valid, last = _real_and_last(mask, n_cols)

    def real(x):
        return torch.where(valid, x.detach().to(acc), 0.0)

    d = real(logprobs) - real(ref_logprobs)
    kl = {"k1": lambda: d, "k2": lambda: d * d / 2,
          "k3": lambda: torch.expm1(-d) + d}[kl_estimator]()
    score = scores.detach().to(acc)
    if reward_clip is not None:
        score = _clip(score, reward_clip)
    rewards = -kl_coef * kl
    rewards = torch.where(last, rewards + score[:, None], rewards)
    values = real(values)
    lastgaelam, reversed_adv = 0.0, []
    for t in reversed(range(n_cols)):
        next_values = values[:, t + 1] if t < n_cols - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_adv.append(lastgaelam)
    adv = torch.stack(reversed_adv[::-1], 1) if n_cols else torch.zeros_like(values)
    returns = adv + values
    if whiten:
        adv = _masked_whiten(adv, valid, acc)
    zero = torch.zeros((), dtype=acc, device=logprobs.device)
    return Advantages(*(torch.where(valid, x, zero) for x in (adv, returns, rewards, kl)))


# ---------------------------------------------------------------------------------------
# torch backend: the same math, the scan in log2(T) whole-tensor steps
# ---------------------------------------------------------------------------------------

# 1/k! for k = 11 .. 2: e^(−d) − 1 + d = Σ_{k=2}^{11} x^k/k! (x = −d) to 1e-8 for |d| <= 1
_K3_COEFFS = tuple(1.0 / math.factorial(k) for k in range(11, 1, -1))


def _torch_kl(d: torch.Tensor, estimator: int) -> torch.Tensor:
    if estimator == 0:
        return d
    if estimator == 1:
        return d * d * 0.5
    x = -d
    p = torch.full_like(x, _K3_COEFFS[0])
    for coeff in _K3_COEFFS[1:]:
        p = p * x + coeff
    return torch.where(d.abs() <= 1, p * (x * x), torch.expm1(x) + d)


def _reverse_discounted_sum(x: torch.Tensor, c: float) -> torch.Tensor:
    """A[t] = x[t] + c·A[t+1] along dim 1 (A past the end 0): after step k, A[t] holds
    Σ_{j < 2^k} c^j x[t+j] (Hillis–Steele), so log2(T) steps cover the row."""
    shift, factor = 1, c
    while shift < x.shape[1]:
        x = x + factor * F.pad(x[:, shift:], (0, shift))
        shift, factor = 2 * shift, factor * factor
    return x


def _torch_advantages(logprobs, ref_logprobs, values, scores, mask, estimator, kl_coef,
                      gamma_lambda, gamma_one_minus_lambda, reward_clip, whiten):
    acc = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    valid, last = _real_and_last(mask, logprobs.shape[1])
    d = torch.where(valid, logprobs.to(acc) - ref_logprobs.to(acc), 0.0)
    kl = _torch_kl(d, estimator)
    rewards = kl * -kl_coef
    rewards = torch.where(last, rewards + _clip(scores.to(acc), reward_clip)[:, None], rewards)
    v = torch.where(valid, values.to(acc), 0.0)
    rho = rewards + gamma_one_minus_lambda * F.pad(v[:, 1:], (0, 1))
    lambda_return = _reverse_discounted_sum(rho, gamma_lambda)
    adv = lambda_return - v
    returns = lambda_return + (v - v)      # NaN where V is NaN or inf, as A + V
    if whiten:     # the statistics in float64
        adv = _masked_whiten(adv, valid, torch.float64).to(acc)
    zero = torch.zeros((), dtype=acc, device=logprobs.device)
    return tuple(torch.where(valid, x, zero) for x in (adv, returns, rewards, kl))


# ---------------------------------------------------------------------------------------
# Triton: launch configuration (named so that a tuner can replace it; no device queries)
# ---------------------------------------------------------------------------------------

def _launch_config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_T of the scan, BLOCK_T of the whitening, num_warps).

    A scan tile costs BLOCK_T² multiply-adds (a masked matrix of (γλ)^(s−t)): 64 keeps that
    at 32 registers per thread with 4 warps on a GPU. The interpreter pays per tile and per
    program, so it gets larger tiles.
    """
    cap = 128 if _backend.triton_interpret() else 64
    block = min(max(triton.next_power_of_2(max(n_cols, 1)), 16), cap)
    apply_block = min(max(triton.next_power_of_2(max(n_cols, 1)), 16),
                      16384 if _backend.triton_interpret() else 1024)
    return block, apply_block, 4


@triton.jit
def _k3_series(d):
    """e^(−d) − 1 + d for |d| <= 1: Σ_{k=2}^{11} x^k/k! with x = −d, by Horner."""
    x = -d
    p = x * (1.0 / 39916800.0) + 1.0 / 3628800.0
    p = p * x + 1.0 / 362880.0
    p = p * x + 1.0 / 40320.0
    p = p * x + 1.0 / 5040.0
    p = p * x + 1.0 / 720.0
    p = p * x + 1.0 / 120.0
    p = p * x + 1.0 / 24.0
    p = p * x + 1.0 / 6.0
    p = p * x + 0.5
    return p * (x * x)


@triton.jit
def _advantages_fwd_kernel(
    lp_ptr,      # [B, T] fp32/fp16/bf16, row stride stride_lp, unit column stride
    ref_ptr,     # [B, T] same dtype, row stride stride_ref
    v_ptr,       # [B, T] same dtype, row stride stride_v
    scores_ptr,  # [B] fp32
    mask_ptr,    # [B, T] uint8 (0 = padding), row stride stride_mask
    adv_ptr,     # [B, T] fp32 out, contiguous (not whitened)
    ret_ptr,     # [B, T] fp32 out
    rew_ptr,     # [B, T] fp32 out
    kl_ptr,      # [B, T] fp32 out
    part_ptr,    # [B, 3] fp64 out: (count, mean, M2) of the row's A
    T,
    stride_lp, stride_ref, stride_v, stride_mask,
    kl_coef, gamma_one_minus_lambda, log2_c, reward_clip,
    BLOCK_T: tl.constexpr, ESTIMATOR: tl.constexpr,
):
    # -- program id -> row; its length L = count of real tokens
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_T)
    n_real = tl.zeros((), dtype=tl.int32)
    for start in range(0, T, BLOCK_T):
        m = tl.load(mask_ptr + row * stride_mask + start + cols, mask=start + cols < T, other=0)
        n_real += tl.sum((m != 0).to(tl.int32), axis=0)
    out_row = row * T

    # -- zeros on the padding [L, T)
    for start in range(0, T, BLOCK_T):
        idx = start + cols
        pad = (idx >= n_real) & (idx < T)
        zero = tl.zeros((BLOCK_T,), dtype=tl.float32)
        tl.store(adv_ptr + out_row + idx, zero, mask=pad)
        tl.store(ret_ptr + out_row + idx, zero, mask=pad)
        tl.store(rew_ptr + out_row + idx, zero, mask=pad)
        tl.store(kl_ptr + out_row + idx, zero, mask=pad)

    # -- the tile's scan matrix: W[t, s] = (γλ)^(s − t) for s >= t (2^(k·log2 γλ); k = 0 is 1
    #    also for γλ = 0), applied only where s >= t so a NaN left of t cannot leak into A[t]
    gap = cols[None, :] - cols[:, None]
    upper = gap >= 0
    weight = tl.where(gap == 0, 1.0, tl.exp2(tl.maximum(gap, 1).to(tl.float32) * log2_c))
    carry_w = tl.exp2((BLOCK_T - cols).to(tl.float32) * log2_c)   # (γλ)^(distance to tile end)
    s = tl.load(scores_ptr + row)
    score = tl.where(s > reward_clip, reward_clip, tl.where(s < -reward_clip, -reward_clip, s))

    # -- loop: tiles from the row's end; carry = the λ-return G right of the tile. fp32 scan of
    #    G = ρ + γλ·G (ρ = r + γ(1 − λ)·V[t+1]), A = G − V; fp64 statistics
    carry = tl.zeros((), dtype=tl.float32)
    n_row = tl.zeros((), dtype=tl.float64)
    mean_row = tl.zeros((), dtype=tl.float64)
    m2_row = tl.zeros((), dtype=tl.float64)
    for i in range(0, tl.cdiv(n_real, BLOCK_T)):
        idx = n_real - (i + 1) * BLOCK_T + cols
        valid = idx >= 0
        x = tl.load(lp_ptr + row * stride_lp + idx, mask=valid, other=0.0).to(tl.float32)
        y = tl.load(ref_ptr + row * stride_ref + idx, mask=valid, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + row * stride_v + idx, mask=valid, other=0.0).to(tl.float32)
        nxt = idx + 1
        v_next = tl.load(v_ptr + row * stride_v + nxt, mask=(nxt >= 0) & (nxt < n_real),
                         other=0.0).to(tl.float32)
        d = x - y
        if ESTIMATOR == 0:
            kl = d
        elif ESTIMATOR == 1:
            kl = d * d * 0.5
        else:
            kl = tl.where(tl.abs(d) <= 1.0, _k3_series(d), (exp_fp64(-d) - 1.0) + d)
        r = kl * -kl_coef
        r = tl.where(idx == n_real - 1, r + score, r)
        rho = tl.where(valid, r + gamma_one_minus_lambda * v_next, 0.0)
        g = tl.sum(tl.where(upper, weight * rho[None, :], 0.0), axis=1) + carry_w * carry
        a = g - v
        tl.store(adv_ptr + out_row + idx, a, mask=valid)
        tl.store(ret_ptr + out_row + idx, g + (v - v), mask=valid)   # NaN where V is NaN/inf
        tl.store(rew_ptr + out_row + idx, r, mask=valid)
        tl.store(kl_ptr + out_row + idx, kl, mask=valid)
        # -- the tile's (count, mean, M2), merged into the row's (Chan et al.)
        n_tile = tl.sum(valid.to(tl.float64), axis=0)
        a64 = a.to(tl.float64)
        mean_tile = tl.sum(tl.where(valid, a64, 0.0), axis=0) / n_tile
        e = tl.where(valid, a64 - mean_tile, 0.0)
        n_new = n_row + n_tile
        dm = mean_tile - mean_row
        mean_row += dm * (n_tile / n_new)
        m2_row += tl.sum(e * e, axis=0) + dm * dm * (n_row * n_tile / n_new)
        n_row = n_new
        carry = tl.sum(tl.where(cols == 0, g, 0.0), axis=0)
    tl.store(part_ptr + 3 * row, n_row)
    tl.store(part_ptr + 3 * row + 1, mean_row)
    tl.store(part_ptr + 3 * row + 2, m2_row)


@triton.jit
def _advantages_stats_kernel(
    part_ptr,    # [B, 3] fp64: (count, mean, M2) per row
    stats_ptr,   # [2] fp64 out: (mean, rstd)
    B,
    BLOCK_B: tl.constexpr,
):
    # -- one program: combine the rows' partials in a fixed order, fp64
    rows = tl.arange(0, BLOCK_B)
    n = tl.zeros((), dtype=tl.float64)
    total = tl.zeros((), dtype=tl.float64)
    for start in range(0, B, BLOCK_B):
        ok = start + rows < B
        n_i = tl.load(part_ptr + 3 * (start + rows), mask=ok, other=0.0)
        mean_i = tl.load(part_ptr + 3 * (start + rows) + 1, mask=ok, other=0.0)
        n += tl.sum(n_i, axis=0)
        total += tl.sum(n_i * mean_i, axis=0)
    mean = tl.where(n > 0, total / tl.maximum(n, 1.0), 0.0)
    m2 = tl.zeros((), dtype=tl.float64)
    for start in range(0, B, BLOCK_B):
        ok = start + rows < B
        n_i = tl.load(part_ptr + 3 * (start + rows), mask=ok, other=0.0)
        mean_i = tl.load(part_ptr + 3 * (start + rows) + 1, mask=ok, other=0.0)
        m2_i = tl.load(part_ptr + 3 * (start + rows) + 2, mask=ok, other=0.0)
        dm = mean_i - mean
        m2 += tl.sum(m2_i + n_i * dm * dm, axis=0)
    var = tl.where(n > 1, m2 / tl.maximum(n - 1.0, 1.0), 0.0)
    tl.store(stats_ptr, mean)
    tl.store(stats_ptr + 1, 1.0 / tl.sqrt(var + 1e-8))   # WHITEN_EPS


@triton.jit
def _advantages_apply_kernel(
    adv_ptr,     # [B, T] fp32, in/out, contiguous
    part_ptr,    # [B, 3] fp64: the row's count first
    stats_ptr,   # [2] fp64: (mean, rstd)
    T,
    BLOCK_T: tl.constexpr,
):
    # -- program (row, column block): (A − mean)·rstd on the row's real tokens, in fp64
    row = tl.program_id(0).to(tl.int64)
    idx = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    n_real = tl.load(part_ptr + 3 * row).to(tl.int32)
    mean = tl.load(stats_ptr)
    rstd = tl.load(stats_ptr + 1)
    ok = idx < n_real
    a = tl.load(adv_ptr + row * T + idx, mask=ok, other=0.0)
    tl.store(adv_ptr + row * T + idx, ((a.to(tl.float64) - mean) * rstd).to(tl.float32), mask=ok)


def _outputs(like: torch.Tensor) -> list:
    return [torch.empty(like.shape, dtype=torch.float32, device=like.device) for _ in range(4)]


def _log2(c: float) -> float:
    return math.log2(c) if c > 0 else float("-inf")


def _triton_advantages(logprobs, ref_logprobs, values, scores, mask, estimator, kl_coef,
                       gamma_lambda, gamma_one_minus_lambda, reward_clip, whiten):
    n_rows, n_cols = logprobs.shape
    adv, ret, rew, kl = _outputs(logprobs)
    partials = torch.empty(n_rows, 3, dtype=torch.float64, device=logprobs.device)
    block, apply_block, warps = _launch_config(n_cols)
    _advantages_fwd_kernel[(n_rows,)](
        logprobs, ref_logprobs, values, scores, mask, adv, ret, rew, kl, partials,
        n_cols, logprobs.stride(0), ref_logprobs.stride(0), values.stride(0), mask.stride(0),
        kl_coef, gamma_one_minus_lambda, _log2(gamma_lambda), reward_clip,
        BLOCK_T=block, ESTIMATOR=estimator, num_warps=warps)
    if whiten:
        stats = torch.empty(2, dtype=torch.float64, device=logprobs.device)
        _advantages_stats_kernel[(1,)](partials, stats, n_rows, BLOCK_B=1024, num_warps=4)
        _advantages_apply_kernel[(n_rows, triton.cdiv(n_cols, apply_block))](
            adv, partials, stats, n_cols, BLOCK_T=apply_block, num_warps=warps)
    return adv, ret, rew, kl


# ---------------------------------------------------------------------------------------
# native: kernelrl._native wrapped as a custom op (so torch.compile and FSDP trace through)
# ---------------------------------------------------------------------------------------

def _native_advantages_eager(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor,
                       scores: torch.Tensor, mask: torch.Tensor, estimator: int, kl_coef: float,
                       gamma_lambda: float, gamma_one_minus_lambda: float, reward_clip: float,
                       whiten: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n_rows, n_cols = logprobs.shape
    adv, ret, rew, kl = _outputs(logprobs)
    partials = torch.empty(n_rows, 3, dtype=torch.float64, device=logprobs.device)
    lib = _native.library()
    _native.launch(logprobs.device, lib.advantages_fwd_cpu, lib.advantages_fwd_cuda,
                   logprobs.data_ptr(), ref_logprobs.data_ptr(), values.data_ptr(),
                   scores.data_ptr(), mask.data_ptr(), adv.data_ptr(), ret.data_ptr(),
                   rew.data_ptr(), kl.data_ptr(), partials.data_ptr(), n_rows, n_cols,
                   logprobs.stride(0), ref_logprobs.stride(0), values.stride(0), mask.stride(0),
                   _native.dtype_code(logprobs.dtype), estimator, kl_coef, gamma_lambda,
                   gamma_one_minus_lambda, reward_clip)
    if whiten:
        stats = torch.empty(2, dtype=torch.float64, device=logprobs.device)
        _native.launch(logprobs.device, lib.advantages_whiten_cpu, lib.advantages_whiten_cuda,
                       adv.data_ptr(), partials.data_ptr(), stats.data_ptr(), n_rows, n_cols)
    return adv, ret, rew, kl


# The custom op is what torch.compile and torch.export trace; run eagerly, the same function
# is called directly, without the dispatcher's tens of microseconds per call (the whole
# GPU kernel takes a few).
_native_advantages = torch.library.custom_op("kernelrl::kl_penalized_advantages",
                                             mutates_args=())(_native_advantages_eager)


@_native_advantages.register_fake
def _(logprobs, ref_logprobs, values, scores, mask, estimator, kl_coef, gamma_lambda,
      gamma_one_minus_lambda, reward_clip, whiten):
    return tuple(_outputs(logprobs))


_KERNELS = {"torch": _torch_advantages, "triton": _triton_advantages,
            "native": _native_advantages}


# ---------------------------------------------------------------------------------------
# the public op
# ---------------------------------------------------------------------------------------

def _check_float(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a Python float, got {type(value).__name__}")
    ok = (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        bounds = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"{name}: expected a value in {bounds}, got {value}")
    return float(value)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, T] with a unit column stride and non-overlapping rows, for the kernels."""
    if x.stride(1) != 1 or (x.shape[0] > 1 and x.stride(0) < x.shape[1]):
        return x.contiguous()
    return x


def _check_mask_is_prefix(real: torch.Tensor) -> None:
    """KERNELRL_DEBUG=1 only: raise on a row with padding before a real token (host sync)."""
    holes = real[:, 1:] & ~real[:, :-1]
    if bool(holes.any().item()):  # host sync: debug mode only
        row = int(holes.any(1).nonzero()[0, 0].item())  # host sync: debug mode only
        raise ValueError(f"mask: expected each row's real tokens to be a prefix (right padding), "
                         f"got row {row} with padding before a real token")


def kl_penalized_advantages(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                            values: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, *,
                            kl_coef: float = 0.05, kl_estimator: str = "k1", gamma: float = 1.0,
                            lam: float = 0.95, reward_clip: float | None = None,
                            whiten: bool = True) -> Advantages:
    """PPO's per-token rewards (score minus a KL penalty) and GAE advantages, fused.

    Args:
        logprobs, ref_logprobs, values: [B, T] over response tokens: the policy's and the
            reference model's log-probs of the sampled tokens, and the value head's outputs.
            float32, float16 or bfloat16 (float64 runs on the torch backend); mixed dtypes
            are promoted.
        scores: [B], the reward model's score of each sequence.
        mask: [B, T], nonzero on real response tokens, 0 on padding (bool, integer or float).
            Each row's real tokens are a prefix (right padding).
        kl_coef: the KL penalty's coefficient (>= 0).
        kl_estimator: "k1" (d), "k2" (d²/2) or "k3" (e^(−d) − 1 + d), d = logprobs − ref.
        gamma, lam: GAE's discount γ and λ, each in [0, 1].
        reward_clip: clamp the score to [−reward_clip, reward_clip] first (None: no clamp).
        whiten: whiten the advantages over the batch's real tokens.

    Returns:
        ``Advantages(advantages, returns, rewards, kl)``, each [B, T] float32 (float64 for
        float64 inputs), exactly 0 on padding. Detached: this op is forward-only (PPO's
        advantages and returns are targets), no gradient flows into any input.
    """
    check_tensor("logprobs", logprobs, dtypes=FLOAT_DTYPES, ndim=2)
    shape, device = logprobs.shape, logprobs.device
    for name, x in (("ref_logprobs", ref_logprobs), ("values", values), ("mask", mask)):
        check_tensor(name, x, dtypes=None if name == "mask" else FLOAT_DTYPES)
        if x.shape != shape:
            raise ValueError(f"{name}: expected shape {tuple(shape)} (as logprobs), "
                             f"got {tuple(x.shape)}")
        check_same_device(name, x, device)
    if mask.dtype.is_complex:
        raise ValueError(f"mask: expected a bool, integer or float dtype, got {mask.dtype}")
    check_tensor("scores", scores, dtypes=FLOAT_DTYPES)
    if scores.shape != shape[:1]:
        raise ValueError(f"scores: expected shape ({shape[0]},) (one per row of logprobs), "
                         f"got {tuple(scores.shape)}")
    check_same_device("scores", scores, device)
    check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    kl_coef = _check_float("kl_coef", kl_coef, 0.0, math.inf)
    gamma = _check_float("gamma", gamma, 0.0, 1.0)
    lam = _check_float("lam", lam, 0.0, 1.0)
    clip = math.inf if reward_clip is None else _check_float("reward_clip", reward_clip, 0.0,
                                                             math.inf, lo_open=True)
    if not isinstance(whiten, bool):
        raise ValueError(f"whiten: expected a bool, got {type(whiten).__name__}")

    real = mask.detach() if mask.dtype == torch.bool else mask.detach() != 0
    if _backend.debug_enabled() and shape[1] > 1:
        _check_mask_is_prefix(real)
    dtype = torch.promote_types(torch.promote_types(logprobs.dtype, ref_logprobs.dtype),
                                values.dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if logprobs.numel() == 0:
        return Advantages(*(torch.zeros(shape, dtype=acc, device=device) for _ in range(4)))
    backend = _backend.select("kl_penalized_advantages", device, dtype)
    inputs = [_rows(x.detach().to(dtype)) for x in (logprobs, ref_logprobs, values)]
    kernel = _KERNELS[backend]
    if backend == "native" and not torch.compiler.is_compiling():
        kernel = _native_advantages_eager
    outs = kernel(*inputs, scores.detach().to(acc).contiguous(),
                             _rows(real.view(torch.uint8)), KL_ESTIMATORS.index(kl_estimator),
                             kl_coef, gamma * lam, gamma * (1.0 - lam), clip, whiten)
    return Advantages(*outs)


def _examples(device: torch.device, dtype: torch.dtype) -> list:
    """Representative inputs for ``kernelrl tune``: PPO batches of mixed response lengths."""
    shapes = [(256, 1024)] if device.type == "cpu" else [(256, 1024), (1024, 4096)]
    out = []
    for n_rows, n_cols in shapes:
        lengths = torch.randint(1, n_cols + 1, (n_rows,), device=device)
        mask = torch.arange(n_cols, device=device) < lengths[:, None]
        args = (-torch.rand(n_rows, n_cols, device=device).to(dtype),
                -torch.rand(n_rows, n_cols, device=device).to(dtype),
                torch.randn(n_rows, n_cols, device=device).to(dtype),
                torch.randn(n_rows, device=device), mask)
        out.append((f"B={n_rows} T={n_cols}", args, {"kl_estimator": "k3"}))
    return out


_backend.register_op(
    "kl_penalized_advantages",
    {"native": _backend.Implementation(KERNEL_DTYPES, _KERNELS["native"]),
     "triton": _backend.Implementation(KERNEL_DTYPES, _KERNELS["triton"]),
     "torch": _backend.Implementation(FLOAT_DTYPES, _KERNELS["torch"])},
    # CPU: bench_advantages shows the C++ twin faster than the torch path, so native leads.
    # CUDA: on an H200 native is 18x faster than the torch path and Triton 9x
    # (benchmarks/results/nvidia-h200-2026-11-30.json), so nothing is skipped.
    examples=_examples, fn=kl_penalized_advantages)

#: Signatures for compiling every Triton kernel here ahead of time (tests/ops).
AOT_SIGNATURES = {
    "_advantages_fwd_kernel": ({
        "lp_ptr": "*{dt}", "ref_ptr": "*{dt}", "v_ptr": "*{dt}", "scores_ptr": "*fp32",
        "mask_ptr": "*u8", "adv_ptr": "*fp32", "ret_ptr": "*fp32", "rew_ptr": "*fp32",
        "kl_ptr": "*fp32", "part_ptr": "*fp64", "T": "i32", "stride_lp": "i64",
        "stride_ref": "i64", "stride_v": "i64", "stride_mask": "i64", "kl_coef": "fp32",
        "gamma_one_minus_lambda": "fp32", "log2_c": "fp32", "reward_clip": "fp32",
        "BLOCK_T": "constexpr", "ESTIMATOR": "constexpr"},
        [{"BLOCK_T": 64, "ESTIMATOR": 0}, {"BLOCK_T": 64, "ESTIMATOR": 1},
         {"BLOCK_T": 64, "ESTIMATOR": 2}]),
    "_advantages_stats_kernel": ({
        "part_ptr": "*fp64", "stats_ptr": "*fp64", "B": "i32",
        "BLOCK_B": "constexpr"},
        [{"BLOCK_B": 1024}]),
    "_advantages_apply_kernel": ({
        "adv_ptr": "*fp32", "part_ptr": "*fp64", "stats_ptr": "*fp64", "T": "i32",
        "BLOCK_T": "constexpr"},
        [{"BLOCK_T": 1024}]),
}
