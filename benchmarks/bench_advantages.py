"""Benchmark: PPO's KL-penalized rewards and GAE advantages, whitening included.

Shape legend: B batch (sequences), T time (response tokens per sequence).

Case (forward only: the outputs are PPO's targets, not differentiated):

  "kl_penalized_advantages"
      kl = logprobs − ref_logprobs (k1), rewards = −0.05·kl + the score on each row's last
      real token, GAE with γ = 1, λ = 0.95, returns = A + V, then A whitened over the
      batch's real tokens. Rows of random lengths in [1, T] (right padding).
      impls: kernelrl.ops.kl_penalized_advantages | eager (the reversed Python loop over T
             that TRL, OpenRLHF and veRL all use, then masked_whiten:
             kernelrl.ops.advantages.kl_penalized_advantages_reference in fp32)
             | compile (torch.compile of that loop).
      bytes: 3·B·T·itemsize (logprobs, ref_logprobs, values) + B·T (mask) read, 16·B·T
             written (four fp32 outputs), 8·B·T whitening (advantages read and written).
  kernelrl also has a row per backend it can run here, forced (kernelrl[native], ...).

Inputs: logprobs, ref_logprobs ~ −U(0, 2), values ~ randn, scores ~ randn, lengths uniform
in [1, T].

Targets (printed MET / NOT MET / NOT CHECKED with the numbers; never asserted):
  CPU  B=256 T=1024 fp32: kernelrl at least 30× faster than the loop (eager).
  GPU  B=256 T=1024 fp32: kernelrl at least 500× faster than the loop (eager).
  CPU verdicts are medians of >= 5 paired round-robin runs (targets.py).

Usage:
  python benchmarks/bench_advantages.py --device cpu --out cpu.json    # target shape
  python benchmarks/bench_advantages.py --quick --device cpu --impls kernelrl,eager
  python benchmarks/run.py advantages                                  # same as --quick
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import report  # noqa: E402
import suite  # noqa: E402
from cases import (KERNELRL_IMPLS, Case, Impl, close_to_reference, compiled,  # noqa: E402
                   kernelrl_impls)
from targets import MIN_PAIRS, ms, paired_ratios, target, why_missing  # noqa: E402

BENCH = "advantages"
CASE_NAMES = {"gae": "kl_penalized_advantages"}
IMPLS = KERNELRL_IMPLS + ("eager", "compile")
KW = {"kl_coef": 0.05, "kl_estimator": "k1", "gamma": 1.0, "lam": 0.95, "whiten": True}

TARGET_SHAPE = {"B": 256, "T": 1024}           # the shape, CPU and GPU
SPEEDUP = {"cpu": 30, "cuda": 500}             # at least this many times the loop's speed


def plan(device: str, quick: bool) -> list:
    """[(case_id, shape, dtype)]. ``quick`` (run.py's default): T = 64, so that
    torch.compile of the loop (which unrolls it, one graph node per token column)
    compiles in seconds; the target shape T = 1024 takes minutes to compile."""
    if quick:
        return [("gae", {"B": 256, "T": 64}, "fp32")]
    if common.is_cuda(device):
        return [("gae", TARGET_SHAPE, "fp32"), ("gae", TARGET_SHAPE, "bf16")]
    return [("gae", TARGET_SHAPE, "fp32")]


def _reference():
    from kernelrl.ops.advantages import kl_penalized_advantages_reference
    return kl_penalized_advantages_reference


def _run(op):
    def run(x):
        return tuple(op(x["logprobs"], x["ref_logprobs"], x["values"], x["scores"], x["mask"],
                        **KW))
    return run


def make_case(case_id: str, shape: dict, dtype: str, device: str) -> Case:
    import torch

    if case_id not in CASE_NAMES:
        raise ValueError(f"case_id: expected one of {sorted(CASE_NAMES)}, got {case_id!r}")
    tdt = common.torch_dtype(dtype)
    B, T = int(shape["B"]), int(shape["T"])

    def make_inputs(seed):
        g = torch.Generator(device=device).manual_seed(3000 + seed)
        x = {"logprobs": -2 * torch.rand(B, T, generator=g, device=device),
             "ref_logprobs": -2 * torch.rand(B, T, generator=g, device=device),
             "values": torch.randn(B, T, generator=g, device=device)}
        x = {name: t.to(tdt) for name, t in x.items()}
        lengths = torch.randint(1, T + 1, (B,), generator=g, device=device)
        return {**x, "scores": torch.randn(B, generator=g, device=device),
                "mask": torch.arange(T, device=device) < lengths[:, None]}

    def kernelrl_op():
        import kernelrl.ops.advantages as adv
        return _run(adv.kl_penalized_advantages)

    try:  # registers the op (kernelrl_impls imports kernelrl.ops, which may not export it)
        import kernelrl.ops.advantages  # noqa: F401
    except Exception:  # kernelrl_impls then says why kernelrl is unavailable
        pass
    impls = {
        **kernelrl_impls("kl_penalized_advantages", device, tdt, kernelrl_op),
        "eager": Impl(lambda: _run(_reference())),
        "compile": Impl(lambda: _run(compiled(_reference()))),
    }
    itemsize = torch.empty((), dtype=tdt).element_size()
    return Case(
        bench=BENCH, case_id=case_id, case=CASE_NAMES[case_id], shape={"B": B, "T": T},
        dtype=dtype, make_inputs=make_inputs, impls=impls, device=device,
        # whitened advantages within 1e-4 everywhere; returns, rewards, kl by relative norm
        check=close_to_reference(lambda ref: torch.ones_like(ref, dtype=torch.bool), 1e-4,
                                 1e-4, 1e-5),
        bytes_moved=(3 * itemsize + 1 + 16 + 8) * B * T,
    )


def _speedup(rows: list, device_kind: str) -> dict:
    """kernelrl at least SPEEDUP[device_kind] times faster than the loop at the target
    shape: on a CPU the median of the paired round-robin ratios, on a GPU the ratio of the
    medians."""
    factor = SPEEDUP[device_kind]
    label = (f"{'GPU' if device_kind == 'cuda' else 'CPU'} kl_penalized_advantages "
             f"B={TARGET_SHAPE['B']} T={TARGET_SHAPE['T']} fp32 >= {factor}x the reversed loop")
    k = report.find_row(rows, CASE_NAMES["gae"], "kernelrl", TARGET_SHAPE, "fp32")
    p = report.find_row(rows, CASE_NAMES["gae"], "eager", TARGET_SHAPE, "fp32")
    if ms(k) is None or ms(p) is None:
        missing, name = (k, "kernelrl") if ms(k) is None else (p, "eager")
        return target(label, "NOT CHECKED", why_missing(missing, name))
    medians = f"kernelrl {ms(k):.3f} ms vs eager {ms(p):.3f} ms (medians)"
    if device_kind == "cpu":
        ratios = paired_ratios(k, p)
        if len(ratios) < MIN_PAIRS:
            return target(label, "NOT CHECKED", f"{len(ratios)} paired runs, a verdict needs "
                                                f">= {MIN_PAIRS}; {medians}")
        ratio, how = statistics.median(ratios), f"median of {len(ratios)} paired runs"
    else:
        ratio, how = ms(p) / ms(k), "ratio of medians"
    return target(label, "MET" if ratio >= factor else "NOT MET",
                  f"eager/kernelrl time {ratio:.1f}x ({how}); {medians}")


def targets(rep: dict) -> list:
    kind = "cuda" if rep.get("device_kind") == "cuda" else "cpu"
    out = [_speedup(rep["results"], kind)]
    if kind == "cpu":
        out.append(target(f"GPU kl_penalized_advantages B={TARGET_SHAPE['B']} "
                          f"T={TARGET_SHAPE['T']} fp32 >= {SPEEDUP['cuda']}x the reversed loop",
                          "NOT CHECKED", "a CPU run: GPU speed is only claimed from a GPU run"))
    return out


if __name__ == "__main__":
    sys.exit(suite.bench_main(sys.modules[__name__]))
