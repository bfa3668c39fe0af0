"""Pairwise preference losses: DPO and its TRL 1.x variants, and the reward-model loss.

Shapes (the package legend): B preference pairs. Every input is [B]: the summed (or, for
IPO, length-averaged) log-probs of a whole completion, e.g. ``token_logprobs(...).sum(-1)``
with the prompt and padding set to ``ignore_index``.

DPO family, ``dpo_loss``: with the policy's log-probs π_c, π_r of the chosen and rejected
completion and the reference model's ρ_c, ρ_r,

    c = π_c − ρ_c,   r = π_r − ρ_r,   x = c − r,   z = β·x,   ε = label_smoothing,
    σ the logistic sigmoid, logσ computed as F.logsigmoid (never log(sigmoid(·))).

    loss_type   per-pair loss                                          paper
    sigmoid     −(1−ε)·logσ(z) − ε·logσ(−z)                            DPO, Rafailov et al. 2023,
                (ε = 0: plain DPO; ε > 0: conservative DPO)            eq. 7; cDPO, Mitchell 2023
    ipo         (x − 1/(2β))²                                          IPO, Azar et al. 2023,
                                                                       eq. 17
    hinge       relu(1 − z)                                            SLiC, Zhao et al. 2023
    robust      ((1−ε)·(−logσ(z)) + ε·logσ(−z)) / (1 − 2ε)             robust DPO, Chowdhury
                                                                       et al. 2024
    exo_pair    σ(z)·(logσ(z) − log(1−ε)) + σ(−z)·(logσ(−z) − log ε)   EXO, Ji et al. 2024,
                                                                       eq. 16
    nca_pair    −logσ(βc) − ½·logσ(−βc) − ½·logσ(−βr)                  NCA, Chen et al. 2024
    bco_pair    −logσ(βc) − logσ(−βr)  (without BCO's running mean δ)  BCO, Jung et al. 2024
    sppo_hard   (c − 1/(2β))² + (r + 1/(2β))²                          SPPO, Wu et al. 2024,
                                                                       eq. 4.7, hard 1/0 labels
    apo_zero    1 − σ(βc) + σ(βr)                                      APO, D'Oosterlinck
                                                                       et al. 2024, eq. 7
    apo_down    σ(βc) + 1 − σ(z)                                       APO, eq. 8
    discopop    −logσ(z)·(1 − m) + exp(−z)·m,  m = σ(z/τ)              DiscoPOP, Chris Lu
                (τ = discopop_tau)                                     et al. 2024, eq. 5

These are TRL 1.x's formulas on the same four inputs (``DPOConfig.loss_type``). IPO is
defined on length-averaged log-probs, which is what TRL feeds it: pass the per-completion
mean log-prob for ``ipo`` (kernelrl's trainers do the same); the loss here takes the
log-probs as given. ε must lie in [0, 0.5) for ``robust`` (1 − 2ε ≠ 0) and in (0, 1) for
``exo_pair`` (log ε, log(1 − ε)); TRL substitutes 1e-3 for an ``exo_pair`` ε of 0, this
raises instead. ``bco_pair`` has no running reward mean here (that is trainer state).

Stable forms. For z < −50, DiscoPOP's exp(−z)·m is computed as exp(−z + logσ(z/τ)) and
1 − m as σ(−z/τ): there exp(−z) overflows while m underflows to 0, and inf·0 would be NaN
although the product ≈ exp(z·(1/τ − 1)) is finite (→ 0 for τ < 1, not negligible for τ
near 1); above, TRL's form (whose gradient is the more accurate). Every other loss is
either at most quadratic in c, r, x or grows at most like |z|, so |x| ~ 1e4 gives finite
losses and gradients. NaN in an input gives a NaN loss
in its own pair only (its gradient is NaN too, except where the loss is flat there:
``hinge``'s relu passes 0 back, and the terms in c alone of the separable losses stay
finite).

Rewards (returned, detached, for logging): chosen = β·c, rejected = β·r.

Reward model, ``reward_loss``: Bradley–Terry on the scalar rewards s_c, s_r of a pair
(Ouyang et al. 2022, eq. 1), with the Llama 2 margin m (Touvron et al. 2023, eq. 2) and the
reward-centering term of Eisenstein et al. 2023 (TRL's ``center_rewards_coefficient``):

    loss = mean_B(−logσ(s_c − s_r − m)) + center_coef · mean_B((s_c + s_r)²)

Everything is computed in float32 (float64 for float64 inputs) and returned in that dtype;
gradients flow to every input that requires them (autograd through plain torch).

Bytes moved (b = bytes per input): dpo_loss 4·B·b read, 3·4·B written; reward_loss 2·B·b
read. Elementwise over B pairs: plain torch is the right implementation here; there is
nothing for a fused kernel to save.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernelrl import backend as _backend
from kernelrl.ops._checks import FLOAT_DTYPES, check_choice, check_same_device, check_tensor

__all__ = ["dpo_loss", "reward_loss", "LOSS_TYPES"]


# ---------------------------------------------------------------------------------------
# torch (the only implementation; float64-capable, so it is its own float64 run)
# ---------------------------------------------------------------------------------------

def _sigmoid(c, r, x, beta, eps, tau):
    z = beta * x
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _ipo(c, r, x, beta, eps, tau):
    return (x - 1 / (2 * beta)).square()


def _hinge(c, r, x, beta, eps, tau):
    return torch.relu(1 - beta * x)


def _robust(c, r, x, beta, eps, tau):
    z = beta * x
    return ((1 - eps) * -F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _exo_pair(c, r, x, beta, eps, tau):
    z = beta * x
    # σ(±z) underflows to 0 where logσ(±z) is large but finite: 0·finite, never NaN.
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def _nca_pair(c, r, x, beta, eps, tau):
    bc = beta * c
    return -F.logsigmoid(bc) - 0.5 * F.logsigmoid(-bc) - 0.5 * F.logsigmoid(-beta * r)


def _bco_pair(c, r, x, beta, eps, tau):
    return -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)


def _sppo_hard(c, r, x, beta, eps, tau):
    half = 0.5 / beta
    return (c - half).square() + (r + half).square()


def _apo_zero(c, r, x, beta, eps, tau):
    return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)


def _apo_down(c, r, x, beta, eps, tau):
    return torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * x)


#: DiscoPOP: below z = −_FAR, exp(−z) is no longer evaluated (exp(50) ≈ 5e21 is finite in
#: every float type computed here; the switch point only has to keep it so).
_FAR = 50.0


def _discopop(c, r, x, beta, eps, tau):
    z = beta * x
    m = torch.sigmoid(z / tau)
    # TRL's form where exp(−z) is finite. Its two terms share the node m, so autograd
    # adds their large, partly cancelling m-derivatives before multiplying by σ′: half the
    # gradient error of σ(±z/τ) taken separately.
    near = -F.logsigmoid(z) * (1 - m) + torch.exp(-z.clamp_min(-_FAR)) * m
    # z ≪ 0: exp(−z) overflows while m underflows to 0, and inf·0 would be NaN, although
    # exp(−z)·m = exp(−z + logσ(z/τ)) is finite (≈ e^{z(1/τ − 1)}); 1 − m = σ(−z/τ).
    far = -F.logsigmoid(z) * torch.sigmoid(-z / tau) + torch.exp(F.logsigmoid(z / tau) - z)
    return torch.where(z >= -_FAR, near, far)


_LOSSES = {"sigmoid": _sigmoid, "ipo": _ipo, "hinge": _hinge, "robust": _robust,
           "exo_pair": _exo_pair, "nca_pair": _nca_pair, "bco_pair": _bco_pair,
           "sppo_hard": _sppo_hard, "apo_zero": _apo_zero, "apo_down": _apo_down,
           "discopop": _discopop}
LOSS_TYPES = tuple(_LOSSES)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dpo_torch(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
               beta: float, loss_type: str, label_smoothing: float, discopop_tau: float):
    acc = _acc(chosen_logps.dtype)
    c = chosen_logps.to(acc) - ref_chosen_logps.to(acc)
    r = rejected_logps.to(acc) - ref_rejected_logps.to(acc)
    losses = _LOSSES[loss_type](c, r, c - r, beta, label_smoothing, discopop_tau)
    return losses, (beta * c).detach(), (beta * r).detach()


def _reward_torch(chosen_rewards, rejected_rewards, margin, center_coef):
    acc = _acc(chosen_rewards.dtype)
    s_c, s_r = chosen_rewards.to(acc), rejected_rewards.to(acc)
    diff = s_c - s_r
    if margin is not None:
        diff = diff - (margin.to(acc) if isinstance(margin, torch.Tensor) else margin)
    loss = -F.logsigmoid(diff).mean()
    if center_coef is not None:
        loss = loss + center_coef * (s_c + s_r).square().mean()
    return loss


# ---------------------------------------------------------------------------------------
# argument checks and public ops
# ---------------------------------------------------------------------------------------

def _check_float(name: str, value, *, low: float, high: float = math.inf,
                 low_open: bool = True, high_open: bool = True, what: str = "") -> float:
    """A finite Python number in the interval given; ValueError naming ``name`` otherwise."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a Python float in {interval}{what}, "
                         f"got {type(value).__name__}")
    # Comparisons only (no math.isfinite): under torch.compile a float may be symbolic.
    # NaN fails every comparison, ±inf the first one.
    ok = (-math.inf < value < math.inf and (value > low if low_open else value >= low)
          and (value < high if high_open else value <= high))
    if not ok:
        raise ValueError(f"{name}: expected a finite value in {interval}{what}, got {value}")
    return float(value)


def _check_pair_tensors(names: tuple[str, ...], tensors: tuple) -> None:
    """All [B] float tensors with the first one's shape, dtype and device."""
    first = check_tensor(names[0], tensors[0], dtypes=FLOAT_DTYPES, ndim=1)
    for name, value in zip(names[1:], tensors[1:]):
        check_tensor(name, value, dtypes=FLOAT_DTYPES)
        if value.shape != first.shape:
            raise ValueError(f"{name}: expected shape {tuple(first.shape)} (that of "
                             f"{names[0]}), got {tuple(value.shape)}")
        if value.dtype != first.dtype:
            raise ValueError(f"{name}: expected dtype {first.dtype} (that of {names[0]}), "
                             f"got {value.dtype}")
        check_same_device(name, value, first.device)


_DPO_INPUTS = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             discopop_tau: float = 0.05):
    """Per-pair DPO-family losses, like TRL's ``DPOTrainer.dpo_loss``.

    Four [B] float tensors of one shape, dtype and device (the policy's and the reference's
    completion log-probs, chosen and rejected) -> (losses [B], chosen_rewards [B],
    rejected_rewards [B]), float32 (float64 for float64 inputs); the rewards β·(π − ρ) are
    detached. Reduce ``losses`` yourself (``.mean()`` is TRL's). ``loss_type`` is one of
    LOSS_TYPES; the formulas, papers and the ranges of ``label_smoothing`` (ε) are in the
    module docstring. ``ipo`` expects length-averaged log-probs.
    """
    tensors = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    _check_pair_tensors(_DPO_INPUTS, tensors)
    check_choice("loss_type", loss_type, LOSS_TYPES)
    beta = _check_float("beta", beta, low=0.0)
    if loss_type == "robust":
        eps = _check_float("label_smoothing", label_smoothing, low=0.0, high=0.5,
                           low_open=False, what=" for loss_type='robust' (1 − 2ε ≠ 0)")
    elif loss_type == "exo_pair":
        eps = _check_float("label_smoothing", label_smoothing, low=0.0, high=1.0,
                           what=" for loss_type='exo_pair' (log ε and log(1 − ε))")
    else:
        eps = _check_float("label_smoothing", label_smoothing, low=0.0, high=1.0,
                           low_open=False, high_open=False)
    tau = _check_float("discopop_tau", discopop_tau, low=0.0)
    # Only torch is registered; select() still honours (and refuses) a forced backend.
    _backend.select("dpo_loss", chosen_logps.device, chosen_logps.dtype)
    return _dpo_torch(*tensors, beta, loss_type, eps, tau)


def reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *,
                margin: float | torch.Tensor | None = None,
                center_coef: float | None = None) -> torch.Tensor:
    """Bradley–Terry reward-model loss, averaged over B pairs (TRL's RewardTrainer loss).

    chosen_rewards, rejected_rewards [B] (one dtype and device) -> scalar loss, float32
    (float64 for float64 inputs):  mean(−logσ(s_c − s_r − margin))
    + center_coef·mean((s_c + s_r)²). ``margin``: None, a Python float, or a [B] float
    tensor on the same device. ``center_coef``: None or a float ≥ 0.
    """
    _check_pair_tensors(("chosen_rewards", "rejected_rewards"),
                        (chosen_rewards, rejected_rewards))
    if chosen_rewards.shape[0] == 0:
        raise ValueError("chosen_rewards: expected at least one pair (the mean of none is "
                         "undefined), got shape (0,)")
    if isinstance(margin, torch.Tensor):
        check_tensor("margin", margin, dtypes=FLOAT_DTYPES)
        if margin.shape != chosen_rewards.shape:
            raise ValueError(f"margin: expected a float or a tensor of shape "
                             f"{tuple(chosen_rewards.shape)}, got shape {tuple(margin.shape)}")
        check_same_device("margin", margin, chosen_rewards.device)
    elif margin is not None:
        margin = _check_float("margin", margin, low=-math.inf, what=" or a [B] tensor")
    if center_coef is not None:
        center_coef = _check_float("center_coef", center_coef, low=0.0, low_open=False)
    _backend.select("reward_loss", chosen_rewards.device, chosen_rewards.dtype)
    return _reward_torch(chosen_rewards, rejected_rewards, margin, center_coef)


def _dpo_examples(device: torch.device, dtype: torch.dtype) -> list:
    """Representative inputs for ``kernelrl tune``: a DPO batch of summed log-probs. (A
    private generator, so that no input equals the upstream gradient tune draws.)"""
    batch = 4096 if device.type == "cpu" else 65536
    gen = torch.Generator(device).manual_seed(1234)
    policy = [-200 + 20 * torch.randn(batch, device=device, generator=gen) for _ in "cr"]
    ref = [p + torch.randn(batch, device=device, generator=gen) for p in policy]
    inputs = [t.to(dtype) for t in policy + ref]
    for t in inputs[:2]:
        t.requires_grad_()
    return [(f"B={batch} loss_type={t}", tuple(inputs), {"loss_type": t})
            for t in ("sigmoid", "discopop")]


def _reward_examples(device: torch.device, dtype: torch.dtype) -> list:
    """Representative inputs for ``kernelrl tune``: a reward-model batch with margins."""
    batch = 4096 if device.type == "cpu" else 65536
    gen = torch.Generator(device).manual_seed(1234)
    s_c, s_r, margin = (torch.randn(3, batch, device=device, generator=gen)
                        .to(dtype).unbind(0))
    return [(f"B={batch}", (s_c.requires_grad_(), s_r.requires_grad_()),
             {"margin": margin.abs(), "center_coef": 0.01})]


# Elementwise over B pairs: plain torch, no kernel to fuse.
_backend.register_op("dpo_loss", {"torch": _backend.Implementation(FLOAT_DTYPES, _dpo_torch)},
                     examples=_dpo_examples, fn=dpo_loss)
_backend.register_op("reward_loss",
                     {"torch": _backend.Implementation(FLOAT_DTYPES, _reward_torch)},
                     examples=_reward_examples, fn=reward_loss)
