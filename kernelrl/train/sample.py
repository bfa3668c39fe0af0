"""Best-of-N sampling: a policy's completions of a file of prompts, the best of N kept.

``kernelrl sample --policy PATH --prompts FILE --out FILE`` samples one completion per
prompt. With ``--best-of N`` and a reward it samples N and keeps the one the reward scores
highest: rejection sampling, "best-of-n" (Nakano et al. 2021, "WebGPT: Browser-assisted
question-answering with human feedback", §3; Stiennon et al. 2020 compare it with RL).
``best_of_n`` is the same for models already loaded.

The policy (``load_policy``): a kernelrl run folder (its ``model/`` or ``adapter/``), a full
model folder (config.json + safetensors, a trainer's ``model/`` or any local causal LM), or
a LoRA export (adapter_config.json: loaded onto its recorded base, or ``--base-model``).
Its tokenizer: ``--tokenizer``, else the one saved beside the weights, else the base's.

Prompts are read and formatted as the RL trainers read them (``kernelrl.train.rl``:
``{"prompt": str}`` per line, the tokenizer's chat template with the generation prompt, or
BOS + the text). A prompt over ``--max-prompt-length`` tokens loses its oldest tokens, never
the whole line: the output has one line per prompt, in the file's order.

Sampling: the N candidates of a prompt are N rows of the same ``generate`` call, with the
prompts of a batch (``--batch-size`` prompts, so batch × N rows). Each row draws its noise
from a generator of its own, seeded by ``sample_seed(seed, prompt index, candidate
index)``. So the completions do not depend on ``--batch-size`` (up to the float rounding of
a batched forward), and candidate 0 of best-of-N is the completion of best-of-1 with the
same seed: a prompt's best of N never scores below its single sample. ``--bad-token-ids``
are never sampled, as in the RL trainers (by default ``special``: the tokenizer's special
tokens but EOS, i.e. pad, BOS, unk, ...; ``''`` bans nothing).

The reward, as the RL trainers' (``rl.build_reward``): a reward model (``--reward-model``, a
kernelrl rm run folder or export; a LoRA one trained on the policy's base sits on that
base) scoring prompt + completion, or a function ``module:function`` (``--reward-fn``),
``fn(prompts, responses) -> list[float] | Tensor`` of the prompt texts and the decoded
completions. No missing-EOS penalty. Ties: the first of the highest-scoring candidates (the
lowest candidate index) is kept. A non-finite score is an error.

Output (``--out``), one JSON object per prompt:

    {"prompt": str, "completion": str, "score": float | null}   + "scores": [float] × N
                                                                  with --best-of

``completion`` is decoded with special tokens skipped; ``score`` is null when no reward is
given. The file is written to a temporary file beside ``--out`` and renamed at the end, so
an interrupted run leaves no partial file; an existing ``--out`` is an error unless
``--overwrite``.

Command line: ``python -m kernelrl.train.sample --help`` (or ``kernelrl sample``).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Sequence

import numpy as np
import torch
from torch import nn

from kernelrl.models.hf import load_model, load_tokenizer, local_folder
from kernelrl.models.lora import CONFIG_NAME, load_adapter
from kernelrl.train import common, rl, settings
from kernelrl.train.rm import SCORE_FILE

__all__ = ["SampleConfig", "Policy", "load_policy", "make_sampling", "sample_seed",
           "best_of_n", "run", "main"]

Reward = Callable[[Any, Sequence[rl.PromptSample]], torch.Tensor]   # rl.build_reward's


@dataclass
class SampleConfig:
    """Best-of-N sampling of a policy's completions, ranked by a reward (module docstring)."""

    policy: str = field(metadata={
        "help": "the policy: a kernelrl run folder, its model/ or adapter/ export, or a "
                "local causal LM folder"})
    prompts: str = field(metadata={"help": 'prompts JSONL: {"prompt": str} per line'})
    out: str = field(metadata={
        "help": 'output JSONL: {"prompt", "completion", "score"} per prompt, plus '
                '"scores" with --best-of'})
    best_of: Optional[int] = field(default=None, metadata={
        "help": "N: sample N completions per prompt and keep the best by the reward "
                "(needs --reward-model or --reward-fn; default: one sample)"})
    reward_model: Optional[str] = field(default=None, metadata={
        "help": "reward model: a kernelrl rm run folder or its model/ or adapter/ export"})
    reward_fn: Optional[str] = field(default=None, metadata={
        "help": "reward function module:function, importable from the working directory: "
                "fn(prompts: list[str], responses: list[str]) -> list[float]"})
    max_new_tokens: int = field(default=256, metadata={"help": "tokens per completion"})
    temperature: float = field(default=1.0, metadata={
        "help": "sampling temperature (0: greedy)"})
    top_k: int = field(default=0, metadata={"help": "sample from the k likeliest (0: off)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (1: off)"})
    bad_token_ids: str = field(default=settings.SPECIAL_TOKENS, metadata={
        "help": settings.BAD_TOKEN_IDS_HELP})
    batch_size: int = field(default=8, metadata={
        "help": "prompts per generate call (each with its N samples as rows)"})
    seed: int = field(default=0, metadata={
        "help": "seed of the samples (the same seed gives the same completions)"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={
        "help": "auto: cuda when available, else cpu"})
    dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={
        "help": "dtype of the model weights"})
    max_prompt_length: Optional[int] = field(default=None, metadata={
        "help": "prompt tokens kept (the last ones; default: the model's "
                "max_position_embeddings - --max-new-tokens)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out"})
    tokenizer: Optional[str] = field(default=None, metadata={
        "help": "tokenizer folder (default: the policy's, else its base model's)"})
    base_model: Optional[str] = field(default=None, metadata={
        "help": "base model folder of a LoRA --policy (default: the one it records)"})
    chat_template: bool = field(default=True, metadata={
        "help": "format prompts with the tokenizer's chat template when it has one"})
    attn_implementation: Optional[str] = field(default=None, metadata={
        "help": "attention kernel: sdpa, eager, ... (default: transformers' choice)"})

    def __post_init__(self):
        settings.check_ints(self, {"max_new_tokens": 1, "top_k": 0, "batch_size": 1, "seed": 0})
        settings.check_ints(self, {"best_of": 1, "max_prompt_length": 1}, optional=True)
        settings.check_numbers(self, {
            "temperature": (lambda v: math.isfinite(v) and v >= 0,
                            "a finite number >= 0 (0: greedy)"),
            "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]")})
        settings.parse_bad_token_ids(self.bad_token_ids)
        if self.reward_model is not None and self.reward_fn is not None:
            raise ValueError("--reward-model / --reward-fn: give one or the other, got both")
        if self.best_of is not None and self.reward_model is None and self.reward_fn is None:
            raise ValueError(f"--best-of {self.best_of}: ranks the samples by a reward; "
                             f"give --reward-model or --reward-fn")
        if self.reward_fn is not None:
            rl.load_reward_fn(self.reward_fn)           # the import fails here, exit 2


# ----------------------------------------------------------------------------------------
# The policy


@dataclass
class Policy:
    """A loaded policy: the causal LM (eval mode, frozen), its tokenizer, the folder its
    weights came from, and its base model folder (the model's own folder when full)."""
    model: nn.Module
    tokenizer: Any
    folder: Path
    base: Path


def _is_classifier(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (ValueError, AttributeError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


def load_policy(path: str | os.PathLike, *, base_model: str | os.PathLike | None = None,
                tokenizer: str | os.PathLike | None = None, dtype: str = "float32",
                device: torch.device | str = "cpu",
                attn_implementation: str | None = None) -> Policy:
    """The policy at ``path`` (module docstring): a run folder, a full model folder or a
    LoRA export (onto ``base_model``, default its recorded base). The model is frozen and
    in eval mode; loading draws nothing from the global RNG. Errors name the flag."""
    given = Path(path).expanduser()
    if not given.exists():
        raise FileNotFoundError(f"--policy: no such folder: {str(given)!r}")
    folder = given
    for sub, marker in ((common.MODEL_DIR, "config.json"), (common.ADAPTER_DIR, CONFIG_NAME)):
        if (given / sub / marker).is_file():
            folder = given / sub
            break
    if (folder / SCORE_FILE).is_file() or _is_classifier(folder):
        raise ValueError(f"--policy: {str(folder)!r} is a reward model, not a causal LM "
                         f"(pass it as --reward-model)")
    options = dict(dtype=dtype, device=device, attn_implementation=attn_implementation)
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        if (folder / CONFIG_NAME).is_file():
            try:
                recorded = json.loads((folder / CONFIG_NAME).read_text())
            except ValueError as exc:
                raise ValueError(f"--policy: {folder / CONFIG_NAME} is not valid JSON: "
                                 f"{exc}") from None
            base = base_model or recorded.get("base_model_name_or_path")
            if not base:
                raise ValueError(f"--base-model: the adapter {str(folder)!r} records no base "
                                 f"model (base_model_name_or_path); pass --base-model")
            base = local_folder(base, "--base-model")
            model = load_model(base, **options)
            load_adapter(model, folder, trainable=False)
        elif (folder / "config.json").is_file():
            if base_model is not None:
                raise ValueError(f"--base-model: only for a LoRA adapter --policy; "
                                 f"{str(folder)!r} is a full model")
            base = local_folder(folder, "--policy")
            model = load_model(base, **options)
        else:
            raise FileNotFoundError(
                f"--policy: {str(given)!r} holds no policy: expected a run folder with "
                f"{common.MODEL_DIR}/ or {common.ADAPTER_DIR}/ (a run that stopped early has "
                f"only checkpoints), a model folder (config.json + safetensors) or a LoRA "
                f"export ({CONFIG_NAME})")
    model.requires_grad_(False).eval()
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        if tok is None:
            raise ValueError(f"--tokenizer: the folder {tokenizer} holds no tokenizer")
    else:
        tok = load_tokenizer(folder) or load_tokenizer(base)
        if tok is None:
            raise ValueError(f"--tokenizer: neither {str(folder)!r} nor {str(base)!r} holds "
                             f"a tokenizer; pass --tokenizer")
    return Policy(model, tok, folder, Path(base))


# ----------------------------------------------------------------------------------------
# Sampling


def make_sampling(tokenizer, *, max_new_tokens: int, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0,
                  bad_token_ids: str | Sequence[int] = settings.SPECIAL_TOKENS
                  ) -> rl.Sampling:
    """``rl.Sampling`` for ``tokenizer``: its EOS ends a completion, its pad token (else
    EOS) pads; as the RL trainers' prompt data sets them. ``bad_token_ids``: never sampled,
    ``--bad-token-ids``' text or a sequence of ids (``rl.resolve_bad_token_ids``; the
    default ``special`` bans the tokenizer's special tokens but EOS)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer: has no eos_token; a completion must be able to end")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return rl.Sampling(max_new_tokens, eos, pad, temperature=temperature, top_k=top_k,
                       top_p=top_p, bad_token_ids=rl.resolve_bad_token_ids(
                           bad_token_ids, tokenizer, eos_token_id=eos))


def sample_seed(seed: int, prompt: int, sample: int) -> int:
    """The seed of the generator that draws candidate ``sample`` of prompt ``prompt`` (0-based
    indices): 64 bits mixed from the triple by numpy's SeedSequence, so that neighbouring
    triples give unrelated streams."""
    state = np.random.SeedSequence([seed, prompt, sample]).generate_state(1, dtype=np.uint64)
    return int(state[0])


def _prompt_limit(policy: nn.Module, sampling: rl.Sampling, limit: int | None) -> int:
    if limit is not None:
        return limit
    config = policy.config.get_text_config() if hasattr(policy.config, "get_text_config") \
        else policy.config
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return sys.maxsize
    if positions - sampling.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {sampling.max_new_tokens}: leaves no room for "
                         f"the prompt in the model's max_position_embeddings ({positions})")
    return positions - sampling.max_new_tokens


def _check_int(name: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name}: expected an int >= {least}, got {value!r}")


def _best(policy: nn.Module, tokenizer, data: rl.PromptDataset, *, n: int,
          reward: Reward | None, sampling: rl.Sampling, seed: int, batch_size: int,
          progress: bool | None, reward_name: str = "reward") -> Iterator[dict]:
    """One result per prompt of ``data``, in order: {"prompt", "completion", "score",
    "scores"} (scores None without a reward)."""
    from tqdm import tqdm

    device = policy.get_output_embeddings().weight.device
    show = progress if progress is not None else sys.stderr.isatty()
    bar = tqdm(total=len(data), unit="prompt", desc="sample", file=sys.stderr,
               disable=not show, dynamic_ncols=True)
    try:
        for start in range(0, len(data), batch_size):
            samples = data.samples[start:start + batch_size]
            rows = [s for s in samples for _ in range(n)]        # a prompt's N consecutive
            generators = [torch.Generator(device=device).manual_seed(
                sample_seed(seed, start + i, j)) for i in range(len(samples)) for j in range(n)]
            # Eval mode and no gradients for this batch only, not across the yields.
            with rl.evaluating(policy), torch.no_grad():
                rollout = sampling.generate(policy, [s.ids for s in rows], generators)
                # One host sync per batch: the scores, to rank and to write.
                scores = reward(rollout, rows).float().tolist() if reward is not None else None
            texts = rollout.texts(tokenizer)
            for i, sample in enumerate(samples):
                mine = scores[i * n:(i + 1) * n] if scores is not None else None
                best = 0
                if mine is not None:
                    for j, value in enumerate(mine):
                        if not math.isfinite(value):
                            raise ValueError(f"{reward_name}: score {value} for candidate {j} "
                                             f"of the prompt at {sample.where}")
                        if value > mine[best]:           # strictly: ties keep the first
                            best = j
                yield {"prompt": sample.text, "completion": texts[i * n + best],
                       "score": mine[best] if mine is not None else None, "scores": mine}
            bar.update(len(samples))
    finally:
        bar.close()


def best_of_n(policy: nn.Module, tokenizer, prompts: list[str], *, n: int,
              reward: Reward | None, sampling: rl.Sampling, seed: int = 0,
              batch_size: int = 8, max_prompt_length: int | None = None,
              use_chat_template: bool = True, progress: bool | None = False) -> list[dict]:
    """Best-of-``n`` completions of ``prompts`` by ``policy`` (module docstring).

    reward: a scorer as ``rl.build_reward`` returns it, ``reward(rollout, samples) ->
        [rows] float`` (wrap a plain ``fn(prompts, responses)`` in ``rl.RewardFunction(fn,
        tokenizer)``); None samples one completion per prompt, unscored (``n`` must be 1).
    sampling: ``rl.Sampling`` (``make_sampling`` builds it from the tokenizer).
    seed: candidate j of prompts[i] is drawn with ``sample_seed(seed, i, j)``.
    batch_size: prompts per ``generate`` call (batch_size × n rows).
    max_prompt_length: prompt tokens kept (default: the model's max_position_embeddings −
        max_new_tokens). progress: a bar on stderr (None: when stderr is a terminal).

    Returns one dict per prompt, in order: ``{"prompt", "completion", "score", "scores"}``:
    the best candidate's text and score and the n candidates' scores (both None without a
    reward). Runs the policy in eval mode without gradients, its mode restored after.
    """
    _check_int("n", n, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    if reward is None and n > 1:
        raise ValueError(f"reward: best-of-n with n={n} ranks the candidates by a reward; "
                         f"got None")
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts: expected a list of prompt strings")
    if not prompts:
        return []
    records = [(f"prompts[{i}]", text) for i, text in enumerate(prompts)]
    data = rl.tokenize_prompts(records, tokenizer, use_chat_template=use_chat_template,
                               max_prompt_length=_prompt_limit(policy, sampling,
                                                               max_prompt_length))
    return list(_best(policy, tokenizer, data, n=n, reward=reward, sampling=sampling,
                      seed=seed, batch_size=batch_size, progress=progress))


# ----------------------------------------------------------------------------------------
# The command line


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise IsADirectoryError(f"--out: {str(out)!r} is a folder; expected a JSONL file path")
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out: {str(out)!r} exists; pass --overwrite to replace it")


def run(cfg: SampleConfig) -> Path:
    """Sample as ``cfg`` says and write ``cfg.out`` (module docstring); returns its path.
    Inputs are checked before anything is loaded; ``--out`` appears only when complete."""
    out = Path(cfg.out).expanduser()
    _check_out(out, cfg.overwrite)
    records = rl.read_prompts(cfg.prompts)
    if cfg.reward_model is not None:
        rl.check_reward_model(cfg.reward_model)
    device = common.choose_device(cfg.device)

    policy = load_policy(cfg.policy, base_model=cfg.base_model, tokenizer=cfg.tokenizer,
                         dtype=cfg.dtype, device=device,
                         attn_implementation=cfg.attn_implementation)
    model, tokenizer = policy.model, policy.tokenizer
    sampling = make_sampling(tokenizer, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                             bad_token_ids=cfg.bad_token_ids)
    data = rl.tokenize_prompts(records, tokenizer, use_chat_template=cfg.chat_template,
                               max_prompt_length=_prompt_limit(model, sampling,
                                                               cfg.max_prompt_length))
    reward, line = None, "reward: none"
    if cfg.reward_model is not None or cfg.reward_fn is not None:
        reward, line = rl.build_reward(
            reward_model=cfg.reward_model, reward_fn=cfg.reward_fn, policy=model,
            tokenizer=tokenizer, model_path=str(policy.base), dtype=cfg.dtype, device=device,
            attn_implementation=cfg.attn_implementation, use_chat_template=cfg.chat_template)
    n = cfg.best_of or 1
    print(f"policy: {policy.folder} ({len(data)} prompts, best of {n}); {line}",
          file=sys.stderr, flush=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    total, count = 0.0, 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for result in _best(model, tokenizer, data, n=n, reward=reward, sampling=sampling,
                                seed=cfg.seed, batch_size=cfg.batch_size, progress=None,
                                reward_name="--reward-model" if cfg.reward_model
                                else "--reward-fn"):
                if cfg.best_of is None:
                    del result["scores"]
                if result["score"] is not None:
                    total, count = total + result["score"], count + 1
                f.write(json.dumps(result, ensure_ascii=False) + "\n")
        _check_out(out, cfg.overwrite)         # nothing appeared there meanwhile
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    mean = f", mean score {total / count:.4g}" if count else ""
    print(f"wrote {len(data)} completions to {out}{mean}", file=sys.stderr, flush=True)
    return out


def main(argv: Sequence[str] | None = None, prog: str = "kernelrl sample") -> int:
    """``kernelrl sample``: ``settings.run_main`` for SampleConfig and ``run`` (exit status
    0; 2 for bad flags or settings; 1, with one line naming it, for an input problem)."""
    return settings.run_main(
        SampleConfig, run, argv, prog=prog, run_config=False,
        description="Sample completions of a policy for a file of prompts; with --best-of N, "
                    "keep the best of N by a reward model or a Python reward function.")


if __name__ == "__main__":
    sys.exit(main(prog="python -m kernelrl.train.sample"))
