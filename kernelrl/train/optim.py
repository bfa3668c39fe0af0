"""The optimizer, the learning-rate schedule, gradient clipping, the step's one host sync
and its checks, and autocast: what every trainer's optimizer step does.

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
import math
from typing import Any, Iterable

import torch
from torch import nn

from kernelrl.train.metrics import NonFiniteLossError, check_finite
from kernelrl.train.settings import TrainConfig


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad``, in ``named_parameters`` order (the order the
    optimizer is built in, which a resumed optimizer state relies on)."""
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------
# Optimizer, schedule, clipping, the step's checks, autocast


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


def optimizer_and_schedule(model: nn.Module, cfg: TrainConfig, total_steps: int
                           ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """``build_optimizer`` with ``--lr`` and ``--weight-decay``, and ``warmup_cosine`` over
    ``total_steps`` with the warmup of ``--warmup-steps`` / ``--warmup-ratio``
    (``warmup_steps_for``) and ``--min-lr-ratio``."""
    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = warmup_steps_for(cfg.warmup_steps, cfg.warmup_ratio, total_steps)
    scheduler = warmup_cosine(optimizer, warmup_steps=warmup, total_steps=total_steps,
                              min_lr_ratio=cfg.min_lr_ratio)
    return optimizer, scheduler


def clip_gradients(params: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Scale the gradients so that their global L2 norm is at most ``max_norm`` (None or
    ≤ 0: no clipping). Returns the norm before clipping, a 0-d tensor on the gradients'
    device (no host sync here), for logging and the finite check."""
    limit = max_norm if max_norm is not None and max_norm > 0 else math.inf
    return torch.nn.utils.clip_grad_norm_(list(params), limit)


def sync_and_check(step: int, sums: torch.Tensor, grad_norm: torch.Tensor
                   ) -> tuple[list[float], float]:
    """The step's one host sync, after the backward and before the update: ``sums`` (the
    step's loss, first, and its other metrics: 0-d or [M] on the device) and the gradient
    norm of ``clip_gradients`` come back as ([loss, ...], norm). A NaN or infinite loss
    or norm raises ``NonFiniteLossError`` naming the step, so a diverged step changes
    nothing and saves nothing."""
    *values, norm = torch.cat([sums.float().reshape(-1), grad_norm.float().reshape(1)]).tolist()
    check_finite(step, values[0])
    if not math.isfinite(norm):
        raise NonFiniteLossError(
            f"the gradient norm is {norm} at step {step} (loss {values[0]:.4g}): training "
            f"diverged, and nothing was saved for this step. Resume from the last "
            f"checkpoint with a lower --lr or --max-grad-norm")
    return values, norm


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler: Any) -> float:
    """Update the parameters, advance the schedule and clear the gradients; returns the
    learning rate the update used (the one to log for the step)."""
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


def autocast(device: torch.device, kind: str):
    """The forward's precision context: ``"none"`` (ops run in the weights' dtype) or
    ``"bfloat16"`` (torch.autocast: matmuls in bf16, reductions in fp32; weights, gradients
    and the optimizer stay in the weights' dtype)."""
    if kind == "none":
        return contextlib.nullcontext()
    if kind == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"--autocast: expected none or bfloat16, got {kind!r}")
