"""Checks of a family's targets against a report: each returns
``{"target", "status", "detail"}`` with status MET, NOT MET or NOT CHECKED (and why), the
numbers in the detail. Targets are printed, never asserted.

Speed on a CPU rests on paired runs: the implementations of a case are timed round-robin,
so round ``i`` of kernelrl and round ``i`` of the peer ran back to back under the same
outside load. The verdict is the median over rounds of peer time / kernelrl time, and
needs at least :data:`MIN_PAIRS` rounds; fewer is NOT CHECKED. On a GPU (``do_bench``,
runs not paired) it is the ratio of the medians.
"""

from __future__ import annotations

import statistics
from typing import Optional

import report

MIN_PAIRS = 5


def target(label: str, status: str, detail: str) -> dict:
    return {"target": label, "status": status, "detail": detail}


def ms(row: Optional[dict]) -> Optional[float]:
    return row.get("median_ms") if row and row.get("status") == "ok" else None


def mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def why_missing(row: Optional[dict], name: str) -> str:
    if row is None:
        return (f"no {name} row at this shape in this run (the target shapes run with "
                "--full; --impls and --cases may leave rows out)")
    if row.get("status") == "skipped":
        return f"{name} skipped: {row.get('note')}"
    if row.get("status") == "error":
        return f"{name} error: {row.get('error')}"
    return f"{name} has no measurement"


def paired_ratios(row: dict, peer: dict) -> list:
    """peer time / row time, round by round, where both rows were timed round-robin in the
    same loop (every round of each timed: ``paired``); [] otherwise."""
    a, b = row.get("times_ms") or [], peer.get("times_ms") or []
    if not (row.get("paired") and peer.get("paired")) or len(a) != len(b):
        return []
    return [tb / ta for ta, tb in zip(a, b) if ta > 0]


def faster(rows: list, case: str, shape: dict, dtype: str, peer: str, label: str, *,
           cpu: bool, or_equal: bool = False, factor: float = 1.0,
           impl: str = "kernelrl") -> dict:
    """``impl`` more than ``factor`` times as fast as ``peer`` (``or_equal``: at least that;
    the defaults: faster). See the module docstring for how CPU and GPU verdicts are
    reached."""
    k = report.find_row(rows, case, impl, shape, dtype)
    p = report.find_row(rows, case, peer, shape, dtype)
    if ms(k) is None or ms(p) is None:
        missing = k if ms(k) is None else p
        return target(label, "NOT CHECKED", why_missing(missing, impl if missing is k else peer))
    medians = f"{impl} {ms(k):.3f} ms vs {peer} {ms(p):.3f} ms (medians)"
    noise = " within noise," if (k.get("vs_noise") or {}).get(peer) else ""
    if cpu:
        ratios = paired_ratios(k, p)
        if len(ratios) < MIN_PAIRS:
            return target(label, "NOT CHECKED",
                          f"{len(ratios)} paired runs, a verdict needs >= {MIN_PAIRS} "
                          f"(run with --reps {MIN_PAIRS} or more); {medians}")
        ratio = statistics.median(ratios)
        how = f"median of {len(ratios)} paired runs"
    else:
        ratio = ms(p) / ms(k)
        how = "ratio of medians"
    ok = ratio >= factor if or_equal else ratio > factor
    goal = "" if factor == 1 else f", target {'>=' if or_equal else '>'} {factor:g}x"
    return target(label, "MET" if ok else "NOT MET",
                  f"{peer}/{impl} time {ratio:.2f}x ({how},{noise} > 1: {impl} faster{goal}); "
                  f"{medians}")


def memory_at_most(rows: list, case: str, shape: dict, dtype: str, peer: str, label: str, *,
                   fraction: float = 1.0, impl: str = "kernelrl") -> dict:
    """``impl``'s peak extra memory <= ``fraction`` x ``peer``'s."""
    k = report.find_row(rows, case, impl, shape, dtype)
    p = report.find_row(rows, case, peer, shape, dtype)
    km = k.get("peak_mem_bytes") if k and k.get("status") == "ok" else None
    pm = p.get("peak_mem_bytes") if p and p.get("status") == "ok" else None
    if km is None or pm is None:
        missing, name = (k, impl) if km is None else (p, peer)
        why = (why_missing(missing, name) if missing is None or missing.get("status") != "ok"
               else f"{name} peak memory not measured "
                    f"({missing.get('mem_error', 'memory measurement off')})")
        return target(label, "NOT CHECKED", why)
    ok = km <= fraction * pm
    share = f"1/{pm / km:.1f}" if km else "0"
    samples = (k.get("mem_detail") or {}).get("samples_extra_bytes")
    spread = (f"; {impl} samples {', '.join(f'{b / 2**20:.0f}' for b in samples)} MiB"
              if samples and len(samples) > 1 else "")
    bound = "" if fraction == 1 else f"1/{1 / fraction:g} of "
    return target(label, "MET" if ok else "NOT MET",
                  f"{impl} {mib(km)} vs {peer} {mib(pm)} extra ({share} of {peer}'s; target <= "
                  f"{bound}{peer}'s){spread}")
