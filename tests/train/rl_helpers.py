"""Prompts, rule-based rewards and small builders for tests/train/test_rl.py and
test_grpo.py, in train_helpers' tiny vocabulary.

The reward to learn: +1 for each occurrence of a marker word in the response. A tiny
random Llama says it about once in 27 tokens; GRPO makes it say it more within a few
dozen steps. ``marker_reward`` is importable as ``rl_helpers:marker_reward`` (this folder
is on sys.path under pytest).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch

from train_helpers import NUMBERS

MARKER = "then"


def prompt_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` {"prompt": "count from X to Y :"} lines."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start = rng.randrange(0, 5)
        rows.append({"prompt": f"count from {NUMBERS[start]} to "
                               f"{NUMBERS[start + rng.randrange(1, 5)]} :"})
    return rows


def marker_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """+1 per occurrence of MARKER in the response."""
    assert len(prompts) == len(responses)
    return [float(r.split().count(MARKER)) for r in responses]


def length_reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """The response's word count, as a tensor (the other return type a reward may have)."""
    return torch.tensor([len(r.split()) for r in responses])


def write_module(folder, name: str, source: str) -> Path:
    """A Python module ``name`` with ``source`` in ``folder``."""
    path = Path(folder) / f"{name}.py"
    path.write_text(source, encoding="utf-8")
    return path


def slice_experience(exp, rows: slice):
    """The experience of rows ``rows`` only (same widths): a micro-batch cut from a larger
    one, so that losses over the pieces can be compared with the loss over the whole."""
    from kernelrl.train.rl import Experience

    r = exp.rollout
    rollout = dataclasses.replace(
        r, sequences=r.sequences[rows], attention_mask=r.attention_mask[rows],
        response_mask=r.response_mask[rows], response_lengths=r.response_lengths[rows],
        finished=r.finished[rows], sampler_logprobs=r.sampler_logprobs[rows])
    ref = exp.ref_logprobs[rows] if exp.ref_logprobs is not None else None
    return Experience(rollout, exp.samples[rows], exp.logprobs[rows], exp.entropy[rows], ref,
                      exp.rewards[rows], exp.scores[rows], exp.generate_seconds)
