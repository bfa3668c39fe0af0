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
      impls: kernelrl.ops.linear_logprobs (reduction="none") | eager | compile.
      (Liger's fused linear cross-entropy only gives a mean/sum loss: see the next case.)

  "linear_logprobs fwd+bwd mean (SFT)"
      loss = mean token cross-entropy over non-ignored tokens, backward from the scalar.
      impls: kernelrl (-linear_logprobs(..., reduction="mean")) | eager
             (F.cross_entropy(hidden @ weight.T, labels)) | compile | liger
             (liger_fused_linear_cross_entropy, reduction="mean"; CUDA only).

  For both linear cases: flops = 6·N·H·V (forward matmul + the two backward matmuls);
  the count excludes any recompute an implementation does, so it is a useful-work rate.

Inputs: logits ~ 2·randn; hidden ~ randn, weight ~ randn·2/sqrt(H) (logits of std 2);
labels uniform in [0, V) with ~10% set to -100.

Before timing, every implementation is run once on the first input set and compared with
eager (log-probs max abs diff on non-ignored tokens, gradients by relative norm); a
mismatch is reported as an error row and that implementation is not timed.

Targets (printed MET / NOT MET with the numbers; never asserted):
  GPU  token_logprobs fwd+bwd, N=16384 V=128256 bf16: >= 80% of the measured copy GB/s.
  GPU  linear_logprobs N=16384 H=4096 V=128256 bf16: faster than Liger FLCE and than eager;
       peak extra memory <= 1/16 of eager's.
  CPU  linear_logprobs N=8192 H=256 V=32000 fp32 fwd+bwd: peak extra memory <= 1/16 of
       eager's, and time no slower than eager.

Usage:
  python benchmarks/bench_logprobs.py --device cpu --out cpu.json
  python benchmarks/bench_logprobs.py --device cuda --out gpu.json
  python benchmarks/bench_logprobs.py --quick --device cpu --impls kernelrl,eager
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import report  # noqa: E402

BENCH = "logprobs"
IGNORE_INDEX = -100

CASE_NAMES = {
    "token": "token_logprobs fwd+bwd",
    "linear": "linear_logprobs fwd+bwd per-token",
    "linear_mean": "linear_logprobs fwd+bwd mean (SFT)",
}

# The target shapes.
GPU_TOKEN = {"N": 16384, "V": 128256}
GPU_LINEAR = {"N": 16384, "H": 4096, "V": 128256}
CPU_LINEAR = {"N": 8192, "H": 256, "V": 32000}
CPU_TOKEN = {"N": 2048, "V": 32000}


def plan(device: str, quick: bool) -> list:
    """[(case_id, shape, dtype)] to run on this device."""
    cuda = common.is_cuda(device)
    if quick:
        token, linear = {"N": 96, "V": 1000}, {"N": 128, "H": 32, "V": 1000}
        dtypes = ["fp32", "bf16"] if cuda else ["fp32"]
        return ([("token", token, d) for d in dtypes]
                + [("linear", linear, "fp32"), ("linear_mean", linear, "fp32")])
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
    import torch
    ignored = labels == IGNORE_INDEX
    logp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(ignored, 0.0)


def eager_linear_logprobs(hidden, weight, labels):
    return eager_token_logprobs(hidden @ weight.T, labels)


def eager_linear_ce_mean(hidden, weight, labels):
    import torch.nn.functional as F
    return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=IGNORE_INDEX)


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


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


def _compiled(fn):
    import torch
    import torch._dynamo
    torch._dynamo.reset()  # a fresh cache per case, so the recompile limit is never hit
    return torch.compile(fn, dynamic=False)


def _import_kernelrl():
    import kernelrl.ops  # noqa: F401
    return kernelrl.ops


def _forced(op, backend):
    """``op`` run with KERNELRL_BACKEND=backend (None: the default dispatch).

    The backend is chosen when the forward runs and kept for its backward, so setting the
    variable around the forward call is enough."""
    if backend is None:
        return op

    def call(*args, **kwargs):
        old = os.environ.get("KERNELRL_BACKEND")
        os.environ["KERNELRL_BACKEND"] = backend
        try:
            return op(*args, **kwargs)
        finally:
            if old is None:
                os.environ.pop("KERNELRL_BACKEND", None)
            else:
                os.environ["KERNELRL_BACKEND"] = old

    return call


def _kernelrl_impls(op_name: str, device: str, dtype, wrap) -> dict:
    """kernelrl under its default dispatch, plus one row per backend forced, so that the
    dispatch table (which backend is the default per device) rests on these numbers.
    ``wrap(backend)`` builds the run function with that backend forced."""
    from kernelrl import backend as kb

    import torch

    impls = {"kernelrl": common.Impl(lambda: wrap(None))}
    names = ("native", "triton", "torch") if common.is_cuda(device) else ("native", "torch")
    spec = kb.registered_ops()[op_name]
    for name in names:
        ok, why = kb.availability(name, torch.device(device), dtype, spec)
        impls[f"kernelrl[{name}]"] = common.Impl(lambda name=name: wrap(name),
                                                 skip=None if ok else why)
    return impls


def _liger_functional():
    if not _liger_installed():
        raise RuntimeError("liger_kernel is not installed")
    import liger_kernel.transformers.functional as LF
    return LF


def _liger_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("liger_kernel") is not None


def _liger_skip(device: str):
    if not common.is_cuda(device):
        return "Liger-Kernel runs on CUDA only"
    if not _liger_installed():
        return "liger_kernel not installed (pip install liger-kernel to compare)"
    return None


def _liger_token_op():
    """Liger's cross-entropy with reduction="none" as a log-prob op (logp = -loss)."""
    liger_cross_entropy = _liger_functional().liger_cross_entropy

    def op(logits, labels):
        loss = _first(liger_cross_entropy(logits, labels, ignore_index=IGNORE_INDEX,
                                          reduction="none"))
        return -loss.float()

    return op


def _liger_flce_mean():
    """Liger's fused linear cross-entropy, mean over non-ignored tokens."""
    LF = _liger_functional()
    if hasattr(LF, "liger_fused_linear_cross_entropy"):
        flce = LF.liger_fused_linear_cross_entropy
        return lambda h, w, y: _first(flce(h, w, y, ignore_index=IGNORE_INDEX, reduction="mean"))
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")
    return lambda h, w, y: _first(module(w, h, y))


# ----------------------------------------------------------------------------------------
# Checks against eager
# ----------------------------------------------------------------------------------------
def _make_check(mask_from, atol: float, rtol: float, grad_tol: float):
    """(ref, out) -> None or a message. out[0] compared on the tokens ``mask_from(ref[0])``
    selects: |out - ref| <= atol + rtol·|ref| (rtol allows a peer that returns bf16 losses);
    gradients by relative norm ||g - g_ref|| / ||g_ref|| <= grad_tol. Loose on purpose: it
    catches a broken op, not last-bit differences."""
    import torch

    def check(ref, out):
        if len(out) != len(ref):
            return f"returned {len(out)} tensors, expected {len(ref)}"
        a, b = out[0].float(), ref[0].float()
        if a.shape != b.shape:
            return f"output shape {tuple(a.shape)} != {tuple(b.shape)}"
        m = mask_from(b)
        if not torch.isfinite(a[m]).all():
            return "non-finite output"
        if m.any():
            err = (a[m] - b[m]).abs()
            excess = (err - (atol + rtol * b[m].abs())).max().item()
            if not excess <= 0:
                return (f"output max abs diff {err.max().item():.3g} exceeds "
                        f"{atol:g} + {rtol:g}*|ref|")
        for i, (g, gr) in enumerate(zip(out[1:], ref[1:]), start=1):
            g, gr = g.float(), gr.float()
            if g.shape != gr.shape:
                return f"grad {i} shape {tuple(g.shape)} != {tuple(gr.shape)}"
            if not torch.isfinite(g).all():
                return f"grad {i} has non-finite values"
            rel = ((g - gr).norm() / gr.norm().clamp(min=1e-30)).item()
            if not rel <= grad_tol:
                return f"grad {i} relative norm error {rel:.3g} > {grad_tol:g}"
        return None

    return check


# ----------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------
def make_case(case_id: str, shape: dict, dtype: str, device: str) -> common.Case:
    import torch

    tdt = common.torch_dtype(dtype)
    low_precision = dtype in ("bf16", "fp16")
    N, V = int(shape["N"]), int(shape["V"])
    cuda = common.is_cuda(device)

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
            **_kernelrl_impls("token_logprobs", device, tdt, lambda b: _token_fwd_bwd(
                _forced(_import_kernelrl().token_logprobs, b))),
            "eager": common.Impl(lambda: _token_fwd_bwd(eager_token_logprobs)),
            "compile": common.Impl(lambda: _token_fwd_bwd(_compiled(eager_token_logprobs))),
            "liger": common.Impl(lambda: _token_fwd_bwd(_liger_token_op()), mutates_inputs=True,
                                 skip=_liger_skip(device)),
        }
        itemsize = torch.empty((), dtype=tdt).element_size()
        return common.Case(
            bench=BENCH, case_id=case_id, case=CASE_NAMES[case_id], shape={"N": N, "V": V},
            dtype=dtype, make_inputs=make_inputs, impls=impls, device=device,
            check=_make_check(lambda ref: ref != 0, 2e-2 if low_precision else 1e-3,
                              1e-2 if low_precision else 0.0, 5e-2 if low_precision else 1e-3),
            bytes_moved=3 * N * V * itemsize + 24 * N,
        )

    if case_id in ("linear", "linear_mean"):
        H = int(shape["H"])

        def make_inputs(seed):
            g = torch.Generator(device=device).manual_seed(2000 + seed)
            hidden = torch.randn(N, H, generator=g, device=device, dtype=tdt)
            weight = torch.randn(V, H, generator=g, device=device, dtype=tdt).mul_(2.0 / math.sqrt(H))
            labels, grad = labels_and_grad(g)
            return {"hidden": hidden.requires_grad_(), "weight": weight.requires_grad_(),
                    "labels": labels, "grad": grad}

        if case_id == "linear":
            def kernelrl_op(backend):
                linear_logprobs = _forced(_import_kernelrl().linear_logprobs, backend)
                return lambda h, w, y: linear_logprobs(h, w, y, ignore_index=IGNORE_INDEX)

            impls = {
                **_kernelrl_impls("linear_logprobs", device, tdt,
                                  lambda b: _linear_fwd_bwd(kernelrl_op(b))),
                "eager": common.Impl(lambda: _linear_fwd_bwd(eager_linear_logprobs)),
                "compile": common.Impl(lambda: _linear_fwd_bwd(_compiled(eager_linear_logprobs))),
            }
            check = _make_check(lambda ref: ref != 0, 0.25 if low_precision else 5e-2,
                                1e-2 if low_precision else 0.0, 5e-2 if low_precision else 1e-2)
        else:
            def kernelrl_loss(backend):
                linear_logprobs = _forced(_import_kernelrl().linear_logprobs, backend)
                return lambda h, w, y: -linear_logprobs(h, w, y, ignore_index=IGNORE_INDEX,
                                                        reduction="mean")

            impls = {
                **_kernelrl_impls("linear_logprobs", device, tdt,
                                  lambda b: _loss_fwd_bwd(kernelrl_loss(b))),
                "eager": common.Impl(lambda: _loss_fwd_bwd(eager_linear_ce_mean)),
                "compile": common.Impl(lambda: _loss_fwd_bwd(_compiled(eager_linear_ce_mean))),
                "liger": common.Impl(lambda: _loss_fwd_bwd(_liger_flce_mean()),
                                     skip=_liger_skip(device)),
            }
            check = _make_check(lambda ref: torch.ones_like(ref, dtype=torch.bool),
                                5e-2 if low_precision else 1e-3, 1e-2 if low_precision else 0.0,
                                5e-2 if low_precision else 1e-2)
        return common.Case(
            bench=BENCH, case_id=case_id, case=CASE_NAMES[case_id],
            shape={"N": N, "H": H, "V": V}, dtype=dtype, make_inputs=make_inputs,
            impls=impls, device=device, check=check, flops=6 * N * H * V,
        )

    raise ValueError(f"case_id: expected one of {sorted(CASE_NAMES)}, got {case_id!r}")


# ----------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------
def _t(target: str, status: str, detail: str) -> dict:
    return {"target": target, "status": status, "detail": detail}


def _ms(r):
    return r.get("median_ms") if r and r.get("status") == "ok" else None


def _mib(b):
    return f"{b / 2**20:.1f} MiB"


def _why_missing(r, name):
    if r is None:
        return f"{name} not run at this shape"
    if r.get("status") == "skipped":
        return f"{name} skipped: {r.get('note')}"
    if r.get("status") == "error":
        return f"{name} error: {r.get('error')}"
    return f"{name} has no measurement"


def _faster(rows, case, shape, dtype, peer, label):
    k = report.find_row(rows, case, "kernelrl", shape, dtype)
    p = report.find_row(rows, case, peer, shape, dtype)
    if _ms(k) is None or _ms(p) is None:
        missing = k if _ms(k) is None else p
        return _t(label, "NOT CHECKED", _why_missing(missing, "kernelrl" if missing is k else peer))
    ok = _ms(k) < _ms(p)
    return _t(label, "MET" if ok else "NOT MET",
              f"kernelrl {_ms(k):.3f} ms vs {peer} {_ms(p):.3f} ms ({_ms(p) / _ms(k):.2f}x)")


def _memory(rows, case, shape, dtype, label):
    k = report.find_row(rows, case, "kernelrl", shape, dtype)
    e = report.find_row(rows, case, "eager", shape, dtype)
    km = k.get("peak_mem_bytes") if k and k.get("status") == "ok" else None
    em = e.get("peak_mem_bytes") if e and e.get("status") == "ok" else None
    if km is None or em is None:
        missing = k if km is None else e
        name = "kernelrl" if missing is k else "eager"
        why = _why_missing(missing, name) if (missing is None or missing.get("status") != "ok") \
            else f"{name} peak memory not measured ({missing.get('mem_error', 'memory measurement off')})"
        return _t(label, "NOT CHECKED", why)
    ok = km * 16 <= em
    ratio = f"1/{em / km:.1f}" if km else "0"
    samples = (k.get("mem_detail") or {}).get("samples_extra_bytes")
    spread = (f"; kernelrl samples {', '.join(f'{b / 2**20:.0f}' for b in samples)} MiB"
              if samples and len(samples) > 1 else "")
    return _t(label, "MET" if ok else "NOT MET",
              f"kernelrl {_mib(km)} vs eager {_mib(em)} extra ({ratio} of eager; target "
              f"<= 1/16){spread}")


def targets(rep: dict) -> list:
    rows = rep["results"]
    cuda = rep.get("device_kind") == "cuda"
    out = []
    if cuda:
        label = "GPU token_logprobs fwd+bwd N=16384 V=128256 bf16 >= 80% of copy bandwidth"
        k = report.find_row(rows, CASE_NAMES["token"], "kernelrl", GPU_TOKEN, "bf16")
        copy = rep["ceilings"].get("copy_gbps")
        if _ms(k) is None or not copy:
            out.append(_t(label, "NOT CHECKED",
                          _why_missing(k, "kernelrl") if _ms(k) is None else "no copy ceiling"))
        else:
            frac = k["gbps"] / copy
            out.append(_t(label, "MET" if frac >= 0.8 else "NOT MET",
                          f"{k['gbps']:.0f} GB/s for 3*N*V*2 bytes = {100 * frac:.1f}% of "
                          f"measured copy {copy:.0f} GB/s ({k['median_ms']:.3f} ms)"))
        out.append(_faster(rows, CASE_NAMES["linear_mean"], GPU_LINEAR, "bf16", "liger",
                           "GPU linear_logprobs N=16384 H=4096 V=128256 bf16 mean (SFT) faster than Liger FLCE"))
        out.append(_faster(rows, CASE_NAMES["linear"], GPU_LINEAR, "bf16", "eager",
                           "GPU linear_logprobs N=16384 H=4096 V=128256 bf16 per-token faster than eager"))
        out.append(_faster(rows, CASE_NAMES["linear_mean"], GPU_LINEAR, "bf16", "eager",
                           "GPU linear_logprobs N=16384 H=4096 V=128256 bf16 mean (SFT) faster than eager"))
        out.append(_memory(rows, CASE_NAMES["linear"], GPU_LINEAR, "bf16",
                           "GPU linear_logprobs N=16384 H=4096 V=128256 bf16 per-token peak extra memory <= 1/16 of eager"))
    else:
        out.append(_memory(rows, CASE_NAMES["linear"], CPU_LINEAR, "fp32",
                           "CPU linear_logprobs N=8192 H=256 V=32000 fp32 per-token fwd+bwd peak extra memory <= 1/16 of eager"))
        k = report.find_row(rows, CASE_NAMES["linear"], "kernelrl", CPU_LINEAR, "fp32")
        e = report.find_row(rows, CASE_NAMES["linear"], "eager", CPU_LINEAR, "fp32")
        label = "CPU linear_logprobs N=8192 H=256 V=32000 fp32 per-token fwd+bwd no slower than eager"
        if _ms(k) is None or _ms(e) is None:
            missing = k if _ms(k) is None else e
            out.append(_t(label, "NOT CHECKED",
                          _why_missing(missing, "kernelrl" if missing is k else "eager")))
        else:
            ok = _ms(k) <= _ms(e)
            out.append(_t(label, "MET" if ok else "NOT MET",
                          f"kernelrl {_ms(k):.1f} ms vs eager {_ms(e):.1f} ms "
                          f"({_ms(e) / _ms(k):.2f}x; median of CPU runs)"))
    return out


if __name__ == "__main__":
    sys.exit(common.main(bench=BENCH, plan=plan, make_case=make_case, targets=targets,
                         script=os.path.abspath(__file__), description=__doc__.split("\n")[0]))
