"""Tests of benchmarks/bench_nf4.py (the "nf4" family: the NF4 decode GEMV, the
dequant-matmul with LoRA fwd+bwd and quantization, against bitsandbytes, dense bf16, eager
and torch.compile): it is listed, its plans, the smallest default case checked and timed
with the torch backend, the checks catch broken outputs, the script end to end, and its
targets on synthetic reports (CPU and GPU)."""

import importlib.util
import json

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
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAS_PEFT = importlib.util.find_spec("peft") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed")
TORCH_ROWS = {"kernelrl[torch]", "dense", "eager", "bnb", "bnb_linear4bit", "bnb_peft"}


@pytest.fixture(scope="module")
def fam():
    return suite.load(BENCH_DIR / "bench_nf4.py")


def test_listed_with_cases_and_impls(fam):
    run = suite.load(BENCH_DIR / "run.py")
    text = run.list_families({"nf4": BENCH_DIR / "bench_nf4.py"})
    for line in ("nf4  (bench_nf4.py)", "case decode: nf4 decode",
                 "case train: nf4 train fwd+bwd", "case quantize: nf4 quantize",
                 "dense, bnb, bnb_linear4bit, bnb_peft, eager, compile"):
        assert line in text, text
    for case_id, shape, dtype in fam.plan("cpu", True):   # every row a name --impls takes
        assert set(fam.make_case(case_id, shape, dtype, "cpu").impls) <= set(fam.IMPLS)


def test_plans(fam):
    quick = fam.plan("cpu", True)
    assert [(c, s.get("M"), d) for c, s, d in quick] == [
        ("decode", 1, "bf16"), ("train", 64, "bf16"), ("quantize", None, "bf16")]
    assert all((s["N"], s["K"]) == (1024, 1024) for _, s, _ in quick)
    assert quick[1][1]["r"] == 16
    full = fam.plan("cpu", False)
    shapes = {(4096, 4096), (14336, 4096)}
    decode = [s for c, s, _ in full if c == "decode"]
    assert {(s["N"], s["K"]) for s in decode} == shapes and len(decode) == 6
    assert sorted({s["M"] for s in decode}) == [1, 8, 16]
    train = [s for c, s, _ in full if c == "train"]
    assert {s["M"] for s in train} == {512} and len(train) == 2     # M = 4096: GPU only
    quantize = [(s["N"], s["K"], d) for c, s, d in full if c == "quantize"]
    assert sorted(quantize) == sorted((n, k, d) for n, k in shapes for d in ("fp32", "bf16"))
    gpu = fam.plan("cuda", False)
    assert fam.plan("cuda", True) == gpu
    assert sorted(s["M"] for c, s, _ in gpu if c == "train") == [512, 512, 4096, 4096]
    with pytest.raises(ValueError, match="case_id"):
        fam.make_case("nosuch", {"N": 8, "K": 8}, "bf16", "cpu")
    with pytest.raises(ValueError, match="M, N, K, r"):
        fam.make_case("train", {"M": 8, "N": 64, "K": 64}, "bf16", "cpu")


def test_backends_registered_as_cannot_run_are_not_run(fam):
    # native nf4_matmul on CUDA is a registry skip that means "cannot run" (availability()
    # does not read it): not run with that reason; "not yet measured" entries keep their row
    from cases import Impl

    impls = {"kernelrl": Impl(lambda: None, same_as="kernelrl[native]"),
             "kernelrl[native]": Impl(lambda: None), "kernelrl[triton]": Impl(lambda: None)}
    out = fam._cannot_run("nf4_matmul", "cuda", impls)
    assert not out["kernelrl[native]"].row and "CPU path" in out["kernelrl[native]"].skip
    assert out["kernelrl[triton]"].row and out["kernelrl[triton]"].skip is None
    assert out["kernelrl"].same_as is None
    cpu = fam._cannot_run("nf4_matmul", "cpu", {"kernelrl": Impl(lambda: None),
                                                "kernelrl[native]": Impl(lambda: None)})
    assert cpu["kernelrl[native]"].row


def test_smallest_default_case_checked_and_timed(fam):
    # the default plan's smallest case, as run.py runs it, with the torch backend forced for
    # kernelrl: every row agrees with the float64 reference, then is timed round-robin
    case_id, shape, dtype = min(
        fam.plan("cpu", True), key=lambda p: p[1].get("M", 1) * p[1]["N"] * p[1]["K"])
    assert (case_id, shape) == ("decode", {"M": 1, "N": 1024, "K": 1024})
    case = fam.make_case(case_id, shape, dtype, "cpu")
    rows = {r["impl"]: r for r in common.run_case(case, impls_filter=TORCH_ROWS, reps=2,
                                                  measure_memory=False)}
    want = {"kernelrl[torch]", "dense", "eager"} | ({"bnb", "bnb_linear4bit"} if HAS_BNB
                                                    else set())
    assert want <= set(rows)
    for name in want:
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["tflops"] > 0 and r["paired"]
    assert case.bytes_moved == 1024 * 1024 // 2 + 16384 + 4 * 64 + 4 * 256 + 4 * 16


def test_train_rows_agree_at_a_tiny_shape(fam):
    case = fam.make_case("train", {"M": 24, "N": 128, "K": 256, "r": 16}, "bf16", "cpu")
    rows = {r["impl"]: r for r in common.run_case(case, impls_filter=TORCH_ROWS, reps=1,
                                                  measure_memory=False)}
    assert rows["kernelrl[torch]"]["status"] == "ok", rows["kernelrl[torch]"]
    assert rows["dense"]["status"] == "ok" and rows["eager"]["status"] == "ok"
    if HAS_BNB and HAS_PEFT:
        assert rows["bnb_peft"]["status"] == "ok", rows["bnb_peft"]
    else:
        assert rows["bnb_peft"]["status"] == "skipped"


def test_linear_check_catches_wrong_outputs(fam):
    case = fam.make_case("train", {"M": 24, "N": 128, "K": 256, "r": 16}, "bf16", "cpu")
    x = case.make_inputs(0)
    ref = tuple(t.detach() for t in case.impls["eager"].build()(x))
    out = tuple(t.detach() for t in case.impls["kernelrl[torch]"].build()(x))
    assert case.check(ref, out) is None
    assert "y off the float64" in case.check(ref, (out[0] * 1.05, *out[1:]))
    dx = out[1].clone()
    dx[3] = 0                                    # one row of dx lost
    assert "dx off the float64" in case.check(ref, (out[0], dx, *out[2:]))
    assert "dB shape" in case.check(ref, (*out[:3], out[3].t()))
    assert "returned 3" in case.check(ref, out[:3])


@needs_bnb
def test_quantize_case_and_its_check(fam):
    import torch
    from kernelrl.ops.nf4.format import dynamic_map

    case = fam.make_case("quantize", {"N": 256, "K": 512}, "bf16", "cpu")
    assert case.ref == "bnb"
    rows = {r["impl"]: r for r in common.run_case(case, impls_filter={"kernelrl[torch]", "bnb"},
                                                  reps=1, measure_memory=False)}
    assert rows["kernelrl[torch]"]["status"] == "ok", rows["kernelrl[torch]"]
    assert rows["kernelrl[torch]"]["params"] == 256 * 512
    x = case.make_inputs(0)
    ref = case.impls["bnb"].build()(x)
    out = case.impls["kernelrl[torch]"].build()(x)
    assert case.check(ref, out) is None
    data = out[0].clone()
    data[5] ^= 0x10
    assert "packed bytes: 1 of" in case.check(ref, (data, *out[1:]))
    codes = out[1].clone()
    codes[: codes.numel() // 10] ^= 1           # 10% of the codes moved
    assert "differ on" in case.check(ref, (out[0], codes, *out[2:]))
    # one code moved to a value farther from the truth than bitsandbytes' code
    table = dynamic_map()
    i = 7
    far = int(torch.argmax((table - table[ref[1][i].long()]).abs()))
    codes = out[1].clone()
    codes[i] = far
    assert "farther from the true value" in case.check(ref, (out[0], codes, *out[2:]))
    assert "offset differs" in case.check(ref, (*out[:3], out[3] * 1.001))


def test_script_end_to_end_quantize(run_script, tmp_path):
    # bench_nf4.py as a user runs it: the light quantize case, kernelrl's torch path and
    # bitsandbytes, no memory processes; the table, the targets and the JSON
    out = tmp_path / "nf4.json"
    proc = run_script("bench_nf4.py", "--quick", "--device", "cpu", "--cases", "quantize",
                      "--impls", "kernelrl[torch],bnb", "--no-mem", "--reps", "5",
                      "--out", str(out), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nf4 | nf4 quantize | N=1024 K=1024 | bf16" in proc.stdout
    assert max(map(len, proc.stdout.splitlines())) <= 120
    data = json.loads(out.read_text())
    rows = {r["impl"]: r for r in data["results"]}
    assert rows["kernelrl[torch]"]["status"] == "ok", rows
    assert rows["kernelrl[torch]"]["mparams_per_s"] > 0
    if HAS_BNB:
        assert rows["bnb"]["status"] == "ok" and rows["bnb"]["mparams_per_s"] > 0
    lines = [t for t in data["targets"]]
    assert lines and all(t["status"] in ("MET", "NOT MET", "NOT CHECKED") for t in lines)
    for t in lines:
        assert f"[{t['status']}] {t['target']}" in " ".join(proc.stdout.split())


def _row(fam, case_id, impl, ms, shape, dtype="bf16", *, times=None, **extra):
    row = {"bench": "nf4", "case": fam.CASE_NAMES[case_id], "shape": dict(shape),
           "dtype": dtype, "impl": impl, "median_ms": ms, "status": "ok", "spread": 0.01,
           "times_ms": times or [ms] * 5, "paired": True}
    row.update(extra)
    return row


def test_cpu_targets_on_a_synthetic_report(fam):
    rows = []
    for n, k in fam.SHAPES:
        for m in fam.DECODE_M:
            s = {"M": m, "N": n, "K": k}
            rows += [_row(fam, "decode", "kernelrl", 1.0, s), _row(fam, "decode", "dense", 2.0, s),
                     _row(fam, "decode", "bnb", 3.0, s)]
            # bnb_linear4bit faster than kernelrl at 14336x4096, missing at M=16
            if m != 16:
                rows.append(_row(fam, "decode", "bnb_linear4bit", 0.5 if n == 14336 else 1.5, s))
        for dtype in ("fp32", "bf16"):
            s = {"N": n, "K": k}
            # 4096^2 = 16.8 Mparam in 50 ms: 336 Mparam/s; bnb 5x slower
            # 14336x4096 = 58.7 Mparam in 500 ms: 117 Mparam/s; bnb 2x slower
            t = 50.0 if n == 4096 else 500.0
            rows += [_row(fam, "quantize", "kernelrl", t, s, dtype),
                     _row(fam, "quantize", "bnb", t * (5 if n == 4096 else 2), s, dtype)]
    rep = report.build_report(ENV, CEILINGS, rows)
    got = fam.targets(rep)
    assert all(set(t) == {"target", "status", "detail"} for t in got)
    assert all(t["status"] in ("MET", "NOT MET", "NOT CHECKED") for t in got)
    status = {t["target"]: t["status"] for t in got}
    assert len(got) == 12 + 8 + 3
    assert status["CPU nf4 decode 4096x4096 M=1 bf16: kernelrl faster than dense bf16 F.linear"] \
        == "MET"
    best = "kernelrl faster than bitsandbytes' best path (bnb and bnb_linear4bit)"
    assert status[f"CPU nf4 decode 4096x4096 M=8 bf16: {best}"] == "MET"
    assert status[f"CPU nf4 decode 14336x4096 M=1 bf16: {best}"] == "NOT MET"
    # only bnb ran at M=16: checked against that one
    assert status[f"CPU nf4 decode 4096x4096 M=16 bf16: {best}"] == "MET"
    assert status["CPU nf4 quantize 4096x4096 fp32: kernelrl >= 220 Mparam/s"] == "MET"
    assert status["CPU nf4 quantize 14336x4096 bf16: kernelrl >= 220 Mparam/s"] == "NOT MET"
    assert status["CPU nf4 quantize 4096x4096 bf16: kernelrl >= 4x bitsandbytes' speed"] == "MET"
    assert status["CPU nf4 quantize 14336x4096 fp32: kernelrl >= 4x bitsandbytes' speed"] \
        == "NOT MET"
    [rate] = [t for t in got if t["target"] == "CPU nf4 quantize 4096x4096 fp32: kernelrl >= "
              "220 Mparam/s"]
    assert "kernelrl 335.5 Mparam/s" in rate["detail"] and "bnb 67.1 Mparam/s" in \
        rate["detail"], rate
    assert rows[-1]["mparams_per_s"] == pytest.approx(14336 * 4096 / 1.0 / 1e6)  # bnb, 1 s
    gpu = [t for t in got if t["target"].startswith("GPU")]
    assert len(gpu) == 3 and all(t["status"] == "NOT CHECKED" for t in gpu)
    # the default (light) run: nothing at the target shapes
    light = report.build_report(ENV, CEILINGS, [_row(fam, "decode", "kernelrl", 1.0,
                                                     {"M": 1, "N": 1024, "K": 1024})])
    assert all(t["status"] == "NOT CHECKED" for t in fam.targets(light))


def test_gpu_targets_on_a_synthetic_report(fam):
    rows = []
    ceilings = dict(CEILINGS, copy_gbps=4000.0, kind="gpu")
    for n, k in fam.SHAPES:
        s = {"M": 1, "N": n, "K": k}
        nbytes = fam.make_case("decode", s, "bf16", "cpu").bytes_moved
        # 4096^2: 80% of the copy ceiling; 14336x4096: 50%
        frac = 0.8 if n == 4096 else 0.5
        ms_ = nbytes / (frac * 4000e9) * 1e3
        rows.append(_row(fam, "decode", "kernelrl", ms_, s, gbps=nbytes / ms_ / 1e6))
        s = {"M": 4096, "N": n, "K": k, "r": 16}
        weight = n * k * 2
        extra = 0.5 * weight if n == 4096 else 1.5 * weight
        rows += [_row(fam, "train", "kernelrl", 1.1 if n == 4096 else 1.3, s,
                      peak_mem_bytes=int(fam.out_bytes(s) + extra)),
                 _row(fam, "train", "dense", 1.0, s),
                 _row(fam, "train", "bnb_peft", 2.0 if n == 4096 else 1.2, s)]
    for r in rows:
        r["times_ms"], r["paired"] = None, False
    rep = report.build_report(dict(ENV, device_kind="cuda"), ceilings, rows)
    got = {t["target"]: t for t in fam.targets(rep)}
    status = {k: t["status"] for k, t in got.items()}
    assert len(got) == 2 + 2 * 3 + 1
    ceiling = "kernelrl >= 75% of the copy ceiling on the NF4 bytes"
    assert status[f"GPU nf4 decode 4096x4096 M=1 bf16: {ceiling}"] == "MET"
    assert status[f"GPU nf4 decode 14336x4096 M=1 bf16: {ceiling}"] == "NOT MET"
    assert "80.0%" in got[f"GPU nf4 decode 4096x4096 M=1 bf16: {ceiling}"]["detail"]
    at = "GPU nf4 train fwd+bwd {} M=4096 r=16 bf16: "
    dense = "kernelrl <= 1.15x dense bf16 + bf16 LoRA time"
    assert status[at.format("4096x4096") + dense] == "MET"
    assert status[at.format("14336x4096") + dense] == "NOT MET"
    assert status[at.format("4096x4096") + "kernelrl faster than bnb_peft"] == "MET"
    assert status[at.format("14336x4096") + "kernelrl faster than bnb_peft"] == "NOT MET"
    mem = [k for k in status if "one bf16 weight" in k]
    assert [status[k] for k in mem] == ["MET", "NOT MET"]
    assert status["CPU nf4 decode and quantize targets"] == "NOT CHECKED"
