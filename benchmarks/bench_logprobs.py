"""Benchmark: token log-probs from logits, and from hidden states + lm_head (fused linear).

Shape legend: N tokens, V vocabulary, H hidden width.

Cases (fwd+bwd, same inputs for every implementation in one run):

  "token_logprobs fwd+bwd"
      logp = log_softmax(logits)[label] for logits [N, V]; backward with a random
      per-token upstream gradient into logits.
      impls: kernelrl.ops.token_logprobs | eager (logits.float().log_softmax(-1).gather)
             | compile (torch.compile of eager) | liger (liger_cross_entropy,
             reduction="none", logp = -loss; CUDA only).
      bytes: logits read in forward + read and written in backward = 3·N·V·itemsize,
             plus the small per-token vectors (labels read twice 16·N, logp written 4·N,
             upstream grad read 4·N) = 24·N.

  "linear_logprobs fwd+bwd per-token"
      logp = log_softmax(hidden @ weight.T)[label], per token; random per-token upstream
      gradient; gradients to hidden and weight.
      impls: kernelrl.ops.linear_logprobs (reduction="none") | eager | compile
             | torch_chunked (F.linear_cross_entropy(..., reduction="none",
             options=LinearCrossEntropyOptions()), logp = -loss).
      (Liger's fused linear cross-entropy only gives a mean/sum loss: see the next case.)

  "linear_logprobs fwd+bwd mean (SFT)"
      loss = mean token cross-entropy over non-ignored tokens, backward from the scalar.
      impls: kernelrl (-linear_logprobs(..., reduction="mean")) | eager
             (F.cross_entropy(hidden @ weight.T, labels)) | compile | torch_chunked
             (F.linear_cross_entropy(..., reduction="mean", ignore_index=-100, options=...))
             | liger (liger_fused_linear_cross_entropy, reduction="mean"; CUDA only).

  For both linear cases: flops = 6·N·H·V (forward matmul + the two backward matmuls);
  the count excludes any recompute an implementation does, so it is a useful-work rate.
  kernelrl also has a row per backend it can run here, forced (kernelrl[native], ...).

Inputs: logits ~ 2·randn; hidden ~ randn, weight ~ randn·2/sqrt(H) (logits of std 2);
labels uniform in [0, V) with ~10% set to -100.

Targets (printed MET / NOT MET / NOT CHECKED with the numbers; never asserted):
  GPU  token_logprobs fwd+bwd, N=16384 V=128256 bf16: >= 80% of the measured copy GB/s.
  GPU  linear_logprobs N=16384 H=4096 V=128256 bf16: faster than Liger FLCE, than eager and
       than torch_chunked; peak extra memory <= 1/16 of eager's.
  CPU  linear_logprobs N=8192 H=256 V=32000 fp32 fwd+bwd: peak extra memory <= 1/16 of
       eager's, and time no slower than eager (per-token); faster than torch_chunked and
       peak extra memory <= torch_chunked's (per-token and mean). CPU speed verdicts are
       medians of >= 5 paired round-robin runs (targets.py).

Usage:
  python benchmarks/bench_logprobs.py --device cpu --out cpu.json     # target shapes
  python benchmarks/bench_logprobs.py --quick --device cpu --impls kernelrl,eager
  python benchmarks/run.py logprobs                                   # same as --quick
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import report  # noqa: E402
import suite  # noqa: E402
from cases import (KERNELRL_IMPLS, Case, Impl, close_to_reference, compiled,  # noqa: E402
                   first, kernelrl_impls, liger_functional, liger_skip, torch_chunked_skip,
                   torch_linear_ce)
from targets import faster, memory_at_most, ms, target, why_missing  # noqa: E402

BENCH = "logprobs"
IGNORE_INDEX = -100

CASE_NAMES = {
    "token": "token_logprobs fwd+bwd",
    "linear": "linear_logprobs fwd+bwd per-token",
    "linear_mean": "linear_logprobs fwd+bwd mean (SFT)",
}
IMPLS = KERNELRL_IMPLS + ("eager", "compile", "torch_chunked", "liger")

# The target shapes.
GPU_TOKEN = {"N": 16384, "V": 128256}
GPU_LINEAR = {"N": 16384, "H": 4096, "V": 128256}
CPU_LINEAR = {"N": 8192, "H": 256, "V": 32000}
CPU_TOKEN = {"N": 2048, "V": 32000}


def plan(device: str, quick: bool) -> list:
    """[(case_id, shape, dtype)] to run on this device. ``quick`` (run.py's default):
    shapes where every call takes tens of milliseconds on 2 CPU cores, so that every
    implementation, its check and its memory process fit in about a minute, while the
    vocabulary still dwarfs the hidden width as in an LLM head. torch_chunked is the one to
    read with care there: its chunk count depends on V/H, not N, so at few tokens its fixed
    cost per chunk dominates and it ranks lower than at the target shapes (--full)."""
    cuda = common.is_cuda(device)
    if quick:
        if cuda:
            token, linear = {"N": 4096, "V": 32000}, {"N": 4096, "H": 1024, "V": 32000}
            return [("token", token, "bf16"), ("token", token, "fp32"),
                    ("linear", linear, "bf16"), ("linear_mean", linear, "bf16")]
        token, linear = {"N": 512, "V": 32000}, {"N": 1024, "H": 128, "V": 8000}
        return [("token", token, "fp32"), ("linear", linear, "fp32"),
                ("linear_mean", linear, "fp32")]
    if cuda:
        return [
            ("token", GPU_TOKEN, "bf16"),
            ("token", {"N": 4096, "V": 128256}, "fp32"),
            ("linear", GPU_LINEAR, "bf16"),
            ("linear_mean", GPU_LINEAR, "bf16"),
        ]
    return [
        ("linear", CPU_LINEAR, "fp32"),
        ("linear_mean", CPU_LINEAR, "fp32"),
        ("token", CPU_TOKEN, "fp32"),
        ("token", CPU_TOKEN, "bf16"),
    ]


# ----------------------------------------------------------------------------------------
# Eager references (what a user writes without kernelrl)
# ----------------------------------------------------------------------------------------
def eager_token_logprobs(logits, labels):
    """log softmax(logits)[label] in fp32; 0 on ignored tokens. Materialises [N, V] fp32
    twice in forward (upcast, log_softmax) and more in backward."""
    ignored = labels == IGNORE_INDEX
    logp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(ignored, 0.0)


def eager_linear_logprobs(hidden, weight, labels):
    return eager_token_logprobs(hidden @ weight.T, labels)


def eager_linear_ce_mean(hidden, weight, labels):
    import torch.nn.functional as F
    return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=IGNORE_INDEX)


# ----------------------------------------------------------------------------------------
# fwd+bwd wrappers: each returns (output, grads...) for the check
# ----------------------------------------------------------------------------------------
def _token_fwd_bwd(op):
    import torch

    def run(x):
        logits = x["logits"]
        logp = op(logits, x["labels"])
        (g,) = torch.autograd.grad(logp, (logits,), x["grad"])
        return logp.detach(), g

    return run


def _linear_fwd_bwd(op):
    import torch

    def run(x):
        logp = op(x["hidden"], x["weight"], x["labels"])
        gh, gw = torch.autograd.grad(logp, (x["hidden"], x["weight"]), x["grad"])
        return logp.detach(), gh, gw

    return run


def _loss_fwd_bwd(loss_fn):
    import torch

    def run(x):
        loss = loss_fn(x["hidden"], x["weight"], x["labels"])
        gh, gw = torch.autograd.grad(loss, (x["hidden"], x["weight"]))
        return loss.detach(), gh, gw

    return run


def _kernelrl():
    import kernelrl.ops
    return kernelrl.ops


# ----------------------------------------------------------------------------------------
# Peers
# ----------------------------------------------------------------------------------------
def _liger_token_op():
    """Liger's cross-entropy with reduction="none" as a log-prob op (logp = -loss)."""
    liger_cross_entropy = liger_functional().liger_cross_entropy

    def op(logits, labels):
        loss = first(liger_cross_entropy(logits, labels, ignore_index=IGNORE_INDEX,
                                         reduction="none"))
        return -loss.float()

    return op


def _liger_flce_mean():
    """Liger's fused linear cross-entropy, mean over non-ignored tokens."""
    LF = liger_functional()
    if hasattr(LF, "liger_fused_linear_cross_entropy"):
        flce = LF.liger_fused_linear_cross_entropy
        return lambda h, w, y: first(flce(h, w, y, ignore_index=IGNORE_INDEX, reduction="mean"))
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")
    return lambda h, w, y: first(module(w, h, y))


def _torch_chunked_logprobs():
    """torch's chunked linear cross-entropy per token, as log-probs (logp = -loss; the
    loss is 0 on ignored tokens, as eager's log-prob is)."""
    loss = torch_linear_ce("none", IGNORE_INDEX)
    return lambda h, w, y: -loss(h, w, y)


# ----------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------
def make_case(case_id: str, shape: dict, dtype: str, device: str) -> Case:
    import torch

    tdt = common.torch_dtype(dtype)
    low_precision = dtype in ("bf16", "fp16")
    N, V = int(shape["N"]), int(shape["V"])

    def labels_and_grad(g):
        labels = torch.randint(0, V, (N,), generator=g, device=device)
        drop = torch.rand(N, generator=g, device=device) < 0.1
        labels.masked_fill_(drop, IGNORE_INDEX)
        grad = torch.randn(N, generator=g, device=device, dtype=torch.float32)
        return labels, grad

    if case_id == "token":
        def make_inputs(seed):
            g = torch.Generator(device=device).manual_seed(1000 + seed)
            logits = torch.randn(N, V, generator=g, device=device, dtype=tdt).mul_(2.0)
            labels, grad = labels_and_grad(g)
            return {"logits": logits.requires_grad_(), "labels": labels, "grad": grad}

        impls = {
            **kernelrl_impls("token_logprobs", device, tdt,
                             lambda: _token_fwd_bwd(_kernelrl().token_logprobs)),
            "eager": Impl(lambda: _token_fwd_bwd(eager_token_logprobs)),
            "compile": Impl(lambda: _token_fwd_bwd(compiled(eager_token_logprobs))),
            "liger": Impl(lambda: _token_fwd_bwd(_liger_token_op()), mutates_inputs=True,
                          skip=liger_skip(device)),
        }
        itemsize = torch.empty((), dtype=tdt).element_size()
        return Case(
            bench=BENCH, case_id=case_id, case=CASE_NAMES[case_id], shape={"N": N, "V": V},
            dtype=dtype, make_inputs=make_inputs, impls=impls, device=device,
            check=close_to_reference(lambda ref: ref != 0, 2e-2 if low_precision else 1e-3,
                                     1e-2 if low_precision else 0.0,
                                     5e-2 if low_precision else 1e-3),
            bytes_moved=3 * N * V * itemsize + 24 * N,
        )

    if case_id in ("linear", "linear_mean"):
        H = int(shape["H"])

        def make_inputs(seed):
            g = torch.Generator(device=device).manual_seed(2000 + seed)
            hidden = torch.randn(N, H, generator=g, device=device, dtype=tdt)
            weight = torch.randn(V, H, generator=g, device=device, dtype=tdt)
            weight.mul_(2.0 / math.sqrt(H))
            labels, grad = labels_and_grad(g)
            return {"hidden": hidden.requires_grad_(), "weight": weight.requires_grad_(),
                    "labels": labels, "grad": grad}

        if case_id == "linear":
            def kernelrl_logprobs():
                op = _kernelrl().linear_logprobs
                return _linear_fwd_bwd(lambda h, w, y: op(h, w, y, ignore_index=IGNORE_INDEX))

            impls = {
                **kernelrl_impls("linear_logprobs", device, tdt, kernelrl_logprobs),
                "eager": Impl(lambda: _linear_fwd_bwd(eager_linear_logprobs)),
                "compile": Impl(lambda: _linear_fwd_bwd(compiled(eager_linear_logprobs))),
                "torch_chunked": Impl(lambda: _linear_fwd_bwd(_torch_chunked_logprobs()),
                                      skip=torch_chunked_skip()),
            }
            check = close_to_reference(lambda ref: ref != 0, 0.25 if low_precision else 5e-2,
                                       1e-2 if low_precision else 0.0,
                                       5e-2 if low_precision else 1e-2)
        else:
            def kernelrl_loss():
                op = _kernelrl().linear_logprobs
                return _loss_fwd_bwd(lambda h, w, y: -op(h, w, y, ignore_index=IGNORE_INDEX,
                                                         reduction="mean"))

            impls = {
                **kernelrl_impls("linear_logprobs", device, tdt, kernelrl_loss),
                "eager": Impl(lambda: _loss_fwd_bwd(eager_linear_ce_mean)),
                "compile": Impl(lambda: _loss_fwd_bwd(compiled(eager_linear_ce_mean))),
                "torch_chunked": Impl(lambda: _loss_fwd_bwd(torch_linear_ce("mean", IGNORE_INDEX)),
                                      skip=torch_chunked_skip()),
                "liger": Impl(lambda: _loss_fwd_bwd(_liger_flce_mean()), skip=liger_skip(device)),
            }
            check = close_to_reference(lambda ref: torch.ones_like(ref, dtype=torch.bool),
                                       5e-2 if low_precision else 1e-3,
                                       1e-2 if low_precision else 0.0,
                                       5e-2 if low_precision else 1e-2)
        return Case(
            bench=BENCH, case_id=case_id, case=CASE_NAMES[case_id],
            shape={"N": N, "H": H, "V": V}, dtype=dtype, make_inputs=make_inputs,
            impls=impls, device=device, check=check, flops=6 * N * H * V,
        )

    raise ValueError(f"case_id: expected one of {sorted(CASE_NAMES)}, got {case_id!r}")


# ----------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------
def _token_bandwidth(rows: list, ceilings: dict) -> dict:
    label = "GPU token_logprobs fwd+bwd N=16384 V=128256 bf16 >= 80% of copy bandwidth"
    k = report.find_row(rows, CASE_NAMES["token"], "kernelrl", GPU_TOKEN, "bf16")
    copy = ceilings.get("copy_gbps")
    if ms(k) is None or not copy:
        return target(label, "NOT CHECKED",
                      why_missing(k, "kernelrl") if ms(k) is None else "no copy ceiling")
    frac = k["gbps"] / copy
    detail = (f"{k['gbps']:.0f} GB/s for 3*N*V*2 bytes vs measured copy {copy:.0f} GB/s "
              f"({k['median_ms']:.3f} ms)")
    if frac > 1:  # faster than a copy of the same bytes: the ceiling is what is wrong
        return target(label, "NOT CHECKED", f"{report.SUSPECT}: {detail}")
    return target(label, "MET" if frac >= 0.8 else "NOT MET", f"{100 * frac:.1f}%: {detail}")


def targets(rep: dict) -> list:
    rows = rep["results"]
    linear, mean = CASE_NAMES["linear"], CASE_NAMES["linear_mean"]
    if rep.get("device_kind") == "cuda":
        at = "GPU linear_logprobs N=16384 H=4096 V=128256 bf16"
        return [
            _token_bandwidth(rows, rep["ceilings"]),
            *(faster(rows, case, GPU_LINEAR, "bf16", peer, f"{at} {mode} faster than {name}",
                     cpu=False)
              for case, mode, peer, name in (
                  (mean, "mean (SFT)", "liger", "Liger FLCE"),
                  (linear, "per-token", "eager", "eager"),
                  (mean, "mean (SFT)", "eager", "eager"),
                  (linear, "per-token", "torch_chunked", "torch_chunked"),
                  (mean, "mean (SFT)", "torch_chunked", "torch_chunked"))),
            memory_at_most(rows, linear, GPU_LINEAR, "bf16", "eager",
                           f"{at} per-token peak extra memory <= 1/16 of eager", fraction=1 / 16),
        ]
    at = "CPU linear_logprobs N=8192 H=256 V=32000 fp32"
    out = [
        memory_at_most(rows, linear, CPU_LINEAR, "fp32", "eager",
                       f"{at} per-token fwd+bwd peak extra memory <= 1/16 of eager",
                       fraction=1 / 16),
        faster(rows, linear, CPU_LINEAR, "fp32", "eager",
               f"{at} per-token fwd+bwd no slower than eager", cpu=True, or_equal=True),
    ]
    for case, mode in ((linear, "per-token"), (mean, "mean (SFT)")):
        out.append(faster(rows, case, CPU_LINEAR, "fp32", "torch_chunked",
                          f"{at} {mode} fwd+bwd faster than torch_chunked", cpu=True))
        out.append(memory_at_most(rows, case, CPU_LINEAR, "fp32", "torch_chunked",
                                  f"{at} {mode} fwd+bwd peak extra memory <= torch_chunked's"))
    return out


if __name__ == "__main__":
    sys.exit(suite.bench_main(sys.modules[__name__]))
