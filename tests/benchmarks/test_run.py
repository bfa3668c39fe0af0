"""Tests of the suite runner (benchmarks/run.py, suite.py) and what it prints and writes:
argument errors, family discovery, the JSON always written, the 120-column table and its
legend, the noise flag, ceilings above 100%, paired-run targets, the progress bar, and a
small end-to-end run on the CPU."""

import datetime
import io
import json
import re

import pytest
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"

import report
import suite
import targets

ENV = {"device": "cpu: test", "device_kind": "cpu", "date": "2026-01-01", "torch": "x",
       "triton": "y", "kernelrl": "abc123"}
CEILINGS = {"copy_gbps": 10.0, "bf16_tflops": None, "fp32_tflops": 0.1, "kind": "cpu",
            "note": "test"}


def _row(impl, ms, *, case="linear_logprobs fwd+bwd per-token", shape=None, times=None,
         spread=None, status="ok", **extra):
    row = {"bench": "logprobs", "case": case, "shape": shape or {"N": 8, "H": 4, "V": 16},
           "dtype": "fp32", "impl": impl, "median_ms": ms, "status": status,
           "spread": spread, "times_ms": times, "paired": times is not None}
    row.update(extra)
    return row


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, listed", [
    (["--impls", "kernelrl,nosuch"], ["torch_chunked", "kernelrl[native]", "eager"]),
    (["--cases", "token,nosuch"], ["linear_mean", "token"]),
    (["nosuchfamily"], ["logprobs"]),
])
def test_unknown_name_exits_2_listing_choices(run_script, tmp_path, args, listed):
    proc = run_script("run.py", "--device", "cpu", *args, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "nosuch" in proc.stderr and "valid choices" in proc.stderr
    for name in listed:
        assert name in proc.stderr, proc.stderr
    assert list(tmp_path.glob("*.json")) == []  # nothing ran, so nothing was written


def test_list_shows_families_cases_and_impls(run_script):
    proc = run_script("run.py", "--list", timeout=60)
    assert proc.returncode == 0, proc.stderr
    block = proc.stdout[proc.stdout.index("logprobs  (bench_logprobs.py)"):]
    assert "case linear_mean: linear_logprobs fwd+bwd mean (SFT)" in block
    assert "torch_chunked" in block
    for path in BENCH_DIR.glob("bench_*.py"):  # every family file is listed
        assert f"({path.name})" in proc.stdout


def test_broken_family_is_reported_not_fatal(tmp_path):
    good = tmp_path / "bench_good.py"
    good.write_text("BENCH = 'good'\nCASE_NAMES = {}\nIMPLS = ()\n"
                    "def plan(d, q): return []\ndef make_case(*a): pass\n"
                    "def targets(r): return []\n")
    (tmp_path / "bench_broken.py").write_text("import no_such_module_here\n")
    (tmp_path / "bench_partial.py").write_text("BENCH = 'partial'\n")
    loaded, broken = suite.load_families(suite.discover(tmp_path))
    assert list(loaded) == ["good"]
    assert "no_such_module_here" in broken["broken"]
    assert "defines no CASE_NAMES, IMPLS, plan, make_case, targets" in broken["partial"]


def test_family_discovery(tmp_path):
    for name in ("bench_b.py", "bench_a.py", "common.py", "bench_notes.txt", "xbench_c.py"):
        (tmp_path / name).write_text("")
    assert list(suite.discover(tmp_path)) == ["a", "b"]
    found = suite.discover()
    assert found["logprobs"] == BENCH_DIR / "bench_logprobs.py"
    assert set(found) == {p.stem[len("bench_"):] for p in BENCH_DIR.glob("bench_*.py")}


def test_selection_validates_against_the_families():
    fam = suite.load(BENCH_DIR / "bench_logprobs.py")
    assert suite.selection([fam], "kernelrl, eager", None) == ({"kernelrl", "eager"}, None)
    assert suite.selection([fam], None, "token") == (None, ["token"])
    with pytest.raises(suite.UsageError, match="kernelrl\\[native\\]"):
        suite.selection([fam], "kernelrl[nope]", None)
    # every implementation a case builds is a name --impls accepts
    case = fam.make_case("linear_mean", {"N": 8, "H": 4, "V": 16}, "fp32", "cpu")
    assert set(case.impls) <= set(fam.IMPLS)
    assert "torch_chunked" in case.impls


def test_kernelrl_rows_default_and_forced(monkeypatch):
    # "kernelrl" is the default dispatch (recorded), each runnable backend gets a forced row,
    # and the Triton interpreter on a CPU is never timed, even where TRITON_INTERPRET=1.
    from kernelrl import backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fam = suite.load(BENCH_DIR / "bench_logprobs.py")
    impls = fam.make_case("token", {"N": 8, "V": 32}, "fp32", "cpu").impls
    choice = impls["kernelrl"].info["dispatch"]
    assert choice in backend.BACKENDS
    assert impls["kernelrl"].same_as == f"kernelrl[{choice}]"
    assert impls[f"kernelrl[{choice}]"].row and not impls[f"kernelrl[{choice}]"].skip
    assert impls["kernelrl[torch]"].row
    assert not impls["kernelrl[triton]"].row and "interpreter" in impls["kernelrl[triton]"].skip
    import torch
    x = {"logits": torch.randn(8, 32, requires_grad=True),
         "labels": torch.randint(0, 32, (8,)), "grad": torch.randn(8)}
    logp, grad = impls["kernelrl[torch]"].build()(x)
    assert logp.shape == (8,) and grad.shape == (8, 32)


@pytest.mark.parametrize("case_id", ["linear", "linear_mean"])
def test_torch_chunked_agrees_with_eager(case_id):
    # torch's chunked F.linear_cross_entropy as a peer: checked against eager and timed, in
    # process at a tiny shape (per-token: logp = -loss with reduction="none").
    import common

    fam = suite.load(BENCH_DIR / "bench_logprobs.py")
    case = fam.make_case(case_id, {"N": 64, "H": 16, "V": 200}, "fp32", "cpu")
    rows = {r["impl"]: r for r in common.run_case(case, impls_filter={"torch_chunked"}, reps=2,
                                                  measure_memory=False)}
    assert list(rows) == ["torch_chunked"]
    assert rows["torch_chunked"]["status"] == "ok", rows["torch_chunked"]
    assert rows["torch_chunked"]["median_ms"] > 0


def test_end_to_end_default_json_path(run_script, tmp_path):
    # The smallest real run: one case of the default plan, two implementations, memory
    # on (one process each), from a cwd with no --out: the JSON lands there and its path
    # is printed last.
    proc = run_script("run.py", "logprobs", "--device", "cpu", "--cases", "token",
                      "--impls", "kernelrl,eager", "--reps", "5", timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = tmp_path / f"kernelrl-bench-cpu-{datetime.date.today().isoformat()}.json"
    assert proc.stdout.rstrip().splitlines()[-1] == f"JSON: {expected}"
    data = json.loads(expected.read_text())
    for key in ("device", "date", "torch", "triton", "kernelrl", "ceilings", "results"):
        assert key in data, key
    assert {"copy_gbps", "bf16_tflops"} <= set(data["ceilings"])
    rows = {r["impl"]: r for r in data["results"]}
    assert set(rows) == {"kernelrl", "eager"}, rows
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["fraction_of_ceiling"] > 0
        assert len(r["times_ms"]) == 5 and r["paired"] and r["spread"] is not None
        # eager holds at least one fp32 [512, 32000] log-softmax beyond its inputs
        assert r["peak_mem_bytes"] is not None
    assert rows["eager"]["peak_mem_bytes"] >= 512 * 32000 * 4
    assert rows["kernelrl"]["vs"]["eager"] == pytest.approx(
        rows["eager"]["median_ms"] / rows["kernelrl"]["median_ms"])
    lines = proc.stdout.splitlines()
    assert max(map(len, lines)) <= 120
    legend = "kernelrl = default dispatch; eager = plain torch"
    assert any(line.startswith(legend) for line in lines)
    assert "liger" not in proc.stdout  # filtered out: neither a row nor in the legend


# ----------------------------------------------------------------------------------------
# Table, legend, noise, ceilings
# ----------------------------------------------------------------------------------------
def _extreme_report():
    long_error = "RuntimeError: " + "a very long message about what went wrong " * 8
    rows = [
        _row("kernelrl", 123456.789, times=[1.0] * 5, spread=0.5, gbps=9.0,
             peak_mem_bytes=123456 * 2**20),
        _row("kernelrl[native]", 0.001, spread=12.345, gbps=1e4, tflops=123.456,
             peak_mem_bytes=1, mem_error="x" * 300),
        _row("kernelrl[triton]", 5.0, gbps=50.0),
        _row("torch_chunked", 1.0, spread=0.01, gbps=2.0),
        _row("compile", None, status="error", error=long_error),
        _row("liger", None, status="skipped", note="Liger-Kernel runs on CUDA only " * 6),
        _row("eager", 2.0, spread=0.01, gbps=1.0),
    ]
    env = dict(ENV, device="cpu: " + "An Extremely Long CPU Model Name " * 5)
    return report.build_report(env, CEILINGS, rows)


def test_table_fits_120_columns_with_legend():
    rep = _extreme_report()
    text = report.format_table(rep)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    assert max(len(line) for line in lines) > 100  # the extremes did widen it
    for part in ("kernelrl = default dispatch",
                 "kernelrl[native]/[triton] = that backend forced",
                 "compile = torch.compile of eager",
                 "torch_chunked = torch's F.linear_cross_entropy",
                 "liger = Liger-Kernel", "eager = plain torch"):
        assert part in " ".join(text.split()), part
    assert "[torch] = that backend forced" not in text  # kernelrl[torch] has no row here
    assert "ERROR: RuntimeError" in text and "skipped: Liger-Kernel" in text


def test_legend_names_only_present_impls():
    assert report.legend(["eager", "kernelrl"]) == ("kernelrl = default dispatch; "
                                                    "eager = plain torch")
    assert report.legend(["kernelrl[torch]", "custom"]) == "kernelrl[torch] = that backend forced"


def test_noise_flag():
    assert report.is_noise(1.05, 0.03, 0.03)        # 5% apart, 6% combined spread
    assert not report.is_noise(1.10, 0.03, 0.03)    # 10% apart
    assert report.is_noise(1 / 1.05, 0.03, 0.03)    # the inverse ratio: same verdict
    assert not report.is_noise(1 / 1.10, 0.03, 0.03)
    assert not report.is_noise(1.01, None, None)    # no spread measured: no flag
    assert report.is_noise(1.01, 0.02, None)

    rows = [_row("kernelrl", 100.0, spread=0.02), _row("eager", 104.0, spread=0.03),
            _row("compile", 150.0, spread=0.02)]
    report.compute_vs(rows)
    assert rows[0]["vs_noise"] == {"eager": True, "compile": False}
    table = report.format_table(report.build_report(ENV, CEILINGS, rows))
    kernelrl_line = next(l for l in table.splitlines() if l.strip().startswith("kernelrl "))
    assert "1.04x~" in kernelrl_line  # vs eager: within noise
    eager_line = next(l for l in table.splitlines() if l.strip().startswith("eager "))
    assert re.search(r"0\.96x~\s*$", eager_line)  # vs kernelrl, the last column
    compile_line = next(l for l in table.splitlines() if l.strip().startswith("compile "))
    assert "0.67x" in compile_line and "0.67x~" not in compile_line


def test_fraction_above_ceiling_is_flagged_not_capped(tmp_path):
    rows = [_row("kernelrl", 1.0, gbps=15.0), _row("eager", 2.0, gbps=7.5)]
    rep = report.build_report(ENV, CEILINGS, rows)
    assert rows[0]["fraction_of_ceiling"] == pytest.approx(1.5)  # the real figure, kept
    assert rows[1]["fraction_of_ceiling"] == pytest.approx(0.75)
    assert len(rep["warnings"]) == 1 and "150%" in rep["warnings"][0]
    assert "kernelrl" in rep["warnings"][0] and "suspect" in rep["warnings"][0]
    lines = report.format_table(rep).splitlines()
    kernelrl_line = next(l for l in lines if l.strip().startswith("kernelrl "))
    eager_line = next(l for l in lines if l.strip().startswith("eager "))
    assert ">100% (ceiling suspect)" in kernelrl_line and "75.0" in eager_line
    assert "100.0" not in kernelrl_line and "150.0" not in kernelrl_line
    out = tmp_path / "r.json"
    report.write_json(rep, out)
    data = json.loads(out.read_text())
    assert data["warnings"] == rep["warnings"]
    assert data["results"][0]["warnings"] and data["results"][0]["fraction_of_ceiling"] == 1.5


def test_not_run_rows_leave_results():
    rows = [_row("kernelrl", 1.0),
            _row("kernelrl[triton]", None, status="not_run", note="triton needs CUDA")]
    rows.append(_row("kernelrl[triton]", None, status="not_run", note="triton needs CUDA",
                     case="other case"))
    rows.append(_row("kernelrl[triton]", None, status="not_run", note="triton needs CUDA",
                     case="other case", shape={"N": 4, "V": 8}))     # the same case again
    rep = report.build_report(ENV, CEILINGS, rows)
    assert [r["impl"] for r in rep["results"]] == ["kernelrl"]
    assert [n["impl"] for n in rep["not_run"]] == ["kernelrl[triton]"] * 3
    text = report.format_table(rep)
    assert text.count("not run: kernelrl[triton] (triton needs CUDA)") == 1  # one line, both
    assert "other case fp32" in text and "linear_logprobs fwd+bwd per-token fp32" in text
    assert text.count("other case fp32") == 1           # a case named once, at any shape


# ----------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------
def _pair(k_times, p_times, peer="torch_chunked", **k_extra):
    rows = [_row("kernelrl", sorted(k_times)[len(k_times) // 2], times=k_times, **k_extra),
            _row(peer, sorted(p_times)[len(p_times) // 2], times=p_times)]
    return report.compute_vs(rows)


def test_paired_faster_target():
    case, shape = "linear_logprobs fwd+bwd per-token", {"N": 8, "H": 4, "V": 16}

    def verdict(rows, **kw):
        return targets.faster(rows, case, shape, "fp32", "torch_chunked", "t", cpu=True, **kw)

    # kernelrl faster in 4 of 5 rounds: MET on the median of the paired ratios
    t = verdict(_pair([10, 10, 10, 10, 10], [12, 11, 13, 9, 12]))
    assert t["status"] == "MET" and "median of 5 paired runs" in t["detail"], t
    # slower in most rounds: NOT MET
    assert verdict(_pair([10, 10, 10, 10, 10], [9, 9, 11, 9, 8]))["status"] == "NOT MET"
    # equal: not faster, but no slower
    rows = _pair([10] * 5, [10] * 5)
    assert verdict(rows)["status"] == "NOT MET"
    assert verdict(rows, or_equal=True)["status"] == "MET"
    # 4 paired runs are not enough for a CPU verdict
    t = verdict(_pair([10] * 4, [20] * 4))
    assert t["status"] == "NOT CHECKED" and "4 paired runs" in t["detail"], t
    # not timed in the same loop (paired False): no pairs, whatever the medians say
    rows = _pair([10] * 5, [20] * 5)
    rows[1]["paired"] = False
    assert verdict(rows)["status"] == "NOT CHECKED"
    # the peer skipped: NOT CHECKED with its reason
    rows = [_row("kernelrl", 1.0, times=[1.0] * 5),
            _row("torch_chunked", None, status="skipped", note="torch too old")]
    t = verdict(rows)
    assert t["status"] == "NOT CHECKED" and "torch too old" in t["detail"]
    # at least N times as fast
    rows = _pair([10] * 5, [300] * 5)
    assert verdict(rows, factor=30, or_equal=True)["status"] == "MET"
    t = verdict(rows, factor=31, or_equal=True)
    assert t["status"] == "NOT MET" and "target >= 31x" in t["detail"], t
    # a GPU verdict is the ratio of the medians
    t = targets.faster(_pair([10], [12]), case, shape, "fp32", "torch_chunked", "t", cpu=False)
    assert t["status"] == "MET" and "1.20x" in t["detail"]


def test_memory_target():
    case, shape = "linear_logprobs fwd+bwd per-token", {"N": 8, "H": 4, "V": 16}
    rows = [_row("kernelrl", 1.0, peak_mem_bytes=100 * 2**20),
            _row("torch_chunked", 1.0, peak_mem_bytes=120 * 2**20),
            _row("eager", 1.0, peak_mem_bytes=1000 * 2**20)]
    t = targets.memory_at_most(rows, case, shape, "fp32", "torch_chunked", "t")
    assert t["status"] == "MET", t
    t = targets.memory_at_most(rows, case, shape, "fp32", "eager", "t", fraction=1 / 16)
    assert t["status"] == "NOT MET" and "1/16" in t["detail"], t
    rows[1]["peak_mem_bytes"] = None
    t = targets.memory_at_most(rows, case, shape, "fp32", "torch_chunked", "t")
    assert t["status"] == "NOT CHECKED"


def test_cpu_targets_of_logprobs_at_full_shapes():
    fam = suite.load(BENCH_DIR / "bench_logprobs.py")
    shape = fam.CPU_LINEAR
    rows = []
    for case in (fam.CASE_NAMES["linear"], fam.CASE_NAMES["linear_mean"]):
        rows += [_row("kernelrl", 10, case=case, shape=shape, times=[10] * 5, peak_mem_bytes=10),
                 _row("eager", 12, case=case, shape=shape, times=[12] * 5, peak_mem_bytes=400),
                 _row("torch_chunked", 11, case=case, shape=shape, times=[11] * 5,
                      peak_mem_bytes=9)]
    rep = report.build_report(ENV, CEILINGS, rows)
    got = {t["target"]: t["status"] for t in fam.targets(rep)}
    chunked = {k: v for k, v in got.items() if "torch_chunked" in k}
    assert len(chunked) == 4, got
    assert all(v == "MET" for k, v in chunked.items() if "faster" in k)
    assert all(v == "NOT MET" for k, v in chunked.items() if "memory" in k)  # 10 > 9 bytes
    assert any("mean (SFT)" in k for k in chunked) and any("per-token" in k for k in chunked)
    assert sum(v == "MET" for k, v in got.items() if "eager" in k) == 2


# ----------------------------------------------------------------------------------------
# Progress bar
# ----------------------------------------------------------------------------------------
def test_progress_bar_plain_and_tty():
    import progress

    plain = io.StringIO()
    with progress.Bar(4, stream=plain, tty=False) as bar:
        bar.case(2, "logprobs:linear fp32")
        for r in range(3):
            for impl in ("kernelrl", "eager"):
                bar.step(impl, f"round {r + 1}/3")
        progress.log("hello")
    lines = plain.getvalue().splitlines()
    assert "\r" not in plain.getvalue()
    assert lines[0].startswith("[=====") and "case 2/4 logprobs:linear fp32" in lines[0]
    assert len([l for l in lines if "round" in l]) == 1  # not one line per round and impl
    assert lines[-1].endswith("hello")

    tty = io.StringIO()
    with progress.Bar(2, stream=tty, tty=True) as bar:
        bar.case(1, "c")
        bar.step("kernelrl", "check")
    out = tty.getvalue()
    assert out.count("\r") >= 2 and "kernelrl check" in out and out.endswith("\n")
