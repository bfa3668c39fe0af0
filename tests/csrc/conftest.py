"""Fixtures for the tests of the native kernels."""

import pytest


@pytest.fixture(params=["auto", "generic"])
def isa(request, monkeypatch):
    """Runs a test on the dispatched ISA (AVX2 where available) and on the baseline path
    (KERNELRL_CPU_ISA=generic)."""
    native = pytest.importorskip("kernelrl._native", reason="kernelrl._native is not built")
    if request.param == "generic":
        monkeypatch.setenv("KERNELRL_CPU_ISA", "generic")
        assert native.cpu_isa() == "generic"
    else:
        monkeypatch.delenv("KERNELRL_CPU_ISA", raising=False)
    return native.cpu_isa()
