"""``kernelrl demo``: the whole post-training pipeline on the embedded toy task, in minutes.

Nothing is downloaded and nothing outside the package is read. The demo builds the tiny
Llama of ``kernelrl.demo.task.model_config`` from a seeded random initialisation, saves it
with the task's word-level tokenizer into ``<out>/init`` (the trainers load models from
folders), then runs each stage as the real trainer, ``train(cfg)``, with settings chosen
for the task (``Recipe``, ``RECIPES`` and the ``run_<stage>`` functions), each in its own
run folder under ``--out`` (default ``./kernelrl-demo``)::

    sft/   1. SFT on sft.jsonl (demonstrations of mixed quality), from init/
    rm/    2. a reward model on preferences.jsonl (4-way rankings), from sft/
    ppo/   3. PPO against rm/ with a per-token KL penalty to sft/, on prompts.jsonl
    grpo/     GRPO against rm/ on prompts.jsonl (only when asked: --algos sft,rm,grpo)
    dpo/   4. DPO on preferences.jsonl from sft/: 2 epochs, short as the task's warning
              asks (pushed far, a DPO policy emits <pad>, <s>, <unk>); at these settings
              3-6 epochs still raised the gold score (seed 4: +2.7 to +3.5 over SFT)
           5. best-of-N: N = 8 samples of sft/, the one rm/ scores highest (no training)

Every run folder holds the trainer's config.toml, metrics.jsonl, curves.png and model/.
``--algos`` picks stages: any subset, run in the order above (sft, rm, ppo, grpo, dpo,
best_of_n); sft is always needed, and rm for ppo, grpo and best_of_n. The default is
sft,rm,ppo,dpo,best_of_n (GRPO is left out to keep the time down). Each stage shows the
trainer's own progress (a bar on a terminal, lines otherwise) and prints one line as it
ends, e.g. ``sft: 240 steps in 9 s, held-out loss 3.425 ...``.

The evaluation. The gold rule is ``kernelrl.demo.task.gold_score`` (its module docstring
explains it: each distinct on-topic word earns a point; off-topic, negative and unknown
words cost one, a repeat half, and each word short of 3 or beyond 8 one; at most +6).
Every policy answers each of the 32 held-out prompts (heldout_prompts.jsonl: prompts never
trained on) ``EVAL_SAMPLES`` = 16 times with the same settings: temperature 1, at most
``MAX_NEW_TOKENS`` = 16 tokens, <pad>, <s> and <unk> forbidden (a policy pushed far can
emit them mid-response, where decoding would hide them), sample j of prompt i drawn from a
generator of its own seeded ``sample_seed(--seed, i, j)``. For each policy the table shows:

    gold score       the mean gold score of its 512 samples
    win rate vs SFT  the fraction of (prompt i, sample j) where its sample scores above the
                     SFT policy's sample (i, j) under the gold rule, ties counting half
                     (SFT itself: exactly 0.5)
    KL to SFT        the mean over its samples y of Σ_t (log π(y_t | x, y_<t) −
                     log π_SFT(y_t | x, y_<t)), over the response tokens (EOS included),
                     with the log-probs of the trainers' own kernel
                     (``kernelrl.train.rollout.rollout_logprobs``): a Monte-Carlo estimate
                     of KL(π ‖ π_SFT) in nats per response (0 for SFT). Best-of-N has no
                     log-probs of its own; its row shows log N − (N − 1)/N (1.20 for N = 8),
                     the known bound on KL(best-of-N ‖ π_SFT) (Stiennon et al. 2020;
                     Beirami et al. 2024, "Theoretical guarantees on the best-of-n
                     alignment policy")

Best-of-N's sample (i, j) is the best by the reward model of N candidates of the SFT
policy, candidate c drawn with ``sample_seed(--seed, i, j + 16·c)``: candidate 0 is SFT's
own sample (i, j), ties keep the earlier candidate. The reward model's held-out accuracy is
the fraction of the held-out rankings' pairs (heldout_preferences.jsonl) it orders right.

Output: the table on stdout, ``summary.json`` in ``--out`` (every value a number)::

    {"sft": {"gold_score", "win_rate_vs_sft", "kl_to_sft"}, "best_of_n": {...},
     "ppo": {...}, "dpo": {...}, "reward_model": {"heldout_accuracy"}}

with the policies run ("grpo" too when run; "reward_model" when rm ran), and
``summary.png`` (each policy's gold score against its KL to SFT).

The margins (``MARGINS``): PPO and DPO each beat SFT on the mean gold score by at least
1.5 at the default size and 0.75 with ``--size small``; the demo prints whether they did,
and tests/demo/test_demo.py checks it for --size small --seed 0. Measured on a shared
2-core CPU: default size, seeds 0-5: PPO +2.37 to +2.68, DPO +2.29 to +2.55 over SFT (which
scores about −1.4); small size, seeds 0-5: PPO +1.23 to +2.28, DPO +1.15 to +1.86 (SFT −1.5
to −3.2). GRPO (not in the default) gained +0.9 to +1.9 in such runs; no margin is claimed
for it. PPO's KL coefficient (0.3) is high on purpose: with 0.05 the policy learns to repeat
on-topic words, which the reward model (about 88 % right on held-out pairs) under-penalises,
and after about 40 steps its gold score falls while the reward model's keeps rising.

With ``--qlora`` the reward model, PPO, GRPO and DPO train LoRA adapters (r = 16, alpha 32,
all seven linears of each layer) over the SFT model quantized to NF4 (SFT itself trains every
weight: the model starts from random weights), at the rates of ``QLORA_LR``, and their
adapters record the 4-bit base so that the evaluation loads them over it. The comparison is
with the 16-bit SFT policy, so the 4-bit base's own loss counts against them; the margins
are ``QLORA_MARGINS`` (1.0 default, 0.25 small). Measured (shared 2-core CPU): default size,
seed 0: PPO +2.24, DPO +1.72; small size, seeds 0-3: PPO +1.19 to +2.10, DPO +0.30 to
+1.91 (seed 3, whose SFT policy scores −3.2, is the low one for both).

Time: about 1.5 minutes for the default pipeline (87 s measured) and 30 s for ``--size
small`` on 2 shared CPU cores. On the CPU the demo runs torch with one thread (the
previous setting is restored after): the model is so small that more threads gain little,
and with two threads on two shared cores every stage ran 3-4x slower (the CI test: 3 min
instead of 50 s).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
from transformers.utils import logging as hf_logging

from kernelrl.demo.task import (VOCAB, build_tokenizer, data_path, model_config,
                                save_tokenizer, score_responses, win_rate)
from kernelrl.train import common, rl
from kernelrl.train.config import add_dataclass_args, config_from_namespace, save_config
from kernelrl.train.metrics import read_metrics
from kernelrl.train.rollout import Rollout, generate, rollout_logprobs
from kernelrl.train.sample import load_policy, sample_seed

__all__ = ["DemoConfig", "DemoError", "Recipe", "RECIPES", "MARGINS", "QLORA_MARGINS", "ALGOS", "POLICIES",
           "BEST_OF", "EVAL_SAMPLES", "MAX_NEW_TOKENS", "MARKER", "parse_algos",
           "build_initial_model", "sample", "evaluate", "format_table", "check_margins",
           "run", "main"]

#: the stages in pipeline order
ALGOS = ("sft", "rm", "ppo", "grpo", "dpo", "best_of_n")
DEFAULT_ALGOS = "sft,rm,ppo,dpo,best_of_n"
#: what each stage needs run before it
NEEDS = {"sft": (), "rm": ("sft",), "ppo": ("sft", "rm"), "grpo": ("sft", "rm"),
         "dpo": ("sft",), "best_of_n": ("sft", "rm")}
#: the policies of the table, in its order
POLICIES = ("sft", "best_of_n", "ppo", "grpo", "dpo")
#: the gold-score margin by which PPO and DPO beat SFT, per --size
MARGINS = {"default": 1.5, "small": 0.75}
#: the same with --qlora (adapters over the 4-bit SFT model, compared with the 16-bit SFT)
QLORA_MARGINS = {"default": 1.0, "small": 0.25}
#: response tokens sampled at most, in training (PPO, GRPO) and evaluation
MAX_NEW_TOKENS = 16
MAX_LENGTH = 32            # prompt (at most 8 tokens with BOS) + response
MARKER = "demo.toml"       # the DemoConfig of the run, marking --out as a demo's folder
FORBIDDEN = ("<pad>", "<s>", "<unk>")


class DemoError(ValueError):
    """A demo setting or output folder that cannot be used; the message names it."""


@dataclass
class DemoConfig:
    """Run the whole post-training pipeline (SFT, reward model, PPO, DPO, best-of-N) on
    the built-in toy task and compare the policies with its hidden gold rule."""

    out: str = field(default="./kernelrl-demo", metadata={
        "help": "output folder: one run folder per stage, summary.json, summary.png"})
    algos: str = field(default=DEFAULT_ALGOS, metadata={
        "help": f"comma-separated stages, run in the order {','.join(ALGOS)}; grpo is "
                f"not in the default (time)"})
    size: Literal["default", "small"] = field(default="default", metadata={
        "help": "default; small: the reduced model and steps of the CI test"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={
        "help": "auto: cuda when available, else cpu"})
    seed: int = field(default=0, metadata={
        "help": "seed of the initial model, every trainer and the evaluation samples"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace the results of a previous demo in --out"})
    qlora: bool = field(default=False, metadata={
        "help": "QLoRA: the stages after SFT train LoRA adapters over the SFT model "
                "quantized to 4-bit NF4 (SFT itself trains every weight: the demo's "
                "model starts from random weights)"})

    def __post_init__(self):
        parse_algos(self.algos)
        if self.size not in RECIPES:
            raise DemoError(f"--size: expected one of {', '.join(RECIPES)}, got {self.size!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise DemoError(f"--device: expected auto, cpu or cuda, got {self.device!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise DemoError(f"--seed: expected an int >= 0, got {self.seed!r}")


@dataclass(frozen=True)
class Recipe:
    """The settings of each stage for one --size (chosen for this task; see RECIPES)."""
    sft_epochs: int           # SFT: batch 32 sequences, lr 3e-3
    rm_epochs: int            # reward model: batch 16 rankings, lr 1e-3
    ppo_steps: int            # PPO: 32 prompts a step, 4 epochs of 2 mini-batches,
    #                           lr 1e-4, KL coefficient 0.3
    grpo_steps: int           # GRPO: 8 prompts x 8 samples a step, lr 2e-4
    dpo_epochs: int           # DPO: batch 16 rankings, lr 3e-4, beta 0.1


#: QLoRA stages: adapter rank and alpha, and each stage's learning rate (adapters train at
#: a higher rate than full fine-tuning).
QLORA = {"lora_r": 16, "lora_alpha": 32.0, "qlora": True}
QLORA_LR = {"rm": 3e-3, "ppo": 1e-3, "grpo": 2e-3, "dpo": 1e-3}

RECIPES = {
    "default": Recipe(sft_epochs=4, rm_epochs=8, ppo_steps=80, grpo_steps=60, dpo_epochs=2),
    "small": Recipe(sft_epochs=4, rm_epochs=8, ppo_steps=60, grpo_steps=40, dpo_epochs=2),
}
#: best-of-N's N, and the samples per held-out prompt of every policy in the evaluation
BEST_OF = 8
EVAL_SAMPLES = 16


def parse_algos(text: str) -> list[str]:
    """``--algos`` as a list in pipeline order; a DemoError names an unknown stage or a
    stage whose prerequisite is missing."""
    names = [part.strip() for part in str(text).split(",") if part.strip()]
    if not names:
        raise DemoError(f"--algos: expected comma-separated stages from "
                        f"{','.join(ALGOS)}, got {text!r}")
    unknown = [n for n in names if n not in ALGOS]
    if unknown:
        raise DemoError(f"--algos: unknown stage {unknown[0]!r}; expected stages from "
                        f"{','.join(ALGOS)}")
    if len(set(names)) != len(names):
        raise DemoError(f"--algos: a stage is given twice in {text!r}")
    for name in names:
        missing = [need for need in NEEDS[name] if need not in names]
        if missing:
            why = {"sft": "starts from the SFT policy", "rm": "uses the reward model"}
            raise DemoError(f"--algos: {name} needs {' and '.join(missing)} ("
                            f"{'; '.join(f'it {why[m]}' for m in missing)}); add "
                            f"{','.join(missing)}")
    return [name for name in ALGOS if name in names]


# ----------------------------------------------------------------------------------------
# The stages: each one trainer's train(cfg), in a run folder of its own


def _common(cfg: DemoConfig, out: Path, name: str, model: Path) -> dict:
    """The settings every stage shares: its model and run folder, device, seed, no
    checkpoints but the final one, a metrics line every few steps."""
    return dict(model=str(model), out=str(out / name), device=cfg.device, seed=cfg.seed,
                max_length=MAX_LENGTH, save_every=0, keep_checkpoints=1, log_every=5)


def _tuning(cfg: DemoConfig, stage: str, lr: float) -> dict:
    """A post-SFT stage's learning rate ``lr``, or with --qlora the QLoRA settings and
    rate."""
    return {**QLORA, "lr": QLORA_LR[stage]} if cfg.qlora else {"lr": lr}


def _last(run_dir: Path, key: str) -> float:
    """The last logged value of metric ``key`` in a run folder's metrics.jsonl."""
    values = [r[key] for r in read_metrics(run_dir) if r.get(key) is not None]
    if not values:
        raise DemoError(f"{run_dir}: metrics.jsonl has no {key!r}")
    return float(values[-1])


def _first(run_dir: Path, key: str) -> float:
    values = [r[key] for r in read_metrics(run_dir) if r.get(key) is not None]
    return float(values[0]) if values else math.nan


def run_sft(cfg: DemoConfig, recipe: Recipe, out: Path) -> str:
    """SFT from init/ (stage 1); returns the end of its summary line."""
    from kernelrl.train.sft import SFTConfig, train

    run_dir = train(SFTConfig(
        **_common(cfg, out, "sft", out / "init"), data=str(data_path("sft.jsonl")),
        eval_fraction=0.05, epochs=recipe.sft_epochs, batch_size=32, lr=3e-3,
        warmup_ratio=0.05))
    return (f"held-out loss {_last(run_dir, 'eval/loss'):.3f} (mean token NLL of 5% of "
            f"sft.jsonl held out)")


def run_rm(cfg: DemoConfig, recipe: Recipe, out: Path) -> str:
    """The reward model from sft/ (stage 2)."""
    from kernelrl.train.rm import RMConfig, train

    run_dir = train(RMConfig(
        **_common(cfg, out, "rm", out / "sft" / "model"),
        data=str(data_path("preferences.jsonl")),
        eval_data=str(data_path("heldout_preferences.jsonl")), epochs=recipe.rm_epochs,
        batch_size=16, warmup_ratio=0.05, **_tuning(cfg, "rm", 1e-3)))
    return f"held-out pair accuracy {_last(run_dir, 'eval/accuracy'):.1%}"


def run_ppo(cfg: DemoConfig, recipe: Recipe, out: Path) -> str:
    """PPO from sft/ against rm/ (stage 3)."""
    from kernelrl.train.ppo import PPOConfig, train

    run_dir = train(PPOConfig(
        **_common(cfg, out, "ppo", out / "sft" / "model"),
        data=str(data_path("prompts.jsonl")), reward_model=str(out / "rm"),
        max_steps=recipe.ppo_steps, batch_size=16, grad_accum=2,
        max_new_tokens=MAX_NEW_TOKENS, **_tuning(cfg, "ppo", 1e-4), kl_coef=0.3,
        num_ppo_epochs=4, mini_batch_size=16, vf_coef=0.1))
    return (f"reward model score {_first(run_dir, 'reward'):.2f} -> "
            f"{_last(run_dir, 'reward'):.2f}, KL to SFT {_last(run_dir, 'kl'):.2f}")


def run_grpo(cfg: DemoConfig, recipe: Recipe, out: Path) -> str:
    """GRPO from sft/ against rm/ (instead of PPO and DPO, when asked)."""
    from kernelrl.train.grpo import GRPOConfig, train

    run_dir = train(GRPOConfig(
        **_common(cfg, out, "grpo", out / "sft" / "model"),
        data=str(data_path("prompts.jsonl")), reward_model=str(out / "rm"),
        max_steps=recipe.grpo_steps, batch_size=8, group_size=8,
        **_tuning(cfg, "grpo", 2e-4),
        max_new_tokens=MAX_NEW_TOKENS, kl_loss_coef=0.04, num_ppo_epochs=2))
    return (f"reward model score {_first(run_dir, 'reward'):.2f} -> "
            f"{_last(run_dir, 'reward'):.2f}, KL to SFT {_last(run_dir, 'kl'):.2f}")


def run_dpo(cfg: DemoConfig, recipe: Recipe, out: Path) -> str:
    """DPO from sft/ (stage 4)."""
    from kernelrl.train.dpo import DPOConfig, train

    run_dir = train(DPOConfig(
        **_common(cfg, out, "dpo", out / "sft" / "model"),
        data=str(data_path("preferences.jsonl")),
        eval_data=str(data_path("heldout_preferences.jsonl")), epochs=recipe.dpo_epochs,
        batch_size=16, beta=0.1, ref="precompute", warmup_ratio=0.05,
        **_tuning(cfg, "dpo", 3e-4)))
    return (f"held-out preference accuracy "
            f"{_last(run_dir, 'eval/rewards/accuracies'):.1%} (implicit reward)")


STAGES = {"sft": run_sft, "rm": run_rm, "ppo": run_ppo, "grpo": run_grpo, "dpo": run_dpo}


# ----------------------------------------------------------------------------------------
# Evaluation on the held-out prompts


@torch.no_grad()
def sample(model, prompts: list[list[int]], seeds: list[int], *, eos_id: int, pad_id: int,
           forbidden: Sequence[int]) -> Rollout:
    """One response per prompt (token ids) by ``kernelrl.train.rollout.generate``, at
    temperature 1 with the ``forbidden`` tokens never drawn, row b from a generator seeded
    ``seeds[b]``."""
    device = model.get_output_embeddings().weight.device
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    return generate(model, prompts, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos_id,
                    pad_token_id=pad_id, generator=generators, bad_token_ids=list(forbidden))


def _response_logps(model, rollout: Rollout) -> torch.Tensor:
    """Σ_t log π(y_t | ...) over each response's tokens: [B]."""
    with torch.no_grad():
        logps = rollout_logprobs(model, rollout)
    return (logps * rollout.response_mask).sum(-1)


class _Evaluator:
    """The held-out prompts, each answered ``eval_samples`` times by every policy with the
    same seeds: row (i, j) is sample j of prompt i."""

    def __init__(self, seed: int):
        self.tokenizer = build_tokenizer()
        records = rl.read_prompts(data_path("heldout_prompts.jsonl"))
        self.data = rl.tokenize_prompts(records, self.tokenizer,
                                        max_prompt_length=MAX_LENGTH - MAX_NEW_TOKENS)
        self.k, self.seed = EVAL_SAMPLES, seed
        self.rows = [(i, j) for i in range(len(self.data)) for j in range(self.k)]
        self.row_samples = [self.data[i] for i, _ in self.rows]      # for the reward model
        self.forbidden = [VOCAB[t] for t in FORBIDDEN]

    def responses(self, model, offset: int = 0) -> Rollout:
        """One response per row (i, j), drawn with ``sample_seed(seed, i, j + offset)``."""
        return sample(model, [s.ids for s in self.row_samples],
                      [sample_seed(self.seed, i, j + offset) for i, j in self.rows],
                      eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id,
                      forbidden=self.forbidden)

    def gold(self, rollout: Rollout) -> list[float]:
        """The gold score of each row's response."""
        return score_responses([s.text for s in self.row_samples],
                               rollout.texts(self.tokenizer))


def _row(gold: list[float], sft_gold: list[float], kl: float) -> dict[str, float]:
    return {"gold_score": sum(gold) / len(gold), "win_rate_vs_sft": win_rate(gold, sft_gold),
            "kl_to_sft": float(kl)}


def evaluate(out: Path, algos: Sequence[str], cfg: DemoConfig,
             device: torch.device) -> dict[str, dict[str, float]]:
    """The table's numbers (module docstring) for every policy of ``algos`` found in
    ``out``: {policy: {"gold_score", "win_rate_vs_sft", "kl_to_sft"}}, in POLICIES order."""
    ev = _Evaluator(cfg.seed)
    sft = load_policy(out / "sft", device=device).model
    sft_rollout = ev.responses(sft)
    sft_gold = ev.gold(sft_rollout)
    results = {"sft": _row(sft_gold, sft_gold, 0.0)}
    if "best_of_n" in algos:
        reward, _ = rl.build_reward(reward_model=str(out / "rm"), reward_fn=None, policy=sft,
                                    tokenizer=ev.tokenizer, model_path=str(out / "sft" / "model"),
                                    device=device)
        best_gold = list(sft_gold)                       # candidate 0: SFT's own sample
        best_score = reward(sft_rollout, ev.row_samples).tolist()
        for c in range(1, BEST_OF):
            rollout = ev.responses(sft, offset=c * ev.k)
            scores, gold = reward(rollout, ev.row_samples).tolist(), ev.gold(rollout)
            for b, (score, value) in enumerate(zip(scores, gold)):
                if score > best_score[b]:                # ties keep the earlier candidate
                    best_score[b], best_gold[b] = score, value
        n = BEST_OF
        results["best_of_n"] = _row(best_gold, sft_gold, math.log(n) - (n - 1) / n)
    for name in ("ppo", "grpo", "dpo"):
        if name in algos:
            model = load_policy(out / name, device=device).model
            rollout = ev.responses(model)
            kl = (_response_logps(model, rollout) - _response_logps(sft, rollout)).mean()
            results[name] = _row(ev.gold(rollout), sft_gold, kl.item())
    return {name: results[name] for name in POLICIES if name in results}


# ----------------------------------------------------------------------------------------
# The pipeline


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that holds anything but a previous demo, and a previous demo
    unless ``overwrite`` (then its folders and files are removed)."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out: {str(out)!r} is a file; expected a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / MARKER).is_file():
        raise DemoError(f"--out: {str(out)!r} is not empty and holds no previous demo (no "
                        f"{MARKER}); choose another --out")
    if not overwrite:
        raise DemoError(f"--out: {str(out)!r} holds a previous demo; pass --overwrite to "
                        f"replace it, or choose another --out")
    for name in ("init", *ALGOS):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("summary.json", "summary.png", MARKER):
        (out / name).unlink(missing_ok=True)


def build_initial_model(folder: Path, size: str, seed: int) -> Path:
    """The randomly initialised model of ``model_config(size)`` (seeded; the global RNG is
    left as it was) and the task's tokenizer, saved in ``folder``."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(model_config(size))
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def format_table(summary: dict) -> str:
    """The table of the policies (and the reward model's accuracy) as printed."""
    lines = [f"{'policy':<11}{'gold score':>12}{'win rate vs SFT':>17}{'KL to SFT':>11}"]
    for name in POLICIES:
        if name in summary:
            row = summary[name]
            lines.append(f"{name:<11}{row['gold_score']:>+12.2f}"
                         f"{row['win_rate_vs_sft']:>17.3f}{row['kl_to_sft']:>11.2f}")
    if "reward_model" in summary:
        lines.append(f"reward model: held-out pair accuracy "
                     f"{summary['reward_model']['heldout_accuracy']:.1%}")
    return "\n".join(lines)


def margin_for(size: str, qlora: bool = False) -> float:
    """The gold-score margin the demo claims for PPO and DPO over SFT."""
    return (QLORA_MARGINS if qlora else MARGINS)[size]


def check_margins(summary: dict, size: str, qlora: bool = False
                  ) -> list[tuple[str, float, bool]]:
    """(policy, its gold score minus SFT's, whether that is >= margin_for(size, qlora)) for
    PPO and DPO, when run."""
    margin, base = margin_for(size, qlora), summary["sft"]["gold_score"]
    return [(name, summary[name]["gold_score"] - base,
             summary[name]["gold_score"] - base >= margin)
            for name in ("ppo", "dpo") if name in summary]


def plot_summary(summary: dict, path: Path) -> Path:
    """summary.png: each policy's gold score against its KL to SFT."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name in POLICIES:
        if name in summary:
            x, y = summary[name]["kl_to_sft"], summary[name]["gold_score"]
            ax.scatter([x], [y], s=40)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4))
    ax.set_xlabel("KL to SFT (nats per response)")
    ax.set_ylabel("gold score (held-out prompts)")
    ax.set_title("kernelrl demo: gold score vs KL to SFT")
    ax.margins(0.2)
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=100)
    return path


def run(cfg: DemoConfig) -> dict:
    """Run the demo as ``cfg`` says (module docstring); returns the summary, as written to
    summary.json. Errors (DemoError, the trainers' ValueError, OSError, ...) name what
    is wrong; ``--out`` is checked before anything runs."""
    algos = parse_algos(cfg.algos)
    out = Path(cfg.out).expanduser()
    _prepare_out(out, cfg.overwrite)
    device = common.choose_device(cfg.device)
    threads = torch.get_num_threads()
    bars = hf_logging.is_progress_bar_enabled()
    if device.type == "cpu":
        torch.set_num_threads(1)          # see the module docstring
    hf_logging.disable_progress_bar()     # transformers' bars for each load and save
    try:
        return _run(cfg, algos, out, device)
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()


def _run(cfg: DemoConfig, algos: list[str], out: Path, device: torch.device) -> dict:
    recipe = RECIPES[cfg.size]
    started = time.perf_counter()
    save_config(cfg, out / MARKER)
    build_initial_model(out / "init", cfg.size, cfg.seed)
    for name in algos:
        if name in STAGES:
            start = time.perf_counter()
            detail = STAGES[name](cfg, recipe, out)
            print(f"{name}: {_last(out / name, 'step'):.0f} steps in "
                  f"{time.perf_counter() - start:.0f} s, {detail}", flush=True)

    start = time.perf_counter()
    summary = evaluate(out, algos, cfg, device)
    bon = f", best-of-N with N = {BEST_OF}" if "best_of_n" in algos else ""
    print(f"evaluation: {len(summary)} policies, {EVAL_SAMPLES} samples of each of the 32 "
          f"held-out prompts{bon}, in {time.perf_counter() - start:.0f} s", flush=True)
    if "rm" in algos:
        summary["reward_model"] = {"heldout_accuracy": _last(out / "rm", "eval/accuracy")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_summary(summary, out / "summary.png")

    print()
    print(format_table(summary))
    for name, gain, ok in check_margins(summary, cfg.size, cfg.qlora):
        print(f"{name} beats SFT on the gold score by {gain:+.2f}: "
              f"{'yes' if ok else 'NO'}, the demo claims at least "
              f"{margin_for(cfg.size, cfg.qlora)} (--size {cfg.size}"
              f"{' --qlora' if cfg.qlora else ''})")
    print(f"done in {time.perf_counter() - started:.0f} s: {out / 'summary.json'}, "
          f"summary.png, and each stage's folder (curves.png, metrics.jsonl, model/)")
    return summary


def main(argv: Sequence[str] | None = None, prog: str = "kernelrl demo") -> int:
    """``kernelrl demo``: parse the flags into a DemoConfig and ``run`` it. Bad flags exit
    with status 2; an unusable --out or a failed stage prints one line and returns 1."""
    from kernelrl.train.checkpoint import CheckpointError
    from kernelrl.train.metrics import NonFiniteLossError

    parser = argparse.ArgumentParser(prog=prog, description=DemoConfig.__doc__)
    add_dataclass_args(parser, DemoConfig, config_flag=False)
    namespace = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        cfg = config_from_namespace(DemoConfig, namespace)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        run(cfg)
    except (ValueError, OSError, CheckpointError, NonFiniteLossError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m kernelrl.demo.pipeline"))
