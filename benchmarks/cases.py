"""What a benchmark case is, and the implementations every bench file draws from.

A ``bench_<family>.py`` describes each case as a :class:`Case` (inputs, one :class:`Impl`
per implementation, a correctness check, the bytes or flops it moves). The rows that are
the same in every family are built here, so a bench file holds only its cases and targets:

- :func:`kernelrl_impls`: "kernelrl" (the default dispatch) plus "kernelrl[<backend>]" for
  each backend that can run the op on this device and dtype, forced with
  ``kernelrl.backend.force`` (so the dispatch table rests on these numbers);
- :func:`compiled`: ``torch.compile`` of the eager reference;
- peers: Liger-Kernel (:func:`liger_skip`, :func:`liger_functional`) and torch's chunked
  ``F.linear_cross_entropy`` (:func:`torch_chunked_skip`, :func:`torch_linear_ce`);
- :func:`close_to_reference`: the check run once against eager before anything is timed.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

# kernelrl.backend.BACKENDS, spelled out so that the names are known (for --impls and the
# legend) even where kernelrl does not import.
BACKENDS = ("native", "triton", "torch")
KERNELRL_IMPLS = ("kernelrl",) + tuple(f"kernelrl[{b}]" for b in BACKENDS)

# Every implementation name a bench file may use, with its legend text (printed under the
# table for the names present, in this order).
LEGEND = {
    "kernelrl": "default dispatch",
    "kernelrl[native]/[triton]/[torch]": "that backend forced",
    "eager": "plain torch",
    "compile": "torch.compile of eager",
    "torch_chunked": "torch's F.linear_cross_entropy",
    "liger": "Liger-Kernel",
    "trl": "TRL's SFTTrainer / DPOTrainer step",
    # two families have a dense row (bench_nf4, bench_moe); the legend is one line per run
    "dense": "the dense bf16 ceiling (nf4: F.linear on the dequantized weight; moe: plain "
             "GEMMs of the routed work's FLOPs)",
    "floor": "autograd alone, no math (a lower bound; bench_ppo_loss)",
}


@dataclass
class Impl:
    """One implementation of a case. ``build()`` returns ``fn(inputs) -> tuple`` that runs
    the whole timed work (for example fwd+bwd) and returns tensors to check (the output
    first, then gradients). ``build`` may raise (not installed, compile unavailable).

    ``skip``: a reason to report instead of running, as a "skipped" row, or with
    ``row=False`` only in the report's ``not_run`` list (a kernelrl backend that cannot
    run here is not a result, while a missing peer is one users ask about)."""
    build: Callable[[], Callable[[dict], tuple]]
    mutates_inputs: bool = False  # e.g. Liger writes gradients into the logits in place
    skip: Optional[str] = None
    row: bool = True
    # The name of another implementation that runs the very same code (the default
    # dispatch picks that backend): timed again (two timings of one code show the noise),
    # but its CPU peak memory, a process per figure, is that one's and not measured twice.
    same_as: Optional[str] = None
    info: Optional[dict] = None   # extra keys for the JSON row, e.g. which backend ran
    # False for a diagnostic row that does not compute the case's result (a lower bound
    # such as bench_ppo_loss's "floor"): timed, never compared with the reference.
    checked: bool = True


@dataclass
class Case:
    bench: str
    case_id: str                  # short id, for --cases and the memory child
    case: str                     # display name, e.g. "token_logprobs fwd+bwd"
    shape: dict
    dtype: str                    # fp32 | bf16 | fp16
    make_inputs: Callable[[int], dict]  # seed -> one input set, on the device
    impls: dict                   # name -> Impl
    check: Optional[Callable[[tuple, tuple], Optional[str]]] = None  # (ref, out) -> error
    ref: str = "eager"
    bytes_moved: Optional[float] = None
    flops: Optional[float] = None
    device: str = "cpu"

    def spec(self, impl: str) -> dict:
        return {"case_id": self.case_id, "shape": self.shape, "dtype": self.dtype,
                "device": self.device, "impl": impl}

    def label(self) -> str:
        shape = ",".join(f"{k}={v}" for k, v in self.shape.items())
        return f"{self.case} [{shape}] {self.dtype}"


def short_error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return msg if len(msg) <= 300 else msg[:297] + "..."


def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def _raises(message: str) -> Callable:
    def build():
        raise RuntimeError(message)
    return build


# ----------------------------------------------------------------------------------------
# kernelrl rows
# ----------------------------------------------------------------------------------------
def _forced(fn: Callable[[dict], tuple], backend: Optional[str]) -> Callable[[dict], tuple]:
    """``fn`` with ``backend`` forced for the whole call, backward included (``None``: the
    default dispatch, whatever KERNELRL_BACKEND says, so the "kernelrl" row is what a user
    gets by default)."""
    from kernelrl.backend import force

    def run(x):
        with force(backend):
            return fn(x)

    return run


# Set by the memory child (:func:`building_only`) to the one implementation it measures.
_only: Optional[str] = None


@contextlib.contextmanager
def building_only(impl: str):
    """Cases made in this block need only ``impl``: a memory child measuring a peer then
    skips importing kernelrl (seconds per process: kernelrl.backend pulls in
    torch._dynamo), which changes nothing it measures (memory over the inputs)."""
    global _only
    previous, _only = _only, impl
    try:
        yield
    finally:
        _only = previous


def kernelrl_impls(op_name: str, device: str, dtype, build: Callable[[], Callable]) -> dict:
    """"kernelrl" plus one "kernelrl[<backend>]" per backend that can run ``op_name`` on
    ``device`` with torch dtype ``dtype``; ``build()`` returns the run function (it calls
    the public op; the backend is forced around it). A backend that cannot run here gets no
    row, only a ``not_run`` entry saying why; the Triton interpreter (TRITON_INTERPRET=1 on
    a CPU) counts as unavailable: it is a correctness tool, hundreds of times slower.
    Where kernelrl does not import, the "kernelrl" row is an error row saying why, and the
    other implementations of the case still run."""
    if _only is not None and _only not in KERNELRL_IMPLS:
        return {}
    try:
        import torch
        import kernelrl.ops  # noqa: F401  (registers the ops)
        from kernelrl import backend as kb
        spec = kb.registered_ops()[op_name]
    except Exception as e:
        return {"kernelrl": Impl(_raises(f"kernelrl unavailable: {short_error(e)}"))}
    choice, source = _default_dispatch(kb, op_name, torch.device(device), dtype)
    impls = {"kernelrl": Impl(lambda: _forced(build(), None),
                              info={"dispatch": choice, "dispatch_source": source})}
    for name in BACKENDS:
        ok, why = kb.availability(name, torch.device(device), dtype, spec)
        if ok and name == "triton" and not is_cuda(device):
            ok, why = False, "Triton interpreter on CPU tensors: a correctness tool, not timed"
        impls[f"kernelrl[{name}]"] = Impl(lambda name=name: _forced(build(), name),
                                          skip=None if ok else why, row=ok)
        if ok and name == choice:
            impls["kernelrl"].same_as = f"kernelrl[{name}]"
    return impls


def _default_dispatch(kb, op_name: str, device, dtype) -> tuple:
    """(backend, where the choice came from) that kernelrl picks here when nothing is
    forced; (None, why) if that cannot be told."""
    try:
        if hasattr(kb, "decide"):
            decision = kb.decide(op_name, device, dtype)
            return decision.backend, decision.source
        with kb.force(None):
            return kb.select(op_name, device, dtype), "default"
    except Exception as e:
        return None, short_error(e)


# ----------------------------------------------------------------------------------------
# torch.compile and peers
# ----------------------------------------------------------------------------------------
def compiled(fn: Callable) -> Callable:
    import torch
    import torch._dynamo
    torch._dynamo.reset()  # a fresh cache per case, so the recompile limit is never hit
    return torch.compile(fn, dynamic=False)


def first(x):
    """The loss of a peer that returns (loss, extras...) or just the loss."""
    return x[0] if isinstance(x, (tuple, list)) else x


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def liger_skip(device: str) -> Optional[str]:
    if not is_cuda(device):
        return "Liger-Kernel runs on CUDA only"
    if not _installed("liger_kernel"):
        return "liger_kernel not installed (pip install liger-kernel to compare)"
    return None


def liger_functional():
    if not _installed("liger_kernel"):
        raise RuntimeError("liger_kernel is not installed")
    import liger_kernel.transformers.functional as LF
    return LF


def torch_chunked_skip() -> Optional[str]:
    """Why torch's chunked linear cross-entropy cannot run here, or None."""
    import torch
    import torch.nn.functional as F
    if not (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
        return (f"torch {torch.__version__} has no F.linear_cross_entropy with "
                "LinearCrossEntropyOptions (its chunked path)")
    return None


def torch_linear_ce(reduction: str, ignore_index: int) -> Callable:
    """``(hidden, weight, labels) -> loss`` by torch's chunked path:
    ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())`` (default options:
    chunk size and accumulation picked per device and dtype by torch). It never holds the
    N x V logits. Raises where it would silently take the unchunked reference path."""
    import warnings

    import torch
    import torch.nn.functional as F

    why = torch_chunked_skip()
    if why:
        raise RuntimeError(why)
    options = torch.nn.LinearCrossEntropyOptions()

    def loss(hidden, weight, labels):
        with warnings.catch_warnings():
            # torch warns "options ignored" when it falls back to the reference path: that
            # would benchmark plain eager under this peer's name.
            warnings.filterwarnings("error", message=".*options.*ignored.*")
            return F.linear_cross_entropy(hidden, weight, labels, reduction=reduction,
                                          ignore_index=ignore_index, options=options)

    return loss


# ----------------------------------------------------------------------------------------
# The check against eager
# ----------------------------------------------------------------------------------------
def close_to_reference(mask_from, atol: float, rtol: float, grad_tol: float):
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
# --impls / --cases
# ----------------------------------------------------------------------------------------
class UsageError(ValueError):
    """A command-line choice that names nothing: the CLI exits 2 with this message."""


def parse_names(text: Optional[str]) -> Optional[list]:
    """'a, b,,c' -> ['a', 'b', 'c']; None or '' -> None (no filter)."""
    names = [s.strip() for s in (text or "").split(",") if s.strip()]
    return names or None


def check_names(option: str, names: Optional[list], valid) -> None:
    """Raise :class:`UsageError` naming the unknown entries and the valid choices."""
    unknown = [n for n in names or () if n not in valid]
    if unknown:
        raise UsageError(f"{option}: unknown {', '.join(map(repr, unknown))}; valid choices: "
                         f"{', '.join(sorted(valid))}")


def float64_mismatch(names, out, want, tol: float, max_err: float = 5.0) -> str | None:
    """None when every tensor of ``out`` is within ``tol`` of the float64 ``want`` by
    relative norm and no element is off by more than ``max_err``·tol of ``want``'s largest;
    else a message naming the first tensor that is not (or a count or shape mismatch)."""
    import torch

    if len(out) != len(want):
        return f"returned {len(out)} tensors, expected {len(want)}"
    for name, o, w in zip(names, out, want):
        if tuple(o.shape) != tuple(w.shape):
            return f"{name} shape {tuple(o.shape)} != {tuple(w.shape)}"
        o = o.to(w.device, torch.float64)
        w = w.to(torch.float64)
        if not torch.isfinite(o).all():
            return f"{name} has non-finite values"
        err = o - w
        rel = (err.norm() / w.norm().clamp(min=1e-300)).item()
        worst = (err.abs().max() / w.abs().max().clamp(min=1e-300)).item()
        if not (rel <= tol and worst <= max_err * tol):
            return (f"{name} off the float64 reference: relative norm error {rel:.3g} "
                    f"(<= {tol:g}), max error {worst:.3g} of the largest "
                    f"(<= {max_err * tol:g})")
    return None
