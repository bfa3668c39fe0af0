"""nf4 on kernelrl._native (csrc/nf4): the C++ quantizer and row dequantizer (CPU), and the
decode GEMV y = x·Ŵᵀ for up to 16 rows of x (C++ on CPU, CUDA on GPU). Format and kernel
paths: csrc/nf4/nf4.h.

- :func:`quantize` — packed codes and float32 absmax of a weight, bit for bit as
  :func:`kernelrl.ops.nf4.format.quantize_reference`.
- :func:`double_quantize` — the absmax's 8-bit codes, nested absmax and offset, bit for bit
  as :func:`kernelrl.ops.nf4.format.double_quantize`.
- :func:`dequantize_rows` — rows [row0, row1) of Ŵ in a dtype, computed in float32 and
  rounded once (any K, rows that start mid-byte or mid-block included).
- :func:`gemv` — y [M, N] = x [M, K]·Ŵᵀ, M ≤ 16, float32 accumulation, y in x's dtype. On a
  CPU with AVX-512 and K % blocksize == 0 it runs a tile kernel on a repacked copy of the
  codes and scales that :func:`prepare` builds once and keeps in ``qweight.cache`` (the same
  bytes as the packed weight, plus its scales again; built on the first eager call when
  absent). Otherwise, and on CUDA, the kernels read the standard layout.

Numerics of the CPU GEMV tile kernel: float32 and float16 x: the exact float32 code values,
summed over each block by float32 FMA and scaled by the block's s in float32 (no weight is
rounded). bfloat16 x on AVX512-BF16 CPUs: the 16 NF4 codes rounded to bfloat16 (relative
error < 2⁻⁹, the size of torch's own rounding of Ŵ to bfloat16), exact products summed in
float32 by vdpbf16ps, each block's sum scaled by s in float32: about 0.9x the error of eager
``F.linear(x, Ŵ.bfloat16())`` against float64. The general path and CUDA: w = code·s in
float32, float32 FMA.

:func:`gemv` and :func:`dequantize_rows` are also ``torch.library.custom_op``s (what
torch.compile traces); eagerly the same function is called directly.
"""

from __future__ import annotations

from typing import Optional

import torch

from kernelrl import backend as _backend
from kernelrl.ops import _native
from kernelrl.ops.nf4.format import NF4_CODE, NF4Weight, check_blocksize, dynamic_map

__all__ = ["quantize", "double_quantize", "dequantize_rows", "gemv", "prepare", "cpu_isa",
           "MAX_ROWS", "REPACK_KEY"]

#: Rows of x the GEMV takes (csrc/nf4/nf4.h kNf4MaxRows).
MAX_ROWS = 16
#: ``NF4Weight.cache`` key of the CPU GEMV's repacked layout.
REPACK_KEY = "native_cpu_tiles"
_TILE = 16
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CODE = torch.tensor(NF4_CODE, dtype=torch.float32)  # the quantizer's table


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _no_cuda(*args):
    raise _backend.BackendError("nf4: the native quantize / dequantize kernels are CPU-only; "
                                "CUDA tensors take the torch or triton path")


def cpu_isa() -> str:
    """The instruction set the nf4 CPU kernels use now: 'avx512', 'avx2' or 'generic'."""
    return _native.library().nf4_cpu_isa()


# ---------------------------------------------------------------------------------------
# argument checks (ValueError naming the argument, what was expected and what was given)
# ---------------------------------------------------------------------------------------
def _check_qweight(fn: str, qweight, *, two_d: bool = True) -> NF4Weight:
    if not isinstance(qweight, NF4Weight):
        raise ValueError(f"{fn}: qweight: expected an NF4Weight, got {type(qweight).__name__}")
    if two_d and len(qweight.shape) != 2:
        raise ValueError(f"{fn}: qweight: expected a 2-D [N, K] weight, got shape "
                         f"{tuple(qweight.shape)}")
    device = qweight.data.device
    parts = {"absmax": qweight.absmax, "code": qweight.code,
             "nested_absmax": qweight.nested_absmax, "nested_code": qweight.nested_code}
    for name, t in parts.items():
        if t is not None and t.device != device:
            raise ValueError(f"{fn}: qweight.{name}: expected it on {device} with qweight.data, "
                             f"got {t.device}")
    return qweight


def _operands(qweight: NF4Weight) -> list[Optional[torch.Tensor]]:
    """(data, absmax, nested_absmax, nested_code, code), contiguous, in the kernels' dtypes."""
    out = [qweight.data, qweight.absmax, qweight.nested_absmax, qweight.nested_code,
           qweight.code]
    return [None if t is None else t.contiguous() for t in out]


# ---------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------
def quantize(weight: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [ceil(n/2)], float32 absmax [ceil(n/blocksize)]) of ``weight`` (float32,
    float16 or bfloat16, any shape, on CPU), bit for bit as ``quantize_reference``."""
    fn = "nf4 quantize"
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{fn}: weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in _DTYPES:
        raise ValueError(f"{fn}: weight: expected dtype float32, float16 or bfloat16, got "
                         f"{_dt(weight.dtype)}")
    if weight.device.type != "cpu":
        raise ValueError(f"{fn}: weight: expected a CPU tensor (the native quantizer is "
                         f"CPU-only), got {weight.device}")
    if weight.numel() == 0:
        raise ValueError(f"{fn}: weight: expected at least one element, got shape "
                         f"{tuple(weight.shape)}")
    check_blocksize(blocksize)
    w = weight.detach().contiguous()
    n = w.numel()
    data = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    code = _CODE
    lib = _native.library()
    _native.launch(w.device, lib.nf4_quantize_cpu, _no_cuda, w.data_ptr(), data.data_ptr(),
                   absmax.data_ptr(), code.data_ptr(), n, blocksize, _native.dtype_code(w.dtype))
    return data, absmax


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(uint8 codes [nblocks], float32 nested absmax [ceil(nblocks/256)], offset) of float32
    block absmax on CPU: bitsandbytes' double quantization, bit for bit as
    ``format.double_quantize`` (offset = torch's float32 mean of absmax; the rest in C++)."""
    fn = "nf4 double_quantize"
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32:
        raise ValueError(f"{fn}: absmax: expected a float32 tensor, got "
                         f"{getattr(absmax, 'dtype', type(absmax).__name__)}")
    if absmax.device.type != "cpu":
        raise ValueError(f"{fn}: absmax: expected a CPU tensor, got {absmax.device}")
    if absmax.numel() == 0:
        raise ValueError(f"{fn}: absmax: expected at least one value, got none")
    a = absmax.detach().reshape(-1).contiguous()
    offset = float(a.mean())
    codes = torch.empty(a.numel(), dtype=torch.uint8)
    nested = torch.empty(-(-a.numel() // 256), dtype=torch.float32)
    table = dynamic_map()
    lib = _native.library()
    _native.launch(a.device, lib.nf4_double_quantize_cpu, _no_cuda, a.data_ptr(),
                   codes.data_ptr(), nested.data_ptr(), table.data_ptr(), a.numel(), offset)
    return codes, nested, offset


# ---------------------------------------------------------------------------------------
# dequantize rows
# ---------------------------------------------------------------------------------------
def _dequant_eager(data: torch.Tensor, absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                   nested_code: Optional[torch.Tensor], code: torch.Tensor, offset: float,
                   n_rows: int, n_cols: int, blocksize: int, row0: int, row1: int,
                   dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty((row1 - row0, n_cols), dtype=dtype, device=data.device)
    lib = _native.library()
    _native.launch(data.device, lib.nf4_dequantize_rows_cpu, _no_cuda, data.data_ptr(),
                   absmax.data_ptr(), _ptr(nested_absmax), _ptr(nested_code), offset,
                   code.data_ptr(), out.data_ptr(), n_rows, n_cols, blocksize, row0, row1,
                   _native.dtype_code(dtype))
    return out


_dequant_op = torch.library.custom_op("kernelrl::nf4_dequantize_rows",
                                      mutates_args=())(_dequant_eager)


@_dequant_op.register_fake
def _(data, absmax, nested_absmax, nested_code, code, offset, n_rows, n_cols, blocksize, row0,
      row1, dtype):
    return data.new_empty((row1 - row0, n_cols), dtype=dtype)


def dequantize_rows(qweight: NF4Weight, row0: int, row1: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Rows [row0, row1) of Ŵ [N, K] as a [row1 − row0, K] tensor in ``dtype``: each element
    NF4[code]·s in float32, rounded once. CPU only; reads only those rows' bytes."""
    fn = "nf4 dequantize_rows"
    _check_qweight(fn, qweight)
    n_rows, n_cols = qweight.shape
    if dtype not in _DTYPES:
        raise ValueError(f"{fn}: dtype: expected float32, float16 or bfloat16, got {dtype}")
    for name, v in (("row0", row0), ("row1", row1)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{fn}: {name}: expected an int, got {type(v).__name__}")
    if not 0 <= row0 <= n_rows:
        raise ValueError(f"{fn}: row0: expected 0 <= row0 <= {n_rows}, got {row0}")
    if not row0 <= row1 <= n_rows:
        raise ValueError(f"{fn}: row1: expected {row0} <= row1 <= {n_rows}, got {row1}")
    if qweight.device.type != "cpu":
        _no_cuda()
    ops = _operands(qweight)
    f = _dequant_op if torch.compiler.is_compiling() else _dequant_eager
    return f(*ops, qweight.offset, n_rows, n_cols, qweight.blocksize, row0, row1, dtype)


# ---------------------------------------------------------------------------------------
# the CPU repack
# ---------------------------------------------------------------------------------------
def _repack(qweight: NF4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = qweight.shape
    tiles = -(-n_rows // _TILE)
    scale_dtype = torch.uint8 if qweight.double_quant else torch.float32
    rdata = torch.empty(tiles * 8 * n_cols, dtype=torch.uint8)
    rscales = torch.empty(tiles * _TILE * (n_cols // qweight.blocksize), dtype=scale_dtype)
    data, absmax = qweight.data.contiguous(), qweight.absmax.contiguous()
    lib = _native.library()
    _native.launch(data.device, lib.nf4_repack_cpu, _no_cuda, data.data_ptr(), absmax.data_ptr(),
                   rdata.data_ptr(), rscales.data_ptr(), n_rows, n_cols, qweight.blocksize,
                   qweight.double_quant)
    return rdata, rscales


def _fast_path_applies(qweight: NF4Weight) -> bool:
    return (qweight.device.type == "cpu" and len(qweight.shape) == 2 and qweight.shape[0] > 0
            and qweight.shape[1] % qweight.blocksize == 0 and cpu_isa() == "avx512")


def prepare(qweight: NF4Weight) -> bool:
    """Builds the CPU GEMV's repacked layout into ``qweight.cache`` (once; call it before
    torch.compile traces the GEMV, which cannot build it). Returns whether the fast path
    applies (CPU, AVX-512, K % blocksize == 0)."""
    _check_qweight("nf4 prepare", qweight)
    if not _fast_path_applies(qweight):
        return False
    if REPACK_KEY not in qweight.cache:
        qweight.cache[REPACK_KEY] = _repack(qweight)
    return True


# ---------------------------------------------------------------------------------------
# GEMV
# ---------------------------------------------------------------------------------------
def _gemv_eager(x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor,
                nested_absmax: Optional[torch.Tensor], nested_code: Optional[torch.Tensor],
                code: torch.Tensor, repacked_data: Optional[torch.Tensor],
                repacked_scales: Optional[torch.Tensor], offset: float, n_rows: int,
                n_cols: int, blocksize: int) -> torch.Tensor:
    m = x.shape[0]
    y = torch.empty((m, n_rows), dtype=x.dtype, device=x.device)
    lib = _native.library()
    _native.launch(x.device, lib.nf4_gemv_cpu, lib.nf4_gemv_cuda, x.data_ptr(), y.data_ptr(),
                   data.data_ptr(), absmax.data_ptr(), _ptr(nested_absmax), _ptr(nested_code),
                   offset, code.data_ptr(), _ptr(repacked_data), _ptr(repacked_scales), m, n_rows,
                   n_cols, blocksize, _native.dtype_code(x.dtype))
    return y


_gemv_op = torch.library.custom_op("kernelrl::nf4_gemv", mutates_args=())(_gemv_eager)


@_gemv_op.register_fake
def _(x, data, absmax, nested_absmax, nested_code, code, repacked_data, repacked_scales, offset,
      n_rows, n_cols, blocksize):
    return x.new_empty((x.shape[0], n_rows))


def gemv(x2d: torch.Tensor, qweight: NF4Weight) -> torch.Tensor:
    """y [M, N] = x2d [M, K]·Ŵᵀ for M ≤ 16 (float32, float16 or bfloat16 x; y in x's dtype),
    on CPU or CUDA (x and qweight on the same device)."""
    fn = "nf4 gemv"
    _check_qweight(fn, qweight)
    n_rows, n_cols = qweight.shape
    if not isinstance(x2d, torch.Tensor):
        raise ValueError(f"{fn}: x: expected a torch.Tensor, got {type(x2d).__name__}")
    if x2d.dtype not in _DTYPES:
        raise ValueError(f"{fn}: x: expected dtype float32, float16 or bfloat16, got "
                         f"{_dt(x2d.dtype)}")
    if x2d.dim() != 2 or x2d.shape[1] != n_cols:
        raise ValueError(f"{fn}: x: expected shape [M, {n_cols}] (K of the weight), got "
                         f"{tuple(x2d.shape)}")
    if x2d.shape[0] > MAX_ROWS:
        raise ValueError(f"{fn}: x: expected at most {MAX_ROWS} rows, got {x2d.shape[0]}")
    if x2d.device != qweight.device:
        raise ValueError(f"{fn}: x: expected it on qweight's device {qweight.device}, got "
                         f"{x2d.device}")
    if x2d.shape[0] == 0 or n_rows == 0:
        return x2d.new_zeros((x2d.shape[0], n_rows))
    x = x2d.contiguous()
    repacked = qweight.cache.get(REPACK_KEY)
    compiling = torch.compiler.is_compiling()
    if repacked is None and not compiling and prepare(qweight):
        repacked = qweight.cache[REPACK_KEY]
    rdata, rscales = repacked if repacked is not None and x.device.type == "cpu" else (None, None)
    f = _gemv_op if compiling else _gemv_eager
    return f(x, *_operands(qweight), rdata, rscales, qweight.offset, n_rows, n_cols,
             qweight.blocksize)
