"""Timing and ceilings: how every benchmark number in ms, GB/s and % of ceiling is taken.

GPU
    ``triton.testing.do_bench`` (CUDA events; it clears L2 before each call), the function
    cycling through several copies of the inputs (:func:`rotating`, :func:`n_input_copies`)
    so that L2 does not serve them either. The start event runs on the GPU after the L2
    clear, while the host is already issuing the call: of a call's host time H (Python,
    autograd, launches), the figure leaves out min(H, C), C the clear's duration. A call
    whose host side is shorter than the clear is timed by its device work alone, and
    between two host-bound calls the ratio of figures, (H1 − C) / (H2 − C), is larger
    than that of their host times. So a call under ``LOOP_UNDER_MS`` is also timed back
    to back (:func:`time_gpu_loop`, the row's ``loop_ms``), which counts its host time.
CPU
    ``time.perf_counter``, median of ``reps`` (>= 5) runs after ``warmup`` (>= 1). The
    implementations of a case are timed round-robin (:func:`time_cpu_interleaved`), so a
    burst of load from elsewhere lands on all of them, and round ``i`` of one
    implementation can be paired with round ``i`` of another (the CPU speed targets use the
    median of those paired ratios). A call under ``MIN_ROUND_MS`` (a host-bound shape) is
    repeated within its round until its turn lasts about that long (at most 1000 calls),
    and the round's figure is the mean per call: one call of a few hundred µs, right after another implementation's,
    would time that switch (cold caches and branch predictors) rather than the call.
Spread
    Every result carries ``spread``: the interquartile range of its runs over their median.
    Two runs of the same code differ by about that much, so a ratio of two medians within
    their combined spread is noise (``report.py`` marks it "~").
Ceilings
    Measured in the same run (``suite.py``: at its start and its end), the best of their
    runs. GPU: a device-to-device copy (GB/s, bytes read + written) and a bf16 matmul
    (TFLOP/s). CPU: a memcpy and an fp32 matmul, labelled as CPU figures wherever they are
    printed; the bf16 ceiling is null on a CPU.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from typing import Any, Callable, Optional


def relative_spread(times: Optional[list]) -> Optional[float]:
    """(Q3 - Q1) / median of ``times``; None with fewer than 2 runs or a zero median.

    The quartiles interpolate between runs ('inclusive' method), so 5 runs give a usable
    figure: for sorted t1..t5 it is (t4 - t2) / t3."""
    if not times or len(times) < 2:
        return None
    med = statistics.median(times)
    if med <= 0:
        return None
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return (q3 - q1) / med


def _result(times: list) -> dict:
    return {"median_ms": statistics.median(times), "times_ms": times,
            "spread": relative_spread(times)}


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
    return _result(times)


#: a CPU round shorter than this repeats its call (module docstring)
MIN_ROUND_MS = 5.0


def time_cpu_interleaved(calls: dict, warmup: int = 1, reps: int = 5,
                         on_call: Optional[Callable[[str, str], None]] = None) -> dict:
    """Like :func:`time_cpu` for several functions at once (each warmed up with ``warmup``
    calls and one more), timed round-robin: each function runs once per round, the starting
    one rotating and the rest shuffled (:func:`_round_order`). A function's turn is one
    call, or ``calls_per_round`` of them (at most 1000) for a call under MIN_ROUND_MS, its
    figure then the mean per call. Returns
    name -> result dict (``times_ms[i]`` is round ``i``, and ``paired`` says every round
    was timed), or the exception that function raised. ``on_call(name, phase)`` is told
    before each call (for a progress bar)."""
    warmup, reps = max(1, int(warmup)), max(1, int(reps))
    results: dict = {}
    times: dict = {n: [] for n in calls}
    per_round: dict = {}
    alive = list(calls)
    for n in list(alive):
        try:
            once = math.inf      # the fastest warm-up call (the first one is cold)
            for _ in range(warmup + 1):
                if on_call:
                    on_call(n, "warm-up")
                t0 = time.perf_counter()
                out = calls[n]()
                once = min(once, (time.perf_counter() - t0) * 1e3)
                del out
            per_round[n] = max(1, min(1000, math.ceil(MIN_ROUND_MS / max(once, 1e-3))))
        except Exception as e:
            results[n] = e
            alive.remove(n)
    for r in range(reps):
        for n in _round_order(alive, r):
            if n in results:
                continue
            try:
                if on_call:
                    on_call(n, f"round {r + 1}/{reps}")
                count = per_round[n]
                t0 = time.perf_counter()
                for _ in range(count):
                    out = calls[n]()
                    del out
                times[n].append((time.perf_counter() - t0) * 1e3 / count)
            except Exception as e:
                results[n] = e
    for n in alive:
        if n not in results:
            results[n] = dict(_result(times[n]), paired=True, calls_per_round=per_round[n])
    return results


def _round_order(names: list, r: int) -> list:
    """Round ``r``'s order: the starting one rotates, the rest in an order drawn from seed
    ``r``. In a fixed cyclic order each implementation would always run right after the
    same other one, and carry whatever that one leaves behind (a loaded allocator, busy
    OpenMP threads): on 2 cores, at a host-bound shape, two rows running the same code
    came out 20% apart that way."""
    if not names:
        return []
    first = names[r % len(names)]
    rest = [n for n in names if n != first]
    random.Random(r).shuffle(rest)
    return [first] + rest


def time_gpu(fn: Callable[[], Any], warmup_ms: float = 25, rep_ms: float = 100,
             min_reps: int = 10) -> dict:
    """Median time of ``fn`` by triton.testing.do_bench (CUDA events; do_bench also clears
    L2 before each call), and the spread of its runs. ``rep_ms`` grows so that at
    least ``min_reps`` calls are timed."""
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
    times = [float(t) for t in triton.testing.do_bench(fn, warmup=warm, rep=rep,
                                                        return_mode="all")]
    # Hundreds of runs: the JSON keeps their count, not the list.
    return dict(_result(times), times_ms=None, n_runs=len(times), estimate_ms=estimate)


#: a GPU call whose do_bench estimate is under this also gets a back-to-back figure
LOOP_UNDER_MS = 2.0


def time_gpu_loop(fn: Callable[[], Any], estimate_ms: float, loop_ms: float = 50.0,
                  rounds: int = 5) -> dict:
    """Per-call time of ``fn`` called back to back, as a training loop calls it: CUDA events
    around n calls (n from ``estimate_ms``, so that a round lasts about ``loop_ms``; at most
    1000), with no L2 clear and no synchronisation between calls. A call bound by its host
    side is timed at that host time here (the GPU waits for it), where do_bench leaves part
    of it out (module docstring). Median of ``rounds`` rounds, per call."""
    import torch

    n = max(1, min(1000, math.ceil(loop_ms / max(estimate_ms, 1e-3))))
    for _ in range(min(n, 10)):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(1, rounds)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / n)
    return dict(_result(times), calls_per_round=n)


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
    if not str(device).startswith("cuda") or set_bytes <= 0:
        return 1
    import torch
    props = torch.cuda.get_device_properties(torch.device(device))
    l2 = getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20
    n = max(2, min(max_copies, math.ceil(4 * l2 / set_bytes)))
    while n > 1 and n * set_bytes > props.total_memory // 4:
        n -= 1
    return n


def measure_ceilings(device: str, quick: bool = False) -> dict:
    """Copy bandwidth and matmul throughput measured now, on this device: the best of the
    runs, not their median (a ceiling is what the machine can do; a run slowed by outside
    load says nothing about that, and a ceiling measured low would put rows above 100%).

    GPU: device-to-device copy of 1 GiB (GB/s counts bytes read + written) and a bf16
    8192^3 matmul; ``quick``: 64 MiB and 2048^3. CPU: memcpy of 256 MiB and an fp32 2048^3
    matmul, labelled as CPU figures (sizes past the caches, cheap enough to keep in quick).
    """
    import torch
    if str(device).startswith("cuda"):
        nbytes = (64 if quick else 1024) * 2**20
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
        dst = torch.empty_like(src)
        t = _best_gpu(lambda: dst.copy_(src))
        copy_gbps = 2 * nbytes / (t * 1e-3) / 1e9
        del src, dst
        n = 2048 if quick else 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        t = _best_gpu(lambda: a @ b)
        bf16_tflops = 2 * n**3 / (t * 1e-3) / 1e12
        del a, b
        torch.cuda.empty_cache()
        return {
            "copy_gbps": copy_gbps, "bf16_tflops": bf16_tflops, "fp32_tflops": None,
            "kind": "gpu",
            "note": f"GPU: best run of a device-to-device copy of {nbytes / 2**20:.0f} MiB "
                    f"(read+write bytes), of a bf16 matmul {n}^3",
        }
    nbytes = 256 * 2**20
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    t = min(time_cpu(lambda: dst.copy_(src), warmup=1, reps=5)["times_ms"])
    copy_gbps = 2 * nbytes / (t * 1e-3) / 1e9
    del src, dst
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = min(time_cpu(lambda: a @ b, warmup=1, reps=5)["times_ms"])
    fp32_tflops = 2 * n**3 / (t * 1e-3) / 1e12
    return {
        "copy_gbps": copy_gbps, "bf16_tflops": None, "fp32_tflops": fp32_tflops,
        "kind": "cpu",
        "note": f"CPU figures, not GPU: best of 5 runs of a memcpy of {nbytes / 2**20:.0f} MiB "
                f"(read+write bytes), of an fp32 matmul {n}^3 with {torch.get_num_threads()} "
                "threads",
    }


def _best_gpu(fn: Callable[[], Any]) -> float:
    import triton.testing
    return min(float(t) for t in triton.testing.do_bench(fn, return_mode="all"))


def matmul_ceiling_tflops(ceilings: dict, dtype: str) -> Optional[float]:
    return {"bf16": ceilings.get("bf16_tflops"), "fp32": ceilings.get("fp32_tflops")}.get(dtype)
