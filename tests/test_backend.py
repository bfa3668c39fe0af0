"""kernelrl.backend: the selection order (forced > tuned > built-in > default), force(),
the tuned file and its path, and the native build record."""

import json
import subprocess
import sys
import threading
import types

import pytest
import torch

from kernelrl import backend
from kernelrl._version import __version__
from kernelrl.backend import BackendError, Implementation

CPU = torch.device("cpu")
F32 = torch.float32


def register_dummy(name="dummy_op", skip=None):
    return backend.register_op(name, {"native": Implementation((F32,)),
                                      "triton": Implementation((F32,)),
                                      "torch": Implementation(())}, skip=skip)


@pytest.fixture
def dummy_op():
    spec = register_dummy()
    yield spec
    backend._OPS.pop("dummy_op")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder for this test; the tuned file is read afresh before and after."""
    monkeypatch.setenv("KERNELRL_CACHE_DIR", str(tmp_path))
    backend.reload_tuned()
    yield tmp_path
    backend.reload_tuned()


def write_tuned(entries: dict) -> None:
    backend.tuned_path().parent.mkdir(parents=True, exist_ok=True)
    backend.tuned_path().write_text(json.dumps({"entries": entries}))
    backend.reload_tuned()


def entry(choice, **extra):
    return {"choice": choice, "date": "2026-01-02", "median_ms": {choice: 1.0}, **extra}


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


def test_register_op_rejects_a_bare_dtype_tuple():
    with pytest.raises(ValueError, match=r"impls\['native'\] must be an Implementation, got tuple"):
        backend.register_op("bad_op", {"native": (F32,), "torch": Implementation(())})
    with pytest.raises(ValueError, match="must include 'torch'"):
        backend.register_op("bad_op", {"native": Implementation((F32,))})
    assert "bad_op" not in backend.registered_ops()


def test_cpu_order_is_native_then_torch(monkeypatch, dummy_op, cache):
    fake_native(monkeypatch, present=True)
    assert backend.select("dummy_op", CPU, F32) == "native"
    fake_native(monkeypatch, present=False)
    assert backend.select("dummy_op", CPU, F32) == "torch"


def test_cpu_never_picks_triton_unless_forced(monkeypatch, dummy_op, cache):
    fake_native(monkeypatch, present=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.select("dummy_op", CPU, F32) == "torch"
    monkeypatch.setenv("KERNELRL_BACKEND", "triton")
    assert backend.select("dummy_op", CPU, F32) == "triton"


def test_unsupported_dtype_falls_through_to_torch(monkeypatch, dummy_op, cache):
    fake_native(monkeypatch, present=True)
    assert backend.select("dummy_op", CPU, torch.float64) == "torch"


def test_skip_rule_passes_over_a_backend_unless_forced(monkeypatch, cache):
    fake_native(monkeypatch, present=True)
    register_dummy("dummy_skip", skip={("native", "cpu"): "slower than torch in bench_dummy"})
    try:
        assert backend.decide("dummy_skip", CPU, F32) == backend.Decision("torch", "default")
        monkeypatch.setenv("KERNELRL_BACKEND", "native")      # forcing still runs it
        assert backend.select("dummy_skip", CPU, F32) == "native"
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
        backend.select("dummy_op", CPU, F32)


def test_forced_native_on_cuda_without_cuda_kernels(monkeypatch, dummy_op):
    fake_native(monkeypatch, present=True, cuda=False)
    monkeypatch.setenv("KERNELRL_BACKEND", "native")
    with pytest.raises(BackendError, match="built without CUDA"):
        backend.select("dummy_op", torch.device("cuda"), F32)


def test_forced_backend_error_reaches_the_public_op(monkeypatch):
    from kernelrl.ops import token_logprobs
    fake_native(monkeypatch, present=False)
    monkeypatch.setenv("KERNELRL_BACKEND", "native")
    with pytest.raises(BackendError, match="cannot run token_logprobs on cpu float32"):
        token_logprobs(torch.randn(2, 5), torch.tensor([1, 2]))


# ---------------------------------------------------------------------------------------
# force()
# ---------------------------------------------------------------------------------------

def test_force_overrides_the_environment_and_restores_on_exit(monkeypatch, dummy_op, cache):
    fake_native(monkeypatch, present=True)
    monkeypatch.setenv("KERNELRL_BACKEND", "native")
    with backend.force("torch"):
        assert backend.select("dummy_op", CPU, F32) == "torch"
        with backend.force(None):                  # the default choice, env ignored
            monkeypatch.setenv("KERNELRL_BACKEND", "bogus")
            assert backend.select("dummy_op", CPU, F32) == "native"
            monkeypatch.setenv("KERNELRL_BACKEND", "native")
        assert backend.select("dummy_op", CPU, F32) == "torch"
    monkeypatch.setenv("KERNELRL_BACKEND", "torch")
    assert backend.select("dummy_op", CPU, F32) == "torch"     # env again after the block
    monkeypatch.delenv("KERNELRL_BACKEND")
    assert backend.select("dummy_op", CPU, F32) == "native"


def test_force_is_per_thread_and_checks_its_argument(monkeypatch, dummy_op, cache):
    fake_native(monkeypatch, present=True)
    seen = []
    with backend.force("torch"):
        thread = threading.Thread(target=lambda: seen.append(
            backend.select("dummy_op", CPU, F32)))
        thread.start()
        thread.join()
        assert backend.select("dummy_op", CPU, F32) == "torch"
    assert seen == ["native"]
    with pytest.raises(BackendError, match="force: backend must be one of native, triton, "
                                           "torch; got 'cuda'"):
        with backend.force("cuda"):
            pass


def test_force_of_a_backend_that_cannot_run_names_force(monkeypatch, dummy_op):
    fake_native(monkeypatch, present=False)
    with backend.force("native"), pytest.raises(BackendError, match=r"backend.force\(\)=native"):
        backend.select("dummy_op", CPU, F32)


# ---------------------------------------------------------------------------------------
# tuned file and built-in table
# ---------------------------------------------------------------------------------------

def test_cache_path_follows_kernelrl_cache_dir_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("KERNELRL_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert backend.tuned_path() == tmp_path / "mine" / f"tuned-{__version__}.json"
    monkeypatch.delenv("KERNELRL_CACHE_DIR")
    assert backend.tuned_path() == tmp_path / "xdg" / "kernelrl" / f"tuned-{__version__}.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert backend.cache_dir() == tmp_path / "home" / ".cache" / "kernelrl"


def test_tuned_entry_is_used_and_forcing_still_overrides_it(monkeypatch, dummy_op, cache):
    fake_native(monkeypatch, present=True)
    assert backend.select("dummy_op", CPU, F32) == "native"     # default order
    write_tuned({"dummy_op": {backend.cpu_model(): {"float32": entry("torch")}}})
    assert backend.decide("dummy_op", CPU, F32).source == "tuned"
    assert backend.select("dummy_op", CPU, F32) == "torch"
    monkeypatch.setenv("KERNELRL_BACKEND", "native")
    assert backend.select("dummy_op", CPU, F32) == "native"
    monkeypatch.delenv("KERNELRL_BACKEND")
    with backend.force("native"):
        assert backend.select("dummy_op", CPU, F32) == "native"
    # another machine's model or another dtype: not used
    write_tuned({"dummy_op": {"Some Other CPU": {"float32": entry("torch")},
                              backend.cpu_model(): {"float16": entry("torch")}}})
    assert backend.select("dummy_op", CPU, F32) == "native"


def test_tuned_file_is_read_once_until_reloaded(monkeypatch, dummy_op, cache):
    fake_native(monkeypatch, present=True)
    assert backend.select("dummy_op", CPU, F32) == "native"
    backend.tuned_path().write_text(json.dumps(
        {"entries": {"dummy_op": {backend.cpu_model(): {"float32": entry("torch")}}}}))
    assert backend.select("dummy_op", CPU, F32) == "native"      # still the first read
    backend.reload_tuned()
    assert backend.select("dummy_op", CPU, F32) == "torch"


def test_tuned_choice_that_cannot_run_falls_back_without_its_rejects(monkeypatch, cache):
    fake_native(monkeypatch, present=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    backend.register_op("dummy_three", {"native": Implementation((F32,)),
                                        "torch": Implementation(())})
    try:
        # tuned on a machine where triton won and native failed the check
        write_tuned({"dummy_three": {backend.cpu_model(): {"float32": entry(
            "triton", rejected={"native": "output 0: error 3e-2 > bound 1e-5"})}}})
        decision = backend.decide("dummy_three", CPU, F32)
        assert (decision.backend, decision.source) == ("torch", "default")
    finally:
        backend._OPS.pop("dummy_three")


def test_unreadable_tuned_file_is_ignored_and_says_why(monkeypatch, dummy_op, cache):
    fake_native(monkeypatch, present=True)
    backend.tuned_path().write_text("{not json")
    backend.reload_tuned()
    assert backend.select("dummy_op", CPU, F32) == "native"
    assert "unreadable (JSONDecodeError" in backend.tuned_file().problem


def test_builtin_table_comes_after_tuned_and_before_the_default(monkeypatch, dummy_op, cache):
    fake_native(monkeypatch, present=True)
    shipped = types.ModuleType("kernelrl._dispatch_table")
    shipped.TABLE = {"dummy_op": {backend.cpu_model(): {"float32": entry("torch")}}}
    monkeypatch.setitem(sys.modules, "kernelrl._dispatch_table", shipped)
    backend.reload_tuned()
    assert backend.decide("dummy_op", CPU, F32).source == "built-in"
    assert backend.select("dummy_op", CPU, F32) == "torch"
    write_tuned({"dummy_op": {backend.cpu_model(): {"float32": entry("native")}}})
    assert backend.decide("dummy_op", CPU, F32) == backend.Decision(
        "native", "tuned", entry("native"))


def test_shipped_builtin_table_is_a_dict_of_the_entry_form():
    import kernelrl._dispatch_table as shipped

    assert isinstance(shipped.TABLE, dict)
    for per_device in shipped.TABLE.values():
        for per_dtype in per_device.values():
            for item in per_dtype.values():
                assert item["choice"] in backend.BACKENDS and "date" in item


# ---------------------------------------------------------------------------------------
# native build record
# ---------------------------------------------------------------------------------------

@pytest.fixture
def native_not_built(monkeypatch):
    """The install record that KERNELRL_BUILD_NATIVE=0 (and KERNELRL_BUILD_CUDA=0) leaves."""
    config = types.ModuleType("kernelrl._build_config")
    config.BUILD_NATIVE, config.BUILD_CUDA = False, "0"
    monkeypatch.setitem(sys.modules, "kernelrl._build_config", config)
    backend._native_status.cache_clear()
    yield config
    monkeypatch.undo()
    backend._native_status.cache_clear()


def test_build_native_false_means_not_built_by_choice(native_not_built, dummy_op):
    assert backend._native_status() == (None, "not built (by choice, KERNELRL_BUILD_NATIVE=0)")
    ok, why = backend.availability("native", CPU, F32, dummy_op)
    assert not ok and why.startswith("not built (by choice")
    with pytest.raises(BackendError, match=r"not built \(by choice"):
        backend.native_module()


def test_build_native_false_never_imports_the_native_module():
    code = ("import sys, types\n"
            "config = types.ModuleType('kernelrl._build_config')\n"
            "config.BUILD_NATIVE, config.BUILD_CUDA = False, '0'\n"
            "sys.modules['kernelrl._build_config'] = config\n"
            "import torch, kernelrl.ops\n"
            "from kernelrl import backend\n"
            "assert backend.select('token_logprobs', torch.device('cpu'), torch.float32) "
            "== 'torch'\n"
            "assert 'kernelrl._native' not in sys.modules, 'native imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_import_does_not_load_the_native_module():
    code = ("import sys, kernelrl, kernelrl.ops; "
            "assert 'kernelrl._native' not in sys.modules, 'native loaded at import'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_backend_imports_no_other_kernelrl_module():
    """backend.py sits below the ops and info: it must not import them (no import circle)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(backend))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    allowed = {"kernelrl._version"}                        # a leaf module, imported lazily
    assert [m for m in imported if m and m.startswith("kernelrl") and m not in allowed] == []


@pytest.mark.parametrize("entries", [
    {"dummy_op": ["not", "a", "dict"]},
    {"dummy_op": {"*": "x"}},
    {"dummy_op": {"*": {"float32": {"choice": "cuda"}}}},          # not a backend
])
def test_malformed_tuned_entries_never_break_dispatch(monkeypatch, dummy_op, cache, entries):
    fake_native(monkeypatch, present=True)
    entries = json.loads(json.dumps(entries).replace('"*"', json.dumps(backend.cpu_model())))
    write_tuned(entries)
    assert backend.select("dummy_op", CPU, F32) == "native"


def test_builtin_choice_that_failed_the_check_here_is_not_used(monkeypatch, dummy_op, cache):
    fake_native(monkeypatch, present=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    shipped = types.ModuleType("kernelrl._dispatch_table")
    shipped.TABLE = {"dummy_op": {backend.cpu_model(): {"float32": entry("native")}}}
    monkeypatch.setitem(sys.modules, "kernelrl._dispatch_table", shipped)
    write_tuned({"dummy_op": {backend.cpu_model(): {"float32": entry(
        "triton", rejected={"native": "grad of arg 0: error 1e-1"})}}})
    assert backend.decide("dummy_op", CPU, F32) == backend.Decision(
        "torch", "default", entry("triton", rejected={"native": "grad of arg 0: error 1e-1"}))
