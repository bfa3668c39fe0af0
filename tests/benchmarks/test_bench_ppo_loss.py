"""Tests of benchmarks/bench_ppo_loss.py's GPU targets on synthetic reports: judged on
do_bench's medians, and where the rows were also timed back to back (host-bound calls,
``loop_ms``), on those as well."""

from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"

import report  # noqa: E402
import suite  # noqa: E402

ENV = {"device": "cuda: test", "device_kind": "cuda", "date": "2026-01-01", "torch": "x",
       "triton": "y", "kernelrl": "abc123"}
CEILINGS = {"copy_gbps": 1000.0, "bf16_tflops": 100.0, "fp32_tflops": None, "kind": "gpu",
            "note": "test"}


@pytest.fixture(scope="module")
def fam():
    return suite.load(BENCH_DIR / "bench_ppo_loss.py")


def _rows(fam, times: dict, loops: dict | None = None) -> list:
    """Rows for both cases at the target shape: impl -> median ms (and loop ms)."""
    rows = []
    for case in fam.CASE_NAMES.values():
        for impl, ms in times.items():
            row = {"bench": "ppo_loss", "case": case, "shape": dict(fam.TARGET_SHAPE),
                   "dtype": "fp32", "impl": impl, "median_ms": ms, "status": "ok",
                   "spread": 0.01, "times_ms": None, "paired": False}
            if loops:
                row["loop_ms"] = loops[impl]
            rows.append(row)
    return rows


def _statuses(fam, rows) -> dict:
    rep = report.build_report(ENV, CEILINGS, rows)
    return {t["target"]: t for t in fam.targets(rep)}


def test_gpu_targets_by_do_bench_alone(fam):
    got = _statuses(fam, _rows(fam, {"kernelrl": 0.2, "eager": 2.0, "compile": 0.5}))
    assert len(got) == 4
    for name, t in got.items():
        assert t["status"] == ("MET" if "eager" in name else "NOT MET"), t   # 10x and 2.5x


def test_gpu_targets_need_the_back_to_back_figures_too(fam):
    times = {"kernelrl": 0.2, "eager": 2.0, "compile": 0.7}               # 10x and 3.5x
    loops = {"kernelrl": 0.3, "eager": 2.2, "compile": 0.8}               # 7.3x and 2.7x
    got = _statuses(fam, _rows(fam, times, loops))
    for name, t in got.items():
        assert t["status"] == ("MET" if "eager" in name else "NOT MET"), t
        assert "back to back" in t["detail"] and "MET needs both" in t["detail"]
    loops["compile"] = 0.95                                               # 3.2x
    got = _statuses(fam, _rows(fam, times, loops))
    assert all(t["status"] == "MET" for t in got.values()), got


def test_gpu_targets_say_where_the_autograd_floor_puts_them(fam):
    # the floor row: autograd alone. compile at 2.5x the floor: 3x is out of reach
    times = {"kernelrl": 0.3, "eager": 2.0, "compile": 0.5, "floor": 0.2}
    got = _statuses(fam, _rows(fam, times))
    for name, t in got.items():
        assert "autograd floor 0.200 ms (do_bench)" in t["detail"], t
        assert ("out of reach" in t["detail"]) == ("compile" in name), t
        assert t["status"] == ("MET" if "eager" in name else "NOT MET"), t
    # back-to-back figures, where both rows have them, are the ones compared
    loops = {"kernelrl": 0.3, "eager": 2.2, "compile": 0.7, "floor": 0.2}   # 3.5x the floor
    got = _statuses(fam, _rows(fam, times, loops))
    for t in got.values():
        assert "autograd floor 0.200 ms (back to back)" in t["detail"], t
        assert "out of reach" not in t["detail"], t
