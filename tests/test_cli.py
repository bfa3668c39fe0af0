"""`kernelrl info` and `python -m kernelrl info`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_python_m_kernelrl_info():
    out = subprocess.run([sys.executable, "-m", "kernelrl", "info"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert "torch" in out and "triton" in out and "native" in out
    assert "token_logprobs" in out and "linear_logprobs" in out
    assert "* " in out                      # a chosen backend is marked


def test_info_json():
    out = subprocess.run([sys.executable, "-m", "kernelrl", "info", "--json"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    report = json.loads(out)
    assert set(report["ops"]) >= {"token_logprobs", "linear_logprobs"}


def test_console_script_is_installed():
    beside = Path(sys.executable).with_name("kernelrl")      # the venv's bin/, off PATH
    exe = str(beside) if beside.exists() else shutil.which("kernelrl")
    if exe is None:
        pytest.skip("the `kernelrl` console script is not on PATH (package not pip-installed)")
    out = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=120, check=True)
    assert "token_logprobs" in out.stdout


def test_unknown_command_fails_with_usage():
    res = subprocess.run([sys.executable, "-m", "kernelrl", "frobnicate"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "usage: kernelrl" in res.stderr
