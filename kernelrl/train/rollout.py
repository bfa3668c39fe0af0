"""Rollouts for PPO and GRPO: batched sampling with a KV cache, and the rollout's log-probs
from the very function and inputs the policy update uses.

Legend: B batch (prompts), T time (P + R), P prompt width (the longest prompt; shorter ones
are left-padded), R response width (the longest response; shorter ones are right-padded),
V vocabulary, H hidden width; τ the temperature.

Sampling (``generate``)::

    prompts (lists of ids) -> input_ids, mask [B, P]      left-padded, one host-to-device copy
    position_ids = clamp(cumsum(mask) − 1, min=0)         left padding does not shift positions
    prefill:  decoder(input_ids, mask, position_ids)      fills the KV cache; lm_head on the last
                                                          position only -> logits [B, V] float32
    banned = bool mask [V] of bad_token_ids               built once per call, on the device
    step r = 0 .. R − 1:
        y_r ~ softmax(top_p(top_k(ban(logits) / τ)))       ban: −inf at the banned ids
                                                          (masked_fill, no host sync);
                                                          Gumbel-max: argmax(filtered − log E),
                                                          E ~ Exp(1) [B, V] (τ = 0: argmax)
        sampler_logprobs[:, r] = log_softmax(logits / τ)[y_r]   temperature-scaled, UNFILTERED
        decode_step(y_r [B, 1], mask [B, P + r + 1], position [B, 1], cache) -> logits [B, V]

A row finishes at its first EOS or stop token (kept as its last response token); from then
on it emits ``pad_token_id`` with attention-mask 0. Only [B, V] rows of logits ever exist,
never [B, T, V]. One decode step is a replaceable function (``decode_step``, default
``next_token_logits``) so that another implementation (e.g. a 4-bit GEMV path) can be
swapped in. The sampler's log-prob is that of the tempered distribution before the ban,
top-k and top-p, so it is comparable with ``rollout_logprobs(..., temperature=τ)``; at
τ = 0 (greedy) it is the log-prob under τ = 1.

Banned tokens (``bad_token_ids``, e.g. pad, BOS, unk and other control tokens, which a
policy pushed far emits mid-response): their logits are −inf before the temperature,
top-k, top-p and the draw (or the argmax), so a banned id is never sampled, even when its
logit is the highest. Like top-k and top-p, the ban filters the sampler; it does not change
the policy. π is still softmax(logits / τ) over the whole vocabulary: ``sampler_logprobs``
and ``rollout_logprobs`` are both its unfiltered log-probs (so ``logprob_drift`` stays at
float rounding). Why this is the consistent design for PPO and GRPO:

  * The importance ratio ρ = π_θ(y) / π_old(y) takes the old and the new log-probs from the
    same call (``rollout_logprobs`` on the same rollout; ``kernelrl.train.rl.
    policy_logprobs``), the ban entering neither, so ρ = 1 exactly at the first epoch,
    with or without a ban. What must not happen is a masked log-prob on one side of the
    ratio and an unmasked one on the other; here both are unmasked.
  * The sampler is then q(y) = π(y) / π(A) on the allowed tokens A, not π: log q(y) =
    log π(y) − log π(A), the same kind of sampler/policy gap that top-k and top-p open
    (PPO's ratio ignores it). It is 0 when the banned ids carry no probability, and tiny
    when they are sampled rarely, the case a ban of stray special tokens is for. In the
    surrogate's gradient, A·∇log π(y) = A·∇log q(y) + A·∇log π(A), the extra term
    vanishes with the banned mass; the KL to the reference and the entropy are those of
    π, as for top-k and top-p.
  * Renormalising the scoring over A as well would keep ρ = 1 too (both sides masked), but
    the policy trained would then be right only under the ban, and the fused log-prob
    kernel (which never builds the [B, T, V] logits) would need the banned logits; so the
    ban stays a sampling filter.

EOS must stay allowed (a response must be able to end), and so must the stop tokens:
banning one is a ValueError, as is an id outside [0, V).

Scoring (``rollout_logprobs``): ``kernelrl.models.logprobs.token_logprobs`` over the whole
sequences [B, T], with ``Rollout.labels`` (-100 on the prompt and padding) and
``Rollout.position_ids``, sliced to the response: [B, R]. A PPO update that calls it on
the same rollout, with the same model, gets bitwise the same log-probs, so the importance
ratio at its first epoch is exactly 1. ``logprob_drift`` is max |sampler − rollout| log-prob
over response tokens: the KV-cache path and the full-sequence path agree to float rounding
(about 1e-6 in float32, more in 16-bit).

Host syncs, each on purpose:
  * building the batch from the prompts (host lists, one copy to the device), and the
    mask of ``bad_token_ids`` (one more copy, once per call; each step's ban is a
    ``masked_fill`` on the device);
  * "have all rows finished?", once every ``FINISHED_CHECK_EVERY`` decode steps, not every
    step: a sync drains the device queue and stalls the CPU's kernel launches for the next
    step, while checking less often costs at most FINISHED_CHECK_EVERY − 1 wasted steps;
  * once after the loop, to cut the response width R to the longest response (so the result
    does not depend on when the check ran);
  * ``rollout_logprobs``: one per call (the scored positions, inside token_logprobs);
  * ``Rollout.responses`` / ``texts`` copy the ids to the host.
  transformers' own mask building may add its own (its sdpa path checks whether the padding
  mask is all ones on each forward); a custom ``decode_step`` can avoid that.

The model runs as it is: call ``model.eval()`` for rollouts without dropout, and score with
the model in the same mode as the update. Sampling runs under ``torch.no_grad()``.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from kernelrl.models.hf import check_supported
from kernelrl.models.logprobs import IGNORE_INDEX, token_logprobs

__all__ = ["Rollout", "generate", "rollout_logprobs", "logprob_drift", "next_token_logits",
           "sample_tokens", "bad_token_mask", "filter_logits", "positions_from_mask",
           "pad_prompts", "FINISHED_CHECK_EVERY"]

# Decode steps between two "all rows finished?" checks (each one is a host sync).
FINISHED_CHECK_EVERY = 8

DecodeStep = Callable[..., tuple]
GeneratorArg = Union[torch.Generator, Sequence[torch.Generator], None]


# ---- the result ------------------------------------------------------------------------------

@dataclass
class Rollout:
    """A batch of sampled responses.

    sequences        [B, P + R] long   left-padded prompt, then the response, right-padded
                                       (``pad_token_id`` after a row's end)
    attention_mask   [B, P + R] long   1 on real prompt and response tokens, 0 on padding
    prompt_length    P (int)           the padded prompt width; responses start at column P
    response_mask    [B, R] long       1 on response tokens (the final EOS/stop included)
    response_lengths [B] long          tokens per response (= response_mask.sum(-1))
    finished         [B] bool          True: ended with EOS or a stop token; False: cut off
                                       by max_new_tokens
    sampler_logprobs [B, R] float32    log-prob of each sampled token under the sampling
                                       distribution: log_softmax(logits / τ) before the ban
                                       of bad_token_ids, top-k and top-p (τ = 1 when
                                       sampling greedily); 0 on padding
    temperature      τ (float)         the sampling temperature (0: greedy)
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int
    response_mask: torch.Tensor
    response_lengths: torch.Tensor
    finished: torch.Tensor
    sampler_logprobs: torch.Tensor
    temperature: float = 1.0

    @property
    def batch_size(self) -> int:
        return self.sequences.shape[0]

    @property
    def response_width(self) -> int:
        """R, the padded response width."""
        return self.sequences.shape[1] - self.prompt_length

    @property
    def response_ids(self) -> torch.Tensor:
        """The response columns of ``sequences``: [B, R], padding included."""
        return self.sequences[:, self.prompt_length:]

    @property
    def position_ids(self) -> torch.Tensor:
        """[B, P + R] positions from the attention mask, as the sampler used them."""
        return positions_from_mask(self.attention_mask)

    @property
    def labels(self) -> torch.Tensor:
        """``sequences`` with -100 everywhere but the response tokens: [B, P + R]."""
        prompt = torch.zeros_like(self.sequences[:, :self.prompt_length], dtype=torch.bool)
        scored = torch.cat([prompt, self.response_mask.bool()], dim=1)
        return self.sequences.masked_fill(~scored, IGNORE_INDEX)

    def responses(self) -> list[list[int]]:
        """Each row's response token ids (EOS/stop included, padding dropped), on the host."""
        ids = self.response_ids.tolist()
        lengths = self.response_lengths.tolist()
        return [row[:n] for row, n in zip(ids, lengths)]

    def prompts(self) -> list[list[int]]:
        """Each row's prompt token ids (padding dropped), on the host."""
        ids = self.sequences[:, :self.prompt_length].tolist()
        mask = self.attention_mask[:, :self.prompt_length].tolist()
        return [[t for t, m in zip(row, keep) if m] for row, keep in zip(ids, mask)]

    def texts(self, tokenizer, skip_special_tokens: bool = True) -> list[str]:
        """The responses decoded with ``tokenizer.batch_decode``."""
        return tokenizer.batch_decode(self.responses(), skip_special_tokens=skip_special_tokens)


# ---- helpers ---------------------------------------------------------------------------------

def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] from a 2-D mask: cumsum − 1, clamped at 0 (left padding gets 0,
    right padding repeats the last position)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _check_token(name: str, value, vocab: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
        raise ValueError(f"{name}: expected a token id in [0, {vocab}), got {value!r}")


def pad_prompts(prompts, pad_token_id: int, device=None, *, vocab_size: Optional[int] = None,
                max_positions: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad a list of token-id lists (or 1-D integer tensors): (input_ids, attention_mask),
    both [B, P] long, P the longest prompt. Built on the host, one copy to ``device``."""
    if isinstance(prompts, (torch.Tensor, str)) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts: expected a list of token-id lists, got "
                         f"{type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts: expected at least one prompt, got an empty list")
    rows = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, torch.Tensor):
            if prompt.ndim != 1 or prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
                raise ValueError(f"prompts[{i}]: expected a 1-D integer tensor, got "
                                 f"{prompt.dtype} of shape {tuple(prompt.shape)}")
            prompt = prompt.tolist()
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise ValueError(f"prompts[{i}]: expected a list of token ids, got "
                             f"{type(prompt).__name__} (tokenize the text first)")
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}]: expected at least one token, got an empty prompt")
        if max_positions is not None and len(prompt) > max_positions:
            raise ValueError(f"prompts[{i}]: {len(prompt)} tokens, more than the model's "
                             f"max_position_embeddings ({max_positions})")
        high = vocab_size if vocab_size is not None else float("inf")
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < high:
                bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
                raise ValueError(f"prompts[{i}]: expected token ids in {bound}, got {t!r}")
        rows.append(list(prompt))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[b, width - len(row):] = 1
    return ids.to(device), mask.to(device)


@functools.lru_cache(maxsize=None)
def _cache_argument(decoder_type: type) -> str:
    """The name under which the decoder's forward takes the KV cache: ``cache`` since
    transformers 5.2x (``past_key_values`` kept as a deprecated alias), before that
    ``past_key_values``."""
    params = inspect.signature(decoder_type.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise ValueError(f"model: the decoder {decoder_type.__name__}.forward takes neither `cache` "
                     f"nor `past_key_values`; expected a transformers decoder with a KV cache")


def next_token_logits(model, input_ids, attention_mask, position_ids, cache):
    """One forward with the KV cache: the next-token logits of the last position.

    input_ids [B, T'] (T' = P for the prefill, 1 per decode step); attention_mask
    [B, past + T'] (1 real, 0 padding); position_ids [B, T']; cache: the model's cache
    object, or None to let the model create one (prefill). Returns (logits [B, V] float32,
    cache). The lm_head runs on the last position only: hidden[:, -1] @ W.T (+ bias).
    """
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    out = decoder(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids, use_cache=True,
                  **{_cache_argument(type(decoder)): cache})
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    if new_cache is None:
        raise ValueError(f"model: {type(decoder).__name__} returned no KV cache with "
                         f"use_cache=True (gradient checkpointing in training mode with "
                         f"gradients enabled turns it off)")
    last = hidden[:, -1].to(head.weight.dtype)                                  # [B, H]
    return F.linear(last, head.weight, head.bias).float(), new_cache          # [B, V]


# ---- sampling --------------------------------------------------------------------------------

def _check_sampling(temperature, top_k, top_p) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), got "
                         f"{temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k: expected an int >= 0 (0 = off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or \
            not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a number in (0, 1] (1 = off), got {top_p!r}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k, then top-p (nucleus) filtering of logits [..., V]: dropped tokens get -inf.

    top_k > 0 keeps the tokens whose logit is at least the k-th largest (ties at the k-th
    are all kept). top_p < 1 keeps, per row, the smallest set of most likely tokens whose
    probability (softmax of the top-k-filtered logits) sums to at least top_p: a token is
    kept when the mass of the tokens ranked before it is < top_p, so the most likely token
    is always kept. Apply the temperature before (the nucleus depends on it).
    """
    _check_sampling(1.0, top_k, top_p)
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        ranked, order = logits.sort(dim=-1, descending=True)
        probs = ranked.float().softmax(dim=-1)
        before = F.pad(probs.cumsum(dim=-1)[..., :-1], (1, 0))    # mass ranked strictly before
        drop_ranked = before >= top_p
        drop_ranked[..., 0] = False
        drop = torch.zeros_like(drop_ranked).scatter(-1, order, drop_ranked)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _exponential(logits: torch.Tensor, generator: GeneratorArg) -> torch.Tensor:
    """E ~ Exp(1) [B, V] float32: one draw for the batch, or one [V] draw per row from its
    own generator (so a row's noise does not depend on the batch it is in)."""
    if generator is None or isinstance(generator, torch.Generator):
        noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        noise.exponential_(generator=generator)
    else:
        vocab = logits.shape[-1]
        noise = torch.stack([torch.empty(vocab, dtype=torch.float32, device=logits.device)
                             .exponential_(generator=g) for g in generator])
    # exponential_ may return an exact 0; -log(0) = inf would pick a filtered-out token.
    return noise.clamp_(min=torch.finfo(torch.float32).tiny)


def bad_token_mask(bad_token_ids: Optional[Sequence[int]], vocab: int, *,
                   eos_token_id: Optional[int] = None, stop_token_ids: Sequence[int] = (),
                   device=None) -> Optional[torch.Tensor]:
    """The bool mask [V] of ``bad_token_ids`` on ``device`` (True: never sampled), for
    ``sample_tokens(banned=...)``; None when there is nothing to ban. Built on the host,
    one copy to the device. ValueErrors name ``bad_token_ids``: an id outside [0, vocab),
    EOS or a stop token (a row must be able to end), or every token of the vocabulary."""
    if bad_token_ids is None:
        return None
    if isinstance(bad_token_ids, (int, str, bytes, torch.Tensor)) or \
            not isinstance(bad_token_ids, Sequence):
        raise ValueError(f"bad_token_ids: expected a sequence of token ids or None, got "
                         f"{bad_token_ids!r}")
    for t in bad_token_ids:
        _check_token("bad_token_ids", t, vocab)
    banned = set(bad_token_ids)
    if not banned:
        return None
    if eos_token_id is not None and eos_token_id in banned:
        raise ValueError(f"bad_token_ids: {eos_token_id} is eos_token_id; EOS cannot be "
                         f"banned (a response must be able to end): remove it from "
                         f"bad_token_ids")
    stops = sorted(banned.intersection(stop_token_ids))
    if stops:
        raise ValueError(f"bad_token_ids: {stops[0]} is in stop_token_ids; a stop token "
                         f"cannot be banned: remove it from one or the other")
    if len(banned) >= vocab:
        raise ValueError(f"bad_token_ids: bans all {vocab} tokens of the vocabulary; "
                         f"nothing would be left to sample")
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[sorted(banned)] = True
    return mask.to(device)


def sample_tokens(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, generator: GeneratorArg = None,
                  banned: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from logits [B, V]: (tokens [B] long, logprobs [B] float32).

    ``banned``: a bool mask [V] (or [B, V]; ``bad_token_mask``) of tokens that get logit
    −inf first, so they are never chosen (at least one token per row must stay allowed).
    temperature 0 then takes the argmax. Otherwise the token is drawn from
    softmax(filter_logits(banned-out logits / τ, top_k, top_p)) by the Gumbel-max trick,
    argmax(filtered − log E) with E ~ Exp(1), which needs no host sync. ``generator``: a
    torch.Generator on the logits' device, or a sequence of B of them (one per row). The
    log-prob returned is log_softmax(logits / τ) of the token, before the ban and the
    filters (τ = 1 when greedy): the policy's, as ``rollout_logprobs`` gives it (module
    docstring).
    """
    _check_sampling(temperature, top_k, top_p)
    logits = logits.float()
    allowed = logits if banned is None else logits.masked_fill(banned, float("-inf"))
    if temperature == 0:
        tokens = allowed.argmax(dim=-1)
        logprobs = logits.log_softmax(dim=-1)
    else:
        scaled = logits / temperature
        logprobs = scaled.log_softmax(dim=-1)
        filtered = filter_logits(allowed / temperature, top_k, top_p)
        tokens = (filtered - _exponential(filtered, generator).log()).argmax(dim=-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def _check_generator(generator, batch: int, device: torch.device):
    if generator is None:
        return None
    gens = [generator] if isinstance(generator, torch.Generator) else generator
    if isinstance(gens, torch.Tensor) or not isinstance(gens, Sequence):
        raise ValueError(f"generator: expected a torch.Generator, a list of one per prompt, "
                         f"or None, got {type(generator).__name__}")
    if not isinstance(generator, torch.Generator) and len(gens) != batch:
        raise ValueError(f"generator: expected one generator per prompt ({batch}), got "
                         f"{len(gens)}")
    for g in gens:
        if not isinstance(g, torch.Generator):
            raise ValueError(f"generator: expected torch.Generator objects, got "
                             f"{type(g).__name__}")
        if torch.device(g.device).type != device.type:
            raise ValueError(f"generator: expected a generator on the model's device "
                             f"({device.type}), got one on {g.device}")
    return generator if isinstance(generator, torch.Generator) else list(gens)


# ---- generate --------------------------------------------------------------------------------

def generate(model, prompts, *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, eos_token_id: Optional[int], pad_token_id: int,
             stop_token_ids: Sequence[int] = (), generator: GeneratorArg = None,
             decode_step: Optional[DecodeStep] = None,
             bad_token_ids: Optional[Sequence[int]] = None) -> Rollout:
    """Sample a response to each prompt with the model's KV cache (module docstring).

    Args:
        model: a decoder-only transformers causal LM (kernelrl.models.hf.check_supported).
        prompts: a list of B token-id lists (or 1-D integer tensors), of any lengths >= 1.
        max_new_tokens: the most response tokens per row (>= 1).
        temperature: τ; 0 = greedy (argmax, top_k/top_p ignored).
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus sampling, keep the smallest set with mass >= top_p (1 = off).
        eos_token_id: ends a row (and is part of its response); None = no EOS.
        pad_token_id: fills the left padding of prompts and every column after a row's end.
        stop_token_ids: further tokens that end a row, as EOS does.
        generator: a torch.Generator on the model's device (reproducible sampling), or a list
            of B of them, one per row: then each row's tokens do not depend on the other
            prompts in the batch (up to float rounding of the batched forward), at the
            cost of one small noise kernel per row per step.
        decode_step: ``f(model, input_ids [B, 1], attention_mask [B, P + r + 1],
            position_ids [B, 1], cache) -> (logits [B, V] float32, cache)``; default
            ``next_token_logits``. The prefill always uses ``next_token_logits``.
        bad_token_ids: token ids never sampled (logit −inf before the temperature, top-k
            and top-p; greedy included), or None. EOS and the stop tokens cannot be
            banned. ``sampler_logprobs`` stay the unbanned policy's log-probs, as
            ``rollout_logprobs`` computes them (module docstring: why the first PPO
            epoch's ratio is still exactly 1).

    Returns a Rollout; R is the longest response (<= max_new_tokens).
    """
    check_supported(model)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
            max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
    _check_sampling(temperature, top_k, top_p)
    head = model.get_output_embeddings()
    device = head.weight.device
    vocab = head.weight.shape[0]
    embeddings = model.get_input_embeddings()
    in_vocab = getattr(embeddings, "num_embeddings", vocab)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    max_positions = getattr(config, "max_position_embeddings", None)
    _check_token("pad_token_id", pad_token_id, in_vocab)
    _check_token("eos_token_id", eos_token_id, vocab, allow_none=True)
    if isinstance(stop_token_ids, (int, str)) or not isinstance(stop_token_ids, Sequence):
        raise ValueError(f"stop_token_ids: expected a sequence of token ids, got "
                         f"{stop_token_ids!r}")
    for t in stop_token_ids:
        _check_token("stop_token_ids", t, vocab)
    banned = bad_token_mask(bad_token_ids, vocab, eos_token_id=eos_token_id,
                            stop_token_ids=stop_token_ids, device=device)      # [V] or None
    if decode_step is None:
        decode_step = next_token_logits
    elif not callable(decode_step):
        raise ValueError(f"decode_step: expected a callable or None, got "
                         f"{type(decode_step).__name__}")

    input_ids, prompt_mask = pad_prompts(prompts, pad_token_id, device, vocab_size=in_vocab,
                                         max_positions=max_positions)
    batch, width = input_ids.shape
    if max_positions is not None and width + max_new_tokens > max_positions:
        raise ValueError(f"max_new_tokens: the longest prompt ({width} tokens) plus "
                         f"max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_position_embeddings ({max_positions})")
    generator = _check_generator(generator, batch, device)
    stops = set(stop_token_ids) | ({eos_token_id} if eos_token_id is not None else set())
    stops = torch.tensor(sorted(stops), dtype=torch.long, device=device)       # [S]

    total = width + max_new_tokens
    sequences = torch.full((batch, total), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((batch, total), dtype=torch.long, device=device)
    sequences[:, :width] = input_ids
    mask[:, :width] = prompt_mask
    sampler_logprobs = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    pad = torch.full((batch,), pad_token_id, dtype=torch.long, device=device)

    with torch.no_grad():
        positions = positions_from_mask(prompt_mask)                            # [B, P]
        logits, cache = next_token_logits(model, input_ids, prompt_mask, positions, None)
        next_position = positions[:, -1:] + 1   # [B, 1]: column P − 1 is real in every row
        steps = 0
        for r in range(max_new_tokens):
            column = width + r
            tokens, logprobs = sample_tokens(logits, temperature=temperature, top_k=top_k,
                                             top_p=top_p, generator=generator, banned=banned)
            alive = ~finished
            tokens = torch.where(alive, tokens, pad)
            sequences[:, column] = tokens
            mask[:, column] = alive.long()
            sampler_logprobs[:, r] = logprobs.masked_fill(finished, 0.0)
            if stops.numel():
                finished = finished | torch.isin(tokens, stops)
            steps = r + 1
            if steps == max_new_tokens:
                break
            # Host sync, every FINISHED_CHECK_EVERY steps only (module docstring).
            if steps % FINISHED_CHECK_EVERY == 0 and bool(finished.all()):
                break
            logits, cache = decode_step(model, sequences[:, column:column + 1],
                                        mask[:, :column + 1], next_position, cache)
            if tuple(logits.shape) != (batch, vocab):
                raise ValueError(f"decode_step: expected logits of shape [{batch}, {vocab}], "
                                 f"got {tuple(logits.shape)}")
            logits = logits.float()
            next_position = next_position + 1

    response_mask = mask[:, width:width + steps]
    response_lengths = response_mask.sum(-1)
    # Host sync, once: cut R to the longest response, whichever step the loop stopped at.
    span = int(response_lengths.max())
    return Rollout(sequences=sequences[:, :width + span].contiguous(),
                   attention_mask=mask[:, :width + span].contiguous(),
                   prompt_length=width,
                   response_mask=response_mask[:, :span].contiguous(),
                   response_lengths=response_lengths,
                   finished=finished,
                   sampler_logprobs=sampler_logprobs[:, :span].contiguous(),
                   temperature=float(temperature))


# ---- scoring ---------------------------------------------------------------------------------

def _check_rollout(rollout) -> None:
    if not isinstance(rollout, Rollout):
        raise ValueError(f"rollout: expected a Rollout (from generate), got "
                         f"{type(rollout).__name__}")


def rollout_logprobs(model, rollout: Rollout, *, temperature: float = 1.0,
                     return_entropy: bool = False):
    """Log-probs of the response tokens under ``model``: [B, R] float32, 0 on padding (and
    the entropies [B, R] with ``return_entropy``).

    token_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.labels,
    position_ids=rollout.position_ids, temperature=τ) sliced to the response columns: the
    call a PPO update makes, so calling this again on the same rollout and model gives
    bitwise the same values. Runs under the caller's grad mode (wrap it in torch.no_grad()
    for the old log-probs). Use the sampling temperature to compare with
    ``rollout.sampler_logprobs`` (τ = 1 for a greedy rollout).
    """
    _check_rollout(rollout)
    out = token_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.labels,
                         position_ids=rollout.position_ids, temperature=temperature,
                         return_entropy=return_entropy)          # [B, P + R − 1]
    start = rollout.prompt_length - 1     # position t scores token t + 1: P − 1 scores column P
    if return_entropy:
        logp, ent = out
        return logp[:, start:], ent[:, start:]
    return out[:, start:]


def logprob_drift(rollout: Rollout, logprobs: torch.Tensor) -> torch.Tensor:
    """max |rollout.sampler_logprobs − logprobs| over the response tokens: a 0-dim float32
    tensor (no host sync), 0 when there are none. ``logprobs`` [B, R] as rollout_logprobs
    returns them."""
    _check_rollout(rollout)
    if not isinstance(logprobs, torch.Tensor) or \
            tuple(logprobs.shape) != tuple(rollout.sampler_logprobs.shape):
        got = tuple(logprobs.shape) if isinstance(logprobs, torch.Tensor) else \
            type(logprobs).__name__
        raise ValueError(f"logprobs: expected a tensor of shape "
                         f"{tuple(rollout.sampler_logprobs.shape)} (that of the rollout's "
                         f"sampler_logprobs), got {got}")
    diff = (rollout.sampler_logprobs - logprobs.detach().float()).abs()
    return diff.masked_fill(rollout.response_mask == 0, 0.0).amax()
