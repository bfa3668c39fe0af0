"""Peak memory of one benchmark call: "extra" bytes over the inputs.

GPU
    ``max_memory_allocated`` during one call minus ``memory_allocated`` before it
    (:func:`gpu_peak_extra_bytes`).
CPU
    peak resident set size of a FRESH subprocess that runs one (case, impl, shape, dtype):
    extra = peak RSS (VmHWM, see :func:`peak_rss_bytes`) over one warm-up and one measured
    call, minus the RSS (``/proc/self/statm``) right after the inputs were built, minus code
    paged in meanwhile. See :func:`rss_child_measure` (run inside the child) and
    :func:`run_child` (starts it and reads its JSON line).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from typing import Any, Callable


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM from /proc/self/status, else ru_maxrss.

    VmHWM first because ru_maxrss (RUSAGE_SELF) also keeps the high-water mark that the
    process inherited at fork and carried through exec: a child forked from a parent of
    400 MiB reports ru_maxrss >= 400 MiB whatever it does. VmHWM belongs to the current
    address space only and is what ``/proc/self/clear_refs`` resets.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0, '5' > /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_file_bytes() -> int:
    """File-backed resident bytes (RssFile: shared-library code and mapped files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssFile:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_child_measure(build: Callable[[], Any], run: Callable[[Any], Any],
                      warmup: int = 1) -> dict:
    """Inside a fresh process: build the inputs, then ``warmup`` calls and one measured call.

    extra_bytes = peak RSS over the warm-up and the measured call - RSS right after the
    inputs were built - the growth of file-backed RSS over the calls.

    - The peak is reset (``/proc/self/clear_refs``) right after the inputs are built, so a
      transient while building them does not count (``peak_reset_after_inputs``).
    - The warm-up counts: memory an op keeps after a call (its own cache, or heap pages the
      allocator does not give back) is memory it costs, and a baseline taken after the
      warm-up would hide it. ``retained_after_calls`` shows how much stayed.
    - File-backed growth is code paged in by a kernel's first call (tens of MiB, even for
      a tiny op), not the op's working memory, so it is subtracted (``file_rss_growth``;
      ``extra_raw_bytes`` is the figure without that correction).
    Returns sizes in bytes.
    """
    inputs = build()
    gc.collect()
    was_reset = reset_peak_rss()
    rss_inputs = current_rss_bytes()
    file_inputs = rss_file_bytes()
    for _ in range(warmup):
        out = run(inputs)
        del out
        gc.collect()
    out = run(inputs)
    del out
    gc.collect()
    rss_end = current_rss_bytes()
    peak = max(peak_rss_bytes(), rss_end)
    file_growth = max(0, rss_file_bytes() - file_inputs)
    return {
        "rss_after_inputs": rss_inputs,
        "peak_rss": peak,
        "file_rss_growth": file_growth,
        "retained_after_calls": rss_end - rss_inputs,
        "extra_raw_bytes": max(0, peak - rss_inputs),
        "extra_bytes": max(0, peak - rss_inputs - file_growth),
        "peak_reset_after_inputs": was_reset,
        "calls": warmup + 1,
    }


def run_child(argv: list, timeout: float = 900) -> dict:
    """Run ``python argv...`` in a fresh process; return the JSON object of the last stdout
    line that parses as one. Raises RuntimeError with stderr's tail otherwise."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())
    for line in reversed(proc.stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
    raise RuntimeError(f"child exited {proc.returncode} without JSON: {' | '.join(tail)}")


def gpu_peak_extra_bytes(fn: Callable[[], Any], device: str) -> int:
    """max_memory_allocated during one call minus memory_allocated before it."""
    import torch
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return max(0, peak - before)
