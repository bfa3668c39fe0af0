"""The nf4 family of kernelrl._native: NF4 quantize, dequantize rows, decode GEMV.

Checks, mostly with the raw entry points (pointers as ints, outputs poisoned first):
- quantize: bit for bit against kernelrl.ops.nf4.format.quantize_reference (the torch
  bucketize rule) for every dtype and block size, odd sizes, partial trailing blocks, all-zero
  blocks, exact midpoint ties (to the lower code), NaN / inf / -0 / subnormals / huge values;
  against bitsandbytes' quantize_4bit on full blocks;
- dequantize rows: bit for bit against the format's float32 rule for any K (rows starting
  mid-byte and mid-block), any row range, both scale modes, every output dtype;
- GEMV: against float64 (x · Ŵᵀ with Ŵ decoded by a float32 implementation of the format
  written here), M = 1..16, odd shapes, both scale modes, every dtype, with and without the
  repacked layout (the AVX-512 tile kernel, and its gather fallback for wide rows), every
  CPU ISA level, extreme values, NaN propagation, poisoned outputs and guard elements, thread
  count independence; the CUDA kernels against the same reference where a GPU is present;
- argument errors (ValueError naming the argument) and the ISA levels; nf4.cu compiles with
  nvcc for sm_90 without register spills.

Error rule of the GEMV (relative ‖y − ref‖ / ‖ref‖ over non-NaN entries, NaN positions
equal): below 1e-5 (float32 x), 2e-3 (float16), 1e-2 (bfloat16), and at most twice the error
of eager torch F.linear(x, Ŵ in x's dtype) plus a quarter ulp of the dtype.

Shape legend: N rows of W (outputs), K columns (inputs), M rows of x, B block size.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from numerics import rel_err_matching_nan as rel_err

from kernelrl.ops.nf4.format import (NF4_CODE, NF4Weight, dequantize_reference, double_quantize,
                                     dynamic_map, quantize_reference)

native = pytest.importorskip(
    "kernelrl._native", reason="kernelrl._native is not built (pip install -e . builds it)"
)
from kernelrl.ops.nf4 import native_impl  # noqa: E402  (needs the native module)

ROOT = Path(__file__).resolve().parents[2]
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
POISON = 7777.0
POISON_BYTE = 0xA5
CODE = torch.tensor(NF4_CODE, dtype=torch.float32)
MIDS = (CODE[:-1] + CODE[1:]) / 2
ISAS = ("generic", "avx2", "avx512")
MAX_ERR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
GUARD = 8  # extra output elements after the result, which must stay POISON


@pytest.fixture(params=ISAS)
def nf4_isa(request, monkeypatch):
    """Runs a test at each CPU ISA level the nf4 kernels have (skipping those this CPU lacks)."""
    monkeypatch.setenv("KERNELRL_CPU_ISA", request.param)
    if native.nf4_cpu_isa() != request.param:
        pytest.skip(f"this CPU has no {request.param} level")
    return request.param


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- raw calls ---------------------------------------------------------------------------------


def raw_quantize(w: torch.Tensor, blocksize: int):
    w = w.contiguous()
    n = w.numel()
    data = torch.full(((n + 1) // 2,), POISON_BYTE, dtype=torch.uint8)
    absmax = torch.full((-(-n // blocksize),), POISON)
    native.nf4_quantize_cpu(w.data_ptr(), data.data_ptr(), absmax.data_ptr(), CODE.data_ptr(), n,
                            blocksize, DTYPES[w.dtype])
    return data, absmax


def scale_args(qw: NF4Weight):
    if qw.double_quant:
        return qw.absmax.data_ptr(), qw.nested_absmax.data_ptr(), qw.nested_code.data_ptr()
    return qw.absmax.data_ptr(), 0, 0


def raw_repack(qw: NF4Weight):
    n_rows, n_cols = qw.shape
    tiles = -(-n_rows // 16)
    rdata = torch.full((tiles * 8 * n_cols,), POISON_BYTE, dtype=torch.uint8)
    rscales = torch.zeros(tiles * 16 * (n_cols // qw.blocksize),
                          dtype=torch.uint8 if qw.double_quant else torch.float32)
    native.nf4_repack_cpu(qw.data.data_ptr(), qw.absmax.data_ptr(), rdata.data_ptr(),
                          rscales.data_ptr(), n_rows, n_cols, qw.blocksize, qw.double_quant)
    return rdata, rscales


def raw_gemv(x: torch.Tensor, qw: NF4Weight, repack: bool) -> torch.Tensor:
    """y [M, N] in x's dtype; the output buffer is poisoned, with GUARD poisoned elements after
    it that must survive."""
    m = x.shape[0]
    n_rows, n_cols = qw.shape
    buf = torch.full((m * n_rows + GUARD,), POISON, dtype=x.dtype)
    absmax, nested, nested_code = scale_args(qw)
    rdata, rscales = raw_repack(qw) if repack else (None, None)
    native.nf4_gemv_cpu(x.data_ptr(), buf.data_ptr(), qw.data.data_ptr(), absmax, nested,
                        nested_code, qw.offset, qw.code.data_ptr(),
                        0 if rdata is None else rdata.data_ptr(),
                        0 if rscales is None else rscales.data_ptr(), m, n_rows, n_cols,
                        qw.blocksize, DTYPES[x.dtype])
    assert torch.all(buf[m * n_rows:] == POISON), "wrote past y"
    y = buf[:m * n_rows].view(m, n_rows)
    assert not torch.any(y == POISON), "left elements of y unwritten"
    return y


def raw_dequantize(qw: NF4Weight, row0: int, row1: int, dtype: torch.dtype) -> torch.Tensor:
    n_rows, n_cols = qw.shape
    buf = torch.full(((row1 - row0) * n_cols + GUARD,), POISON, dtype=dtype)
    absmax, nested, nested_code = scale_args(qw)
    native.nf4_dequantize_rows_cpu(qw.data.data_ptr(), absmax, nested, nested_code, qw.offset,
                                   qw.code.data_ptr(), buf.data_ptr(), n_rows, n_cols,
                                   qw.blocksize, row0, row1, DTYPES[dtype])
    assert torch.all(buf[(row1 - row0) * n_cols:] == POISON), "wrote past out"
    return buf[:(row1 - row0) * n_cols].view(row1 - row0, n_cols)


# ---- references --------------------------------------------------------------------------------


def make_qweight(n_rows: int, n_cols: int, blocksize: int, double_quant: bool,
                 dtype=torch.bfloat16, seed: int = 0, scale: float = 0.05,
                 weight: torch.Tensor | None = None) -> NF4Weight:
    w = torch.randn(n_rows, n_cols, generator=gen(seed)) * scale if weight is None else weight
    data, absmax = quantize_reference(w, blocksize)
    if not double_quant:
        return NF4Weight(data, absmax, (n_rows, n_cols), dtype, blocksize)
    codes, nested, offset = double_quantize(absmax)
    return NF4Weight(data, codes, (n_rows, n_cols), dtype, blocksize, nested, dynamic_map(),
                     offset)


def ref_scales(qw: NF4Weight) -> torch.Tensor:
    """The block scales by the format's float32 rule: nested_code[q] * nested_absmax[b / 256]
    rounded, then + offset."""
    if not qw.double_quant:
        return qw.absmax
    b = torch.arange(qw.nblocks)
    prod = qw.nested_code[qw.absmax.long()] * qw.nested_absmax[b // 256]
    return prod + torch.tensor(qw.offset, dtype=torch.float32)


def ref_weight(qw: NF4Weight) -> torch.Tensor:
    """Ŵ in float32: code[c_i] * s_{i / B}, decoded from the packed bytes here."""
    n = qw.numel
    b = qw.data.long()
    codes = torch.stack([b >> 4, b & 15], dim=1).view(-1)[:n]
    w = qw.code[codes] * ref_scales(qw)[torch.arange(n) // qw.blocksize]
    return w.view(qw.shape)


def check_gemv(y: torch.Tensor, x: torch.Tensor, qw: NF4Weight, what: str):
    w32 = ref_weight(qw)
    ref = x.double() @ w32.double().t()
    err = rel_err(y, ref, what)
    eager = rel_err(F.linear(x, w32.to(x.dtype)), ref, "eager")
    bound = min(MAX_ERR[x.dtype], 2 * eager + 0.25 * torch.finfo(x.dtype).eps)
    assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g} (eager torch {eager:.3g})"
    return err


# ---- quantize ----------------------------------------------------------------------------------


def mixed_weight(n: int, seed: int) -> torch.Tensor:
    """Normal values with magnitudes spread over many octaves (block by block)."""
    g = gen(seed)
    w = torch.randn(n, generator=g)
    return w * torch.exp2(torch.randint(-20, 20, (n,), generator=g).float() / 4)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_quantize_bitwise(nf4_isa, dtype, blocksize):
    for n in (blocksize * 7, blocksize * 5 + 3, 1, 31, blocksize + 1):
        w = mixed_weight(n, seed=n + blocksize).to(dtype)
        data, absmax = raw_quantize(w, blocksize)
        ref_data, ref_absmax = quantize_reference(w, blocksize)
        assert torch.equal(data, ref_data), f"n={n}: codes differ"
        assert torch.equal(absmax, ref_absmax), f"n={n}: absmax differs"


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_quantize_special_values(nf4_isa, dtype):
    bs = 32
    info = torch.finfo(dtype)
    blocks = [
        torch.zeros(bs),                                                # all zero: absmax 0, code 7
        torch.full((bs,), -0.0),
        torch.cat([torch.tensor([float("nan")]), torch.randn(bs - 1)]),  # NaN: absmax NaN, all 15
        # inf: the finite values -> 7, inf -> 15
        torch.cat([torch.randn(bs - 2), torch.tensor([float("inf"), 3.0])]),
        torch.cat([torch.tensor([-float("inf")]), torch.randn(bs - 1)]),
        torch.full((bs,), info.max),                                     # the largest finite
        torch.cat([torch.tensor([info.max, -info.max]), torch.randn(bs - 2)]),
        torch.full((bs,), info.tiny) * torch.arange(bs),                 # smallest normals
        torch.rand(bs) * info.tiny * 0.5,                                # subnormals of the dtype
        torch.tensor([1e-40, -3e-42] * (bs // 2)),                       # float32 subnormals
        torch.linspace(-1, 1, bs),
    ]
    w = torch.cat(blocks + [torch.tensor([0.0, 2.0, -1.0])]).to(dtype)   # + a partial block
    data, absmax = raw_quantize(w, bs)
    ref_data, ref_absmax = quantize_reference(w, bs)
    assert torch.equal(data, ref_data)
    assert torch.equal(absmax.isnan(), ref_absmax.isnan())
    ok = ~ref_absmax.isnan()
    assert torch.equal(absmax[ok], ref_absmax[ok])
    assert absmax[0] == 0 and torch.all(data[:bs // 2] == 0x77)
    assert absmax[2].isnan() and torch.all(data[bs:bs + bs // 2] == 0xFF)


def test_quantize_midpoint_ties(nf4_isa):
    """Values exactly on a midpoint (absmax 1, so scaled == value) go to the lower code; the
    next float above goes to the upper one; the trailing odd element packs with code 7."""
    mids = MIDS.clone()
    above = torch.nextafter(mids, torch.full_like(mids, 2.0))
    block = torch.cat([torch.tensor([1.0]), mids, above, torch.tensor([-1.0])])  # 32 values
    assert block.numel() == 32
    w = torch.cat([block, block[:5]])  # 37 elements: a partial block and an odd tail
    data, absmax = raw_quantize(w, 32)
    assert torch.equal(data, quantize_reference(w, 32)[0])
    codes = torch.stack([data.long() >> 4, data.long() & 15], 1).view(-1)
    j = torch.arange(15)
    assert torch.equal(codes[1:16], j), "a midpoint must go to the lower code"
    assert torch.equal(codes[16:31], j + 1)
    assert codes[0] == 15 and codes[31] == 0 and codes[-1] == 7


def test_quantize_matches_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    for bs in (64, 128, 4096):
        w = mixed_weight(bs * 40, seed=bs)
        packed, state = bnbf.quantize_4bit(w, blocksize=bs, quant_type="nf4",
                                           compress_statistics=False)
        data, absmax = raw_quantize(w, bs)
        assert torch.equal(data, packed.view(-1))
        assert torch.equal(absmax, state.absmax)


def test_quantize_wrapper_and_threads():
    w = mixed_weight(64 * 1000 + 17, seed=3).view(-1).to(torch.bfloat16)
    ref = quantize_reference(w, 64)
    before = native.get_num_threads()
    try:
        for threads in (1, 2):
            native.set_num_threads(threads)
            out = raw_quantize(w, 64)
            assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    finally:
        native.set_num_threads(before)
    data, absmax = native_impl.quantize(w.view(1000 * 64 + 17), 64)
    assert torch.equal(data, ref[0]) and torch.equal(absmax, ref[1])


def test_double_quantize_bitwise(nf4_isa):
    table = dynamic_map()
    mids = (table[:-1] + table[1:]) / 2
    cases = [torch.rand(n, generator=gen(n)) * 0.1 for n in (1, 255, 256, 257, 1000, 4096 + 7)]
    # values landing exactly on midpoints of the table (nested absmax 1: v = mid) and just above
    ties = torch.cat([torch.tensor([1.0, -1.0]), mids, torch.nextafter(mids, mids + 1)])
    cases.append(ties)                         # offset = mean, so v = ties - offset: generic
    spiky = torch.rand(600, generator=gen(1)) * 0.01
    spiky[[3, 300]] = torch.tensor([50.0, 0.0])
    cases += [spiky, torch.zeros(300), torch.full((300,), 0.25)]
    for absmax in cases:
        ref_codes, ref_nested, ref_offset = double_quantize(absmax)
        codes, nested, offset = native_impl.double_quantize(absmax)
        assert offset == ref_offset
        assert torch.equal(codes, ref_codes) and torch.equal(nested, ref_nested)
    # exact ties, with offset 0: the raw entry point
    one = torch.tensor([1.0])  # each group's nested absmax is 1: scaled == v
    v = torch.cat([one, mids, one, torch.nextafter(mids, mids + 1)]).contiguous()
    codes = torch.full((v.numel(),), POISON_BYTE, dtype=torch.uint8)
    nested = torch.full((2,), POISON)
    native.nf4_double_quantize_cpu(v.data_ptr(), codes.data_ptr(), nested.data_ptr(),
                                   table.data_ptr(), v.numel(), 0.0)
    j = torch.arange(255)
    assert torch.equal(nested, torch.ones(2))
    assert torch.equal(codes[1:256].long(), j) and torch.equal(codes[257:].long(), j + 1)
    # NaN: that group's nested absmax is NaN and its codes 255
    a = torch.rand(700, generator=gen(2))
    a[300] = float("nan")
    codes = torch.empty(700, dtype=torch.uint8)
    nested = torch.empty(3)
    native.nf4_double_quantize_cpu(a.data_ptr(), codes.data_ptr(), nested.data_ptr(),
                                   table.data_ptr(), 700, 0.5)
    assert nested[1].isnan() and torch.all(codes[256:512] == 255)
    for g in (0, 2):  # the other groups as the torch rule has them
        v = a[256 * g:256 * (g + 1)] - torch.tensor(0.5)
        m = v.abs().amax()
        ref = torch.bucketize((v * (1.0 / m.clamp(min=1e-38))).clamp(-1, 1), mids)
        assert nested[g] == m and torch.equal(codes[256 * g:256 * (g + 1)].long(), ref)


# ---- dequantize rows ---------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,blocksize", [((37, 129), 64), ((37, 128), 32), ((5, 1001), 256),
                                             ((9, 33), 32), ((3, 4096), 4096)])
def test_dequantize_rows_bitwise(nf4_isa, double_quant, shape, blocksize):
    qw = make_qweight(*shape, blocksize, double_quant, seed=shape[1])
    w32 = ref_weight(qw)
    n_rows = shape[0]
    for dtype in DTYPES:
        for row0, row1 in ((0, n_rows), (1, 2), (3, n_rows), (n_rows - 1, n_rows), (2, 2)):
            out = raw_dequantize(qw, row0, row1, dtype)
            assert torch.equal(out, w32[row0:row1].to(dtype)), (dtype, row0, row1)
    if not double_quant:
        assert torch.equal(dequantize_reference(qw, torch.float32), w32)


def test_dequantize_rows_nan_and_wrapper():
    qw = make_qweight(6, 96, 32, False, seed=1)
    qw.absmax[4] = float("nan")   # row 1, columns 32 .. 63
    out = raw_dequantize(qw, 0, 6, torch.float32)
    assert torch.equal(out.isnan(), ref_weight(qw).isnan()) and out[1, 32:64].isnan().all()
    out = native_impl.dequantize_rows(qw, 2, 5, torch.float16)
    assert torch.equal(out, ref_weight(qw)[2:5].half())


# ---- GEMV --------------------------------------------------------------------------------------

SHAPES = [((37, 129), 64), ((37, 129), 32), ((37, 128), 32), ((40, 256), 64), ((16, 96), 32),
          ((5, 64), 64), ((3, 1), 32)]


def fast_possible(shape, blocksize) -> bool:
    return shape[1] % blocksize == 0


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape,blocksize", SHAPES)
def test_gemv_accuracy(nf4_isa, dtype, double_quant, shape, blocksize):
    qw = make_qweight(*shape, blocksize, double_quant, dtype, seed=shape[0] * shape[1])
    for m in (1, 2, 3, 4, 5, 8, 11, 16):
        x = torch.randn(m, shape[1], generator=gen(m)).to(dtype)
        for repack in (False, True) if fast_possible(shape, blocksize) else (False,):
            check_gemv(raw_gemv(x, qw, repack), x, qw, f"M={m} repack={repack}")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gemv_every_m(dtype):
    qw = make_qweight(50, 512, 64, True, dtype, seed=7)
    for m in range(1, 17):
        x = torch.randn(m, 512, generator=gen(m)).to(dtype)
        for repack in (False, True):
            check_gemv(raw_gemv(x, qw, repack), x, qw, f"M={m} repack={repack}")


@pytest.mark.parametrize("blocksize", [32, 128, 256, 512, 1024, 2048, 4096])
def test_gemv_blocksizes(blocksize):
    """Every block size through the tile kernel (blocks wider than its decode buffer are
    scaled piece by piece) and the general path."""
    n_cols = max(2 * blocksize, 512)
    for double_quant in (False, True):
        qw = make_qweight(19, n_cols, blocksize, double_quant, seed=blocksize)
        for dtype in DTYPES:
            for m in (1, 5, 16):
                x = torch.randn(m, n_cols, generator=gen(m)).to(dtype)
                for repack in (False, True):
                    check_gemv(raw_gemv(x, qw, repack), x, qw, f"B={blocksize} M={m} {dtype}")


@pytest.mark.parametrize("double_quant", [False, True])
def test_gemv_wide_rows(double_quant):
    """K / B >= 256 blocks per row: the tile kernel reads the nested absmax by gathers; K / B
    = 128: by one load and a permute."""
    for n_cols, blocksize in ((16384, 32), (8192, 32), (4096, 32)):
        qw = make_qweight(21, n_cols, blocksize, double_quant, seed=n_cols)
        for dtype in (torch.float32, torch.bfloat16):
            for m in (1, 6):
                x = torch.randn(m, n_cols, generator=gen(m)).to(dtype)
                check_gemv(raw_gemv(x, qw, True), x, qw, f"K={n_cols} M={m} {dtype}")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gemv_paths_agree(dtype, monkeypatch):
    """Generic, AVX2, AVX-512 general and AVX-512 tile paths: all within the error rule of the
    float64 reference, and close to each other."""
    qw = make_qweight(45, 320, 64, True, dtype, seed=11)
    x = torch.randn(7, 320, generator=gen(2)).to(dtype)
    outs = {}
    for isa in ISAS:
        monkeypatch.setenv("KERNELRL_CPU_ISA", isa)
        if native.nf4_cpu_isa() != isa:
            continue
        for repack in (False, True):
            outs[(isa, repack)] = check_gemv(raw_gemv(x, qw, repack), x, qw, f"{isa} {repack}")
    assert ("generic", False) in outs


def test_gemv_extreme_values(nf4_isa):
    for scale in (1e30, 1e-30, 3e-36):
        w = torch.randn(33, 192, generator=gen(1)) * scale
        w[0, :64] = 0.0                                       # an all-zero block (absmax 0)
        w[1, 5] = scale * 1e3                                 # one outlier dominating a block
        qw = make_qweight(33, 192, 64, False, torch.float32, weight=w)
        for dtype in DTYPES:
            xs = 1e-3 / scale if dtype == torch.float32 else 1.0
            if dtype != torch.float32 and scale < 1e-20:
                continue  # y would underflow the 16-bit dtypes
            if dtype == torch.float16 and scale > 1e20:
                continue  # Ŵ overflows float16 in the eager comparison
            x = (torch.randn(4, 192, generator=gen(3)) * xs).to(dtype)
            for repack in (False, True):
                y = raw_gemv(x, qw, repack)
                assert torch.isfinite(y).all()
                check_gemv(y, x, qw, f"scale={scale} {dtype} repack={repack}")


def test_gemv_nan_propagation(nf4_isa):
    qw = make_qweight(40, 128, 32, False, torch.float32, seed=5)
    qw.absmax[3 * 4 + 1] = float("nan")          # row 3
    qw.absmax[17 * 4 + 3] = float("inf")         # row 17: inf * code 7 = NaN
    for dtype in DTYPES:
        x = torch.randn(3, 128, generator=gen(9)).to(dtype)
        x[1, 77] = float("nan")                  # row 1 of y
        for repack in (False, True):
            y = raw_gemv(x, qw, repack)
            ref = x.double() @ ref_weight(qw).double().t()
            rel_err(y, ref, f"{dtype} repack={repack}")  # asserts the NaN positions
            assert y[1].isnan().all() and y[:, 3].isnan().all() and y[:, 17].isnan().all()


def test_gemv_unaligned_x():
    """x starting at an odd element (2-byte aligned bfloat16 / float16)."""
    qw = make_qweight(20, 256, 64, True, seed=8)
    for dtype in DTYPES:
        for m in (1, 3):
            x = torch.randn(m * 256 + 1, generator=gen(m)).to(dtype)[1:].view(m, 256)
            assert x.data_ptr() % 4 != 0 or dtype == torch.float32
            for repack in (False, True):
                check_gemv(raw_gemv(x, qw, repack), x, qw, f"unaligned {dtype} M={m}")


def test_gemv_thread_count_independent():
    qw = make_qweight(200, 512, 64, True, torch.bfloat16, seed=4)
    for dtype in DTYPES:
        x = torch.randn(5, 512, generator=gen(4)).to(dtype)
        for repack in (False, True):
            outs = []
            before = native.get_num_threads()
            try:
                for threads in (1, 2, 3):
                    native.set_num_threads(threads)
                    outs.append(raw_gemv(x, qw, repack))
            finally:
                native.set_num_threads(before)
            assert all(torch.equal(o, outs[0]) for o in outs)


# ---- the Python wrapper ------------------------------------------------------------------------


def test_wrapper_gemv_caches_the_repack():
    qw = make_qweight(37, 256, 64, True, torch.bfloat16, seed=2)
    x = torch.randn(3, 256, generator=gen(0)).bfloat16()
    y = native_impl.gemv(x, qw)
    check_gemv(y, x, qw, "wrapper")
    fast = native.nf4_cpu_isa() == "avx512"
    assert (native_impl.REPACK_KEY in qw.cache) == fast
    if fast:
        rdata, rscales = qw.cache[native_impl.REPACK_KEY]
        assert torch.equal(rdata, raw_repack(qw)[0]) and torch.equal(rscales, raw_repack(qw)[1])
        assert torch.equal(native_impl.gemv(x, qw), y)
    # a non-contiguous x, and M = 0
    xt = torch.randn(256, 3, generator=gen(1)).bfloat16().t()
    check_gemv(native_impl.gemv(xt, qw), xt.contiguous(), qw, "non-contiguous x")
    assert native_impl.gemv(x[:0], qw).shape == (0, 37)
    # odd K: no repack, the general path
    qo = make_qweight(9, 129, 64, False, torch.float32, seed=3)
    xo = torch.randn(2, 129, generator=gen(2))
    check_gemv(native_impl.gemv(xo, qo), xo, qo, "odd K")
    assert not qo.cache


def test_wrapper_gemv_compiles():
    qw = make_qweight(24, 128, 64, False, torch.float32, seed=6)
    native_impl.prepare(qw)
    x = torch.randn(2, 128, generator=gen(5))
    fn = torch.compile(lambda t: native_impl.gemv(t, qw) * 2, backend="eager", fullgraph=True)
    assert torch.equal(fn(x), native_impl.gemv(x, qw) * 2)


# ---- errors ------------------------------------------------------------------------------------


def test_raw_argument_errors():
    w = torch.randn(64)
    data = torch.empty(32, dtype=torch.uint8)
    absmax = torch.empty(2)
    args = [w.data_ptr(), data.data_ptr(), absmax.data_ptr(), CODE.data_ptr(), 64, 32, 0]
    for i, bad, pattern in ((5, 48, "blocksize: expected a power of two"),
                            (5, 8192, "blocksize"), (4, -1, "n: expected >= 0"),
                            (0, 0, "weight: expected a non-null"), (6, 3, "dtype")):
        a = list(args)
        a[i] = bad
        with pytest.raises(ValueError, match=pattern):
            native.nf4_quantize_cpu(*a)
    unsorted = CODE.flip(0).contiguous()
    with pytest.raises(ValueError, match="code: expected an ascending table"):
        native.nf4_quantize_cpu(*args[:3], unsorted.data_ptr(), 64, 32, 0)

    x = torch.randn(2, 64)
    y = torch.empty(2, 2)
    g = [x.data_ptr(), y.data_ptr(), data.data_ptr(), absmax.data_ptr(), 0, 0, 0.0,
         CODE.data_ptr(), 0, 0, 2, 2, 32, 32, 0]
    for i, bad, pattern in ((10, 17, "m: expected 0 <= m <= 16"), (11, -1, "n_rows"),
                            (12, 0, "n_cols"), (13, 100, "blocksize"), (1, 0, "y: expected"),
                            (8, data.data_ptr(), "repacked_scales")):
        a = list(g)
        a[i] = bad
        with pytest.raises(ValueError, match=pattern):
            native.nf4_gemv_cpu(*a)
    a = list(g)
    a[4] = absmax.data_ptr()  # nested_absmax without nested_code
    with pytest.raises(ValueError, match="nested_code"):
        native.nf4_gemv_cpu(*a)
    with pytest.raises(ValueError, match="n_cols: expected a multiple of blocksize"):
        native.nf4_repack_cpu(data.data_ptr(), absmax.data_ptr(), data.data_ptr(),
                              absmax.data_ptr(), 2, 48, 32, False)
    out = torch.empty(64)
    d = [data.data_ptr(), absmax.data_ptr(), 0, 0, 0.0, CODE.data_ptr(), out.data_ptr(), 2, 32,
         32, 0, 2, 0]
    for i, bad, pattern in ((10, 3, "row0"), (11, 3, "row1"), (10, -1, "row0")):
        a = list(d)
        a[i] = bad
        with pytest.raises(ValueError, match=pattern):
            native.nf4_dequantize_rows_cpu(*a)


def test_wrapper_argument_errors():
    qw = make_qweight(8, 64, 32, False, torch.float32)
    x = torch.randn(2, 64)
    cases = [
        (lambda: native_impl.gemv(x, "w"), "qweight: expected an NF4Weight"),
        (lambda: native_impl.gemv(x.double(), qw), "x: expected dtype float32"),
        (lambda: native_impl.gemv(torch.randn(2, 63), qw), r"x: expected shape \[M, 64\]"),
        (lambda: native_impl.gemv(torch.randn(17, 64), qw), "at most 16 rows"),
        (lambda: native_impl.gemv(torch.randn(64), qw), r"x: expected shape \[M, 64\]"),
        (lambda: native_impl.dequantize_rows(qw, 0, 9, torch.float32), "row1: expected"),
        (lambda: native_impl.dequantize_rows(qw, 5, 4, torch.float32), "row1: expected"),
        (lambda: native_impl.dequantize_rows(qw, 0, 2, torch.int32), "dtype: expected"),
        (lambda: native_impl.quantize(torch.zeros(4, dtype=torch.float64)), "weight: expected"),
        (lambda: native_impl.quantize(torch.zeros(0)), "at least one element"),
        (lambda: native_impl.quantize(torch.zeros(64), 48), "blocksize"),
    ]
    q3 = make_qweight(8, 64, 32, False, torch.float32)
    q3.shape = torch.Size((2, 4, 64))
    cases.append((lambda: native_impl.gemv(x, q3), "2-D"))
    for fn, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            fn()


# ---- ISA levels --------------------------------------------------------------------------------


def test_isa_levels(monkeypatch):
    monkeypatch.delenv("KERNELRL_CPU_ISA", raising=False)
    best = native.nf4_cpu_isa()
    assert best in ISAS and native.cpu_isa() in ("generic", "avx2")
    if best != "generic":
        assert native.cpu_isa() == "avx2"
    monkeypatch.setenv("KERNELRL_CPU_ISA", "generic")
    assert native.nf4_cpu_isa() == "generic" and native.cpu_isa() == "generic"
    assert not native.nf4_cpu_has_bf16_dot()
    monkeypatch.setenv("KERNELRL_CPU_ISA", "avx2")
    assert native.nf4_cpu_isa() == ("generic" if best == "generic" else "avx2")
    assert native.cpu_isa() == native.nf4_cpu_isa()
    assert "avx512" in native.cpu_isa.__doc__ and "avx2" in native.cpu_isa.__doc__


# ---- CUDA --------------------------------------------------------------------------------------


@pytest.mark.skipif(not (native.has_cuda() and torch.cuda.is_available()),
                    reason="needs the CUDA part and a GPU")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("double_quant", [False, True])
def test_gemv_cuda(dtype, double_quant):
    for shape, blocksize in SHAPES + [((300, 4096), 64), ((70, 2048 + 64), 64)]:
        qw = make_qweight(*shape, blocksize, double_quant, dtype, seed=shape[1])
        qc = qw.to("cuda")
        for m in (1, 3, 8, 16):
            x = torch.randn(m, shape[1], generator=gen(m)).to(dtype)
            y = native_impl.gemv(x.cuda(), qc).cpu()
            check_gemv(y, x, qw, f"cuda {shape} M={m}")


def test_nf4_cu_compiles_without_spills(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    cmd = [nvcc, "-arch=sm_90", "-std=c++17", "-O3", "-Xptxas", "-v", "-I", str(ROOT / "csrc"),
           "-c", str(ROOT / "csrc" / "nf4" / "nf4.cu"), "-o", str(tmp_path / "nf4.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "LC_ALL": "C"})
    assert res.returncode == 0, res.stdout + res.stderr
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", res.stderr)]
    assert spills and max(spills) == 0, res.stderr
