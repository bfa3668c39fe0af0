"""NF4 in Triton: the dequant-GEMM (training shapes) and the decode GEMV (1..16 rows).

The frozen weight Ŵ [N, K] stays packed (see :mod:`kernelrl.ops.nf4.format`): element
e = n·K + k of the flattened weight is the high nibble of byte e // 2 when e is even, the
low nibble when odd, and Ŵ_e = code[c_e] · s_{e // blocksize} in float32, where the block
scale s_b is absmax[b] or, double-quantized, nested_code[absmax[b]]·nested_absmax[b // 256]
+ offset (multiply, then add). Both kernels decode Ŵ in registers; no dequantized copy of
the weight exists at any time.

Dequant-GEMM (``dequant_matmul``), one kernel for both directions of a linear layer:

    out[M, P] = a[M, Q] · op(Ŵ) + bias + lora_scale · L[M, R] · Rt[R, P]

    forward         op(Ŵ) = Ŵᵀ   Q = K, P = N   element (q, p) = p·K + q
    input gradient  op(Ŵ) = Ŵ    Q = N, P = K   element (q, p) = q·K + p

The kernel takes the two element strides (stride_p, stride_q) = (K, 1) or (1, K); they are
constexpr, so each weight shape and direction compiles once (a model has a handful) and
the compiler knows which tile axis runs through consecutive elements.

Cost of the decode per weight element (a [BLOCK_Q, BLOCK_P] tile, every K step, reused
by BLOCK_M rows of a): index add, byte address, byte load, nibble shift and mask, a gather
from the 16-entry table (one 64-byte line, L1-resident), two ops for the scale, one
multiply and the conversion to the dot's dtype. Scales are never gathered per element:
along the tile axis of unit stride a run of BLOCK elements touches at most SPAN =
⌈(BLOCK − 1)/blocksize⌉ + 1 consecutive blocks, so each tile row (forward) or column
(backward) loads SPAN scales (decoding the double quantization there, O(BLOCK) work) and
each element picks its own with one compare and one select per extra candidate (SPAN = 2
for BLOCK ≤ blocksize, the usual GPU tiles). Rows that start mid-byte (K odd) and blocks
that straddle rows need no special case.

Decode GEMV (``gemv``), y[M, N] = x[M, K]·Ŵᵀ for M ≤ 16: programs over (N tiles, K splits);
each reads its rows' packed bytes once, a byte giving the pair of elements (k, k + 1) for
even k (the high and low nibble; for rows that start mid-byte, the low nibble of one byte
and the high nibble of the next), so the activations are read as even and odd columns.
One row: fp32 multiply-adds on the exact fp32 Ŵ, reduced once at the end; 2..16 rows: a
tensor-core dot with the rows padded to 16. K splits write fp32 partial sums, added in a
fixed order (deterministic).

Numerics: fp32 accumulation everywhere; fp32 operands are multiplied as fp32 ("ieee", not
TF32); for fp16/bf16 activations the decoded fp32 weight is rounded to that dtype (to
nearest even) before the tensor-core dot, as eager ``F.linear`` on the dequantized weight
in that dtype sees it. Under the interpreter (which cannot multiply bf16) the operands
are upcast to fp32 for the dot: exact, since the products of 16-bit values are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kernelrl import backend as _backend
from kernelrl.ops._checks import KERNEL_DTYPES, check_triton_device
from kernelrl.ops._triton_utils import downcast
from kernelrl.ops.nf4.format import NESTED_BLOCKSIZE, NF4Weight

__all__ = ["dequant_matmul", "gemv", "GEMV_MAX_ROWS"]

#: Most rows of x the GEMV takes (the tensor-core path pads them to 16).
GEMV_MAX_ROWS = 16
#: Element indices are int32: the weight, plus a block and a tile of slack past its end.
_MAX_NUMEL = 2 ** 31 - 2 ** 16

# Set when the kernels were decorated (at import, as TRITON_INTERPRET decides there): the
# interpreter cannot multiply bf16, round fp32 -> bf16 to nearest, or call libdevice.
_INTERPRET = tl.constexpr(_backend.triton_interpret())
_NESTED = tl.constexpr(NESTED_BLOCKSIZE)     # blocks per nested absmax (256)


# ---------------------------------------------------------------------------------------
# Triton: launch configuration (named so that a tuner can replace it; no device queries)
# ---------------------------------------------------------------------------------------

def _gemm_configs() -> list:
    """Autotuning candidates for the dequant-GEMM.

    GPU (H100/H200, M = 512..4096, N, K = 4096..14336): 128-row tiles or more, so that each
    decoded weight element feeds at least 256 flops of tensor-core work (the decode is the
    scarce resource, ~10 integer/fp32 ops per element), and K steps of 32-64 so that the
    scale runs stay within 2 candidates for the usual blocksize 64. Tuned once per
    (M rounded up to a power of two, weight shape, direction, blocksize, scale mode, LoRA
    or not): training's varying token counts do not re-tune on every new M. The
    interpreter pays per program and per loop step, and autotuning it would only time the
    interpreter, so it gets one big-block config.
    """
    if _backend.triton_interpret():
        return [triton.Config(dict(BLOCK_M=64, BLOCK_P=128, BLOCK_Q=128, GROUP_M=8),
                              num_warps=4, num_stages=1)]

    def cfg(m, p, q, warps, stages):
        return triton.Config(dict(BLOCK_M=m, BLOCK_P=p, BLOCK_Q=q, GROUP_M=8),
                             num_warps=warps, num_stages=stages)
    return [cfg(128, 128, 64, 8, 3), cfg(128, 128, 32, 8, 4), cfg(256, 128, 32, 8, 3),
            cfg(128, 64, 64, 4, 4), cfg(64, 128, 64, 4, 4)]


def _gemv_config(M: int, N: int, K: int, blocksize: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_J, SPLIT_K, num_warps) for the decode GEMV.

    A program takes BLOCK_N rows and steps over K by BLOCK_J byte pairs (2·BLOCK_J
    elements). On a GPU 2·BLOCK_J ≤ blocksize keeps the scale runs at 2 candidates (32
    rows x 32 bytes = 1 KiB per step for blocksize 64), and K is split until there are
    ~512 programs (4 per SM on a 132-SM H100/H200) to keep more bytes in flight; a split
    keeps at least 8 K steps. Untuned: no GPU has run it yet. The interpreter takes big
    tiles and no split (the tests force splits through this function).
    """
    if _backend.triton_interpret():
        return min(64, max(16, triton.next_power_of_2(N))), 64, 1, 4
    block_n = 32
    block_j = min(64, max(16, blocksize // 2))
    tiles = triton.cdiv(N, block_n)
    steps = triton.cdiv(K, 2 * block_j)
    split = max(1, min(triton.cdiv(512, tiles), steps // 8))
    return block_n, block_j, split, 4


# ---------------------------------------------------------------------------------------
# Triton: shared helpers
# ---------------------------------------------------------------------------------------

@triton.jit
def _mul_rn(x, y):
    """x·y in fp32, never contracted into a following add (the scale is "multiply, then
    add", as the format's reference computes it)."""
    if _INTERPRET:
        return x * y
    else:
        return libdevice.mul_rn(x, y)


@triton.jit
def _block_scales(b, ok, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                  DOUBLE_QUANT: tl.constexpr):
    """fp32 scales of blocks b (any shape; 0 where not ok)."""
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + b, mask=ok, other=0).to(tl.int32)
        group = tl.load(nested_absmax_ptr + b // _NESTED, mask=ok, other=0.0)
        s = _mul_rn(tl.load(nested_code_ptr + q), group) + offset
    else:
        s = tl.load(absmax_ptr + b, mask=ok, other=0.0)
    return tl.where(ok, s, 0.0)


@triton.jit
def _scales_of_runs(e, first, nblocks, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                    offset, SPAN: tl.constexpr, BLOCKSIZE: tl.constexpr,
                    DOUBLE_QUANT: tl.constexpr):
    """The fp32 scale of every element e of a tile whose runs of consecutive elements start
    at ``first`` (broadcastable against e) and touch at most SPAN blocks: SPAN scale loads
    per run, then per element one compare and one select per extra candidate."""
    b = first // BLOCKSIZE
    s = _block_scales(b, b < nblocks, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                      offset, DOUBLE_QUANT)
    s = tl.broadcast_to(s, e.shape)
    for j in tl.static_range(1, SPAN):
        bj = b + j
        sj = _block_scales(bj, bj < nblocks, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                           offset, DOUBLE_QUANT)
        s = tl.where(e >= bj * BLOCKSIZE, sj, s)
    return s


@triton.jit
def _dot_operand(w, DTYPE: tl.constexpr):
    """fp32 weight tile -> the dot's dtype, rounded to nearest even (the interpreter
    truncates to bf16, so there the rounding is done on the bits, and the tile stays fp32
    for the interpreter's fp32 dot: Ŵ is finite, so no NaN care is needed)."""
    if _INTERPRET:
        if DTYPE == tl.bfloat16:
            bits = w.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        else:
            return w.to(DTYPE).to(tl.float32)
    else:
        return w.to(DTYPE)


@triton.jit
def _mma(acc, x, y, FP32: tl.constexpr):
    """acc + x·y with fp32 accumulation: fp32 operands as fp32 ("ieee", not TF32), 16-bit
    ones on the tensor cores; the interpreter multiplies in fp32."""
    if _INTERPRET:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
    elif FP32:
        return tl.dot(x, y, acc, input_precision="ieee")
    else:
        return tl.dot(x, y, acc)


# ---------------------------------------------------------------------------------------
# Triton: the dequant-GEMM
# ---------------------------------------------------------------------------------------

@triton.jit
def _nf4_gemm_kernel(
    a_ptr,               # [M, Q] fp32/fp16/bf16, strides (stride_am, stride_aq)
    data_ptr,            # [ceil(N·K/2)] uint8: the packed codes of the flattened Ŵ
    code_ptr,            # [16] fp32: the NF4 table
    absmax_ptr,          # [nblocks] fp32 scales, or uint8 codes into nested_code (DOUBLE_QUANT)
    nested_absmax_ptr,   # [ceil(nblocks/256)] fp32 (DOUBLE_QUANT; else never read)
    nested_code_ptr,     # [256] fp32 (DOUBLE_QUANT; else never read)
    bias_ptr,            # [P] fp32/fp16/bf16 (HAS_BIAS; else never read)
    left_ptr,            # [M, R] a's dtype (HAS_LORA), strides (stride_lm, stride_lr)
    right_ptr,           # [R, P] a's dtype (HAS_LORA), strides (stride_rr, stride_rp)
    out_ptr,             # [M, P] a's dtype, out, strides (stride_om, stride_op)
    M, P, Q, R, nblocks,
    m_bucket,            # next power of two of M: an autotuning key only, unused here
    stride_am, stride_aq, stride_lm, stride_lr, stride_rr, stride_rp, stride_om, stride_op,
    offset,              # fp32 offset of the double quantization (0 without)
    lora_scale,
    stride_p: tl.constexpr,   # op(Ŵ)[q, p] is Ŵ's flattened element e = p·stride_p + q·stride_q:
    stride_q: tl.constexpr,   # (K, 1) forward, (1, K) input gradient
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    # -- program id -> (tile of rows, tile of columns), GROUP_M row tiles at a time so that
    #    consecutive programs share weight tiles (decoded again, but read from L2)
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_p = tl.cdiv(P, BLOCK_P)
    per_group = GROUP_M * tiles_p
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_p = (pid % per_group) // group_m

    # -- offsets; rows and columns past the end wrap around (loads stay in bounds, their
    #    results are never stored), so only the K tail needs masks
    p_first = pid_p * BLOCK_P
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    rp = (p_first + tl.arange(0, BLOCK_P)) % P
    rq = tl.arange(0, BLOCK_Q)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_am + rq[None, :] * stride_aq
    e_p = rp * stride_p                                        # [BLOCK_P] int32
    DT: tl.constexpr = a_ptr.dtype.element_ty
    FP32: tl.constexpr = DT == tl.float32
    # most blocks a run of BLOCK consecutive elements touches: ⌈(BLOCK − 1)/blocksize⌉ + 1
    SPAN_Q: tl.constexpr = (BLOCK_Q + BLOCKSIZE - 2) // BLOCKSIZE + 1
    SPAN_P: tl.constexpr = (BLOCK_P + BLOCKSIZE - 2) // BLOCKSIZE + 1

    # -- K loop: decode the [BLOCK_Q, BLOCK_P] weight tile in registers, one dot per step
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        q = q0 + rq
        q_ok = q < Q
        a = tl.load(a_ptrs, mask=q_ok[None, :], other=0.0)
        e = (tl.minimum(q, Q - 1) * stride_q)[:, None] + e_p[None, :]     # [BLOCK_Q, BLOCK_P]
        byte = tl.load(data_ptr + (e >> 1), mask=q_ok[:, None], other=0).to(tl.int32)
        nibble = (byte >> ((1 - (e & 1)) * 4)) & 15
        value = tl.load(code_ptr + nibble)
        # scales: runs of consecutive elements go along q (forward) or p (input gradient)
        if stride_q == 1:
            s = _scales_of_runs(e, (e_p + q0)[None, :], nblocks, absmax_ptr,
                                nested_absmax_ptr, nested_code_ptr, offset,
                                SPAN_Q, BLOCKSIZE, DOUBLE_QUANT)
        else:
            first = tl.minimum(q, Q - 1) * stride_q + p_first
            s = _scales_of_runs(e, first[:, None], nblocks, absmax_ptr, nested_absmax_ptr,
                                nested_code_ptr, offset, SPAN_P,
                                BLOCKSIZE, DOUBLE_QUANT)
        w = _dot_operand(value * s, DT)                        # Ŵ in fp32, rounded once
        acc = _mma(acc, a, w, FP32)
        a_ptrs += BLOCK_Q * stride_aq

    # -- epilogue: + lora_scale · L·Rt (a dot over R in BLOCK_R steps, R masked), + bias
    if HAS_LORA:
        rr = tl.arange(0, BLOCK_R)
        lacc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + rr
            r_ok = r < R
            left = tl.load(left_ptr + rm.to(tl.int64)[:, None] * stride_lm
                           + r[None, :] * stride_lr, mask=r_ok[None, :], other=0.0)
            right = tl.load(right_ptr + r[:, None] * stride_rr
                            + rp.to(tl.int64)[None, :] * stride_rp, mask=r_ok[:, None],
                            other=0.0)
            lacc = _mma(lacc, left, right, FP32)
        acc += lora_scale * lacc
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rp).to(tl.float32)[None, :]

    # -- masked store in a's dtype
    om = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    op = p_first + tl.arange(0, BLOCK_P)
    out = out_ptr + om.to(tl.int64)[:, None] * stride_om + op.to(tl.int64)[None, :] * stride_op
    tl.store(out, downcast(acc, out_ptr.dtype.element_ty),
             mask=(om < M)[:, None] & (op < P)[None, :])


_nf4_gemm = triton.autotune(
    configs=_gemm_configs(),
    key=["m_bucket", "P", "Q", "stride_p", "stride_q", "BLOCKSIZE", "DOUBLE_QUANT",
         "HAS_LORA"],
)(_nf4_gemm_kernel)


# ---------------------------------------------------------------------------------------
# Triton: the decode GEMV
# ---------------------------------------------------------------------------------------

@triton.jit
def _nf4_gemv_kernel(
    x_ptr,               # [M, K] fp32/fp16/bf16, row stride stride_xm, unit column stride
    data_ptr,            # [ceil(N·K/2)] uint8: the packed codes of the flattened Ŵ
    code_ptr,            # [16] fp32: the NF4 table
    absmax_ptr,          # [nblocks] fp32 scales, or uint8 codes into nested_code (DOUBLE_QUANT)
    nested_absmax_ptr,   # [ceil(nblocks/256)] fp32 (DOUBLE_QUANT; else never read)
    nested_code_ptr,     # [256] fp32 (DOUBLE_QUANT; else never read)
    out_ptr,             # [M, N] x's dtype, or [SPLIT_K, M, N] fp32 partial sums; out,
                         # strides (stride_os, stride_om), unit column stride
    M, N, nblocks,
    k_split,             # elements of K per split, a multiple of 2·BLOCK_J
    stride_xm, stride_os, stride_om,
    offset,              # fp32 offset of the double quantization (0 without)
    K: tl.constexpr,     # row length of Ŵ (constexpr: even K needs no mid-byte handling)
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
    BLOCK_M: tl.constexpr,   # 1 (fp32 multiply-adds) or 16 (a tensor-core dot)
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):
    # -- program -> rows of Ŵ (past N: clamped, never stored) and a range of K
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_e = tl.minimum(rn, N - 1) * K                     # first element of each row
    row_b = row_e >> 1                                    # the byte holding it
    if K % 2 == 1:                                        # odd rows start mid-byte
        par = row_e & 1
    k_lo = pid_k * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    rj = tl.arange(0, BLOCK_J)
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    DT: tl.constexpr = x_ptr.dtype.element_ty
    SPAN: tl.constexpr = (2 * BLOCK_J + BLOCKSIZE - 2) // BLOCKSIZE + 1

    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)     # reduced after the loop
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # -- loop over byte pairs: columns k (even) and k + 1 of every row
    for k0 in range(k_lo, k_hi, 2 * BLOCK_J):
        k = k0 + 2 * rj
        ok_e = k < k_hi
        ok_o = k + 1 < k_hi
        ptrs = data_ptr + row_b[:, None] + (k >> 1)[None, :]
        byte = tl.load(ptrs, mask=ok_e[None, :], other=0).to(tl.int32)
        if K % 2 == 1:
            # rows with odd first element: column k is the low nibble of this byte,
            # column k + 1 the high nibble of the next one
            odd = (par == 1)[:, None]
            nxt = tl.load(ptrs + 1, mask=odd & ok_o[None, :], other=0).to(tl.int32)
            c_e = (byte >> (4 - 4 * par)[:, None]) & 15
            c_o = (tl.where(odd, nxt, byte) >> (4 * par)[:, None]) & 15
        else:
            c_e = byte >> 4
            c_o = byte & 15
        e = row_e[:, None] + k[None, :]
        first = (row_e + k0)[:, None]
        s_e = _scales_of_runs(e, first, nblocks, absmax_ptr, nested_absmax_ptr,
                              nested_code_ptr, offset, SPAN, BLOCKSIZE, DOUBLE_QUANT)
        s_o = _scales_of_runs(e + 1, first, nblocks, absmax_ptr, nested_absmax_ptr,
                              nested_code_ptr, offset, SPAN, BLOCKSIZE, DOUBLE_QUANT)
        w_e = tl.load(code_ptr + c_e) * s_e                   # Ŵ[n, k], fp32, exact
        w_o = tl.load(code_ptr + c_o) * s_o                   # Ŵ[n, k + 1]
        x_e = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & ok_e[None, :], other=0.0)
        x_o = tl.load(x_rows + (k + 1)[None, :], mask=m_ok[:, None] & ok_o[None, :],
                      other=0.0)
        if BLOCK_M == 1:
            acc += w_e * x_e.to(tl.float32) + w_o * x_o.to(tl.float32)
        else:
            acc = _mma(acc, x_e, tl.trans(_dot_operand(w_e, DT)), DT == tl.float32)
            acc = _mma(acc, x_o, tl.trans(_dot_operand(w_o, DT)), DT == tl.float32)

    # -- store: this split's sums (fp32), or the result in x's dtype
    if BLOCK_M == 1:
        y = tl.sum(acc, axis=1)[None, :]
    else:
        y = acc
    out = out_ptr + pid_k * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, downcast(y, out_ptr.dtype.element_ty), mask=m_ok[:, None] & (rn < N)[None, :])


# ---------------------------------------------------------------------------------------
# launchers: check, allocate, launch
# ---------------------------------------------------------------------------------------

def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")




def _check_2d(name: str, t, shape: tuple, dtypes: tuple, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype in ({', '.join(_dt(d) for d in dtypes)}), "
                         f"got {_dt(t.dtype)}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    check_triton_device(name, t, device)


def _weight_operands(qweight, device: torch.device) -> tuple:
    """(N, K, tensors for the kernel's five weight pointers, offset) after checking qweight."""
    if not isinstance(qweight, NF4Weight):
        raise ValueError(f"qweight: expected an NF4Weight, got {type(qweight).__name__}")
    if len(qweight.shape) != 2:
        raise ValueError(f"qweight: expected a 2-D [N, K] weight, got shape "
                         f"{tuple(qweight.shape)}")
    if qweight.numel > _MAX_NUMEL:
        raise ValueError(f"qweight: expected at most {_MAX_NUMEL} elements (int32 element "
                         f"indices), got {qweight.numel}")
    tensors = [("qweight.data", qweight.data), ("qweight.absmax", qweight.absmax),
               ("qweight.code", qweight.code)]
    if qweight.double_quant:
        tensors += [("qweight.nested_absmax", qweight.nested_absmax),
                    ("qweight.nested_code", qweight.nested_code)]
    for name, t in tensors:
        check_triton_device(name, t, device)
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
    if qweight.code.dtype != torch.float32:
        raise ValueError(f"qweight.code: expected dtype float32, got {_dt(qweight.code.dtype)}")
    nested_absmax = qweight.nested_absmax if qweight.double_quant else qweight.absmax
    nested_code = qweight.nested_code if qweight.double_quant else qweight.code
    N, K = qweight.shape
    return N, K, (qweight.data, qweight.code, qweight.absmax, nested_absmax, nested_code), \
        float(qweight.offset)


def dequant_matmul(a: torch.Tensor, qweight: NF4Weight, *, transpose_w: bool, bias=None,
                   lora_left=None, lora_right=None, lora_scale: float = 1.0,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """out = a·op(Ŵ) + bias + lora_scale·lora_left·lora_right in a's dtype, Ŵ [N, K] decoded
    in the kernel.

    transpose_w=True: op(Ŵ) = Ŵᵀ, a [M, K] -> out [M, N] (a linear layer's forward);
    transpose_w=False: op(Ŵ) = Ŵ, a [M, N] -> out [M, K] (its input gradient).
    a: fp32, fp16 or bf16, any strides; bias: [P] (P = the output width) of any of those
    dtypes; lora_left [M, R] and lora_right [R, P] (both or neither) in a's dtype, any
    strides; out: an optional [M, P] buffer in a's dtype that does not overlap the inputs.
    """
    if not isinstance(a, torch.Tensor):
        raise ValueError(f"a: expected a torch.Tensor, got {type(a).__name__}")
    if a.dim() != 2:
        raise ValueError(f"a: expected 2 dimensions, got shape {tuple(a.shape)}")
    if a.dtype not in KERNEL_DTYPES:
        raise ValueError(f"a: expected dtype in ({', '.join(_dt(d) for d in KERNEL_DTYPES)}), "
                         f"got {_dt(a.dtype)}")
    check_triton_device("a", a)
    N, K, wts, offset = _weight_operands(qweight, a.device)
    M = a.shape[0]
    Q, P = (K, N) if transpose_w else (N, K)
    stride_p, stride_q = (K, 1) if transpose_w else (1, K)
    if a.shape[1] != Q:
        raise ValueError(f"a: expected {Q} columns (the weight is {N}x{K}, transpose_w="
                         f"{bool(transpose_w)}), got shape {tuple(a.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in KERNEL_DTYPES:
            raise ValueError(f"bias: expected a tensor of dtype in (float32, float16, "
                             f"bfloat16), got {getattr(bias, 'dtype', type(bias).__name__)}")
        if tuple(bias.shape) != (P,):
            raise ValueError(f"bias: expected shape ({P},), got {tuple(bias.shape)}")
        check_triton_device("bias", bias, a.device)
        bias = bias.contiguous()
    if (lora_left is None) != (lora_right is None):
        raise ValueError(f"lora_left, lora_right: expected both or neither, got "
                         f"{'lora_left' if lora_right is None else 'lora_right'} only")
    R = 0
    if lora_left is not None:
        if not isinstance(lora_left, torch.Tensor) or lora_left.dim() != 2:
            raise ValueError(f"lora_left: expected a 2-D tensor [{M}, R], got "
                             f"{tuple(getattr(lora_left, 'shape', ()))}")
        R = lora_left.shape[1]
        if R == 0:
            raise ValueError(f"lora_left: expected a rank R >= 1, got shape "
                             f"{tuple(lora_left.shape)}")
        _check_2d("lora_left", lora_left, (M, R), (a.dtype,), a.device)
        _check_2d("lora_right", lora_right, (R, P), (a.dtype,), a.device)
    if isinstance(lora_scale, bool) or not isinstance(lora_scale, (int, float)):
        raise ValueError(f"lora_scale: expected a Python float, got {type(lora_scale).__name__}")
    if out is None:
        out = torch.empty(M, P, dtype=a.dtype, device=a.device)
    else:
        _check_2d("out", out, (M, P), (a.dtype,), a.device)
    if M == 0 or P == 0:
        return out
    if Q == 0:      # nothing to reduce (an empty weight): the epilogue terms alone
        out.zero_()
        if bias is not None:
            out += bias
        if R:
            out.addmm_(lora_left, lora_right, alpha=lora_scale)
        return out
    has_lora = R > 0
    left = lora_left if has_lora else a
    right = lora_right if has_lora else a
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(P, meta["BLOCK_P"]),)
    _nf4_gemm[grid](
        a, *wts, bias if bias is not None else a, left, right, out,
        M, P, Q, R, qweight.nblocks, min(max(triton.next_power_of_2(M), 16), 8192),
        a.stride(0), a.stride(1), left.stride(0), left.stride(1), right.stride(0),
        right.stride(1), out.stride(0), out.stride(1), offset, float(lora_scale),
        stride_p=stride_p, stride_q=stride_q, BLOCKSIZE=qweight.blocksize,
        DOUBLE_QUANT=qweight.double_quant, HAS_BIAS=bias is not None, HAS_LORA=has_lora,
        BLOCK_R=min(max(triton.next_power_of_2(max(R, 1)), 16), 64))
    return out


def gemv(x2d: torch.Tensor, qweight: NF4Weight, *,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x2d·Ŵᵀ for a few rows (the decode step): x2d [M, K] fp32/fp16/bf16 with
    1 <= M <= 16 and unit column stride -> y [M, N] in x's dtype (``out``: an optional
    [M, N] buffer of that dtype with unit column stride). No bias or LoRA: the caller
    adds them."""
    if not isinstance(x2d, torch.Tensor):
        raise ValueError(f"x2d: expected a torch.Tensor, got {type(x2d).__name__}")
    if x2d.dim() != 2:
        raise ValueError(f"x2d: expected 2 dimensions, got shape {tuple(x2d.shape)}")
    if x2d.dtype not in KERNEL_DTYPES:
        raise ValueError(f"x2d: expected dtype in ({', '.join(_dt(d) for d in KERNEL_DTYPES)}), "
                         f"got {_dt(x2d.dtype)}")
    check_triton_device("x2d", x2d)
    N, K, wts, offset = _weight_operands(qweight, x2d.device)
    M = x2d.shape[0]
    if not 1 <= M <= GEMV_MAX_ROWS:
        raise ValueError(f"x2d: expected 1 to {GEMV_MAX_ROWS} rows, got shape "
                         f"{tuple(x2d.shape)}")
    if x2d.shape[1] != K:
        raise ValueError(f"x2d: expected {K} columns (the weight is {N}x{K}), got shape "
                         f"{tuple(x2d.shape)}")
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    if out is None:
        out = torch.empty(M, N, dtype=x2d.dtype, device=x2d.device)
    else:
        _check_2d("out", out, (M, N), (x2d.dtype,), x2d.device)
        if out.stride(1) != 1 and N > 1:
            raise ValueError(f"out: expected a unit column stride, got strides {out.stride()}")
    if N == 0:
        return out
    if K == 0:
        return out.zero_()
    block_n, block_j, split, warps = _gemv_config(M, N, K, qweight.blocksize)
    k_split = triton.cdiv(triton.cdiv(K, split), 2 * block_j) * 2 * block_j
    split = triton.cdiv(K, k_split)
    part = out if split == 1 else torch.empty(split, M, N, dtype=torch.float32,
                                              device=x2d.device)
    stride_os = 0 if split == 1 else part.stride(0)
    _nf4_gemv_kernel[(triton.cdiv(N, block_n), split)](
        x2d, *wts, part, M, N, qweight.nblocks, k_split, x2d.stride(0), stride_os,
        part.stride(-2), offset, K=K, BLOCKSIZE=qweight.blocksize,
        DOUBLE_QUANT=qweight.double_quant, BLOCK_M=1 if M == 1 else 16, BLOCK_N=block_n,
        BLOCK_J=block_j, num_warps=warps)
    if split > 1:       # partial sums added in split order: deterministic
        torch.sum(part, dim=0, out=out) if out.dtype == torch.float32 else \
            out.copy_(part.sum(dim=0))
    return out


# ---------------------------------------------------------------------------------------
# ahead-of-time compile signatures (tests/ops/test_triton_compile.py)
# ---------------------------------------------------------------------------------------

_WEIGHT = {"data_ptr": "*u8", "code_ptr": "*fp32", "absmax_ptr": "*u8",
           "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32"}
#: Signatures for compiling every Triton kernel here ahead of time (tests/ops): the
#: double-quantized layout (plain fp32 absmax differs only in one pointer type).
AOT_SIGNATURES = {
    "_nf4_gemm_kernel": (
        {"a_ptr": "*{dt}", **_WEIGHT, "bias_ptr": "*{dt}", "left_ptr": "*{dt}",
         "right_ptr": "*{dt}", "out_ptr": "*{dt}", "M": "i32", "P": "i32", "Q": "i32",
         "R": "i32", "nblocks": "i32", "m_bucket": "i32",
         **{n: "i64" for n in ("stride_am", "stride_aq", "stride_lm", "stride_lr",
                               "stride_rr", "stride_rp", "stride_om", "stride_op")},
         "offset": "fp32", "lora_scale": "fp32",
         **{n: "constexpr" for n in ("stride_p", "stride_q", "BLOCKSIZE", "DOUBLE_QUANT",
                                     "HAS_BIAS", "HAS_LORA", "BLOCK_M", "BLOCK_P", "BLOCK_Q",
                                     "BLOCK_R", "GROUP_M")}},
        [{"stride_p": 4096, "stride_q": 1, "BLOCKSIZE": 64, "DOUBLE_QUANT": True,
          "HAS_BIAS": True, "HAS_LORA": True, "BLOCK_M": 128, "BLOCK_P": 128, "BLOCK_Q": 64,
          "BLOCK_R": 16, "GROUP_M": 8},
         {"stride_p": 1, "stride_q": 4096, "BLOCKSIZE": 64, "DOUBLE_QUANT": True,
          "HAS_BIAS": False, "HAS_LORA": True, "BLOCK_M": 128, "BLOCK_P": 128,
          "BLOCK_Q": 32, "BLOCK_R": 16, "GROUP_M": 8}]),
    "_nf4_gemv_kernel": (
        {"x_ptr": "*{dt}", **_WEIGHT, "out_ptr": "*{dt}", "M": "i32", "N": "i32",
         "nblocks": "i32", "k_split": "i32", "stride_xm": "i64", "stride_os": "i64",
         "stride_om": "i64", "offset": "fp32",
         **{n: "constexpr" for n in ("K", "BLOCKSIZE", "DOUBLE_QUANT", "BLOCK_M", "BLOCK_N",
                                     "BLOCK_J")}},
        [{"K": 4096, "BLOCKSIZE": 64, "DOUBLE_QUANT": True, "BLOCK_M": 1, "BLOCK_N": 8,
          "BLOCK_J": 32},
         {"K": 4095, "BLOCKSIZE": 64, "DOUBLE_QUANT": True, "BLOCK_M": 16, "BLOCK_N": 16,
          "BLOCK_J": 32}]),
}
