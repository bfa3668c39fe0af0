"""Log-probs from hidden states and the lm_head, without ever holding the N×V logits.

Shapes (the package legend): N tokens (leading dims flattened), H hidden, V vocabulary.
Tiles: Nt token rows × Vt vocabulary columns, Nt·Vt ≈ the tile budget L = chunk_size·V.
Entropy is written ent (never H, the hidden width).

    logits = hidden @ weight.T + bias                      [N, V], never materialised whole
    logp, entropy = token_logprobs(logits, labels, ...)    see kernelrl.ops.logprobs

Two paths, chosen by what the caller asks for:

Per-token path (reduction="none", or any entropy; exact for ANY upstream gradient g, g_ent).
The logits are cut into Nt×Vt tiles (Vt columns of at most 4096 by default, Nt rows so
that Nt·Vt ≈ L). Forward and backward build every tile with the very same matmul, so the logits
recomputed in backward are bitwise those the forward normalised. Forward: each tile is
swept by the log-prob row kernel for its row max m_b, log-sum log s_b and entropy ent_b, and
merged at once into running per-row statistics (``_RowMerge``: max, log-sum relative to
the block holding the max, entropy, and the label's logit), so nothing but O(N) vectors
outlives a tile, whatever the chunk size. Backward: with the full-row stats and H,
∂/∂logits_ij = (g_i(1[j=y_i] − p_ij) − g_ent,i p_ij (log p_ij + ent_i)) / τ depends only on row
i's scalars, so each tile is recomputed, turned into its gradient G in place by the row
kernel, and used twice, vocabulary block by vocabulary block:

    grad_weight[v0:v1] = Σ_rows G_tile.T @ hidden[r0:r1]   (float32 block sum for 16-bit)
    grad_hidden[r0:r1] += G_tile @ weight[v0:v1]           (float32 accumulator for 16-bit)
    grad_bias[v0:v1]   = Σ_rows G_tile.sum(0)

That is 4 matmuls of 2·N·H·V flops (1 forward, 3 backward) against eager's 3, traded for
never holding an N×V tensor.

Scalar path (reduction="sum" or "mean" without entropy; float32/float64 inputs, and
16-bit ones on a GPU). The
upstream gradient of a sum is one scalar c, so the gradients are c times those of the
plain sum, and can be computed exactly during the forward sweep, over Nt full-vocabulary
rows at a time (Nt·V ≈ L): tile = hidden[r0:r1] @ weight.T, row kernel forward (stats),
row kernel backward with g = 1 in place, then grad_hidden[r0:r1] = G @ weight and
grad_weight += G.T @ hidden[r0:r1]. Backward only scales the stored gradients by c, in
place: 3 matmuls, no recompute. 16-bit inputs accumulate grad_weight, grad_hidden and
grad_bias in float32 (a V×H float32 buffer: the price of the fourth matmul saved) and round
once in backward; that needs matmuls writing float32 from 16-bit inputs, so on a CPU they
take the per-token path. The stored gradients are consumed by the first backward; a second
one (``retain_graph=True``) raises.

Peak extra memory (beyond inputs, outputs and N-sized vectors): one tile of L logits in
the input dtype (+ ~3 float32 copies of it on the torch backend), a [Vt, H] float32 block
accumulator and an N×H float32 accumulator for 16-bit inputs: O(L + N·H). The scalar
path holds grad_weight and grad_hidden (float32/float64, the size of the outputs; float32
for 16-bit inputs) from the forward to the backward. The default L is 2^26 logits on a GPU (2^28 for the scalar
path) and 2^20 on a CPU (2^22 for the scalar path).

Labels: ``ignore_index`` rows give 0 and no gradient. A label outside [0, V) that is not
``ignore_index`` gives a NaN log-prob and a NaN gradient for its row of the logits; that
NaN row reaches grad_hidden's row i only, but every row of grad_weight and grad_bias
(they sum over tokens). ``KERNELRL_DEBUG=1`` raises ValueError instead.

The three algorithms, one reduction away:
    SFT   loss = -linear_logprobs(h, w, y, reduction="mean")          mean token CE
    DPO   seq_logp = linear_logprobs(h, w, y).view(B, T).sum(-1)       prompt labels = ignore
    PPO   logp = linear_logprobs(h, w, y).view(B, T)                   per-token log-probs
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kernelrl import backend as _backend
from kernelrl.ops._autograd import first_order_only
from kernelrl.ops._checks import (FLOAT_DTYPES, check_choice, check_labels,
                                  check_labels_in_range, check_same_device, check_temperature,
                                  check_tensor)
from kernelrl.ops.logprobs import (ROW_IMPLEMENTATIONS, ROW_SKIP, row_kernels,
                                  token_logprobs_reference)

__all__ = ["linear_logprobs", "linear_logprobs_reference", "default_chunk_size", "tile_shape"]


def linear_logprobs_reference(hidden, weight, labels, *, bias=None, temperature=1.0,
                              ignore_index=-100, return_entropy=False):
    """The full-size computation: materialise the logits, then token_logprobs_reference."""
    return token_logprobs_reference(F.linear(hidden, weight, bias), labels,
                                    temperature=temperature, ignore_index=ignore_index,
                                    return_entropy=return_entropy)


# ---------------------------------------------------------------------------------------
# tiling
# ---------------------------------------------------------------------------------------

_MAX_BLOCK = 4096     # vocabulary columns per tile: wide enough for full-speed matmuls


def _budget(device: torch.device, scalar: bool) -> int:
    """Default tile budget L in logits: on a GPU 2^26, 2^28 for the scalar path (its tiles
    span the whole vocabulary, and each row block adds one float32 pass over the V×H
    grad_weight accumulator for 16-bit inputs: 2^28 keeps those passes to a few); on a CPU
    2^20 (4 MiB of float32, cache-sized), 2^22 for the scalar path."""
    if device.type == "cuda":
        return 1 << (28 if scalar else 26)
    return 1 << (22 if scalar else 20)


def default_chunk_size(n_tokens: int, vocab: int, device: torch.device,
                       scalar: bool = False) -> int:
    """Default tile budget C in token rows of the full vocabulary (tiles hold ≈ C·V logits)."""
    return max(1, min(max(n_tokens, 1), _budget(device, scalar) // vocab))


def tile_shape(n_tokens: int, vocab: int, chunk: int) -> tuple[int, int]:
    """(Nt rows, Vt columns) of the per-token path's tiles for a budget of chunk·V logits.

    Vt is at most 4096 columns, or all of V; Nt ≈ budget / Vt rows, at least 1, at most N,
    evened out over the row blocks (never a sliver of a last block: 16384 rows at a budget
    of 16376 are two blocks of 8192, not 16376 + 8). A budget that covers all N rows at
    that width widens the blocks instead (to a multiple of 64 columns), so a GPU-sized
    budget gives one row block.
    """
    budget = max(1, chunk) * vocab
    n = max(n_tokens, 1)
    width = min(vocab, _MAX_BLOCK)
    if budget // n > width:          # all rows fit: widen the blocks instead
        width = min(vocab, max(width, budget // n // 64 * 64))
    rows = max(1, min(n, budget // width))
    blocks = -(-n // rows)
    return -(-n // blocks), width


def _spans(total: int, step: int):
    return [(i, min(i + step, total)) for i in range(0, total, step)]


@functools.lru_cache(maxsize=None)
def _mm_fp32_out(device_type: str) -> bool:
    """Whether torch.addmm takes 16-bit inputs with a float32 out_dtype on this device."""
    if device_type != "cuda":
        return False
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device="cuda")
        c = torch.ones(2, 2, device="cuda")
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)   # the exact form backward uses
        return bool((c == 3).all())      # host sync: once per process (cached probe)
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _logits_tile(hidden, weight, bias, r0, r1, v0, v1, buf):
    """hidden[r0:r1] @ weight[v0:v1].T (+ bias) -> [r1 − r0, v1 − v0], written into ``buf``.

    Forward and backward both build every tile here, so the recomputed logits are bitwise
    the forward's. One buffer serves all tiles: no per-tile allocation for the allocator
    to fragment (on a CPU, freed tiles otherwise linger in the heap).
    """
    out = buf[: (r1 - r0) * (v1 - v0)].view(r1 - r0, v1 - v0)
    w_blk = weight[v0:v1].t()
    if bias is None:
        return torch.mm(hidden[r0:r1], w_blk, out=out)
    return torch.addmm(bias[v0:v1], hidden[r0:r1], w_blk, out=out)


_TILE_IGNORE, _TILE_OUTSIDE = -2, -1   # tile-relative labels: ignored row, label elsewhere


def _tile_labels(labels, ignored, v0, width):
    """Labels relative to vocabulary block [v0, v0 + width): y − v0 inside it, else a marker.

    The markers are negative, so they never collide with an in-block id, whatever the
    caller's ignore_index is.
    """
    inside = (labels >= v0) & (labels < v0 + width)
    return torch.where(ignored, _TILE_IGNORE, torch.where(inside, labels - v0, _TILE_OUTSIDE))


class _RowMerge:
    """Running full-vocabulary row statistics, merged one tile at a time (all O(N)).

    Per row, over the blocks b seen so far, with m = max_b m_b, a_b = log s_b + (m_b − m)/τ
    and "top" the block that holds the max:
        top   log s_top                     rest = Σ_{b≠top} e^{a_b}
        S     = e^{log s_top} + rest        log S = log1p(expm1(log s_top) + rest)
        u     = Σ_b e^{a_b} (ent_b − a_b + log s_top)
        ent   = u / S + log1p(rest / s_top)        (entropy of a mixture of disjoint supports)
        lab   = (x_y − m_home) / τ, with m_home the max of the block holding the label
        logp  = lab + (m_home − m)/τ − log S
    Everything is relative to the top block, so one dominant block adds no rounding; when
    the max moves to a new block, the old terms rescale by α = e^{(m_old − m)/τ}.
    """

    def __init__(self, n, acc, device, with_entropy):
        self.m = torch.full((n,), float("-inf"), dtype=acc, device=device)
        self.log_s_top = torch.zeros(n, dtype=acc, device=device)
        self.rest = torch.zeros(n, dtype=acc, device=device)
        self.u = torch.zeros(n if with_entropy else 0, dtype=acc, device=device)
        self.lab = torch.full((n,), float("nan"), dtype=acc, device=device)
        self.m_home = torch.zeros(n, dtype=acc, device=device)
        self.with_entropy = with_entropy

    def add(self, r0, r1, stats, ent, x_label, has_label, inv_temperature):
        """Merge one tile's rows r0:r1: stats [Nt, 2] = (m_b, log s_b), ent [Nt] (ent_b),
        x_label [R] the label's logit where ``has_label``."""
        m, log_s_top, rest = self.m[r0:r1], self.log_s_top[r0:r1], self.rest[r0:r1]
        m_b, log_s_b = stats[:, 0], stats[:, 1]
        m_new = torch.maximum(m, m_b)                       # NaN propagates
        grew = m_b > m
        shift_old = torch.where(m == m_new, 0.0, (m - m_new) * inv_temperature)
        shift_b = torch.where(m_b == m_new, 0.0, (m_b - m_new) * inv_temperature)
        alpha = shift_old.exp()
        a_b = log_s_b + shift_b
        e_b = a_b.exp()
        s_old = log_s_top.exp() + rest
        if self.with_entropy:
            u = self.u[r0:r1]
            # grew: old terms rescale by alpha and change reference from log s_top to log s_b
            old = torch.where(alpha > 0, alpha * (u + s_old * (log_s_b - log_s_top - shift_old)),
                              0.0)
            term_b = torch.where(e_b > 0, e_b * (ent - a_b + log_s_top), 0.0)
            u.copy_(torch.where(grew, old + log_s_b.exp() * ent, u + term_b))
        rest.copy_(torch.where(grew, torch.where(alpha > 0, alpha * s_old, 0.0), rest + e_b))
        log_s_top.copy_(torch.where(grew, log_s_b, log_s_top))
        m.copy_(m_new)
        self.lab[r0:r1] = torch.where(has_label, (x_label - m_b) * inv_temperature,
                                      self.lab[r0:r1])
        self.m_home[r0:r1] = torch.where(has_label, m_b, self.m_home[r0:r1])

    def finish(self, ignored, invalid, inv_temperature):
        """-> logp [N], stats [N, 2] = (m, log S), entropy [N] or [0]."""
        zero = torch.zeros_like(self.m)
        log_total = torch.log1p(torch.expm1(self.log_s_top) + self.rest)
        logp = self.lab + (self.m_home - self.m) * inv_temperature - log_total
        logp = torch.where(ignored, zero, torch.where(invalid, float("nan"), logp))
        stats = torch.stack([torch.where(ignored, zero, self.m),
                             torch.where(ignored, zero, log_total)], 1)
        ent = zero[:0]
        if self.with_entropy:
            s = log_total.exp()
            ent = self.u / s + torch.log1p(self.rest / self.log_s_top.exp())
            ent = torch.where(ignored, zero, ent)
        return logp, stats, ent


# ---------------------------------------------------------------------------------------
# per-token path
# ---------------------------------------------------------------------------------------

class LinearLogprobsFunction(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] or None, labels [N] int64 -> (logp, entropy).

    Forward and backward sweep the same Nt×Vt tiles with the same matmul, so the logits
    recomputed in backward are bitwise those of the forward. First-order only.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_temperature, ignore_index,
                with_entropy, chunk, backend):
        n, vocab = hidden.shape[0], weight.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        ignored = labels == ignore_index
        invalid = ~ignored & ((labels < 0) | (labels >= vocab))
        rows, width = tile_shape(n, vocab, chunk)
        fwd = row_kernels(backend).fwd
        merge = _RowMerge(n, acc, hidden.device, with_entropy)
        buf = torch.empty(rows * width if n else 0, dtype=hidden.dtype, device=hidden.device)
        for v0, v1 in _spans(vocab if n else 0, width):
            block_labels = _tile_labels(labels, ignored, v0, v1 - v0)
            inside = block_labels >= 0
            at = block_labels.clamp(min=0).unsqueeze(1)
            for r0, r1 in _spans(n, rows):
                tile = _logits_tile(hidden, weight, bias, r0, r1, v0, v1, buf)     # [Nt, Vt]
                _, stats, ent = fwd(tile, block_labels[r0:r1], inv_temperature,
                                    _TILE_IGNORE, with_entropy)
                x_label = tile.gather(1, at[r0:r1]).squeeze(1).to(acc)
                merge.add(r0, r1, stats.to(acc), ent.to(acc), x_label, inside[r0:r1],
                          inv_temperature)
        del buf
        logp, stats, ent = merge.finish(ignored, invalid, inv_temperature)
        ctx.save_for_backward(hidden, weight, bias, labels, stats, ent)
        ctx.config = (inv_temperature, ignore_index, with_entropy, chunk, backend)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @first_order_only("linear_logprobs")
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, bias, labels, stats, ent = ctx.saved_tensors
        inv_temperature, ignore_index, with_entropy, chunk, backend = ctx.config
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, vocab = hidden.shape[0], weight.shape[0]
        dtype, acc = hidden.dtype, stats.dtype
        grad_logp = (torch.zeros(n, dtype=acc, device=hidden.device) if grad_logp is None
                     else grad_logp.to(acc).contiguous())
        grad_ent = grad_ent.to(acc).contiguous() if with_entropy and grad_ent is not None else None

        low_precision = dtype in (torch.float16, torch.bfloat16)
        fp32_out = low_precision and _mm_fp32_out(hidden.device.type)
        grad_h = (torch.zeros(hidden.shape, device=hidden.device,
                              dtype=torch.float32 if low_precision else dtype) if need_h else None)
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(vocab, dtype=acc, device=hidden.device) if need_b else None

        bwd = row_kernels(backend).bwd
        rows, width = tile_shape(n, vocab, chunk)
        row_spans = _spans(n, rows)
        buf = torch.empty(rows * width if n else 0, dtype=dtype, device=hidden.device)
        # 16-bit grad_weight blocks sum over row tiles in float32, then round once
        w_acc = (torch.empty(width, hidden.shape[1], dtype=torch.float32, device=hidden.device)
                 if need_w and low_precision and len(row_spans) > 1 else None)
        for v0, v1 in _spans(vocab if n else 0, width):
            w_blk = weight[v0:v1]
            for k, (r0, r1) in enumerate(row_spans):
                tile = _logits_tile(hidden, weight, bias, r0, r1, v0, v1, buf)     # [Nt, Vt]
                bwd(tile, labels[r0:r1], stats[r0:r1], ent[r0:r1] if with_entropy else ent,
                    grad_logp[r0:r1], None if grad_ent is None else grad_ent[r0:r1], tile,
                    inv_temperature, ignore_index, vocab, v0)                    # in place
                if need_w and w_acc is not None:
                    blk = w_acc[: v1 - v0]
                    if fp32_out:         # 16-bit matmul, float32 accumulation and output
                        if k == 0:
                            blk.zero_()
                        torch.addmm(blk, tile.t(), hidden[r0:r1], out_dtype=torch.float32,
                                    out=blk)
                    elif k == 0:
                        torch.mm(tile.t().float(), hidden[r0:r1].float(), out=blk)
                    else:
                        blk.addmm_(tile.t().float(), hidden[r0:r1].float())
                elif need_w and k == 0:
                    torch.mm(tile.t(), hidden[r0:r1], out=grad_w[v0:v1])
                elif need_w:
                    grad_w[v0:v1].addmm_(tile.t(), hidden[r0:r1])
                if need_b:
                    grad_b[v0:v1] += tile.sum(0, dtype=acc)
                if need_h and fp32_out:
                    torch.addmm(grad_h[r0:r1], tile, w_blk, out_dtype=torch.float32,
                                out=grad_h[r0:r1])
                elif need_h and low_precision:
                    grad_h[r0:r1] += (tile @ w_blk).float()
                elif need_h:
                    grad_h[r0:r1].addmm_(tile, w_blk)
            if w_acc is not None:
                grad_w[v0:v1] = w_acc[: v1 - v0]
        del buf, w_acc
        return (grad_h.to(dtype) if need_h else None, grad_w,
                grad_b.to(bias.dtype) if need_b else None, None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------
# scalar path: sum of log-probs, gradients computed during the forward sweep
# ---------------------------------------------------------------------------------------

class LinearLogprobSumFunction(torch.autograd.Function):
    """Σ_i logp_i over non-ignored rows -> a 0-d tensor; gradients (for an upstream c = 1)
    are computed in forward, over full-vocabulary row tiles, and scaled by c in backward.
    Float32/float64; 16-bit on a GPU whose matmuls write float32 from 16-bit inputs, where
    grad_hidden, grad_weight and grad_bias accumulate in float32 and round once, after the
    scaling. First-order only; the first backward consumes the gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_temperature, ignore_index, chunk,
                backend, grad_enabled):
        n, vocab = hidden.shape[0], weight.shape[0]
        # needs_input_grad is set even under torch.no_grad(): evaluation must not pay for
        # gradients, so the caller's grad mode comes in as ``grad_enabled``
        need_h, need_w, need_b = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        kernels = row_kernels(backend)
        rows = max(1, min(n, chunk))
        low = hidden.dtype in (torch.float16, torch.bfloat16)      # float32 accumulators
        acc = torch.float32 if low else hidden.dtype
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=hidden.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=hidden.device) if need_b else None
        total = torch.zeros((), dtype=torch.float64 if hidden.dtype == torch.float64
                            else torch.float32, device=hidden.device)
        buf = torch.empty(rows * vocab if n else 0, dtype=hidden.dtype, device=hidden.device)
        for r0, r1 in _spans(n, rows):
            tile = _logits_tile(hidden, weight, bias, r0, r1, 0, vocab, buf)       # [Nt, V]
            lab = labels[r0:r1]
            logp, stats, _ = kernels.fwd(tile, lab, inv_temperature, ignore_index, False)
            total += logp.sum()
            if not (need_h or need_w or need_b):
                continue
            ones = torch.ones(r1 - r0, dtype=stats.dtype, device=hidden.device)
            kernels.bwd(tile, lab, stats, stats[:0, 0], ones, None, tile, inv_temperature,
                        ignore_index, vocab, 0)                                  # in place
            if need_h and low:
                torch.addmm(grad_h[r0:r1], tile, weight, out_dtype=torch.float32,
                            out=grad_h[r0:r1])
            elif need_h:
                torch.mm(tile, weight, out=grad_h[r0:r1])
            if need_w and low:
                torch.addmm(grad_w, tile.t(), hidden[r0:r1], out_dtype=torch.float32, out=grad_w)
            elif need_w:
                grad_w.addmm_(tile.t(), hidden[r0:r1])
            if need_b:
                grad_b += tile.sum(0, dtype=acc)
        del buf
        ctx.save_for_backward(hidden, weight, bias)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if not (need_h or need_w or need_b):
            ctx.mark_non_differentiable(total)
        return total

    @staticmethod
    @first_order_only("linear_logprobs")
    def backward(ctx, grad_total):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError(
                "linear_logprobs(reduction='sum'|'mean'): this graph was already backpropagated "
                "(the gradients computed in forward are consumed by the first backward; "
                "use reduction='none' and reduce yourself for retain_graph=True)")
        ctx.grads = None
        out = tuple(None if g is None else g.mul_(grad_total.to(g.dtype)).to(dtype)
                    for g, dtype in zip(grads, ctx.dtypes))
        return out + (None,) * 6


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                    bias: torch.Tensor | None = None, temperature: float = 1.0,
                    ignore_index: int = -100, return_entropy: bool = False,
                    chunk_size: int | None = None, reduction: str = "none"):
    """log softmax((hidden·weightᵀ + bias) / temperature)[label], without ever holding the
    N×V logits (the two paths and their costs: the module docstring).

    Args:
        hidden: [..., H] float32, float16 or bfloat16 (float64 runs on the torch backend).
        weight: [V, H] the lm_head, in hidden's dtype. bias: [V] or None.
        labels: [...] (hidden's leading dims) integer token ids in [0, V), or
            ``ignore_index``.
        temperature: divides the logits before the softmax (> 0).
        ignore_index: label value whose positions give logp = entropy = 0 and no gradient.
        return_entropy: also return the entropy of each position's softmax.
        chunk_size: tiles hold about ``chunk_size·V`` logits (None: 2^20 logits on a CPU,
            2^26 on a GPU, 4x that for the sum/mean path); peak extra memory is
            O(chunk_size·V + N·H) whatever it is.
        reduction: "none" (per position), "sum" or "mean" (over the positions whose label
            is not ``ignore_index``; 0 when there are none). "sum"/"mean" without entropy
            compute the gradients during the forward (one matmul fewer); such a graph can
            be backpropagated once.

    Returns:
        logp [...] float32 (float64 for float64 inputs), or a 0-d tensor for "sum"/"mean";
        (logp, entropy) when ``return_entropy``. Gradients flow to hidden, weight and bias.

    A label outside [0, V) that is not ``ignore_index`` gives NaN (``KERNELRL_DEBUG=1``
    raises ValueError instead).
    """
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndim_min=1)
    check_tensor("weight", weight, dtypes=(hidden.dtype,), ndim=2)
    check_same_device("weight", weight, hidden.device)
    vocab, width = weight.shape
    if width != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape [V, {hidden.shape[-1]}] to match hidden's "
                         f"last dimension, got {tuple(weight.shape)}")
    if vocab == 0:
        raise ValueError("weight: expected a vocabulary of size >= 1, got 0 rows")
    if bias is not None:
        check_tensor("bias", bias, dtypes=(hidden.dtype,), ndim=1)
        check_same_device("bias", bias, hidden.device)
        if bias.shape[0] != vocab:
            raise ValueError(f"bias: expected shape [{vocab}], got {tuple(bias.shape)}")
    check_labels("labels", labels, hidden.shape[:-1], hidden.device)
    check_choice("reduction", reduction, ("none", "sum", "mean"))
    inv_temperature = 1.0 / check_temperature(temperature)
    ignore_index = int(ignore_index)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    if _backend.debug_enabled():
        check_labels_in_range("labels", labels, vocab, ignore_index)

    backend = _backend.select("linear_logprobs", hidden.device, hidden.dtype)
    rows = hidden.reshape(-1, width)
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    scalar = (reduction != "none" and not return_entropy
              and (hidden.dtype in (torch.float32, torch.float64)
                   or (hidden.device.type == "cuda" and _mm_fp32_out("cuda"))))
    chunk = chunk_size or default_chunk_size(rows.shape[0], vocab, hidden.device, scalar)
    if scalar:
        logp = LinearLogprobSumFunction.apply(rows, weight, bias, flat_labels, inv_temperature,
                                              ignore_index, chunk, backend,
                                              torch.is_grad_enabled())
        if reduction == "mean":
            logp = logp / (flat_labels != ignore_index).sum().clamp(min=1)  # stays on device
        return logp
    else:
        logp, ent = LinearLogprobsFunction.apply(rows, weight, bias, flat_labels,
                                                 inv_temperature, ignore_index,
                                                 bool(return_entropy), chunk, backend)
    if reduction == "none":
        logp = logp.reshape(labels.shape)
        ent = ent.reshape(labels.shape) if return_entropy else ent
    else:
        logp, ent = logp.sum(), ent.sum()
        if reduction == "mean":
            count = (flat_labels != ignore_index).sum().clamp(min=1)  # stays on device
            logp, ent = logp / count, ent / count
    return (logp, ent) if return_entropy else logp


def _examples(device: torch.device, dtype: torch.dtype) -> list:
    """Representative inputs for ``kernelrl tune``: one per-token and one mean (SFT) call."""
    n, width, vocab = (1024, 128, 32000) if device.type == "cpu" else (8192, 4096, 128256)
    out = []
    for reduction in ("none", "mean"):
        hidden = torch.randn(n, width, device=device).to(dtype).requires_grad_()
        weight = (torch.randn(vocab, width, device=device) * 2 / width ** 0.5).to(dtype)
        labels = torch.randint(0, vocab, (n,), device=device)
        labels[::10] = -100
        out.append((f"N={n} H={width} V={vocab} reduction={reduction}",
                    (hidden, weight.requires_grad_(), labels), {"reduction": reduction}))
    return out


_backend.register_op("linear_logprobs", ROW_IMPLEMENTATIONS, skip=ROW_SKIP,
                     examples=_examples, fn=linear_logprobs)
