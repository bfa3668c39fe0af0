"""kernelrl._native as a build: the module-wide functions, kernel-family discovery, the CUDA
entry points of a CPU-only build, setup.py's generated build config, the fp16/bf16 conversions
(bit for bit against torch), and that every csrc/**/*.cu compiles with nvcc (where nvcc is on
PATH). Each family's kernels are tested in test_<family>_native.py.

Family discovery is tested end to end: a throwaway family csrc/zz_demo/ (header, CPU twin,
bind.cpp) is built next to csrc/common and csrc/bindings.cpp with the unmodified CMakeLists.txt,
CPU-only, and the resulting module must bind it, document it, and raise for its CUDA entry point.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

native = pytest.importorskip(
    "kernelrl._native", reason="kernelrl._native is not built (pip install -e . builds it)"
)

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
POISON = 7777.0  # written into outputs first: any element the kernel fails to write shows up
NO_CUDA = "built without CUDA"
MODULE_WIDE = ("has_cuda", "cuda_device_count", "cpu_isa", "get_num_threads", "set_num_threads",
               "_cast_cpu")


def families() -> list[str]:
    """The kernel families in this checkout: every csrc/<family>/bind.cpp but common/."""
    return sorted(p.parent.name for p in CSRC.glob("*/bind.cpp") if p.parent.name != "common")


def n_params(fn) -> int:
    """Parameter count of a pybind11 function, from the signature line of its docstring."""
    signature = fn.__doc__.splitlines()[0]
    return len(re.findall(r"(\w+): ", signature[signature.index("(") + 1:signature.rindex(")")]))


def raises_without_cuda(lib) -> dict[str, str]:
    """Calls every *_cuda function of lib with zeros; name -> what it did, where not the
    RuntimeError of a CPU-only build."""
    wrong = {}
    for name in sorted(n for n in dir(lib) if n.endswith("_cuda") and n not in MODULE_WIDE):
        try:
            getattr(lib, name)(*[0] * n_params(getattr(lib, name)))
            wrong[name] = "returned"
        except RuntimeError as e:
            if NO_CUDA not in str(e):
                wrong[name] = f"RuntimeError({e})"
        except Exception as e:  # noqa: BLE001 - reported, not swallowed
            wrong[name] = repr(e)
    return wrong


# ---- module ------------------------------------------------------------------------------------


def test_module_surface():
    text = (ROOT / "kernelrl" / "_version.py").read_text()
    version = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text).group(1)
    assert native.__version__ == version
    for name in MODULE_WIDE:
        assert callable(getattr(native, name)), name
    assert isinstance(native.has_cuda(), bool)
    count = native.cuda_device_count()
    assert isinstance(count, int) and count >= 0
    if not native.has_cuda():
        assert count == 0
    # The _cuda entry points exist in every build (they raise where CUDA was not built).
    for name in ("logprobs_fwd_cpu", "logprobs_bwd_cpu", "logprobs_fwd_cuda", "logprobs_bwd_cuda"):
        assert callable(getattr(native, name)), name


def test_every_family_is_bound():
    """Each csrc/<family>/bind.cpp was found by CMake and its bind_<family> ran: the module
    has <family>_* functions (a failure here may just mean a stale build: pip install -e .)."""
    found = families()
    assert "logprobs" in found
    for family in found:
        bound = [n for n in dir(native) if n.startswith(family + "_")]
        assert bound, f"csrc/{family}/bind.cpp: kernelrl._native has no {family}_* function"
    assert native.logprobs_fwd_cpu.__doc__ and "logprobs:" in native.__doc__


def test_cuda_entry_points_raise_in_cpu_only_build():
    if native.has_cuda():
        pytest.skip("this build has the CUDA part (test_new_family_needs_no_shared_edit builds "
                    "a CPU-only module and checks the same)")
    assert not raises_without_cuda(native)
    with pytest.raises(RuntimeError, match=NO_CUDA):
        native.logprobs_fwd_cuda(256, 256, 256, 256, 0, 1, 8, 8, 0, 1.0, -100, 0)


# ---- a new family needs no shared edit -----------------------------------------------------------

DEMO = {
    "zz_demo.h": """
        // zz_demo.h: test family: x *= factor over n elements of dtype.
        #pragma once
        #include <cstdint>
        #include "common/dtype.h"
        namespace kernelrl {
        void zz_demo_scale_cpu(void* x, int64_t n, DType dtype, float factor);
        // Declared, never defined: a CPU-only build must not link it.
        void zz_demo_scale_cuda(void* x, int64_t n, DType dtype, float factor, void* stream);
        }  // namespace kernelrl
    """,
    "zz_demo_cpu.cpp": """
        #include "zz_demo/zz_demo.h"
        #include "common/dispatch.h"
        #include "common/row_loop.h"
        namespace kernelrl {
        void zz_demo_scale_cpu(void* x, int64_t n, DType dtype, float factor) {
          dispatch_dtype(dtype, [&](auto tag) {
            using T = typename decltype(tag)::type;
            T* p = static_cast<T*>(x);
            for_each_row(n, 1, [&](int64_t i) { p[i] = from_float<T>(to_float(p[i]) * factor); });
          });
        }
        }  // namespace kernelrl
    """,
    "bind.cpp": """
        #include "common/bind.h"
        #include "zz_demo/zz_demo.h"
        namespace kernelrl {
        void bind_zz_demo(pybind11::module_& m) {
          bind::append_doc(m, "zz_demo: a test family.");
          constexpr auto kArgs = bind::args("x", "n", "dtype", "factor");
          bind::def_kernel(m, "zz_demo_scale_cpu", &zz_demo_scale_cpu, kArgs, "x *= factor.");
          KERNELRL_DEF_CUDA(m, "zz_demo_scale_cuda", zz_demo_scale_cuda, kArgs, "x *= factor.");
        }
        }  // namespace kernelrl
    """,
}

# Runs in a fresh interpreter (the built module is also called _native).
DEMO_CHECK = """
import array, json, sys
sys.path.insert(0, sys.argv[1])
import _native
x = array.array("f", [1.0, -2.0, 3.5])
_native.zz_demo_scale_cpu(x.buffer_info()[0], len(x), 0, 2.0)
try:
    _native.zz_demo_scale_cuda(x.buffer_info()[0], len(x), 0, 2.0, 0)
    cuda = "returned"
except RuntimeError as e:
    cuda = str(e)
print(json.dumps({"x": list(x), "cuda": cuda, "has_cuda": _native.has_cuda(),
                  "doc": _native.__doc__, "names": dir(_native)}))
"""


def test_new_family_needs_no_shared_edit(tmp_path):
    cmake, ninja = shutil.which("cmake"), shutil.which("ninja")
    pybind11 = pytest.importorskip("pybind11", reason="pybind11 is needed to build the module")
    if cmake is None or ninja is None:
        pytest.skip("cmake and ninja are needed to build the module")
    src = tmp_path / "src"
    (src / "kernelrl").mkdir(parents=True)
    shutil.copy(ROOT / "CMakeLists.txt", src)
    shutil.copy(ROOT / "kernelrl" / "_version.py", src / "kernelrl")
    shutil.copytree(CSRC / "common", src / "csrc" / "common")
    shutil.copy(CSRC / "bindings.cpp", src / "csrc")
    # The real families stay out (a smaller build); zz_demo is the only one.
    (src / "csrc" / "zz_demo").mkdir()
    for name, text in DEMO.items():
        (src / "csrc" / "zz_demo" / name).write_text(textwrap.dedent(text).lstrip())
    build = tmp_path / "build"
    configure = [cmake, "-S", str(src), "-B", str(build), "-G", "Ninja",
                 f"-DCMAKE_MAKE_PROGRAM={ninja}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                 f"-DPython_EXECUTABLE={sys.executable}", "-DKERNELRL_BUILD_CUDA=OFF"]
    for cmd in (configure, [cmake, "--build", str(build), "--parallel", str(os.cpu_count() or 1)]):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{' '.join(cmd)}:\n{res.stdout[-4000:]}{res.stderr[-4000:]}"
    inc = (build / "generated" / "kernelrl_families.inc").read_text()
    assert re.findall(r"^KERNELRL_FAMILY\((\w+)\)$", inc, re.MULTILINE) == ["zz_demo"]

    res = subprocess.run([sys.executable, "-c", DEMO_CHECK, str(build)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["x"] == [2.0, -4.0, 7.0]
    assert NO_CUDA in out["cuda"] and out["has_cuda"] is False
    assert "\nzz_demo: a test family." in out["doc"]
    assert set(MODULE_WIDE) <= set(out["names"])


# ---- setup.py's build config ---------------------------------------------------------------------

BUILD_CONFIG = re.compile(
    r'# generated by setup\.py; do not edit\nBUILD_NATIVE = (True|False)\nBUILD_CUDA = "[^"\n]*"\n')


def test_build_config_says_native_was_built():
    from kernelrl import _build_config

    text = Path(_build_config.__file__).read_text()
    assert BUILD_CONFIG.fullmatch(text), text
    assert _build_config.BUILD_NATIVE is True  # this test runs only where _native imports


def test_setup_without_native_removes_stale_extension(tmp_path):
    """KERNELRL_BUILD_NATIVE=0 deletes an earlier build's kernelrl/_native*.so / .pyd from the
    source tree (an editable install would import it) and records the choice."""
    pkg = tmp_path / "kernelrl"
    pkg.mkdir()
    shutil.copy(ROOT / "setup.py", tmp_path)
    shutil.copy(ROOT / "kernelrl" / "_version.py", pkg)
    (pkg / "__init__.py").write_text("")
    stale = [pkg / "_native.cpython-311-x86_64-linux-gnu.so", pkg / "_native.pyd"]
    for path in stale:
        path.write_bytes(b"stale")
    env = {**os.environ, "KERNELRL_BUILD_NATIVE": "0", "KERNELRL_BUILD_CUDA": "0"}
    res = subprocess.run([sys.executable, "setup.py", "--name"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert not any(path.exists() for path in stale)
    assert (pkg / "_build_config.py").read_text() == (
        '# generated by setup.py; do not edit\nBUILD_NATIVE = False\nBUILD_CUDA = "0"\n')


# ---- dtype conversions ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_to_float_exhaustive(dtype):
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    src = bits.view(dtype)[:65535]  # odd length: the scalar tail runs too
    out = torch.full((src.numel(),), POISON)
    native._cast_cpu(src.data_ptr(), out.data_ptr(), src.numel(), DTYPES[dtype], 0)
    ref = src.float()
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int32), ref[~nan].view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float_to_half_round_to_nearest_even(dtype):
    finfo = torch.finfo(dtype)
    parts = [
        torch.randn(100_000) * 10.0 ** torch.randint(-12, 12, (100_000,)).float(),
        torch.rand(20_000) * finfo.tiny * 4,  # subnormals of the target and their ties
        torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 65504.0, 65519.99,
                      65520.0, 1e30, -1e30, 3.4e38, -3.4e38, 1.0 + 2**-11, 1.0 + 3 * 2**-11,
                      1.0 + 2**-8, 1.0 + 3 * 2**-8, 2.0**-24, 2.0**-25, 3 * 2.0**-26]),
        torch.randint(0, 2**31, (50_000,), dtype=torch.int64).to(torch.int32).view(torch.float32),
    ]
    # exact ties between neighbouring target values
    halves = torch.randn(20_000).to(dtype)
    nxt = torch.nextafter(halves, torch.full_like(halves, math.inf))
    parts.append((halves.double() + nxt.double()).div(2).float())
    src = torch.cat(parts)[:-1].contiguous()
    out = torch.full((src.numel(),), 1.0, dtype=dtype)
    native._cast_cpu(src.data_ptr(), out.data_ptr(), src.numel(), 0, DTYPES[dtype])
    ref = src.to(dtype)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan)
    mismatch = out[~nan].view(torch.int16) != ref[~nan].view(torch.int16)
    assert not mismatch.any(), f"first mismatches: {src[~nan][mismatch][:5].tolist()}"


# ---- nvcc ----------------------------------------------------------------------------------------


def test_cuda_sources_compile_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    sources = sorted(CSRC.rglob("*.cu"))
    assert sources, "no .cu files under csrc/"

    def compile_one(src):
        obj = tmp_path / (src.relative_to(CSRC).as_posix().replace("/", "_") + ".o")
        cmd = [nvcc, "-arch=sm_90", "-std=c++17", "-O1", "-I", str(CSRC), "-c", str(src),
               "-o", str(obj)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        return src, res

    workers = max(1, min(len(sources), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(compile_one, sources))
    failed = [f"{src}:\n{res.stdout}{res.stderr}" for src, res in results if res.returncode != 0]
    assert not failed, "nvcc failed:\n" + "\n".join(failed)
