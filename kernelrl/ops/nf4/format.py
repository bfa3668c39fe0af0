"""The NF4 storage format, bit-compatible with bitsandbytes: code tables, :class:`NF4Weight`,
its bitsandbytes-named state dict, and the torch reference quantizer and dequantizer.

A weight of any shape is flattened row-major to n elements and cut into blocks of
``blocksize`` consecutive elements (32 to 4096, a power of two; the last block may be
partial). For block b with absmax a_b = max |w| over the block:

    c_i  = the NF4 code nearest to w_i / a_b                      (4 bits)
    ŵ_i  = NF4[c_i] · a_b                                          (float32, then the dtype)

Rounding: w_i / a_b is computed as ``clamp(w_i · (1 / max(a_b, 1e-38)), −1, 1)`` in
float32, and the index is the number of code midpoints (NF4[j] + NF4[j+1]) / 2 strictly
below it, so a value exactly on a midpoint goes to the lower code. A block of zeros has
a_b = 0 and every code 7 (the exact zero). Packing: two codes per byte, element 2j in the
high nibble of byte j, element 2j + 1 in the low nibble (when n is odd, the last low
nibble holds code 7).

Double quantization (QLoRA, Dettmers et al. 2023, §3) stores the absmax themselves in 8
bits: with offset o = mean(a), the values a_b − o are cut into blocks of 256, each scaled by
its own float32 absmax m_g and rounded to the nearest of the 256 values of bitsandbytes'
signed dynamic map D (ties to the lower one). Decoding, in float32:

    a_b = D[q_b] · m_{b // 256} + o

The NF4 table is the one bitsandbytes hard-codes (quantiles of N(0, 1) with an exact 0,
QLoRA §3); D is rebuilt by :func:`dynamic_map` from its definition. Bytes moved by a
dequantize: n/2 packed bytes + n/blocksize scale bytes in, n elements out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping, Optional

import torch

__all__ = ["NF4_CODE", "ZERO_CODE", "BLOCKSIZES", "NESTED_BLOCKSIZE", "NF4Weight", "dynamic_map",
           "check_blocksize", "quantize_reference", "dequantize_reference", "block_scales"]

#: The 16 NF4 values, ascending (bitsandbytes' table; index 7 is the exact zero).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
#: The code of 0.0.
ZERO_CODE = 7
#: Block sizes the format allows (bitsandbytes accepts the same set).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Block size of the double quantization of the absmax.
NESTED_BLOCKSIZE = 256
_QUANT_TYPE = "nf4"
_STATE_KEY = "quant_state.bitsandbytes__nf4"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CHUNK = 1 << 22      # elements per step of the torch quantizer: bounds its temporaries


def check_blocksize(blocksize) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"NF4 blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, "
                         f"got {blocksize!r}")
    return blocksize


@lru_cache(maxsize=None)
def _code_cpu() -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32)


@lru_cache(maxsize=None)
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers 2016): float32[256], ascending.

    For each exponent e = 0..6 it holds ±10^(e−6) times the midpoints of 2^e + 1 points
    spaced evenly on [0.1, 1], then 0 and 1: 2·127 + 2 = 256 values. Computed in float32 as
    the definition does, so that the values match bitsandbytes' table bit for bit."""
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (e - 6)
        # host lists: built once (lru_cache) from CPU tensors, never on a step
        values += (scale * mids).tolist() + (-scale * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


@lru_cache(maxsize=None)
def _midpoints(table: str) -> torch.Tensor:
    code = _code_cpu() if table == "nf4" else dynamic_map()
    return (code[:-1] + code[1:]) / 2


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device)


@dataclass(eq=False)
class NF4Weight:
    """A weight in NF4, as bitsandbytes stores it.

    Attributes:
        data: uint8 [ceil(n/2)], the packed codes of the row-major flattened weight.
        absmax: the block scales: float32 [nblocks], or uint8 [nblocks] (codes into
            ``nested_code``) when double-quantized.
        nested_absmax: float32 [ceil(nblocks/256)] (double quantization) or None.
        nested_code: float32 [256], the dynamic map (double quantization) or None.
        offset: the mean subtracted from the absmax before double quantization (0.0 without).
        code: float32 [16], the NF4 table.
        shape: the original shape; dtype: the original dtype; blocksize: elements per block.
        cache: derived layouts kernels build once (never serialized).
    """

    data: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: Optional[torch.Tensor] = None
    nested_code: Optional[torch.Tensor] = None
    offset: float = 0.0
    code: torch.Tensor = field(default_factory=lambda: _code_cpu().clone())
    cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        check_blocksize(self.blocksize)
        n = self.shape.numel()
        nblocks = -(-n // self.blocksize)
        if self.data.dtype != torch.uint8 or self.data.numel() != (n + 1) // 2:
            raise ValueError(f"NF4Weight: data must be uint8 with {(n + 1) // 2} bytes for shape "
                             f"{tuple(self.shape)}, got {self.data.dtype} with "
                             f"{self.data.numel()}")
        self.data = self.data.reshape(-1)
        want = torch.uint8 if self.nested_absmax is not None else torch.float32
        if self.absmax.dtype != want or self.absmax.numel() != nblocks:
            raise ValueError(f"NF4Weight: absmax must be {want} with {nblocks} values, got "
                             f"{self.absmax.dtype} with {self.absmax.numel()}")
        self.absmax = self.absmax.reshape(-1)
        if self.nested_absmax is not None:
            ngroups = -(-nblocks // NESTED_BLOCKSIZE)
            if self.nested_code is None or self.nested_code.numel() != 256:
                raise ValueError("NF4Weight: a double-quantized weight needs nested_code, "
                                 "float32 [256]")
            if self.nested_absmax.numel() != ngroups:
                raise ValueError(f"NF4Weight: nested_absmax must have {ngroups} values, got "
                                 f"{self.nested_absmax.numel()}")
            self.nested_absmax = self.nested_absmax.reshape(-1).float()
            self.nested_code = self.nested_code.reshape(-1).float()
        if self.code.numel() != 16:
            raise ValueError(f"NF4Weight: code must have 16 values, got {self.code.numel()}")
        self.code = self.code.reshape(-1).float()
        self.offset = float(self.offset)
        if self.dtype not in _DTYPES.values():
            raise ValueError(f"NF4Weight: dtype must be float32, float16 or bfloat16, got "
                             f"{self.dtype}")

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes of the stored format (codes, scales, nested state)."""
        parts = [self.data, self.absmax, self.code, self.nested_absmax, self.nested_code]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def to(self, device) -> "NF4Weight":
        """This weight on ``device`` (self where it is there already; the cache is not moved)."""
        device = torch.device(device)
        if self.data.device == device:
            return self
        move = (lambda t: None if t is None else t.to(device))
        return NF4Weight(move(self.data), move(self.absmax), self.shape, self.dtype,
                         self.blocksize, move(self.nested_absmax), move(self.nested_code),
                         self.offset, move(self.code))

    # ------------------------------------------------------------------ serialization
    def to_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes' ``Linear4bit`` saves, under its key names: ``prefix``
        (the packed bytes, [ceil(n/2), 1]), ``.absmax``, ``.quant_map`` and, when
        double-quantized, ``.nested_absmax`` and ``.nested_quant_map``; the scalars go as JSON
        bytes under ``.quant_state.bitsandbytes__nf4``. Safe to write with safetensors."""
        meta = {"quant_type": _QUANT_TYPE, "blocksize": self.blocksize,
                "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}
        out = {prefix: self.data.reshape(-1, 1), f"{prefix}.absmax": self.absmax,
               f"{prefix}.quant_map": self.code.clone()}
        if self.double_quant:
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = self.nested_code.clone()
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                        nested_offset=self.offset)
        out[f"{prefix}.{_STATE_KEY}"] = torch.tensor(list(json.dumps(meta).encode()),
                                                     dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor],
                        prefix: str = "weight") -> "NF4Weight":
        """Reads the keys :meth:`to_state_dict` writes, whether kernelrl or bitsandbytes
        wrote them. Other keys of ``state_dict`` (not ``prefix`` or ``prefix.*``) are ignored;
        a missing or unknown ``prefix.*`` key raises ValueError naming it."""
        known = {"absmax", "quant_map", "nested_absmax", "nested_quant_map", _STATE_KEY}
        mine = {k[len(prefix) + 1:]: v for k, v in state_dict.items()
                if k.startswith(prefix + ".")}
        for key in mine:
            if key not in known:
                hint = (" (only NF4 is supported, not FP4)" if key.startswith("quant_state.")
                        else "")
                raise ValueError(f"NF4 state dict: unknown key '{prefix}.{key}'{hint}")
        for key in (None, "absmax", "quant_map", _STATE_KEY):
            if (prefix if key is None else key) not in (state_dict if key is None else mine):
                name = prefix if key is None else f"{prefix}.{key}"
                raise ValueError(f"NF4 state dict: missing key {name!r}")
        try:
            # host read: loading a checkpoint, once per layer, never on a step
            meta = json.loads(bytes(mine[_STATE_KEY].cpu().to(torch.uint8).tolist()).decode())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"NF4 state dict: {prefix}.{_STATE_KEY} is not JSON: {e}") from None
        for name in ("quant_type", "blocksize", "dtype", "shape"):
            if name not in meta:
                raise ValueError(f"NF4 state dict: {prefix}.{_STATE_KEY} lacks {name!r}")
        if meta["quant_type"] != _QUANT_TYPE:
            raise ValueError(f"NF4 state dict: quant_type must be 'nf4', got "
                             f"{meta['quant_type']!r}")
        if meta["dtype"] not in _DTYPES:
            raise ValueError(f"NF4 state dict: dtype must be one of {', '.join(_DTYPES)}, got "
                             f"{meta['dtype']!r}")
        nested = "nested_absmax" in mine
        if nested != ("nested_quant_map" in mine):
            missing = "nested_quant_map" if nested else "nested_absmax"
            raise ValueError(f"NF4 state dict: missing key '{prefix}.{missing}'")
        if nested and meta.get("nested_blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE:
            raise ValueError(f"NF4 state dict: nested_blocksize must be {NESTED_BLOCKSIZE}, got "
                             f"{meta['nested_blocksize']!r}")
        return cls(state_dict[prefix].reshape(-1), mine["absmax"], torch.Size(meta["shape"]),
                   _DTYPES[meta["dtype"]], int(meta["blocksize"]),
                   mine.get("nested_absmax"), mine.get("nested_quant_map"),
                   float(meta.get("nested_offset", 0.0)) if nested else 0.0,
                   mine["quant_map"])


# ---------------------------------------------------------------------- the reference
def _bucket(scaled: torch.Tensor, table: str) -> torch.Tensor:
    """Index of the nearest code, ties to the lower one (NaN: the last index)."""
    return torch.bucketize(scaled, _on(_midpoints(table), scaled.device), out_int32=True)


def _blockwise(flat: torch.Tensor, blocksize: int, table: str):
    """Codes (int32 [n]) and float32 absmax [ceil(n / blocksize)] of a float32 vector."""
    n = flat.numel()
    nblocks = -(-n // blocksize)
    padded = flat if n == nblocks * blocksize else torch.nn.functional.pad(
        flat, (0, nblocks * blocksize - n))
    blocks = padded.view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1)
    return _bucket(scaled, table).view(-1)[:n], absmax


def quantize_reference(weight: torch.Tensor, blocksize: int = 64):
    """NF4 codes of ``weight`` in plain torch: (packed uint8 [ceil(n/2)], float32 absmax
    [nblocks]). Works a chunk of blocks at a time, so that its float32 temporaries stay
    small next to the weight."""
    flat = weight.reshape(-1)
    n = flat.numel()
    data = torch.empty((n + 1) // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=weight.device)
    step = max(_CHUNK // blocksize, 1) * blocksize       # even, a whole number of blocks
    for start in range(0, n, step):
        stop = min(start + step, n)
        codes, amax = _blockwise(flat[start:stop].float(), blocksize, "nf4")
        absmax[start // blocksize:start // blocksize + amax.numel()] = amax
        codes = codes.to(torch.uint8)
        if codes.numel() % 2:     # the pad nibble is the code of 0.0, as bitsandbytes writes
            codes = torch.cat([codes, codes.new_full((1,), ZERO_CODE)])
        data[start // 2:start // 2 + codes.numel() // 2] = (codes[0::2] << 4) | codes[1::2]
    return data, absmax


def double_quantize(absmax: torch.Tensor):
    """(uint8 codes [nblocks], float32 nested absmax [ceil(nblocks/256)], offset) of the
    block absmax, bitsandbytes' double quantization with round-to-nearest."""
    offset = absmax.mean()
    codes, nested = _blockwise(absmax - offset, NESTED_BLOCKSIZE, "dynamic")
    return codes.to(torch.uint8), nested, float(offset)


def block_scales(qweight: NF4Weight) -> torch.Tensor:
    """The float32 absmax of every block [nblocks], decoding the double quantization."""
    if not qweight.double_quant:
        return qweight.absmax
    dev = qweight.absmax.device
    n = qweight.nblocks
    groups = -(-n // NESTED_BLOCKSIZE)
    vals = _on(qweight.nested_code, dev)[qweight.absmax.long()]
    vals = torch.nn.functional.pad(vals, (0, groups * NESTED_BLOCKSIZE - n))
    vals = (vals.view(groups, NESTED_BLOCKSIZE) * _on(qweight.nested_absmax, dev).unsqueeze(1))
    return vals.view(-1)[:n] + torch.tensor(qweight.offset, dtype=torch.float32, device=dev)


def unpack_codes(data: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The 4-bit codes of flattened elements [start, stop) as int64."""
    if stop <= start:
        return torch.empty(0, dtype=torch.long, device=data.device)
    lo, hi = start // 2, (stop + 1) // 2
    b = data[lo:hi].long()
    codes = torch.stack([b >> 4, b & 15], dim=1).view(-1)
    return codes[start - 2 * lo:stop - 2 * lo]


def dequantize_reference(qweight: NF4Weight, dtype: Optional[torch.dtype] = None, *,
                         rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Ŵ in ``dtype`` (default: the original dtype), computed in float32 and rounded once.
    With ``rows=(r0, r1)`` only those rows of a 2-D weight ([r1 − r0, K])."""
    dtype = qweight.dtype if dtype is None else dtype
    shape = qweight.shape
    start, stop = 0, qweight.numel
    if rows is not None:
        if len(shape) != 2:
            raise ValueError(f"dequantize rows: the weight must be 2-D, it is {tuple(shape)}")
        r0, r1 = rows
        start, stop = r0 * shape[1], r1 * shape[1]
        shape = torch.Size((r1 - r0, shape[1]))
    codes = unpack_codes(qweight.data, start, stop)
    scales = block_scales(qweight)
    idx = torch.arange(start, stop, device=codes.device) // qweight.blocksize
    w = _on(qweight.code, codes.device)[codes] * scales[idx]
    return w.to(dtype).view(shape)
