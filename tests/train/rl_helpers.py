"""Prompts, rule-based rewards, small builders and the command-line checks GRPO and PPO
share, for tests/train/test_rl.py, test_grpo.py and test_ppo.py, in train_helpers' tiny
vocabulary.

The reward to learn: +1 for each occurrence of a marker word in the response. A tiny
random Llama says it about once in 27 tokens; GRPO makes it say it more within a few
dozen steps. ``marker_reward`` is importable as ``rl_helpers:marker_reward`` (this folder
is on sys.path under pytest).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import NUMBERS, Interrupt, assert_bitwise, cli_args, patch_from_call

MARKER = "then"

#: (flags, what the error says) that GRPO and PPO refuse alike (``settings.validate_rl``),
#: with exit status 2, for runs of 4 prompts a micro-batch and a reward function
SHARED_BAD_SETTINGS = (
    (("--reward-fn", "none"), "--reward-model / --reward-fn: give exactly one, got neither"),
    (("--reward-model", "somewhere"), "give exactly one, got both"),
    (("--reward-fn", "no_such_module_abc:f"), "--reward-fn: cannot import module"),
    (("--reward-fn", "rl_helpers"), "--reward-fn: expected module:function"),
    (("--num-ppo-epochs", 0), "--num-ppo-epochs: expected an int >= 1"),
    (("--lora-dropout", 0.1), "--lora-dropout: expected 0"),
    (("--mini-batch-size", 3), "--mini-batch-size: expected a multiple of --batch-size (4)"),
    (("--temperature", 0), "--temperature: expected a finite number > 0"),
    (("--max-new-tokens", 2000), "--max-new-tokens 2000: leaves no room"),
    (("--max-prompt-length", 0), "--max-prompt-length: expected an int >= 1 or none"),
    (("--bad-token-ids", "pad"), "--bad-token-ids: expected comma-separated token ids"),
)


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


def exits_2_naming_the_flag(main, args, out, capsys, message: str) -> None:
    """``main(args)`` exits with status 2, ``message`` in its stderr, ``out`` not made."""
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not Path(out).exists()


def missing_reward_model_exits_1(main, runs, out, capsys) -> None:
    """A --reward-model that does not exist: ``main`` returns 1 naming it, checked before
    the run folder ``out`` is made. ``runs``: the test module's ``train_helpers.Runs``."""
    settings = {k: v for k, v in runs.settings.items() if k != "reward_fn"}
    args = cli_args(runs.model, runs.path(), out, "--reward-model",
                    Path(out).parent / "no-rm", **settings)
    assert main(args) == 1
    assert "--reward-model: no such folder" in capsys.readouterr().err
    assert not Path(out).exists()


def interrupt_then_resume(module, cfg, monkeypatch, stop_at: str, kl_coef: float,
                          keys: tuple[str, ...]) -> tuple[Path, Path]:
    """A 6-step LoRA run of the trainer ``module`` (``cfg(name, **changes)``: its config
    into the folder ``name``, saving every 3 steps, the KL coefficient ``kl_coef``
    adapting): the whole run, and one stopped in step 5 (at the 5th call of
    ``module.stop_at``, once a step) then resumed from its checkpoint of step 3. The
    checkpoint holds the prompt order and the adapted KL coefficient; the resumed run
    equals the whole one bitwise: its adapter, its last checkpoint (weights and data
    state) and each step's ``keys`` metrics. Returns (the whole run, the resumed run)."""
    from kernelrl.train.checkpoint import load_checkpoint
    from kernelrl.train.metrics import read_metrics

    reference = module.train(cfg("reference"))
    patch_from_call(monkeypatch, module, stop_at, 5)
    with pytest.raises(Interrupt):
        module.train(cfg("stopped"))
    monkeypatch.undo()
    ckpt = load_checkpoint(Path(cfg("stopped").out))
    assert ckpt.step == 3 and set(ckpt.data) == {"prompts", "kl_controller"}
    assert ckpt.data["kl_controller"]["value"] != kl_coef              # it adapted

    resumed = module.train(cfg("stopped", resume="latest"))
    adapter = Path("adapter") / "adapter_model.safetensors"
    assert_bitwise(load_file(str(resumed / adapter)), load_file(str(reference / adapter)))
    assert_bitwise(load_checkpoint(resumed).model, load_checkpoint(reference).model)
    records = {run: [r for r in read_metrics(run) if "loss" in r] for run in (resumed, reference)}
    assert [r["step"] for r in records[resumed]] == list(range(1, 7))
    assert [tuple(r[k] for k in keys) for r in records[resumed]] == \
        [tuple(r[k] for k in keys) for r in records[reference]]
    assert load_checkpoint(resumed).data == load_checkpoint(reference).data
    return reference, resumed


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
