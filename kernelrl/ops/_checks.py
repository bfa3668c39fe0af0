"""Argument checks shared by the public ops.

Every error is a ValueError that names the argument, what was expected and what was given.
None of these checks syncs with the device.
"""

from __future__ import annotations

import math

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float64,) + KERNEL_DTYPES


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_tensor(name: str, value, *, dtypes=None, ndim_min: int | None = None,
                 ndim: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(_dt(d) for d in dtypes)
        raise ValueError(f"{name}: expected dtype in ({allowed}), got {_dt(value.dtype)}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(value.shape)}")
    if ndim_min is not None and value.dim() < ndim_min:
        raise ValueError(f"{name}: expected at least {ndim_min} dimension(s), "
                         f"got shape {tuple(value.shape)}")
    return value


def check_labels(name: str, labels, shape: torch.Size, device: torch.device) -> torch.Tensor:
    check_tensor(name, labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer dtype, got {_dt(labels.dtype)}")
    if labels.shape != shape:
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(labels.shape)}")
    check_same_device(name, labels, device)
    return labels


def check_same_device(name: str, value: torch.Tensor, device: torch.device) -> None:
    if value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {value.device}")


def check_temperature(temperature) -> float:
    if isinstance(temperature, torch.Tensor) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature: expected a Python float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: expected a finite value > 0, got {temperature}")
    return float(temperature)


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def check_labels_in_range(name: str, labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """KERNELRL_DEBUG=1 only: raise on a label outside [0, vocab) that is not ignore_index.

    Costs a host sync (reading the result back), which is why it runs only in debug mode.
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any().item()):  # host sync: debug mode only
        first = labels[bad][0].item()  # host sync: debug mode only
        raise ValueError(f"{name}: expected values in [0, {vocab}) or ignore_index={ignore_index}, "
                         f"got {first} ({int(bad.sum().item())} such labels)")  # host sync: debug


def check_triton_device(name: str, t: torch.Tensor, device: torch.device | None = None) -> None:
    """A Triton launcher's operand: on ``device`` (when given) and on CUDA, or on the CPU
    under the Triton interpreter (``TRITON_INTERPRET=1``)."""
    from kernelrl.backend import triton_interpret

    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    if t.device.type == "cuda" or (t.device.type == "cpu" and triton_interpret()):
        return
    raise ValueError(f"{name}: expected a CUDA tensor (CPU tensors run only under "
                     f"TRITON_INTERPRET=1), got one on {t.device}")
