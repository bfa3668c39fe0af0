"""kernelrl tune: the numerical check, the choice, the tuned file and the built-in table."""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kernelrl import backend, cli
from kernelrl import tune as tuning
from kernelrl._version import __version__
from kernelrl.backend import Implementation
from test_backend import cache  # noqa: F401  (a fixture: an empty cache folder)

CPU = torch.device("cpu")
F32 = torch.float32


@pytest.fixture
def native_present(monkeypatch):
    monkeypatch.setattr(backend, "_native_status", lambda: (object(), "fake native"))


def register_fake(name, native_error=0.0, torch_error=0.0, torch_delay=0.0):
    """A fake op y = 2x whose native path is off by ``native_error`` (relative), whose
    torch path is off by ``torch_error`` below float64 and sleeps ``torch_delay`` s."""
    def op(x):
        chosen = backend.select(name, x.device, x.dtype)
        if chosen == "native":
            return x * (2 * (1 + native_error))
        if torch_delay:
            time.sleep(torch_delay)
        return x * (2 * (1 + (torch_error if x.dtype != torch.float64 else 0.0)))

    def examples(device, dtype):
        torch.manual_seed(1)
        return [("64x32", (torch.randn(64, 32, device=device).to(dtype).requires_grad_(),), {})]

    backend.register_op(name, {"native": Implementation((F32, torch.bfloat16)),
                               "torch": Implementation(())},
                        examples=examples, fn=op)
    return name


@pytest.fixture
def fakes():
    names = []
    yield lambda *a, **k: names.append(register_fake(*a, **k)) or names[-1]
    for name in names:
        backend._OPS.pop(name, None)


def test_a_backend_that_fails_the_check_is_never_chosen(native_present, fakes, cache):
    # native is wrong by 1e-3 but much faster: only the check keeps it out
    name = fakes("fake_wrong", native_error=1e-3, torch_delay=0.003)
    result = tuning.tune(device="cpu", ops=[name], dtypes=["float32"], reps=1,
                         stream=io.StringIO())
    entry = result["entries"][name]["float32"]
    assert entry["choice"] == "torch"
    assert "native" not in entry["median_ms"]                 # never timed
    assert entry["errors"]["native"]["passed"] is False
    assert entry["errors"]["native"]["vs_float64"] == pytest.approx(1e-3, rel=1e-2)
    assert "error 1.00e-03 vs float64, 1.00e-03 vs torch; bound 1.0e-05" in entry["rejected"]["native"]
    tuning.write_tuned(result)
    assert backend.select(name, CPU, F32) == "torch"          # the default order says native
    assert "native FAILED" in tuning.summary(result)


def test_a_correct_faster_backend_is_chosen(native_present, fakes, cache):
    name = fakes("fake_right", torch_delay=0.003)
    result = tuning.tune(device="cpu", ops=[name], dtypes=["float32", "bfloat16"], reps=2,
                         stream=io.StringIO())
    for dtype in ("float32", "bfloat16"):
        entry = result["entries"][name][dtype]
        assert entry["choice"] == "native" and entry["rejected"] == {}
        assert entry["median_ms"]["torch"] > entry["median_ms"]["native"]
        assert entry["median_ms"]["torch"] >= 3.0


@pytest.mark.parametrize("native_error,passes", [(1.5e-4, True), (3e-4, False)])
def test_bound_is_twice_the_torch_backends_own_error(native_present, fakes, cache,
                                                     native_error, passes):
    # torch itself is off by 1e-4 in float32, so the bound is 2e-4 rather than 1e-5
    name = fakes(f"fake_loose_{passes}", native_error=native_error, torch_error=1e-4)
    spec = backend.registered_ops()[name]
    errors = tuning.check_backends(spec, CPU, F32, ["native", "torch"],
                                   spec.examples(CPU, F32)).errors
    assert errors["torch"]["torch_vs_float64"] == pytest.approx(1e-4, rel=1e-2)
    assert errors["native"]["bound"] == pytest.approx(2e-4, rel=1e-2)
    assert errors["native"]["passed"] is passes


def test_backend_that_raises_is_rejected_with_its_error(monkeypatch, fakes, cache):
    monkeypatch.setattr(backend, "_native_status", lambda: (object(), "fake native"))
    name = fakes("fake_raise")
    spec = backend.registered_ops()[name]
    real = spec.fn

    def broken(x):
        if backend.select(name, x.device, x.dtype) == "native":
            raise RuntimeError("kernel exploded")
        return real(x)

    backend.register_op(name, spec.impls, examples=spec.examples, fn=broken)
    entry = tuning.tune_one(backend.registered_ops()[name], CPU, F32, reps=1)
    assert entry["choice"] == "torch"
    assert "RuntimeError: kernel exploded" in entry["rejected"]["native"]


def test_timing_keeps_to_the_budget_but_always_times_the_first_example():
    seconds = [{"native": 1.0, "torch": 2.0}, {"native": 0.1, "torch": 0.2},
               {"native": 0.5, "torch": 0.5}]
    # 5 reps: example costs 15, 1.5, 5 seconds
    assert tuning.examples_within(seconds, ["native", "torch"], 5, budget=10) == [0]
    assert tuning.examples_within(seconds, ["native", "torch"], 5, budget=17) == [0, 1]
    assert tuning.examples_within(seconds, ["native", "torch"], 5, budget=30) == [0, 1, 2]
    assert tuning.examples_within(seconds, ["native"], 5, budget=6) == [0, 1]


def test_unknown_op_is_a_usage_error_listing_the_choices(capsys, cache):
    with pytest.raises(tuning.UsageError, match="--ops: unknown op 'nope'; choose from .*"
                                                "token_logprobs"):
        tuning.resolve_ops(["nope"])
    assert cli.main(["tune", "--device", "cpu", "--ops", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown op 'nope'" in err and "linear_logprobs" in err
    assert cli.main(["tune", "--dtypes", "int8"]) == 2
    assert "--dtypes" in capsys.readouterr().err


def test_write_tuned_merges_writes_out_and_is_read_by_dispatch(native_present, fakes, cache,
                                                               tmp_path):
    name = fakes("fake_merge", native_error=1e-3)
    first = tuning.tune(device="cpu", ops=[name], dtypes=["float32"], reps=1,
                        stream=io.StringIO())
    path = tuning.write_tuned(first)
    assert path == cache / f"tuned-{__version__}.json"
    second = dict(first, device="Another CPU")
    tuning.write_tuned(second, also=tmp_path / "out.json")
    document = json.loads(path.read_text())
    assert document["kernelrl"] == __version__
    assert set(document["entries"][name]) == {backend.cpu_model(), "Another CPU"}
    assert (tmp_path / "out.json").read_text() == path.read_text()
    assert backend.decide(name, CPU, F32).source == "tuned"


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    plain, tty = io.StringIO(), Tty()
    for stream in (plain, tty):
        bar = tuning.Progress(2, stream, width=4)
        bar.show("op float32")
        bar.show("op float32", advance=True)
        bar.close()
    assert plain.getvalue().startswith("tune [1/2] op float32\n") and "\r" not in plain.getvalue()
    assert "\r\x1b[K[##--] 1/2 op float32" in tty.getvalue()


def test_seed_builtin_merges_only_cuda_entries(tmp_path):
    results = tmp_path / "tuned-gpu.json"
    gpu_entry = {"choice": "triton", "date": "2026-01-02", "device_type": "cuda",
                 "median_ms": {"triton": 1.5, "torch": 3.0}}
    cpu_entry = dict(gpu_entry, choice="native", device_type="cpu")
    results.write_text(json.dumps({"entries": {"token_logprobs": {
        "NVIDIA H200": {"bfloat16": gpu_entry}, "AMD EPYC": {"float32": cpu_entry}}}}))
    table = tmp_path / "_dispatch_table.py"
    table.write_text('TABLE = {"linear_logprobs": {"NVIDIA A100": {"float32": {"choice": '
                     '"native", "date": "2025-01-01"}}}}\n')
    assert tuning.seed_builtin(results, table) == 1
    scope = {}
    exec(table.read_text(), scope)
    assert scope["TABLE"]["token_logprobs"] == {"NVIDIA H200": {"bfloat16": gpu_entry}}
    assert scope["TABLE"]["linear_logprobs"]["NVIDIA A100"]["float32"]["choice"] == "native"
    assert scope["__doc__"].startswith("Built-in dispatch table")
    with pytest.raises(tuning.UsageError, match="--seed-builtin: expected a file written by"):
        tuning.seed_builtin(tmp_path / "missing.json", table)


def test_tune_cli_end_to_end_then_info_says_tuned(tmp_path):
    env = dict(os.environ, KERNELRL_CACHE_DIR=str(tmp_path))
    env.pop("KERNELRL_BACKEND", None)
    run = subprocess.run([sys.executable, "-m", "kernelrl", "tune", "--device", "cpu",
                          "--ops", "token_logprobs", "--reps", "1",
                          "--out", str(tmp_path / "out.json")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    written = tmp_path / f"tuned-{__version__}.json"
    assert f"wrote {written}" in run.stdout
    assert "token_logprobs  float32" in run.stdout and "token_logprobs  bfloat16" in run.stdout
    assert "tune [1/2] token_logprobs float32" in run.stderr      # not a TTY: plain lines
    document = json.loads(written.read_text())
    assert Path(tmp_path / "out.json").read_text() == written.read_text()
    per_dtype = document["entries"]["token_logprobs"][backend.cpu_model()]
    assert set(per_dtype) == {"float32", "bfloat16"}
    for item in per_dtype.values():
        assert item["choice"] in item["median_ms"] and len(item["median_ms"]) >= 1
        assert item["errors"]["torch"]["passed"] is True
    info = subprocess.run([sys.executable, "-m", "kernelrl", "info"], capture_output=True,
                          text=True, timeout=120, env=env, check=True).stdout
    line = next(x for x in info.splitlines() if "float32" in x and "tuned on this machine" in x)
    assert per_dtype["float32"]["date"] in line and " ms vs " in line
