"""Tests of benchmarks/bench_moe.py (the "moe" family: moe_ffn fwd+bwd against HF's
MixtralExperts (eager and grouped_mm), the dense einsum and dense GEMMs of the same FLOPs;
the routing permutation alone): it is listed, its plans, an ffn case at a tiny shape
checked and timed with the torch backend, the float64 references agree, the checks catch
broken outputs, the determinism check catches a run that differs, the script end to end,
and its targets on synthetic reports (CPU and GPU)."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"

import common  # noqa: E402
import report  # noqa: E402
import suite  # noqa: E402

ENV = {"device": "cpu: test", "device_kind": "cpu", "date": "2026-01-01", "torch": "x",
       "triton": "y", "kernelrl": "abc123"}
CEILINGS = {"copy_gbps": 10.0, "bf16_tflops": None, "fp32_tflops": 0.1, "kind": "cpu",
            "note": "test"}
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
TORCH_ROWS = {"kernelrl[torch]", "hf_eager", "hf_grouped_mm", "einsum", "dense"}
TINY = {"N": 48, "D": 32, "F": 48, "E": 4, "K": 2}


@pytest.fixture(scope="module")
def fam():
    return suite.load(BENCH_DIR / "bench_moe.py")


def test_listed_with_cases_and_impls(fam):
    run = suite.load(BENCH_DIR / "run.py")
    text = run.list_families({"moe": BENCH_DIR / "bench_moe.py"})
    for line in ("moe  (bench_moe.py)", "case ffn: moe_ffn fwd+bwd", "case permute: moe permute",
                 "hf_eager, hf_grouped_mm, einsum, dense"):
        assert line in text, text
    for case_id, shape, dtype in fam.plan("cpu", True):   # every row a name --impls takes
        assert set(fam.make_case(case_id, shape, dtype, "cpu").impls) <= set(fam.IMPLS)


def test_plans(fam):
    def ffn(plan):
        return [(s["N"], s["D"], s["F"], s["E"], s["K"]) for c, s, d in plan if c == "ffn"]

    def permute(plan):
        return [(s["N"], s["K"], s["E"], d) for c, s, d in plan if c == "permute"]

    quick = fam.plan("cpu", True)
    assert ffn(quick) == [(256, 256, 512, 8, 2), (256, 128, 128, 64, 8)]
    assert all(d == "bf16" for c, _, d in quick if c == "ffn")
    # the permutation sizes, N·K = 16,384 and 65,536, in every plan
    assert permute(quick) == [(8192, 2, 8, "int64"), (8192, 8, 64, "int64")]
    full = fam.plan("cpu", False)
    assert ffn(full) == [(1024, 1024, 3584, 8, 2), (1024, 512, 512, 64, 2),
                         (1024, 512, 512, 64, 8)]
    assert permute(full) == permute(quick)
    gpu = fam.plan("cuda", False)
    assert fam.plan("cuda", True) == gpu
    assert ffn(gpu) == [(8192, 4096, 14336, 8, 2), (8192, 1024, 1024, 64, 2),
                        (8192, 1024, 1024, 64, 8)]
    with pytest.raises(ValueError, match="case_id"):
        fam.make_case("nosuch", TINY, "bf16", "cpu")
    with pytest.raises(ValueError, match="N, D, F, E, K"):
        fam.make_case("ffn", {"N": 8, "D": 8}, "bf16", "cpu")


def test_ffn_case_checked_and_timed_at_a_tiny_shape(fam):
    # an ffn case end to end as run.py runs it, kernelrl with the torch backend forced:
    # every row agrees with float64, records its determinism and is timed. A tiny shape,
    # E=4, rather than the default plan's (E=64 loops 64 experts per call in three rows,
    # which on a loaded 2-core machine took from 7 to 80 s)
    shape = dict(TINY)
    case = fam.make_case("ffn", shape, "bf16", "cpu")
    assert case.flops == 18 * 48 * 2 * 32 * 48 and case.ref == "einsum"
    rows = {r["impl"]: r for r in common.run_case(case, impls_filter=TORCH_ROWS, reps=2,
                                                  measure_memory=False)}
    want = {"kernelrl[torch]", "einsum", "dense"} | (
        {"hf_eager", "hf_grouped_mm"} if HAS_TRANSFORMERS else set())
    assert want <= set(rows)
    for name in want:
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["tflops"] > 0 and r["paired"]
        assert r["expert_load"]["max_over_mean"] > 1 > r["expert_load"]["min_over_mean"]
        assert sum(r["expert_load"]["counts"]) == 48 * 2
        if name == "dense":
            assert "deterministic" not in r
        else:
            assert r["deterministic"] is True, r
            assert r["determinism"].startswith("3 runs bitwise identical"), r
    if HAS_TRANSFORMERS:
        assert "grouped_mm" in rows["hf_grouped_mm"]["grouped_mm_path"]
    else:
        assert rows["hf_eager"]["status"] == "skipped"
    # the table and the targets as run.py prints them
    rep = report.build_report(ENV, CEILINGS, list(rows.values()))
    rep["targets"] = fam.targets(rep)
    table = report.format_table(rep)
    assert "moe | moe_ffn fwd+bwd | N=48 D=32 F=48 E=4 K=2 | bf16" in table
    assert "einsum = every expert on every token" in table and "dense = the dense bf16" in table
    assert max(map(len, table.splitlines())) <= 120
    text = " ".join(report.format_targets(rep["targets"]).split())
    det, gpu = rep["targets"]
    assert det["status"] == "NOT CHECKED"          # only kernelrl[torch], not the default row
    assert "kernelrl[torch] identical" in det["detail"] and "einsum identical" in det["detail"]
    assert gpu["status"] == "NOT CHECKED" and gpu["target"].startswith("GPU moe_ffn")
    for t in rep["targets"]:
        assert f"[{t['status']}] {t['target']}" in text


def test_kernelrl_rows_and_their_dispatch(fam):
    case = fam.make_case("ffn", TINY, "bf16", "cpu")
    assert "kernelrl" in case.impls and "kernelrl[torch]" in case.impls
    assert not case.impls["kernelrl[triton]"].row       # the Triton interpreter is not timed
    rows = {r["impl"]: r for r in common.run_case(
        case, impls_filter={"kernelrl", "kernelrl[native]", "kernelrl[torch]"}, reps=1,
        measure_memory=False)}
    assert rows["kernelrl[torch]"]["status"] == "ok", rows["kernelrl[torch]"]
    if rows["kernelrl"]["status"] == "ok":       # the native library may not be built
        assert rows["kernelrl"]["dispatch"] in ("native", "torch")
        assert rows["kernelrl"]["deterministic"] is True


def test_float64_references_agree(fam, monkeypatch):
    # moe_ffn_reference over chunks of tokens and the per-expert formula (the GPU shapes')
    import torch

    x = fam.make_case("ffn", TINY, "bf16", "cpu").make_inputs(0)
    assert fam._reference_chunks(x) > 0
    chunked = fam.float64_reference(x)
    monkeypatch.setattr(fam, "REF_GATHER_BYTES", 1)
    assert fam._reference_chunks(x) == 0
    per_expert = fam.float64_reference(x)
    assert all(a.dtype == torch.float64 for a in per_expert)
    for a, b in zip(chunked, per_expert):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    # the reference is the unchunked moe_ffn_reference (small enough here to run whole)
    from kernelrl.ops.moe.torch_impl import moe_ffn_reference
    f64 = [x[k].detach().double().requires_grad_(True)
           for k in ("x", "weights", "w_gate_up", "w_down")]
    y = moe_ffn_reference(f64[0], f64[1], x["experts"], f64[2], f64[3])
    whole = (y.detach(), *torch.autograd.grad(y, f64, x["g"].double()))
    for a, b in zip(chunked, whole):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_ffn_check_catches_wrong_outputs(fam):
    case = fam.make_case("ffn", TINY, "bf16", "cpu")
    x = case.make_inputs(0)
    ref = tuple(t.detach() for t in case.impls["einsum"].build()(x))
    out = tuple(t.detach() for t in case.impls["kernelrl[torch]"].build()(x))
    assert case.check(ref, out) is None
    assert "y off the float64" in case.check(ref, (out[0] * 1.05, *out[1:]))
    dw = out[4].clone()
    dw[1] = 0                                    # one expert's down gradient lost
    assert "dw_down off the float64" in case.check(ref, (*out[:4], dw))
    assert "dweights shape" in case.check(ref, (out[0], out[1], out[2].t(), *out[3:]))
    assert "returned 4" in case.check(ref, out[:4])
    # dense: another function, held to its shapes and finite values only
    dense = tuple(t.detach() for t in case.impls["dense"].build()(x))
    assert [tuple(t.shape) for t in dense] == list(fam.dense_shapes(TINY))
    assert case.check(ref, dense) is None
    bad = dense[0].clone()
    bad[0, 0] = float("nan")
    assert "non-finite" in case.check(ref, (bad, *dense[1:]))


def test_determinism_check_catches_a_differing_run(fam):
    import torch

    calls = {"n": 0}

    def flaky(x):
        calls["n"] += 1
        y = x["a"] * 2
        if calls["n"] == 2:                     # the second run is one ulp off somewhere
            y = y.clone()
            y[3] = torch.nextafter(y[3], torch.tensor(float("inf")))
        return (y, x["a"] + 1)

    x = {"a": torch.randn(16)}
    info = {}
    fn = fam.deterministic(flaky, info)
    fn(x)
    assert calls["n"] == 3 and info["deterministic"] is False
    assert "run 2: out0 differs in 1 of 16 elements" in info["determinism"]
    fn(x)                                       # later calls are plain calls
    assert calls["n"] == 4

    steady = {}
    fam.deterministic(lambda x: (x["a"] * 2,), steady)(x)
    assert steady == {"deterministic": True, "determinism": "3 runs bitwise identical (out0)"}


def test_permute_case_and_its_check(fam):
    import torch

    case = fam.make_case("permute", {"N": 512, "K": 8, "E": 64}, "int64", "cpu")
    assert case.ref == "kernelrl[torch]"
    assert case.bytes_moved == 4096 * 8 + 8 * 4096 + 4 * 65
    rows = {r["impl"]: r for r in common.run_case(case, reps=1, measure_memory=False)}
    assert rows["kernelrl[torch]"]["status"] == "ok", rows["kernelrl[torch]"]
    assert rows["kernelrl[torch]"]["slots"] == 4096
    assert rows["kernelrl[triton]"]["status"] == "not_run"
    if rows["kernelrl[native]"]["status"] == "ok":
        assert rows["kernelrl"]["status"] == "ok"
    x = case.make_inputs(0)
    out = case.impls["kernelrl[torch]"].build()(x)
    assert case.check(out, out) is None
    order = out[0].clone()
    order[[0, 1]] = order[[1, 0]]
    assert "order differs from the stable sort's in 2 of 4096" in case.check(out, (order, *out[1:]))
    assert "offsets" in case.check(out, (out[0], out[1].long(), out[2]))
    # the reference permutation itself: a stable sort, its inverse and the scan of counts
    o, off, pos = fam.stable_sort_permutation(x["experts"], 64)
    flat = x["experts"].reshape(-1)
    assert torch.equal(flat[o.long()], torch.sort(flat).values)
    assert torch.equal(pos[o.long()], torch.arange(4096, dtype=torch.int32))
    assert off[-1] == 4096 and torch.all(off[1:] >= off[:-1])


def test_script_end_to_end(run_script, tmp_path):
    # bench_moe.py as a user runs it: the permutation cases (the ffn cases' table and
    # targets are covered in process above, as they take long on a loaded 2-core machine),
    # no memory processes; the table, the targets, the JSON
    out = tmp_path / "moe.json"
    proc = run_script("bench_moe.py", "--quick", "--device", "cpu", "--cases", "permute",
                      "--impls", "kernelrl[torch],kernelrl[native]", "--no-mem", "--reps", "5",
                      "--out", str(out), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for head in ("moe | moe permute | N=8192 K=2 E=8 | int64",
                 "moe | moe permute | N=8192 K=8 E=64 | int64"):
        assert head in proc.stdout, proc.stdout
    assert max(map(len, proc.stdout.splitlines())) <= 120
    data = json.loads(out.read_text())
    rows = [r for r in data["results"] if r["impl"] == "kernelrl[torch]"]
    assert len(rows) == 2 and all(r["status"] == "ok" and r["gbps"] > 0 for r in rows), rows
    assert sorted(r["slots"] for r in rows) == [16384, 65536]
    lines = data["targets"]
    assert [t["status"] for t in lines] == ["NOT CHECKED", "NOT CHECKED"]   # no ffn case
    for t in lines:
        assert f"[{t['status']}] {t['target']}" in " ".join(proc.stdout.split())


def _row(fam, case_id, impl, ms, shape, dtype="bf16", **extra):
    row = {"bench": "moe", "case": fam.CASE_NAMES[case_id], "shape": dict(shape),
           "dtype": dtype, "impl": impl, "median_ms": ms, "status": "ok", "spread": 0.01,
           "times_ms": [ms] * 5, "paired": True}
    row.update(extra)
    return row


def test_cpu_targets_on_a_synthetic_report(fam):
    a, b, c = ({"N": 64, "D": 32, "F": 32, "E": 8, "K": k} for k in (1, 2, 3))
    ok = {"deterministic": True, "determinism": "3 runs bitwise identical (y, ...)"}
    rows = [_row(fam, "ffn", "kernelrl", 1.0, a, **ok),
            _row(fam, "ffn", "hf_eager", 2.0, a, deterministic=False, determinism="x"),
            _row(fam, "ffn", "dense", 0.5, a),
            _row(fam, "ffn", "kernelrl", 1.0, b, deterministic=False,
                 determinism="run 3: dx differs in 2 of 10 elements"),
            _row(fam, "ffn", "einsum", 1.0, c, **ok),           # no kernelrl row at c
            _row(fam, "permute", "kernelrl", 0.1, {"N": 8, "K": 2, "E": 4}, "int64")]
    got = fam.targets(report.build_report(ENV, CEILINGS, rows))
    assert all(set(t) == {"target", "status", "detail"} for t in got)
    status = {t["target"]: t for t in got}
    goal = "kernelrl outputs and gradients bitwise identical across 3 runs"
    first = status[f"moe_ffn fwd+bwd N=64 D=32 F=32 E=8 K=1 bf16: {goal}"]
    assert first["status"] == "MET" and "other rows: hf_eager DIFFERS" in first["detail"]
    second = status[f"moe_ffn fwd+bwd N=64 D=32 F=32 E=8 K=2 bf16: {goal}"]
    assert second["status"] == "NOT MET" and "dx differs" in second["detail"]
    third = status[f"moe_ffn fwd+bwd N=64 D=32 F=32 E=8 K=3 bf16: {goal}"]
    assert third["status"] == "NOT CHECKED" and "einsum identical" in third["detail"]
    gpu = [t for t in got if t["target"].startswith("GPU")]
    assert len(gpu) == 1 and gpu[0]["status"] == "NOT CHECKED"
    assert len(got) == 4
    # no ffn case at all (a --cases permute run)
    only_permute = fam.targets(report.build_report(ENV, CEILINGS, rows[-1:]))
    assert [t["status"] for t in only_permute] == ["NOT CHECKED", "NOT CHECKED"]


def test_gpu_targets_on_a_synthetic_report(fam):
    rows = []
    # Mixtral: 2.5x HF eager, 1.2x dense; E=64 K=2: 1.5x HF, 1.5x dense; E=64 K=8: no dense
    for shape, (k, hf, dense) in zip(fam.GPU_FFN, ((1.0, 2.5, 1 / 1.2), (1.0, 1.5, 1 / 1.5),
                                                   (1.0, 3.0, None))):
        rows += [_row(fam, "ffn", "kernelrl", k, shape, deterministic=True, determinism="3 runs"),
                 _row(fam, "ffn", "hf_eager", hf, shape)]
        if dense:
            rows.append(_row(fam, "ffn", "dense", dense, shape))
    for r in rows:
        r["times_ms"], r["paired"] = None, False
    rep = report.build_report(dict(ENV, device_kind="cuda"), dict(CEILINGS, kind="gpu"), rows)
    got = {t["target"]: t for t in fam.targets(rep)}
    assert len(got) == 3 + 3 * 2
    hf = "kernelrl >= 2x faster than HF's eager loop"
    dense = "kernelrl <= 1.3x the dense GEMMs' time (same FLOPs)"
    at = "GPU moe_ffn fwd+bwd N=8192 D={} F={} E={} K={} bf16: "
    mixtral, small2, small8 = at.format(4096, 14336, 8, 2), at.format(1024, 1024, 64, 2), \
        at.format(1024, 1024, 64, 8)
    assert got[mixtral + hf]["status"] == "MET"
    assert got[mixtral + dense]["status"] == "MET" and "1.20x" in got[mixtral + dense]["detail"]
    assert got[small2 + hf]["status"] == "NOT MET"
    assert got[small2 + dense]["status"] == "NOT MET"
    assert got[small8 + hf]["status"] == "MET"
    assert got[small8 + dense]["status"] == "NOT CHECKED"
    assert all(t["status"] == "MET" for k, t in got.items() if "bitwise" in k)
