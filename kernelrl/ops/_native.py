"""Glue between the ops and ``kernelrl._native``, shared by every kernel family.

The native module is torch-free: kernels take raw pointers (``tensor.data_ptr()``), sizes,
strides, a dtype code and, on CUDA, a stream. Each family's op module checks dtype,
device, contiguity and shapes, then calls :func:`launch` with the native module's CPU and
CUDA entry points (``lib.<family>_<step>_cpu`` / ``..._cuda``), wrapped in a
``torch.library.custom_op`` so that ``torch.compile`` and FSDP trace through the call.
A CPU-only build still has the ``_cuda`` entry points; they raise saying CUDA was not built.
"""

from __future__ import annotations

from typing import Callable

import torch

from kernelrl import backend as _backend

__all__ = ["DTYPE_CODE", "dtype_code", "library", "launch"]

#: dtype codes understood by every native kernel (csrc/common/dtype.h).
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return DTYPE_CODE[dtype]
    except KeyError:
        raise ValueError(f"native kernels take float32, float16 or bfloat16, "
                         f"not {str(dtype).removeprefix('torch.')}") from None


def library():
    """The native extension module (raises BackendError saying why it is missing)."""
    return _backend.native_module()


#: torch's own raw-stream query (what torch.compile's generated code calls), or None in a
#: build without CUDA; the public route builds a torch.cuda.Stream object on every call.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream(index: int) -> int:
    """The current CUDA stream of device ``index``, as the int a native kernel takes."""
    if _raw_stream is not None:
        return _raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


def launch(device: torch.device, cpu_fn: Callable, cuda_fn: Callable, *args) -> None:
    """Run a native kernel on ``device``: ``cpu_fn(*args)`` with the CPU kernels' thread
    count following ``torch.get_num_threads()``, or ``cuda_fn(*args, stream)`` on the
    current stream of ``device``."""
    if device.type == "cuda":
        here = torch.cuda.current_device()
        if device.index is None or device.index == here:
            cuda_fn(*args, current_stream(here))
        else:
            with torch.cuda.device(device):
                cuda_fn(*args, current_stream(device.index))
        return
    lib = library()
    threads = torch.get_num_threads()
    if lib.get_num_threads() != threads:      # follow torch.set_num_threads
        lib.set_num_threads(threads)
    cpu_fn(*args)
