"""The settings every trainer takes, declared once, and every trainer's ``main``.

The settings. Every entry point has one flat config dataclass whose fields its command-line
flags mirror one to one. The settings all trainers take (``--model``, ``--data``,
``--out``, the schedule, LoRA, precision, checkpointing, ...) are declared once, in the
data-only base ``TrainConfig``, and a trainer's config is a dataclass subclass of it:

    @dataclass
    class SFTConfig(TrainConfig):
        \"\"\"Supervised fine-tuning ...\"\"\"            # the --help description
        lr: float = field(default=2e-5, metadata={"help": "peak learning rate (AdamW)"})
        packing: bool = field(default=False, metadata={"help": "..."})

        def __post_init__(self):
            validate_common(self)
            ...  the checks of its own fields (check_numbers, bad_setting)

Redeclaring a shared field (``lr``) changes only its default or help, and it keeps its
place; a new field (``packing``) comes after the shared ones. So the config stays flat:
``dataclasses.fields(SFTConfig)`` is every setting, one flag each (the shared ones first,
in the order declared here, then the trainer's own), and config.toml holds them all as
``name = value`` lines. Why a base class rather than three copies: the shared fields,
their help and their range checks then have one definition, and the trainers cannot drift
apart. ``TrainConfig`` holds fields only: no methods, no ``__post_init__``, so no trainer
inherits behaviour from it; each subclass calls ``validate_common`` itself.

The RL trainers (GRPO, PPO) share more settings (the reward source, sampling, the update's
epochs and clipping): ``RLConfig``, a data-only subclass of ``TrainConfig`` declaring them
once, is their configs' base in the same way, and ``validate_rl`` (which calls
``validate_common``) checks its fields.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence

from kernelrl.models.lora import DEFAULT_TARGET_MODULES
from kernelrl.train.checkpoint import CheckpointError
from kernelrl.train.config import add_dataclass_args, config_from_namespace
from kernelrl.train.data import OVERLONG
from kernelrl.train.metrics import NonFiniteLossError


#: ``--bad-token-ids``' word for the tokenizer's special tokens other than EOS
SPECIAL_TOKENS = "special"
#: ``--bad-token-ids``' help (the RL trainers and ``kernelrl sample``)
BAD_TOKEN_IDS_HELP = ("token ids never sampled, comma-separated; special: the tokenizer's "
                      "special tokens but EOS (pad, bos, unk, additional ones), combinable "
                      "with ids (special,7); '' or none: ban nothing")

#: ``--data``'s help for the preference trainers (reward model, DPO)
PREFERENCE_DATA_HELP = ('training JSONL: {"prompt", "chosen", "rejected"} or {"prompt", '
                        '"responses": [best, ..., worst]} per line')


# ----------------------------------------------------------------------------------------
# The shared settings


@dataclass
class TrainConfig:
    """The settings every trainer takes (module docstring): subclass it, add the trainer's
    own fields, redeclare a field here only to change its default or help."""

    model: str = field(metadata={"help": "local model folder (config.json + safetensors, "
                                         "as save_pretrained writes it); never downloaded"})
    data: str = field(metadata={"help": "training JSONL, one example per line"})
    out: str = field(metadata={"help": "run folder: config, metrics, checkpoints, final "
                                       "model; must not hold another run's checkpoints"})
    tokenizer: Optional[str] = field(default=None, metadata={
        "help": "tokenizer folder (default: the --model folder)"})
    eval_data: Optional[str] = field(default=None, metadata={
        "help": "held-out JSONL in the same format (or use --eval-fraction)"})
    eval_fraction: float = field(default=0.0, metadata={
        "help": "fraction of --data held out for evaluation, picked by --seed"})
    eval_every: int = field(default=0, metadata={
        "help": "evaluate every this many steps (0: only at the end); needs held-out data"})
    epochs: int = field(default=1, metadata={"help": "passes over the training data"})
    max_steps: Optional[int] = field(default=None, metadata={
        "help": "optimizer steps to run; overrides --epochs (the data then cycles)"})
    batch_size: int = field(default=4, metadata={
        "help": "prompts per micro-batch (each with all its responses), per device"})
    grad_accum: int = field(default=1, metadata={
        "help": "micro-batches per optimizer step; the loss is averaged over the prompts "
                "of the whole step"})
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate (AdamW)"})
    min_lr_ratio: float = field(default=0.0, metadata={
        "help": "final learning rate of the cosine decay, as a fraction of --lr"})
    weight_decay: float = field(default=0.0, metadata={
        "help": "AdamW weight decay (matrices only; not biases or norms)"})
    warmup_steps: int = field(default=0, metadata={
        "help": "linear warmup steps (or use --warmup-ratio)"})
    warmup_ratio: float = field(default=0.0, metadata={
        "help": "linear warmup as a fraction of the steps (or use --warmup-steps)"})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "clip the gradients' global L2 norm to this (0: no clipping)"})
    max_length: int = field(default=1024, metadata={
        "help": "tokens per sequence (prompt + one response)"})
    overlong: Literal["truncate", "drop"] = field(default="truncate", metadata={
        "help": "a sequence over --max-length: truncate (the prompt first, one cut for all "
                "of a prompt's responses) or drop that response and its pairs"})
    keep_prompt_tokens: Optional[int] = field(default=None, metadata={
        "help": "when truncating, keep at least this many prompt tokens (default: "
                "max_length // 2)"})
    chat_template: bool = field(default=True, metadata={
        "help": "format with the tokenizer's chat template when it has one"})
    shuffle: bool = field(default=True, metadata={
        "help": "shuffle the training data each epoch (seeded by --seed)"})
    lora_r: int = field(default=0, metadata={
        "help": "LoRA rank R; 0 trains every parameter (full fine-tuning)"})
    lora_alpha: float = field(default=16.0, metadata={
        "help": "LoRA alpha (the update is scaled by alpha / R)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    lora_targets: str = field(default=",".join(DEFAULT_TARGET_MODULES), metadata={
        "help": "comma-separated module names that get adapters, or all-linear"})
    qlora: bool = field(default=False, metadata={
        "help": "QLoRA: quantize the --lora-targets linears of the base to 4-bit NF4 at "
                "load and train LoRA adapters over them (needs --lora-r > 0)"})
    dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={
        "help": "dtype of the model weights"})
    autocast: Literal["none", "bfloat16"] = field(default="none", metadata={
        "help": "run the forward under bf16 autocast (weights keep --dtype)"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={
        "help": "auto: cuda when available, else cpu"})
    attn_implementation: Optional[str] = field(default=None, metadata={
        "help": "attention kernel: sdpa, eager, flash_attention_2, ... (default: "
                "transformers' choice)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in the backward to save memory"})
    moe_kernels: bool = field(default=True, metadata={
        "help": "run a mixture-of-experts model's sparse blocks (Mixtral, Qwen3-MoE) on "
                "kernelrl's MoE kernels; --no-moe-kernels keeps transformers' own (and so "
                "no router aux loss)"})
    router_aux_coef: Optional[float] = field(default=None, metadata={
        "help": "weight of the MoE router's load-balancing loss, as transformers' "
                "router_aux_loss_coef (default: the model config's; 0: off)"})
    seed: int = field(default=0, metadata={
        "help": "seed for the initialisation, data order, split and dropout"})
    resume: Optional[str] = field(default=None, metadata={
        "help": "continue a run: latest (the last checkpoint in --out), or a run folder "
                "or checkpoints/step-<N> folder"})
    save_every: int = field(default=500, metadata={
        "help": "checkpoint every this many steps (0: only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={
        "help": "checkpoints kept (the newest ones)"})
    log_every: int = field(default=1, metadata={
        "help": "write metrics every this many steps (averaged over them)"})


# The integer settings of TrainConfig and their least value.
_INT_FLOORS = {"epochs": 1, "batch_size": 1, "grad_accum": 1, "max_length": 2, "log_every": 1,
               "keep_checkpoints": 1, "eval_every": 0, "save_every": 0, "warmup_steps": 0,
               "lora_r": 0}
# The number settings of TrainConfig: name -> (test, what it expects).
_RANGES = {
    "lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "eval_fraction": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "warmup_ratio": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "max_grad_norm": (lambda v: v >= 0, "a number >= 0 (0: off)"),
    "lora_alpha": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
}


def bad_setting(cfg: Any, name: str, expected: str) -> ValueError:
    """The error for field ``name`` of ``cfg``: ``--flag-name: expected ..., got ...``."""
    flag = "--" + name.replace("_", "-")
    return ValueError(f"{flag}: expected {expected}, got {getattr(cfg, name)!r}")


def check_numbers(cfg: Any, ranges: dict[str, tuple[Callable[[float], bool], str]], *,
                  optional: bool = False) -> None:
    """For each ``name: (test, expected)``: field ``name`` of ``cfg`` must be an int or
    float (not a bool) that passes ``test`` (or, with ``optional``, None), else
    ``bad_setting``."""
    for name, (test, expected) in ranges.items():
        value = getattr(cfg, name)
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not test(value):
            raise bad_setting(cfg, name, expected)


def check_ints(cfg: Any, floors: dict[str, int], *, optional: bool = False) -> None:
    """For each ``name: least``: field ``name`` of ``cfg`` must be an int (not a bool) >=
    ``least`` (or, with ``optional``, None), else ``bad_setting``."""
    for name, least in floors.items():
        value = getattr(cfg, name)
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise bad_setting(cfg, name, f"an int >= {least}" + (" or none" if optional else ""))


def parse_bad_token_ids(text: Any, flag: str = "--bad-token-ids"
                        ) -> tuple[bool, tuple[int, ...]]:
    """``--bad-token-ids`` read: (whether it names the special tokens, the explicit ids in
    the order given, without repeats). ``text``: comma-separated items, each a token id
    (an int >= 0) or ``special`` (``SPECIAL_TOKENS``); ``''`` or ``none`` bans nothing.
    Which ids ``special`` means needs the tokenizer: ``kernelrl.train.rl.
    resolve_bad_token_ids``. A ValueError names ``flag`` and the item it cannot read."""
    expected = (f"comma-separated token ids (ints >= 0) and/or {SPECIAL_TOKENS!r} (the "
                f"tokenizer's special tokens but EOS), or '' or none to ban nothing")
    if not isinstance(text, str):
        raise ValueError(f"{flag}: expected {expected}, got {text!r}")
    if text.strip().lower() in ("", "none"):
        return False, ()
    special, ids = False, []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item.lower() == SPECIAL_TOKENS:
            special = True
        elif item.isascii() and item.isdigit():
            if int(item) not in ids:
                ids.append(int(item))
        else:
            raise ValueError(f"{flag}: expected {expected}, got {item!r} in {text!r}")
    return special, tuple(ids)


#: ranges for ``check_numbers`` that several settings use
FINITE = (math.isfinite, "a finite number")
NONNEGATIVE = (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def validate_common(cfg: TrainConfig) -> None:
    """Check the ``TrainConfig`` fields of ``cfg``: a ValueError naming the flag for the
    first one that cannot be used (the command line exits with status 2 on it). Every
    trainer config's ``__post_init__`` calls it before checking its own fields.

    Integers have a least value (``--batch-size`` >= 1, ``--max-length`` >= 2, ...),
    numbers a range (``--lr`` finite and > 0, ratios in [0, 1), ``--router-aux-coef``
    finite and >= 0 or none, ...); ``--warmup-steps``
    and ``--warmup-ratio``, ``--eval-data`` and ``--eval-fraction`` exclude each other;
    ``--eval-every`` needs held-out data (``--eval-data`` or ``--eval-fraction``)."""
    check_ints(cfg, _INT_FLOORS)
    check_ints(cfg, {"max_steps": 1}, optional=True)
    check_numbers(cfg, _RANGES)
    check_numbers(cfg, {"router_aux_coef": NONNEGATIVE}, optional=True)
    if cfg.overlong not in OVERLONG:
        raise bad_setting(cfg, "overlong", f"one of {OVERLONG}")
    if cfg.warmup_steps and cfg.warmup_ratio:
        raise ValueError(f"--warmup-steps {cfg.warmup_steps} and --warmup-ratio "
                         f"{cfg.warmup_ratio}: give one or the other")
    if cfg.eval_data is not None and cfg.eval_fraction:
        raise ValueError("--eval-data and --eval-fraction: give one or the other")
    if cfg.qlora and not cfg.lora_r:
        raise ValueError("--qlora: needs LoRA adapters to train over the 4-bit base; give "
                         "--lora-r > 0 (e.g. --lora-r 16)")
    if cfg.eval_every and cfg.eval_data is None and not cfg.eval_fraction:
        raise ValueError(f"--eval-every {cfg.eval_every}: there is no held-out data to "
                         f"evaluate on; give --eval-data or --eval-fraction")


# ----------------------------------------------------------------------------------------
# The settings the RL trainers share


@dataclass
class RLConfig(TrainConfig):
    """The settings GRPO and PPO share (``kernelrl.train.rl``: prompts, reward, sampling;
    ``kernelrl.train.rl_update``: the update phase): data only, as ``TrainConfig`` (module
    docstring). An RL trainer's config subclasses it, redeclares a field only to change
    its default or help, adds its own fields after, and calls ``validate_rl`` first in its
    ``__post_init__``."""

    data: str = field(metadata={"help": 'prompts JSONL: {"prompt": str} per line'})
    grad_accum: int = field(default=1, metadata={
        "help": "micro-batches per step: a step samples --batch-size x --grad-accum "
                "prompts"})
    max_length: int = field(default=1024, metadata={
        "help": "tokens per sequence: prompts are cut to --max-length - --max-new-tokens "
                "unless --max-prompt-length is given"})
    overlong: Literal["truncate", "drop"] = field(default="truncate", metadata={
        "help": "a prompt over its limit: truncate (its oldest tokens go) or drop it"})
    lora_dropout: float = field(default=0.0, metadata={
        "help": "must be 0: the policy runs without dropout (the importance ratio needs "
                "the same network when sampling and updating)"})
    reward_model: Optional[str] = field(default=None, metadata={
        "help": "reward model: a kernelrl rm run folder or its model/ or adapter/ export "
                "(or --reward-fn)"})
    reward_fn: Optional[str] = field(default=None, metadata={
        "help": "reward function module:function, importable from the working directory: "
                "fn(prompts: list[str], responses: list[str]) -> list[float] (or "
                "--reward-model)"})
    max_new_tokens: int = field(default=256, metadata={"help": "tokens per completion"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0)"})
    top_k: int = field(default=0, metadata={"help": "sample from the k likeliest (0: off)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (1: off)"})
    bad_token_ids: str = field(default=SPECIAL_TOKENS, metadata={"help": BAD_TOKEN_IDS_HELP})
    max_prompt_length: Optional[int] = field(default=None, metadata={
        "help": "prompt tokens kept (the last ones; default --max-length - "
                "--max-new-tokens)"})
    num_ppo_epochs: int = field(default=1, metadata={
        "help": "μ: passes over each step's completions"})
    mini_batch_size: Optional[int] = field(default=None, metadata={
        "help": "prompts per optimizer update, a multiple of --batch-size dividing the "
                "step's (default: the whole step, one update per epoch)"})
    clip_eps: float = field(default=0.2, metadata={
        "help": "ε: the ratio is clipped to [1 - ε, 1 + ε]"})
    entropy_coef: float = field(default=0.0, metadata={
        "help": "weight of the entropy bonus (0: off)"})
    missing_eos_penalty: Optional[float] = field(default=None, metadata={
        "help": "subtracted from the score of a completion cut off by --max-new-tokens"})


def validate_rl(cfg: RLConfig) -> None:
    """``validate_common``, then the ``RLConfig`` fields: exactly one of
    ``--reward-model`` and ``--reward-fn`` (the function imported here, so a bad one exits
    2), the ranges, ``--bad-token-ids`` readable (``parse_bad_token_ids``; EOS among
    them is refused once the tokenizer is loaded), ``--lora-dropout`` 0, room for the
    prompt, ``--mini-batch-size`` a multiple of ``--batch-size`` dividing the step's
    prompts. ValueErrors name the flag."""
    validate_common(cfg)
    if (cfg.reward_model is None) == (cfg.reward_fn is None):
        raise ValueError(f"--reward-model / --reward-fn: give exactly one, got "
                         f"{'both' if cfg.reward_model is not None else 'neither'}")
    if cfg.reward_fn is not None:
        from kernelrl.train.rl import load_reward_fn      # rl imports this module
        load_reward_fn(cfg.reward_fn)                     # the import fails here, exit 2
    check_ints(cfg, {"max_new_tokens": 1, "top_k": 0, "num_ppo_epochs": 1})
    check_numbers(cfg, {
        "temperature": POSITIVE, "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
        "clip_eps": NONNEGATIVE, "entropy_coef": FINITE})
    check_numbers(cfg, {"missing_eos_penalty": FINITE}, optional=True)
    parse_bad_token_ids(cfg.bad_token_ids)
    if cfg.lora_dropout != 0:
        raise bad_setting(cfg, "lora_dropout", "0 (RL runs the policy without dropout)")
    if cfg.max_prompt_length is None and cfg.max_new_tokens >= cfg.max_length:
        raise ValueError(f"--max-new-tokens {cfg.max_new_tokens}: leaves no room for the "
                         f"prompt in --max-length {cfg.max_length}")
    check_ints(cfg, {"max_prompt_length": 1}, optional=True)
    step_prompts, mini = cfg.batch_size * cfg.grad_accum, cfg.mini_batch_size
    if mini is not None and (isinstance(mini, bool) or not isinstance(mini, int) or mini < 1
                             or mini % cfg.batch_size or step_prompts % mini):
        raise bad_setting(cfg, "mini_batch_size", f"a multiple of --batch-size "
                          f"({cfg.batch_size}) that divides the step's {step_prompts} prompts")


# ----------------------------------------------------------------------------------------
# The command line


def run_main(config_cls: type, train: Callable[[Any], Any], argv: Sequence[str] | None, *,
             prog: str, description: str, run_config: bool = True) -> int:
    """A trainer's command line: parse ``argv`` (default ``sys.argv[1:]``) into a
    ``config_cls`` (flags, or ``--config FILE.toml`` with flags on top) and call
    ``train(cfg)``. Bad flags or settings exit with status 2 (argparse's usage error); an
    input or run-folder problem, or a diverged loss, prints one line naming it and
    returns 1; a finished run returns 0. ``run_config``: ``train`` writes the settings to
    its run folder's config.toml (the help says so)."""
    repeat = "; a run's config.toml repeats it." if run_config else "."
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=description,
        epilog="Settings may also come from --config FILE.toml (same names, flags override "
               "it)" + repeat)
    add_dataclass_args(parser, config_cls)
    namespace = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        cfg = config_from_namespace(config_cls, namespace)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        train(cfg)
    except (ValueError, OSError, CheckpointError, NonFiniteLossError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0
