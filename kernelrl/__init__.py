"""kernelrl: a kernel-accelerated engine for LLM post-training.

Fused Triton and CUDA kernels under a lean Python training loop. Importing this package
never touches a GPU, compiles anything or loads the native module, and it imports torch
only when ``kernelrl.ops`` is first used: backends are chosen per call (see
:mod:`kernelrl.backend`).

Public entry points:
    kernelrl.ops      the fused ops (token_logprobs, linear_logprobs, ...)
    kernelrl.info()   what is available on this machine and which backend each op uses,
                      and why (a dict; ``kernelrl info`` prints it)
"""

import importlib

from kernelrl._version import __version__
from kernelrl.info import info

__all__ = ["__version__", "ops", "info"]


def __getattr__(name: str):
    if name == "ops":  # loaded on first use: it imports torch and registers every op
        return importlib.import_module("kernelrl.ops")
    raise AttributeError(f"module 'kernelrl' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"ops"})
