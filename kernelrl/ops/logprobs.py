"""Fused log-prob gathering: log softmax(logits / τ)[label], its entropy, and their gradients.

Shapes: N tokens (all leading dims flattened), V vocabulary.

Math, per token i with label y_i and temperature τ (z = x / τ):

    lse_i  = log Σ_j exp(z_ij)
    logp_i = z_iy − lse_i                               (0 where y_i == ignore_index)
    ent_i  = −Σ_j p_ij log p_ij = lse_i − Σ_j p_ij z_ij  (p = softmax(z))

    ∂logp_i/∂x_ij = (1[j = y_i] − p_ij) / τ
    ∂ent_i/∂x_ij  = −p_ij (log p_ij + ent_i) / τ

Every algorithm needs this number:
    SFT   loss = −logp[mask].mean()                       (token cross-entropy)
    DPO   seq_logp = logp.sum(-1)                         (ignore_index on prompt/pad)
    PPO   logp per token, for the ratio exp(logp − logp_old) and the KL to the reference

Done naively (``log_softmax(logits.float())`` then ``gather``) it is the largest memory
consumer of post-training: an N×V float32 copy of the logits, and the same again for its
gradient. Here the forward is one pass over the vocabulary with an online log-sum-exp over
the raw logits: running max m of x, s = Σ exp(d), t = Σ exp(d)·d with d = (x − m)/τ
(s kept as s − 1 so that log s = log1p(s − 1) keeps its digits when one token dominates):

    lse = m/τ + log s,   logp = (x_y − m)/τ − log s,   ent = log s − t/s.

Every term is relative to the row max, so nothing cancels: with logits of ±1e4 an fp32
``z − lse`` would lose 1e-3 to rounding, while ``x − m`` is exact near the max. The
forward keeps only the row stats (m, log s), 2·N floats, for backward, which writes
g·(onehot − p) − g_ent·p·(log p + ent) straight into a gradient in the logits' dtype; it never
builds a float32 copy of the logits.

Bytes moved (b = bytes per logit): forward N·V·b read; backward N·V·b read + N·V·b written.

Implementations (chosen per call, see kernelrl.backend):
    torch    the formulas above in plain torch (CPU fallback; the oracle is
             ``token_logprobs_reference``, autograd through log_softmax)
    triton   one program per row, looping over V in BLOCK_V tiles, fp32 accumulation
    native   kernelrl._native: CUDA kernels and their C++ CPU twin (csrc/logprobs)

Labels: a label outside [0, V) that is not ``ignore_index`` gives a NaN log-prob and NaN
gradients for its row (never a plausible number, and no host sync to detect it). With
``KERNELRL_DEBUG=1`` it raises ValueError instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from typing import Callable, NamedTuple

from kernelrl import backend as _backend
from kernelrl.ops import _native
from kernelrl.ops._autograd import first_order_only
from kernelrl.ops._triton_utils import downcast, expm1, log1p
from kernelrl.ops._checks import (FLOAT_DTYPES, KERNEL_DTYPES, check_labels,
                                  check_labels_in_range, check_temperature, check_tensor)

__all__ = ["token_logprobs", "token_logprobs_reference", "TokenLogprobsFunction",
           "RowKernels", "row_kernels"]


# ---------------------------------------------------------------------------------------
# reference (the test oracle): autograd through log_softmax; bytes: several N×V copies
# ---------------------------------------------------------------------------------------

def token_logprobs_reference(logits: torch.Tensor, labels: torch.Tensor, *,
                             temperature: float = 1.0, ignore_index: int = -100,
                             return_entropy: bool = False):
    """Plain-torch log-probs (and entropy). Computes in float32, or float64 for float64 input."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    logq = torch.log_softmax(x / temperature, dim=-1)
    vocab = logits.shape[-1]
    ignored = labels == ignore_index
    valid = (labels >= 0) & (labels < vocab)
    picked = logq.gather(-1, labels.clamp(0, vocab - 1).unsqueeze(-1)).squeeze(-1)
    nan = torch.full_like(picked, float("nan"))
    logp = torch.where(ignored, torch.zeros_like(picked), torch.where(valid, picked, nan))
    if not return_entropy:
        return logp
    p = logq.exp()
    entropy = -(p * torch.where(p > 0, logq, torch.zeros_like(logq))).sum(-1)
    return logp, torch.where(ignored, torch.zeros_like(entropy), entropy)


# ---------------------------------------------------------------------------------------
# torch backend: the same row kernels in plain torch (fp32 math, or fp64 for fp64 input)
# ---------------------------------------------------------------------------------------

def _row_masks(labels, vocab_size, ignore_index):
    ignored = labels == ignore_index
    invalid = ~ignored & ((labels < 0) | (labels >= vocab_size))
    return ignored, invalid


def _row_chunks(n_rows: int, n_cols: int, device: torch.device):
    """Row ranges for the torch backend: 2^20 elements at a time on a CPU (a few MiB, so
    the ~10 elementwise passes stay in cache), 2^26 on a GPU."""
    rows = max(1, (1 << (26 if device.type == "cuda" else 20)) // max(n_cols, 1))
    return [(i, min(i + rows, n_rows)) for i in range(0, n_rows, rows)]


def _torch_fwd(logits, labels, inv_temperature, ignore_index, with_entropy):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    n, vocab = logits.shape
    ignored, invalid = _row_masks(labels, vocab, ignore_index)
    m = torch.empty(n, dtype=acc, device=logits.device)
    log_s, picked = torch.empty_like(m), torch.empty_like(m)
    ent = torch.empty(n if with_entropy else 0, dtype=acc, device=logits.device)
    safe = labels.clamp(0, vocab - 1).unsqueeze(1)
    for i, j in _row_chunks(n, vocab, logits.device):
        x = logits[i:j].to(acc)
        m[i:j] = x.amax(dim=1)
        ref = torch.where(m[i:j] == float("-inf"), 0.0, m[i:j]).unsqueeze(1)
        d = (x - ref).mul_(inv_temperature)
        at_max = d == 0
        e = d.exp()
        # log s = log1p(Σ_{x<m} e^d + (#{x=m} − 1)): the max's own e^0 = 1 stays out
        r = torch.where(at_max, 0.0, e).sum(1) + (at_max.sum(1) - 1)
        log_s[i:j] = torch.log1p(r)
        picked[i:j] = d.gather(1, safe[i:j]).squeeze(1)
        if with_entropy:        # ent = log s − t/s, t = Σ e^d·d (0 where e^d = 0)
            t = torch.where(e > 0, e * d, 0.0).sum(1)
            ent[i:j] = log_s[i:j] - t / (1 + r)
    zero = torch.zeros_like(m)
    logp = torch.where(ignored, zero, torch.where(invalid, torch.full_like(zero, float("nan")),
                                                  picked - log_s))
    if with_entropy:
        ent = torch.where(ignored, zero, ent)
    stats = torch.stack([torch.where(ignored, zero, m), torch.where(ignored, zero, log_s)], 1)
    return logp, stats, ent


def _torch_bwd(logits, labels, stats, ent, grad_logp, grad_ent, grad_out,
               inv_temperature, ignore_index, vocab_size, col_offset):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    n, n_cols = logits.shape
    ignored, invalid = _row_masks(labels, vocab_size, ignore_index)
    target = labels - col_offset
    in_tile = (target >= 0) & (target < n_cols)
    at = target.clamp(0, n_cols - 1).unsqueeze(1)
    # one multiply applies 1/τ, and NaN to rows whose label is out of range
    scale = torch.where(invalid, float("nan"), inv_temperature).to(acc).unsqueeze(1)
    for i, j in _row_chunks(n, n_cols, logits.device):
        g = grad_logp[i:j].unsqueeze(1)
        logq = (logits[i:j].to(acc) - stats[i:j, :1]).mul_(inv_temperature).sub_(stats[i:j, 1:])
        # at the label: g·(1 − p) = −g·expm1(log p), which keeps its digits when p ≈ 1
        logq_y = logq.gather(1, at[i:j])
        label_grad = -g * torch.expm1(logq_y)
        p = logq.exp()
        if grad_ent is None:
            grad = p.mul_(-g)
        else:
            g_h = grad_ent[i:j, None]
            h = ent[i:j].unsqueeze(1)
            h_term = torch.where(p > 0, p * (logq + h), 0.0)
            p_y = logq_y.exp()
            label_grad -= g_h * torch.where(p_y > 0, p_y * (logq_y + h), 0.0)
            grad = p.mul_(-g).sub_(h_term.mul_(g_h))
        keep = grad.gather(1, at[i:j])
        grad.scatter_(1, at[i:j], torch.where(in_tile[i:j, None], label_grad, keep))
        grad.mul_(scale[i:j]).masked_fill_(ignored[i:j].unsqueeze(1), 0.0)
        grad_out[i:j].copy_(grad)
    return grad_out


# ---------------------------------------------------------------------------------------
# Triton: launch configuration (named so that a tuner can replace it; no device queries)
# ---------------------------------------------------------------------------------------

def _launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for the row kernels.

    A row is swept in BLOCK_V tiles. 4096 columns and 8 warps keep 16 elements in flight
    per thread on a GPU; the interpreter pays per program and per tile, so it gets wider
    tiles.
    """
    cap = 16384 if _backend.triton_interpret() else 4096
    block = min(triton.next_power_of_2(max(n_cols, 16)), cap)
    return block, (4 if block <= 1024 else 8)


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,   # [N, V] fp32/fp16/bf16, row stride stride_row, unit column stride
    labels_ptr,   # [N] int64
    logp_ptr,     # [N] fp32, out
    stats_ptr,    # [N, 2] fp32, out: (max logit m, log s); 0 on ignored rows
    ent_ptr,      # [N] fp32, out (only if HAS_ENTROPY)
    V,
    stride_row,
    inv_temperature, ignore_index,
    BLOCK_V: tl.constexpr, HAS_ENTROPY: tl.constexpr,
):
    # -- program id -> row; ignored rows sweep no columns
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    row_ptr = logits_ptr + row * stride_row
    n_cols = tl.where(ignored, 0, V)

    # -- loop: online log-sum-exp, fp32 accumulators. m = running max of x; with
    #    d = (x - m)/τ: r = Σ e^d - 1 (the max's own e^0 = 1 left out, so that log s =
    #    log1p(r) keeps its digits when one token dominates) and t = Σ e^d·d. Rescaled
    #    when m grows; r = -1 is the empty sum.
    m = tl.zeros((), dtype=tl.float32) - float("inf")
    r = tl.zeros((), dtype=tl.float32) - 1.0
    t = tl.zeros((), dtype=tl.float32)
    n_nan = tl.zeros((), dtype=tl.float32)  # NaN logits seen: max/compare would skip them
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        mask = start + cols < V
        x = tl.load(row_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        n_nan += tl.sum(tl.where(x != x, 1.0, 0.0), axis=0)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        finite = m_new > float("-inf")
        ref = tl.where(finite, m_new, 0.0)
        grew = m_new > m
        shift = (m - ref) * inv_temperature                 # <= 0; -inf while m is -inf
        alpha = tl.exp(shift)
        d = (x - ref) * inv_temperature
        e = tl.exp(d)
        below = x < m_new
        e_below = tl.sum(tl.where(below, e, 0.0), axis=0)
        n_max = tl.where(finite, tl.sum(tl.where(x == m_new, 1.0, 0.0), axis=0), 0.0)
        rescaled = tl.where(m > float("-inf"), (1.0 + r) * shift, 0.0)
        t = alpha * (t + tl.where(grew, rescaled, 0.0)) + tl.sum(
            tl.where(below & (e > 0), e * d, 0.0), axis=0)
        r = tl.where(grew, alpha * (1.0 + r) + e_below + (n_max - 1.0), r + e_below + n_max)
        m = m_new

    # -- the label's logit, and masked stores
    valid = (label >= 0) & (label < V)
    safe = tl.minimum(tl.maximum(label, 0), V - 1)
    x_y = tl.load(row_ptr + safe, mask=valid & (~ignored), other=0.0).to(tl.float32)
    log_s = log1p(tl.where(ignored, 0.0, r))      # ignored rows swept nothing
    # A NaN logit makes the row NaN (log-prob, entropy, and via log s the gradient): the
    # max and the comparisons above ignore NaN, in the interpreter and on a GPU alike.
    log_s = tl.where(n_nan > 0, float("nan"), log_s)
    logp = tl.where(valid, (x_y - m) * inv_temperature - log_s, float("nan"))
    tl.store(logp_ptr + row, tl.where(ignored, 0.0, logp))
    tl.store(stats_ptr + 2 * row, tl.where(ignored, 0.0, m))
    tl.store(stats_ptr + 2 * row + 1, tl.where(ignored, 0.0, log_s))
    if HAS_ENTROPY:
        tl.store(ent_ptr + row, tl.where(ignored, 0.0, log_s - t / (1.0 + tl.where(ignored, 0.0, r))))


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr,     # [N, n_cols] fp32/fp16/bf16 tile of vocab ids col_offset.., row stride stride_row
    labels_ptr,     # [N] int64
    stats_ptr,      # [N, 2] fp32 from forward: (max logit m, log s)
    ent_ptr,        # [N] fp32, from forward (only if HAS_ENTROPY_GRAD)
    grad_logp_ptr,  # [N] fp32
    grad_ent_ptr,   # [N] fp32 (only if HAS_ENTROPY_GRAD)
    grad_ptr,       # [N, n_cols] logits dtype, out; may alias logits_ptr (read before write)
    n_cols, vocab_size, col_offset,
    stride_row, stride_grad_row,
    inv_temperature, ignore_index,
    BLOCK_V: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr,
):
    # -- program id -> row and its per-row scalars
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index
    invalid = (~ignored) & ((label < 0) | (label >= vocab_size))
    m = tl.load(stats_ptr + 2 * row)
    log_s = tl.load(stats_ptr + 2 * row + 1)
    g = tl.load(grad_logp_ptr + row)
    if HAS_ENTROPY_GRAD:
        h = tl.load(ent_ptr + row)
        g_h = tl.load(grad_ent_ptr + row)
    target = label - col_offset

    # -- pointers
    row_ptr = logits_ptr + row * stride_row
    out_ptr = grad_ptr + row * stride_grad_row

    # -- loop: grad = (g·(onehot − p) − g_ent·p·(log p + ent)) / τ, fp32 math
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        idx = start + cols
        mask = idx < n_cols
        x = tl.load(row_ptr + idx, mask=mask & (~ignored), other=0.0).to(tl.float32)
        logq = (x - m) * inv_temperature - log_s
        p = tl.exp(logq)
        # at the label g·(1 − p) = −g·expm1(log p): no cancellation when p ≈ 1
        grad = tl.where(idx == target, -g * expm1(logq), -g * p)
        if HAS_ENTROPY_GRAD:
            grad -= g_h * tl.where(p > 0, p * (logq + h), 0.0)
        grad = grad * inv_temperature
        grad = tl.where(invalid, float("nan"), tl.where(ignored, 0.0, grad))
        # -- masked store, downcast to the logits dtype
        tl.store(out_ptr + idx, downcast(grad, grad_ptr.dtype.element_ty), mask=mask)


def _triton_fwd(logits, labels, inv_temperature, ignore_index, with_entropy):
    n, vocab = logits.shape
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    stats = torch.empty(n, 2, dtype=torch.float32, device=logits.device)
    ent = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=logits.device)
    if n:
        block, warps = _launch_config(vocab)
        _logprobs_fwd_kernel[(n,)](
            logits, labels, logp, stats, ent if with_entropy else logp,
            vocab, logits.stride(0), inv_temperature, ignore_index,
            BLOCK_V=block, HAS_ENTROPY=with_entropy, num_warps=warps)
    return logp, stats, ent


def _triton_bwd(logits, labels, stats, ent, grad_logp, grad_ent, grad_out,
                inv_temperature, ignore_index, vocab_size, col_offset):
    n, n_cols = logits.shape
    if n:
        block, warps = _launch_config(n_cols)
        has_ent = grad_ent is not None
        _logprobs_bwd_kernel[(n,)](
            logits, labels, stats, ent if has_ent else stats, grad_logp,
            grad_ent if has_ent else grad_logp, grad_out,
            n_cols, vocab_size, col_offset, logits.stride(0), grad_out.stride(0),
            inv_temperature, ignore_index,
            BLOCK_V=block, HAS_ENTROPY_GRAD=has_ent, num_warps=warps)
    return grad_out


# ---------------------------------------------------------------------------------------
# native: kernelrl._native wrapped as custom ops (so torch.compile and FSDP trace through)
# ---------------------------------------------------------------------------------------

@torch.library.custom_op("kernelrl::logprobs_fwd", mutates_args=())
def _native_fwd(logits: torch.Tensor, labels: torch.Tensor, inv_temperature: float,
                ignore_index: int, with_entropy: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, vocab = logits.shape
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    stats = torch.empty(n, 2, dtype=torch.float32, device=logits.device)
    ent = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=logits.device)
    if n:
        lib = _native.library()
        _native.launch(logits.device, lib.logprobs_fwd_cpu, lib.logprobs_fwd_cuda,
                       logits.data_ptr(), labels.data_ptr(), logp.data_ptr(), stats.data_ptr(),
                       ent.data_ptr() if with_entropy else 0, n, vocab, logits.stride(0),
                       _native.dtype_code(logits.dtype), inv_temperature, ignore_index)
    return logp, stats, ent


@_native_fwd.register_fake
def _(logits, labels, inv_temperature, ignore_index, with_entropy):
    n = logits.shape[0]
    f32 = dict(dtype=torch.float32, device=logits.device)
    return (logits.new_empty(n, **f32), logits.new_empty((n, 2), **f32),
            logits.new_empty(n if with_entropy else 0, **f32))


def _native_bwd_launch(logits, labels, stats, ent, grad_logp, grad_ent, grad_out,
                       inv_temperature, ignore_index, vocab_size, col_offset):
    n, n_cols = logits.shape
    if n:
        lib = _native.library()
        has_ent = grad_ent is not None
        _native.launch(logits.device, lib.logprobs_bwd_cpu, lib.logprobs_bwd_cuda,
                       logits.data_ptr(), labels.data_ptr(), stats.data_ptr(),
                       ent.data_ptr() if has_ent else 0, grad_logp.data_ptr(),
                       grad_ent.data_ptr() if has_ent else 0, grad_out.data_ptr(), n, n_cols,
                       vocab_size, col_offset, logits.stride(0), grad_out.stride(0),
                       _native.dtype_code(logits.dtype), inv_temperature, ignore_index)


@torch.library.custom_op("kernelrl::logprobs_bwd", mutates_args=())
def _native_bwd_op(logits: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor,
                   ent: torch.Tensor, grad_logp: torch.Tensor, grad_ent: torch.Tensor | None,
                   inv_temperature: float, ignore_index: int, vocab_size: int,
                   col_offset: int) -> torch.Tensor:
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _native_bwd_launch(logits, labels, stats, ent, grad_logp, grad_ent, grad,
                       inv_temperature, ignore_index, vocab_size, col_offset)
    return grad


@_native_bwd_op.register_fake
def _(logits, labels, stats, ent, grad_logp, grad_ent, inv_temperature, ignore_index,
      vocab_size, col_offset):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("kernelrl::logprobs_bwd_", mutates_args=("tile",))
def _native_bwd_inplace_op(tile: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor,
                           ent: torch.Tensor, grad_logp: torch.Tensor,
                           grad_ent: torch.Tensor | None, inv_temperature: float,
                           ignore_index: int, vocab_size: int, col_offset: int) -> None:
    """The backward written over the logits tile itself (linear_logprobs' recomputed tiles);
    the kernels read each element before they write it."""
    _native_bwd_launch(tile, labels, stats, ent, grad_logp, grad_ent, tile,
                       inv_temperature, ignore_index, vocab_size, col_offset)


def _native_bwd(logits, labels, stats, ent, grad_logp, grad_ent, grad_out,
                inv_temperature, ignore_index, vocab_size, col_offset):
    if grad_out is logits:
        _native_bwd_inplace_op(logits, labels, stats, ent, grad_logp, grad_ent,
                               inv_temperature, ignore_index, vocab_size, col_offset)
        return logits
    grad_out.copy_(_native_bwd_op(logits, labels, stats, ent, grad_logp, grad_ent,
                                  inv_temperature, ignore_index, vocab_size, col_offset))
    return grad_out


# ---------------------------------------------------------------------------------------
# the row-kernel interface, one per backend (linear_logprobs reuses it tile by tile)
# ---------------------------------------------------------------------------------------

class RowKernels(NamedTuple):
    """A backend's log-prob row kernels.

    fwd(logits [N, V], labels [N] int64, inv_temperature, ignore_index, with_entropy)
        -> (logp [N], stats [N, 2] = (row max m, log s), entropy [N] or [0]), float32
        (float64 for float64 logits on the torch backend).
    bwd(tile [N, n_cols], labels, stats, entropy, grad_logp, grad_entropy or None,
        grad_out [N, n_cols], inv_temperature, ignore_index, vocab_size, col_offset)
        writes the gradient of the tile holding vocab ids col_offset .. col_offset + n_cols − 1
        into grad_out and returns it. ``grad_out`` may be the tile itself (the same tensor
        object): then it is overwritten in place.
    """

    fwd: Callable
    bwd: Callable


_ROW_KERNELS = {
    "torch": RowKernels(_torch_fwd, _torch_bwd),
    "triton": RowKernels(_triton_fwd, _triton_bwd),
    "native": RowKernels(_native_fwd, _native_bwd),
}


def row_kernels(backend: str) -> RowKernels:
    """The row kernels of ``backend`` ("torch", "triton" or "native")."""
    return _ROW_KERNELS[backend]


class TokenLogprobsFunction(torch.autograd.Function):
    """logits [N, V] (unit column stride), labels [N] int64 -> (logp [N], entropy [N] or [0]).

    First-order only: the backward is a fused kernel, not differentiable itself, so a
    second derivative (``create_graph=True``, then differentiating the gradient) raises
    instead of silently dropping terms.
    """

    @staticmethod
    def forward(ctx, logits, labels, inv_temperature, ignore_index, with_entropy, backend):
        logp, stats, ent = row_kernels(backend).fwd(logits, labels, inv_temperature,
                                                    ignore_index, with_entropy)
        ctx.save_for_backward(logits, labels, stats, ent)
        ctx.config = (inv_temperature, ignore_index, with_entropy, backend)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @first_order_only("token_logprobs")
    def backward(ctx, grad_logp, grad_ent):
        logits, labels, stats, ent = ctx.saved_tensors
        inv_temperature, ignore_index, with_entropy, backend = ctx.config
        acc = stats.dtype
        n, vocab = logits.shape
        grad_logp = (torch.zeros(n, dtype=acc, device=logits.device) if grad_logp is None
                     else grad_logp.to(acc).contiguous())
        grad_ent = grad_ent.to(acc).contiguous() if with_entropy and grad_ent is not None else None
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        row_kernels(backend).bwd(logits, labels, stats, ent, grad_logp, grad_ent, grad,
                                 inv_temperature, ignore_index, vocab, 0)
        return grad, None, None, None, None, None


def prepare_rows(logits: torch.Tensor, labels: torch.Tensor):
    """[..., V] logits and [...] labels -> [N, V] with unit column stride, [N] int64."""
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < vocab):
        rows = rows.contiguous()
    return rows, labels.reshape(-1).to(torch.int64).contiguous()


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   ignore_index: int = -100, return_entropy: bool = False):
    """log softmax(logits / temperature)[label], fused, with a fused backward.

    Args:
        logits: [..., V] float32, float16 or bfloat16 (float64 runs on the torch backend).
        labels: [...] integer token ids in [0, V), or ``ignore_index``.
        temperature: divides the logits before the softmax (> 0).
        ignore_index: label value whose positions give logp = entropy = 0 and no gradient.
        return_entropy: also return the entropy of softmax(logits / temperature).

    Returns:
        logp [...] float32 (float64 for float64 logits), or (logp, entropy) when
        ``return_entropy``. Gradients flow into ``logits`` through both.

    A label outside [0, V) that is not ``ignore_index`` gives NaN (``KERNELRL_DEBUG=1``
    raises ValueError instead).
    """
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES, ndim_min=1)
    if logits.shape[-1] == 0:
        raise ValueError("logits: expected a vocabulary dimension of size >= 1, got 0")
    check_labels("labels", labels, logits.shape[:-1], logits.device)
    inv_temperature = 1.0 / check_temperature(temperature)
    ignore_index = int(ignore_index)
    if _backend.debug_enabled():
        check_labels_in_range("labels", labels, logits.shape[-1], ignore_index)
    backend = _backend.select("token_logprobs", logits.device, logits.dtype)
    rows, flat_labels = prepare_rows(logits, labels)
    logp, ent = TokenLogprobsFunction.apply(rows, flat_labels, inv_temperature, ignore_index,
                                            bool(return_entropy), backend)
    logp = logp.reshape(labels.shape)
    return (logp, ent.reshape(labels.shape)) if return_entropy else logp


def _examples(device: torch.device, dtype: torch.dtype) -> list:
    """Representative inputs for ``kernelrl tune``: a CPU-sized and a GPU-sized batch."""
    shapes = [(512, 32000)] if device.type == "cpu" else [(4096, 32000), (4096, 128256)]
    out = []
    for n, vocab in shapes:
        logits = (2 * torch.randn(n, vocab, device=device)).to(dtype).requires_grad_()
        labels = torch.randint(0, vocab, (n,), device=device)
        labels[::10] = -100
        out.append((f"N={n} V={vocab}", (logits, labels), {"return_entropy": False}))
    return out


#: The row kernels of every backend with the dtypes each takes; linear_logprobs registers
#: the same implementations and default-path skips, since it runs these kernels tile by tile.
ROW_IMPLEMENTATIONS = {
    "native": _backend.Implementation(KERNEL_DTYPES, row_kernels("native")),
    "triton": _backend.Implementation(KERNEL_DTYPES, row_kernels("triton")),
    "torch": _backend.Implementation(FLOAT_DTYPES, row_kernels("torch")),
}
# CPU: bench_logprobs shows the C++ kernels faster than the torch path, so native leads.
# CUDA: on an H200 (benchmarks/results/nvidia-h200-2026-11-30.json) native and Triton are
# both 4-15x faster than the torch path; the built-in table picks per dtype there, and other
# GPUs take the default order (native first) until `kernelrl tune` measures them.
ROW_SKIP: dict = {}

_backend.register_op("token_logprobs", ROW_IMPLEMENTATIONS, skip=ROW_SKIP,
                     examples=_examples, fn=token_logprobs)

#: Signatures for compiling every Triton kernel here ahead of time (tests/ops).
AOT_SIGNATURES = {
    "_logprobs_fwd_kernel": ({
        "logits_ptr": "*{dt}", "labels_ptr": "*i64", "logp_ptr": "*fp32",
        "stats_ptr": "*fp32", "ent_ptr": "*fp32", "V": "i32", "stride_row": "i64",
        "inv_temperature": "fp32", "ignore_index": "i64",
        "BLOCK_V": "constexpr", "HAS_ENTROPY": "constexpr"},
        [{"BLOCK_V": 4096, "HAS_ENTROPY": True}, {"BLOCK_V": 1024, "HAS_ENTROPY": False}]),
    "_logprobs_bwd_kernel": ({
        "logits_ptr": "*{dt}", "labels_ptr": "*i64", "stats_ptr": "*fp32", "ent_ptr": "*fp32",
        "grad_logp_ptr": "*fp32", "grad_ent_ptr": "*fp32", "grad_ptr": "*{dt}",
        "n_cols": "i32", "vocab_size": "i32", "col_offset": "i32", "stride_row": "i64",
        "stride_grad_row": "i64", "inv_temperature": "fp32", "ignore_index": "i64",
        "BLOCK_V": "constexpr", "HAS_ENTROPY_GRAD": "constexpr"},
        [{"BLOCK_V": 4096, "HAS_ENTROPY_GRAD": True},
         {"BLOCK_V": 1024, "HAS_ENTROPY_GRAD": False}]),
}
