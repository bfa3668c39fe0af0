"""kernelrl: a kernel-accelerated engine for LLM post-training.

Fused Triton and CUDA kernels under a lean Python training loop. Importing this package
never touches a GPU, compiles anything or loads the native module: backends are chosen
per call (see :mod:`kernelrl.backend`).

Public entry points:
    kernelrl.ops      the fused ops (token_logprobs, linear_logprobs, ...)
    kernelrl.info()   what is available on this machine and which backend each op uses
"""

from kernelrl._version import __version__
from kernelrl import ops
from kernelrl.backend import info

__all__ = ["__version__", "ops", "info"]
