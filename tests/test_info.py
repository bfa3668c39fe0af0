"""kernelrl.info(): every op, its choice per device and dtype, and where it came from."""

import importlib
import json
import sys
import types

import pytest
import torch

import kernelrl
from kernelrl import backend
from kernelrl.backend import Implementation
from test_backend import cache, fake_native, native_not_built  # noqa: F401  (fixtures)

info_module = importlib.import_module("kernelrl.info")   # kernelrl.info is the function
F32 = torch.float32


@pytest.fixture
def dummy_op():
    spec = backend.register_op("dummy_info", {"native": Implementation((F32, torch.bfloat16)),
                                              "triton": Implementation((F32, torch.bfloat16)),
                                              "torch": Implementation(())})
    yield spec
    backend._OPS.pop("dummy_info")


def cpu_choices(report, op="dummy_info"):
    return report["ops"][op]["cpu"]["choices"]


def test_package_info_returns_a_dict_with_every_op(monkeypatch, cache):
    fake_native(monkeypatch, present=False)
    report = kernelrl.info()
    assert isinstance(report, dict)
    for key in ("kernelrl", "torch", "triton", "native", "gpu", "cpu", "tuned", "ops"):
        assert key in report
    assert {"token_logprobs", "linear_logprobs"} <= set(report["ops"])
    for name, per_device in report["ops"].items():
        cpu = per_device["cpu"]
        assert cpu["choices"]["float32"] == {"backend": "torch", "kind": "default",
                                             "source": "default order"}
        if "native" in backend.registered_ops()[name].impls:
            assert next(r for r in cpu["backends"] if r["backend"] == "native")["reason"] == (
                "no native module in this test")
    json.dumps(report)                                  # `kernelrl info --json` can print it
    text = info_module.format_info(report)
    assert "token_logprobs" in text and "* torch" in text


def test_default_and_skip_rule_sources(monkeypatch, cache, dummy_op):
    fake_native(monkeypatch, present=True)
    report = kernelrl.info()
    assert cpu_choices(report)["float32"]["backend"] == "native"
    assert cpu_choices(report)["float32"]["source"] == "default order"
    dummy_op.skip[("native", "cpu")] = "slower than torch in bench_dummy"
    rows = kernelrl.info()["ops"]["dummy_info"]["cpu"]["backends"]
    assert rows[0] == {"backend": "native", "status": "skipped",
                       "reason": "by default: slower than torch in bench_dummy"}


def test_tuned_source_shows_date_and_times(monkeypatch, cache, dummy_op):
    fake_native(monkeypatch, present=True)
    entry = {"choice": "native", "date": "2026-03-04", "median_ms": {"torch": 20.1, "native": 12.3},
             "rejected": {}}
    backend.tuned_path().write_text(json.dumps(
        {"entries": {"dummy_info": {backend.cpu_model(): {"float32": entry}}}}))
    backend.reload_tuned()
    report = kernelrl.info()
    assert cpu_choices(report)["float32"] == {
        "backend": "native", "kind": "tuned",
        "source": "tuned on this machine (2026-03-04, native 12.3 ms vs torch 20.1 ms)"}
    assert cpu_choices(report)["bfloat16"]["source"] == "default order"
    assert report["tuned"]["exists"] and report["tuned"]["entries"] == 1
    assert "tuned on this machine (2026-03-04" in info_module.format_info(report)


def test_tuned_choice_that_cannot_run_says_so(monkeypatch, cache, dummy_op):
    fake_native(monkeypatch, present=False)
    entry = {"choice": "native", "date": "2026-03-04", "median_ms": {"native": 1.0},
             "rejected": {"triton": "output 0: error 1e-1"}}
    backend.tuned_path().write_text(json.dumps(
        {"entries": {"dummy_info": {backend.cpu_model(): {"float32": entry}}}}))
    backend.reload_tuned()
    source = cpu_choices(kernelrl.info())["float32"]["source"]
    assert source.startswith("default order (tuned choice native cannot run here: "
                             "no native module in this test")


def test_builtin_source_names_the_model(monkeypatch, cache, dummy_op):
    fake_native(monkeypatch, present=True)
    shipped = types.ModuleType("kernelrl._dispatch_table")
    shipped.TABLE = {"dummy_info": {backend.cpu_model(): {"bfloat16": {
        "choice": "torch", "date": "2026-05-06", "median_ms": {"torch": 1.5, "native": 2.25}}}}}
    monkeypatch.setitem(sys.modules, "kernelrl._dispatch_table", shipped)
    backend.reload_tuned()
    assert cpu_choices(kernelrl.info())["bfloat16"]["source"] == (
        f"built-in table ({backend.cpu_model()}, 2026-05-06, torch 1.50 ms vs native 2.25 ms)")


def test_forced_source(monkeypatch, cache, dummy_op):
    fake_native(monkeypatch, present=True)
    monkeypatch.setenv("KERNELRL_BACKEND", "torch")
    report = kernelrl.info()
    assert cpu_choices(report)["float32"] == {"backend": "torch", "kind": "forced",
                                              "source": "forced (KERNELRL_BACKEND=torch)"}
    assert "KERNELRL_BACKEND=torch (forced)" in info_module.format_info(report)


def test_bogus_forced_backend_is_reported_not_raised(monkeypatch, cache, dummy_op):
    monkeypatch.setenv("KERNELRL_BACKEND", "bogus")
    report = kernelrl.info()
    assert report["forced_backend"] == "bogus"
    assert report["forced_backend_error"] == (
        "KERNELRL_BACKEND='bogus' is invalid (valid: native, triton, torch, or unset)")
    for choice in cpu_choices(report).values():
        assert choice["backend"] is None and "calls raise BackendError" in choice["source"]
    text = info_module.format_info(report)
    assert "KERNELRL_BACKEND='bogus' is invalid" in text
    assert not [line for line in text.splitlines() if line.lstrip().startswith("* ")]


def test_forced_backend_that_cannot_run_is_not_replaced_by_another(monkeypatch, cache,
                                                                   dummy_op):
    fake_native(monkeypatch, present=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("KERNELRL_BACKEND", "triton")
    choices = cpu_choices(kernelrl.info())
    for choice in choices.values():
        assert choice["backend"] is None
        assert choice["source"].startswith("forced (KERNELRL_BACKEND=triton) but triton cannot "
                                           "run here: triton needs CUDA tensors")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cpu_choices(kernelrl.info())["float32"]["backend"] == "triton"


def test_build_native_false_is_reported_as_a_choice(native_not_built, cache):
    report = kernelrl.info()
    assert report["native"] == "not built (by choice, KERNELRL_BUILD_NATIVE=0)"
    assert report["build"] == {"native": False, "cuda": "0"}
    native = next(r for r in report["ops"]["token_logprobs"]["cpu"]["backends"]
                  if r["backend"] == "native")
    assert native["reason"].startswith("not built (by choice, KERNELRL_BUILD_NATIVE=0)")
    assert "KERNELRL_BUILD_NATIVE=0, KERNELRL_BUILD_CUDA=0" in info_module.format_info(report)
