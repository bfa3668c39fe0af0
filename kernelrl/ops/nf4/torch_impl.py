"""nf4_linear in torch: the float64 reference (the tests' oracle) and the chunked path that
the torch and native backends run.

The chunked path dequantizes Ŵ a slice of rows at a time (``CHUNK_ELEMENTS`` elements,
32 MiB in float32) and multiplies each slice at once, so that its extra memory is one slice,
never the whole dequantized weight. Products with a 16-bit reduction over slices are
summed in float32 and rounded once.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from kernelrl.ops.nf4.format import NF4Weight, dequantize_reference

#: Elements of Ŵ dequantized at once by the chunked path.
CHUNK_ELEMENTS = 1 << 23

Dequantizer = Callable[[NF4Weight, int, int, torch.dtype], torch.Tensor]


def dequantize_rows(qweight: NF4Weight, row0: int, row1: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [row0, row1) of Ŵ in ``dtype`` (plain torch)."""
    return dequantize_reference(qweight, dtype, rows=(row0, row1))


def linear_reference(x: torch.Tensor, qweight: NF4Weight, bias=None, lora_a=None, lora_b=None,
                     lora_scale: float = 1.0, x_lora: Optional[torch.Tensor] = None,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """y = x·Ŵᵀ + bias + lora_scale·(x_lora·Aᵀ)·Bᵀ in ``dtype`` (x_lora: x after dropout,
    x itself by default), Ŵ decoded in float32 exactly and then cast."""
    w = dequantize_reference(qweight, torch.float32).to(dtype)
    y = x.to(dtype) @ w.t()
    if bias is not None:
        y = y + bias.to(dtype)
    if lora_a is not None:
        xl = x if x_lora is None else x_lora
        y = y + lora_scale * (xl.to(dtype) @ lora_a.to(dtype).t()) @ lora_b.to(dtype).t()
    return y


def _rows_per_chunk(qweight: NF4Weight) -> int:
    return max(1, CHUNK_ELEMENTS // max(qweight.shape[1], 1))


def matmul(a: torch.Tensor, qweight: NF4Weight, *, transpose_w: bool, bias=None,
           lora_left=None, lora_right=None, lora_scale: float = 1.0,
           dequantize: Dequantizer = dequantize_rows) -> torch.Tensor:
    """out = a·Ŵᵀ (``transpose_w``, a [M, K] -> [M, N]) or a·Ŵ (a [M, N] -> [M, K]), plus
    ``bias`` and ``lora_scale · lora_left·lora_right``, in a's dtype; Ŵ [N, K] dequantized
    a slice of rows at a time by ``dequantize``."""
    N, K = qweight.shape
    M = a.shape[0]
    step = _rows_per_chunk(qweight)
    if transpose_w:
        out = a.new_empty(M, N)
        for r0 in range(0, N, step):
            r1 = min(r0 + step, N)
            out[:, r0:r1] = a @ dequantize(qweight, r0, r1, a.dtype).t()
    elif N <= step:
        out = a @ dequantize(qweight, 0, N, a.dtype)
    else:     # reduction over slices: partial products summed in float32
        acc = torch.zeros(M, K, dtype=torch.float32, device=a.device)
        for r0 in range(0, N, step):
            r1 = min(r0 + step, N)
            acc += (a[:, r0:r1] @ dequantize(qweight, r0, r1, a.dtype)).float()
        out = acc.to(a.dtype)
    if bias is not None:
        out += bias
    if lora_left is not None:
        out.addmm_(lora_left, lora_right, alpha=lora_scale)
    return out


def gemv(x: torch.Tensor, qweight: NF4Weight) -> torch.Tensor:
    """x·Ŵᵀ for a few rows (the decode shape), by the chunked path."""
    return matmul(x, qweight, transpose_w=True)
