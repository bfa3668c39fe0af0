"""Token and sequence log-probs of a Hugging Face causal LM, without ever building its logits.

Legend: B batch, T time, N tokens, V vocabulary, H hidden width; τ the temperature.

    hidden = model.get_decoder()(input_ids, attention_mask, position_ids)   [B, T, H]
    logp[b, t] = log softmax(hidden[b, t] @ W.T (+ bias) / τ)[labels[b, t + 1]]   [B, T − 1]

W [V, H] is ``model.get_output_embeddings().weight``; the decoder applies the final norm.
Position t holds the log-prob of token t + 1 given tokens ≤ t. Only the N scored positions
(those whose label is not ignored) are gathered and passed to
``kernelrl.ops.linear_logprobs``, which never holds the [N, V] logits, so prompt and
padding rows cost no lm_head work; the other positions are 0. Finding them (nonzero)
costs one device-to-host sync per call, a graph break under torch.compile.

Which positions are scored: position t (label ``labels[:, t + 1]``) counts when that label
is not -100 and token t + 1 is predicted from its own sequence:
    2-D attention_mask [B, T]:       tokens t and t + 1 are both real (mask 1), so padding
                                     on either side (right or left) is never scored;
    4-D attention_mask [B, 1, T, T]: query t + 1 attends to key t;
    position_ids [B, T] (or [1, T]):  position_ids[t + 1] == position_ids[t] + 1, so the
                                     first token of each packed sequence is never scored
                                     (it would be predicted from the previous sequence).
These rules apply to explicit labels as well; ``labels=None`` means ``input_ids``.

Packed sequences (several sequences in one row), two ways:
  * position_ids restarting at 0 at each sequence and attention_mask=None: transformers
    (≥ 5) sees the restarts and builds the block-diagonal causal mask itself (sdpa, eager,
    flex), and flash-attention uses them as varlen boundaries. The preferred form. It needs
    attention_mask=None: transformers looks for restarts only then, and a 2-D mask of ones
    would let each token attend to the earlier sequences of its row.
  * a 4-D attention_mask [B, 1, T, T] (with position_ids for the rotary embedding):
    transformers uses a 4-D mask as given, with no causal mask added, so it must hold the
    causal block-diagonal pattern itself, and sliding windows are not applied. A boolean
    (or integer) mask means True/nonzero = attend and is turned here into the additive
    float form the eager attention needs (transformers 5.24's eager attention adds the
    mask to the scores, so a boolean mask would be added as 0/1 and silently mask
    nothing); a floating mask is passed as given and must be additive: 0 where attended,
    ``torch.finfo(dtype).min`` where masked, in the model's dtype.
"""

from __future__ import annotations

import torch

from kernelrl.models.hf import check_supported
from kernelrl.ops import linear_logprobs

__all__ = ["token_logprobs", "sequence_logprobs", "scored_labels", "final_hidden_states"]

IGNORE_INDEX = -100


def _check_ids(name, tensor, shape=None):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got {tensor.dtype}")
    if shape is None:
        if tensor.ndim != 2 or tensor.shape[1] < 1:
            raise ValueError(f"{name}: expected shape [B, T] with T >= 1, got "
                             f"{tuple(tensor.shape)}")
    elif tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} (that of input_ids), got "
                         f"{tuple(tensor.shape)}")


def _check_mask(attention_mask, batch, time):
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a torch.Tensor or None, got "
                        f"{type(attention_mask).__name__}")
    shape = tuple(attention_mask.shape)
    if attention_mask.ndim == 2:
        if shape != (batch, time):
            raise ValueError(f"attention_mask: expected a 2-D mask of shape [{batch}, {time}] "
                             f"(that of input_ids) or a 4-D one, got {shape}")
    elif attention_mask.ndim == 4:
        if shape[0] not in (1, batch) or shape[2:] != (time, time):
            raise ValueError(f"attention_mask: expected a 4-D mask of shape "
                             f"[{batch}, 1, {time}, {time}] or a 2-D one, got {shape}")
    else:
        raise ValueError(f"attention_mask: expected a 2-D [B, T] or 4-D [B, 1, T, T] mask, "
                         f"got {attention_mask.ndim} dimensions {shape}")


def _attends(mask4: torch.Tensor) -> torch.Tensor:
    """Boolean [B, heads, T, T]: where a 4-D mask lets a query attend to a key."""
    if mask4.dtype == torch.bool:
        return mask4
    if mask4.dtype.is_floating_point:
        return mask4 > torch.finfo(mask4.dtype).min / 2
    return mask4 != 0


def _additive(mask4: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean or integer 4-D mask (True = attend) as the additive float mask transformers'
    attention adds to its scores (0 where attended, finfo(dtype).min where masked); a
    floating mask is returned as given."""
    if mask4.dtype.is_floating_point:
        return mask4
    allowed = _attends(mask4)
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)


def scored_labels(input_ids, attention_mask=None, labels=None, position_ids=None):
    """Labels shifted to the predicting positions, -100 where not scored: [B, T − 1].

    ``out[:, t] = labels[:, t + 1]`` (``input_ids`` when labels is None), set to -100 where
    token t + 1 is not predicted from its own sequence (see the module docstring).
    """
    _check_ids("input_ids", input_ids)
    batch, time = input_ids.shape
    if labels is None:
        labels = input_ids
    else:
        _check_ids("labels", labels, input_ids.shape)
    _check_mask(attention_mask, batch, time)
    keep = labels[:, 1:] != IGNORE_INDEX
    if attention_mask is not None and attention_mask.ndim == 2:
        real = attention_mask.to(device=labels.device) != 0
        keep = keep & real[:, 1:] & real[:, :-1]
    elif attention_mask is not None:
        allowed = _attends(attention_mask[:, 0]).to(device=labels.device)    # [B|1, T, T]
        steps = torch.arange(1, time, device=labels.device)
        keep = keep & allowed[:, steps, steps - 1]
    if position_ids is not None and position_ids.ndim == 2:
        if position_ids.shape[1] != time or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids: expected shape [{batch}, {time}] or [1, {time}], "
                             f"got {tuple(position_ids.shape)}")
        pos = position_ids.to(device=labels.device)
        keep = keep & (pos[:, 1:] == pos[:, :-1] + 1)
    return labels[:, 1:].masked_fill(~keep, IGNORE_INDEX)


def final_hidden_states(decoder, input_ids, attention_mask=None,
                        position_ids=None) -> torch.Tensor:
    """The decoder's final hidden states [B, T, H] (after its final norm), no KV cache.

    ``decoder`` is ``model.get_decoder()`` (e.g. LlamaModel). A boolean or integer 4-D
    attention_mask is turned into the additive float form first (module docstring); a
    2-D one is passed as given.
    """
    if attention_mask is not None and attention_mask.ndim == 4:
        embeddings = decoder.get_input_embeddings()
        dtype = (embeddings.weight.dtype if embeddings is not None
                 else next(decoder.parameters()).dtype)
        attention_mask = _additive(attention_mask, dtype)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def token_logprobs(model, input_ids, attention_mask=None, labels=None, *, position_ids=None,
                   temperature=1.0, return_entropy=False, reduction="none"):
    """Log-probs of each next token under ``model``, from the hidden states and the lm_head.

    Args:
        model: a decoder-only transformers causal LM (see kernelrl.models.hf.check_supported).
        input_ids: [B, T] token ids.
        attention_mask: None, [B, T] (1 real, 0 padding; right or left padding) or a 4-D
            [B, 1, T, T] mask for packed sequences (module docstring).
        labels: [B, T] aligned with input_ids (not shifted), -100 where not scored (e.g.
            the prompt); None means input_ids. Padding, and sequence starts given by
            position_ids or a 4-D mask, are never scored whatever the labels say.
        position_ids: [B, T] or [1, T]; for packed rows, restarting at 0 per sequence.
        temperature: τ, the logits are divided by it.
        return_entropy: also return the entropy of each scored position's distribution.
        reduction: "none" -> [B, T − 1], 0 where not scored; "sum" or "mean" (over the
            scored positions) -> a scalar.

    Returns logp, or (logp, ent) with ``return_entropy``; float32 for 16-bit models.
    """
    result, _ = _token_logprobs(model, input_ids, attention_mask, labels, position_ids,
                                temperature, return_entropy, reduction)
    return result


def _token_logprobs(model, input_ids, attention_mask, labels, position_ids, temperature,
                    return_entropy, reduction):
    """token_logprobs, and the shifted labels it scored ([B, T − 1], -100 where not)."""
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction: expected one of 'none', 'sum', 'mean', got {reduction!r}")
    check_supported(model)
    shifted = scored_labels(input_ids, attention_mask, labels, position_ids)   # [B, T − 1]
    batch, time = input_ids.shape
    steps = max(time - 1, 0)
    head = model.get_output_embeddings()
    hidden = final_hidden_states(model.get_decoder(), input_ids, attention_mask,
                                 position_ids)                       # [B, T, H]
    width = hidden.shape[-1]

    # Gather the N scored positions: flat row b·T + t of hidden, b·(T − 1) + t of the output.
    keep = (shifted != IGNORE_INDEX).reshape(-1)
    out_rows = keep.nonzero().squeeze(1)                               # [N] into B·(T − 1)
    in_rows = out_rows + out_rows // max(steps, 1)                     # [N] into B·T
    rows = hidden.reshape(batch * time, width).index_select(0, in_rows.to(hidden.device))
    rows = rows.to(head.weight.dtype)
    targets = shifted.reshape(-1).index_select(0, out_rows).to(rows.device)
    result = linear_logprobs(rows, head.weight, targets, bias=head.bias,
                             temperature=temperature, return_entropy=return_entropy,
                             reduction=reduction)
    if reduction != "none":
        return result, shifted
    index = out_rows.to(rows.device)

    def scatter(values):
        return values.new_zeros(batch * steps).index_copy(0, index, values).view(batch, steps)

    if return_entropy:
        return (scatter(result[0]), scatter(result[1])), shifted
    return scatter(result), shifted


def sequence_logprobs(model, input_ids, attention_mask, labels, *, average=False,
                      position_ids=None, temperature=1.0):
    """Each row's summed log-prob of its scored tokens: [B].

        seq_logp[b] = Σ_t logp[b, t]                           (average=False; DPO)
        seq_logp[b] = Σ_t logp[b, t] / #scored positions of b  (average=True; IPO), 0 if none

    ``labels`` [B, T] are -100 on the prompt and padding (the scored tokens are the
    response); attention_mask may be 2-D or 4-D and position_ids may mark packed
    sequences, both passed to the decoder as in ``token_logprobs``. A packed row's value
    is the sum over all the sequences it holds; per-sequence values come from
    ``token_logprobs`` summed per segment.
    """
    logp, shifted = _token_logprobs(model, input_ids, attention_mask, labels, position_ids,
                                    temperature, False, "none")
    total = logp.sum(-1)
    if not average:
        return total
    count = (shifted != IGNORE_INDEX).sum(-1).clamp(min=1)
    return total / count.to(total.device, total.dtype)
