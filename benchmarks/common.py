"""Shared benchmark driver: environment, timing, ceilings, cases and the run loop.

Each ``benchmarks/bench_<family>.py`` holds only its cases. It describes every case as a
:class:`Case` (inputs, one :class:`Impl` per implementation, a correctness check, the bytes
or flops it moves) and hands them to :func:`main`, which:

1. measures the ceilings in the same run (:func:`measure_ceilings`);
2. for each case builds the inputs, checks every implementation once against the
   reference ("eager") so a broken op is never timed silently, times each one, and
   measures its peak memory (``memory.py``);
3. prints a plain-text table, checks the family's targets (MET / NOT MET), and writes one
   JSON file in the schema of DESIGN.md "Benchmarks" (``report.py``).

Timing
    GPU: ``triton.testing.do_bench`` (CUDA events, median), the function cycling through
    several copies of the inputs so that L2 does not serve them.
    CPU: ``time.perf_counter``, median of ``reps`` (>= 5) runs after ``warmup`` (>= 1);
    the implementations of a case are timed round-robin, so outside load hits all alike.

Peak memory ("extra" bytes over the inputs)
    GPU: measured in this process after timing. CPU: measured in fresh subprocesses, this
    same bench script run with the hidden ``--_child SPEC`` flag (:func:`child_main`), the
    median of ``--mem-repeats`` of them reported. How each figure is taken: ``memory.py``.

Ceilings
    GPU: a large device-to-device copy (GB/s, bytes read + written) and an 8192^3 bf16
    matmul (TFLOP/s). CPU: a memcpy (GB/s) and an fp32 matmul; both are labelled as CPU
    figures everywhere they are printed, and the bf16 ceiling is null on CPU.

A failing implementation (torch.compile unavailable, OOM, a mismatch) becomes an error
row with its message; it never stops the run.

Also a small CLI:
    python benchmarks/common.py merge OUT.json IN1.json IN2.json ...
    python benchmarks/common.py gpu-slug          # e.g. nvidia-h100-80gb-hbm3
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import memory
import report

REPO = Path(__file__).resolve().parent.parent

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


# ----------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------
def progress(msg: str) -> None:
    """One line on stderr, so stdout stays the table (or the child's JSON)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def git_sha(repo: Path = REPO) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        sha = out.stdout.strip()
        return sha if out.returncode == 0 and sha else "unknown"
    except Exception:
        return "unknown"


def torch_dtype(name: str):
    import torch
    return getattr(torch, DTYPE_NAMES[name])


def resolve_device(device: Optional[str]) -> str:
    import torch
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    return device


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    import torch
    if is_cuda(device):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu: {_cpu_model()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def slugify(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def environment(device: str) -> dict:
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    try:
        import kernelrl
        kernelrl_version = getattr(kernelrl, "__version__", None)
    except Exception as e:  # the package may not import yet; the run goes on
        kernelrl_version = f"not importable: {type(e).__name__}: {e}"
    return {
        "device": device_name(device),
        "device_kind": "cuda" if is_cuda(device) else "cpu",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton_version,
        "kernelrl": git_sha(),
        "kernelrl_version": kernelrl_version,
        "kernelrl_backend_env": os.environ.get("KERNELRL_BACKEND", "auto"),
        "python": platform.python_version(),
    }


# ----------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------
def time_cpu(fn: Callable[[], Any], warmup: int = 1, reps: int = 5) -> dict:
    """Median wall time of ``reps`` calls after ``warmup`` calls (time.perf_counter)."""
    warmup, reps = max(1, int(warmup)), max(1, int(reps))
    for _ in range(warmup):
        out = fn()
        del out
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
        del out
    return {"median_ms": statistics.median(times), "times_ms": times}


def time_cpu_interleaved(calls: dict, warmup: int = 1, reps: int = 5) -> dict:
    """Like :func:`time_cpu` for several functions at once, timed round-robin (one call of
    each per round, the starting one rotating), so that a burst of load from elsewhere lands
    on all of them. Returns name -> result dict, or the exception that function raised."""
    warmup, reps = max(1, int(warmup)), max(1, int(reps))
    results: dict = {}
    times: dict = {n: [] for n in calls}
    alive = list(calls)
    for n in list(alive):
        try:
            for _ in range(warmup):
                out = calls[n]()
                del out
        except Exception as e:
            results[n] = e
            alive.remove(n)
    for r in range(reps):
        k = r % len(alive) if alive else 0
        for n in alive[k:] + alive[:k]:
            if n in results:
                continue
            try:
                t0 = time.perf_counter()
                out = calls[n]()
                times[n].append((time.perf_counter() - t0) * 1e3)
                del out
            except Exception as e:
                results[n] = e
    for n in alive:
        if n not in results:
            results[n] = {"median_ms": statistics.median(times[n]), "times_ms": times[n]}
    return results


def time_gpu(fn: Callable[[], Any], warmup_ms: float = 25, rep_ms: float = 100,
             min_reps: int = 10) -> dict:
    """Median time of ``fn`` by triton.testing.do_bench (CUDA events; do_bench also clears
    L2 before each call). ``rep_ms`` grows so that at least ``min_reps`` calls are timed."""
    import torch
    import triton.testing

    # One call by hand to learn the scale, so slow cases still get >= min_reps samples.
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate = start.elapsed_time(end)
    rep = max(rep_ms, min_reps * estimate)
    warm = max(warmup_ms, 2 * estimate)
    try:
        ms = triton.testing.do_bench(fn, warmup=warm, rep=rep, return_mode="median")
    except TypeError:  # older Triton: no return_mode
        ms = triton.testing.do_bench(fn, warmup=warm, rep=rep, quantiles=[0.5])
        ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    return {"median_ms": float(ms), "times_ms": None, "estimate_ms": estimate}


def rotating(fn: Callable[[dict], Any], input_sets: list) -> Callable[[], Any]:
    """A no-argument function that calls ``fn`` on the next input set each time."""
    state = {"i": 0}

    def call():
        x = input_sets[state["i"] % len(input_sets)]
        state["i"] += 1
        return fn(x)

    return call


def n_input_copies(set_bytes: int, device: str, max_copies: int = 8) -> int:
    """How many copies of one input set to rotate through: on a GPU enough to overflow L2
    four times (at least 2), as long as they take at most a quarter of the GPU memory; on a
    CPU one (its caches are small next to these inputs)."""
    if not is_cuda(device) or set_bytes <= 0:
        return 1
    import torch
    props = torch.cuda.get_device_properties(torch.device(device))
    l2 = getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20
    n = max(2, min(max_copies, math.ceil(4 * l2 / set_bytes)))
    while n > 1 and n * set_bytes > props.total_memory // 4:
        n -= 1
    return n


# ----------------------------------------------------------------------------------------
# Ceilings
# ----------------------------------------------------------------------------------------
def measure_ceilings(device: str, quick: bool = False) -> dict:
    """Copy bandwidth and matmul throughput measured now, on this device.

    GPU: device-to-device copy of 1 GiB (GB/s counts bytes read + written) and a bf16
    8192^3 matmul. CPU: memcpy of 256 MiB and an fp32 2048^3 matmul, labelled as CPU.
    """
    import torch
    if is_cuda(device):
        nbytes = (64 if quick else 1024) * 2**20
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
        dst = torch.empty_like(src)
        t = time_gpu(lambda: dst.copy_(src))["median_ms"]
        copy_gbps = 2 * nbytes / (t * 1e-3) / 1e9
        del src, dst
        n = 2048 if quick else 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        t = time_gpu(lambda: a @ b)["median_ms"]
        bf16_tflops = 2 * n**3 / (t * 1e-3) / 1e12
        del a, b
        torch.cuda.empty_cache()
        return {
            "copy_gbps": copy_gbps, "bf16_tflops": bf16_tflops, "fp32_tflops": None,
            "kind": "gpu",
            "note": f"GPU: device-to-device copy of {nbytes / 2**20:.0f} MiB "
                    f"(read+write bytes), bf16 matmul {n}^3",
        }
    nbytes = (32 if quick else 256) * 2**20
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = time_cpu(lambda: dst.copy_(src), warmup=1, reps=5)["median_ms"]
    copy_gbps = 2 * nbytes / (t * 1e-3) / 1e9
    del src, dst
    n = 512 if quick else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = time_cpu(lambda: a @ b, warmup=1, reps=5)["median_ms"]
    fp32_tflops = 2 * n**3 / (t * 1e-3) / 1e12
    return {
        "copy_gbps": copy_gbps, "bf16_tflops": None, "fp32_tflops": fp32_tflops,
        "kind": "cpu",
        "note": f"CPU figures, not GPU: memcpy of {nbytes / 2**20:.0f} MiB (read+write "
                f"bytes), fp32 matmul {n}^3 with {torch.get_num_threads()} threads",
    }


def matmul_ceiling_tflops(ceilings: dict, dtype: str) -> Optional[float]:
    return {"bf16": ceilings.get("bf16_tflops"), "fp32": ceilings.get("fp32_tflops")}.get(dtype)


# ----------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------
@dataclass
class Impl:
    """One implementation of a case. ``build()`` returns ``fn(inputs) -> tuple`` that runs
    the whole timed work (for example fwd+bwd) and returns tensors to check (the output
    first, then gradients). ``build`` may raise (not installed, compile unavailable)."""
    build: Callable[[], Callable[[dict], tuple]]
    mutates_inputs: bool = False  # e.g. Liger writes gradients into the logits in place
    skip: Optional[str] = None    # a reason to report instead of running


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


def _clone_inputs(x: dict) -> dict:
    import torch
    out = {}
    for k, v in x.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().clone().requires_grad_(v.requires_grad)
        else:
            out[k] = v
    return out


def _detach_all(out) -> tuple:
    import torch
    if isinstance(out, torch.Tensor):
        out = (out,)
    return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in out)


def _set_bytes(x: dict) -> int:
    import torch
    return sum(v.numel() * v.element_size() for v in x.values() if isinstance(v, torch.Tensor))


def _short_error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return msg if len(msg) <= 300 else msg[:297] + "..."


def _free(device: str) -> None:
    gc.collect()
    if is_cuda(device):
        import torch
        torch.cuda.empty_cache()


def make_row(case: Case, impl: str, ceilings: dict, *, median_ms: Optional[float] = None,
             status: str = "ok", error: Optional[str] = None, note: Optional[str] = None,
             **extra) -> dict:
    gbps = tflops = frac = None
    if median_ms is not None and median_ms > 0:
        seconds = median_ms * 1e-3
        if case.bytes_moved:
            gbps = case.bytes_moved / seconds / 1e9
            if ceilings.get("copy_gbps"):
                frac = gbps / ceilings["copy_gbps"]
        if case.flops:
            tflops = case.flops / seconds / 1e12
            ceiling = matmul_ceiling_tflops(ceilings, case.dtype)
            if ceiling and frac is None:
                frac = tflops / ceiling
    row = {
        "bench": case.bench, "case": case.case, "shape": dict(case.shape),
        "dtype": case.dtype, "impl": impl, "median_ms": median_ms, "gbps": gbps,
        "tflops": tflops, "fraction_of_ceiling": frac, "peak_mem_bytes": None, "vs": {},
        "status": status, "error": error, "note": note,
    }
    row.update(extra)
    return row


def run_case(case: Case, ceilings: dict, *, impls_filter: Optional[set] = None,
             warmup: int = 1, reps: int = 5, measure_memory: bool = True,
             child_script: Optional[str] = None, child_timeout: float = 900,
             mem_repeats: int = 1) -> list:
    """Check, time and measure every implementation of one case; return its result rows."""
    import torch
    device = case.device
    rows: dict = {}
    names = [n for n in case.impls if impls_filter is None or n in impls_filter]
    progress(f"case {case.label()} on {device}: {', '.join(names) or 'no impls'}")

    fns = {}
    for name in names:
        impl = case.impls[name]
        if impl.skip:
            rows[name] = make_row(case, name, ceilings, status="skipped", note=impl.skip)
            progress(f"  {name}: skipped ({impl.skip})")
            continue
        try:
            fns[name] = impl.build()
        except Exception as e:
            rows[name] = make_row(case, name, ceilings, status="error", error=_short_error(e))
            progress(f"  {name}: ERROR building: {_short_error(e)}")

    # Inputs: one set, and on a GPU several copies to rotate through.
    try:
        first = case.make_inputs(0)
        n_copies = n_input_copies(_set_bytes(first), device)
        sets = [first] + [case.make_inputs(i) for i in range(1, n_copies)]
    except Exception as e:
        msg = f"building inputs failed: {_short_error(e)}"
        for name in fns:
            rows[name] = make_row(case, name, ceilings, status="error", error=msg)
        progress(f"  ERROR {msg}")
        _free(device)
        return [rows[n] for n in names if n in rows]

    # Check every implementation once against the reference before anything is timed.
    ref_out = None
    ref_fn = fns.get(case.ref)
    if ref_fn is None and case.ref in case.impls and case.ref not in rows:
        try:
            ref_fn = case.impls[case.ref].build()
        except Exception as e:
            progress(f"  reference {case.ref} unavailable: {_short_error(e)}")
    if ref_fn is None and case.check is not None:
        progress(f"  no reference ({case.ref}) to check against: outputs NOT checked")
    if ref_fn is not None and case.check is not None:
        try:
            x = _clone_inputs(sets[0]) if case.impls[case.ref].mutates_inputs else sets[0]
            ref_out = _detach_all(ref_fn(x))
            del x
        except Exception as e:
            msg = f"reference {case.ref} failed: {_short_error(e)}"
            progress(f"  ERROR {msg}")
            if case.ref in fns:
                rows[case.ref] = make_row(case, case.ref, ceilings, status="error",
                                          error=_short_error(e))
                del fns[case.ref]
        _free(device)
    if ref_out is not None:
        for name in list(fns):
            if name == case.ref:
                continue
            try:
                x = _clone_inputs(sets[0]) if case.impls[name].mutates_inputs else sets[0]
                out = _detach_all(fns[name](x))
                problem = case.check(ref_out, out)
                if problem:
                    problem = f"mismatch vs {case.ref}: {problem}"
                del out, x
            except Exception as e:
                problem = f"failed on the check inputs: {_short_error(e)}"
            if problem:
                rows[name] = make_row(case, name, ceilings, status="error", error=problem)
                progress(f"  {name}: ERROR {rows[name]['error']}")
                del fns[name]
            else:
                progress(f"  {name}: output agrees with {case.ref}")
            _free(device)
        del ref_out
        _free(device)

    # Time: implementations that write into their inputs go last; inputs are rebuilt after
    # each of them if anything follows.
    # On a CPU the others are timed round-robin, so that load from other processes falls on
    # every implementation alike.
    order = sorted(fns, key=lambda n: case.impls[n].mutates_inputs)
    timing = {}
    cpu_results = {}
    if not is_cuda(device):
        plain = [n for n in order if not case.impls[n].mutates_inputs]
        if plain:
            progress(f"  timing {', '.join(plain)} interleaved: {max(1, warmup)} warm-up + "
                     f"{reps} rounds")
            cpu_results = time_cpu_interleaved({n: rotating(fns[n], sets) for n in plain},
                                               warmup=warmup, reps=reps)
    for i, name in enumerate(order):
        try:
            if name in cpu_results:
                if isinstance(cpu_results[name], BaseException):
                    raise cpu_results[name]
                timing[name] = cpu_results[name]
            elif is_cuda(device):
                progress(f"  {name}: timing")
                timing[name] = time_gpu(rotating(fns[name], sets))
            else:
                progress(f"  {name}: timing")
                timing[name] = time_cpu(rotating(fns[name], sets), warmup=warmup, reps=reps)
            rows[name] = make_row(case, name, ceilings, median_ms=timing[name]["median_ms"],
                                  times_ms=timing[name].get("times_ms"),
                                  n_input_copies=len(sets))
            progress(f"  {name}: median {timing[name]['median_ms']:.3f} ms")
        except Exception as e:
            rows[name] = make_row(case, name, ceilings, status="error", error=_short_error(e))
            progress(f"  {name}: ERROR timing: {_short_error(e)}")
        _free(device)
        # Peak memory on a GPU, in this process, on the same inputs.
        if measure_memory and is_cuda(device) and rows[name]["status"] == "ok":
            try:
                rows[name]["peak_mem_bytes"] = memory.gpu_peak_extra_bytes(lambda: fns[name](sets[0]), device)
                rows[name]["mem_method"] = "cuda max_memory_allocated - memory_allocated before"
            except Exception as e:
                rows[name]["mem_error"] = _short_error(e)
            _free(device)
        if case.impls[name].mutates_inputs and i + 1 < len(order):
            sets = [case.make_inputs(j) for j in range(len(sets))]
    del sets
    _free(device)

    # Peak memory on a CPU: fresh subprocesses per implementation. The heap's behaviour
    # (glibc keeps freed blocks under its dynamic mmap threshold, per-thread arenas) makes
    # one process's peak vary from run to run, so it is measured ``mem_repeats`` times and
    # the median reported, with every sample in mem_detail.
    if measure_memory and not is_cuda(device) and child_script:
        for name in order:
            if rows[name]["status"] != "ok":
                continue
            progress(f"  {name}: peak RSS in {mem_repeats} fresh process(es)")
            try:
                samples = []
                for _ in range(max(1, mem_repeats)):
                    res = memory.run_child([child_script, "--_child", json.dumps(case.spec(name))],
                                    timeout=child_timeout)
                    if res.get("error"):
                        raise RuntimeError(res["error"])
                    samples.append(res)
                samples.sort(key=lambda r: r["extra_bytes"])
                res = dict(samples[(len(samples) - 1) // 2])  # the median (lower for even)
                res["samples_extra_bytes"] = [r["extra_bytes"] for r in samples]
                rows[name]["peak_mem_bytes"] = int(res["extra_bytes"])
                rows[name]["mem_method"] = (
                    f"median of {len(samples)} fresh processes: peak RSS (VmHWM) over one "
                    "warm-up + one fwd+bwd - RSS after the inputs were built - file-backed "
                    "RSS growth (code pages)")
                rows[name]["mem_detail"] = res
                if len(samples) > 1:
                    progress(f"  {name}: extra MiB samples "
                             + ", ".join(f"{r['extra_bytes'] / 2**20:.0f}" for r in samples))
            except Exception as e:
                rows[name]["mem_error"] = _short_error(e)
                progress(f"  {name}: memory ERROR {_short_error(e)}")
    return [rows[n] for n in names if n in rows]


def prime_torch() -> None:
    """Start what every torch program starts once, so that it is not billed to the first
    op measured: the autograd engine's threads (about 35 MiB of RSS on first
    ``autograd.grad``) and the intra-op thread pool."""
    import torch
    x = torch.ones(64, 64, requires_grad=True)
    torch.autograd.grad((x @ x).sum(), (x,))
    torch.autograd.grad((x @ x), (x,), torch.ones(64, 64))


def child_main(make_case: Callable[..., Case], spec: dict) -> int:
    """Entry for the hidden ``--_child SPEC`` flag: measure one implementation's peak RSS
    and print one JSON line on stdout."""
    try:
        prime_torch()
        case = make_case(spec["case_id"], spec["shape"], spec["dtype"], spec["device"])
        fn = case.impls[spec["impl"]].build()
        res = memory.rss_child_measure(lambda: case.make_inputs(0), fn)
    except Exception as e:
        res = {"error": _short_error(e), "traceback": traceback.format_exc()[-2000:]}
    print(json.dumps(res), flush=True)
    return 0


# ----------------------------------------------------------------------------------------
# The driver each bench file calls
# ----------------------------------------------------------------------------------------
def parse_args(argv=None, description: str = "") -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--impls", default=None, help="comma list, e.g. kernelrl,eager")
    p.add_argument("--cases", default=None, help="comma list of case ids (or substrings of names)")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test in seconds")
    p.add_argument("--reps", type=int, default=5, help="CPU: timed runs (median), >= 5 advised")
    p.add_argument("--warmup", type=int, default=1, help="CPU: warm-up runs, >= 1")
    p.add_argument("--no-mem", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--mem-repeats", type=int, default=None,
                   help="CPU: fresh processes per peak-memory figure, median reported "
                        "(default 3; 1 with --quick)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(*, bench: str, plan: Callable, make_case: Callable, targets: Callable,
         script: str, argv=None, description: str = "") -> int:
    """plan(device, quick) -> [(case_id, shape, dtype)]; make_case(case_id, shape, dtype,
    device) -> Case; targets(report) -> [{"target", "status", "detail"}]."""
    args = parse_args(argv, description)
    if args._child:
        return child_main(make_case, json.loads(args._child))

    import torch
    device = resolve_device(args.device)
    impls_filter = set(s.strip() for s in args.impls.split(",")) if args.impls else None
    case_filters = [s.strip() for s in args.cases.split(",")] if args.cases else None
    env = environment(device)
    progress(f"{bench}: device {env['device']}, torch {env['torch']}, triton {env['triton']}")
    progress("measuring ceilings" + (" (CPU figures)" if not is_cuda(device) else ""))
    try:
        ceilings = measure_ceilings(device, quick=args.quick)
    except Exception as e:
        ceilings = {"copy_gbps": None, "bf16_tflops": None, "error": _short_error(e)}
    mem_repeats = max(1, args.mem_repeats if args.mem_repeats is not None else (1 if args.quick else 3))
    rows = []
    for case_id, shape, dtype in plan(device, args.quick):
        try:
            case = make_case(case_id, shape, dtype, device)
        except Exception as e:
            progress(f"case {case_id} {shape} {dtype}: ERROR {_short_error(e)}")
            continue
        if case_filters and not any(f == case.case_id or f in case.case for f in case_filters):
            continue
        rows.extend(run_case(case, ceilings, impls_filter=impls_filter, warmup=args.warmup,
                             reps=max(1, args.reps), measure_memory=not args.no_mem,
                             child_script=script, mem_repeats=mem_repeats))
        if is_cuda(device):
            torch.cuda.empty_cache()
    rep = report.build_report(env, ceilings, rows)
    try:
        rep["targets"] = targets(rep)
    except Exception as e:
        rep["targets"] = [{"target": "targets", "status": "NOT CHECKED",
                           "detail": f"checking failed: {_short_error(e)}"}]
    print(report.format_table(rep))
    print()
    print(report.format_targets(rep["targets"]))
    if args.out:
        report.write_json(rep, args.out)
        progress(f"wrote {args.out}")
    return 0


def _cli(argv=None) -> int:
    p = argparse.ArgumentParser(description="benchmarks/common.py utilities")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge bench JSON files into one")
    m.add_argument("out")
    m.add_argument("inputs", nargs="+")
    sub.add_parser("gpu-slug", help="print a slug of the GPU name (or 'cpu')")
    args = p.parse_args(argv)
    if args.cmd == "merge":
        merged = report.merge_reports(args.inputs, args.out)
        print(f"merged {len(args.inputs)} files, {len(merged['results'])} results -> {args.out}")
        return 0
    import torch
    print(slugify(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else "cpu")
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
