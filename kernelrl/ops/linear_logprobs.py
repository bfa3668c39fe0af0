"""Log-probs from hidden states and the lm_head, without ever holding the N×V logits.

Shapes: N tokens (leading dims flattened), H hidden, V vocabulary, C chunk rows,
B vocabulary block columns, B ≈ C·V / N rounded up to a multiple of 64, so N·B ≈ C·V.

    logits = hidden @ weight.T + bias                      [N, V], never materialised whole
    logp, entropy = token_logprobs(logits, labels, ...)    see kernelrl.ops.logprobs

The work is tiled into vocabulary blocks of B columns (the same tile size as C token rows
of the full vocabulary). Blocks rather than token chunks, because the forward and the
backward then compute each tile with the very same matmul, so the logits recomputed in
backward are bitwise those the forward normalised; with token chunks forward and
vocabulary blocks backward, fp32 gradients drifted to 4x eager torch's error.

Forward: per block, tile = hidden @ weight[v0:v1].T (+ bias) in the input dtype [N, B],
swept once by the log-prob row kernel for its max, log-sum, entropy and, where the label
falls in the block, the label's log-prob; the per-block results ([blocks, N] floats) merge
exactly into full-vocabulary ones (``_merge_blocks``). Only the row stats (max, log-sum)
and the entropy, 3·N floats, are kept for backward.

Backward (exact for any per-token upstream gradient g, g_H): with the row stats and H,
∂/∂logits_ij = (g_i(1[j=y_i] − p_ij) − g_Hi p_ij (log p_ij + H_i)) / T depends only on row
i's scalars, so each block is recomputed, turned into its gradient in place by the row
kernel, and used twice:

    grad_weight[v0:v1] = G_blk.T @ hidden       one matmul per block: one rounding
    grad_hidden       += G_blk @ weight[v0:v1]   accumulated in float32 for 16-bit inputs
    grad_bias[v0:v1]   = G_blk.sum(0)

That is 4 matmuls of 2·N·H·V flops (1 forward, 3 backward) against eager's 3, traded for
never holding an N×V tensor or its float32 copy. Liger-Kernel's trick — gradients computed
in the forward pass and only scaled in backward — is exact only when every token's upstream
gradient is the same; PPO and DPO weight tokens differently, so this op does not use it.

Peak extra memory (beyond inputs, outputs and N-sized vectors): one N·B ≈ C·V tile in the
input dtype (+ ~3 float32 copies of it on the torch backend), an N×H product per block,
and an N×H float32 accumulator for float16/bfloat16 inputs: O(C·V + N·H). The default C
targets 2^26 logits per tile on a GPU and 2^24 on a CPU.

The three algorithms, one reduction away:
    SFT   loss = -linear_logprobs(h, W, y, reduction="mean")          mean token CE
    DPO   seq_logp = linear_logprobs(h, W, y).view(B, T).sum(-1)       prompt labels = ignore
    PPO   logp = linear_logprobs(h, W, y).view(B, T)                   per-token log-probs
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kernelrl import backend as _backend
from kernelrl.ops._checks import (FLOAT_DTYPES, KERNEL_DTYPES, check_choice, check_labels,
                                  check_labels_in_range, check_same_device, check_temperature,
                                  check_tensor)
from kernelrl.ops.logprobs import ROW_BWD, ROW_FWD, token_logprobs_reference

__all__ = ["linear_logprobs", "linear_logprobs_reference", "default_chunk_size"]

_backend.register_op(
    "linear_logprobs",
    dtypes={"native": KERNEL_DTYPES, "triton": KERNEL_DTYPES, "torch": FLOAT_DTYPES},
    # CPU: bench_logprobs shows the C++ kernels faster than the torch path, so native leads.
    # CUDA: the kernels compile but have not yet been benchmarked on a GPU.
    skip=_backend.not_yet_measured("cuda", "native", "triton"),
)


def linear_logprobs_reference(hidden, weight, labels, *, bias=None, temperature=1.0,
                              ignore_index=-100, return_entropy=False):
    """The full-size computation: materialise the logits, then token_logprobs_reference."""
    return token_logprobs_reference(F.linear(hidden, weight, bias), labels,
                                    temperature=temperature, ignore_index=ignore_index,
                                    return_entropy=return_entropy)


def default_chunk_size(n_tokens: int, vocab: int, device: torch.device) -> int:
    """Tile budget C in token rows: about 2^26 logits per tile on a GPU, 2^24 on a CPU.

    On a CPU, tiles narrower than ~2048 columns cost the matmuls up to 40% of their speed
    (N=8192, H=256); 2^24 fp32 logits are 64 MiB.
    """
    budget = 1 << (26 if device.type == "cuda" else 24)
    return max(1, min(n_tokens, max(16, budget // vocab)))


def _vocab_block(n_tokens: int, vocab: int, chunk: int) -> int:
    """Backward block width B ≈ chunk·V / N columns, a multiple of 64, at most V."""
    block = -(-chunk * vocab // max(n_tokens, 1))
    return min(vocab, max(64, -(-block // 64) * 64))


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


def _logits_tile(hidden, weight, bias, v0, width, buf):
    """hidden @ weight[v0:v0 + width].T (+ bias) -> [N, width], written into ``buf``.

    Forward and backward both build every tile here, so the recomputed logits are bitwise
    the forward's. One buffer serves all blocks: no per-block allocation for the
    allocator to fragment (on a CPU, freed tiles otherwise linger in the heap).
    """
    out = buf[: hidden.shape[0] * width].view(hidden.shape[0], width)
    w_blk = weight[v0:v0 + width].t()
    if bias is None:
        return torch.mm(hidden, w_blk, out=out)
    return torch.addmm(bias[v0:v0 + width], hidden, w_blk, out=out)


_TILE_IGNORE, _TILE_OUTSIDE = -2, -1   # tile-relative labels: ignored row, label in another block


def _tile_labels(labels, ignored, v0, width):
    """Labels relative to vocabulary block [v0, v0 + width): y − v0 inside it, else a marker.

    The markers are negative, so they never collide with an in-block id, whatever the
    caller's ignore_index is.
    """
    inside = (labels >= v0) & (labels < v0 + width)
    return torch.where(ignored, _TILE_IGNORE, torch.where(inside, labels - v0, _TILE_OUTSIDE))


def _merge_blocks(parts, labels, ignored, invalid, block, inv_temperature, with_entropy):
    """Combine per-block row results into full-vocabulary logp, row stats and entropy.

    Block b has max logit m_b, log s_b (its own log-sum, relative to m_b), its entropy H_b
    and, if it holds the label, logp_b. With m = max_b m_b and a_b = log s_b + (m_b − m)/T:
        S − 1 = expm1(a_b*) + Σ_{b≠b*} e^{a_b}          (b* holds the max: no cancellation)
        logp  = logp_b(y) + a_b(y) − log S,    w_b = e^{a_b − log S},
        H     = Σ_b w_b (H_b − log w_b)        (entropy of a mixture of disjoint supports)
    All tensors here are [blocks, N]; nothing here is V-sized.
    """
    logp_b = torch.stack([p[0] for p in parts])
    m_b = torch.stack([p[1][:, 0] for p in parts])
    log_s_b = torch.stack([p[1][:, 1] for p in parts])
    m, top = m_b.max(dim=0)
    a = log_s_b + (m_b - m) * inv_temperature
    is_top = torch.arange(len(parts), device=m.device).unsqueeze(1) == top
    rest = torch.where(is_top, 0.0, a.exp()).sum(0)
    log_total = torch.log1p(torch.expm1(a.gather(0, top.unsqueeze(0)).squeeze(0)) + rest)
    home = (labels.clamp(min=0) // block).clamp(max=len(parts) - 1).unsqueeze(0)
    logp = logp_b.gather(0, home).squeeze(0) + a.gather(0, home).squeeze(0) - log_total
    zero = torch.zeros_like(logp)
    logp = torch.where(ignored, zero, torch.where(invalid, torch.full_like(zero, float("nan")),
                                                  logp))
    stats = torch.stack([torch.where(ignored, zero, m), torch.where(ignored, zero, log_total)], 1)
    ent = zero[:0]
    if with_entropy:
        log_w = a - log_total
        w = log_w.exp()
        ent_b = torch.stack([p[2] for p in parts])
        ent = torch.where(ignored, zero, torch.where(w > 0, w * (ent_b - log_w), 0.0).sum(0))
    return logp, stats, ent


class LinearLogprobsFunction(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] or None, labels [N] int64 -> (logp, entropy).

    Forward and backward sweep the same vocabulary blocks with the same matmul, so the
    logits recomputed in backward are bitwise those of the forward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_temperature, ignore_index,
                with_entropy, chunk, backend):
        n, vocab = hidden.shape[0], weight.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        ignored = labels == ignore_index
        invalid = ~ignored & ((labels < 0) | (labels >= vocab))
        block = _vocab_block(n, vocab, chunk)
        fwd = ROW_FWD[backend]
        parts = []
        buf = torch.empty(n * block if n else 0, dtype=hidden.dtype, device=hidden.device)
        for v0 in range(0, vocab if n else 0, block):
            width = min(block, vocab - v0)
            tile = _logits_tile(hidden, weight, bias, v0, width, buf)          # [N, B]
            parts.append(fwd(tile, _tile_labels(labels, ignored, v0, width), inv_temperature,
                             _TILE_IGNORE, with_entropy))
        del buf
        if parts:
            logp, stats, ent = _merge_blocks(parts, labels, ignored, invalid, block,
                                             inv_temperature, with_entropy)
        else:
            logp = torch.empty(0, dtype=acc, device=hidden.device)
            ent = torch.empty(0, dtype=acc, device=hidden.device)
            stats = torch.empty(0, 2, dtype=acc, device=hidden.device)
        ctx.save_for_backward(hidden, weight, bias, labels, stats, ent)
        ctx.config = (inv_temperature, ignore_index, with_entropy, chunk, backend)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
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
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.empty(vocab, dtype=acc, device=hidden.device) if need_b else None

        bwd = ROW_BWD[backend]
        block = _vocab_block(n, vocab, chunk)
        buf = torch.empty(n * block if n else 0, dtype=dtype, device=hidden.device)
        for v0 in range(0, vocab if n else 0, block):
            v1 = min(v0 + block, vocab)
            w_blk = weight[v0:v1]
            tile = _logits_tile(hidden, weight, bias, v0, v1 - v0, buf)              # [N, B]
            bwd(tile, labels, stats, ent, grad_logp, grad_ent, tile, inv_temperature,
                ignore_index, vocab, v0)                                          # in place
            if need_w:
                torch.mm(tile.t(), hidden, out=grad_w[v0:v1])
            if need_b:
                grad_b[v0:v1] = tile.sum(0, dtype=acc)
            if need_h and fp32_out:
                torch.addmm(grad_h, tile, w_blk, out_dtype=torch.float32, out=grad_h)
            elif need_h and low_precision:
                grad_h += (tile @ w_blk).float()
            elif need_h:
                grad_h.addmm_(tile, w_blk)
        del buf
        if n == 0:
            if need_w:
                grad_w.zero_()
            if need_b:
                grad_b.zero_()
        return (grad_h.to(dtype) if need_h else None, grad_w,
                grad_b.to(bias.dtype) if need_b else None, None, None, None, None, None, None)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                    bias: torch.Tensor | None = None, temperature: float = 1.0,
                    ignore_index: int = -100, return_entropy: bool = False,
                    chunk_size: int | None = None, reduction: str = "none"):
    """``token_logprobs(hidden @ weight.T + bias, labels)`` without an N×V tensor.

    Args:
        hidden: [..., H] float32, float16 or bfloat16 (float64 runs on the torch backend).
        weight: [V, H] lm_head weight, same dtype and device as ``hidden``.
        labels: [...] integer token ids in [0, V), or ``ignore_index``.
        bias: optional [V] lm_head bias.
        temperature, ignore_index, return_entropy: as in :func:`token_logprobs`.
        chunk_size: tile budget C, in token rows of the full vocabulary: tiles hold about
            C·V logits. Peak extra memory is O(C·V + N·H) (module docstring). Default
            :func:`default_chunk_size`.
        reduction: ``"none"`` (per-token [...]), ``"sum"``, or ``"mean"`` over tokens
            whose label is not ``ignore_index``. The entropy is reduced the same way.

    Returns:
        logp (float32; float64 for float64 inputs), or (logp, entropy). Gradients flow to
        ``hidden``, ``weight`` and ``bias`` and are exact for any upstream gradient.
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
    chunk = chunk_size or default_chunk_size(rows.shape[0], vocab, hidden.device)
    logp, ent = LinearLogprobsFunction.apply(rows, weight, bias, flat_labels, inv_temperature,
                                             ignore_index, bool(return_entropy), chunk, backend)
    if reduction == "none":
        logp = logp.reshape(labels.shape)
        ent = ent.reshape(labels.shape) if return_entropy else ent
    else:
        logp, ent = logp.sum(), ent.sum()
        if reduction == "mean":
            count = (flat_labels != ignore_index).sum().clamp(min=1)  # stays on device
            logp, ent = logp / count, ent / count
    return (logp, ent) if return_entropy else logp
