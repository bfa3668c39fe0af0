"""MoE expert GEMMs in Triton: grouped over the experts' runs of sorted rows.

After the permutation (:mod:`kernelrl.ops.moe.triton_permute`) the rows of expert e are
the sorted positions [offsets[e], offsets[e+1]). Four kernels, one algorithm each:

    _moe_gate_up_kernel       h[p] = silu(x[n]·W_g[e]ᵀ) ∘ (x[n]·W_u[e]ᵀ), n = order[p] // K:
                              x rows gathered in the A-operand loads, two accumulators
                              (gate and up tiles of the same columns), SwiGLU epilogue
    _moe_gate_up_bwd_kernel   the same two GEMMs recomputed, then dg = dh·u·silu'(g) and
                              du = dh·silu(g) into dgu [N·K, 2F] = [dg | du]
    _moe_grouped_gemm_kernel  c[p] = a[p]·B[e] for any per-expert [Q, P] operand given by
                              strides: o = h·W_downᵀ, dh = do·W_down, dx_slot = dgu·W_gate_up
    _moe_wgrad_kernel         dw[e] = Σ_{p in e} a[p]ᵀ·b[p] (b's rows optionally gathered
                              through order): dw_down = doᵀ·h, dw_gate_up = dguᵀ·x

Row tiles without a host sync. The grouped kernels' grid is sized from a static bound on
the number of row tiles: Σ_e ⌈c_e/BLOCK_M⌉ ≤ ⌊(S + E'·(BLOCK_M − 1))/BLOCK_M⌋ with
S = N·K rows and E' = min(E, S) experts that can hold a row. Each program finds its
(expert, row tile) in-kernel (``_expert_tile``): it loads the E + 1 offsets, computes
every expert's tile count ⌈c_e/BLOCK_M⌉ and their inclusive cumulative sum, and its
expert is the number of experts whose tiles all end at or before its tile index. That is
O(E) register work per program, nothing next to a GEMM tile for E up to a few hundred,
needs no extra launch or buffer, and follows whatever BLOCK_M the config picks. Programs
past the last real tile exit at once. The weight gradient needs no search: its grid is
(tiles of dw[e], E) and each program reduces over its expert's rows in ascending order,
BLOCK_R at a time, into one fp32 accumulator (no split over rows, so no atomics and no
second reduction; an expert with no rows gets zeros).

Numerics: fp32 accumulation; fp32 operands multiply as fp32 ("ieee", not TF32), 16-bit
ones on the tensor cores. A weight in another dtype than the activations is rounded to
the activations' dtype in registers (to nearest even) before the dot, as autocast would
round a copy. The interpreter, which cannot multiply bf16, multiplies in fp32: exact for
16-bit operands, whose products fit in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernelrl import backend as _backend
from kernelrl.ops._triton_utils import downcast

# Set when the kernels are decorated (at import, as TRITON_INTERPRET decides there).
_INTERPRET = tl.constexpr(_backend.triton_interpret())


# ---------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------

@triton.jit
def _as_operand(w, DT: tl.constexpr):
    """A loaded tile as a dot operand of dtype DT: rounded to nearest even if its dtype
    differs (the interpreter's own conversion would truncate to bf16)."""
    if w.dtype != DT:
        w = downcast(w.to(tl.float32), DT)
    return w


@triton.jit
def _mma(acc, a, b, FP32: tl.constexpr):
    """acc + a·b with fp32 accumulation (see the module docstring)."""
    if _INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif FP32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _program_tile(tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """program id -> (row tile, column tile), GROUP_M row tiles at a time so that
    consecutive programs share weight tiles in L2."""
    pid = tl.program_id(0)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _expert_tile(offsets_ptr, pid_m, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert e, first sorted row, end of the expert's rows) of row tile pid_m; e == E
    past the last real tile. Tiles are numbered expert by expert, ⌈c_e/BLOCK_M⌉ each."""
    ee = tl.arange(0, BLOCK_E)
    ok = ee < E
    lo = tl.load(offsets_ptr + ee, mask=ok, other=0)
    hi = tl.load(offsets_ptr + ee + 1, mask=ok, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    before = ok & (tl.cumsum(tiles, axis=0) <= pid_m)     # experts whose tiles all end
    e = tl.sum(before.to(tl.int32), axis=0)               # at or before this one
    first_tile = tl.sum(tl.where(before, tiles, 0), axis=0)
    row0 = tl.load(offsets_ptr + e) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.load(offsets_ptr + tl.minimum(e + 1, E))
    return e, row0, row_end


@triton.jit
def _gate_up_acc(x_ptr, w_e_ptr, x_rows, rf, F, D, stride_xd, stride_wf, stride_wd,
                 BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr):
    """(x·W_gᵀ, x·W_uᵀ) fp32 tiles [BLOCK_M, BLOCK_F] for the gathered rows x_rows (int64
    element offsets of x's rows) and the gate/up rows rf (< F) of one expert's weight."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    FP32: tl.constexpr = DT == tl.float32
    rk = tl.arange(0, BLOCK_K)
    g_rows = w_e_ptr + rf.to(tl.int64)[None, :] * stride_wf        # [1, BLOCK_F]
    u_rows = w_e_ptr + (rf + F).to(tl.int64)[None, :] * stride_wf
    acc_g = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + rk
        k_ok = k < D
        a = tl.load(x_ptr + x_rows[:, None] + k[None, :] * stride_xd, mask=k_ok[None, :],
                    other=0.0)
        wk = k[:, None] * stride_wd
        wg = tl.load(g_rows + wk, mask=k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_F]
        wu = tl.load(u_rows + wk, mask=k_ok[:, None], other=0.0)
        acc_g = _mma(acc_g, a, _as_operand(wg, DT), FP32)
        acc_u = _mma(acc_u, a, _as_operand(wu, DT), FP32)
    return acc_g, acc_u


# ---------------------------------------------------------------------------------------
# gate_up: forward and backward
# ---------------------------------------------------------------------------------------

@triton.jit
def _moe_gate_up_kernel(
    x_ptr,               # [N, D] fp32/fp16/bf16, strides (stride_xn, stride_xd)
    order_ptr,           # [S] int32: the slot at each sorted position (S = N·K)
    offsets_ptr,         # [E + 1] int32: expert e's rows are [offsets[e], offsets[e+1])
    w_ptr,               # [E, 2F, D]: gate rows 0..F-1, up rows F..2F-1, strides
                         # (stride_we, stride_wf, stride_wd)
    h_ptr,               # [S, F] x's dtype, out, strides (stride_hm, stride_hf)
    E, F, D, topk, tiles_m,           # tiles_m: the static bound on row tiles
    stride_xn, stride_xd, stride_we, stride_wf, stride_wd, stride_hm, stride_hf,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # -- program -> (expert, sorted rows, columns); past the last real tile: nothing to do
    pid_m, pid_f = _program_tile(tiles_m, tl.cdiv(F, BLOCK_F), GROUP_M)
    e, row0, row_end = _expert_tile(offsets_ptr, pid_m, E, BLOCK_M, BLOCK_E)
    if e >= E:
        return
    p = row0 + tl.arange(0, BLOCK_M)
    rf = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    # -- gather: token row n = order[p] // K (rows and columns past the end are clamped
    #    for the loads, never stored)
    s = tl.load(order_ptr + tl.minimum(p, row_end - 1))
    x_rows = (s // topk).to(tl.int64) * stride_xn
    w_e_ptr = w_ptr + e.to(tl.int64) * stride_we
    # -- the gate and up GEMMs, two accumulators
    g, u = _gate_up_acc(x_ptr, w_e_ptr, x_rows, tl.minimum(rf, F - 1), F, D, stride_xd,
                        stride_wf, stride_wd, BLOCK_M, BLOCK_F, BLOCK_K)
    # -- SwiGLU epilogue, stored in x's dtype
    h = g * tl.sigmoid(g) * u
    out = h_ptr + p.to(tl.int64)[:, None] * stride_hm + rf[None, :] * stride_hf
    tl.store(out, downcast(h, h_ptr.dtype.element_ty),
             mask=(p < row_end)[:, None] & (rf < F)[None, :])


@triton.jit
def _moe_gate_up_bwd_kernel(
    dh_ptr,              # [S, F] x's dtype, strides (stride_dhm, stride_dhf)
    x_ptr,               # [N, D], strides (stride_xn, stride_xd)
    order_ptr,           # [S] int32
    offsets_ptr,         # [E + 1] int32
    w_ptr,               # [E, 2F, D], strides (stride_we, stride_wf, stride_wd)
    dgu_ptr,             # [S, 2F] x's dtype, out: [dg | du], strides (stride_gm, stride_gf)
    E, F, D, topk, tiles_m,
    stride_dhm, stride_dhf, stride_xn, stride_xd, stride_we, stride_wf, stride_wd,
    stride_gm, stride_gf,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # -- program -> (expert, sorted rows, columns), as in the forward
    pid_m, pid_f = _program_tile(tiles_m, tl.cdiv(F, BLOCK_F), GROUP_M)
    e, row0, row_end = _expert_tile(offsets_ptr, pid_m, E, BLOCK_M, BLOCK_E)
    if e >= E:
        return
    p = row0 + tl.arange(0, BLOCK_M)
    rf = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    s = tl.load(order_ptr + tl.minimum(p, row_end - 1))
    x_rows = (s // topk).to(tl.int64) * stride_xn
    w_e_ptr = w_ptr + e.to(tl.int64) * stride_we
    # -- recompute g and u (nothing saved from the forward but x)
    g, u = _gate_up_acc(x_ptr, w_e_ptr, x_rows, tl.minimum(rf, F - 1), F, D, stride_xd,
                        stride_wf, stride_wd, BLOCK_M, BLOCK_F, BLOCK_K)
    # -- SwiGLU gradient: silu'(g) = σ(g)·(1 + g·(1 − σ(g)))
    ok = (p < row_end)[:, None] & (rf < F)[None, :]
    p64 = p.to(tl.int64)[:, None]
    dh = tl.load(dh_ptr + p64 * stride_dhm + rf[None, :] * stride_dhf, mask=ok,
                 other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    du = dh * (g * sig)
    dg = dh * u * (sig * (1.0 + g * (1.0 - sig)))
    # -- store dg in columns 0..F-1, du in F..2F-1
    DT: tl.constexpr = dgu_ptr.dtype.element_ty
    out = dgu_ptr + p64 * stride_gm
    tl.store(out + rf[None, :] * stride_gf, downcast(dg, DT), mask=ok)
    tl.store(out + (rf + F)[None, :] * stride_gf, downcast(du, DT), mask=ok)


# ---------------------------------------------------------------------------------------
# plain grouped GEMM (down, its input gradient, and gate_up's per-slot input gradient)
# ---------------------------------------------------------------------------------------

@triton.jit
def _moe_grouped_gemm_kernel(
    a_ptr,               # [S, Q] rows in sorted order, strides (stride_am, stride_aq)
    b_ptr,               # [E, ...]: expert e's [Q, P] operand, element (q, c) at
                         # e·stride_be + q·stride_bq + c·stride_bp
    offsets_ptr,         # [E + 1] int32
    c_ptr,               # [S, P] out (any float dtype), strides (stride_cm, stride_cp)
    E, P, Q, tiles_m,
    stride_am, stride_aq, stride_be, stride_bq, stride_bp, stride_cm, stride_cp,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # -- program -> (expert, sorted rows, columns)
    pid_m, pid_n = _program_tile(tiles_m, tl.cdiv(P, BLOCK_N), GROUP_M)
    e, row0, row_end = _expert_tile(offsets_ptr, pid_m, E, BLOCK_M, BLOCK_E)
    if e >= E:
        return
    p = row0 + tl.arange(0, BLOCK_M)
    rc = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # -- offsets; rows and columns past the end are clamped for the loads, never stored
    a_rows = a_ptr + tl.minimum(p, row_end - 1).to(tl.int64)[:, None] * stride_am
    b_cols = (b_ptr + e.to(tl.int64) * stride_be
              + tl.minimum(rc, P - 1).to(tl.int64)[None, :] * stride_bp)
    DT: tl.constexpr = a_ptr.dtype.element_ty
    FP32: tl.constexpr = DT == tl.float32
    # -- K loop
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, Q, BLOCK_K):
        k = k0 + rk
        k_ok = k < Q
        a = tl.load(a_rows + k[None, :] * stride_aq, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_cols + k.to(tl.int64)[:, None] * stride_bq, mask=k_ok[:, None],
                    other=0.0)
        acc = _mma(acc, a, _as_operand(b, DT), FP32)
    # -- masked store in c's dtype
    out = c_ptr + p.to(tl.int64)[:, None] * stride_cm + rc[None, :] * stride_cp
    tl.store(out, downcast(acc, c_ptr.dtype.element_ty),
             mask=(p < row_end)[:, None] & (rc < P)[None, :])


# ---------------------------------------------------------------------------------------
# per-expert weight gradient
# ---------------------------------------------------------------------------------------

@triton.jit
def _moe_wgrad_kernel(
    a_ptr,               # [S, P] rows in sorted order (do, dgu), strides (stride_am, stride_ap)
    b_ptr,               # [S, Q] rows in sorted order (h), or [N, Q] token rows read through
                         # order (GATHER: x), strides (stride_bm, stride_bq)
    order_ptr,           # [S] int32 (GATHER; else never read)
    offsets_ptr,         # [E + 1] int32
    dw_ptr,              # [E, P, Q] out, strides (stride_we, stride_wp, stride_wq)
    P, Q, topk,
    stride_am, stride_ap, stride_bm, stride_bq, stride_we, stride_wp, stride_wq,
    GATHER: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # -- program -> (tile of dw[e], expert e) and the expert's rows
    tiles_q = tl.cdiv(Q, BLOCK_Q)
    pid = tl.program_id(0)
    e = tl.program_id(1)
    rp = (pid // tiles_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    rq = (pid % tiles_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    a_cols = a_ptr + tl.minimum(rp, P - 1)[None, :] * stride_ap
    b_cols = b_ptr + tl.minimum(rq, Q - 1)[None, :] * stride_bq
    rr = tl.arange(0, BLOCK_R)
    DT: tl.constexpr = a_ptr.dtype.element_ty
    FP32: tl.constexpr = DT == tl.float32
    # -- reduction over the expert's rows, ascending, BLOCK_R at a time
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_R):
        r = r0 + rr
        r_ok = r < hi
        a = tl.load(a_cols + r.to(tl.int64)[:, None] * stride_am, mask=r_ok[:, None],
                    other=0.0)                                     # [BLOCK_R, BLOCK_P]
        if GATHER:
            rows = tl.load(order_ptr + r, mask=r_ok, other=0) // topk
        else:
            rows = r
        b = tl.load(b_cols + rows.to(tl.int64)[:, None] * stride_bm, mask=r_ok[:, None],
                    other=0.0)                                     # [BLOCK_R, BLOCK_Q]
        acc = _mma(acc, tl.trans(a), b, FP32)
    # -- store dw[e] in dw's dtype (zeros for an expert without rows)
    out = (dw_ptr + e.to(tl.int64) * stride_we + rp.to(tl.int64)[:, None] * stride_wp
           + rq[None, :] * stride_wq)
    tl.store(out, downcast(acc, dw_ptr.dtype.element_ty),
             mask=(rp < P)[:, None] & (rq < Q)[None, :])


# ---------------------------------------------------------------------------------------
# ahead-of-time compile signatures (tests/ops/test_triton_compile.py)
# ---------------------------------------------------------------------------------------

def _ints(*names, kind="i32"):
    return {n: kind for n in names}


def _constexprs(*names):
    return {n: "constexpr" for n in names}


_TILES = ("BLOCK_E", "BLOCK_M", "BLOCK_F", "BLOCK_K", "GROUP_M")
_GATE_UP_CFG = {"BLOCK_E": 64, "BLOCK_M": 128, "BLOCK_F": 64, "BLOCK_K": 64, "GROUP_M": 8}
#: Signatures for compiling every Triton kernel here ahead of time (tests/ops): "*{dt}" is
#: the activation dtype under test; weights in the same dtype, and fp32 weights under 16-bit
#: activations for the kernels that round them in registers.
AOT_SIGNATURES = {
    "_moe_gate_up_kernel": (
        {"x_ptr": "*{dt}", "order_ptr": "*i32", "offsets_ptr": "*i32", "w_ptr": "*{dt}",
         "h_ptr": "*{dt}", **_ints("E", "F", "D", "topk", "tiles_m"),
         **_ints("stride_xn", "stride_xd", "stride_we", "stride_wf", "stride_wd",
                 "stride_hm", "stride_hf", kind="i64"),
         **_constexprs(*_TILES)},
        [_GATE_UP_CFG, {**_GATE_UP_CFG, "BLOCK_M": 64, "BLOCK_E": 8}]),
    "_moe_gate_up_bwd_kernel": (
        {"dh_ptr": "*{dt}", "x_ptr": "*{dt}", "order_ptr": "*i32", "offsets_ptr": "*i32",
         "w_ptr": "*fp32", "dgu_ptr": "*{dt}", **_ints("E", "F", "D", "topk", "tiles_m"),
         **_ints("stride_dhm", "stride_dhf", "stride_xn", "stride_xd", "stride_we",
                 "stride_wf", "stride_wd", "stride_gm", "stride_gf", kind="i64"),
         **_constexprs(*_TILES)},
        [_GATE_UP_CFG]),
    "_moe_grouped_gemm_kernel": (
        {"a_ptr": "*{dt}", "b_ptr": "*{dt}", "offsets_ptr": "*i32", "c_ptr": "*{dt}",
         **_ints("E", "P", "Q", "tiles_m"),
         **_ints("stride_am", "stride_aq", "stride_be", "stride_bq", "stride_bp",
                 "stride_cm", "stride_cp", kind="i64"),
         **_constexprs("BLOCK_E", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")},
        [{"BLOCK_E": 64, "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8},
         {"BLOCK_E": 256, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}]),
    "_moe_wgrad_kernel": (
        {"a_ptr": "*{dt}", "b_ptr": "*{dt}", "order_ptr": "*i32", "offsets_ptr": "*i32",
         "dw_ptr": "*fp32", **_ints("P", "Q", "topk"),
         **_ints("stride_am", "stride_ap", "stride_bm", "stride_bq", "stride_we",
                 "stride_wp", "stride_wq", kind="i64"),
         **_constexprs("GATHER", "BLOCK_P", "BLOCK_Q", "BLOCK_R")},
        [{"GATHER": True, "BLOCK_P": 128, "BLOCK_Q": 128, "BLOCK_R": 64},
         {"GATHER": False, "BLOCK_P": 64, "BLOCK_Q": 128, "BLOCK_R": 32}]),
}
