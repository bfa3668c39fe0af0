"""Preference data and direct DPO computations for tests/train/test_dpo.py.

The data reuse the counting task of train_helpers: "count from X to Y :" is best answered
with the numbers from X to Y in order. Worse answers count backwards, or swap the last two
numbers; a tiny random Llama learns to prefer the right order within a few dozen steps.
"""

from __future__ import annotations

import random

import torch

from train_helpers import NUMBERS
from kernelrl.models.logprobs import sequence_logprobs
from kernelrl.ops import dpo_loss


def _count(start: int, stop: int) -> tuple[str, list[str]]:
    return f"count from {NUMBERS[start]} to {NUMBERS[stop]} :", NUMBERS[start:stop + 1]


def pair_examples(n: int, seed: int = 0) -> list[dict]:
    """``n`` {"prompt", "chosen", "rejected"} lines: the count in order is chosen, the
    same numbers backwards rejected (2 to 5 numbers, so the two always differ)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(0, 5)
        prompt, words = _count(start, start + rng.randrange(1, 5))
        out.append({"prompt": prompt, "chosen": " " + " ".join(words),
                    "rejected": " " + " ".join(reversed(words))})
    return out


def ranking_example(start: int = 1, stop: int = 4) -> dict:
    """One {"prompt", "responses"} line ranking three answers: in order, the last two
    swapped, backwards."""
    prompt, words = _count(start, stop)
    swapped = words[:-2] + words[-1:] + words[-2:-1]
    return {"prompt": prompt, "responses": [" " + " ".join(w) for w in
                                            (words, swapped, words[::-1])]}


def as_pairs(example: dict) -> list[dict]:
    """A ranking line as its C(K, 2) explicit chosen/rejected lines, (0, 1), (0, 2), ..."""
    responses = example["responses"]
    return [{"prompt": example["prompt"], "chosen": responses[i], "rejected": responses[j]}
            for i in range(len(responses)) for j in range(i + 1, len(responses))]


def direct_loss(policy, reference, batch, cfg) -> tuple[torch.Tensor, dict[str, float]]:
    """The batch's loss written out from the pieces: sequence log-probs of both models
    (length-averaged for ipo), ``kernelrl.ops.dpo_loss`` per pair, then the mean over each
    prompt's pairs and over prompts. Returns (loss with gradients, reward metrics)."""
    average = cfg.loss_type == "ipo"
    args = (batch.input_ids, batch.attention_mask, batch.labels)
    logps = sequence_logprobs(policy, *args, average=average)
    with torch.no_grad():
        ref = sequence_logprobs(reference, *args, average=average)
    losses, chosen, rejected = dpo_loss(
        logps[batch.better], logps[batch.worse], ref[batch.better], ref[batch.worse],
        beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
        discopop_tau=cfg.discopop_tau)
    prompts = batch.pair_prompt
    loss = torch.zeros(())
    metrics = {"rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/accuracies": 0.0}
    for p in range(batch.num_prompts):
        mine = prompts == p
        loss = loss + losses[mine].mean() / batch.num_prompts
        metrics["rewards/chosen"] += chosen[mine].mean().item() / batch.num_prompts
        metrics["rewards/rejected"] += rejected[mine].mean().item() / batch.num_prompts
        metrics["rewards/accuracies"] += ((chosen[mine] > rejected[mine]).float().mean().item()
                                          / batch.num_prompts)
    return loss, metrics
