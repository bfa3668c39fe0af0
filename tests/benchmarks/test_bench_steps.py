"""Tests of benchmarks/bench_steps.py (the "steps" family: one SFT / DPO training step of
kernelrl, eager torch and TRL): it is listed, its shapes, the light cases' kernelrl and eager
steps agree (and the check catches steps that do not), TRL's step agrees where TRL is
installed, and its targets on synthetic reports."""

import importlib.util

import pytest
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"

import common
import report
import suite

ENV = {"device": "cpu: test", "device_kind": "cpu", "date": "2026-01-01", "torch": "x",
       "triton": "y", "kernelrl": "abc123"}
CEILINGS = {"copy_gbps": 10.0, "bf16_tflops": None, "fp32_tflops": 0.1, "kind": "cpu",
            "note": "test"}


@pytest.fixture(scope="module")
def fam():
    return suite.load(BENCH_DIR / "bench_steps.py")


def _light(fam, case_id):
    """The case's light shape (the default run's size; the default plan runs dpo_lora)."""
    return fam._shape(case_id, "cpu", True)


def test_listed_with_cases_and_impls(run_script):
    proc = run_script("run.py", "--list", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    block = proc.stdout[proc.stdout.index("steps  (bench_steps.py)"):]
    for line in ("case sft: SFT step, full fine-tune", "case sft_lora: SFT step, LoRA r=16",
                 "case dpo: DPO step, full fine-tune", "case dpo_lora: DPO step, LoRA r=16",
                 "impls: kernelrl, eager, trl"):
        assert line in block, block


def test_plan_shapes(fam):
    assert [c for c, _, _ in fam.plan("cpu", True)] == ["dpo_lora"]   # the default run's one
    light = [(c, fam._shape(c, "cpu", True)) for c in ("sft", "dpo_lora")]
    assert all(shape["V"] == 8000 and shape["L"] == 2 for _, shape in light)
    assert light[0][1]["B"] == 2 and light[0][1]["T"] == 128 and light[0][1]["tok"] == 256
    assert light[1][1]["tok"] == 256                       # 1 pair: 2 sequences of 64 + 64
    full = {c: shape for c, shape, _ in fam.plan("cpu", False)}
    assert set(full) == {"sft", "sft_lora", "dpo", "dpo_lora"}
    for c, shape in full.items():
        assert {k: shape[k] for k in ("H", "I", "L", "V")} == {"H": 256, "I": 688, "L": 4,
                                                                "V": 32000}
        assert shape["thr"] >= 1
        assert shape["tok"] == (8192 if c.startswith("dpo") else 4096)
    assert full["sft"]["B"] == 8 and full["sft"]["T"] == 512
    assert (full["dpo"]["P"], full["dpo"]["Tp"], full["dpo"]["Tr"]) == (8, 256, 256)
    assert "thr" not in fam.plan("cuda", False)[0][1]
    # the same useful flops for every row; LoRA skips the frozen weights' gradients
    assert fam._flops("sft_lora", full["sft"]) < fam._flops("sft", full["sft"])
    assert fam._flops("dpo", full["dpo"]) > 2 * fam._flops("sft", full["sft"])
    with pytest.raises(ValueError, match="case_id"):
        fam.make_case("ppo", full["sft"], "fp32", "cpu")
    with pytest.raises(ValueError, match="B, T"):
        fam.make_case("sft", full["dpo"], "fp32", "cpu")


@pytest.mark.parametrize("case_id", ["sft", "dpo_lora"])
def test_light_kernelrl_and_eager_steps_agree(fam, case_id):
    # The light case as run.py runs it: checked against eager (one step from the same start:
    # equal loss, parameters within 0.1% of the update), then timed round-robin.
    shape = _light(fam, case_id)
    case = fam.make_case(case_id, shape, "fp32", "cpu")
    rows = {r["impl"]: r for r in common.run_case(case, impls_filter={"kernelrl", "eager"},
                                                  reps=1, measure_memory=False)}
    assert set(rows) == {"kernelrl", "eager"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["tflops"] > 0 and r["shape"]["tok"] == 256


@pytest.mark.parametrize("case_id", ["dpo", "sft_lora"])
def test_check_passes_one_step_and_catches_two(fam, case_id):
    shape = fam._shape(case_id, "cpu", True)
    case = fam.make_case(case_id, shape, "fp32", "cpu")
    x = case.make_inputs(0)

    def detached(out):
        return tuple(t.detach() for t in out)

    ref = detached(case.impls["eager"].build()(x))
    step = case.impls["kernelrl"].build()
    once = detached(step(x))
    assert case.check(ref, once) is None
    problem = case.check(ref, (once[0] + 0.01, *once[1:]))
    assert problem and problem.startswith("loss"), problem
    twice = detached(step(x))            # the same live parameters, now two steps on
    problem = case.check(ref, (once[0], *twice[1:]))
    assert problem and "parameters after one step differ" in problem, problem


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed")
@pytest.mark.parametrize("case_id", ["sft", "dpo_lora"])
def test_trl_step_agrees_with_eager(fam, case_id):
    shape = _light(fam, case_id)
    case = fam.make_case(case_id, shape, "fp32", "cpu")
    x = case.make_inputs(0)
    ref = tuple(t.detach() for t in case.impls["eager"].build()(x))
    out = tuple(t.detach() for t in case.impls["trl"].build()(x))
    assert case.check(ref, out) is None


def _row(fam, case_id, impl, ms, mem, *, times=None):
    shape = dict(fam._target_shape(case_id), thr=2)
    return {"bench": "steps", "case": fam.CASE_NAMES[case_id], "shape": shape, "dtype": "fp32",
            "impl": impl, "median_ms": ms, "status": "ok", "spread": 0.01,
            "times_ms": times or [ms] * 5, "paired": True, "peak_mem_bytes": mem}


def test_cpu_targets_on_a_synthetic_report(fam):
    MiB = 2**20
    rows = [
        # SFT full: kernelrl faster, a third of eager's memory -> both MET
        _row(fam, "sft", "kernelrl", 2000.0, 700 * MiB),
        _row(fam, "sft", "eager", 3000.0, 2100 * MiB),
        _row(fam, "sft", "trl", 6000.0, 4000 * MiB),
        # DPO full: kernelrl slower, memory just over half -> both NOT MET
        _row(fam, "dpo", "kernelrl", 9000.0, 2300 * MiB),
        _row(fam, "dpo", "eager", 8000.0, 4400 * MiB),
        # DPO LoRA: eager's memory not measured -> memory NOT CHECKED; equal speed is MET
        _row(fam, "dpo_lora", "kernelrl", 6000.0, 1000 * MiB),
        _row(fam, "dpo_lora", "eager", 6000.0, None),
        # SFT LoRA: not run (a subset) -> NOT CHECKED
    ]
    rep = report.build_report(ENV, CEILINGS, rows)
    got = {t["target"]: t for t in fam.targets(rep)}
    status = {k: t["status"] for k, t in got.items()}

    def find(case_id, what):
        [key] = [k for k in got if fam.CASE_NAMES[case_id] in k and what in k]
        return key

    assert status[find("sft", "tokens/s")] == "MET"
    assert status[find("sft", "memory")] == "MET"
    assert status[find("dpo", "tokens/s")] == "NOT MET"
    assert status[find("dpo", "memory")] == "NOT MET"
    assert status[find("dpo_lora", "tokens/s")] == "MET"
    assert status[find("dpo_lora", "memory")] == "NOT CHECKED"
    assert status[find("sft_lora", "tokens/s")] == "NOT CHECKED"
    assert status[find("sft_lora", "memory")] == "NOT CHECKED"
    detail = got[find("sft", "tokens/s")]["detail"]
    # 4096 tokens in 2 s, 3 s and 6 s
    assert "tokens/s: kernelrl 2,048, eager 1,365, trl 683" in detail, detail
    assert "1/2" in got[find("sft", "memory")]["target"]
    [gpu] = [t for k, t in got.items() if k.startswith("GPU")]
    assert gpu["status"] == "NOT CHECKED" and "CPU run" in gpu["detail"]
    assert len(got) == 9


def test_gpu_targets_on_a_synthetic_report(fam):
    MiB = 2**20
    rows = [_row(fam, "dpo", "kernelrl", 100.0, 1000 * MiB),
            _row(fam, "dpo", "trl", 160.0, 2500 * MiB),
            _row(fam, "dpo_lora", "kernelrl", 100.0, 1000 * MiB),
            _row(fam, "dpo_lora", "trl", 140.0, 1500 * MiB)]
    for r in rows:
        r["shape"].pop("thr")
    rep = report.build_report(dict(ENV, device_kind="cuda"), CEILINGS, rows)
    got = {t["target"]: t["status"] for t in fam.targets(rep)}
    assert len(got) == 4 and not any(k.startswith("CPU") for k in got)
    full, lora = fam.CASE_NAMES["dpo"], fam.CASE_NAMES["dpo_lora"]
    assert got[f"GPU {full} (full shape): kernelrl >= 1.5x TRL's tokens/s"] == "MET"
    assert got[f"GPU {full} (full shape): kernelrl peak memory <= 1/2 of TRL's"] == "MET"
    assert got[f"GPU {lora} (full shape): kernelrl >= 1.5x TRL's tokens/s"] == "NOT MET"
    assert got[f"GPU {lora} (full shape): kernelrl peak memory <= 1/2 of TRL's"] == "NOT MET"
