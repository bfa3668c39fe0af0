"""MoE expert FFN in Triton: the stage functions behind ``moe_ffn`` (issue 10).

Shape legend: N tokens, D hidden width, F expert FFN width, E experts, K top-k (K ≤ 8),
S = N·K routing slots; slot s = n·K + j. The stages, on the expert-sorted order:

    permute(experts, E)          -> order [S], offsets [E+1], position [S]     (int32)
    gate_up(x, order, offsets, w_gate_up, K) -> (h [S, F], None)  h[p] = silu(x W_gᵀ)·(x W_uᵀ)
    down(h, offsets, w_down)     -> o [S, D]                  o[p] = h[p]·W_down[e]ᵀ
    combine(o, position, weights) -> y [N, D]       y[n] = Σ_j weights[n, j]·o[position[s]]
    combine_backward(dy, o, position, weights) -> (do [S, D], dweights [N, K])
    down_backward(do, h, offsets, w_down)      -> (dh [S, F], dw_down [E, D, F])
    gate_up_backward(dh, None, x, order, position, offsets, w_gate_up, K)
                                               -> (dx [N, D], dw_gate_up [E, 2F, D])

The kernels: :mod:`.triton_permute` (histogram / scan / rank counting sort),
:mod:`.triton_gemm` (grouped GEMMs with an in-kernel tile search, and the per-expert
weight gradient), :mod:`.triton_combine` (ordered per-token sums). gate_up's input
gradient is computed per slot (dx_slot = dgu·W_gate_up[e], fp32 [S, D]) and then summed
over j ascending by the combine kernel, unweighted: a token's K slots go to different
experts, so they do not share a GEMM tile, and a per-slot buffer plus an ordered sum is
what keeps it free of atomics. dx_slot is fp32 so that the K-way sum adds fp32 values, as
a fused kernel would; it costs S·D·4 bytes for the duration of the call.

gate_up returns None in place of the gate and up products that the torch stages keep:
gate_up_backward recomputes g and u in its first GEMM, and takes None for them.

Determinism: no atomics, every reduction in a fixed order, and launch configurations that
are a pure function of the dtypes and shapes, never of timing or of the routing: an
autotuner could pick a different reduction blocking in another process and change the
bits. So two runs give bitwise-identical results on the same device and software.

dtypes: activations (x, h, o, dy, do, dh) fp32, fp16 or bf16, fp32 accumulation; outputs
in the activations' dtype (h, o, y, do, dh, dx), the weights' dtype (dw_*) and the routing
weights' dtype (dweights). Expert weights may be in another of those dtypes than the
activations (fp32 masters under 16-bit activations): they are rounded to the activations'
dtype in registers before each dot. Integers: order, offsets and position are int32, so
S < 2^31; element offsets are computed in int64.

No launcher syncs with the device: buffers and grids are sized from N·K and E alone.
Expert ids outside [0, E) are checked only under KERNELRL_DEBUG=1 (a host sync).
"""

from __future__ import annotations

import torch
import triton

from kernelrl import backend as _backend
from kernelrl.ops._checks import KERNEL_DTYPES, check_tensor, check_triton_device
from kernelrl.ops.moe.triton_combine import _moe_combine_bwd_kernel, _moe_combine_kernel
from kernelrl.ops.moe.triton_gemm import (_moe_gate_up_bwd_kernel, _moe_gate_up_kernel,
                                          _moe_grouped_gemm_kernel, _moe_wgrad_kernel)
from kernelrl.ops.moe.triton_permute import (_moe_histogram_kernel, _moe_rank_kernel,
                                             _moe_scan_kernel)

__all__ = ["permute", "gate_up", "down", "combine", "combine_backward", "down_backward",
           "gate_up_backward", "MAX_TOPK"]

#: Most routing slots per token (K is a constexpr of the combine kernels).
MAX_TOPK = 8
_MAX_SLOTS = 2 ** 31 - 1          # int32 sorted positions
_INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


# ---------------------------------------------------------------------------------------
# launch configuration (named so that a tuner can replace it; no device queries)
# ---------------------------------------------------------------------------------------

def _gemm_config(kind: str, dtype: torch.dtype, P: int, Q: int) -> dict:
    """Meta-parameters and launch options of the grouped GEMMs, by kind ("gate_up": P = F,
    Q = D; "grouped": output width P, reduction Q; "wgrad": dw[e] is [P, Q]), activation
    dtype and shape.

    A fixed function, not an autotuner: a config changes the reduction blocking and with
    it the bits (see the module docstring). GPU (H100/H200, untuned: no GPU has run these
    yet): 16-bit operands take 128-row tiles and 64-deep K steps on the tensor cores, 8
    warps and 3 stages; gate_up keeps two [128, 64] accumulators (gate and up), the size of
    one [128, 128] tile. fp32 ("ieee" FMA dots) takes smaller tiles. Per-expert row counts
    below 128 waste part of a tile; MoE training batches give each expert hundreds to
    thousands of rows. The interpreter pays per program, per loop step and per element of
    a block: blocks as big as the problem, up to 128.
    """
    if _backend.triton_interpret():
        p, q = (min(max(triton.next_power_of_2(v), 16), 128) for v in (P, Q))
        return {"gate_up": dict(BLOCK_M=64, BLOCK_F=min(p, 64), BLOCK_K=q, GROUP_M=8),
                "grouped": dict(BLOCK_M=64, BLOCK_N=p, BLOCK_K=q, GROUP_M=8),
                "wgrad": dict(BLOCK_P=p, BLOCK_Q=q, BLOCK_R=64)}[kind] | \
            dict(num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return {"gate_up": dict(BLOCK_M=64, BLOCK_F=32, BLOCK_K=32, GROUP_M=8),
                "grouped": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8),
                "wgrad": dict(BLOCK_P=64, BLOCK_Q=64, BLOCK_R=32)}[kind] | \
            dict(num_warps=4, num_stages=2)
    return {"gate_up": dict(BLOCK_M=128, BLOCK_F=64, BLOCK_K=64, GROUP_M=8),
            "grouped": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
            "wgrad": dict(BLOCK_P=128, BLOCK_Q=128, BLOCK_R=64)}[kind] | \
        dict(num_warps=8, num_stages=3)


def _permute_config(E: int) -> dict:
    """Tile sizes of the permutation. BLOCK_S slots per tile: the rank kernel compares a
    tile's slots pairwise ([BLOCK_S, BLOCK_S] int32, 128 registers a thread at 128 on 4
    warps); the [T, E] table is scanned by one program in [BLOCK_T, BLOCK_E] blocks."""
    block_e = min(max(triton.next_power_of_2(E), 16), 256 if _backend.triton_interpret() else 64)
    if _backend.triton_interpret():
        return dict(BLOCK_S=512, BLOCK_E=block_e, BLOCK_T=64)
    return dict(BLOCK_S=128, BLOCK_E=block_e, BLOCK_T=64)


def _combine_config(D: int) -> tuple[int, int, int]:
    """(BLOCK_N tokens, BLOCK_D columns, num_warps) of the combine kernels: gathers of
    rows of D, 16 tokens x 256 columns a program on a GPU (memory-bound: each o row is read
    once); whole rows under the interpreter."""
    if _backend.triton_interpret():
        return 64, min(max(triton.next_power_of_2(D), 16), 1024), 4
    return 16, 256, 4


def _block_e(E: int) -> int:
    """The grouped GEMMs' vector of experts for the in-kernel tile search (≥ 2 lanes)."""
    return max(triton.next_power_of_2(E), 2)


def _row_tiles(S: int, E: int, block_m: int) -> int:
    """Static bound on the grouped GEMMs' row tiles: Σ_e ⌈c_e/BLOCK_M⌉ over the at most
    min(E, S) experts with rows, Σ_e c_e = S."""
    return (S + min(E, S) * (block_m - 1)) // block_m


# ---------------------------------------------------------------------------------------
# checks (each error names the argument, what was expected and what was given)
# ---------------------------------------------------------------------------------------

def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the launchers allocate (the tests replace it to poison them)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")




def _float(name: str, t, shape: tuple, device: torch.device | None = None) -> torch.Tensor:
    """A float tensor of KERNEL_DTYPES with this shape (None entries: any size)."""
    check_tensor(name, t, dtypes=KERNEL_DTYPES, ndim=len(shape))
    if any(want is not None and got != want for got, want in zip(t.shape, shape)):
        expected = ", ".join("*" if want is None else str(want) for want in shape)
        raise ValueError(f"{name}: expected shape ({expected}), got {tuple(t.shape)}")
    check_triton_device(name, t, device)
    return t


def _index(name: str, t, length: int, device: torch.device) -> None:
    """A contiguous int32 vector of this length (order, offsets, position)."""
    check_tensor(name, t, dtypes=(torch.int32,), ndim=1)
    if t.shape[0] != length:
        raise ValueError(f"{name}: expected shape ({length},), got {tuple(t.shape)}")
    if t.stride(0) != 1 and length > 1:
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
    check_triton_device(name, t, device)


def _same_dtype(name: str, t: torch.Tensor, dtype: torch.dtype, other: str) -> None:
    if t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {_dt(dtype)} (that of {other}), "
                         f"got {_dt(t.dtype)}")


def _topk(k, name: str = "k") -> int:
    """K, checked; ``name`` is the argument it comes from (k, or a tensor's K columns)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"{name}: expected a Python int, got {type(k).__name__}")
    if not 1 <= k <= MAX_TOPK:
        raise ValueError(f"{name}: expected 1 <= K <= {MAX_TOPK}, got {k}")
    return k


def _slots(name: str, N: int, K: int) -> int:
    if N * K > _MAX_SLOTS:
        raise ValueError(f"{name}: expected at most {_MAX_SLOTS} routing slots N·K (int32 "
                         f"positions), got {N}·{K} = {N * K}")
    return N * K


def _gate_up_weight(w, E: int | None, D: int, device) -> tuple[int, int]:
    """(E, F) of w_gate_up [E, 2F, D]."""
    _float("w_gate_up", w, (E, None, D), device)
    if w.shape[1] % 2:
        raise ValueError(f"w_gate_up: expected an even row count 2F (gate rows, then up "
                         f"rows), got shape {tuple(w.shape)}")
    return w.shape[0], w.shape[1] // 2


def _offsets(offsets, E_or_none, device) -> int:
    check_tensor("offsets", offsets, dtypes=(torch.int32,), ndim=1)
    E = offsets.shape[0] - 1 if E_or_none is None else E_or_none
    if E < 1:
        raise ValueError(f"offsets: expected E + 1 >= 2 entries, got shape "
                         f"{tuple(offsets.shape)}")
    _index("offsets", offsets, E + 1, device)
    return E


# ---------------------------------------------------------------------------------------
# launchers: check, allocate, launch
# ---------------------------------------------------------------------------------------

def permute(experts: torch.Tensor, num_experts: int):
    """(order, offsets, position) of the stable counting sort of the slots by expert:
    experts [N, K] any integer dtype and strides, 1 <= K <= 8, ids in [0, num_experts)."""
    check_tensor("experts", experts, dtypes=_INDEX_DTYPES, ndim=2)
    check_triton_device("experts", experts)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts: expected a Python int >= 1, got {num_experts!r}")
    N, K = experts.shape
    _topk(K, "experts (columns K)")
    S, E, device = _slots("experts", N, K), num_experts, experts.device
    if _backend.debug_enabled() and S:
        bad = (experts < 0) | (experts >= E)
        if bool(bad.any().item()):  # host sync: debug mode only
            raise ValueError(f"experts: expected ids in [0, {E}), got "
                             f"{experts[bad][0].item()}")  # host sync: debug mode only
    cfg = _permute_config(E)
    T = triton.cdiv(S, cfg["BLOCK_S"])
    order = _empty(S, dtype=torch.int32, device=device)
    position = _empty(S, dtype=torch.int32, device=device)
    offsets = _empty(E + 1, dtype=torch.int32, device=device)
    table = _empty(max(T, 1), E, dtype=torch.int32, device=device)   # counts, then bases
    strides = (experts.stride(0), experts.stride(1))
    if T:
        _moe_histogram_kernel[(T,)](experts, table, S, K, E, *strides,
                                    BLOCK_S=cfg["BLOCK_S"], BLOCK_E=cfg["BLOCK_E"])
    _moe_scan_kernel[(1,)](table, offsets, T, E, BLOCK_T=cfg["BLOCK_T"],
                           BLOCK_E=cfg["BLOCK_E"])
    if T:
        _moe_rank_kernel[(T,)](experts, table, order, position, S, K, E, *strides,
                               BLOCK_S=cfg["BLOCK_S"])
    return order, offsets, position


def gate_up(x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
            w_gate_up: torch.Tensor, k: int) -> tuple[torch.Tensor, None]:
    """(h [N·K, F] in x's dtype, None): h[p] = silu(x[n]·W_g[e]ᵀ)·(x[n]·W_u[e]ᵀ),
    n = order[p] // K. x [N, D], w_gate_up [E, 2F, D] (gate rows first), any strides. The
    None: nothing kept for the backward, which recomputes g and u."""
    _float("x", x, (None, None))
    K, (N, D), device = _topk(k), x.shape, x.device
    E, F = _gate_up_weight(w_gate_up, None, D, device)
    S = _slots("x", N, K)
    _index("order", order, S, device)
    _offsets(offsets, E, device)
    h = _empty(S, F, dtype=x.dtype, device=device)
    if S == 0 or F == 0:
        return h, None
    cfg = _gemm_config("gate_up", x.dtype, F, D)
    tiles_m = _row_tiles(S, E, cfg["BLOCK_M"])
    grid = (tiles_m * triton.cdiv(F, cfg["BLOCK_F"]),)
    _moe_gate_up_kernel[grid](
        x, order, offsets, w_gate_up, h, E, F, D, K, tiles_m,
        x.stride(0), x.stride(1), *w_gate_up.stride(), h.stride(0), h.stride(1),
        BLOCK_E=_block_e(E), **cfg)
    return h, None


def _grouped_gemm(a, w, offsets, E, P, Q, stride_bq, stride_bp, out_dtype):
    """c [S, P] = a[p]·B[e] with B[e] (q, c) at e·w.stride(0) + q·stride_bq + c·stride_bp."""
    S = a.shape[0]
    c = _empty(S, P, dtype=out_dtype, device=a.device)
    if S == 0 or P == 0:
        return c
    cfg = _gemm_config("grouped", a.dtype, P, Q)
    tiles_m = _row_tiles(S, E, cfg["BLOCK_M"])
    grid = (tiles_m * triton.cdiv(P, cfg["BLOCK_N"]),)
    _moe_grouped_gemm_kernel[grid](
        a, w, offsets, c, E, P, Q, tiles_m, a.stride(0), a.stride(1), w.stride(0),
        stride_bq, stride_bp, c.stride(0), c.stride(1),
        BLOCK_E=_block_e(E), **cfg)
    return c


def _wgrad(a, b, order, offsets, E, topk, w_dtype, gather: bool):
    """dw [E, P, Q] = Σ_{p in e} a[p]ᵀ·b[row(p)] in w_dtype."""
    P, Q = a.shape[1], b.shape[1]
    dw = _empty(E, P, Q, dtype=w_dtype, device=a.device)
    if P == 0 or Q == 0:
        return dw
    cfg = _gemm_config("wgrad", a.dtype, P, Q)
    grid = (triton.cdiv(P, cfg["BLOCK_P"]) * triton.cdiv(Q, cfg["BLOCK_Q"]), E)
    _moe_wgrad_kernel[grid](
        a, b, order, offsets, dw, P, Q, topk, a.stride(0), a.stride(1), b.stride(0),
        b.stride(1), *dw.stride(), GATHER=gather, **cfg)
    return dw


def down(h: torch.Tensor, offsets: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """o [S, D] in h's dtype: o[p] = h[p]·W_down[e]ᵀ; h [S, F], w_down [E, D, F]."""
    _float("h", h, (None, None))
    F, device = h.shape[1], h.device
    _float("w_down", w_down, (None, None, F), device)
    E, D = w_down.shape[0], w_down.shape[1]
    _offsets(offsets, E, device)
    return _grouped_gemm(h, w_down, offsets, E, D, F, w_down.stride(2), w_down.stride(1),
                         h.dtype)


def combine(o: torch.Tensor, position: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y [N, D] in o's dtype: y[n] = Σ_{j ascending} weights[n, j]·o[position[n·K + j]];
    o [N·K, D], weights [N, K] (any float dtype of the kernels)."""
    _float("weights", weights, (None, None))
    (N, K), device = weights.shape, weights.device
    _topk(K, "weights (columns K)")
    S = _slots("weights", N, K)
    _float("o", o, (S, None), device)
    _index("position", position, S, device)
    D = o.shape[1]
    return _combine(o, position, weights, N, K, D, o.dtype, weighted=True)


def _combine(o, position, weights, N, K, D, out_dtype, weighted: bool):
    y = _empty(N, D, dtype=out_dtype, device=o.device)
    if N == 0 or D == 0:
        return y
    block_n, block_d, warps = _combine_config(D)
    w = weights if weighted else o
    _moe_combine_kernel[(triton.cdiv(N, block_n), triton.cdiv(D, block_d))](
        o, position, w, y, N, D, o.stride(0), o.stride(1),
        w.stride(0) if weighted else 0, w.stride(1) if weighted else 0,
        y.stride(0), y.stride(1), K=K, WEIGHTED=weighted, BLOCK_N=block_n,
        BLOCK_D=block_d, num_warps=warps)
    return y


def combine_backward(dy: torch.Tensor, o: torch.Tensor, position: torch.Tensor,
                     weights: torch.Tensor):
    """(do [S, D] in o's dtype, dweights [N, K] in weights' dtype):
    do[position[n·K + j]] = weights[n, j]·dy[n], dweights[n, j] = <dy[n], o[position[·]]>."""
    _float("weights", weights, (None, None))
    (N, K), device = weights.shape, weights.device
    _topk(K, "weights (columns K)")
    S = _slots("weights", N, K)
    _float("o", o, (S, None), device)
    D = o.shape[1]
    _float("dy", dy, (N, D), device)
    _index("position", position, S, device)
    do = _empty(S, D, dtype=o.dtype, device=device)
    dweights = _empty(N, K, dtype=weights.dtype, device=device)
    if N == 0:
        return do, dweights
    block_n, block_d, warps = _combine_config(D)
    _moe_combine_bwd_kernel[(triton.cdiv(N, block_n),)](
        dy, o, position, weights, do, dweights, N, D, dy.stride(0), dy.stride(1),
        o.stride(0), o.stride(1), weights.stride(0), weights.stride(1), do.stride(0),
        do.stride(1), dweights.stride(0), dweights.stride(1), K=K, BLOCK_N=block_n,
        BLOCK_D=block_d, BLOCK_J=triton.next_power_of_2(K), num_warps=warps)
    return do, dweights


def down_backward(do: torch.Tensor, h: torch.Tensor, offsets: torch.Tensor,
                  w_down: torch.Tensor):
    """(dh [S, F] in do's dtype, dw_down [E, D, F] in w_down's dtype): dh[p] = do[p]·W_down[e],
    dw_down[e] = Σ_{p in e} do[p]ᵀ·h[p] (rows ascending)."""
    _float("do", do, (None, None))
    (S, D), device = do.shape, do.device
    _float("h", h, (S, None), device)
    _same_dtype("h", h, do.dtype, "do")
    F = h.shape[1]
    _float("w_down", w_down, (None, D, F), device)
    E = w_down.shape[0]
    _offsets(offsets, E, device)
    dh = _grouped_gemm(do, w_down, offsets, E, F, D, w_down.stride(1), w_down.stride(2),
                       do.dtype)
    dw_down = _wgrad(do, h, offsets, offsets, E, 1, w_down.dtype, gather=False)
    return dh, dw_down


def gate_up_backward(dh: torch.Tensor, gu: None, x: torch.Tensor, order: torch.Tensor,
                     position: torch.Tensor, offsets: torch.Tensor, w_gate_up: torch.Tensor,
                     k: int):
    """(dx [N, D] in x's dtype, dw_gate_up [E, 2F, D] in w_gate_up's dtype), with g, u
    recomputed from x (``gu`` must be None, what :func:`gate_up` returned):
    dgu = [dh·u·silu'(g) | dh·silu(g)] [S, 2F] in x's dtype,
    dx[n] = Σ_{j ascending} dgu[position[n·K + j]]·W_gate_up[e_j] (per-slot fp32 rows,
    then the ordered sum), dw_gate_up[e] = Σ_{p in e} dgu[p]ᵀ·x[n(p)] (rows ascending)."""
    if gu is not None:
        raise ValueError("moe gate_up_backward (triton): gu: expected None (g and u are "
                         f"recomputed), got {type(gu).__name__}")
    _float("x", x, (None, None))
    K, (N, D), device = _topk(k), x.shape, x.device
    E, F = _gate_up_weight(w_gate_up, None, D, device)
    S = _slots("x", N, K)
    _float("dh", dh, (S, F), device)
    _index("order", order, S, device)
    _index("position", position, S, device)
    _offsets(offsets, E, device)
    # -- dgu from the recomputed gate and up
    dgu = _empty(S, 2 * F, dtype=x.dtype, device=device)
    if S and F:
        cfg = _gemm_config("gate_up", x.dtype, F, D)
        tiles_m = _row_tiles(S, E, cfg["BLOCK_M"])
        grid = (tiles_m * triton.cdiv(F, cfg["BLOCK_F"]),)
        _moe_gate_up_bwd_kernel[grid](
            dh, x, order, offsets, w_gate_up, dgu, E, F, D, K, tiles_m,
            dh.stride(0), dh.stride(1), x.stride(0), x.stride(1), *w_gate_up.stride(),
            dgu.stride(0), dgu.stride(1), BLOCK_E=_block_e(E), **cfg)
    # -- dx: per-slot rows dgu·W_gate_up[e] (fp32), then the ordered sum over j
    dx_slot = _grouped_gemm(dgu, w_gate_up, offsets, E, D, 2 * F, w_gate_up.stride(1),
                            w_gate_up.stride(2), torch.float32)
    dx = _combine(dx_slot, position, dx_slot, N, K, D, x.dtype, weighted=False)
    # -- dw_gate_up[e] = dguᵀ·x over the expert's rows, x gathered through order
    dw_gate_up = _wgrad(dgu, x, order, offsets, E, K, w_gate_up.dtype, gather=True)
    return dx, dw_gate_up
