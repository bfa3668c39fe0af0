"""Build script for kernelrl: the Python package plus the native extension kernelrl._native.

The extension is built from csrc/ by CMake (with pybind11, and ninja when available). It is
torch-free, so one build works with any torch. Environment variables:

  KERNELRL_BUILD_NATIVE=0     skip the native build entirely (pure-Python install); this also
                              deletes kernelrl/_native*.so / .pyd left in the source tree by an
                              earlier build, so that an editable install cannot import it
  KERNELRL_BUILD_CUDA=0       skip the CUDA part (default: build it whenever nvcc is found,
                              on PATH, as $CUDA_HOME/bin/nvcc or /usr/local/cuda/bin/nvcc,
                              even if torch has no CUDA);
                              =1 requires nvcc and fails without it
  KERNELRL_CUDA_ARCHS         CMAKE_CUDA_ARCHITECTURES, default "90" (H100); for example
                              "80;90" for A100 + H100, "90a" for Hopper-only instructions
  CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs (default: os.cpu_count())
  KERNELRL_CMAKE_ARGS         extra arguments for the CMake configure step

A CUDA compile error fails the build (CI relies on it); KERNELRL_BUILD_CUDA=0 skips that part.

Every run also writes kernelrl/_build_config.py (generated, git-ignored) with the build choices
(BUILD_NATIVE, and BUILD_CUDA as given), before setuptools copies the package, so that editable
installs and wheels both carry it; kernelrl.backend reads it to tell "not built, by choice" from
"build failed" and to never import a stale extension.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def read_version() -> str:
    """Reads __version__ from kernelrl/_version.py without importing the package."""
    path = ROOT / "kernelrl" / "_version.py"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RuntimeError(f"kernelrl setup: {path} is missing (it holds __version__)") from None
    match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"kernelrl setup: no __version__ = '...' line in {path}")
    return match.group(1)


def env_flag(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip().lower()


def find_nvcc() -> str | None:
    """nvcc on PATH, else $CUDA_HOME/bin/nvcc (or $CUDA_PATH), else /usr/local/cuda/bin/nvcc."""
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in homes:
        if home:
            candidate = Path(home) / "bin" / "nvcc"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def find_cmake() -> str:
    """The cmake from the `cmake` PyPI package if installed (build requirement), else PATH."""
    try:
        import cmake  # type: ignore[import-not-found]

        candidate = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if candidate.is_file():
            return str(candidate)
    except (ImportError, AttributeError):
        pass
    path = shutil.which("cmake")
    if path is None:
        raise RuntimeError(
            "kernelrl setup: cmake >= 3.18 not found (pip install cmake), "
            "or set KERNELRL_BUILD_NATIVE=0 to install without the native extension"
        )
    return path


def find_ninja() -> str | None:
    try:
        import ninja  # type: ignore[import-not-found]

        candidate = Path(ninja.BIN_DIR) / "ninja"
        if candidate.is_file():
            return str(candidate)
    except (ImportError, AttributeError):
        pass
    return shutil.which("ninja")


class CMakeExtension(Extension):
    """An extension built by CMake from `sourcedir` (no sources for setuptools to compile)."""

    def __init__(self, name: str, sourcedir: Path) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    """Configures and builds a CMakeExtension into the path setuptools expects.

    setuptools copies that file into the source tree for editable installs
    (`pip install -e .`), so `import kernelrl._native` works from the checkout.
    """

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return

        import pybind11

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = ext_path.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)

        build_cuda = env_flag("KERNELRL_BUILD_CUDA", "auto")
        nvcc = None
        if build_cuda not in ("0", "off", "false", "no"):
            nvcc = find_nvcc()
            if nvcc is None and build_cuda in ("1", "on", "true", "yes"):
                raise RuntimeError(
                    "kernelrl setup: KERNELRL_BUILD_CUDA=1 but nvcc was found neither on PATH "
                    "nor in $CUDA_HOME/bin"
                )
        archs = os.environ.get("KERNELRL_CUDA_ARCHS", "").strip() or "90"

        cmake = find_cmake()
        ninja = find_ninja()
        args = [
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DKERNELRL_VERSION={read_version()}",
            f"-DKERNELRL_OUTPUT_DIR={out_dir}",
        ]
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if nvcc:
            args += [
                "-DKERNELRL_BUILD_CUDA=ON",
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            ]
        else:
            args += ["-DKERNELRL_BUILD_CUDA=OFF"]
        args += shlex.split(os.environ.get("KERNELRL_CMAKE_ARGS", ""))

        # A cache from another configuration (another generator, or a build env that pip has
        # since deleted) cannot be reused: start that build directory afresh.
        stamp = build_dir / "kernelrl-configure-args.txt"
        signature = "\n".join([cmake, ext.sourcedir, *args])
        if stamp.exists() and stamp.read_text() != signature:
            shutil.rmtree(build_dir)
            build_dir.mkdir(parents=True)

        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "").strip() or str(os.cpu_count() or 1)
        what = f"CPU + CUDA (nvcc {nvcc}, archs {archs})" if nvcc else "CPU only"
        print(f"kernelrl: building kernelrl._native [{what}] with {jobs} jobs", flush=True)

        try:
            subprocess.run([cmake, "-S", ext.sourcedir, "-B", str(build_dir), *args], check=True)
            stamp.write_text(signature)
            subprocess.run(
                [cmake, "--build", str(build_dir), "--parallel", jobs, "--target", "_native"],
                check=True,
            )
        except subprocess.CalledProcessError:
            if nvcc:
                print(
                    "\nkernelrl: the native build failed (CUDA part enabled, nvcc found at "
                    f"{nvcc}).\nIf the error is in a .cu file, fix it; to build without the "
                    "CUDA kernels, set KERNELRL_BUILD_CUDA=0. KERNELRL_BUILD_NATIVE=0 skips "
                    "the native extension entirely.\n",
                    file=sys.stderr,
                    flush=True,
                )
            else:
                print(
                    "\nkernelrl: the native build failed. KERNELRL_BUILD_NATIVE=0 skips the "
                    "native extension entirely.\n",
                    file=sys.stderr,
                    flush=True,
                )
            raise

        if not ext_path.is_file():
            raise RuntimeError(
                f"kernelrl setup: CMake finished but {ext_path} was not produced "
                f"(found: {sorted(p.name for p in out_dir.glob('_native*'))})"
            )


def write_build_config(package_dir: Path, build_native: bool, build_cuda: str) -> None:
    """Writes <package_dir>/_build_config.py (rewritten only when its text changes)."""
    text = (
        "# generated by setup.py; do not edit\n"
        f"BUILD_NATIVE = {build_native}\n"
        f"BUILD_CUDA = {json.dumps(build_cuda)}\n"
    )
    path = package_dir / "_build_config.py"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def remove_stale_native(package_dir: Path) -> None:
    """Deletes extension modules an earlier build left in the package directory."""
    for pattern in ("_native*.so", "_native*.pyd"):
        for path in package_dir.glob(pattern):
            print(f"kernelrl: KERNELRL_BUILD_NATIVE=0: removing {path}", flush=True)
            path.unlink()


build_native = env_flag("KERNELRL_BUILD_NATIVE", "1") not in ("0", "off", "false", "no")
write_build_config(
    ROOT / "kernelrl", build_native, os.environ.get("KERNELRL_BUILD_CUDA", "").strip() or "auto"
)
if not build_native:
    remove_stale_native(ROOT / "kernelrl")
ext_modules = [CMakeExtension("kernelrl._native", ROOT)] if build_native else []

setup(
    name="kernelrl",
    version=read_version(),
    description="Kernel-accelerated LLM post-training engine (SFT, RM, PPO, DPO)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8")
    if (ROOT / "README.md").is_file()
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kernelrl", "kernelrl.*"]),
    package_data={"kernelrl.demo": ["data/*.jsonl"]},
    install_requires=["torch>=2.11", "triton>=3.6", "numpy", "safetensors", "transformers>=5.0",
                      "tqdm", "matplotlib"],
    extras_require={"test": ["pytest", "hypothesis", "peft", "bitsandbytes>=0.49"],
                    "bench": ["trl", "bitsandbytes>=0.49"]},
    entry_points={"console_scripts": ["kernelrl = kernelrl.cli:main"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
