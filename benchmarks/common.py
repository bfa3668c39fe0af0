"""Shared benchmark driver: environment, result rows, and the run of one case.

For each :class:`~cases.Case` (see ``cases.py``), :func:`run_case`:

1. builds every implementation and the inputs;
2. checks every implementation once against the reference ("eager"), so that a broken op
   is never timed silently: a mismatch becomes an error row;
3. times them (``timing.py``: round-robin on a CPU, ``do_bench`` on a GPU);
4. measures their peak memory (``memory.py``): on a GPU in this process, on a CPU in fresh
   subprocesses, the bench script run again with the hidden ``--_child SPEC`` flag
   (:func:`child_main`), several at once.

A failing implementation (torch.compile unavailable, OOM, a mismatch) becomes an error
row with its message; it never stops the run. ``suite.py`` runs the cases of one or more
families and prints and writes the report (``report.py``).

Also a small CLI:
    python benchmarks/common.py merge OUT.json IN1.json IN2.json ...
    python benchmarks/common.py gpu-slug          # e.g. nvidia-h100-80gb-hbm3
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import subprocess
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


def _put_repo_on_path() -> None:
    """Import kernelrl from this checkout unless PYTHONPATH names another one: the repo
    goes right after the PYTHONPATH entries, ahead of site-packages (an installed copy may
    be older than the checkout being benchmarked). Memory children inherit the same."""
    repo = str(REPO)
    if repo in sys.path:
        return
    pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    at = 1
    while at < len(sys.path) and sys.path[at] in pythonpath:
        at += 1
    sys.path.insert(at, repo)


_put_repo_on_path()

import memory  # noqa: E402
import progress  # noqa: E402
import report  # noqa: E402
from cases import Case, Impl, building_only, is_cuda, short_error  # noqa: E402,F401
from timing import LOOP_UNDER_MS, time_gpu_loop  # noqa: E402
from timing import (n_input_copies, rotating, time_cpu, time_cpu_interleaved,  # noqa: E402,F401
                    time_gpu)

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


# ----------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------
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
    return (f"cpu: {_cpu_model()} ({os.cpu_count()} logical cores, "
            f"{torch.get_num_threads()} torch threads)")


def slugify(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def device_slug(device: str) -> str:
    """'cpu', or the GPU's name as a slug: for file names."""
    return slugify(device_name(device)) if is_cuda(device) else "cpu"


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
        kernelrl_path = str(Path(kernelrl.__file__).resolve().parent)
    except Exception as e:  # the package may not import; the other implementations still run
        kernelrl_version = f"not importable: {short_error(e)}"
        kernelrl_path = None
    return {
        "device": device_name(device),
        "device_kind": "cuda" if is_cuda(device) else "cpu",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton_version,
        "kernelrl": git_sha(),
        "kernelrl_version": kernelrl_version,
        "kernelrl_path": kernelrl_path,
        "kernelrl_backend_env": os.environ.get("KERNELRL_BACKEND", "auto"),
        "python": platform.python_version(),
    }


# ----------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------
def make_row(case: Case, impl: str, *, median_ms: Optional[float] = None,
             status: str = "ok", error: Optional[str] = None, note: Optional[str] = None,
             **extra) -> dict:
    """One result row. ``fraction_of_ceiling`` is filled in by ``report.build_report``
    once the ceilings are final (they are measured at the start and the end of a run)."""
    gbps = tflops = None
    if median_ms is not None and median_ms > 0:
        seconds = median_ms * 1e-3
        if case.bytes_moved:
            gbps = case.bytes_moved / seconds / 1e9
        if case.flops:
            tflops = case.flops / seconds / 1e12
    row = {
        "bench": case.bench, "case": case.case, "case_id": case.case_id,
        "shape": dict(case.shape), "dtype": case.dtype, "impl": impl,
        "median_ms": median_ms, "gbps": gbps, "tflops": tflops,
        "fraction_of_ceiling": None, "peak_mem_bytes": None, "vs": {},
        "status": status, "error": error, "note": note,
    }
    row.update(extra)
    return row


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


def _free(device: str) -> None:
    gc.collect()
    if is_cuda(device):
        import torch
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------
# One case
# ----------------------------------------------------------------------------------------
def run_case(case: Case, *, impls_filter: Optional[set] = None,
             warmup: int = 1, reps: int = 5, measure_memory: bool = True,
             child_script: Optional[str] = None, child_timeout: float = 900,
             mem_repeats: int = 1, mem_jobs: int = 1, mem_skip: frozenset = frozenset()) -> list:
    """Check, time and measure every implementation of one case; return its result rows
    (a backend that cannot run here comes back as a "not_run" row, which the report keeps
    apart from the results). ``mem_skip``: implementations whose CPU peak memory is not
    measured (their row says so)."""
    device = case.device
    rows: dict = {}
    names = [n for n in case.impls if impls_filter is None or n in impls_filter]
    progress.log(f"case {case.label()} on {device}: {', '.join(names) or 'no impls'}")

    fns = {}
    for name in names:
        impl = case.impls[name]
        if impl.skip:
            status = "skipped" if impl.row else "not_run"
            rows[name] = make_row(case, name, status=status, note=impl.skip)
            progress.log(f"  {name}: {'skipped' if impl.row else 'not run'} ({impl.skip})")
            continue
        try:
            fns[name] = impl.build()
        except Exception as e:
            rows[name] = make_row(case, name, status="error", error=short_error(e))
            progress.log(f"  {name}: ERROR building: {short_error(e)}")

    # Inputs: one set, and on a GPU several copies to rotate through.
    try:
        sets = [case.make_inputs(0)]
        sets += [case.make_inputs(i) for i in range(1, n_input_copies(_set_bytes(sets[0]), device))]
    except Exception as e:
        msg = f"building inputs failed: {short_error(e)}"
        for name in fns:
            rows[name] = make_row(case, name, status="error", error=msg)
        progress.log(f"  ERROR {msg}")
        _free(device)
        return [rows[n] for n in names if n in rows]

    _check_against_reference(case, fns, sets[0], rows)
    order = _time_all(case, fns, sets, rows, warmup, reps, measure_memory)
    sets.clear()
    fns.clear()
    _free(device)
    if measure_memory and not is_cuda(device) and child_script:
        for name in mem_skip & set(order):
            rows[name]["mem_method"] = "not measured in this run (--full measures it)"
        _cpu_memory(case, [n for n in order if rows[n]["status"] == "ok" and n not in mem_skip],
                    rows, child_script, child_timeout, mem_repeats, mem_jobs)
    return [rows[n] for n in names if n in rows]


def _check_against_reference(case: Case, fns: dict, x0: dict, rows: dict) -> None:
    """Run the reference and every other implementation once on ``x0``; an implementation
    whose output or gradients disagree (``case.check``) or that raises becomes an error row
    and leaves ``fns``."""
    device = case.device
    ref_out = None
    ref_fn = fns.get(case.ref)
    if ref_fn is None and case.ref in case.impls and case.ref not in rows:
        try:  # filtered out by --impls, but still the yardstick
            ref_fn = case.impls[case.ref].build()
        except Exception as e:
            progress.log(f"  reference {case.ref} unavailable: {short_error(e)}")
    if ref_fn is None or case.check is None:
        if case.check is not None:
            progress.log(f"  no reference ({case.ref}) to check against: outputs NOT checked")
        return
    progress.step(case.ref, "check (reference)")
    try:
        x = _clone_inputs(x0) if case.impls[case.ref].mutates_inputs else x0
        ref_out = _detach_all(ref_fn(x))
        del x
    except Exception as e:
        progress.log(f"  ERROR reference {case.ref} failed: {short_error(e)}")
        if case.ref in fns:
            rows[case.ref] = make_row(case, case.ref, status="error",
                                      error=short_error(e))
            del fns[case.ref]
        _free(device)
        return
    _free(device)
    for name in list(fns):
        if name == case.ref:
            continue
        if not case.impls[name].checked:
            progress.log(f"  {name}: not checked (a diagnostic row, it computes nothing)")
            continue
        progress.step(name, "check")
        try:
            x = _clone_inputs(x0) if case.impls[name].mutates_inputs else x0
            out = _detach_all(fns[name](x))
            problem = case.check(ref_out, out)
            if problem:
                problem = f"mismatch vs {case.ref}: {problem}"
            del out, x
        except Exception as e:
            problem = f"failed on the check inputs: {short_error(e)}"
        if problem:
            rows[name] = make_row(case, name, status="error", error=problem)
            progress.log(f"  {name}: ERROR {problem}")
            del fns[name]
        else:
            progress.log(f"  {name}: output agrees with {case.ref}")
        _free(device)
    del ref_out
    _free(device)


def _time_all(case: Case, fns: dict, sets: list, rows: dict, warmup: int, reps: int,
              measure_memory: bool) -> list:
    """Time every implementation left in ``fns`` into ``rows``; on a GPU also its peak
    memory. Returns the order they were timed in.

    Implementations that write into their inputs go last, the inputs rebuilt after each of
    them if anything follows. On a CPU the others are timed round-robin, so that load from
    other processes falls on every implementation alike and rounds can be paired."""
    device = case.device
    order = sorted(fns, key=lambda n: case.impls[n].mutates_inputs)
    cpu_results = {}
    if not is_cuda(device):
        plain = [n for n in order if not case.impls[n].mutates_inputs]
        if plain:
            progress.log(f"  timing {', '.join(plain)} round-robin: {max(1, warmup)} warm-up "
                         f"+ {reps} rounds")
            cpu_results = time_cpu_interleaved({n: rotating(fns[n], sets) for n in plain},
                                               warmup=warmup, reps=reps,
                                               on_call=progress.step)
    for i, name in enumerate(order):
        try:
            if name in cpu_results:
                if isinstance(cpu_results[name], BaseException):
                    raise cpu_results[name]
                timing = cpu_results[name]
            elif is_cuda(device):
                progress.step(name, "timing")
                timing = time_gpu(rotating(fns[name], sets))
                if timing["estimate_ms"] < LOOP_UNDER_MS:    # host-bound: also back to back
                    loop = time_gpu_loop(rotating(fns[name], sets), timing["estimate_ms"])
                    timing.update(loop_ms=loop["median_ms"], loop_spread=loop["spread"],
                                  loop_calls=loop["calls_per_round"])
            else:
                progress.step(name, "timing")
                timing = time_cpu(rotating(fns[name], sets), warmup=warmup, reps=reps)
            rows[name] = make_row(
                case, name, **(case.impls[name].info or {}), median_ms=timing["median_ms"],
                times_ms=timing.get("times_ms"), spread=timing.get("spread"),
                paired=bool(timing.get("paired")), n_input_copies=len(sets),
                **({"n_runs": timing["n_runs"]} if "n_runs" in timing else {}),
                **{k: timing[k] for k in ("calls_per_round", "loop_ms", "loop_spread",
                                          "loop_calls") if k in timing})
            if not case.impls[name].checked:      # moves none of the case's bytes
                rows[name].update(gbps=None, tflops=None)
            progress.log(f"  {name}: median {timing['median_ms']:.3f} ms")
        except Exception as e:
            rows[name] = make_row(case, name, status="error", error=short_error(e))
            progress.log(f"  {name}: ERROR timing: {short_error(e)}")
        _free(device)
        # Peak memory on a GPU, in this process, on the same inputs.
        if measure_memory and is_cuda(device) and rows[name]["status"] == "ok":
            progress.step(name, "peak memory")
            try:
                rows[name]["peak_mem_bytes"] = memory.gpu_peak_extra_bytes(
                    lambda: fns[name](sets[0]), device)
                rows[name]["mem_method"] = "cuda max_memory_allocated - memory_allocated before"
            except Exception as e:
                rows[name]["mem_error"] = short_error(e)
            _free(device)
        if case.impls[name].mutates_inputs and i + 1 < len(order):
            sets[:] = [case.make_inputs(j) for j in range(len(sets))]
    return order


def _cpu_memory(case: Case, names: list, rows: dict, child_script: str, timeout: float,
                repeats: int, jobs: int) -> None:
    """Peak memory on a CPU: fresh subprocesses per implementation, ``jobs`` at a time
    (each is its own process, so its peak RSS is its own; they only share the cores, which
    changes how long they take, not what they hold).

    The heap's behaviour (glibc keeps freed blocks under its dynamic mmap threshold,
    per-thread arenas) makes one process's peak vary from run to run, so each figure is the
    median of ``repeats`` processes, with every sample in mem_detail. An implementation
    that runs the same code as another (``Impl.same_as``) gets that one's figure."""
    same = {n: case.impls[n].same_as for n in names if case.impls[n].same_as in names}
    names = [n for n in names if n not in same]
    if not names:
        return
    repeats = max(1, repeats)
    progress.step("peak memory",
                  f"{len(names) * repeats} fresh processes, {max(1, jobs)} at a time")
    argv = {n: [child_script, "--_child", json.dumps(case.spec(n))] for n in names}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {n: [pool.submit(memory.run_child, argv[n], timeout) for _ in range(repeats)]
                   for n in names}
        for name in names:
            row = rows[name]
            try:
                samples = [f.result() for f in futures[name]]
                errors = [s["error"] for s in samples if s.get("error")]
                if errors:
                    raise RuntimeError(errors[0])
                samples.sort(key=lambda r: r["extra_bytes"])
                res = dict(samples[(len(samples) - 1) // 2])  # the median (lower for even)
                res["samples_extra_bytes"] = [r["extra_bytes"] for r in samples]
                row["peak_mem_bytes"] = int(res["extra_bytes"])
                row["mem_method"] = (
                    f"median of {len(samples)} fresh process{'es' if len(samples) > 1 else ''}"
                    ": peak RSS (VmHWM) over one "
                    "warm-up + one fwd+bwd - RSS after the inputs were built - file-backed "
                    "RSS growth (code pages)")
                row["mem_detail"] = res
                progress.log(f"  {name}: peak extra MiB "
                             + ", ".join(f"{b / 2**20:.0f}" for b in res["samples_extra_bytes"]))
            except Exception as e:
                row["mem_error"] = short_error(e)
                progress.log(f"  {name}: memory ERROR {short_error(e)}")
    for name, twin in same.items():
        for key in ("peak_mem_bytes", "mem_detail", "mem_error"):
            if key in rows[twin]:
                rows[name][key] = rows[twin][key]
        rows[name]["mem_method"] = f"the same code as {twin} (the default dispatch): its figure"


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
        with building_only(spec["impl"]):
            case = make_case(spec["case_id"], spec["shape"], spec["dtype"], spec["device"])
        fn = case.impls[spec["impl"]].build()
        res = memory.rss_child_measure(lambda: case.make_inputs(0), fn)
    except Exception as e:
        res = {"error": short_error(e), "traceback": traceback.format_exc()[-2000:]}
    print(json.dumps(res), flush=True)
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
    print(device_slug("cuda") if torch.cuda.is_available() else "cpu")
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
