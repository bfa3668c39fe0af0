"""Test-wide setup.

TRITON_INTERPRET=1 is set here, before any kernel is decorated, when torch sees no GPU:
Triton kernels then run on CPU tensors under the interpreter. With a GPU the variable is
left alone so the `gpu` tests run the compiled kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="gpu test: torch sees no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _clean_backend_env(monkeypatch):
    """Each test starts with no forced backend and debug checks off."""
    monkeypatch.delenv("KERNELRL_BACKEND", raising=False)
    monkeypatch.delenv("KERNELRL_DEBUG", raising=False)
