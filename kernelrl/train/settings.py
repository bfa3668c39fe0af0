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


def check_numbers(cfg: Any, ranges: dict[str, tuple[Callable[[float], bool], str]]) -> None:
    """For each ``name: (test, expected)``: field ``name`` of ``cfg`` must be an int or
    float (not a bool) that passes ``test``, else ``bad_setting``."""
    for name, (test, expected) in ranges.items():
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not test(value):
            raise bad_setting(cfg, name, expected)


def validate_common(cfg: TrainConfig) -> None:
    """Check the ``TrainConfig`` fields of ``cfg``: a ValueError naming the flag for the
    first one that cannot be used (the command line exits with status 2 on it). Every
    trainer config's ``__post_init__`` calls it before checking its own fields.

    Integers have a least value (``--batch-size`` >= 1, ``--max-length`` >= 2, ...),
    numbers a range (``--lr`` finite and > 0, ratios in [0, 1), ...); ``--warmup-steps``
    and ``--warmup-ratio``, ``--eval-data`` and ``--eval-fraction`` exclude each other;
    ``--eval-every`` needs held-out data (``--eval-data`` or ``--eval-fraction``)."""
    for name, floor in _INT_FLOORS.items():
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < floor:
            raise bad_setting(cfg, name, f"an int >= {floor}")
    max_steps = cfg.max_steps
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                  or max_steps < 1):
        raise bad_setting(cfg, "max_steps", "an int >= 1 or none")
    check_numbers(cfg, _RANGES)
    if cfg.overlong not in OVERLONG:
        raise bad_setting(cfg, "overlong", f"one of {OVERLONG}")
    if cfg.warmup_steps and cfg.warmup_ratio:
        raise ValueError(f"--warmup-steps {cfg.warmup_steps} and --warmup-ratio "
                         f"{cfg.warmup_ratio}: give one or the other")
    if cfg.eval_data is not None and cfg.eval_fraction:
        raise ValueError("--eval-data and --eval-fraction: give one or the other")
    if cfg.eval_every and cfg.eval_data is None and not cfg.eval_fraction:
        raise ValueError(f"--eval-every {cfg.eval_every}: there is no held-out data to "
                         f"evaluate on; give --eval-data or --eval-fraction")


def run_main(config_cls: type, train: Callable[[Any], Any], argv: Sequence[str] | None, *,
             prog: str, description: str) -> int:
    """A trainer's command line: parse ``argv`` (default ``sys.argv[1:]``) into a
    ``config_cls`` (flags, or ``--config FILE.toml`` with flags on top) and call
    ``train(cfg)``. Bad flags or settings exit with status 2 (argparse's usage error); an
    input or run-folder problem, or a diverged loss, prints one line naming it and
    returns 1; a finished run returns 0."""
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=description,
        epilog="Settings may also come from --config FILE.toml (same names, flags override "
               "it); a run's config.toml repeats it.")
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
