"""Preference data for the reward-model tests, in train_helpers' tiny vocabulary.

A learnable preference: every response of a prompt has the same number of words (so
length says nothing), and a better response holds more copies of a marker word, at random
places. Ranked best first, K responses hold K − 1, ..., 1, 0 markers.
"""

from __future__ import annotations

import random

import torch

from train_helpers import NUMBERS, VOCAB

MARKER = "then"


def ranked_examples(n: int, seed: int = 0, ks: tuple[int, ...] = (2, 3, 4)) -> list[dict]:
    """``n`` prompts, each with K ∈ ``ks`` responses ranked by their marker count: K = 2 as
    {"prompt", "chosen", "rejected"}, K > 2 as {"prompt", "responses": [best, ..., worst]}."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.choice(ks)
        start = rng.randrange(0, 6)
        prompt = f"count from {NUMBERS[start]} to {NUMBERS[start + rng.randrange(1, 4)]} :"
        length = rng.randrange(k, k + 3)
        responses = []
        for markers in range(k - 1, -1, -1):
            words = [rng.choice(NUMBERS) for _ in range(length)]
            for place in rng.sample(range(length), markers):
                words[place] = MARKER
            responses.append(" " + " ".join(words))
        if k == 2:
            rows.append({"prompt": prompt, "chosen": responses[0], "rejected": responses[1]})
        else:
            rows.append({"prompt": prompt, "responses": responses})
    return rows


def as_pairs(rows: list[dict]) -> list[dict]:
    """Every ranking of ``rows`` written out as its C(K, 2) chosen/rejected lines (in the
    order of ``kernelrl.train.data.ranking_pairs``)."""
    out = []
    for row in rows:
        ranked = row["responses"] if "responses" in row else [row["chosen"], row["rejected"]]
        for i in range(len(ranked)):
            for j in range(i + 1, len(ranked)):
                out.append({"prompt": row["prompt"], "chosen": ranked[i],
                            "rejected": ranked[j]})
    return out


def right_padded(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, T] of "<s> text </s>" per text, right-padded with
    <pad>: the plain format the data layer writes for a tokenizer without a chat template."""
    rows = [[VOCAB["<s>"]] + [VOCAB[w] for w in text.split()] + [VOCAB["</s>"]]
            for text in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [VOCAB["<pad>"]] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def trained_from_checkpoint(model_dir, run_dir, lora: dict | None = None):
    """The reward model as training left it, rebuilt without the trainer's export: the
    base causal LM of ``model_dir`` (with LoRA adapter ``reward`` built from ``lora``,
    the apply_lora keyword arguments, when given) under a head, the run's latest
    checkpoint loaded into its trainable state. In eval mode."""
    from kernelrl.models.hf import load_model
    from kernelrl.models.lora import apply_lora
    from kernelrl.models.reward import RewardModel
    from kernelrl.train.checkpoint import load_checkpoint, load_model_state
    from kernelrl.train.common import trainable_state

    lm = load_model(model_dir)
    if lora is not None:
        apply_lora(lm, adapter_name="reward", **lora)
    model = RewardModel.from_causal_lm(lm, pad_token_id=VOCAB["<pad>"])
    load_model_state(trainable_state(model), load_checkpoint(run_dir).model)
    return model.eval()
