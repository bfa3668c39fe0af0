"""Fast CPU tests of benchmarks/common.py, timing.py, memory.py and report.py, plus a
smoke run of bench_logprobs.py on its own."""

import json
import math
import statistics
import time
import textwrap

import pytest
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"

import common
import memory
import report
import timing


def test_time_cpu_median_of_requested_runs(monkeypatch):
    # A fake clock: each call of fn advances it by the next duration, so the median is known.
    durations = [100.0, 0.005, 0.001, 0.003, 0.009, 0.002, 0.007, 0.004]  # 1 warm-up + 7
    clock = {"t": 0.0, "calls": 0}

    def fn():
        clock["t"] += durations[clock["calls"]]
        clock["calls"] += 1

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])
    res = timing.time_cpu(fn, warmup=1, reps=7)
    assert clock["calls"] == 8
    assert len(res["times_ms"]) == 7
    assert res["median_ms"] == pytest.approx(statistics.median(durations[1:]) * 1e3)
    assert res["median_ms"] == pytest.approx(4.0)  # the warm-up's 100 s is not counted
    # spread = IQR / median; sorted runs 1,2,3,4,5,7,9 ms: Q1 = 2.5, Q3 = 6 (inclusive)
    assert res["spread"] == pytest.approx((6.0 - 2.5) / 4.0)


def test_time_cpu_real_clock_counts_calls():
    calls = []
    res = timing.time_cpu(lambda: calls.append(1), warmup=2, reps=5)
    assert len(calls) == 7 and len(res["times_ms"]) == 5
    assert res["median_ms"] == statistics.median(res["times_ms"]) >= 0


def test_time_cpu_interleaved_round_robin_and_errors():
    log = []

    def make(name):        # slower than MIN_ROUND_MS: one call per round
        return lambda: (log.append(name), time.sleep(timing.MIN_ROUND_MS * 1.2e-3))

    def broken():
        raise RuntimeError("boom")

    res = timing.time_cpu_interleaved({"a": make("a"), "b": make("b"), "bad": broken},
                                      warmup=1, reps=5)
    assert isinstance(res["bad"], RuntimeError)
    assert len(res["a"]["times_ms"]) == 5 and len(res["b"]["times_ms"]) == 5
    assert log.count("a") == 7 and log.count("b") == 7
    timed = log[4:]  # after the warm-ups (2 each): each round runs a and b once, alternating first
    assert all(sorted(timed[i:i + 2]) == ["a", "b"] for i in range(0, 10, 2))
    assert timed[0] != timed[2]
    assert res["a"]["paired"] and res["b"]["paired"]
    assert res["a"]["calls_per_round"] == 1


def test_time_cpu_interleaved_repeats_short_calls():
    """A call far under MIN_ROUND_MS is repeated within its round; the round's figure is
    the mean per call, not the round's total."""
    log = []
    slow_ms = timing.MIN_ROUND_MS * 1.2

    def short():
        log.append("short")

    def slow():
        log.append("slow")
        time.sleep(slow_ms * 1e-3)

    res = timing.time_cpu_interleaved({"short": short, "slow": slow}, warmup=1, reps=3)
    k = res["short"]["calls_per_round"]
    assert k > 1 and res["slow"]["calls_per_round"] == 1
    assert log.count("short") == 2 + 3 * k and log.count("slow") == 5
    assert res["short"]["median_ms"] < timing.MIN_ROUND_MS / 2
    assert res["slow"]["median_ms"] >= slow_ms


def test_time_gpu_loop_is_per_call(monkeypatch):
    """The back-to-back GPU figure is a round's elapsed time over its calls (CUDA events
    stood in for by wall-clock stamps; synchronize does nothing here)."""
    import torch

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    calls = []
    res = timing.time_gpu_loop(lambda: (calls.append(1), time.sleep(1e-3)), estimate_ms=1.0,
                               loop_ms=10.0, rounds=3)
    assert res["calls_per_round"] == 10
    assert len(calls) == 10 + 3 * 10                 # 10 warm-up calls, then 3 rounds
    assert 1.0 <= res["median_ms"] < 5.0             # per call, not per round


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
    rows[0]["gbps"] = 4.0
    rep = report.build_report(env, ceilings, rows)
    assert rows[0]["fraction_of_ceiling"] == pytest.approx(0.4)
    assert rows[1]["fraction_of_ceiling"] is None  # no rate, no fraction
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
        # a diagnostic lower bound: its output is not the result, and must not be judged
        "bound": common.Impl(lambda: lambda x: (x["x"][:1],), checked=False),
    }
    case = common.Case(bench="t", case_id="softmax", case="softmax fwd", shape={"N": 64, "V": 32},
                       dtype="fp32", make_inputs=make_inputs, impls=impls, check=check,
                       bytes_moved=2 * 64 * 32 * 4, device="cpu")
    rows = {r["impl"]: r for r in common.run_case(case, reps=5, measure_memory=False)}
    assert rows["eager"]["status"] == "ok" and rows["good"]["status"] == "ok"
    assert rows["good"]["median_ms"] > 0 and rows["good"]["gbps"] > 0
    assert rows["good"]["paired"] and len(rows["good"]["times_ms"]) == 5
    assert rows["good"]["spread"] is not None
    assert rows["wrong"]["status"] == "error" and "mismatch" in rows["wrong"]["error"]
    assert rows["crashes"]["status"] == "error" and "oom" in rows["crashes"]["error"]
    assert rows["missing"]["status"] == "error" and "not installed" in rows["missing"]["error"]
    assert rows["skipped"]["status"] == "skipped" and rows["skipped"]["note"] == "CUDA only"
    assert rows["bound"]["status"] == "ok" and rows["bound"]["median_ms"] > 0
    assert rows["bound"]["gbps"] is None            # it moves none of the case's bytes
    for name in ("wrong", "crashes", "missing", "skipped"):
        assert rows[name]["median_ms"] is None


FAKE_CHILD = textwrap.dedent("""
    import json, sys
    spec = json.loads(sys.argv[2])                  # argv: --_child SPEC
    with open({log!r}, "a") as f:
        f.write(spec["impl"] + "\\n")
    print(json.dumps({{"extra_bytes": {{"a": 100, "b": 200}}[spec["impl"]]}}))
""")


def test_cpu_memory_children_and_same_code_twin(tmp_path):
    # Memory children are this bench script run with --_child; "twin" runs the same code as
    # "a" (Impl.same_as), so it takes a's figure and costs no process of its own.
    log = tmp_path / "calls.txt"
    script = tmp_path / "fake_bench.py"
    script.write_text(FAKE_CHILD.format(log=str(log)))
    impls = {"a": common.Impl(lambda: None), "b": common.Impl(lambda: None),
             "twin": common.Impl(lambda: None, same_as="a")}
    case = common.Case(bench="t", case_id="c", case="c", shape={"N": 1}, dtype="fp32",
                       make_inputs=lambda seed: {}, impls=impls)
    rows = {n: common.make_row(case, n, median_ms=1.0) for n in impls}
    common._cpu_memory(case, list(impls), rows, str(script), timeout=60, repeats=3, jobs=2)
    assert sorted(log.read_text().split()) == ["a"] * 3 + ["b"] * 3
    assert rows["a"]["peak_mem_bytes"] == 100 and rows["b"]["peak_mem_bytes"] == 200
    assert rows["a"]["mem_detail"]["samples_extra_bytes"] == [100] * 3
    assert rows["twin"]["peak_mem_bytes"] == 100 and "same code as a" in rows["twin"]["mem_method"]


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


def test_bench_logprobs_runs_on_its_own(run_script, tmp_path):
    # The bench file still runs by itself (the JSON only with --out), and serves as the
    # memory child: one case, two implementations, memory off to stay fast.
    out = tmp_path / "quick.json"
    proc = run_script("bench_logprobs.py", "--quick", "--device", "cpu", "--cases", "linear_mean",
                      "--impls", "kernelrl,eager", "--no-mem", "--reps", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["ceilings"]["kind"] == "cpu"
    assert {r["impl"] for r in data["results"]} == {"kernelrl", "eager"}
    for r in data["results"]:
        assert r["status"] == "ok", r
        assert r["median_ms"] is not None and math.isfinite(r["median_ms"]) and r["median_ms"] > 0
        assert len(r["times_ms"]) == 3
    assert "[NOT CHECKED]" in proc.stdout  # targets are at the full shapes, not run here

    child = run_script("bench_logprobs.py", "--_child", json.dumps(
        {"case_id": "token", "shape": {"N": 64, "V": 1000}, "dtype": "fp32", "device": "cpu",
         "impl": "eager"}))
    res = json.loads(child.stdout.strip().splitlines()[-1])
    assert "error" not in res, res
    # eager holds at least the fp32 log-softmax of the [64, 1000] logits
    assert res["extra_bytes"] >= 64 * 1000 * 4, res
