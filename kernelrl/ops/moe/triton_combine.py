"""MoE combine in Triton: the per-token ordered sums over the K routing slots.

    forward   y[n] = Σ_{j=0..K-1} weights[n, j]·o[position[n·K + j]]      (WEIGHTED)
              dx[n] = Σ_{j=0..K-1} dx_slot[position[n·K + j]]             (not WEIGHTED:
              gate_up's input gradient from its per-slot rows)
    backward  do[position[n·K + j]] = weights[n, j]·dy[n]
              dweights[n, j] = <dy[n], o[position[n·K + j]]>

Every sum runs in fp32 over j ascending (and, for dweights, over D in BLOCK_D steps, each
reduced in a fixed tree), so results do not depend on the routing's row layout or on
timing: no atomics. K (≤ 8) is a constexpr, so the loop over j unrolls. A slot with
position −1 (an expert id outside [0, E), see the permutation) is skipped: it adds
nothing, and no row is read or written for it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernelrl.ops._triton_utils import downcast


@triton.jit
def _moe_combine_kernel(
    o_ptr,               # [S, D] rows in sorted order (S = N·K), strides (stride_om, stride_od)
    position_ptr,        # [S] int32: the sorted position of each slot
    weights_ptr,         # [N, K] (WEIGHTED; else never read), strides (stride_wn, stride_wk)
    y_ptr,               # [N, D] out, strides (stride_yn, stride_yd)
    N, D,
    stride_om, stride_od, stride_wn, stride_wk, stride_yn, stride_yd,
    K: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # -- program -> (tokens, columns)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_ok = n < N
    ok = n_ok[:, None] & (d < D)[None, :]
    n64 = n.to(tl.int64)
    # -- Σ over the slots, j ascending, fp32
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(K):
        p = tl.load(position_ptr + n64 * K + j, mask=n_ok, other=-1)
        row = tl.load(o_ptr + p.to(tl.int64)[:, None] * stride_om + d[None, :] * stride_od,
                      mask=ok & (p >= 0)[:, None], other=0.0).to(tl.float32)
        if WEIGHTED:
            w = tl.load(weights_ptr + n64 * stride_wn + j * stride_wk, mask=n_ok,
                        other=0.0).to(tl.float32)
            row = w[:, None] * row
        acc += row
    # -- store in y's dtype
    tl.store(y_ptr + n64[:, None] * stride_yn + d[None, :] * stride_yd,
             downcast(acc, y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _moe_combine_bwd_kernel(
    dy_ptr,              # [N, D], strides (stride_dyn, stride_dyd)
    o_ptr,               # [S, D] rows in sorted order, strides (stride_om, stride_od)
    position_ptr,        # [S] int32
    weights_ptr,         # [N, K], strides (stride_wn, stride_wk)
    do_ptr,              # [S, D] o's dtype, out, strides (stride_dom, stride_dod)
    dweights_ptr,        # [N, K] weights' dtype, out, strides (stride_dwn, stride_dwk)
    N, D,
    stride_dyn, stride_dyd, stride_om, stride_od, stride_wn, stride_wk,
    stride_dom, stride_dod, stride_dwn, stride_dwk,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
):
    # -- program -> tokens; each token's K positions and weights, loaded once
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    n64 = n.to(tl.int64)
    jj = tl.arange(0, BLOCK_J)
    # -- loop over D: do for every slot, and the slot's partial dot products
    acc = tl.zeros((BLOCK_N, BLOCK_J), dtype=tl.float32)      # dweights, column j
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        ok = n_ok[:, None] & (d < D)[None, :]
        dy = tl.load(dy_ptr + n64[:, None] * stride_dyn + d[None, :] * stride_dyd, mask=ok,
                     other=0.0).to(tl.float32)
        for j in tl.static_range(K):
            p = tl.load(position_ptr + n64 * K + j, mask=n_ok, other=-1).to(tl.int64)
            w = tl.load(weights_ptr + n64 * stride_wn + j * stride_wk, mask=n_ok,
                        other=0.0).to(tl.float32)
            slot_ok = ok & (p >= 0)[:, None]
            o = tl.load(o_ptr + p[:, None] * stride_om + d[None, :] * stride_od,
                        mask=slot_ok, other=0.0).to(tl.float32)
            tl.store(do_ptr + p[:, None] * stride_dom + d[None, :] * stride_dod,
                     downcast(w[:, None] * dy, do_ptr.dtype.element_ty), mask=slot_ok)
            acc += tl.where(jj[None, :] == j, tl.sum(dy * o, axis=1)[:, None], 0.0)
    # -- store dweights in weights' dtype
    tl.store(dweights_ptr + n64[:, None] * stride_dwn + jj[None, :] * stride_dwk,
             downcast(acc, dweights_ptr.dtype.element_ty),
             mask=n_ok[:, None] & (jj < K)[None, :])


#: Signatures for compiling every Triton kernel here ahead of time (tests/ops): "*{dt}" is
#: the activation dtype under test; routing weights in fp32.
AOT_SIGNATURES = {
    "_moe_combine_kernel": (
        {"o_ptr": "*{dt}", "position_ptr": "*i32", "weights_ptr": "*fp32", "y_ptr": "*{dt}",
         "N": "i32", "D": "i32",
         **{n: "i64" for n in ("stride_om", "stride_od", "stride_wn", "stride_wk",
                               "stride_yn", "stride_yd")},
         **{n: "constexpr" for n in ("K", "WEIGHTED", "BLOCK_N", "BLOCK_D")}},
        [{"K": 2, "WEIGHTED": True, "BLOCK_N": 16, "BLOCK_D": 256},
         {"K": 8, "WEIGHTED": False, "BLOCK_N": 16, "BLOCK_D": 256}]),
    "_moe_combine_bwd_kernel": (
        {"dy_ptr": "*{dt}", "o_ptr": "*{dt}", "position_ptr": "*i32", "weights_ptr": "*fp32",
         "do_ptr": "*{dt}", "dweights_ptr": "*fp32", "N": "i32", "D": "i32",
         **{n: "i64" for n in ("stride_dyn", "stride_dyd", "stride_om", "stride_od",
                               "stride_wn", "stride_wk", "stride_dom", "stride_dod",
                               "stride_dwn", "stride_dwk")},
         **{n: "constexpr" for n in ("K", "BLOCK_N", "BLOCK_D", "BLOCK_J")}},
        [{"K": 2, "BLOCK_N": 16, "BLOCK_D": 256, "BLOCK_J": 2},
         {"K": 8, "BLOCK_N": 16, "BLOCK_D": 256, "BLOCK_J": 8}]),
}
