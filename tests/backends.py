"""Helpers for the op tests: the devices to run on, and forcing a backend for one test.

A plain module (not conftest.py), so that test files import it by name without clashing
with the conftest.py of another test folder.
"""

import pytest
import torch

from kernelrl import backend


def _device_param(name):
    return pytest.param(name, marks=pytest.mark.gpu) if name == "cuda" else name


DEVICES = [_device_param("cpu"), _device_param("cuda")]


def use_backend(monkeypatch, name: str, device: str, op: str = "token_logprobs",
                dtype: torch.dtype = torch.float32) -> None:
    """Force backend `name` for this test, or skip with the reason it cannot run here."""
    spec = backend.registered_ops()[op]
    ok, why = backend.availability(name, torch.device(device), dtype, spec)
    if not ok:
        pytest.skip(f"{name} backend unavailable for {op} on {device}: {why}")
    monkeypatch.setenv("KERNELRL_BACKEND", name)
