"""The public NF4 ops: nf4_quantize, nf4_dequantize, and nf4_linear with its
autograd.Function; registers nf4_linear's backends (see the package docstring)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from kernelrl import backend as _backend
from kernelrl.ops.nf4 import torch_impl
from kernelrl.ops.nf4.format import (NF4Weight, check_blocksize, double_quantize,
                                     dequantize_reference, dynamic_map, quantize_reference)

#: Activation dtypes nf4_linear takes; the weight may have been quantized from any of them.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Rows of x up to which nf4_linear runs the decode GEMV (the rollout shape).
GEMV_MAX_ROWS = 16


@dataclass(frozen=True)
class NF4Kernels:
    """One backend's two entry points: ``gemv(x2d, qweight)`` (M ≤ 16 rows, no extras) and
    ``matmul(a, qweight, *, transpose_w, bias, lora_left, lora_right, lora_scale)``."""

    gemv: Callable
    matmul: Callable


def _native():
    from kernelrl.ops.nf4 import native_impl
    return native_impl


def _triton():
    from kernelrl.ops.nf4 import triton_impl
    return triton_impl


def _native_matmul(a, qweight, **kw):
    return torch_impl.matmul(a, qweight, dequantize=_native().dequantize_rows, **kw)


_KERNELS = {
    "native": NF4Kernels(lambda x, w: _native().gemv(x, w), _native_matmul),
    "triton": NF4Kernels(lambda x, w: _triton().gemv(x, w),
                         lambda a, w, **kw: _triton().dequant_matmul(a, w, **kw)),
    "torch": NF4Kernels(torch_impl.gemv, torch_impl.matmul),
}


# ---------------------------------------------------------------------------------------
# quantize / dequantize
# ---------------------------------------------------------------------------------------
def _use_native(device: torch.device) -> bool:
    """Whether quantize/dequantize run the C++ kernels: on CPU, where they are built, unless
    another backend is forced (``KERNELRL_BACKEND`` or ``backend.force``)."""
    forced = _backend._forced_now()[0]
    if device.type != "cpu" or forced in ("torch", "triton"):
        return False
    if forced == "native":
        _backend.native_module()          # raises saying why it cannot run
        return True
    try:
        _backend.native_module()
        return hasattr(_native(), "quantize")
    except (_backend.BackendError, ImportError):
        return False


def nf4_quantize(weight: torch.Tensor, *, blocksize: int = 64,
                 double_quant: bool = True) -> NF4Weight:
    """Quantize ``weight`` (float32, float16 or bfloat16, any shape) to NF4 as bitsandbytes
    does: blocks of ``blocksize`` (32 to 4096) over the row-major flattened weight, each
    scaled by its absmax, rounded to the nearest NF4 code; with ``double_quant`` (the
    default) the absmax are quantized to 8 bits in blocks of 256.

    On CPU the native C++ kernels do it (reading 16-bit weights directly, so no float32
    copy of the weight is made); elsewhere a torch path that works a few million elements
    at a time. Both give the same bytes."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"nf4_quantize: weight must be a tensor, got {type(weight).__name__}")
    if weight.dtype not in DTYPES:
        raise ValueError(f"nf4_quantize: weight must be float32, float16 or bfloat16, got "
                         f"{_backend.dtype_name(weight.dtype)}")
    if weight.numel() == 0:
        raise ValueError(f"nf4_quantize: weight is empty (shape {tuple(weight.shape)})")
    check_blocksize(blocksize)
    w = weight.detach()
    native = _use_native(w.device)
    if native:
        data, absmax = _native().quantize(w.contiguous(), blocksize)
    else:
        data, absmax = quantize_reference(w, blocksize)
    if not double_quant:
        return NF4Weight(data, absmax, w.shape, w.dtype, blocksize)
    codes, nested, offset = (_native().double_quantize if native else double_quantize)(absmax)
    return NF4Weight(data, codes, w.shape, w.dtype, blocksize, nested,
                     dynamic_map().to(w.device), offset)


def nf4_dequantize(qweight: NF4Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Ŵ, the weight ``qweight`` stands for, in ``dtype`` (default: the dtype it was
    quantized from): each element NF4[code] · absmax computed in float32, then rounded."""
    if not isinstance(qweight, NF4Weight):
        raise TypeError(f"nf4_dequantize: qweight must be an NF4Weight, got "
                        f"{type(qweight).__name__}")
    dtype = qweight.dtype if dtype is None else dtype
    if dtype not in DTYPES:
        raise ValueError(f"nf4_dequantize: dtype must be float32, float16 or bfloat16, got "
                         f"{dtype}")
    if len(qweight.shape) == 2 and _use_native(qweight.device):
        return _native().dequantize_rows(qweight, 0, qweight.shape[0], dtype)
    return dequantize_reference(qweight, dtype)


# ---------------------------------------------------------------------------------------
# nf4_linear
# ---------------------------------------------------------------------------------------
def _base(backend: str, x2: torch.Tensor, qweight: NF4Weight, bias, left, right,
          scale: float) -> torch.Tensor:
    """x·Ŵᵀ + bias + scale·left·right, by the decode GEMV for a few rows, else the matmul."""
    kernels = _KERNELS[backend]
    if x2.shape[0] > GEMV_MAX_ROWS:
        return kernels.matmul(x2, qweight, transpose_w=True, bias=bias, lora_left=left,
                              lora_right=right, lora_scale=scale)
    y = kernels.gemv(x2, qweight)
    if bias is not None:
        y += bias
    if left is not None:
        y.addmm_(left, right, alpha=scale)
    return y


def _lora_input(x2: torch.Tensor, p: float):
    """dropout(x) for the LoRA branch, and the kept-mask (None without dropout)."""
    if p == 0.0:
        return x2, None
    keep = torch.empty_like(x2, dtype=torch.bool).bernoulli_(1.0 - p)
    return x2 * keep / (1.0 - p), keep


class _NF4Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, bias, lora_a, lora_b, qweight, scale, p, backend):
        has_lora = lora_a is not None
        xl, keep = _lora_input(x2, p) if has_lora else (None, None)
        t = xl @ lora_a.to(x2.dtype).t() if has_lora else None
        y = _base(backend, x2, qweight, bias, t, lora_b.to(x2.dtype).t() if has_lora else None,
                  scale)
        ctx.qweight, ctx.scale, ctx.p, ctx.has_bias = qweight, scale, p, bias is not None
        ctx.save_for_backward(x2 if has_lora else None, keep, t, lora_a, lora_b)
        return y

    @staticmethod
    def backward(ctx, g):
        x2, keep, t, lora_a, lora_b = ctx.saved_tensors
        qweight, s = ctx.qweight, ctx.scale
        g = g.contiguous()
        dx = dbias = da = db = None
        kernels = _KERNELS[_backend.select("nf4_matmul", g.device, g.dtype)]
        if lora_a is None:
            if ctx.needs_input_grad[0]:
                dx = kernels.matmul(g, qweight, transpose_w=False)
        else:
            a, b = lora_a.to(g.dtype), lora_b.to(g.dtype)
            u = g @ b                                               # [M, R]
            if ctx.needs_input_grad[0]:
                if keep is None:          # dx = g·Ŵ + s·u·A in one pass
                    dx = kernels.matmul(g, qweight, transpose_w=False, lora_left=u,
                                        lora_right=a, lora_scale=s)
                else:                     # the LoRA part goes back through the dropout mask
                    dx = kernels.matmul(g, qweight, transpose_w=False)
                    dx += (u @ a) * keep * (s / (1.0 - ctx.p))
            if ctx.needs_input_grad[2]:
                xl = x2 if keep is None else x2 * keep / (1.0 - ctx.p)
                da = (s * (u.t() @ xl)).to(lora_a.dtype)
            if ctx.needs_input_grad[3]:
                db = (s * (g.t() @ t)).to(lora_b.dtype)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            dbias = g.sum(0)
        return dx, dbias, da, db, None, None, None, None


def _check_linear(x, qweight, bias, lora_a, lora_b, lora_scale, lora_dropout) -> None:
    if not isinstance(qweight, NF4Weight):
        raise TypeError(f"nf4_linear: qweight must be an NF4Weight, got "
                        f"{type(qweight).__name__}")
    if len(qweight.shape) != 2:
        raise ValueError(f"nf4_linear: qweight must be a 2-D [out, in] weight, its shape is "
                         f"{tuple(qweight.shape)}")
    n_out, n_in = qweight.shape
    if not isinstance(x, torch.Tensor) or x.dtype not in DTYPES:
        raise ValueError(f"nf4_linear: x must be a float32, float16 or bfloat16 tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or x.shape[-1] != n_in:
        raise ValueError(f"nf4_linear: x must end in the weight's in_features {n_in}, got "
                         f"shape {tuple(x.shape)}")
    if x.device != qweight.device:
        raise ValueError(f"nf4_linear: x is on {x.device}, qweight on {qweight.device}")
    if bias is not None and (bias.shape != (n_out,) or bias.device != x.device):
        raise ValueError(f"nf4_linear: bias must be [{n_out}] on {x.device}, got "
                         f"{tuple(bias.shape)} on {bias.device}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("nf4_linear: give both lora_a and lora_b, or neither")
    if lora_a is not None:
        r = lora_a.shape[0] if lora_a.dim() == 2 else -1
        if lora_a.dim() != 2 or lora_a.shape[1] != n_in:
            raise ValueError(f"nf4_linear: lora_a must be [r, {n_in}], got "
                             f"{tuple(lora_a.shape)}")
        if lora_b.shape != (n_out, r):
            raise ValueError(f"nf4_linear: lora_b must be [{n_out}, {r}] (lora_a is "
                             f"{tuple(lora_a.shape)}), got {tuple(lora_b.shape)}")
        for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
            if t.device != x.device or not t.is_floating_point():
                raise ValueError(f"nf4_linear: {name} must be a float tensor on {x.device}, got "
                                 f"{t.dtype} on {t.device}")
    if not math.isfinite(lora_scale):
        raise ValueError(f"nf4_linear: lora_scale must be finite, got {lora_scale}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"nf4_linear: lora_dropout must be in [0, 1), got {lora_dropout}")


def nf4_linear(x: torch.Tensor, qweight: NF4Weight, *, bias: Optional[torch.Tensor] = None,
               lora_a: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None,
               lora_scale: float = 1.0, lora_dropout: float = 0.0) -> torch.Tensor:
    """y = x·Ŵᵀ + bias + lora_scale · dropout(x)·Aᵀ·Bᵀ, with Ŵ the NF4 weight [out, in]
    decoded on the fly (the weight is frozen: it gets no gradient).

    x: [..., in] in float32, float16 or bfloat16 (y has its dtype and [..., out]); bias:
    [out]; lora_a: [R, in]; lora_b: [out, R]; lora_dropout applies to the LoRA branch's
    input only (pass 0 in eval). Up to 16 rows of x run the decode GEMV, more the
    dequant-matmul; gradients flow to x, bias, lora_a and lora_b. Under autocast it runs in
    the autocast dtype, as ``F.linear`` does."""
    _check_linear(x, qweight, bias, lora_a, lora_b, lora_scale, lora_dropout)
    kind = x.device.type
    if torch.is_autocast_enabled(kind):      # as a linear layer under autocast: the autocast
        x = x.to(torch.get_autocast_dtype(kind))      # dtype in, that dtype out
        with torch.autocast(kind, enabled=False):
            return nf4_linear(x, qweight, bias=bias, lora_a=lora_a, lora_b=lora_b,
                              lora_scale=lora_scale, lora_dropout=lora_dropout)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    op = "nf4_gemv" if x2.shape[0] <= GEMV_MAX_ROWS else "nf4_matmul"
    backend = _backend.select(op, x.device, x.dtype)
    if x2.shape[0] == 0:
        y = x2.new_zeros(0, qweight.shape[0])
        return y.view(*lead, qweight.shape[0])
    y = _NF4Linear.apply(x2, bias, lora_a, lora_b, qweight, float(lora_scale),
                         float(lora_dropout) if lora_a is not None else 0.0, backend)
    return y.view(*lead, qweight.shape[0])


# ---------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------
def _examples(rows: int):
    def examples(device: torch.device, dtype: torch.dtype) -> list:
        """For ``kernelrl tune``: a 4096 x 4096 NF4 weight, with and without LoRA r=16."""
        gen = torch.Generator(device=device).manual_seed(0)
        H = 4096
        w = torch.randn(H, H, device=device, generator=gen).to(dtype) * 0.02
        qw = nf4_quantize(w)
        x = torch.randn(rows, H, device=device, generator=gen).to(dtype)
        a = (torch.randn(16, H, device=device, generator=gen) * 0.01).to(dtype)
        b = (torch.randn(H, 16, device=device, generator=gen) * 0.01).to(dtype)
        if rows <= GEMV_MAX_ROWS:
            return [(f"M={rows} {H}x{H}", (x, qw), {})]
        x.requires_grad_(True)
        a.requires_grad_(True)
        b.requires_grad_(True)
        return [(f"M={rows} {H}x{H} LoRA r=16", (x, qw),
                 dict(lora_a=a, lora_b=b, lora_scale=1.0))]
    return examples


_NATIVE_NO_CUDA_MATMUL = ("the native backend's dequant-matmul is the CPU path (chunked "
                          "dequantize + matmul); CUDA tensors run the triton dequant-GEMM")
_backend.register_op(
    "nf4_gemv",
    {"native": _backend.Implementation(DTYPES, _KERNELS["native"]),
     "triton": _backend.Implementation(DTYPES, _KERNELS["triton"]),
     "torch": _backend.Implementation(DTYPES, _KERNELS["torch"])},
    skip=_backend.not_yet_measured("cuda", "native", "triton"),
    examples=_examples(1), fn=nf4_linear)
_backend.register_op(
    "nf4_matmul",
    {"native": _backend.Implementation(DTYPES, _KERNELS["native"]),
     "triton": _backend.Implementation(DTYPES, _KERNELS["triton"]),
     "torch": _backend.Implementation(DTYPES, _KERNELS["torch"])},
    skip={("native", "cuda"): _NATIVE_NO_CUDA_MATMUL,
          **_backend.not_yet_measured("cuda", "triton")},
    examples=_examples(512), fn=nf4_linear)
