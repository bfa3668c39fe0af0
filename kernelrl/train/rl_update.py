"""What kernelrl's RL trainers (GRPO, PPO) share after the rollout: the update phase of a
step, the KL coefficient, and the state a checkpoint stores.

- The update phase (``run_updates``): μ = ``--num-ppo-epochs`` passes over a step's
  micro-batches of experience (``--batch-size`` prompts each), cut into mini-batches of
  ``--mini-batch-size`` prompts (default: the whole step), one optimizer update each.
  With several mini-batches the micro-batches come in a fresh order each epoch
  (``torch.randperm`` of the global RNG, so a resumed run draws the same); with one, in
  the order sampled. The trainer gives the loss of one micro-batch as a callback,
  ``micro_loss(i, weight) -> (loss, stats)``: ``weight`` · the loss of micro-batch i,
  ready for ``backward``, and ``weight`` · its statistics (a dict of detached 0-d
  tensors, the same names at every call). ``weight`` is the micro-batch's share of its
  mini-batch (``shares``: of the response tokens or of the rows), so the accumulated
  gradient is that of the loss over the whole mini-batch. An update: each micro-batch's
  loss and its backward (``backward``, default ``loss.backward()``), the sums of the
  losses and statistics on the device, the gradients clipped to ``--max-grad-norm``,
  one host sync that checks the loss and the norm are finite (``common.sync_and_check``)
  before the weights change, then ``optimizer.step()``; the step's last update also
  advances the schedule. It returns the loss and the statistics averaged over the
  step's updates, the mean gradient norm, the learning rate and its wall time
  (``Updates``).
- The KL coefficient (``AdaptiveKLController``, Ziegler et al. 2019, "Fine-Tuning
  Language Models from Human Preferences", §2.2):

      e = clip(KL / target − 1, −0.2, 0.2),    β ← β · (1 + e · n / horizon)

  after each batch of n sequences whose mean KL was KL; ``FixedKLController`` keeps β.
  Both have ``state_dict()`` / ``load_state_dict()``.
- ``RunState``: the data position a checkpoint stores, with such state beside it (the KL
  controller), so that ``common.restore`` and ``common.Bookkeeper`` carry it as they carry
  the prompt order.

``kernelrl.train.rl`` re-exports the controllers and ``RunState``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import torch

from kernelrl.train import common

if TYPE_CHECKING:
    from kernelrl.train.rl import Experience
    from kernelrl.train.settings import RLConfig

__all__ = ["Updates", "shares", "run_updates", "AdaptiveKLController", "FixedKLController",
           "kl_controller", "RunState"]


# ----------------------------------------------------------------------------------------
# The update phase


@dataclass
class Updates:
    """What a step's updates return: ``means`` (``loss`` and the callback's statistics,
    each averaged over the updates), the mean gradient norm (before clipping), the
    learning rate they used, and the seconds they took."""
    means: dict[str, float]
    grad_norm: float
    lr: float
    seconds: float


def shares(batch: Sequence[Experience], by: Literal["tokens", "rows"]) -> list:
    """Each micro-batch's share of its mini-batch ``batch``: of the response tokens (0-d
    device tensors, no host sync) or of the rows (floats)."""
    if by == "tokens":
        counts = torch.stack([e.rollout.response_mask.sum() for e in batch]).float()
        return list(counts / counts.sum())
    rows = sum(e.rollout.batch_size for e in batch)
    return [e.rollout.batch_size / rows for e in batch]


def run_updates(experience: Sequence[Experience],
                micro_loss: Callable[[int, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]],
                cfg: RLConfig, *, step: int, weigh_by: Literal["tokens", "rows"],
                params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, scheduler: Any,
                backward: Callable[[torch.Tensor], None] = torch.Tensor.backward) -> Updates:
    """The update phase of step ``step`` (module docstring): ``--num-ppo-epochs`` passes
    over the micro-batches of ``experience`` (``--batch-size`` prompts each), a mini-batch
    of ``--mini-batch-size`` prompts (default: the step's) per optimizer update, each
    micro-batch weighed by its share ``weigh_by`` (``shares``) and trained by
    ``micro_loss``; ``params``' gradients clipped to ``--max-grad-norm``."""
    per_update = (cfg.mini_batch_size or cfg.batch_size * cfg.grad_accum) // cfg.batch_size
    start = time.perf_counter()
    count = len(experience)
    minis = math.ceil(count / per_update)
    updates = cfg.num_ppo_epochs * minis
    rows, norms = [], []
    for _ in range(cfg.num_ppo_epochs):
        # Several mini-batches: a fresh order each epoch; one: the order sampled.
        order = torch.randperm(count).tolist() if minis > 1 else list(range(count))
        for mini in common.micro_batches(order, per_update):
            sums = None
            for i, weight in zip(mini, shares([experience[i] for i in mini], weigh_by)):
                loss, stats = micro_loss(i, weight)
                backward(loss)
                part = torch.stack([loss.detach().float(), *(v.float() for v in stats.values())])
                sums = part if sums is None else sums + part
            grad_norm = common.clip_gradients(params, cfg.max_grad_norm)
            values, norm = common.sync_and_check(step, sums, grad_norm)   # the update's sync
            rows.append(values)
            norms.append(norm)
            if len(rows) < updates:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:   # the step's last update also advances the schedule
                lr = common.optimizer_step(optimizer, scheduler)
    names = ("loss", *stats)
    means = {name: sum(column) / len(rows) for name, column in zip(names, zip(*rows))}
    return Updates(means, sum(norms) / len(norms), lr, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------
# The KL coefficient


class FixedKLController:
    """A constant β, with the interface of ``AdaptiveKLController``."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, kl: float, n_steps: int) -> float:
        """After a batch of ``n_steps`` sequences with mean KL ``kl``: the new β."""
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """β adapted towards a target KL (module docstring; Ziegler et al. 2019)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if not (math.isfinite(init_kl_coef) and init_kl_coef >= 0):
            raise ValueError(f"init_kl_coef: expected a finite number >= 0, got {init_kl_coef}")
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"target: expected a finite number > 0, got {target}")
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon: expected an int >= 1, got {horizon!r}")
        super().__init__(init_kl_coef)
        self.target, self.horizon = float(target), horizon

    def update(self, kl: float, n_steps: int) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def kl_controller(kl_coef: float, target: float | None = None, horizon: int = 10000):
    """``AdaptiveKLController`` with a ``target``, else ``FixedKLController``."""
    if target is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target, horizon)


class RunState:
    """What a checkpoint stores as the data position: the prompt loader's and, beside
    it, each named ``part``'s ``state_dict()``. Pass it where ``common.restore`` and
    ``common.Bookkeeper`` take the loader (``len()`` is the loader's steps per epoch)."""

    def __init__(self, loader, **parts: Any):
        self.loader, self.parts = loader, parts

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict:
        return {"prompts": self.loader.state_dict(),
                **{name: part.state_dict() for name, part in self.parts.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted({"prompts", *self.parts} - set(state))
        if missing:
            raise ValueError(f"--resume: the checkpoint's data state lacks {missing} (saved "
                             f"by another trainer?)")
        self.loader.load_state_dict(state["prompts"])
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
