"""kernelrl.backend: the dispatch table, forced backends and the info report."""

import pytest
import torch

from kernelrl import backend
from kernelrl.backend import BackendError


@pytest.fixture
def dummy_op():
    spec = backend.register_op("dummy_op", dtypes={"native": (torch.float32,),
                                                   "triton": (torch.float32,),
                                                   "torch": ()})
    yield spec
    backend._OPS.pop("dummy_op")


def fake_native(monkeypatch, *, present: bool, cuda: bool = False):
    class Module:
        __version__ = "test"

        @staticmethod
        def has_cuda():
            return cuda

        @staticmethod
        def cuda_device_count():
            return 0

    status = (Module, "fake native") if present else (None, "no native module in this test")
    monkeypatch.setattr(backend, "_native_status", lambda: status)


def test_cpu_order_is_native_then_torch(monkeypatch, dummy_op):
    fake_native(monkeypatch, present=True)
    assert backend.select("dummy_op", torch.device("cpu"), torch.float32) == "native"
    fake_native(monkeypatch, present=False)
    assert backend.select("dummy_op", torch.device("cpu"), torch.float32) == "torch"


def test_cpu_never_picks_triton_unless_forced(monkeypatch, dummy_op):
    fake_native(monkeypatch, present=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.select("dummy_op", torch.device("cpu"), torch.float32) == "torch"
    monkeypatch.setenv("KERNELRL_BACKEND", "triton")
    assert backend.select("dummy_op", torch.device("cpu"), torch.float32) == "triton"


def test_unsupported_dtype_falls_through_to_torch(monkeypatch, dummy_op):
    fake_native(monkeypatch, present=True)
    assert backend.select("dummy_op", torch.device("cpu"), torch.float64) == "torch"


def test_skip_rule_passes_over_a_backend_and_info_says_why(monkeypatch):
    fake_native(monkeypatch, present=True)
    backend.register_op("dummy_skip", dtypes={"native": (torch.float32,), "torch": ()},
                        skip={("native", "cpu"): "slower than torch in bench_dummy"})
    try:
        assert backend.select("dummy_skip", torch.device("cpu"), torch.float32) == "torch"
        rows = backend.info()["ops"]["dummy_skip"]["cpu"]
        assert rows[0] == {"backend": "native", "status": "skipped",
                           "reason": "slower than torch in bench_dummy"}
        assert rows[1]["status"] == "chosen"
        monkeypatch.setenv("KERNELRL_BACKEND", "native")      # forcing still runs it
        assert backend.select("dummy_skip", torch.device("cpu"), torch.float32) == "native"
    finally:
        backend._OPS.pop("dummy_skip")


@pytest.mark.parametrize("setup,env,message", [
    (dict(present=False), "native", "no native module in this test"),
    (dict(present=True), "triton", "TRITON_INTERPRET=1"),
    (dict(present=True), "bogus", "KERNELRL_BACKEND must be one of native, triton, torch"),
])
def test_forced_backend_that_cannot_run_raises(monkeypatch, dummy_op, setup, env, message):
    fake_native(monkeypatch, **setup)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("KERNELRL_BACKEND", env)
    with pytest.raises(BackendError, match=message):
        backend.select("dummy_op", torch.device("cpu"), torch.float32)


def test_forced_native_on_cuda_without_cuda_kernels(monkeypatch, dummy_op):
    fake_native(monkeypatch, present=True, cuda=False)
    monkeypatch.setenv("KERNELRL_BACKEND", "native")
    with pytest.raises(BackendError, match="built without CUDA"):
        backend.select("dummy_op", torch.device("cuda"), torch.float32)


def test_forced_backend_error_reaches_the_public_op(monkeypatch):
    from kernelrl.ops import token_logprobs
    fake_native(monkeypatch, present=False)
    monkeypatch.setenv("KERNELRL_BACKEND", "native")
    with pytest.raises(BackendError, match="cannot run token_logprobs on cpu float32"):
        token_logprobs(torch.randn(2, 5), torch.tensor([1, 2]))


def test_info_reports_every_op_with_one_choice_per_device(monkeypatch):
    fake_native(monkeypatch, present=False)
    report = backend.info()
    for key in ("kernelrl", "torch", "triton", "native", "gpu", "ops"):
        assert key in report
    assert {"token_logprobs", "linear_logprobs"} <= set(report["ops"])
    for per_device in report["ops"].values():
        cpu = per_device["cpu"]
        assert [r["status"] for r in cpu].count("chosen") == 1
        assert next(r for r in cpu if r["backend"] == "native")["reason"] == (
            "no native module in this test")
    text = backend.format_info(report)
    assert "token_logprobs" in text and "* torch" in text


def test_import_does_not_load_the_native_module():
    import subprocess
    import sys
    code = ("import sys, kernelrl, kernelrl.ops; "
            "assert 'kernelrl._native' not in sys.modules, 'native loaded at import'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
