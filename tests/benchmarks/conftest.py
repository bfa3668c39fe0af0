"""Shared setup for the tests of benchmarks/: its modules importable by their plain names
(as the bench scripts import them), and a helper to run its scripts as a user would."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO / "benchmarks"
_MODULES = ("cases", "common", "memory", "progress", "report", "suite", "targets", "timing")

sys.path.insert(0, str(BENCH_DIR))
for _name in _MODULES:  # a same-named module from elsewhere must not stand in for ours
    _mod = sys.modules.get(_name)
    if _mod is not None and Path(getattr(_mod, "__file__", "") or "").parent != BENCH_DIR:
        del sys.modules[_name]


@pytest.fixture
def run_script(tmp_path):
    """run_script(script, *args, timeout=...) -> CompletedProcess: ``python
    benchmarks/<script> args...`` from a fresh cwd (tmp_path), as a plain user's run: the
    repo on PYTHONPATH, no forced backend, no Triton interpreter (tests/conftest.py sets
    TRITON_INTERPRET=1 for the op tests on a CPU)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    for var in ("TRITON_INTERPRET", "KERNELRL_BACKEND"):
        env.pop(var, None)

    def run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(BENCH_DIR / script), *args],
                              capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=str(tmp_path))

    return run
