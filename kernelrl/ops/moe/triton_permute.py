"""MoE permutation in Triton: a stable counting sort of the N·K routing slots by expert.

Slot s = n·K + j holds experts[n, j]. The sort runs in three launches, none with atomics,
so the result is a pure function of ``experts``:

    1. histogram   one program per tile of BLOCK_S consecutive slots: the tile's count of
                   every expert, into a [T, E] table (T = ⌈N·K / BLOCK_S⌉ tiles)
    2. scan        one program: offsets[e] = Σ_{e' < e} total[e'] (offsets[E] = the number
                   of slots with a valid expert, N·K), and the table rewritten in place to
                   base[t, e] = offsets[e] + Σ_{t' < t} count[t', e], the first sorted
                   position of tile t's slots of expert e
    3. rank        one program per tile: for each slot, rank = the number of earlier slots
                   of the same tile with the same expert (a [BLOCK_S, BLOCK_S] comparison),
                   p = base[t, e] + rank; order[p] = s, position[s] = p

Sorted positions are then grouped by expert ascending and, within an expert, by slot
ascending (tiles ascending, then slots within a tile). Expert ids outside [0, E) are not
checked here (that would need a host sync; the launcher checks them under KERNELRL_DEBUG=1):
such a slot is counted nowhere, writes no order entry and gets position −1, so no store
goes out of bounds (the GEMMs cover rows below offsets[E] only, the combine kernels skip
position −1), but order then has unwritten entries past offsets[E] and the slot's
contribution is missing from y.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_experts(experts_ptr, t, S, K, stride_en, stride_ek, BLOCK_S: tl.constexpr):
    """(slots s, in range, expert id as int32) of tile t; −1 past the end."""
    s = t * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = s < S
    n = s // K
    e = tl.load(experts_ptr + n.to(tl.int64) * stride_en + (s - n * K) * stride_ek,
                mask=ok, other=-1).to(tl.int32)
    return s, ok, e


@triton.jit
def _moe_histogram_kernel(
    experts_ptr,         # [N, K] any integer dtype, strides (stride_en, stride_ek)
    counts_ptr,          # [T, E] int32, out: count of each expert in each tile
    S, K, E,             # S = N·K slots
    stride_en, stride_ek,
    BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # -- the tile's experts
    t = tl.program_id(0)
    s, ok, e = _tile_experts(experts_ptr, t, S, K, stride_en, stride_ek, BLOCK_S)
    # -- counts, BLOCK_E experts at a time (a one-hot [BLOCK_S, BLOCK_E] summed over slots)
    row = counts_ptr + t.to(tl.int64) * E
    for e0 in range(0, E, BLOCK_E):
        ee = e0 + tl.arange(0, BLOCK_E)
        count = tl.sum((e[:, None] == ee[None, :]).to(tl.int32), axis=0)
        tl.store(row + ee, count, mask=ee < E)


@triton.jit
def _moe_scan_kernel(
    counts_ptr,          # [T, E] int32: in, per-tile counts; out, per-tile bases
    offsets_ptr,         # [E + 1] int32, out
    T, E,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    carry = tl.full([], 0, tl.int32)          # slots of the experts before this chunk
    for e0 in range(0, E, BLOCK_E):
        ee = e0 + tl.arange(0, BLOCK_E)
        e_ok = ee < E
        # -- pass 1: each expert's total over the tiles
        total = tl.zeros([BLOCK_E], tl.int32)
        for t0 in range(0, T, BLOCK_T):
            tt = t0 + tl.arange(0, BLOCK_T)
            ok = (tt < T)[:, None] & e_ok[None, :]
            ptrs = counts_ptr + tt.to(tl.int64)[:, None] * E + ee[None, :]
            total += tl.sum(tl.load(ptrs, mask=ok, other=0), axis=0)
        # -- exclusive scan over experts: the expert's first sorted position
        first = carry + tl.cumsum(total, axis=0) - total
        tl.store(offsets_ptr + ee, first, mask=e_ok)
        # -- pass 2: base[t, e] = first[e] + the counts of the earlier tiles (in place:
        #    each block is read before it is written, by this one program)
        run = first
        for t0 in range(0, T, BLOCK_T):
            tt = t0 + tl.arange(0, BLOCK_T)
            ok = (tt < T)[:, None] & e_ok[None, :]
            ptrs = counts_ptr + tt.to(tl.int64)[:, None] * E + ee[None, :]
            c = tl.load(ptrs, mask=ok, other=0)
            tl.store(ptrs, run[None, :] + tl.cumsum(c, axis=0) - c, mask=ok)
            run += tl.sum(c, axis=0)
        carry += tl.sum(total, axis=0)
    tl.store(offsets_ptr + E, carry)


@triton.jit
def _moe_rank_kernel(
    experts_ptr,         # [N, K] any integer dtype, strides (stride_en, stride_ek)
    bases_ptr,           # [T, E] int32: first sorted position of each (tile, expert)
    order_ptr,           # [S] int32, out: order[p] = the slot at sorted position p
    position_ptr,        # [S] int32, out: position[s] = the sorted position of slot s
    S, K, E,
    stride_en, stride_ek,
    BLOCK_S: tl.constexpr,
):
    # -- the tile's experts
    t = tl.program_id(0)
    s, ok, e = _tile_experts(experts_ptr, t, S, K, stride_en, stride_ek, BLOCK_S)
    valid = ok & (e >= 0) & (e < E)
    # -- rank within the tile: earlier slots with the same expert (no atomics: a compare)
    i = tl.arange(0, BLOCK_S)
    earlier = (e[None, :] == e[:, None]) & (i[None, :] < i[:, None])
    rank = tl.sum(earlier.to(tl.int32), axis=1)
    # -- sorted position = the tile's base for that expert + rank; scatter both maps
    base = tl.load(bases_ptr + t.to(tl.int64) * E + e, mask=valid, other=0)
    p = tl.where(valid, base + rank, -1)
    tl.store(order_ptr + p, s, mask=valid)
    tl.store(position_ptr + s, p, mask=ok)


#: Signatures for compiling every Triton kernel here ahead of time (tests/ops); the routing
#: ids are int64 (torch.topk's indices) whatever the activation dtype under test.
AOT_SIGNATURES = {
    "_moe_histogram_kernel": (
        {"experts_ptr": "*i64", "counts_ptr": "*i32", "S": "i32", "K": "i32", "E": "i32",
         "stride_en": "i64", "stride_ek": "i64", "BLOCK_S": "constexpr",
         "BLOCK_E": "constexpr"},
        [{"BLOCK_S": 128, "BLOCK_E": 64}]),
    "_moe_scan_kernel": (
        {"counts_ptr": "*i32", "offsets_ptr": "*i32", "T": "i32", "E": "i32",
         "BLOCK_T": "constexpr", "BLOCK_E": "constexpr"},
        [{"BLOCK_T": 64, "BLOCK_E": 64}]),
    "_moe_rank_kernel": (
        {"experts_ptr": "*i64", "bases_ptr": "*i32", "order_ptr": "*i32",
         "position_ptr": "*i32", "S": "i32", "K": "i32", "E": "i32", "stride_en": "i64",
         "stride_ek": "i64", "BLOCK_S": "constexpr"},
        [{"BLOCK_S": 128}]),
}
