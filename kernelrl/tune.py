"""``kernelrl tune``: check and time every backend of every op here, keep the fastest.

For each registered op (or the ``--ops`` subset), each dtype its examples cover and each
backend that can run on the device, the public op runs forward and backward (a random
upstream gradient on every floating output) under ``backend.force``. Outputs and input
gradients are compared with a float64 run of the torch backend on the same inputs:

    relative error  e = ||x - x64|| / ||x64||    (per output and per gradient)
    bound           1e-5 (float32), 1e-2 (bfloat16, float16),
                    or 2 x the torch backend's own e in the same dtype if larger
    passes          e and ||x - x_torch|| / ||x_torch|| both within the bound

A backend that fails is never chosen (dispatch also skips it by default) and the summary
says why, with the numbers. Those that pass are timed, forward + backward, median of
``--reps`` runs after a warm-up (the check's own run on the same inputs), on CPU with
``time.perf_counter``, on CUDA with events; the backends take turns, so that drift hits
every one alike. The fastest per (op, device model, dtype) is written
to the tuned file (``backend.tuned_path()``); dispatch reads it on the next process start.

The built-in table (``kernelrl/_dispatch_table.py``) ships entries of the same form per
GPU model. To seed it from a GPU run (``benchmarks/gpu_check.sh`` runs the first line,
writing ``benchmarks/results/tune-<gpu>-<date>.json``):

    kernelrl tune --device cuda --out tuned-gpu.json     # on the GPU machine
    kernelrl tune --seed-builtin tuned-gpu.json          # in a checkout: merge its CUDA entries
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pprint
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from kernelrl import backend
from kernelrl._version import __version__
from kernelrl.info import format_ms

__all__ = ["tune", "resolve_ops", "check_backends", "write_tuned", "seed_builtin",
           "summary", "UsageError", "TOLERANCE", "TORCH_FACTOR"]

FORMAT = 1
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
TORCH_FACTOR = 2.0
DEFAULT_DTYPES = ("float32", "bfloat16")
#: Seconds of timing per (op, dtype), estimated from the checked run: examples past it
#: are checked but not timed (the first always is). Keeps a CPU run of every op short.
DEFAULT_BUDGET_S = 10.0


class UsageError(ValueError):
    """A command-line argument is wrong (the CLI exits 2 with this message)."""


# ---------------------------------------------------------------------------------------
# progress on stderr
# ---------------------------------------------------------------------------------------

class Progress:
    """A one-line bar on a terminal; plain lines, one per step, anywhere else."""

    def __init__(self, total: int, stream=None, width: int = 24):
        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()

    def show(self, message: str, advance: bool = False) -> None:
        self.done += int(advance)
        if self.tty:
            filled = self.width * self.done // self.total
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r\x1b[K[{bar}] {self.done}/{self.total} {message}")
        elif not advance:
            self.stream.write(f"tune [{self.done + 1}/{self.total}] {message}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write(f"\r\x1b[Kdone in {time.perf_counter() - self.start:.1f} s\n")
        else:
            self.stream.write(f"tune done in {time.perf_counter() - self.start:.1f} s\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------
# running one backend on one example
# ---------------------------------------------------------------------------------------

def _map_tensors(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _grad_inputs(args, kwargs) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every input that should get a gradient."""
    named = [(f"arg {i}", a) for i, a in enumerate(args)] + [(k, v) for k, v in kwargs.items()]
    return [(name, t) for name, t in named if isinstance(t, torch.Tensor) and t.requires_grad]


def _as_float64(value):
    def cast(t):
        if not t.is_floating_point():
            return t
        return t.detach().to(torch.float64).requires_grad_(t.requires_grad)
    return _map_tensors(value, cast)


def _upstream(outputs: tuple, seed: int = 0) -> list:
    """A random per-element upstream gradient for every floating output."""
    torch.manual_seed(seed)
    return [torch.randn(o.shape, dtype=o.dtype, device=o.device)
            if isinstance(o, torch.Tensor) and o.is_floating_point() else None for o in outputs]


def _as_tuple(outputs) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _fwd_bwd(fn: Callable, args, kwargs, name: str | None, upstream: list | None):
    """Outputs and input gradients of ``fn`` run under ``force(name)``.

    ``upstream`` None: make one (returned too). Returns (quantities, upstream), with
    quantities: label -> tensor (outputs, then gradients; a missing gradient is zeros).
    """
    with backend.force(name):
        outputs = _as_tuple(fn(*args, **kwargs))
        if upstream is None:
            upstream = _upstream(outputs)
        inputs = _grad_inputs(args, kwargs)
        pairs = [(o, g.to(o.dtype)) for o, g in zip(outputs, upstream)
                 if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
        grads = []
        if pairs and inputs:
            grads = torch.autograd.grad([o for o, _ in pairs], [t for _, t in inputs],
                                        [g for _, g in pairs], allow_unused=True)
    quantities = {f"output {i}": o.detach() for i, o in enumerate(outputs)
                  if isinstance(o, torch.Tensor) and o.is_floating_point()}
    for (label, tensor), grad in zip(inputs, grads):
        quantities[f"grad of {label}"] = torch.zeros_like(tensor) if grad is None else grad
    return quantities, upstream


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference|| in float64 (the plain norm when ref is 0)."""
    value = value.detach().to(torch.float64)
    reference = reference.detach().to(torch.float64)
    if value.shape != reference.shape:
        return math.inf
    if not bool(torch.isfinite(value).all()):
        return math.inf
    diff = float(torch.linalg.vector_norm(value - reference))
    scale = float(torch.linalg.vector_norm(reference))
    return diff / scale if scale > 0 else diff


def _compare(got: dict, ref64: dict, ref_torch: dict, tol: float, where: str) -> list[dict]:
    """One record per quantity: its errors, its bound, and how close it came (margin)."""
    records = []
    for q, ref in ref64.items():
        own = relative_error(ref_torch[q], ref)
        bound = max(tol, TORCH_FACTOR * own)
        vs_float64 = relative_error(got[q], ref) if q in got else math.inf
        vs_torch = relative_error(got[q], ref_torch[q]) if q in got else math.inf
        records.append({"worst": f"{q} ({where})", "vs_float64": vs_float64,
                        "vs_torch": vs_torch, "torch_vs_float64": own, "bound": bound,
                        "margin": max(vs_float64, vs_torch) / bound})
    return records


@dataclass
class Check:
    """What :func:`check_backends` found: per backend its errors; per example the upstream
    gradients and each backend's seconds for its checked run (forward + backward)."""

    errors: dict[str, dict]
    upstreams: list[list]
    seconds: list[dict[str, float]]


def _timed(device: torch.device, call: Callable):
    """(call(), seconds it took), waiting for the device on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def check_backends(spec, device: torch.device, dtype: torch.dtype, names: list[str],
                   examples: list) -> Check:
    """Errors of every backend in ``names`` against float64 and against torch.

    A quantity (an output or an input gradient) passes when its error against the float64
    run and its difference from the torch backend are both within its bound:
    ``max(TOLERANCE[dtype], TORCH_FACTOR x torch's own error against float64)``.

    ``errors[backend]`` holds {"passed", "worst", "vs_float64", "vs_torch",
    "torch_vs_float64", "bound"}: the numbers of the quantity that came closest to its
    bound over all examples ("worst" names it), or {"passed": False, "raised": message}
    for a backend that raised.
    """
    tol = TOLERANCE.get(dtype, 1e-2)
    worst: dict[str, dict] = {}
    upstreams, seconds = [], []
    for label, args, kwargs in examples:
        (ref_torch, upstream), took = _timed(
            device, lambda: _fwd_bwd(spec.fn, args, kwargs, "torch", None))
        upstreams.append(upstream)
        seconds.append({"torch": took})
        try:
            ref64, _ = _fwd_bwd(spec.fn, _as_float64(args), _as_float64(kwargs), "torch",
                                [None if g is None else g.to(torch.float64) for g in upstream])
        except Exception:  # no float64 path: torch's own result is the reference
            ref64 = ref_torch
        for name in names:
            if "raised" in worst.get(name, {}):
                continue
            got = ref_torch
            if name != "torch":
                try:
                    (got, _), seconds[-1][name] = _timed(
                        device, lambda: _fwd_bwd(spec.fn, args, kwargs, name, upstream))
                except Exception as exc:
                    worst[name] = {"passed": False,
                                   "raised": f"{label}: {type(exc).__name__}: {exc}"}
                    continue
            for record in _compare(got, ref64, ref_torch, tol, label):
                if name not in worst or record["margin"] > worst[name]["margin"]:
                    worst[name] = record
    errors = {}
    for name, record in worst.items():
        if "raised" not in record:
            record = {"passed": record.pop("margin") <= 1.0, **record}
        errors[name] = record
    return Check(errors, upstreams, seconds)


def examples_within(seconds: list[dict[str, float]], names: list[str], reps: int,
                    budget: float) -> list[int]:
    """The examples to time: in order, while ``reps`` runs of every backend in ``names``
    (estimated from the checked run) fit in ``budget`` seconds; always the first."""
    chosen, spent = [], 0.0
    for index, per_backend in enumerate(seconds):
        cost = reps * sum(per_backend.get(name, 0.0) for name in names)
        if chosen and spent + cost > budget:
            break
        chosen.append(index)
        spent += cost
    return chosen


def _timer(device: torch.device) -> Callable[[Callable], float]:
    if device.type == "cuda":
        def run(call):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end)
        return run

    def run_cpu(call):
        start = time.perf_counter()
        call()
        return (time.perf_counter() - start) * 1e3
    return run_cpu


def time_backends(spec, device: torch.device, names: list[str], examples: list,
                  upstreams: list, reps: int) -> dict[str, float]:
    """Median forward + backward ms per backend, summed over the examples. Run after
    :func:`check_backends` on the same inputs, whose run is the warm-up."""
    timer = _timer(device)
    total = dict.fromkeys(names, 0.0)
    for (_, args, kwargs), upstream in zip(examples, upstreams):
        calls = {name: (lambda name=name: _fwd_bwd(spec.fn, args, kwargs, name, upstream))
                 for name in names}
        if device.type == "cuda":          # the check's run on these inputs was the warm-up
            torch.cuda.synchronize(device)
        samples = {name: [] for name in names}
        for _ in range(reps):
            for name, call in calls.items():
                samples[name].append(timer(call))
        for name in names:
            total[name] += statistics.median(samples[name])
    return total


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected cpu, cuda or auto, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch sees no CUDA device on this machine")
    return torch.device(name)


def resolve_ops(names: list[str] | None) -> list:
    """The OpSpecs to tune: every registered op, or ``names`` (each must exist)."""
    import kernelrl.ops  # noqa: F401  (registers every op)

    specs = backend.registered_ops()
    if not names:
        return [specs[n] for n in sorted(specs)]
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise UsageError(f"--ops: unknown op {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(sorted(specs))}")
    return [specs[n] for n in names]


def resolve_dtypes(names: list[str] | None) -> list[torch.dtype]:
    out = []
    for name in names or DEFAULT_DTYPES:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype) or dtype not in TOLERANCE:
            raise UsageError(f"--dtypes: expected names among "
                             f"{', '.join(backend.dtype_name(d) for d in TOLERANCE)}, "
                             f"got {name!r}")
        out.append(dtype)
    return out


def _number(x: float, digits: int = 4):
    if not math.isfinite(x):
        return str(x)
    return float(f"{x:.{digits}g}")


def _clean(record: dict) -> dict:
    return {k: _number(v, 3) if isinstance(v, float) else v for k, v in record.items()}


def _rejection(record: dict) -> str:
    if "raised" in record:
        return f"raised {record['raised']}"
    return (f"{record['worst']}: error {record['vs_float64']:.2e} vs float64, "
            f"{record['vs_torch']:.2e} vs torch; bound {record['bound']:.1e} "
            f"(torch's own error {record['torch_vs_float64']:.2e})")


def tune_one(spec, device: torch.device, dtype: torch.dtype, reps: int = 5,
             budget: float = DEFAULT_BUDGET_S, progress: Progress | None = None) -> dict | None:
    """One (op, dtype) on ``device``: the tuned entry, or None if the examples skip it.

    Every example is checked; the timing runs on the examples that fit in ``budget``
    seconds (:func:`examples_within`), at least the first.
    """
    say = progress.show if progress else (lambda *a, **k: None)
    step = f"{spec.name} {backend.dtype_name(dtype)}"
    torch.manual_seed(0)
    examples = list(spec.examples(device, dtype) or [])
    if not examples:
        return None
    unavailable, names = {}, []
    for name in backend._ORDER.get(device.type, ("torch",)):
        if name not in spec.impls:
            continue
        ok, why = backend.availability(name, device, dtype, spec)
        if ok:
            names.append(name)
        else:
            unavailable[name] = why
    say(f"{step}: checking {', '.join(names)}")
    check = check_backends(spec, device, dtype, names, examples)
    passed = [n for n in names if check.errors[n]["passed"]]
    rejected = {n: _rejection(check.errors[n]) for n in names if n not in passed}
    if "torch" in rejected:
        raise RuntimeError(f"{step}: the torch backend itself failed: {rejected['torch']}")
    timed = examples_within(check.seconds, passed, reps, budget)
    say(f"{step}: timing {', '.join(passed)}")
    times = time_backends(spec, device, passed, [examples[i] for i in timed],
                          [check.upstreams[i] for i in timed], reps)
    return {
        "choice": min(passed, key=lambda n: times[n]),
        "date": datetime.date.today().isoformat(),
        "device_type": device.type,
        "median_ms": {n: _number(t) for n, t in times.items()},
        "errors": {n: _clean(r) for n, r in check.errors.items()},
        "rejected": rejected,
        "unavailable": unavailable,
        "examples": [label for label, _, _ in examples],
        "timed_examples": [examples[i][0] for i in timed],
        "reps": reps,
        "kernelrl": __version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
    }


def tune(device: str = "auto", ops: list[str] | None = None, dtypes: list[str] | None = None,
         reps: int = 5, budget: float = DEFAULT_BUDGET_S, stream=None) -> dict:
    """Tune ``ops`` on ``device``; returns {"device": model, "device_type", "entries":
    {op: {dtype: entry}}, "untuned": [ops with one implementation or no examples]}. Writes nothing (see
    :func:`write_tuned`)."""
    if reps < 1:
        raise UsageError(f"--reps: expected a positive count, got {reps}")
    if not budget > 0:
        raise UsageError(f"--budget: expected a positive number of seconds, got {budget}")
    dev = resolve_device(device)
    specs = resolve_ops(ops)
    dtype_list = resolve_dtypes(dtypes)
    # an op with only a torch implementation has nothing to choose: not timed
    runnable = [s for s in specs if s.examples is not None and s.fn is not None
                and len(s.impls) > 1]
    model = backend.device_name(dev)
    progress = Progress(len(runnable) * len(dtype_list), stream)
    entries: dict[str, dict] = {}
    for spec in runnable:
        for dtype in dtype_list:
            step = f"{spec.name} {backend.dtype_name(dtype)}"
            progress.show(step)
            entry = tune_one(spec, dev, dtype, reps, budget, progress)
            if entry is not None:
                entries.setdefault(spec.name, {})[backend.dtype_name(dtype)] = entry
            progress.show(step, advance=True)
    progress.close()
    return {"device": model, "device_type": dev.type, "entries": entries,
            "untuned": sorted(s.name for s in specs if s not in runnable)}


def write_tuned(result: dict, path: Path | None = None, also: Path | None = None) -> Path:
    """Merge ``result`` into the tuned file (other ops and devices are kept) and reload it."""
    path = Path(path) if path is not None else backend.tuned_path()
    current = backend.read_tuned_file(path)
    entries = current.entries if current.problem is None else {}
    for op, per_dtype in result["entries"].items():
        entries.setdefault(op, {}).setdefault(result["device"], {}).update(per_dtype)
    document = {"kernelrl": __version__, "format": FORMAT,
                "written": datetime.datetime.now().isoformat(timespec="seconds"),
                "entries": entries}
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    for target in [path] + ([Path(also)] if also is not None else []):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    backend.reload_tuned()
    return path


def summary(result: dict) -> str:
    """The table printed at the end of ``kernelrl tune``."""
    rows = [(op, dtype, entry) for op, per_dtype in result["entries"].items()
            for dtype, entry in per_dtype.items()]
    names = [b for b in backend.BACKENDS
             if any(b in e["errors"] or b in e["unavailable"] for _, _, e in rows)]
    header = ["op", "dtype", "choice"] + [f"{b} ms" for b in names] + ["check"]
    table = [header]
    for op, dtype, entry in rows:
        cells = [op, dtype, entry["choice"]]
        for b in names:
            if b in entry["median_ms"]:
                cells.append(format_ms(entry["median_ms"][b]).removesuffix(" ms"))
            elif b in entry["rejected"]:
                cells.append("FAILED")
            else:
                cells.append("n/a")
        checks = [f"{b} FAILED: {why}" for b, why in entry["rejected"].items()]
        passed = [f"{b} {r['vs_float64']:.1e}" for b, r in entry["errors"].items()
                  if r.get("passed")]
        cells.append("; ".join(checks + [f"passed, error vs float64: {', '.join(passed)}"]))
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    lines = [f"kernelrl tune on {result['device_type']} ({result['device']})"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in table]
    if not rows:
        lines.append("(nothing tuned)")
    for op in result.get("untuned", []):
        lines.append(f"{op}: not tuned (only a torch implementation, or no examples)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# the built-in table
# ---------------------------------------------------------------------------------------

def seed_builtin(results: Path, table: Path | None = None) -> int:
    """Merge the CUDA entries of a tuned file (``kernelrl tune --device cuda --out FILE``)
    into the built-in table ``kernelrl/_dispatch_table.py``; returns how many were merged."""
    import importlib

    results = Path(results)
    read = backend.read_tuned_file(results)
    if not read.exists or read.problem:
        raise UsageError(f"--seed-builtin: expected a file written by `kernelrl tune --out`, "
                         f"got {results} ({read.problem or 'no such file'})")
    module = importlib.import_module("kernelrl._dispatch_table")
    table_path = Path(table) if table is not None else Path(module.__file__)
    scope: dict = {}
    if table_path.is_file():
        exec(compile(table_path.read_text(encoding="utf-8"), str(table_path), "exec"), scope)
    merged = scope.get("TABLE", {})
    count = 0
    for op, per_device in read.entries.items():
        for device, per_dtype in per_device.items():
            for dtype, entry in per_dtype.items():
                if entry.get("device_type") == "cuda":
                    merged.setdefault(op, {}).setdefault(device, {})[dtype] = entry
                    count += 1
    text = (f'"""{module.__doc__}"""\n\nTABLE = '
            + pprint.pformat(merged, width=96, sort_dicts=True) + "\n")
    table_path.write_text(text, encoding="utf-8")
    if table_path.resolve() == Path(module.__file__).resolve():
        importlib.reload(module)    # the loaded table is this file: dispatch reads it anew
    backend.reload_tuned()
    return count
