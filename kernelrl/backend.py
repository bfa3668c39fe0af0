"""Backend selection: one op, several implementations, one contract.

Every public op has a torch reference and may have a Triton and a native (C++ CPU /
CUDA, ``kernelrl._native``) implementation. The implementation is chosen per call, from
the device of the op's tensors:

    tensors on   order tried
    ----------   ---------------------------------------------------------
    cuda         native (CUDA, where the op has it), triton, torch
    cpu          native (the C++ twin, where the op has it), torch
    other        torch

Rules:
- ``KERNELRL_BACKEND=native|triton|torch`` forces one choice. A forced backend that
  cannot run raises :class:`BackendError` saying why; it never falls back silently.
- With ``TRITON_INTERPRET=1`` a forced ``triton`` runs on CPU tensors (the tests use this).
- An implementation that its benchmark shows slower than the next one in the table is
  skipped by default for that device; the reason is recorded with the op
  (:func:`register_op`) and shown by :func:`info` and ``kernelrl info``.
- Nothing here runs at import: the native module is loaded, and its failure recorded,
  on first use.
"""

from __future__ import annotations

import functools
import importlib
import os
import platform
from dataclasses import dataclass, field

import torch

BACKENDS = ("native", "triton", "torch")
_ORDER = {"cuda": ("native", "triton", "torch"), "cpu": ("native", "torch")}


class BackendError(RuntimeError):
    """A backend was forced (or called) that cannot run here; the message says why."""


@dataclass(frozen=True)
class OpSpec:
    """What implementations an op has, the dtypes each accepts, and default-path skips.

    dtypes:  backend -> dtypes that implementation accepts (torch accepts all floating).
    skip:    (backend, device_type) -> why dispatch passes it over unless forced.
    """

    name: str
    dtypes: dict[str, tuple[torch.dtype, ...]]
    skip: dict[tuple[str, str], str] = field(default_factory=dict)


_OPS: dict[str, OpSpec] = {}


def register_op(name: str, dtypes: dict[str, tuple[torch.dtype, ...]],
                skip: dict[tuple[str, str], str] | None = None) -> OpSpec:
    """Declare an op's implementations. Called once by each op module at import."""
    unknown = set(dtypes) - set(BACKENDS)
    if unknown or "torch" not in dtypes:
        raise ValueError(f"register_op({name!r}): backends must include 'torch' and be among "
                         f"{BACKENDS}, got {sorted(dtypes)}")
    spec = OpSpec(name, dict(dtypes), dict(skip or {}))
    _OPS[name] = spec
    return spec


NOT_YET_MEASURED = ("no benchmark on this device yet shows it at least as fast as the next "
                    "path (run benchmarks/gpu_check.sh); KERNELRL_BACKEND forces it")


def not_yet_measured(device_type: str, *backends: str) -> dict[tuple[str, str], str]:
    """Skip entries for implementations whose benchmark has not run on ``device_type``."""
    return {(backend, device_type): NOT_YET_MEASURED for backend in backends}


def registered_ops() -> dict[str, OpSpec]:
    return dict(_OPS)


# ---------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------

def forced_backend() -> str | None:
    """The backend named by ``KERNELRL_BACKEND``, or None. Read on every call."""
    value = os.environ.get("KERNELRL_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise BackendError(f"KERNELRL_BACKEND must be one of {', '.join(BACKENDS)}; "
                           f"got {value!r}")
    return value


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def debug_enabled() -> bool:
    """``KERNELRL_DEBUG=1`` turns on checks that cost a host sync (label ranges, ...)."""
    return os.environ.get("KERNELRL_DEBUG", "0") == "1"


@functools.lru_cache(maxsize=None)
def _native_status() -> tuple[object | None, str]:
    try:
        module = importlib.import_module("kernelrl._native")
    except Exception as exc:  # ImportError, or a broken .so raising OSError
        return None, (f"kernelrl._native could not be imported ({type(exc).__name__}: {exc}); "
                      "reinstall with `pip install -e .` (KERNELRL_BUILD_NATIVE=0 skips it)")
    return module, f"kernelrl._native {getattr(module, '__version__', '?')} loaded"


def native_module():
    """The native extension, or raise :class:`BackendError` saying why it is missing."""
    module, reason = _native_status()
    if module is None:
        raise BackendError(reason)
    return module


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, str]:
    try:
        import triton
    except Exception as exc:
        return False, f"triton could not be imported ({type(exc).__name__}: {exc})"
    return True, f"triton {triton.__version__}"


def availability(backend: str, device: torch.device, dtype: torch.dtype,
                 spec: OpSpec) -> tuple[bool, str]:
    """Whether ``backend`` can run ``spec`` on ``device`` with ``dtype``, and why not."""
    if backend not in spec.dtypes:
        return False, f"{spec.name} has no {backend} implementation"
    if backend != "torch" and dtype not in spec.dtypes[backend]:
        names = ", ".join(str(d).removeprefix("torch.") for d in spec.dtypes[backend])
        return False, f"{backend} {spec.name} takes {names}, not {str(dtype).removeprefix('torch.')}"
    if backend == "torch":
        return True, "torch reference"
    if backend == "triton":
        ok, why = _triton_status()
        if not ok:
            return False, why
        if device.type == "cuda":
            return True, why
        if device.type == "cpu" and triton_interpret():
            return True, why + " (interpreter, TRITON_INTERPRET=1)"
        return False, (f"triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU ones); "
                       f"got {device.type}")
    # native
    module, why = _native_status()
    if module is None:
        return False, why
    if device.type == "cpu":
        return True, why + " (C++ CPU kernels)"
    if device.type == "cuda":
        if not module.has_cuda():
            return False, "kernelrl._native was built without CUDA (nvcc was not found at install)"
        if module.cuda_device_count() == 0:
            return False, "kernelrl._native has CUDA kernels but sees no CUDA device"
        return True, why + " (CUDA kernels)"
    return False, f"no native kernels for {device.type} tensors"


def select(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs ``op`` for tensors on ``device`` of ``dtype``."""
    spec = _OPS[op]
    forced = forced_backend()
    if forced is not None:
        ok, why = availability(forced, device, dtype, spec)
        if not ok:
            raise BackendError(f"KERNELRL_BACKEND={forced} cannot run {op} on "
                               f"{device.type} {str(dtype).removeprefix('torch.')}: {why}")
        return forced
    for backend in _ORDER.get(device.type, ("torch",)):
        if (backend, device.type) in spec.skip:
            continue
        if availability(backend, device, dtype, spec)[0]:
            return backend
    return "torch"


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------

def _plan(spec: OpSpec, device: torch.device, gpu_present: bool) -> list[dict]:
    """For one op and device type: each backend in order, with its status and reason."""
    rows, chosen = [], None
    dtype = next((d for d in (torch.bfloat16, torch.float32) if all(
        d in spec.dtypes[b] for b in spec.dtypes if b != "torch")), torch.float32)
    for backend in _ORDER.get(device.type, ("torch",)):
        if backend not in spec.dtypes:
            continue
        if device.type == "cuda" and not gpu_present and backend != "native":
            ok, why = False, "no CUDA device"
        else:
            ok, why = availability(backend, device, dtype, spec)
        skipped = spec.skip.get((backend, device.type))
        if ok and skipped:
            status, why = "skipped", skipped
        elif ok and chosen is None:
            status = chosen = "chosen"
        else:
            status = "available" if ok else "unavailable"
            if skipped:
                why = f"{why}; and by default skipped: {skipped}"
        rows.append({"backend": backend, "status": status, "reason": why})
    return rows


def info() -> dict:
    """What this machine offers and which backend each op uses, with reasons.

    Returns a dict; ``kernelrl info`` prints it. Loads the native module (recording its
    error if it fails) but touches no GPU beyond asking torch whether one exists.
    """
    import kernelrl.ops  # noqa: F401  (registers every op)
    from kernelrl._version import __version__

    module, native_why = _native_status()
    triton_ok, triton_why = _triton_status()
    gpu = torch.cuda.is_available()
    report = {
        "kernelrl": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_why if triton_ok else f"unavailable: {triton_why}",
        "native": native_why,
        "native_cuda": bool(module is not None and module.has_cuda()),
        "gpu": torch.cuda.get_device_name(0) if gpu else None,
        "forced_backend": os.environ.get("KERNELRL_BACKEND") or None,
        "triton_interpret": triton_interpret(),
        "ops": {},
    }
    for name, spec in sorted(_OPS.items()):
        report["ops"][name] = {dev: _plan(spec, torch.device(dev), gpu) for dev in ("cpu", "cuda")}
    return report


def format_info(report: dict) -> str:
    lines = [f"kernelrl {report['kernelrl']}  (python {report['python']})",
             f"  torch   {report['torch']}",
             f"  triton  {report['triton']}",
             f"  native  {report['native']}; CUDA kernels: "
             f"{'built' if report['native_cuda'] else 'not built'}",
             f"  gpu     {report['gpu'] or 'none'}"]
    if report["forced_backend"]:
        lines.append(f"  KERNELRL_BACKEND={report['forced_backend']} (forced)")
    if report["triton_interpret"]:
        lines.append("  TRITON_INTERPRET=1 (Triton runs on CPU tensors when forced)")
    lines.append("ops (default choice per device; * marks the one used):")
    for name, per_device in report["ops"].items():
        lines.append(f"  {name}")
        for dev, rows in per_device.items():
            for row in rows:
                mark = "*" if row["status"] == "chosen" else " "
                lines.append(f"    {dev:<5}{mark} {row['backend']:<7} {row['status']:<12}"
                             f"{row['reason']}")
    return "\n".join(lines)
