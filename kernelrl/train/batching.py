"""Batches for the trainers: padding, SFT packing, and a resumable, seeded batch order.

Shapes: B batch (examples, packed rows, or prompts), T time (the longest row of the
batch), K responses of one prompt, S = ΣK sequences of a preference batch, P pairs.

SFT, ``collate_sft``: right padding to the longest sample (or a multiple of
``pad_to_multiple_of``), input_ids [B, T] padded with the pad id, labels [B, T] with -100
on prompt and padding, attention_mask [B, T] (1 real, 0 padding), position_ids [B, T]
(0, 1, ... per row).

SFT packing, ``pack_rows`` + ``collate_packed``: samples are packed once (best-fit
decreasing over their lengths) into rows of at most max_length tokens. In a row every
sample's position_ids restart at 0 and ``segment_ids`` number its samples 1, 2, ...; the
padding at the row's end is segment 0, its positions restarting at 0 too. attention_mask is
None. ``batch.model_inputs()`` gives the model a 4-D block-diagonal causal mask
[B, 1, T, T] (``block_causal_mask``: True where query t may attend to key s, i.e. same
segment and s <= t), boolean by default or additive (0 / dtype min) with ``dtype``.
Transformers 5.24 hands a 4-D mask to the attention unchanged: sdpa takes either form,
eager needs the additive one in the model's dtype. ``model_inputs(mask="position_ids")``
passes attention_mask=None instead, and transformers 5.24 then finds the packed sequences
itself from the position_ids restarts (``find_packed_sequence_indices``, sdpa/eager/flex;
flash-attention uses the restarts as well), but only without a KV cache: model_inputs
always passes use_cache=False (a forward with use_cache=True and attention_mask=None
would attend across samples). Padding being a segment of its own, no query
row is fully masked (which would give NaN under sdpa). Every collate sets the label of
each sample's first token to -100 (kernelrl.train.data does too): nothing predicts it, and
in a packed row a shifted loss would otherwise score it from the previous sample.

Preferences, ``collate_preferences``: the K responses of each of the B prompts are S
sequences, in prompt order (prompt 0's responses, then prompt 1's, ...), each forwarded
once; input_ids, labels (-100 on prompt and padding), attention_mask [S, T], and per pair
(better, worse) indices into S, the prompt of each pair, and
pair_weight = 1 / (pairs of its prompt) / B, so that (pair_weight · per_pair_loss).sum() is
the loss averaged over each prompt's pairs, then over prompts.

Normalising over a step of several micro-batches: SFT's ``num_label_tokens`` counts the
labels that are not -100 (exactly the targets of the shifted loss); a step's token loss is
Σ_micro (token loss sum) / Σ_micro num_label_tokens. Preferences give ``num_pairs`` and
``num_prompts``: with per-prompt averaging, a step's loss is
Σ_micro (pair_weight · loss).sum() · num_prompts / Σ_micro num_prompts.

Order, ``ResumableSampler``: epoch e's order is a permutation seeded by (seed, e); with
``bucket_size`` it is cut into windows of bucket_size batches, each sorted by length and
cut into batches, and the batches are shuffled (fewer pad tokens, still random).
``state_dict()`` is {seed, epoch, position, num_units}: the epoch and index within it of
the next batch, updated as each batch is handed out, so a trainer that saves it with its
checkpoint and loads it back continues with exactly the next batch, across epoch
boundaries too (a batch fetched ahead counts as handed out: save the state after the
batches the step trained on, before fetching further). ``BatchLoader`` puts a dataset,
the sampler and the collation together.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, fields, replace
from typing import Iterator, Sequence

import torch

from kernelrl.train.data import (IGNORE_INDEX, PreferenceDataset, PreferenceSample,
                                 SFTDataset, SFTSample)

__all__ = [
    "SFTBatch", "PreferenceBatch", "collate_sft", "collate_packed", "collate_preferences",
    "pack_rows", "block_causal_mask", "ResumableSampler", "BatchLoader",
]


def _to(batch, device, non_blocking: bool):
    moved = {f.name: getattr(batch, f.name) for f in fields(batch)}
    moved = {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
             for k, v in moved.items()}
    return replace(batch, **moved)


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, T] segment ids -> [B, 1, T, T] mask: query t sees key s iff same segment, s <= t.

    Boolean (True = attend) without ``dtype``; with it, additive: 0 where attending and the
    dtype's minimum elsewhere.
    """
    t = segment_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=segment_ids.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


@dataclass
class SFTBatch:
    input_ids: torch.Tensor                 # [B, T]
    labels: torch.Tensor                    # [B, T], -100 off the response tokens
    position_ids: torch.Tensor              # [B, T]
    attention_mask: torch.Tensor | None     # [B, T] 1/0; None when packed
    segment_ids: torch.Tensor | None        # [B, T] packed only: 1, 2, ... per sample, 0 pad
    num_label_tokens: int                   # labels != -100
    num_examples: int                       # samples in the batch (packed ones counted)

    @property
    def packed(self) -> bool:
        return self.segment_ids is not None

    def to(self, device, non_blocking: bool = False) -> "SFTBatch":
        return _to(self, device, non_blocking)

    def model_inputs(self, mask: str = "4d", dtype: torch.dtype | None = None) -> dict:
        """Keyword arguments for a Hugging Face causal LM (labels not included).

        Packed batches: ``mask="4d"`` gives ``block_causal_mask(segment_ids, dtype)``;
        ``mask="position_ids"`` gives attention_mask=None (transformers finds the packing).
        ``use_cache=False`` always: with a cache transformers skips that detection.
        """
        if mask not in ("4d", "position_ids"):
            raise ValueError(f"mask: expected '4d' or 'position_ids', got {mask!r}")
        if not self.packed:
            attention = self.attention_mask
        elif mask == "4d":
            attention = block_causal_mask(self.segment_ids, dtype)
        else:
            attention = None
        return {"input_ids": self.input_ids, "attention_mask": attention,
                "position_ids": self.position_ids, "use_cache": False}


@dataclass
class PreferenceBatch:
    input_ids: torch.Tensor        # [S, T]
    labels: torch.Tensor           # [S, T], -100 on prompt and padding
    attention_mask: torch.Tensor   # [S, T] 1/0
    lengths: torch.Tensor          # [S] real tokens; the last one is at lengths - 1
    prompt_lengths: torch.Tensor   # [S] prompt tokens of each sequence
    seq_prompt: torch.Tensor       # [S] prompt (0..B-1) of each sequence
    better: torch.Tensor           # [P] index into S of each pair's better sequence
    worse: torch.Tensor            # [P] index into S of its worse sequence
    pair_prompt: torch.Tensor      # [P] prompt (0..B-1) of each pair
    pair_weight: torch.Tensor      # [P] float32, 1 / (pairs of its prompt) / B; sums to 1
    num_prompts: int               # B
    num_pairs: int                 # P

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device, non_blocking: bool = False) -> "PreferenceBatch":
        return _to(self, device, non_blocking)

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "use_cache": False}


def _padded_length(longest: int, pad_to_multiple_of: int | None) -> int:
    if pad_to_multiple_of is None:
        return longest
    if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of: expected an int >= 1, got {pad_to_multiple_of!r}")
    return -(-longest // pad_to_multiple_of) * pad_to_multiple_of


def _first_ignored(labels: list[int]) -> list[int]:
    return [IGNORE_INDEX] + labels[1:]


def _pad_rows(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.long)


def collate_sft(samples: Sequence[SFTSample], pad_token_id: int,
                pad_to_multiple_of: int | None = None) -> SFTBatch:
    if not samples:
        raise ValueError("samples: expected at least one sample")
    t = _padded_length(max(len(s) for s in samples), pad_to_multiple_of)
    labels = _pad_rows([_first_ignored(s.labels) for s in samples], t, IGNORE_INDEX)
    return SFTBatch(
        input_ids=_pad_rows([s.input_ids for s in samples], t, pad_token_id),
        labels=labels,
        position_ids=torch.arange(t).repeat(len(samples), 1),
        attention_mask=_pad_rows([[1] * len(s) for s in samples], t, 0),
        segment_ids=None,
        num_label_tokens=int((labels != IGNORE_INDEX).sum()),
        num_examples=len(samples))


def collate_packed(rows: Sequence[Sequence[SFTSample]], pad_token_id: int,
                   pad_to_multiple_of: int | None = None) -> SFTBatch:
    """Rows of samples, each row concatenated into one sequence (see the module docstring)."""
    if not rows or not all(rows):
        raise ValueError("rows: expected at least one row, each with at least one sample")
    t = _padded_length(max(sum(len(s) for s in row) for row in rows), pad_to_multiple_of)
    ids, labels, positions, segments = [], [], [], []
    for row in rows:
        ids.append([tok for s in row for tok in s.input_ids])
        labels.append([y for s in row for y in _first_ignored(s.labels)])
        positions.append([p for s in row for p in range(len(s))])
        segments.append([k for k, s in enumerate(row, 1) for _ in range(len(s))])
        positions[-1] += range(t - len(ids[-1]))
    labels = _pad_rows(labels, t, IGNORE_INDEX)
    return SFTBatch(
        input_ids=_pad_rows(ids, t, pad_token_id),
        labels=labels,
        position_ids=torch.tensor(positions, dtype=torch.long),
        attention_mask=None,
        segment_ids=_pad_rows(segments, t, 0),
        num_label_tokens=int((labels != IGNORE_INDEX).sum()),
        num_examples=sum(len(row) for row in rows))


def collate_preferences(samples: Sequence[PreferenceSample], pad_token_id: int,
                        pad_to_multiple_of: int | None = None) -> PreferenceBatch:
    if not samples:
        raise ValueError("samples: expected at least one sample")
    ids, labels, prompt_lengths, seq_prompt = [], [], [], []
    better, worse, pair_prompt, pair_weight = [], [], [], []
    b = len(samples)
    for p, sample in enumerate(samples):
        first = len(ids)
        n_prompt = len(sample.prompt_ids)
        for response in sample.responses:
            ids.append(sample.prompt_ids + response)
            labels.append(_first_ignored([IGNORE_INDEX] * n_prompt + response))
            prompt_lengths.append(n_prompt)
            seq_prompt.append(p)
        for i, j in sample.pairs:
            better.append(first + i)
            worse.append(first + j)
            pair_prompt.append(p)
            pair_weight.append(1.0 / len(sample.pairs) / b)
    t = _padded_length(max(len(r) for r in ids), pad_to_multiple_of)
    return PreferenceBatch(
        input_ids=_pad_rows(ids, t, pad_token_id),
        labels=_pad_rows(labels, t, IGNORE_INDEX),
        attention_mask=_pad_rows([[1] * len(r) for r in ids], t, 0),
        lengths=torch.tensor([len(r) for r in ids], dtype=torch.long),
        prompt_lengths=torch.tensor(prompt_lengths, dtype=torch.long),
        seq_prompt=torch.tensor(seq_prompt, dtype=torch.long),
        better=torch.tensor(better, dtype=torch.long),
        worse=torch.tensor(worse, dtype=torch.long),
        pair_prompt=torch.tensor(pair_prompt, dtype=torch.long),
        pair_weight=torch.tensor(pair_weight, dtype=torch.float32),
        num_prompts=b,
        num_pairs=len(better))


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: sample indices grouped into rows of total length <= max_length.

    Deterministic (ties by index); each row lists its samples in index order.
    """
    free: list[tuple[int, int]] = []    # (room left, row), sorted
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if not 0 < n <= max_length:
            raise ValueError(f"lengths[{i}]: expected a length in [1, max_length={max_length}], "
                             f"got {n}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
        else:
            room, r = max_length, len(rows)
            rows.append([i])
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return [sorted(row) for row in rows]


class ResumableSampler:
    """Batches of unit indices in a seeded order, over epochs, with a resumable position.

    ``num_epochs=None`` runs without end. Iterating continues from the saved position.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0,
                 num_epochs: int | None = 1, shuffle: bool = True, drop_last: bool = False,
                 bucket_size: int | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
            raise ValueError(f"num_epochs: expected an int >= 1 or None, got {num_epochs!r}")
        if bucket_size is not None and (not isinstance(bucket_size, int) or bucket_size < 1):
            raise ValueError(f"bucket_size: expected an int >= 1 or None, got {bucket_size!r}")
        if not lengths:
            raise ValueError("lengths: expected at least one unit to sample")
        if drop_last and len(lengths) < batch_size:
            raise ValueError(f"batch_size: {batch_size} with drop_last leaves no batch of "
                             f"{len(lengths)} units")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.num_epochs = num_epochs
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.bucket_size = bucket_size
        self.epoch = 0
        self.position = 0
        self._cached: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = random.Random(f"{self.seed}:{epoch}")
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        if self.bucket_size is None:
            windows = [order]
        else:
            w = self.bucket_size * self.batch_size
            windows = [sorted(order[i:i + w], key=lambda u: -self.lengths[u])
                       for i in range(0, len(order), w)]
        bs = self.batch_size
        batches = [win[i:i + bs] for win in windows for i in range(0, len(win), bs)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == bs]
        if self.bucket_size is not None and self.shuffle:
            rng.shuffle(batches)
        self._cached = (epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        while self.num_epochs is None or self.epoch < self.num_epochs:
            batches = self.epoch_batches(self.epoch)
            if self.position >= len(batches):
                self.epoch, self.position = self.epoch + 1, 0
                continue
            batch = batches[self.position]
            self.position += 1
            if self.position == len(batches):
                self.epoch, self.position = self.epoch + 1, 0
            yield batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "num_units": len(self.lengths)}

    def load_state_dict(self, state: dict) -> None:
        missing = {"seed", "epoch", "position", "num_units"} - set(state)
        if missing:
            raise ValueError(f"state: missing {sorted(missing)}")
        if state["num_units"] != len(self.lengths):
            raise ValueError(f"state: saved for {state['num_units']} units, this sampler has "
                             f"{len(self.lengths)} (a different dataset or packing?)")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._cached = None


class BatchLoader:
    """A dataset's batches in the sampler's order: SFTBatch or PreferenceBatch.

    SFT: ``batch_size`` samples, or with ``packing`` rows of up to the dataset's
    max_length (packed once, then the rows are shuffled per epoch). Preferences:
    ``batch_size`` prompts, each with all its responses and pairs.
    """

    def __init__(self, dataset: SFTDataset | PreferenceDataset, batch_size: int, *,
                 seed: int = 0, num_epochs: int | None = 1, shuffle: bool = True,
                 drop_last: bool = False, bucket_size: int | None = None,
                 packing: bool = False, pad_to_multiple_of: int | None = None):
        self.dataset = dataset
        self.packing = packing
        self.pad_to_multiple_of = pad_to_multiple_of
        lengths = dataset.lengths()
        if packing:
            if not isinstance(dataset, SFTDataset):
                raise ValueError("packing: only SFT data can be packed")
            self.rows = pack_rows(lengths, dataset.max_length)
            lengths = [sum(lengths[i] for i in row) for row in self.rows]
        self.sampler = ResumableSampler(lengths, batch_size, seed=seed, num_epochs=num_epochs,
                                        shuffle=shuffle, drop_last=drop_last,
                                        bucket_size=bucket_size)

    def __len__(self) -> int:
        return len(self.sampler)

    def collate(self, units: list[int]) -> SFTBatch | PreferenceBatch:
        data, pad, multiple = self.dataset, self.dataset.pad_token_id, self.pad_to_multiple_of
        if self.packing:
            return collate_packed([[data[i] for i in self.rows[u]] for u in units], pad, multiple)
        if isinstance(data, SFTDataset):
            return collate_sft([data[i] for i in units], pad, multiple)
        return collate_preferences([data[i] for i in units], pad, multiple)

    def __iter__(self) -> Iterator[SFTBatch | PreferenceBatch]:
        for units in self.sampler:
            yield self.collate(units)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
