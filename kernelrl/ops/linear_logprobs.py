"""Log-probs from hidden states and the lm_head, without ever holding the N×V logits.

Shapes: N tokens (leading dims flattened), H hidden, V vocabulary, C chunk rows,
B = vocabulary block columns in backward (B ≈ C·V / N, a multiple of 64).

    logits = hidden @ weight.T + bias                      [N, V], never materialised whole
    logp, entropy = token_logprobs(logits, labels, ...)    see kernelrl.ops.logprobs

Forward: token chunks of C rows. Each chunk's logits [C, V] are computed by one matmul in
the input dtype, swept once by the log-prob row kernel, and dropped; only the row stats (and the
entropy) — N floats — are kept.

Backward (exact for any per-token upstream gradient g, g_H): vocabulary blocks of B columns.
With the row stats (max, log-sum) and H saved, ∂/∂logits_ij = (g_i(1[j=y_i] − p_ij) − g_Hi p_ij (log p_ij + H_i)) / T
depends only on row i's scalars, so each block is recomputed (logits[:, v0:v1] = hidden @
weight[v0:v1].T), turned into its gradient in place by the row kernel, and used twice:

    grad_weight[v0:v1] = G_blk.T @ hidden      one matmul per block: one rounding, exact rows
    grad_hidden       += G_blk @ weight[v0:v1]  accumulated in float32 for 16-bit inputs
    grad_bias[v0:v1]   = G_blk.sum(0)

That is 4 matmuls of 2·N·H·V flops (1 forward, 3 backward) against eager's 3, traded for
never holding an N×V tensor or its float32 copy. Liger-Kernel's trick — gradients computed
in the forward pass and only scaled in backward — is exact only when every token's upstream
gradient is the same; PPO and DPO weight tokens differently, so this op does not use it.

Peak extra memory (beyond inputs, outputs and N-sized vectors):
    forward   C·V logits in the input dtype (+ ~3 float32 C·V copies on the torch backend)
    backward  N·B ≈ C·V gradient tile, an N×H product per block, and an N×H float32
              accumulator for float16/bfloat16 inputs
so O(C·V + N·H). The default C targets 2^26 logits per tile on a GPU and 2^22 on a CPU.

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
)


def linear_logprobs_reference(hidden, weight, labels, *, bias=None, temperature=1.0,
                              ignore_index=-100, return_entropy=False):
    """The full-size computation: materialise the logits, then token_logprobs_reference."""
    return token_logprobs_reference(F.linear(hidden, weight, bias), labels,
                                    temperature=temperature, ignore_index=ignore_index,
                                    return_entropy=return_entropy)


def default_chunk_size(n_tokens: int, vocab: int, device: torch.device) -> int:
    """Rows per forward chunk: about 2^26 logits per tile on a GPU, 2^22 on a CPU."""
    budget = 1 << (26 if device.type == "cuda" else 22)
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
        return bool((c == 3).all())
    except (TypeError, RuntimeError, NotImplementedError):
        return False


class LinearLogprobsFunction(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] or None, labels [N] int64 -> (logp, entropy)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_temperature, ignore_index,
                with_entropy, chunk, backend):
        n = hidden.shape[0]
        fwd = ROW_FWD[backend]
        parts = []
        for start in range(0, n, chunk):
            logits = F.linear(hidden[start:start + chunk], weight, bias)     # [C, V]
            parts.append(fwd(logits, labels[start:start + chunk], inv_temperature,
                             ignore_index, with_entropy))
            del logits
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        if parts:
            logp, stats, ent = (torch.cat(p) for p in zip(*parts))
        else:
            logp = ent = torch.empty(0, dtype=acc, device=hidden.device)
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
        for v0 in range(0, vocab if n else 0, block):
            v1 = min(v0 + block, vocab)
            w_blk = weight[v0:v1]
            tile = F.linear(hidden, w_blk, None if bias is None else bias[v0:v1])   # [N, B]
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
            del tile
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
        chunk_size: rows per forward chunk C; peak extra memory is O(C·V + N·H)
            (module docstring). Default :func:`default_chunk_size`.
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
