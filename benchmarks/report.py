"""Benchmark results: ``vs`` ratios and their noise flags, the report dict, its JSON file,
the plain-text table (at most :data:`WIDTH` columns) with its legend, the target lines,
row look-up, and merging several JSON files into one.

The JSON schema is written out in benchmarks/README.md ("JSON"); :func:`write_json` checks
the top-level keys (:data:`SCHEMA_TOP_KEYS`) and fills missing row keys
(:data:`SCHEMA_ROW_KEYS`: null; ``vs``: {}).
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Optional

from cases import BACKENDS, LEGEND
from timing import matmul_ceiling_tflops

SCHEMA_ROW_KEYS = (
    "bench", "case", "shape", "dtype", "impl", "median_ms", "gbps", "tflops",
    "fraction_of_ceiling", "peak_mem_bytes", "vs",
)
SCHEMA_TOP_KEYS = ("device", "date", "torch", "triton", "kernelrl", "ceilings", "results")
WIDTH = 120
SUSPECT = ">100% (ceiling suspect)"


def _group_key(row: dict) -> tuple:
    return (row.get("bench"), row.get("case"), json.dumps(row.get("shape"), sort_keys=True),
            row.get("dtype"))


def is_noise(ratio: float, spread_a: Optional[float], spread_b: Optional[float]) -> bool:
    """Whether two medians that differ by ``ratio`` may be the same speed: two runs of the
    same code differ by about their spread (interquartile range over median), so a gap
    within the sum of the two spreads is not evidence. The gap is taken as slower/faster
    - 1, so that a ratio and its inverse get the same verdict. No spread known: no flag."""
    if spread_a is None and spread_b is None:
        return False
    r = max(ratio, 1 / ratio) if ratio > 0 else math.inf
    return r - 1 <= (spread_a or 0.0) + (spread_b or 0.0)


def compute_vs(rows: list) -> list:
    """For each row, vs[other] = other's median time / this row's median time, over the rows
    of the same (bench, case, shape, dtype); > 1 means this implementation is faster.
    ``vs_noise[other]`` is True where that ratio is within the two rows' spread."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(_group_key(r), []).append(r)
    for group in groups.values():
        for r in group:
            r["vs"], r["vs_noise"] = {}, {}
            mine = r.get("median_ms")
            if not mine:
                continue
            for o in group:
                if o is r or not o.get("median_ms"):
                    continue
                ratio = o["median_ms"] / mine
                r["vs"][o["impl"]] = ratio
                r["vs_noise"][o["impl"]] = is_noise(ratio, r.get("spread"), o.get("spread"))
    return rows


def fill_fractions(rows: list, ceilings: dict) -> None:
    """fraction_of_ceiling: GB/s over the copy ceiling, else TFLOP/s over the matmul
    ceiling of the row's dtype; as measured, never capped (above 1 is flagged, not hidden)."""
    for r in rows:
        frac = None
        if r.get("gbps") is not None and ceilings.get("copy_gbps"):
            frac = r["gbps"] / ceilings["copy_gbps"]
        elif r.get("tflops") is not None and matmul_ceiling_tflops(ceilings, r.get("dtype")):
            frac = r["tflops"] / matmul_ceiling_tflops(ceilings, r.get("dtype"))
        r["fraction_of_ceiling"] = frac


def _ceiling_warnings(rows: list, ceilings: dict) -> list:
    """A fraction of a ceiling above 1 means the ceiling was measured too low (too small a
    copy or matmul, a cache serving it, a clock that changed): say so for each such row."""
    warnings = []
    for r in rows:
        frac = r.get("fraction_of_ceiling")
        if frac is None or frac <= 1:
            continue
        which = "copy" if r.get("gbps") is not None else f"{r.get('dtype')} matmul"
        msg = (f"{r.get('bench')} {r.get('case')} {_shape(r)} {r.get('dtype')} {r.get('impl')}: "
               f"{100 * frac:.0f}% of the measured {which} ceiling; the ceiling measurement is "
               f"suspect ({ceilings.get('note', 'no note')})")
        r.setdefault("warnings", []).append(msg)
        warnings.append(msg)
    return warnings


def build_report(env: dict, ceilings: dict, rows: list, targets: Optional[list] = None) -> dict:
    """The report: ``env`` keys, ceilings, results (rows run or skipped, with vs ratios),
    not_run (kernelrl backends that cannot run here, and why), targets, warnings."""
    report = dict(env)
    report["ceilings"] = ceilings
    report["results"] = compute_vs([r for r in rows if r.get("status") != "not_run"])
    fill_fractions(report["results"], ceilings)
    report["not_run"] = [{k: r.get(k) for k in ("bench", "case", "shape", "dtype", "impl", "note")}
                         for r in rows if r.get("status") == "not_run"]
    report["targets"] = targets or []
    report["warnings"] = _ceiling_warnings(report["results"], ceilings)
    return report


def write_json(report: dict, path) -> None:
    missing = [k for k in SCHEMA_TOP_KEYS if k not in report]
    if missing:
        raise ValueError(f"report is missing schema keys {missing}")
    for r in report["results"]:
        for k in SCHEMA_ROW_KEYS:
            r.setdefault(k, None if k != "vs" else {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------
def _fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


def _shape(r: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in (r.get("shape") or {}).items())


def _wrap(text: str, indent: str = "", first: str = "") -> list:
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=indent,
                         break_long_words=True, break_on_hyphens=False) or [first.rstrip()]


def fraction_cell(frac: Optional[float]) -> str:
    """A fraction of a ceiling as a percentage; above 100% it is not a result but a sign
    that the ceiling is wrong, and prints as such (never capped to 100)."""
    if frac is None:
        return "-"
    return SUSPECT if frac > 1 else f"{100 * frac:.1f}"


def _ratio_cell(r: dict, other: str) -> str:
    ratio = (r.get("vs") or {}).get(other)
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x" + ("~" if (r.get("vs_noise") or {}).get(other) else "")


VS_COLUMNS = ("eager", "kernelrl")
HEADER = ("impl", "median ms", "spread", "GB/s", "TFLOP/s", "% ceiling", "peak MiB",
          *(f"vs {o}" for o in VS_COLUMNS))
_LEFT = {0}


def _cells(r: dict) -> list:
    peak = r.get("peak_mem_bytes")
    spread = r.get("spread")
    return [
        str(r.get("impl")), _fmt(r.get("median_ms"), ".3f"),
        "-" if spread is None else f"{100 * spread:.1f}%",
        _fmt(r.get("gbps"), ".1f"), _fmt(r.get("tflops"), ".3f"),
        fraction_cell(r.get("fraction_of_ceiling")),
        "error" if r.get("mem_error") else _fmt(peak / 2**20 if peak is not None else None, ".1f"),
        *(_ratio_cell(r, o) for o in VS_COLUMNS),
    ]


def legend(impls) -> str:
    """The legend line for the implementation names present, in :data:`cases.LEGEND`'s
    order (the forced-backend entry names only the backends present)."""
    present = set(impls)
    parts = []
    for name, text in LEGEND.items():
        if name.startswith("kernelrl["):
            forced = [b for b in BACKENDS if f"kernelrl[{b}]" in present]
            if forced:
                parts.append(f"kernelrl{'/'.join(f'[{b}]' for b in forced)} = {text}")
        elif name in present:
            parts.append(f"{name} = {text}")
    return "; ".join(parts)


def format_table(report: dict) -> str:
    """The results, grouped by case, at most :data:`WIDTH` columns wide, with the legend."""
    cpu = (report.get("device_kind", "cpu") == "cpu"
           or report.get("ceilings", {}).get("kind") == "cpu")
    c = report.get("ceilings", {})
    lines = _wrap(f"device: {report.get('device')} | torch {report.get('torch')} | triton "
                  f"{report.get('triton')} | kernelrl {str(report.get('kernelrl'))[:12]} | "
                  f"{report.get('date')}", indent="  ")
    if cpu:
        gflops = c["fp32_tflops"] * 1e3 if c.get("fp32_tflops") else None
        ceiling = (f"ceilings (CPU figures, not GPU): memcpy {_fmt(c.get('copy_gbps'), '.1f')} "
                   f"GB/s, fp32 matmul {_fmt(gflops, '.1f')} GFLOP/s")
    else:
        ceiling = (f"ceilings (GPU, measured in this run): copy {_fmt(c.get('copy_gbps'), '.0f')} "
                   f"GB/s (read+write), bf16 matmul {_fmt(c.get('bf16_tflops'), '.0f')} TFLOP/s")
    lines += _wrap(ceiling, indent="  ")
    rows = report.get("results", [])
    groups: dict = {}
    for r in rows:
        groups.setdefault(_group_key(r), []).append(r)
    timed = [_cells(r) for r in rows if r.get("status") == "ok"]
    widths = [max([len(h)] + [len(c[i]) for c in timed]) for i, h in enumerate(HEADER)]

    def fmt_line(cells):
        return "  " + "  ".join(cell.ljust(widths[i]) if i in _LEFT else cell.rjust(widths[i])
                                for i, cell in enumerate(cells)).rstrip()

    message_at = 2 + widths[0] + 2
    for group in groups.values():
        r0 = group[0]
        lines.append("")
        lines += _wrap(f"{r0.get('bench')} | {r0.get('case')} | {_shape(r0)} | {r0.get('dtype')}",
                       indent="    ")
        lines.append(fmt_line(HEADER))
        for r in group:
            if r.get("status") == "ok":
                lines.append(fmt_line(_cells(r)))
                if r.get("mem_error"):
                    lines += _wrap(f"memory: {r['mem_error']}", indent=" " * message_at,
                                   first=" " * message_at)
                continue
            what = (f"ERROR: {r.get('error')}" if r.get("status") == "error"
                    else f"skipped: {r.get('note')}")
            lead = ("  " + str(r.get("impl")).ljust(widths[0]) + "  ")
            lines += _wrap(what, indent=" " * len(lead), first=lead)
    lines.append("")
    present = [r.get("impl") for r in rows]
    lines += _wrap(legend(present))
    lines += _wrap("median ms: median of the timed runs; spread: their interquartile range / "
                   "median; vs X: X's median time / this row's (> 1: this row is faster); "
                   "~: within noise (the gap is within the two rows' spreads added); peak MiB: "
                   "extra memory over the inputs; % ceiling: of the copy (GB/s) or matmul "
                   f"(TFLOP/s) ceiling measured in this run, {SUSPECT} if above it.")
    # One line per implementation and reason, not per case: a backend missing here is
    # missing for every case.
    not_run: dict = {}
    for n in report.get("not_run") or []:       # one line per reason; each case once
        where = not_run.setdefault((n.get("impl"), n.get("note")), [])
        label = f"{n.get('case')} {n.get('dtype')}"
        if label not in where:
            where.append(label)
    for (impl, why), where in not_run.items():
        lines += _wrap(f"not run: {impl} ({why}) for {', '.join(where)}", indent="  ")
    for w in report.get("warnings") or []:
        lines += _wrap(f"WARNING: {w}", indent="  ")
    return "\n".join(lines)


def format_targets(targets: list) -> str:
    lines = []
    for t in targets:
        lines += _wrap(f"[{t['status']}] {t['target']}: {t['detail']}", indent="    ")
    return "\n".join(lines)


def find_row(rows: list, case: str, impl: str, shape: dict, dtype: str) -> Optional[dict]:
    for r in rows:
        if (r.get("case") == case and r.get("impl") == impl and r.get("dtype") == dtype
                and all(r.get("shape", {}).get(k) == v for k, v in shape.items())):
            return r
    return None


def merge_reports(paths: list, out_path=None) -> dict:
    """Merge several bench JSON files into one report: the header of the first, every
    file's results, targets, not_run and warnings, and each file's ceilings under
    "ceilings_by_source"."""
    reports = []
    for p in paths:
        with open(p) as f:
            reports.append((str(p), json.load(f)))
    if not reports:
        raise ValueError("merge_reports: no input files")
    lists = ("results", "targets", "not_run", "warnings")
    merged = {k: v for k, v in reports[0][1].items() if k not in lists}
    for key in lists:
        merged[key] = [x for _, r in reports for x in r.get(key) or []]
    merged["sources"] = [p for p, _ in reports]
    merged["ceilings_by_source"] = {p: r.get("ceilings") for p, r in reports}
    if out_path is not None:
        write_json(merged, out_path)
    return merged
