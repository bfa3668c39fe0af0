"""Benchmark: the PPO / GRPO policy loss (+ value, entropy and KL terms), forward + backward.

Shape legend: B batch (sequences), T time (response tokens per sequence).

Cases (fwd+bwd: the loss, then its gradients to logprobs and, where given, values and
entropy; the same inputs for every implementation in one run):

  "ppo_loss fwd+bwd PPO"
      token advantages [B, T], value term (value_clip 0.2, vf_coef 0.1), entropy bonus
      (0.01), k3 KL loss (0.05), dual clip 3, agg "token-mean", bool mask.
  "ppo_loss fwd+bwd GRPO"
      one advantage per sequence [B], k3 KL loss (0.04), clip 0.2 / 0.28 (clip-higher),
      agg "seq-mean-token-mean", float mask.
  impls: kernelrl.ops.ppo_loss.ppo_loss | eager (the formula composed in plain torch as
         TRL / veRL write it: masked means as Σ x·m / Σ m, stats detached, no host sync)
         | compile (torch.compile of eager). kernelrl also has a row per backend it can
         run here, forced (kernelrl[triton], kernelrl[torch]).
         | floor: not an implementation but a lower bound, what autograd alone costs for
         an op with these inputs: a torch.autograd.Function that computes nothing (an
         uninitialized loss, uninitialized gradients) run forward and through
         torch.autograd.grad to the same inputs. Every row pays it; not checked against
         the reference, and no GB/s (it moves none of the case's bytes).
  bytes: the [B, T] inputs read in forward and again in backward, plus the gradients
         written (4 bytes each in fp32; a bool mask 1 byte).

Inputs: logprobs = old_logprobs + 0.1·randn (ratios around 1, some clipped), advantages,
values, returns ~ randn, entropy ~ |randn|, ref_logprobs = logprobs + 0.1·randn, rows of
random lengths in [1, T] (right padding).

Targets, both cases at B=256 T=2048 fp32 (printed MET / NOT MET / NOT CHECKED with the
numbers, never asserted): on a GPU kernelrl at least 3x faster than eager and than
compile, by do_bench's medians and, where the calls are host-bound (timed back to back
too, the rows' loop_ms), by the back-to-back figures as well; on a CPU no slower than
either (the median of >= 5 paired round-robin runs).

Each run also times B=4 T=64, where a call costs only its host overhead (Python, autograd,
launches). On a GPU the target shape is close to that too: its PPO case moves about 41 MB,
under 10 µs at an H200's peak bandwidth (arithmetic, not a measurement).

Run (the target shape; --quick: B=64 T=1024, as benchmarks/run.py ppo_loss does):
  python benchmarks/bench_ppo_loss.py --device cpu --reps 7 --out cpu.json
  python benchmarks/bench_ppo_loss.py --device cuda --out gpu.json
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import report  # noqa: E402
import suite  # noqa: E402
from cases import (KERNELRL_IMPLS, Case, Impl, close_to_reference, compiled,  # noqa: E402
                   kernelrl_impls)
from targets import faster, ms, target, why_missing  # noqa: E402

BENCH = "ppo_loss"
CASE_NAMES = {"ppo": "ppo_loss fwd+bwd PPO", "grpo": "ppo_loss fwd+bwd GRPO"}
IMPLS = KERNELRL_IMPLS + ("eager", "compile", "floor")
TARGET_SHAPE = {"B": 256, "T": 2048}            # the shape, CPU and GPU
HOST_SHAPE = {"B": 4, "T": 64}                  # host-bound: the per-call overhead
GPU_SPEEDUP = 3
KW = {"ppo": dict(dual_clip=3.0, value_clip=0.2, vf_coef=0.1, entropy_coef=0.01,
                  kl_loss_coef=0.05, agg="token-mean"),
      "grpo": dict(clip_eps_high=0.28, kl_loss_coef=0.04, agg="seq-mean-token-mean")}
GRAD_INPUTS = ("logprobs", "values", "entropy")


def plan(device: str, quick: bool) -> list:
    """[(case_id, shape, dtype)]. ``quick``: B=64, T=1024, seconds per implementation.
    Both also run HOST_SHAPE, where the device work is negligible and a call costs what
    Python, autograd and the launches cost (on a GPU the target shape is close to that)."""
    shape = {"B": 64, "T": 1024} if quick else TARGET_SHAPE
    return [(case, s, "fp32") for s in (shape, HOST_SHAPE) for case in ("ppo", "grpo")]


# ----------------------------------------------------------------------------------------
# Eager: the formula as a user composes it (what kernelrl replaces)
# ----------------------------------------------------------------------------------------
def eager_ppo_loss(logprobs, old_logprobs, advantages, mask, *, clip_eps=0.2,
                   clip_eps_high=None, dual_clip=None, values=None, old_values=None,
                   returns=None, value_clip=0.2, vf_coef=0.1, entropy=None, entropy_coef=0.0,
                   ref_logprobs=None, kl_loss_coef=0.0, agg="token-mean"):
    import torch

    m = mask.to(logprobs.dtype)
    count = m.sum().clamp(min=1)

    def masked_mean(x):
        return (x * m).sum() / count

    def aggregate(x):
        if agg == "token-mean":
            return masked_mean(x)
        return ((x * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()   # seq-mean-token-mean

    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - clip_eps, 1 + high)
    pg = torch.maximum(pg1, pg2)
    if dual_clip is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -dual_clip * adv), pg)
    pg_loss = aggregate(pg)
    stats = {"pg_loss": pg_loss.detach(), "clipfrac": masked_mean((pg2 > pg1).float()).detach(),
             "approx_kl": (0.5 * masked_mean(log_ratio.detach() ** 2)),
             "ratio_mean": masked_mean(ratio.detach())}
    loss = pg_loss
    if values is not None:
        clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
        vf = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2))
        stats["vf_loss"] = vf.detach()
        loss = loss + vf_coef * vf
    if entropy is not None:
        ent = aggregate(entropy)
        stats["entropy"] = ent.detach()
        loss = loss - entropy_coef * ent
    if ref_logprobs is not None:
        k = logprobs - ref_logprobs
        kl = aggregate(torch.exp(-k) - 1 + k)
        stats["kl_loss"] = kl.detach()
        loss = loss + kl_loss_coef * kl
    return loss, stats


def _fwd_bwd(op, kw):
    import torch

    def run(x):
        loss, _ = op(**x, **kw)
        leaves = [x[k] for k in GRAD_INPUTS if k in x]
        grads = torch.autograd.grad(loss, leaves)
        return (loss.detach().reshape(1), *grads)

    return run


def _autograd_floor():
    """The "floor" row's fn(inputs): autograd's own cost for an op over these inputs
    (forward, then torch.autograd.grad to the inputs that take gradients), with no math:
    the loss and the gradients are uninitialized memory."""
    import torch

    class Nothing(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *tensors):
            ctx.like = [t if t.requires_grad else None for t in tensors]
            return tensors[0].new_empty(())

        @staticmethod
        def backward(ctx, grad):
            return tuple(None if t is None else torch.empty_like(t) for t in ctx.like)

    def run(x):
        loss = Nothing.apply(*x.values())
        grads = torch.autograd.grad(loss, [x[k] for k in GRAD_INPUTS if k in x])
        return (loss.detach().reshape(1), *grads)

    return run


def make_case(case_id: str, shape: dict, dtype: str, device: str) -> Case:
    import torch

    if case_id not in KW:
        raise ValueError(f"case_id: expected one of {sorted(KW)}, got {case_id!r}")
    B, T, ppo = int(shape["B"]), int(shape["T"]), case_id == "ppo"
    tdt = common.torch_dtype(dtype)

    def make_inputs(seed):
        g = torch.Generator(device=device).manual_seed(5000 + seed)

        def randn(*size, scale=1.0):
            return torch.randn(*size, generator=g, device=device).mul_(scale).to(tdt)

        old = randn(B, T)
        lengths = torch.randint(1, T + 1, (B,), generator=g, device=device)
        mask = torch.arange(T, device=device) < lengths[:, None]
        x = {"logprobs": (old + randn(B, T, scale=0.1)).requires_grad_(), "old_logprobs": old,
             "advantages": randn(B, T) if ppo else randn(B),
             "mask": mask if ppo else mask.to(tdt)}
        x["ref_logprobs"] = x["logprobs"].detach() + randn(B, T, scale=0.1)
        if ppo:
            x.update(values=randn(B, T).requires_grad_(), old_values=randn(B, T),
                     returns=randn(B, T), entropy=randn(B, T).abs_().requires_grad_())
        return x

    def kernelrl_op():
        from kernelrl.ops.ppo_loss import ppo_loss
        return _fwd_bwd(ppo_loss, KW[case_id])

    try:  # registers the op (kernelrl_impls imports kernelrl.ops, which may not export it)
        import kernelrl.ops.ppo_loss  # noqa: F401
    except Exception:  # kernelrl_impls then says why kernelrl is unavailable
        pass
    impls = {
        **kernelrl_impls("ppo_loss", device, tdt, kernelrl_op),
        "eager": Impl(lambda: _fwd_bwd(eager_ppo_loss, KW[case_id])),
        "compile": Impl(lambda: _fwd_bwd(compiled(eager_ppo_loss), KW[case_id])),
        "floor": Impl(_autograd_floor, checked=False,
                      info={"note": "lower bound: autograd alone, no math"}),
    }
    itemsize = torch.empty((), dtype=tdt).element_size()
    n_float = 8 if ppo else 3                      # [B, T] float inputs besides the mask
    n_grads = 3 if ppo else 1
    mask_bytes = 1 if ppo else itemsize
    return Case(
        bench=BENCH, case_id=case_id, case=CASE_NAMES[case_id], shape={"B": B, "T": T},
        dtype=dtype, make_inputs=make_inputs, impls=impls, device=device,
        # the loss within 1e-5 (+1e-5 relative); gradients by relative norm
        check=close_to_reference(lambda ref: torch.ones_like(ref, dtype=torch.bool), 1e-5,
                                 1e-5, 1e-5),
        bytes_moved=(2 * (n_float * itemsize + mask_bytes) + n_grads * itemsize) * B * T,
    )


# ----------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------
def _gpu_speedup(rows: list, case_id: str, peer: str) -> dict:
    label = (f"GPU {CASE_NAMES[case_id]} B={TARGET_SHAPE['B']} T={TARGET_SHAPE['T']} fp32 "
             f">= {GPU_SPEEDUP}x faster than {peer}")
    k = report.find_row(rows, CASE_NAMES[case_id], "kernelrl", TARGET_SHAPE, "fp32")
    p = report.find_row(rows, CASE_NAMES[case_id], peer, TARGET_SHAPE, "fp32")
    if ms(k) is None or ms(p) is None:
        missing, name = (k, "kernelrl") if ms(k) is None else (p, peer)
        return target(label, "NOT CHECKED", why_missing(missing, name))
    ratio = ms(p) / ms(k)
    detail = (f"{peer}/kernelrl time {ratio:.2f}x (ratio of do_bench medians); kernelrl "
              f"{ms(k):.3f} ms vs {peer} {ms(p):.3f} ms")
    met = ratio >= GPU_SPEEDUP
    if k.get("loop_ms") and p.get("loop_ms"):
        # host-bound: do_bench leaves part of the host time out; back to back counts it
        loop = p["loop_ms"] / k["loop_ms"]
        met = met and loop >= GPU_SPEEDUP
        detail += (f"; back to back {loop:.2f}x ({k['loop_ms']:.3f} vs {p['loop_ms']:.3f} "
                   "ms per call); MET needs both")
    return target(label, "MET" if met else "NOT MET", detail + _floor_note(rows, case_id, p))


def _floor_note(rows: list, case_id: str, peer_row: dict) -> str:
    """What the "floor" row says of the target: the fastest kernelrl could be is autograd's
    own cost, so a peer under GPU_SPEEDUP times that cannot be beaten by GPU_SPEEDUP."""
    f = report.find_row(rows, CASE_NAMES[case_id], "floor", TARGET_SHAPE, "fp32")
    if ms(f) is None:
        return ""
    key = "loop_ms" if f.get("loop_ms") and peer_row.get("loop_ms") else "median_ms"
    floor, peer = f[key], peer_row[key]
    note = (f"; autograd floor {floor:.3f} ms ({'back to back' if key == 'loop_ms' else 'do_bench'}"
            f"): {GPU_SPEEDUP}x needs kernelrl <= {peer / GPU_SPEEDUP:.3f} ms")
    if floor * GPU_SPEEDUP > peer:
        note += (f", under the floor: out of reach at this size (the peer takes "
                 f"{peer / floor:.2f}x the floor)")
    return note


def targets(rep: dict) -> list:
    rows, out = rep["results"], []
    at = f"B={TARGET_SHAPE['B']} T={TARGET_SHAPE['T']} fp32"
    for case_id in CASE_NAMES:
        for peer in ("eager", "compile"):
            if rep.get("device_kind") == "cuda":
                out.append(_gpu_speedup(rows, case_id, peer))
            else:
                out.append(faster(rows, CASE_NAMES[case_id], TARGET_SHAPE, "fp32", peer,
                                  f"CPU {CASE_NAMES[case_id]} {at} no slower than {peer}",
                                  cpu=True, or_equal=True))
    if rep.get("device_kind") != "cuda":
        out.append(target(f"GPU ppo_loss fwd+bwd {at} >= {GPU_SPEEDUP}x faster than eager "
                          "and compile", "NOT CHECKED",
                          "a CPU run: GPU speed is only claimed from a GPU run"))
    return out


if __name__ == "__main__":
    sys.exit(suite.bench_main(sys.modules[__name__]))
