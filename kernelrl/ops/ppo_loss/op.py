"""ppo_loss's autograd.Function and public op; registers the backends (see the package
docstring for the math)."""

from __future__ import annotations

import functools
import math

import torch

from kernelrl import backend as _backend
from kernelrl.ops._autograd import first_order_only
from kernelrl.ops._checks import (FLOAT_DTYPES, KERNEL_DTYPES, check_choice,
                                  check_same_device, check_tensor)
from kernelrl.ops.ppo_loss.common import AGG_MODES, COLUMNS, PPOConfig, PPOInputs
from kernelrl.ops.ppo_loss.native_impl import _native_bwd, _native_fwd
from kernelrl.ops.ppo_loss.torch_impl import _torch_bwd, _torch_fwd
from kernelrl.ops.ppo_loss.triton_impl import _triton_bwd, _triton_fwd

# A backend's passes, (fwd, bwd):
#   fwd(inputs, cfg, need_grads, present, out dtype) -> (loss [], stats [NCOLS], ω [B],
#       vf_scale [], tensors to save); present: values, entropy, ref_logprobs given
#   bwd(inputs, saved, cfg, grad_loss [], ω [B], vf_scale [], needs: 3 bools) -> the
#       gradients of grad_loss·loss for (logprobs, values, entropy), None where not needed
#: every dtype a mask may have (bool, integer or float: its value is the token's weight)
_MASK_DTYPES = frozenset((torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32,
                          torch.int64, torch.uint16, torch.uint32, torch.uint64)
                         + FLOAT_DTYPES)
_KERNELS = {"native": (_native_fwd, _native_bwd), "torch": (_torch_fwd, _torch_bwd),
            "triton": (_triton_fwd, _triton_bwd)}



class PPOLossFunction(torch.autograd.Function):
    """(cfg, backend, *PPOInputs) -> (loss [], stats [NCOLS]); gradients to logprobs,
    values and entropy. First-order only (the backward is a fused pass)."""

    @staticmethod
    def forward(ctx, cfg, backend, *tensors):
        # the stats are non-differentiable: their gradient slot stays None instead of a
        # zeros tensor built on every backward
        ctx.set_materialize_grads(False)
        needs = ctx.needs_input_grad
        loss, stats, omega, vf_scale, saved = _forward(cfg, backend, tensors,
                                                       needs[2] or needs[6] or needs[9])
        ctx.save_for_backward(*tensors, omega, vf_scale, *saved)
        ctx.config = (cfg, backend, len(tensors))
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @first_order_only("ppo_loss")
    def backward(ctx, grad_loss, grad_stats):
        if grad_loss is None:     # only a stat was differentiated (gradcheck does): zero
            return (None,) * (2 + ctx.config[2])
        cfg, backend, n = ctx.config
        saved = ctx.saved_tensors
        x, (omega, vf_scale), rest = PPOInputs(*saved[:n]), saved[n:n + 2], saved[n + 2:]
        needs = (ctx.needs_input_grad[2], ctx.needs_input_grad[6], ctx.needs_input_grad[9])
        g_lp, g_v, g_ent = _KERNELS[backend][1](x, rest, cfg, grad_loss, omega, vf_scale,
                                                needs)
        return (None, None, g_lp, None, None, None, g_v, None, None, g_ent, None, None)


def _forward(cfg: PPOConfig, backend: str, tensors: tuple, need_grads: bool):
    """The backend's forward on the PPOInputs ``tensors``: (loss, stats, ω, vf_scale,
    tensors to save)."""
    x = PPOInputs(*tensors)
    present = (x.values is not None, x.entropy is not None, x.ref_logprobs is not None)
    out_dtype = torch.float64 if x.logprobs.dtype == torch.float64 else torch.float32
    return _KERNELS[backend][0](x, cfg, need_grads, present, out_dtype)


@functools.lru_cache(maxsize=None)
def _stat_columns(has_values: bool, has_entropy: bool, has_ref: bool,
                  has_rollout: bool) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The stats a call returns (names, their columns): a term's stats only where its
    input was given."""
    given = {"vf_loss": has_values, "vf_clipfrac": has_values, "entropy": has_entropy,
             "kl_loss": has_ref, "tis_weight_mean": has_rollout, "tis_clipfrac": has_rollout}
    kept = [(name, j) for j, name in enumerate(COLUMNS) if j and given.get(name, True)]
    return tuple(n for n, _ in kept), tuple(j for _, j in kept)



# ---------------------------------------------------------------------------------------
# the public op
# ---------------------------------------------------------------------------------------

def _number(name: str, value, low: float = -math.inf, strict: bool = False) -> float:
    """A finite Python number, >= ``low`` (> ``low`` when ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a Python number, got {type(value).__name__}")
    if not (math.isfinite(value) and (value > low if strict else value >= low)):
        bound = "" if low == -math.inf else f" {'>' if strict else '>='} {low:g}"
        raise ValueError(f"{name}: expected a finite number{bound}, got {value}")
    return float(value)


def _check_inputs(x: PPOInputs) -> None:
    lp = x.logprobs
    check_tensor("logprobs", lp, dtypes=FLOAT_DTYPES, ndim=2)
    shape, device = lp.shape, lp.device
    for i, t in enumerate(x):
        # the common case in one test per tensor; anything else gets the full check
        if t is None or i == 0 or (isinstance(t, torch.Tensor) and t.device == device
                                   and (t.shape == shape or i == 2 and t.shape == shape[:1])
                                   and t.dtype in (_MASK_DTYPES if i == 3 else FLOAT_DTYPES)):
            continue
        _check_input(PPOInputs._fields[i], t, shape, device)
    if not (x.values is None) == (x.old_values is None) == (x.returns is None):
        given = {n: getattr(x, n) is not None for n in ("values", "old_values", "returns")}
        raise ValueError("values, old_values, returns: expected all three or none, got "
                         + ", ".join(f"{n}={'given' if g else 'None'}" for n, g in given.items()))


def _check_input(name: str, t, shape: torch.Size, device: torch.device) -> None:
    """The full check of input ``name`` (type, dtype, device, shape), each failure a
    ValueError naming it."""
    check_tensor(name, t, dtypes=None if name == "mask" else FLOAT_DTYPES)
    if t.dtype.is_complex:
        raise ValueError(f"mask: expected a bool, integer or float dtype, got {t.dtype}")
    check_same_device(name, t, device)
    allowed = (shape, shape[:1]) if name == "advantages" else (shape,)
    if t.shape not in allowed:
        raise ValueError(f"{name}: expected shape " + " or ".join(
            str(tuple(a)) for a in allowed) + f" (as logprobs), got {tuple(t.shape)}")


def _config(x: PPOInputs, *scalars) -> PPOConfig:
    """The scalar arguments (clip_eps, clip_eps_high, dual_clip, value_clip, vf_coef,
    entropy_coef, kl_loss_coef, agg, norm_length, tis_cap) checked (ValueError naming the
    argument) into a PPOConfig. A training loop passes the same ones every step: the checked
    config is remembered (keyed by value and type, so True is never taken for 1)."""
    return _remembered(_checked_config, x.logprobs.shape[1], x.rollout_logprobs is not None,
                       x.entropy is not None, x.ref_logprobs is not None, *scalars)


def _remembered(fn, *args):
    """``fn(*args)`` for an ``lru_cache``-wrapped ``fn``: through its cache eagerly, around
    it while dynamo traces (traced once, the cache would only add a warning) or when an
    argument is unhashable (the uncached call then says what is wrong with it)."""
    if torch.compiler.is_compiling():
        return fn.__wrapped__(*args)
    try:
        return fn(*args)
    except TypeError:
        return fn.__wrapped__(*args)


@functools.lru_cache(maxsize=64, typed=True)
def _checked_config(T, has_rollout, has_entropy, has_ref, clip_eps, clip_eps_high, dual_clip,
                    value_clip, vf_coef, entropy_coef, kl_loss_coef, agg, norm_length,
                    tis_cap) -> PPOConfig:
    check_choice("agg", agg, AGG_MODES)
    clip_eps = _number("clip_eps", clip_eps, 0.0)
    high = clip_eps if clip_eps_high is None else _number("clip_eps_high", clip_eps_high, 0.0)
    if tis_cap is not None and not has_rollout:
        raise ValueError("tis_cap: given without rollout_logprobs (the weights it caps)")
    if norm_length is not None and agg != "seq-mean-token-sum-norm":
        raise ValueError(f"norm_length: used only with agg='seq-mean-token-sum-norm', "
                         f"got agg={agg!r}")
    for name, coef, what, given in (("entropy_coef", entropy_coef, "entropy", has_entropy),
                                    ("kl_loss_coef", kl_loss_coef, "ref_logprobs", has_ref)):
        if _number(name, coef) != 0 and not given:
            raise ValueError(f"{name}: is {coef} but {what} was not given")
    return PPOConfig(
        lo=1.0 - clip_eps, hi=1.0 + high,
        dual_clip=math.inf if dual_clip is None else _number("dual_clip", dual_clip, 1.0, True),
        value_clip=_number("value_clip", value_clip, 0.0), vf_coef=_number("vf_coef", vf_coef),
        entropy_coef=float(entropy_coef), kl_loss_coef=float(kl_loss_coef),
        tis_cap=math.inf if tis_cap is None else _number("tis_cap", tis_cap, 0.0, True),
        agg=agg, norm_length=(float(T or 1) if norm_length is None
                              else _number("norm_length", norm_length, 0.0, True)))


def ppo_loss(logprobs, old_logprobs, advantages, mask, *, clip_eps=0.2, clip_eps_high=None,
             dual_clip=None, values=None, old_values=None, returns=None, value_clip=0.2,
             vf_coef=0.1, entropy=None, entropy_coef=0.0, ref_logprobs=None, kl_loss_coef=0.0,
             agg="token-mean", norm_length=None, rollout_logprobs=None, tis_cap=None):
    """The clipped PPO policy loss with optional value, entropy and k3 KL terms, forward and
    backward fused (the math: the module docstring).

    Args:
        logprobs: [B, T] float32, float16 or bfloat16 (float64: torch backend) log-probs
            of the sampled tokens under the policy being trained. Gets gradients.
        old_logprobs: [B, T], under the policy that sampled. advantages: [B, T], or [B]
            (one per sequence, GRPO). mask: [B, T] bool, integer or float, 0 on padding,
            else the token's weight.
        clip_eps, clip_eps_high: the ratio is clipped to [1 − clip_eps, 1 + clip_eps_high]
            (clip_eps_high defaults to clip_eps). dual_clip: c > 1 caps a term with A < 0
            at −c·A (None: no cap).
        values, old_values, returns: [B, T], all or none: the value term, a token mean
            times vf_coef, clipped by value_clip. ``values`` gets gradients.
        entropy: [B, T], for − entropy_coef·agg(entropy). Gets gradients.
        ref_logprobs: [B, T], for + kl_loss_coef·agg(k3).
        agg: one of AGG_MODES; norm_length: the constant of "seq-mean-token-sum-norm"
            (default T).
        rollout_logprobs: [B, T] from the rollout engine (vLLM, ...): each policy term is
            weighted by min(exp(old_logprobs − rollout_logprobs), tis_cap), detached
            (tis_cap None: not truncated).

    Returns:
        (loss, stats): loss 0-d float32 (float64 for float64 logprobs); stats a dict of
        detached 0-d tensors, no host sync: clipfrac, approx_kl, ratio_mean, pg_loss, and
        vf_loss, vf_clipfrac, entropy, kl_loss, tis_weight_mean, tis_clipfrac when their
        inputs are given.
    """
    x = PPOInputs(logprobs, old_logprobs, advantages, mask, values, old_values, returns,
                  entropy, ref_logprobs, rollout_logprobs)
    _check_inputs(x)
    cfg = _config(x, clip_eps, clip_eps_high, dual_clip, value_clip, vf_coef, entropy_coef,
                  kl_loss_coef, agg, norm_length, tis_cap)
    backend = _backend.select("ppo_loss", logprobs.device, logprobs.dtype)
    tensors = tuple(None if t is None else t.contiguous() for t in x)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        loss, stats = PPOLossFunction.apply(cfg, backend, *tensors)
    else:           # no graph to build: the forward alone, without autograd's cost
        loss, stats = _forward(cfg, backend, tensors, False)[:2]
    names, columns = _remembered(_stat_columns, values is not None, entropy is not None,
                                 ref_logprobs is not None, rollout_logprobs is not None)
    views = stats.unbind(0)         # one op for all eleven views
    return loss, dict(zip(names, [views[j] for j in columns]))


def _examples(device: torch.device, dtype: torch.dtype) -> list:
    """For ``kernelrl tune``, at B = 256, T = 2048: PPO (token advantages, values, entropy,
    KL, dual clip) and GRPO (sequence advantages, KL, seq-mean-token-mean)."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0, grad=False):
        t = torch.randn(*shape, device=device, generator=gen) * scale
        return t.to(dtype).requires_grad_(grad)

    B, T = 256, 2048
    lp, old, mask = rand(B, T, scale=0.1, grad=True), rand(B, T, scale=0.1), rand(B, T) > -0.8
    ppo = dict(values=rand(B, T, grad=True), old_values=rand(B, T), returns=rand(B, T),
               entropy=rand(B, T, grad=True), entropy_coef=0.01,
               ref_logprobs=rand(B, T, scale=0.1), kl_loss_coef=0.05, dual_clip=3.0)
    grpo = dict(ref_logprobs=rand(B, T, scale=0.1), kl_loss_coef=0.04,
                agg="seq-mean-token-mean")
    return [(f"PPO B={B} T={T}", (lp, old, rand(B, T), mask), ppo),
            (f"GRPO B={B} T={T}", (lp, old, rand(B), mask), grpo)]


_backend.register_op(
    "ppo_loss",
    {"native": _backend.Implementation(KERNEL_DTYPES, _KERNELS["native"]),
     "triton": _backend.Implementation(KERNEL_DTYPES, _KERNELS["triton"]),
     "torch": _backend.Implementation(FLOAT_DTYPES, _KERNELS["torch"])},
    # CPU: bench_ppo_loss shows the C++ kernels faster than the torch path and than
    # torch.compile of the formula, so native leads (it is the CPU default where built).
    # CUDA: on an H200 the Triton passes were 2-4x faster than the torch path
    # (benchmarks/results/nvidia-h200-2026-11-30.json; the built-in table picks Triton
    # there). The CUDA twins in csrc/ppo_loss have not run on a GPU yet: dispatch takes
    # them only once `kernelrl tune` has measured them faster.
    skip=_backend.not_yet_measured("cuda", "native"),
    examples=_examples, fn=ppo_loss)

