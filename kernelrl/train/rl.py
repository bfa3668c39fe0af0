"""What kernelrl's RL trainers (GRPO, PPO) share: prompts in, scored experience out (their
settings: ``kernelrl.train.settings.RLConfig``; the update phase, the KL coefficient and
the checkpointed state: ``kernelrl.train.rl_update``).

Legend: B sequences of a batch (prompts × completions per prompt), P prompt width, R
response width, T time (P + R); τ the sampling temperature.

The pieces, in the order a step uses them:

- A run's inputs: ``run_prompts`` and ``run_reward`` build its prompts, sampling settings
  and reward from the settings GRPO and PPO share (``kernelrl.train.settings.RLConfig``).
  Sampling never emits ``--bad-token-ids`` (``resolve_bad_token_ids``; by default the
  tokenizer's special tokens but EOS: pad, BOS, unk, ...), a filter of the sampler only:
  the log-probs stay the whole policy's, so the first update's ratio is still exactly 1
  (``kernelrl.train.rollout``'s docstring explains why).
- Prompts (``load_prompts``): a JSONL file, ``{"prompt": str}`` per line (a malformed
  line is a ValueError naming ``file:line``). A prompt is tokenised exactly as the SFT,
  reward-model and DPO data layer tokenises the prompt of an example
  (``kernelrl.train.data``): the tokenizer's chat template with the generation prompt
  when it has one (and ``use_chat_template``), else BOS + the text verbatim. So the policy
  sees prompts in the format it was fine-tuned on. A prompt over ``max_prompt_length``
  tokens loses its oldest tokens (a leading BOS stays), or is dropped (``overlong="drop"``).
  ``PromptDataset`` has ``lengths()``, so ``common.step_loader`` gives the seeded,
  resumable order of prompts.
- Rewards (``build_reward``): a reward model (``kernelrl.train.rm.load_reward_model``,
  a run folder or an export), or a Python function ``module:function`` importable from
  the working directory (``load_reward_fn``): ``fn(prompts: list[str], responses:
  list[str]) -> list[float] | Tensor``, called with the JSONL prompt strings and the
  decoded responses (special tokens skipped). A LoRA reward model whose base is the
  policy's ``--model`` goes onto the policy's own base when the policy trains LoRA adapters
  (one base in memory, scored under ``use_adapter(policy, "reward")``); otherwise it is a
  model of its own. It scores prompt + response ids as the reward-model trainer formatted
  its data: the rollout's own ids when the reward model's tokenizer is the policy's, else
  the texts re-tokenised with its tokenizer (prompt by the data layer's rules, the
  response closed by EOS when it finished).
- Missing EOS (``apply_missing_eos_penalty``): a completion cut off by max_new_tokens
  (not ended by EOS or a stop token) gets ``penalty`` subtracted from its score, as TRL's
  ``missing_eos_penalty``; None keeps the score.
- Experience (``collect_experience``): prompts → ``generate`` (policy in eval mode, no
  gradients) → the "old" log-probs and entropies (``policy_logprobs``: the very call the
  update makes, so the first update's importance ratio is exactly 1) → the reference's
  log-probs (``Reference``: with LoRA the policy with its adapters disabled, else a frozen
  copy) → scores. ``rollout_metrics`` turns a step's experience (and any further device
  statistics of the trainer's) into logged numbers with one host sync.

Dropout: an RL update compares the policy's log-probs with those it had when sampling, so
the policy runs without dropout or MoE router jitter (``disable_dropout``); the rollout is
sampled in eval mode, the old log-probs are computed in the mode the update runs in.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from kernelrl.models.hf import load_tokenizer
from kernelrl.models.lora import CONFIG_NAME, disable_adapters, lora_modules, use_adapter
from kernelrl.train import common
from kernelrl.train.data import DataStats, _Formatter, _json_type, read_jsonl, split_records
# Re-exported: they were defined here before the update phase had a module of its own.
from kernelrl.train.rl_update import (AdaptiveKLController, FixedKLController,  # noqa: F401
                                      RunState, kl_controller)
from kernelrl.train.rm import SCORE_FILE, load_reward_model
from kernelrl.train.rollout import Rollout, generate, logprob_drift, rollout_logprobs
from kernelrl.train.settings import SPECIAL_TOKENS, RLConfig, parse_bad_token_ids

__all__ = ["run_prompts", "run_reward", "resolve_bad_token_ids",
           "PromptSample", "PromptDataset", "read_prompts", "tokenize_prompts", "load_prompts",
           "load_reward_fn", "check_reward_model", "RewardFunction", "RewardModelScorer",
           "build_reward",
           "apply_missing_eos_penalty", "Sampling", "Reference", "Experience",
           "disable_dropout", "evaluating", "policy_logprobs", "collect_experience",
           "rollout_metrics", "evaluate_rewards", "AdaptiveKLController",
           "FixedKLController", "kl_controller", "RunState", "REWARD_ADAPTER"]

REWARD_ADAPTER = "reward"      # the reward model's adapter name on a shared base


# ----------------------------------------------------------------------------------------
# A run's prompts and reward, from its settings (``settings.RLConfig``)


def run_prompts(cfg: RLConfig, tokenizer
                ) -> tuple[PromptDataset, PromptDataset | None, Sampling]:
    """A run's (training prompts, held-out prompts or None, sampling settings), checked
    before its folder is touched: ``--reward-model`` must exist; the prompts are cut to
    ``--max-prompt-length`` (default ``--max-length`` − ``--max-new-tokens``)."""
    if cfg.reward_model is not None:
        check_reward_model(cfg.reward_model)
    train, evals = load_prompts(
        cfg.data, tokenizer, max_prompt_length=cfg.max_prompt_length or
        cfg.max_length - cfg.max_new_tokens, overlong=cfg.overlong,
        use_chat_template=cfg.chat_template, eval_path=cfg.eval_data,
        eval_fraction=cfg.eval_fraction, seed=cfg.seed)
    sampling = Sampling(cfg.max_new_tokens, train.eos_token_id, train.pad_token_id,
                        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                        bad_token_ids=resolve_bad_token_ids(cfg.bad_token_ids, tokenizer,
                                                            eos_token_id=train.eos_token_id))
    return train, evals, sampling


def resolve_bad_token_ids(spec: str | Sequence[int], tokenizer, *, eos_token_id: int | None,
                          flag: str = "--bad-token-ids") -> tuple[int, ...]:
    """The token ids ``--bad-token-ids`` bans, sorted: ``spec`` as
    ``settings.parse_bad_token_ids`` reads it (``special``: ``tokenizer.all_special_ids``
    but ``eos_token_id``, i.e. pad, BOS, unk and the additional special tokens; ids given
    are banned as they are; ``''`` or ``none``: nothing), or a sequence of ids. An id given
    that is EOS is a ValueError naming ``flag``; ``generate`` checks the range against the
    model's vocabulary."""
    if isinstance(spec, str):
        special, ids = parse_bad_token_ids(spec, flag)
    elif isinstance(spec, Sequence) and all(isinstance(t, int) and not isinstance(t, bool)
                                            and t >= 0 for t in spec):
        special, ids = False, tuple(spec)
    else:
        raise ValueError(f"{flag}: expected token ids or {SPECIAL_TOKENS!r}, got {spec!r}")
    if eos_token_id is not None and eos_token_id in ids:
        raise ValueError(f"{flag}: {eos_token_id} is the EOS token; it cannot be banned (a "
                         f"response must be able to end)")
    banned = set(ids)
    if special:
        banned.update(int(t) for t in tokenizer.all_special_ids if t != eos_token_id)
    return tuple(sorted(banned))


def run_reward(cfg: RLConfig, policy: nn.Module, tokenizer, device: torch.device):
    """``build_reward`` with a run's settings: (the reward source, a line for the log)."""
    return build_reward(
        reward_model=cfg.reward_model, reward_fn=cfg.reward_fn, policy=policy,
        tokenizer=tokenizer, model_path=cfg.model, dtype=cfg.dtype, device=device,
        attn_implementation=cfg.attn_implementation, use_chat_template=cfg.chat_template,
        precision=cfg.autocast)


# ----------------------------------------------------------------------------------------
# Prompts


@dataclass
class PromptSample:
    """One prompt: its JSONL text, its token ids (formatted, truncated) and ``file:line``."""
    text: str
    ids: list[int]
    where: str = ""

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class PromptDataset:
    samples: list[PromptSample]
    stats: DataStats
    pad_token_id: int
    eos_token_id: int
    max_length: int            # max_prompt_length

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> PromptSample:
        return self.samples[i]

    def lengths(self) -> list[int]:
        return [len(s) for s in self.samples]


def read_prompts(path) -> list[tuple[str, str]]:
    """("file:line", prompt text) for each line of a prompts JSONL file."""
    out = []
    for where, obj in read_jsonl(path):
        if "prompt" not in obj:
            raise ValueError(f'{where}: missing "prompt"; expected {{"prompt": str}} per line')
        text = obj["prompt"]
        if not isinstance(text, str):
            raise ValueError(f'{where}: "prompt" must be a string, got {_json_type(text)}')
        out.append((where, text))
    return out


def tokenize_prompts(records: Sequence[tuple[str, str]], tokenizer, *, max_prompt_length: int,
                     overlong: str = "truncate", use_chat_template: bool = True
                     ) -> PromptDataset:
    """Token ids of each (where, text) prompt, formatted as ``kernelrl.train.data``
    formats an example's prompt; over ``max_prompt_length``, cut from the left (a leading
    BOS stays) or dropped."""
    if isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int) or \
            max_prompt_length < 1:
        raise ValueError(f"--max-prompt-length: expected an int >= 1, got {max_prompt_length!r}")
    fmt = _Formatter(tokenizer, use_chat_template)
    stats = DataStats(examples=len(records))
    samples = []
    for where, text in records:
        prompt_text, _ = fmt.prompt(text)
        ids = fmt.plain_start() + fmt.encode(prompt_text)
        if not ids:
            raise ValueError(f"{where}: the prompt has no tokens")
        if len(ids) > max_prompt_length:
            if overlong == "drop":
                stats.dropped += 1
                continue
            first = 1 if ids[0] == fmt.bos_id and max_prompt_length >= 2 else 0
            ids = ids[:first] + ids[len(ids) - (max_prompt_length - first):]
            stats.truncated += 1
        stats.kept += 1
        samples.append(PromptSample(text, ids, where))
    return PromptDataset(samples, stats, fmt.pad_id, fmt.eos_id, max_prompt_length)


def load_prompts(path, tokenizer, *, max_prompt_length: int, overlong: str = "truncate",
                 use_chat_template: bool = True, eval_path=None, eval_fraction: float = 0.0,
                 seed: int = 0) -> tuple[PromptDataset, PromptDataset | None]:
    """(train, held-out or None) prompts: held out from ``eval_path``, or ``eval_fraction``
    of the lines picked by ``seed`` (``kernelrl.train.data.split_records``)."""
    records = read_prompts(path)
    if eval_path is not None:
        held_out = read_prompts(eval_path)
    else:
        records, held_out = split_records(records, eval_fraction, seed)
    options = dict(max_prompt_length=max_prompt_length, overlong=overlong,
                   use_chat_template=use_chat_template)
    train = tokenize_prompts(records, tokenizer, **options)
    evals = tokenize_prompts(held_out, tokenizer, **options) if held_out else None
    for name, data, source in (("train", train, path), ("eval", evals, eval_path or path)):
        if data is not None and not data.samples:
            raise ValueError(f"{source}: no {name} prompt left within --max-prompt-length "
                             f"{max_prompt_length} (stats: {data.stats.as_dict()})")
    return train, evals


# ----------------------------------------------------------------------------------------
# Rewards


def load_reward_fn(spec: str, flag: str = "--reward-fn") -> Callable:
    """The function named by ``module:function`` (``module`` importable from the working
    directory or sys.path; ``function`` may be dotted, ``Class.method``). Errors are
    ValueErrors naming ``flag``."""
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise ValueError(f"{flag}: expected module:function (e.g. my_rewards:score), got "
                         f"{spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{flag}: cannot import module {module_name!r} from the working "
                         f"directory ({cwd}) or the Python path: {exc}") from None
    except Exception as exc:            # the user's module raised while importing
        raise ValueError(f"{flag}: importing {module_name!r} raised "
                         f"{type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{flag}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{flag}: {spec!r} is a {type(target).__name__}, not a function")
    return target


class RewardFunction:
    """Scores from a Python function of the prompt texts and the decoded responses."""

    def __init__(self, fn: Callable, tokenizer, name: str = "--reward-fn"):
        self.fn, self.tokenizer, self.name = fn, tokenizer, name

    def __call__(self, rollout: Rollout, samples: Sequence[PromptSample]) -> torch.Tensor:
        responses = rollout.texts(self.tokenizer)
        out = self.fn([s.text for s in samples], responses)
        device = rollout.sequences.device
        if isinstance(out, torch.Tensor):
            scores = out.detach().to(device=device, dtype=torch.float32).reshape(-1)
        else:
            try:
                values = [float(v) for v in out]
            except (TypeError, ValueError):
                raise ValueError(f"{self.name}: expected a list of numbers or a tensor, got "
                                 f"{type(out).__name__}") from None
            bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
            if bad is not None:
                raise ValueError(f"{self.name}: returned {values[bad]} for response {bad}")
            scores = torch.tensor(values, dtype=torch.float32).to(device)
        if scores.numel() != len(responses):
            raise ValueError(f"{self.name}: returned {scores.numel()} scores for "
                             f"{len(responses)} responses")
        return scores


class RewardModelScorer:
    """Scores from a ``RewardModel``: on the rollout's ids, or (``formatter`` given: the
    reward model's own tokenizer differs) on the texts re-tokenised with it. ``base``: the
    policy whose base it shares, scored under its adapter ``REWARD_ADAPTER``."""

    def __init__(self, model: nn.Module, *, base: nn.Module | None = None, policy_tokenizer=None,
                 formatter: _Formatter | None = None, precision: str = "none"):
        self.model, self.base, self.precision = model, base, precision
        self.policy_tokenizer, self.formatter = policy_tokenizer, formatter

    def _retokenized(self, rollout: Rollout, samples: Sequence[PromptSample]):
        fmt, rows = self.formatter, []
        texts = rollout.texts(self.policy_tokenizer)
        for sample, text, done in zip(samples, texts, rollout.finished.tolist()):
            prompt_text, messages = fmt.prompt(sample.text)
            reply = fmt.reply_text(prompt_text, messages, text, sample.where)
            rows.append(fmt.plain_start() + fmt.encode(prompt_text) +
                        (fmt.final_reply(reply) if done else fmt.encode(reply)))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), fmt.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, :len(row)], mask[b, :len(row)] = torch.tensor(row), 1
        device = rollout.sequences.device
        return ids.to(device), mask.to(device), None

    def __call__(self, rollout: Rollout, samples: Sequence[PromptSample]) -> torch.Tensor:
        if self.formatter is not None:
            ids, mask, positions = self._retokenized(rollout, samples)
        else:     # left-padded prompts: positions from the mask, as the sampler had them
            ids, mask, positions = (rollout.sequences, rollout.attention_mask,
                                    rollout.position_ids)
        # On the policy's base: its reward adapter, in eval mode; a model of its own is
        # always in eval mode.
        shared = self.base is not None
        switch = use_adapter(self.base, REWARD_ADAPTER) if shared else contextlib.nullcontext()
        mode = evaluating(self.base) if shared else contextlib.nullcontext()
        with torch.no_grad(), switch, mode, common.autocast(ids.device, self.precision):
            return self.model(ids, mask, position_ids=positions).float()


def _reward_folder(path: Path) -> Path:
    """The export folder of a reward-model run folder (model/ or adapter/), else ``path``."""
    for sub in (common.MODEL_DIR, common.ADAPTER_DIR):
        if (path / sub).is_dir():
            return path / sub
    return path


def check_reward_model(path: str | os.PathLike) -> Path:
    """``--reward-model``'s path, checked to exist (FileNotFoundError naming the flag)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--reward-model: no such folder: {str(path)!r}")
    return path


def _same_tokenizer(a, b) -> bool:
    return (a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id
            and a.bos_token_id == b.bos_token_id
            and getattr(a, "chat_template", None) == getattr(b, "chat_template", None))


def build_reward(*, reward_model: str | None, reward_fn: str | None, policy: nn.Module,
                 tokenizer, model_path: str, dtype: str = "float32",
                 device: torch.device | str = "cpu", attn_implementation: str | None = None,
                 use_chat_template: bool = True, precision: str = "none"
                 ) -> tuple[Callable[[Rollout, Sequence[PromptSample]], torch.Tensor], str]:
    """(the reward source, a line for the log) from ``--reward-model`` or ``--reward-fn``
    (exactly one). A LoRA reward export on ``model_path`` is loaded onto ``policy`` when
    the policy trains LoRA adapters (module docstring). Errors name the flag."""
    if (reward_model is None) == (reward_fn is None):
        raise ValueError("--reward-model / --reward-fn: give exactly one")
    if reward_fn is not None:
        return RewardFunction(load_reward_fn(reward_fn), tokenizer), f"reward: {reward_fn}"
    path = check_reward_model(reward_model)
    folder = _reward_folder(path)
    shared = False
    if (folder / SCORE_FILE).is_file() and lora_modules(policy):
        config = json.loads((folder / CONFIG_NAME).read_text()) \
            if (folder / CONFIG_NAME).is_file() else {}
        base = config.get("base_model_name_or_path")
        shared = base is not None and Path(base).resolve() == Path(model_path).resolve()
    try:
        model = load_reward_model(path, base=policy if shared else None,
                                  adapter_name=REWARD_ADAPTER, dtype=dtype, device=device,
                                  attn_implementation=attn_implementation)
    except (ValueError, OSError) as exc:
        raise ValueError(f"--reward-model: {exc}") from None
    if not shared:
        model.eval().requires_grad_(False)
    own = load_tokenizer(folder)
    retokenize = own is not None and not _same_tokenizer(own, tokenizer)
    formatter = _Formatter(own, use_chat_template) if retokenize else None
    scorer = RewardModelScorer(model, base=policy if shared else None, formatter=formatter,
                               policy_tokenizer=tokenizer, precision=precision)
    where = "on the policy's base" if shared else "a model of its own"
    extra = ", texts re-tokenised with its tokenizer" if retokenize else ""
    return scorer, f"reward: the reward model {reward_model} ({where}{extra})"


def apply_missing_eos_penalty(scores: torch.Tensor, finished: torch.Tensor,
                              penalty: float | None) -> torch.Tensor:
    """``scores`` [B] with ``penalty`` subtracted where ``finished`` [B] is False (cut off
    by max_new_tokens); None returns them unchanged."""
    if penalty is None:
        return scores
    return scores - penalty * (~finished.to(scores.device)).to(scores.dtype)


# ----------------------------------------------------------------------------------------
# Experience


@dataclass(frozen=True)
class Sampling:
    """``generate``'s settings. temperature > 0 (the log-probs are taken at it).
    ``bad_token_ids``: ids never sampled (``resolve_bad_token_ids`` turns
    ``--bad-token-ids`` into them); the log-probs stay those of the whole vocabulary."""
    max_new_tokens: int
    eos_token_id: int | None
    pad_token_id: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    bad_token_ids: tuple[int, ...] = ()

    def generate(self, policy: nn.Module, prompts: Sequence[Sequence[int]],
                 generator=None) -> Rollout:
        """``kernelrl.train.rollout.generate`` of ``prompts`` (token-id lists) with these
        settings, in the caller's mode, grad mode and precision."""
        return generate(policy, prompts, max_new_tokens=self.max_new_tokens,
                        temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                        eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                        stop_token_ids=self.stop_token_ids, generator=generator,
                        bad_token_ids=self.bad_token_ids)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Training-time noise off everywhere in ``model``, in place: every ``nn.Dropout``'s p,
    every float module attribute named ``*dropout`` (Hugging Face attention's
    ``attention_dropout``) and every MoE router's ``jitter_noise`` (Mixtral's
    ``router_jitter_noise``, on transformers' blocks and on ``kernelrl.nn.SparseMoE``) set
    to 0: noise in the update's forward would make the ratio to the old log-probs differ
    from 1 with no change to the policy."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if ((name.endswith("dropout") or name == "jitter_noise")
                    and isinstance(value, float)):
                setattr(module, name, 0.0)
    return model


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: ``model`` in eval mode inside, its mode restored after."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


def policy_logprobs(model: nn.Module, rollout: Rollout, temperature: float,
                    precision: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropies) [B, R] of the rollout's response tokens under ``model`` at
    ``temperature``, under the caller's grad mode: the old log-probs and the update's come
    from this one call, so they are bitwise equal for equal weights."""
    with common.autocast(rollout.sequences.device, precision):
        return rollout_logprobs(model, rollout, temperature=temperature, return_entropy=True)


class Reference:
    """π_ref's log-probs of a rollout: ``model`` (a frozen copy, in eval mode), or with
    ``adapters_off`` the LoRA policy itself with its adapters disabled (no copy)."""

    def __init__(self, model: nn.Module, *, adapters_off: bool = False):
        self.model, self.adapters_off = model, adapters_off

    @classmethod
    def for_policy(cls, policy: nn.Module, cfg: common.TrainConfig,
                   device: torch.device) -> tuple["Reference", str]:
        """The policy's reference and a line for the log: the adapters-off policy with
        LoRA, else a frozen copy of ``cfg.model``."""
        if lora_modules(policy):
            return cls(policy, adapters_off=True), "reference: the policy, adapters disabled"
        copy = disable_dropout(common.frozen_copy(cfg, device))
        return cls(copy), f"reference: a frozen copy of {cfg.model}"

    def logprobs(self, rollout: Rollout, temperature: float,
                 precision: str = "none") -> torch.Tensor:
        off = disable_adapters(self.model) if self.adapters_off else contextlib.nullcontext()
        with torch.no_grad(), off:
            return policy_logprobs(self.model, rollout, temperature, precision)[0]


@dataclass
class Experience:
    """One batch of sampled, scored completions (B rows; P, R: the rollout's widths).

    rollout       the sequences, masks, ``finished`` and the sampler's log-probs
    samples       the prompt of each row (a prompt's ``repeats`` rows are consecutive)
    logprobs      [B, R] old log-probs (``policy_logprobs``, no gradients), 0 on padding
    entropy       [B, R] the policy's entropies at sampling time
    ref_logprobs  [B, R] the reference's, or None
    rewards       [B] float32 the reward source's scores
    scores        [B] float32 the rewards after the missing-EOS penalty
    generate_seconds  wall time of ``generate`` (it ends with a host sync)
    """
    rollout: Rollout
    samples: list[PromptSample]
    logprobs: torch.Tensor
    entropy: torch.Tensor
    ref_logprobs: torch.Tensor | None
    rewards: torch.Tensor
    scores: torch.Tensor
    generate_seconds: float

    @property
    def kl(self) -> torch.Tensor | None:
        """[B] Σ_t (old − ref log-prob) over each response: the sampled estimate of
        KL(π ‖ π_ref) of the completion; None without a reference."""
        if self.ref_logprobs is None:
            return None
        mask = self.rollout.response_mask.to(self.logprobs.dtype)
        return ((self.logprobs - self.ref_logprobs) * mask).sum(-1)


def collect_experience(policy: nn.Module, samples: Sequence[PromptSample], *, sampling: Sampling,
                       reward: Callable[[Rollout, Sequence[PromptSample]], torch.Tensor],
                       repeats: int = 1, reference: Reference | None = None,
                       missing_eos_penalty: float | None = None,
                       precision: str = "none") -> Experience:
    """Sample ``repeats`` completions of each prompt (rows of one prompt consecutive), in
    eval mode from the global RNG without gradients; then, in the policy's own mode, the
    old log-probs, the reference's, and the scores (module docstring)."""
    rows = [s for s in samples for _ in range(repeats)]
    device = policy.get_output_embeddings().weight.device
    start = time.perf_counter()
    with evaluating(policy), torch.no_grad(), common.autocast(device, precision):
        rollout = sampling.generate(policy, [s.ids for s in rows])
    seconds = time.perf_counter() - start
    with torch.no_grad():
        logprobs, entropy = policy_logprobs(policy, rollout, sampling.temperature, precision)
    ref = (reference.logprobs(rollout, sampling.temperature, precision)
           if reference is not None else None)
    rewards = reward(rollout, rows)
    scores = apply_missing_eos_penalty(rewards, rollout.finished, missing_eos_penalty)
    return Experience(rollout, rows, logprobs, entropy, ref, rewards, scores, seconds)


def rollout_metrics(experiences: Sequence[Experience],
                    extra: dict[str, torch.Tensor] | None = None
                    ) -> tuple[dict[str, float], int]:
    """(metrics, tokens) of a step's experience, with one host sync: reward (mean),
    reward_std, response_length (mean tokens), truncated (fraction cut off by
    max_new_tokens), entropy (token mean at sampling), kl (mean Σ_t old − ref, with a
    reference), rollout/logprob_drift (max |sampler − old| log-prob), rollout/tokens_per_s
    (response tokens per second of ``generate``), then ``extra``'s 0-d device statistics
    (a trainer's own, brought back by the same sync); tokens: prompt + response tokens."""
    cat = torch.cat
    rewards = cat([e.rewards for e in experiences])
    lengths = cat([e.rollout.response_lengths for e in experiences]).float()
    masks = [e.rollout.response_mask.float() for e in experiences]
    values = {"reward": rewards.mean(), "reward_std": rewards.std(correction=0),
              "response_length": lengths.mean(),
              "truncated": cat([(~e.rollout.finished).float() for e in experiences]).mean(),
              "entropy": sum((e.entropy * m).sum() for e, m in zip(experiences, masks))
              / lengths.sum()}
    if experiences[0].ref_logprobs is not None:
        values["kl"] = cat([e.kl for e in experiences]).mean()
    values["rollout/logprob_drift"] = torch.stack(
        [logprob_drift(e.rollout, e.logprobs) for e in experiences]).amax()
    values["rollout/response_tokens"] = lengths.sum()
    values["tokens"] = sum(e.rollout.attention_mask.sum() for e in experiences)
    extra = extra or {}
    # The step's one sync for its rollout numbers (outside the update's hot path).
    flat = torch.stack([v.double() for v in (*values.values(), *extra.values())]).tolist()
    host = dict(zip(values, flat))
    tokens, response_tokens = int(host.pop("tokens")), host.pop("rollout/response_tokens")
    seconds = sum(e.generate_seconds for e in experiences)
    host["rollout/tokens_per_s"] = response_tokens / max(seconds, 1e-9)
    host.update(zip(extra, flat[len(values):]))
    return host, tokens


def evaluate_rewards(policy: nn.Module, dataset: PromptDataset, *, batch_size: int,
                     sampling: Sampling, reward, seed: int = 0,
                     precision: str = "none") -> dict[str, float]:
    """Mean reward and response length of one completion per held-out prompt, as
    ``eval/reward`` and ``eval/response_length``. Sampled from a private generator seeded
    by ``seed`` (the same draws at every evaluation, nothing from the global RNG), in
    eval mode without gradients."""
    device = policy.get_output_embeddings().weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with evaluating(policy), torch.no_grad(), common.autocast(device, precision):
        for start in range(0, len(dataset), batch_size):
            rows = dataset.samples[start:start + batch_size]
            rollout = sampling.generate(policy, [s.ids for s in rows], generator)
            total += torch.stack([reward(rollout, rows).sum().double(),
                                  rollout.response_lengths.sum().double()])
    reward_sum, length_sum = total.tolist()
    return {"eval/reward": reward_sum / len(dataset),
            "eval/response_length": length_sum / len(dataset)}
