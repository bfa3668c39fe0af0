"""The pieces kernelrl's trainers (SFT, reward model, DPO) share: plain functions, no base
class. Each trainer's loop calls them in the same order:

    device = choose_device(cfg.device);  seed_everything(cfg.seed)
    run_dir, ckpt = start_run(cfg.out, cfg.resume)      # refuses to overwrite a run
    model = setup_model(cfg.model, dtype=..., lora_r=..., ...)
    params = trainable_parameters(model)
    optimizer = build_optimizer(model, lr=..., weight_decay=...)
    scheduler = warmup_cosine(optimizer, warmup_steps=..., total_steps=...)
    step, data_state, extra = restore(ckpt, model, optimizer, scheduler)   # 0, None, {} fresh
    write_config(run_dir, cfg, resumed=ckpt is not None)
    ... for each step: forward and backward under autocast(device, cfg.autocast),
        grad_norm = clip_gradients(params, cfg.max_grad_norm), optimizer.step() ...
        save_state(run_dir, step, model=model, optimizer=..., scheduler=..., data_state=...)
    export_model(model, run_dir, tokenizer=tokenizer, base_model=cfg.model)

What a run folder holds (``<out>/``): ``config.toml`` (the settings used, written when the
run starts; ``--config <out>/config.toml`` repeats the run), ``metrics.jsonl``,
``curves.png``, ``checkpoints/step-<N>/`` (``kernelrl.train.checkpoint``), and the final
model: ``model/`` (full fine-tuning: ``save_pretrained`` safetensors + config.json + the
tokenizer) or ``adapter/`` (LoRA: a PEFT adapter folder, adapter_model.safetensors +
adapter_config.json, plus the tokenizer).

The trainable state. With LoRA (``lora_r > 0``) only the adapters train and only they are
checkpointed (the base is reloaded from ``--model`` on resume); with full fine-tuning
every parameter trains and is checkpointed. Either way it is
``trainable_state(model)``: the parameters with ``requires_grad``, by name.

The learning rate (``warmup_cosine``), for optimizer step s = 0, 1, ..., S − 1 of S steps,
W warmup steps and floor ratio m:

    f(s) = (s + 1) / W                                   s < W
    f(s) = m + (1 − m) · ½ (1 + cos(π (s − W) / (S − W)))   s ≥ W
    lr(s) = lr · f(s)

so the first step already trains (lr / W, not 0) and the last one is just above m · lr.
It is a ``LambdaLR`` over a plain function, whose ``state_dict()`` is numbers only, so the
checkpoint stores it as JSON.

AdamW weight decay (``build_optimizer``) applies to matrices (≥ 2-D: linear weights,
embeddings, LoRA A and B) and not to vectors (biases, norm gains), the usual split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from kernelrl.models.hf import load_model, local_folder, resolve_dtype
from kernelrl.models.lora import (ALL_LINEAR, DEFAULT_TARGET_MODULES, apply_lora, lora_modules,
                                  parameter_counts, save_adapter)
from kernelrl.train.checkpoint import (Checkpoint, CheckpointError, apply_checkpoint,
                                       load_checkpoint, prepare_run_dir, save_checkpoint)
from kernelrl.train.config import load_config_file, save_config

__all__ = ["CONFIG_FILE", "MODEL_DIR", "ADAPTER_DIR", "choose_device", "seed_everything",
           "parse_targets", "setup_model", "make_trainable", "trainable_parameters",
           "trainable_state", "build_optimizer", "warmup_steps_for", "lr_factor", "warmup_cosine",
           "clip_gradients", "autocast", "resume_target", "start_run", "write_config",
           "restore", "save_state", "export_model", "describe_model"]

CONFIG_FILE = "config.toml"
MODEL_DIR = "model"          # final full model (save_pretrained layout)
ADAPTER_DIR = "adapter"      # final LoRA adapter (PEFT layout)


# ----------------------------------------------------------------------------------------
# Device and seeds


def choose_device(name: str) -> torch.device:
    """``"auto"``: CUDA when torch sees a GPU, else the CPU; ``"cpu"``; ``"cuda"`` (an
    error naming ``--device`` when there is no GPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device on this machine; "
                             "use --device cpu or auto")
        return torch.device("cuda")
    raise ValueError(f"--device: expected auto, cpu or cuda, got {name!r}")


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, numpy and torch (every device). A resumed run then
    replaces these states with the checkpoint's (``restore``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------
# The model


def parse_targets(text: str) -> tuple[str, ...] | str:
    """``--lora-targets``: comma-separated module names (``q_proj,v_proj``), or
    ``all-linear`` (every linear but the output layer)."""
    text = text.strip()
    if text == ALL_LINEAR:
        return ALL_LINEAR
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise ValueError(f"--lora-targets: expected comma-separated module names (e.g. "
                         f"q_proj,v_proj) or {ALL_LINEAR}, got {text!r}")
    return names


def setup_model(source: str | os.PathLike, *, dtype: str | torch.dtype = "float32",
                device: torch.device | str = "cpu", lora_r: int = 0, lora_alpha: float = 16.0,
                lora_dropout: float = 0.0,
                lora_targets: str = ",".join(DEFAULT_TARGET_MODULES),
                gradient_checkpointing: bool = False,
                attn_implementation: str | None = None) -> nn.Module:
    """The causal LM a trainer trains: loaded from ``source`` (a local model folder,
    config.json + safetensors; never the Hub) in ``dtype`` on ``device``, then
    ``make_trainable``. Raises FileNotFoundError naming ``--model`` for a missing folder.
    """
    local_folder(source, "--model")
    model = load_model(source, dtype=resolve_dtype(dtype, "--dtype"), device=device,
                       attn_implementation=attn_implementation)
    return make_trainable(model, lora_r=lora_r, lora_alpha=lora_alpha,
                          lora_dropout=lora_dropout, lora_targets=lora_targets,
                          gradient_checkpointing=gradient_checkpointing)


def make_trainable(model: nn.Module, *, lora_r: int = 0, lora_alpha: float = 16.0,
                   lora_dropout: float = 0.0,
                   lora_targets: str = ",".join(DEFAULT_TARGET_MODULES),
                   gradient_checkpointing: bool = False) -> nn.Module:
    """Choose what trains, in place, and put ``model`` in train mode; returns it.

    lora_r: 0 leaves every parameter trainable (full fine-tuning); R > 0 freezes the whole
    model and adds LoRA adapters of rank R (scaling alpha / R, float32 weights whatever
    the base dtype) to ``lora_targets`` (see ``parse_targets``). A module that must train
    beside the adapters (a reward head) is set ``requires_grad_(True)`` by the caller
    afterwards. gradient_checkpointing: the outermost Hugging Face model inside ``model``
    recomputes each layer's activations in the backward instead of keeping them
    (non-reentrant, so frozen inputs are fine), trading compute for memory.
    """
    if isinstance(lora_r, bool) or not isinstance(lora_r, int) or lora_r < 0:
        raise ValueError(f"--lora-r: expected an int >= 0 (0 = full fine-tuning), got "
                         f"{lora_r!r}")
    if lora_r > 0:
        apply_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
                   target_modules=parse_targets(lora_targets))
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        hf = next((m for m in model.modules() if hasattr(m, "gradient_checkpointing_enable")),
                  None)
        if hf is None:
            raise ValueError(f"--gradient-checkpointing: {type(model).__name__} holds no "
                             f"Hugging Face model to enable it on")
        if hasattr(hf, "activation_checkpointing_enable"):        # transformers >= 5.24
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad``, in ``named_parameters`` order (the order the
    optimizer is built in, which a resumed optimizer state relies on)."""
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> parameter, for every parameter with ``requires_grad``: the whole model
    when fully fine-tuned, the LoRA adapters alone otherwise. The live tensors (not
    copies): ``save_checkpoint`` writes them, ``load_model_state`` copies into them.
    A parameter shared by two modules (tied embeddings) appears once."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def describe_model(model: nn.Module) -> str:
    """One line for the log: the trainable and total parameter counts and the method."""
    trainable, total = parameter_counts(model)
    method = f"LoRA on {len(lora_modules(model))} layers" if lora_modules(model) else "full"
    return (f"model: {trainable:,} trainable of {total:,} parameters "
            f"({100 * trainable / max(total, 1):.2f}%, {method})")


# ----------------------------------------------------------------------------------------
# Optimizer, schedule, clipping, autocast


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: weight decay on the ≥ 2-D ones, none on the
    1-D ones (biases, norm gains). Groups: [decayed, not decayed], empty ones left out."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr: expected a finite number > 0, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"--weight-decay: expected a number >= 0, got {weight_decay!r}")
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameter (with --lora-r > 0, check "
                         "--lora-targets)")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas,
                             eps=eps)


def warmup_steps_for(warmup_steps: int, warmup_ratio: float, total_steps: int) -> int:
    """W from ``--warmup-steps`` or ``--warmup-ratio`` (a fraction of the S steps;
    rounded), at most S. Giving both is an error."""
    if warmup_steps < 0:
        raise ValueError(f"--warmup-steps: expected an int >= 0, got {warmup_steps}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"--warmup-ratio: expected a number in [0, 1), got {warmup_ratio}")
    if warmup_steps and warmup_ratio:
        raise ValueError(f"--warmup-steps {warmup_steps} and --warmup-ratio {warmup_ratio}: "
                         f"give one or the other")
    steps = warmup_steps or round(warmup_ratio * total_steps)
    return min(steps, total_steps)


def lr_factor(step: int, warmup_steps: int, total_steps: int,
              min_lr_ratio: float = 0.0) -> float:
    """f(s) of the module docstring: the multiplier of the peak lr at step s (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over W steps, then cosine decay to ``min_lr_ratio`` · lr at S steps
    (module docstring). Call ``scheduler.step()`` once after each ``optimizer.step()``."""
    if total_steps < 1:
        raise ValueError(f"total_steps: expected an int >= 1, got {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"--min-lr-ratio: expected a number in [0, 1], got {min_lr_ratio}")

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps, total_steps, min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_gradients(params: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Scale the gradients so that their global L2 norm is at most ``max_norm`` (None or
    ≤ 0: no clipping). Returns the norm before clipping, a 0-d tensor on the gradients'
    device (no host sync here), for logging and the finite check."""
    limit = max_norm if max_norm is not None and max_norm > 0 else math.inf
    return torch.nn.utils.clip_grad_norm_(list(params), limit)


def autocast(device: torch.device, kind: str):
    """The forward's precision context: ``"none"`` (ops run in the weights' dtype) or
    ``"bfloat16"`` (torch.autocast: matmuls in bf16, reductions in fp32; weights, gradients
    and the optimizer stay in the weights' dtype)."""
    if kind == "none":
        return contextlib.nullcontext()
    if kind == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"--autocast: expected none or bfloat16, got {kind!r}")


# ----------------------------------------------------------------------------------------
# The run folder, resume and saving


def resume_target(value: str | None) -> bool | str | None:
    """``--resume``'s value for ``prepare_run_dir``: None (a fresh run), ``latest`` (True:
    the latest checkpoint in ``--out``), or a folder (a run folder, its ``checkpoints``
    folder or one ``step-<N>`` folder)."""
    if value is None or value == "":
        return None
    if value == "latest":
        return True
    return value


def _config_changes(path: Path, cfg: Any) -> list[str]:
    """The fields of ``cfg`` that differ from the config.toml a run wrote before."""
    try:
        before = load_config_file(type(cfg), path)
    except ValueError as exc:
        return [f"(could not read {path}: {exc})"]
    now = dataclasses.asdict(cfg)
    return [f"{name}: {before.get(name)!r} -> {now[name]!r}" for name in now
            if name != "resume" and before.get(name) != now[name]]


def start_run(out: str | os.PathLike, resume: str | None, *,
              device: torch.device | str = "cpu") -> tuple[Path, Checkpoint | None]:
    """Open the run folder ``out``; returns (run folder, checkpoint to resume from or None).

    A fresh run (``resume`` None) refuses an ``out`` that already holds a run's
    checkpoints (``CheckpointError`` naming ``--out``), so a run is never overwritten.
    ``resume`` (see ``resume_target``) loads that checkpoint, model tensors on ``device``.
    Nothing is written into ``out`` here (it is only created); ``write_config`` follows
    once the checkpoint is known to fit.
    """
    target = prepare_run_dir(out, resume_target(resume))
    ckpt = load_checkpoint(target, device=device) if target is not None else None
    return Path(out), ckpt


def write_config(run_dir: str | os.PathLike, cfg: Any, *, resumed: bool = False) -> Path:
    """Write ``<run>/config.toml``: the settings of this run (of its latest leg, when
    resumed; the fields that differ from the earlier config.toml are printed then)."""
    path = Path(run_dir) / CONFIG_FILE
    if resumed and path.is_file():
        changes = _config_changes(path, cfg)
        if changes:
            print("kernelrl: resuming with settings that differ from the run's "
                  "config.toml: " + "; ".join(changes), file=sys.stderr)
    return save_config(cfg, path)


def restore(ckpt: Checkpoint | None, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any) -> tuple[int, Any, dict]:
    """Load a checkpoint into a freshly set-up model, optimizer and scheduler: the
    trainable state, the optimizer and scheduler states, and the global RNG states.
    Returns (step, data_state, extra), or (0, None, {}) when ``ckpt`` is None. Build the
    model, optimizer and scheduler exactly as the saving run did before calling it."""
    if ckpt is None:
        return 0, None, {}
    try:
        apply_checkpoint(ckpt, trainable_state(model), optimizer, scheduler, rng=True)
    except (CheckpointError, ValueError, KeyError) as exc:
        raise CheckpointError(f"--resume: {ckpt.path} does not fit this model and "
                              f"settings (same --model and --lora-* as the run that saved "
                              f"it?): {exc}") from None
    return ckpt.step, ckpt.data, dict(ckpt.extra)


def save_state(run_dir: str | os.PathLike, step: int, *, model: nn.Module,
               optimizer: torch.optim.Optimizer, scheduler: Any, data_state: Any,
               extra: dict | None = None, keep: int | None = 2) -> Path:
    """Checkpoint ``step``: the trainable state (``trainable_state``) as safetensors, the
    optimizer, scheduler and RNG states, the data position and ``extra``. Call it only
    after the step's loss passed ``check_finite``. Returns the checkpoint folder."""
    return save_checkpoint(run_dir, step, model_state=trainable_state(model),
                           optimizer=optimizer, scheduler=scheduler, data_state=data_state,
                           extra=extra, rng=True, keep=keep)


def export_model(model: nn.Module, run_dir: str | os.PathLike, *, tokenizer: Any = None,
                 base_model: str | os.PathLike | None = None) -> Path:
    """Write the trained model for use outside kernelrl and return its folder:
    ``<run>/adapter`` (a PEFT LoRA folder: ``PeftModel.from_pretrained(base, folder)``
    loads it; ``base_model`` is recorded as its base) when the model has LoRA adapters,
    else ``<run>/model`` (``save_pretrained``: config.json + safetensors, loadable with
    ``from_pretrained``). The tokenizer, when given, is saved beside it."""
    run_dir = Path(run_dir)
    if lora_modules(model):
        folder = run_dir / ADAPTER_DIR
        base = str(Path(base_model).resolve()) if base_model is not None else None
        save_adapter(model, folder, base_model_name_or_path=base)
    else:
        folder = run_dir / MODEL_DIR
        model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder

