"""Backend selection: one op, several implementations, one contract.

Every public op has a torch reference and may have a Triton and a native (C++ CPU /
CUDA, ``kernelrl._native``) implementation. The implementation is chosen per call, from
the device and dtype of the op's tensors, in this order (the first that applies wins):

1. Forced. ``with backend.force(name):`` (this thread), else ``KERNELRL_BACKEND=native|
   triton|torch``. A forced backend that cannot run raises :class:`BackendError` saying
   why; it never falls back silently. (An op with no implementation of that backend at
   all, such as the plain-torch ``dpo_loss``, runs its torch one: forcing picks among an
   op's kernels.) With ``TRITON_INTERPRET=1`` a forced ``triton``
   runs on CPU tensors (the tests use this).
2. Tuned on this machine. ``kernelrl tune`` checks every implementation against a
   float64 run, times those that pass, and writes the fastest per (op, device model,
   dtype) to ``tuned-<kernelrl version>.json`` in the cache folder:
   ``$KERNELRL_CACHE_DIR``, else ``$XDG_CACHE_HOME/kernelrl``, else ``~/.cache/kernelrl``.
   The file is read once per process (after :func:`reload_tuned`, again). An entry is
   used when its choice can run here; the backends it rejected are never picked by the
   steps below either.
3. Built-in table. ``kernelrl._dispatch_table.TABLE``, shipped with the package, holds
   entries of the same form keyed by GPU model name (``torch.cuda.get_device_name``). It
   is seeded from a ``kernelrl tune --device cuda --out FILE`` run on that GPU with
   ``kernelrl tune --seed-builtin FILE`` (see :mod:`kernelrl.tune`).
4. Default order, with skip rules:

       tensors on   order tried
       ----------   ---------------------------------------------------------
       cuda         native (CUDA, where the op has it), triton, torch
       cpu          native (the C++ twin, where the op has it), torch
       other        torch

   An implementation that its benchmark shows slower than the next one in the table is
   skipped by default for that device; the reason is recorded with the op
   (:func:`register_op`) and shown by ``kernelrl info``.

A backend is "available" when the op has it for that dtype and it can run on the device
(:func:`availability`). The native module is not built when the package was installed
with ``KERNELRL_BUILD_NATIVE=0`` (recorded in ``kernelrl._build_config``); it is then
never imported, even if a stale build lies beside the sources.

Nothing here runs at import: the native module, the tuned file and the device names are
loaded on first use. This module imports no other part of kernelrl at import time (only
the leaf modules ``_version``, ``_build_config``, ``_dispatch_table`` and ``_native``,
when first needed), so every op module can import it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import platform
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

BACKENDS = ("native", "triton", "torch")
_ORDER = {"cuda": ("native", "triton", "torch"), "cpu": ("native", "torch")}


class BackendError(RuntimeError):
    """A backend was forced (or called) that cannot run here; the message says why."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the key used in the tuned and built-in tables)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of an op: the dtypes it accepts and its callables.

    ``kernels`` is whatever the op's own code calls for this backend (for the log-prob
    family a :class:`kernelrl.ops.logprobs.RowKernels`); the dispatcher never looks inside.
    The torch implementation accepts every floating dtype it lists.
    """

    dtypes: tuple[torch.dtype, ...]
    kernels: Any = None


@dataclass(frozen=True)
class OpSpec:
    """An op's implementations, default-path skips and (for ``kernelrl tune``) examples.

    impls:    backend -> :class:`Implementation` (dtypes and callables, declared together).
    skip:     (backend, device_type) -> why dispatch passes it over unless forced or tuned.
              Dispatch remembers its choices: a change made to it after registration
              takes effect at the next :func:`reload_tuned`.
    examples: ``examples(device, dtype) -> [(label, args, kwargs), ...]``: a few
              representative inputs for the public op ``fn`` (tensors that should get
              gradients have requires_grad set); ``kernelrl tune`` checks and times them.
    fn:       the public op, called by ``kernelrl tune`` with each example.
    """

    name: str
    impls: dict[str, Implementation]
    skip: dict[tuple[str, str], str] = field(default_factory=dict)
    examples: Callable | None = None
    fn: Callable | None = None

    @property
    def dtypes(self) -> dict[str, tuple[torch.dtype, ...]]:
        return {backend: impl.dtypes for backend, impl in self.impls.items()}

    def kernels(self, backend: str):
        """The callables ``backend`` registered for this op."""
        return self.impls[backend].kernels


_OPS: dict[str, OpSpec] = {}


def register_op(name: str, impls: dict[str, Implementation], *,
                skip: dict[tuple[str, str], str] | None = None,
                examples: Callable | None = None, fn: Callable | None = None) -> OpSpec:
    """Declare an op's implementations. Called once by each op module at import."""
    unknown = set(impls) - set(BACKENDS)
    if unknown or "torch" not in impls:
        raise ValueError(f"register_op({name!r}): impls must include 'torch' and be among "
                         f"{BACKENDS}, got {sorted(impls)}")
    for backend, impl in impls.items():
        if not isinstance(impl, Implementation):
            raise ValueError(f"register_op({name!r}): impls[{backend!r}] must be an "
                             f"Implementation, got {type(impl).__name__}")
    spec = OpSpec(name, dict(impls), dict(skip or {}), examples, fn)
    _OPS[name] = spec
    with _tuned_lock:
        _forget_choices()
    return spec


NOT_YET_MEASURED = ("no benchmark on this device yet shows it at least as fast as the next "
                    "path (run `kernelrl tune --device cuda`); KERNELRL_BACKEND forces it")


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


def _build_config():
    """``kernelrl._build_config`` (written at install: BUILD_NATIVE, BUILD_CUDA), or None
    in a checkout that was never installed."""
    try:
        return importlib.import_module("kernelrl._build_config")
    except Exception:  # missing, or unreadable: treat as "no record of the build"
        return None


def _off(value) -> bool:
    return str(value).strip().lower() in ("0", "off", "false", "no", "")


NOT_BUILT = "not built (by choice, KERNELRL_BUILD_NATIVE=0)"


@functools.lru_cache(maxsize=None)
def _native_status() -> tuple[object | None, str]:
    config = _build_config()
    if config is not None and getattr(config, "BUILD_NATIVE", True) is False:
        return None, NOT_BUILT
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


def _no_cuda_kernels_reason() -> str:
    config = _build_config()
    if config is not None and _off(getattr(config, "BUILD_CUDA", "auto")):
        return "kernelrl._native was built without CUDA (by choice, KERNELRL_BUILD_CUDA=0)"
    return "kernelrl._native was built without CUDA (nvcc was not found at install)"


def availability(backend: str, device: torch.device, dtype: torch.dtype,
                 spec: OpSpec) -> tuple[bool, str]:
    """Whether ``backend`` can run ``spec`` on ``device`` with ``dtype``, and why not."""
    if backend not in spec.dtypes:
        return False, f"{spec.name} has no {backend} implementation"
    if backend != "torch" and dtype not in spec.dtypes[backend]:
        names = ", ".join(dtype_name(d) for d in spec.dtypes[backend])
        return False, f"{backend} {spec.name} takes {names}, not {dtype_name(dtype)}"
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
            return False, _no_cuda_kernels_reason()
        if module.cuda_device_count() == 0:
            return False, "kernelrl._native has CUDA kernels but sees no CUDA device"
        return True, why + " (CUDA kernels)"
    return False, f"no native kernels for {device.type} tensors"


# ---------------------------------------------------------------------------------------
# device names, the tuned file and the built-in table
# ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """A stable name for this machine's CPU model (the tuned file's key for CPU entries)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
                    value = " ".join(value.split())
                    if value:
                        return value
    except OSError:
        pass
    return " ".join((platform.processor() or platform.machine() or "unknown cpu").split())


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str:
    """The model name that keys tuned and built-in entries: the GPU's name for CUDA
    (``torch.cuda.get_device_name``), :func:`cpu_model` for CPU, else the device type."""
    if device.type == "cuda":
        return _cuda_name(torch.cuda.current_device() if device.index is None else device.index)
    if device.type == "cpu":
        return cpu_model()
    return device.type


def cache_dir() -> Path:
    """``$KERNELRL_CACHE_DIR``, else ``$XDG_CACHE_HOME/kernelrl``, else ``~/.cache/kernelrl``."""
    explicit = os.environ.get("KERNELRL_CACHE_DIR", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if xdg:
        return Path(xdg).expanduser() / "kernelrl"
    try:
        return Path.home() / ".cache" / "kernelrl"
    except RuntimeError:  # no home directory known: a per-machine temporary folder
        return Path(tempfile.gettempdir()) / "kernelrl-cache"


def tuned_path() -> Path:
    """Where ``kernelrl tune`` writes, and dispatch reads, this version's tuned choices."""
    from kernelrl._version import __version__  # a leaf module: no import circle

    return cache_dir() / f"tuned-{__version__}.json"


@dataclass(frozen=True)
class TunedFile:
    """The tuned file as read: ``entries[op][device name][dtype name] -> entry``."""

    path: Path
    entries: dict
    problem: str | None = None   # why it could not be used (None: read, or absent)
    exists: bool = False


def read_tuned_file(path: Path) -> TunedFile:
    """Read a tuned file; a missing or unreadable one gives no entries (and says why)."""
    if not path.is_file():
        return TunedFile(path, {})
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        entries = document["entries"]
        if not isinstance(entries, dict):
            raise ValueError(f"'entries' must be an object, got {type(entries).__name__}")
    except Exception as exc:
        return TunedFile(path, {}, f"unreadable ({type(exc).__name__}: {exc}); "
                                   "run `kernelrl tune` again to rewrite it", exists=True)
    return TunedFile(path, entries, exists=True)


_tuned_lock = threading.Lock()
_tuned_cache: list[TunedFile] = []


def tuned_file() -> TunedFile:
    """This process's copy of the tuned file (read on first use; :func:`reload_tuned`)."""
    if not _tuned_cache:
        with _tuned_lock:
            if not _tuned_cache:
                _tuned_cache.append(read_tuned_file(tuned_path()))
    return _tuned_cache[0]


def reload_tuned() -> None:
    """Forget the tuned file (and built-in table) read so far: the next dispatch reads
    them again (from the cache folder the environment names then)."""
    with _tuned_lock:
        _tuned_cache.clear()
        builtin_table.cache_clear()
        _forget_choices()


@functools.lru_cache(maxsize=None)
def builtin_table() -> dict:
    """``kernelrl._dispatch_table.TABLE``: entries[op][GPU model name][dtype name]."""
    try:
        return importlib.import_module("kernelrl._dispatch_table").TABLE
    except Exception:  # the table is optional data: dispatch works without it
        return {}


def _lookup(entries: dict, op: str, device: torch.device, dtype: torch.dtype) -> dict | None:
    """The entry for (op, this device's model, dtype) whose choice names a backend, or None
    (also for a malformed file: dispatch never fails over the table)."""
    per_op = entries.get(op)
    if not per_op or not isinstance(per_op, dict):   # the common case: nothing for this op
        return None
    per_device = per_op.get(device_name(device))
    entry = per_device.get(dtype_name(dtype)) if isinstance(per_device, dict) else None
    return entry if isinstance(entry, dict) and entry.get("choice") in BACKENDS else None


# ---------------------------------------------------------------------------------------
# the choice
# ---------------------------------------------------------------------------------------

_forced_here = threading.local()
_UNSET = object()


@contextlib.contextmanager
def force(backend: str | None):
    """Force ``backend`` for calls made in this block (this thread), ahead of
    ``KERNELRL_BACKEND``; ``None`` means the default choice (tuned or built-in table),
    ignoring ``KERNELRL_BACKEND``.
    ``kernelrl tune``, the tests and the benchmarks use it to run one implementation."""
    if backend is not None and backend not in BACKENDS:
        raise BackendError(f"force: backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    previous = getattr(_forced_here, "value", _UNSET)
    _forced_here.value = backend
    try:
        yield
    finally:
        _forced_here.value = previous


def forced_now() -> str | None:
    """The backend forced for the current call (``force()`` or ``KERNELRL_BACKEND``), or
    None."""
    return _forced_now()[0]


def _forced_now() -> tuple[str | None, str]:
    """(backend, where it was forced) for the current call, or (None, "")."""
    value = getattr(_forced_here, "value", _UNSET)
    if value is not _UNSET:
        return value, "backend.force()"
    env = forced_backend()
    return env, ("KERNELRL_BACKEND" if env else "")


def select(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs ``op`` for tensors on ``device`` of ``dtype``.

    Under ``torch.compile`` the choice is made once, while tracing, and the compiled graph
    keeps it (the native and Triton paths are custom ops the graph calls).
    """
    if torch.compiler.is_compiling():
        return _select_traced(op, device.type, device.index, dtype)
    return _select(op, device, dtype)


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without its import of torch._dynamo (about
    a second, on every ``import kernelrl.ops``): its whole effect is this marker, which
    dynamo reads while tracing. tests/ops/test_logprobs_autograd.py compiles through
    select() with fullgraph=True, so a change in torch fails there, not silently."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _select_traced(op: str, device_type: str, index, dtype: torch.dtype) -> str:
    return _select(op, torch.device(device_type, index), dtype)


def _select(op: str, device: torch.device, dtype: torch.dtype) -> str:
    spec = _OPS[op]
    forced, where = _forced_now()
    if forced is not None and forced not in spec.impls:
        # The op has no such implementation at all (plain-torch ops such as dpo_loss):
        # forcing is about choosing among an op's kernels, so it runs its torch one.
        return "torch"
    if forced is not None:
        ok, why = availability(forced, device, dtype, spec)
        if not ok:
            raise BackendError(f"{where}={forced} cannot run {op} on "
                               f"{device.type} {dtype_name(dtype)}: {why}")
        return forced
    # The unforced choice is a pure function of this key until reload_tuned() or
    # register_op(): remembered, it costs a dict lookup instead of the table walk (a few µs
    # on every op call). The native module's status is part of the key, so that a rebuilt
    # or replaced status (tests do both) is seen.
    index = device.index
    if index is None and device.type == "cuda":
        index = torch.cuda.current_device()
    key = (op, device.type, index, dtype, triton_interpret(), _native_status())
    choice = _choices.get(key)
    if choice is None:
        generation = _choices_generation[0]
        choice = _default_choice(op, device.type, dtype, index)
        with _tuned_lock:      # not if a reload came in meanwhile: that choice may be stale
            if generation == _choices_generation[0]:
                _choices[key] = choice
    return choice


#: (op, device type, index, dtype, TRITON_INTERPRET, native status) -> unforced choice
_choices: dict = {}
_choices_generation = [0]      # bumped whenever _choices is cleared


def _forget_choices() -> None:
    """Clear the remembered choices (the caller holds _tuned_lock, or is registering)."""
    _choices.clear()
    _choices_generation[0] += 1


@dataclass(frozen=True)
class Decision:
    """An unforced choice and where it came from.

    source: ``"tuned"`` (the tuned file), ``"built-in"`` (the built-in table) or
    ``"default"`` (the default order and skip rules); ``entry`` is the table entry used
    (or, for "default", the tuned entry whose rejections were honoured, if any).
    """

    backend: str
    source: str
    entry: dict | None = None


def decide(op: str, device: torch.device, dtype: torch.dtype) -> Decision:
    """The backend ``op`` uses on ``device`` for ``dtype`` when nothing is forced."""
    spec = _OPS[op]
    tuned = _lookup(tuned_file().entries, op, device, dtype)
    if tuned and availability(tuned["choice"], device, dtype, spec)[0]:
        return Decision(tuned["choice"], "tuned", tuned)
    rejected = (tuned or {}).get("rejected")
    rejected = rejected if isinstance(rejected, dict) else {}   # failed the check here
    builtin = _lookup(builtin_table(), op, device, dtype)
    if (builtin and builtin["choice"] not in rejected
            and availability(builtin["choice"], device, dtype, spec)[0]):
        return Decision(builtin["choice"], "built-in", builtin)
    for backend in _ORDER.get(device.type, ("torch",)):
        if (backend, device.type) in spec.skip or backend in rejected:
            continue
        if availability(backend, device, dtype, spec)[0]:
            return Decision(backend, "default", tuned)
    return Decision("torch", "default", tuned)


def _default_choice(op: str, device_type: str, dtype: torch.dtype, index=None) -> str:
    return decide(op, torch.device(device_type, index), dtype).backend
