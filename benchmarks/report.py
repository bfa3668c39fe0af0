"""Benchmark results: ``vs`` ratios, the report dict, its JSON file, the plain-text table
and target lines, row look-up, and merging several JSON files into one.

The JSON follows the schema of DESIGN.md "Benchmarks" (:data:`SCHEMA_TOP_KEYS`,
:data:`SCHEMA_ROW_KEYS`); :func:`write_json` checks the top-level keys and fills missing
row keys (null; ``vs``: {}).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

SCHEMA_ROW_KEYS = (
    "bench", "case", "shape", "dtype", "impl", "median_ms", "gbps", "tflops",
    "fraction_of_ceiling", "peak_mem_bytes", "vs",
)
SCHEMA_TOP_KEYS = ("device", "date", "torch", "triton", "kernelrl", "ceilings", "results")


def _group_key(row: dict) -> tuple:
    return (row.get("bench"), row.get("case"), json.dumps(row.get("shape"), sort_keys=True),
            row.get("dtype"))


def compute_vs(rows: list) -> list:
    """For each row, vs[other] = other's median time / this row's median time, over the rows
    of the same (bench, case, shape, dtype). > 1 means this implementation is faster."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(_group_key(r), []).append(r)
    for group in groups.values():
        for r in group:
            r["vs"] = {}
            mine = r.get("median_ms")
            if not mine:
                continue
            for o in group:
                if o is r or not o.get("median_ms"):
                    continue
                r["vs"][o["impl"]] = o["median_ms"] / mine
    return rows


def build_report(env: dict, ceilings: dict, rows: list, targets: Optional[list] = None) -> dict:
    report = dict(env)
    report["ceilings"] = ceilings
    report["results"] = compute_vs(rows)
    report["targets"] = targets or []
    return report


def write_json(report: dict, path) -> None:
    missing = [k for k in SCHEMA_TOP_KEYS if k not in report]
    if missing:
        raise ValueError(f"report is missing schema keys {missing}")
    for r in report["results"]:
        for k in SCHEMA_ROW_KEYS:
            r.setdefault(k, None if k != "vs" else {})
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)


def _fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


def format_table(report: dict) -> str:
    cpu = report.get("device_kind", "cpu") == "cpu" or report.get("ceilings", {}).get("kind") == "cpu"
    c = report.get("ceilings", {})
    where = "CPU" if cpu else "GPU"
    lines = [
        f"device: {report.get('device')}   torch {report.get('torch')}   triton "
        f"{report.get('triton')}   kernelrl {report.get('kernelrl')}   {report.get('date')}",
    ]
    if cpu:
        gflops = c["fp32_tflops"] * 1e3 if c.get("fp32_tflops") else None
        lines.append(f"ceilings (CPU figures, not GPU): memcpy {_fmt(c.get('copy_gbps'), '.1f')} "
                     f"GB/s, fp32 matmul {_fmt(gflops, '.1f')} GFLOP/s")
    else:
        lines.append(f"ceilings (GPU, measured in this run): copy {_fmt(c.get('copy_gbps'), '.0f')} GB/s "
                     f"(read+write), bf16 matmul {_fmt(c.get('bf16_tflops'), '.0f')} TFLOP/s")
    header = ["case", "shape", "dtype", "impl", "median ms", f"{where} GB/s",
              f"{where} TFLOP/s", "% ceiling", "peak extra MiB (over inputs)",
              "vs others (their time / this)"]
    body = []
    for r in report.get("results", []):
        shape = ",".join(f"{k}={v}" for k, v in (r.get("shape") or {}).items())
        if r.get("status") == "error":
            tail = f"ERROR: {r.get('error')}"
        elif r.get("status") == "skipped":
            tail = f"skipped: {r.get('note')}"
        else:
            tail = ", ".join(f"{k} {v:.2f}x" for k, v in sorted((r.get("vs") or {}).items()))
            if r.get("mem_error"):
                tail += f" (mem: {r['mem_error']})"
        peak = r.get("peak_mem_bytes")
        body.append([
            str(r.get("case")), shape, str(r.get("dtype")), str(r.get("impl")),
            _fmt(r.get("median_ms"), ".3f"), _fmt(r.get("gbps"), ".1f"),
            _fmt(r.get("tflops"), ".3f"),
            _fmt(r["fraction_of_ceiling"] * 100 if r.get("fraction_of_ceiling") is not None else None, ".1f"),
            _fmt(peak / 2**20 if peak is not None else None, ".1f"), tail,
        ])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    numeric = {4, 5, 6, 7, 8}

    def fmt_line(cells):
        return "  ".join(cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
                         for i, cell in enumerate(cells)).rstrip()

    lines.append(fmt_line(header))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(fmt_line(b) for b in body)
    return "\n".join(lines)


def format_targets(targets: list) -> str:
    return "\n".join(f"[{t['status']}] {t['target']}: {t['detail']}" for t in targets)


def find_row(rows: list, case: str, impl: str, shape: dict, dtype: str) -> Optional[dict]:
    for r in rows:
        if (r.get("case") == case and r.get("impl") == impl and r.get("dtype") == dtype
                and all(r.get("shape", {}).get(k) == v for k, v in shape.items())):
            return r
    return None


def merge_reports(paths: list, out_path=None) -> dict:
    """Merge several bench JSON files into one report: the header of the first, every
    file's results and targets, and each file's ceilings under "ceilings_by_source"."""
    reports = []
    for p in paths:
        with open(p) as f:
            reports.append((str(p), json.load(f)))
    if not reports:
        raise ValueError("merge_reports: no input files")
    merged = {k: v for k, v in reports[0][1].items() if k not in ("results", "targets")}
    merged["results"] = []
    merged["targets"] = []
    merged["sources"] = [p for p, _ in reports]
    merged["ceilings_by_source"] = {p: r.get("ceilings") for p, r in reports}
    for _, r in reports:
        merged["results"].extend(r.get("results", []))
        merged["targets"].extend(r.get("targets", []))
    if out_path is not None:
        write_json(merged, out_path)
    return merged
