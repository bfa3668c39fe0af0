"""Fast CPU tests of benchmarks/common.py, memory.py and report.py, plus a smoke run of
bench_logprobs.py --quick."""

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import common  # noqa: E402

if Path(common.__file__).resolve().parent != BENCH_DIR:  # another 'common' got there first
    _spec = importlib.util.spec_from_file_location("kernelrl_bench_common", BENCH_DIR / "common.py")
    common = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(common)

import memory  # noqa: E402
import report  # noqa: E402


def test_time_cpu_median_of_requested_runs(monkeypatch):
    # A fake clock: each call of fn advances it by the next duration, so the median is known.
    durations = [100.0, 0.005, 0.001, 0.003, 0.009, 0.002, 0.007, 0.004]  # 1 warm-up + 7
    clock = {"t": 0.0, "calls": 0}

    def fn():
        clock["t"] += durations[clock["calls"]]
        clock["calls"] += 1

    monkeypatch.setattr(common.time, "perf_counter", lambda: clock["t"])
    res = common.time_cpu(fn, warmup=1, reps=7)
    assert clock["calls"] == 8
    assert len(res["times_ms"]) == 7
    assert res["median_ms"] == pytest.approx(statistics.median(durations[1:]) * 1e3)
    assert res["median_ms"] == pytest.approx(4.0)  # the warm-up's 100 s is not counted


def test_time_cpu_real_clock_counts_calls():
    calls = []
    res = common.time_cpu(lambda: calls.append(1), warmup=2, reps=5)
    assert len(calls) == 7 and len(res["times_ms"]) == 5
    assert res["median_ms"] == statistics.median(res["times_ms"]) >= 0


def test_time_cpu_interleaved_round_robin_and_errors():
    log = []

    def make(name):
        return lambda: log.append(name)

    def broken():
        raise RuntimeError("boom")

    res = common.time_cpu_interleaved({"a": make("a"), "b": make("b"), "bad": broken},
                                      warmup=1, reps=5)
    assert isinstance(res["bad"], RuntimeError)
    assert len(res["a"]["times_ms"]) == 5 and len(res["b"]["times_ms"]) == 5
    assert log.count("a") == 6 and log.count("b") == 6
    timed = log[2:]  # after the warm-ups: each round runs a and b once, alternating first
    assert all(sorted(timed[i:i + 2]) == ["a", "b"] for i in range(0, 10, 2))
    assert timed[0] != timed[2]


def _row(case, impl, ms, status="ok", dtype="bf16", shape=None):
    return {"bench": "logprobs", "case": case, "shape": shape or {"N": 8, "V": 16},
            "dtype": dtype, "impl": impl, "median_ms": ms, "status": status}


def test_vs_ratios_hand_made():
    rows = [
        _row("c", "kernelrl", 10.0),
        _row("c", "eager", 20.0),
        _row("c", "liger", 5.0),
        _row("c", "compile", None, status="error"),
        _row("c", "eager", 1.0, dtype="fp32"),       # another group: never compared
        _row("c", "kernelrl", 4.0, dtype="fp32"),
    ]
    report.compute_vs(rows)
    assert rows[0]["vs"] == pytest.approx({"eager": 2.0, "liger": 0.5})
    assert rows[1]["vs"] == pytest.approx({"kernelrl": 0.5, "liger": 0.25})
    assert rows[2]["vs"] == pytest.approx({"kernelrl": 2.0, "eager": 4.0})
    assert rows[3]["vs"] == {}
    assert rows[4]["vs"] == pytest.approx({"kernelrl": 4.0})
    assert rows[5]["vs"] == pytest.approx({"eager": 0.25})


def test_json_writer_schema_and_merge(tmp_path):
    env = {"device": "cpu: test", "device_kind": "cpu", "date": "2026-01-01", "torch": "x",
           "triton": "y", "kernelrl": "abc123"}
    ceilings = {"copy_gbps": 10.0, "bf16_tflops": None, "fp32_tflops": 0.1, "kind": "cpu"}
    rows = [_row("c", "kernelrl", 1.0), _row("c", "eager", 3.0)]
    rep = report.build_report(env, ceilings, rows)
    out = tmp_path / "r.json"
    report.write_json(rep, out)
    data = json.loads(out.read_text())
    for key in ("device", "date", "torch", "triton", "kernelrl", "ceilings", "results"):
        assert key in data, key
    assert {"copy_gbps", "bf16_tflops"} <= set(data["ceilings"])
    for r in data["results"]:
        for key in ("bench", "case", "shape", "dtype", "impl", "median_ms", "gbps", "tflops",
                    "fraction_of_ceiling", "peak_mem_bytes", "vs"):
            assert key in r, key
    assert data["results"][0]["vs"] == pytest.approx({"eager": 3.0})

    table = report.format_table(data)
    assert "CPU figures, not GPU" in table and "GPU GB/s" not in table

    out2 = tmp_path / "r2.json"
    report.write_json(report.build_report(env, ceilings, [_row("d", "eager", 2.0)]), out2)
    merged = report.merge_reports([out, out2], tmp_path / "m.json")
    assert len(merged["results"]) == 3
    assert json.loads((tmp_path / "m.json").read_text())["kernelrl"] == "abc123"
    assert common.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_run_case_reports_failures_and_mismatches_as_rows():
    torch = pytest.importorskip("torch")

    def make_inputs(seed):
        g = torch.Generator().manual_seed(seed)
        return {"x": torch.randn(64, 32, generator=g)}

    def check(ref, out):
        diff = (out[0] - ref[0]).abs().max().item()
        return None if diff <= 1e-6 else f"max abs diff {diff:.3g}"

    def broken():
        raise ImportError("peer not installed")

    impls = {
        "eager": common.Impl(lambda: lambda x: (x["x"].softmax(-1),)),
        "good": common.Impl(lambda: lambda x: (x["x"].exp() / x["x"].exp().sum(-1, keepdim=True),)),
        "wrong": common.Impl(lambda: lambda x: (x["x"].softmax(0),)),
        "crashes": common.Impl(lambda: lambda x: (_ for _ in ()).throw(RuntimeError("oom"))),
        "missing": common.Impl(broken),
        "skipped": common.Impl(lambda: None, skip="CUDA only"),
    }
    case = common.Case(bench="t", case_id="softmax", case="softmax fwd", shape={"N": 64, "V": 32},
                       dtype="fp32", make_inputs=make_inputs, impls=impls, check=check,
                       bytes_moved=2 * 64 * 32 * 4, device="cpu")
    rows = {r["impl"]: r for r in common.run_case(case, {"copy_gbps": 10.0}, reps=5,
                                                  measure_memory=False)}
    assert rows["eager"]["status"] == "ok" and rows["good"]["status"] == "ok"
    assert rows["good"]["median_ms"] > 0 and rows["good"]["gbps"] > 0
    assert rows["good"]["fraction_of_ceiling"] == pytest.approx(rows["good"]["gbps"] / 10.0)
    assert rows["wrong"]["status"] == "error" and "mismatch" in rows["wrong"]["error"]
    assert rows["crashes"]["status"] == "error" and "oom" in rows["crashes"]["error"]
    assert rows["missing"]["status"] == "error" and "not installed" in rows["missing"]["error"]
    assert rows["skipped"]["status"] == "skipped" and rows["skipped"]["note"] == "CUDA only"
    for name in ("wrong", "crashes", "missing", "skipped"):
        assert rows[name]["median_ms"] is None


CHILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {bench_dir!r})
    import memory
    n = int(sys.argv[1])

    def run(_):
        block = b"\\x01" * n if n else b""   # touches every page
        return len(block)

    print(json.dumps(memory.rss_child_measure(lambda: None, run)))
""")


def test_fresh_subprocess_peak_rss_sees_200mb(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(bench_dir=str(BENCH_DIR)))
    big = memory.run_child([str(script), str(200 * 2**20)], timeout=60)
    small = memory.run_child([str(script), "0"], timeout=60)
    assert big["extra_bytes"] - small["extra_bytes"] > 150 * 2**20, (big, small)
    assert small["extra_bytes"] < 50 * 2**20, small


def test_bench_logprobs_quick_smoke(tmp_path):
    out = tmp_path / "quick.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    for var in ("TRITON_INTERPRET", "KERNELRL_BACKEND"):  # a plain user's run: default dispatch
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / "bench_logprobs.py"), "--quick", "--device", "cpu",
         "--impls", "kernelrl,eager", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["ceilings"]["kind"] == "cpu"
    by_impl = {}
    for r in data["results"]:
        by_impl.setdefault(r["impl"], []).append(r)
    for impl in ("kernelrl", "eager"):
        assert by_impl.get(impl), f"no {impl} rows: {data['results']}"
        for r in by_impl[impl]:
            assert r["status"] == "ok", r
            assert r["median_ms"] is not None and math.isfinite(r["median_ms"]) and r["median_ms"] > 0
            assert r["peak_mem_bytes"] is not None
    assert "MET" in proc.stdout or "NOT CHECKED" in proc.stdout
