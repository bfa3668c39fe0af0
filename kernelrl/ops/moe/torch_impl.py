"""moe_ffn in torch: the float64 reference (the tests' oracle) and the torch stage functions
of the kernel contract (see the package docstring for the stages and their buffers).

The stages are the CPU path (and the fallback anywhere): ``gate_up``, ``down`` and their
backward loop over the experts, reading ``offsets`` to the host, and run each expert's rows
as one matmul. On a GPU the stages are Triton grouped GEMMs (``triton_impl``), which read
``offsets`` on the device and never wait on the host.

Precision: each expert's GEMMs run in the input dtype (torch's bfloat16 GEMM accumulates in
float32 and rounds the product once, as transformers' eager loop and grouped_mm path do; a
float32 upcast would cost 2.8x the time and a copy of every expert's weights per call), but
float16 on a CPU, whose GEMMs run upcast to float32 (faster there). The SwiGLU, its
derivative and the sums over a token's K slots are float32 (float64 for float64 inputs),
and each stage output is rounded once to its input's dtype: h, o, do, dh and dx in x's
dtype, the weight gradients in the weights' dtype, dweights in ``weights``' dtype. The
Triton stages keep g, u, dgu and each slot's dx in float32 where these round them to the
GEMM dtype (as transformers' eager path does); both stay within the tests' bound of twice
eager torch's error.
"""

from __future__ import annotations

import torch

__all__ = ["moe_ffn_reference", "permute", "gate_up", "down", "combine", "combine_backward",
           "down_backward", "gate_up_backward"]


def moe_ffn_reference(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                      w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """y[n] = Σ_j weights[n, j] · down_e(silu(gate_e(x[n])) · up_e(x[n])), e = experts[n, j],
    written per (token, choice) with each choice's expert weights gathered, in x's dtype
    (weights cast to it). Differentiable by autograd; for small shapes (it materializes
    [N, K, 2F, D])."""
    F = w_down.shape[2]
    dt = x.dtype
    idx = experts.long()
    gu = torch.einsum("nd,nkfd->nkf", x, w_gate_up[idx].to(dt))        # [N, K, 2F]
    g, u = gu[..., :F], gu[..., F:]
    h = g * torch.sigmoid(g) * u                                        # silu(g)·u
    o = torch.einsum("nkf,nkdf->nkd", h, w_down[idx].to(dt))           # [N, K, D]
    return torch.einsum("nk,nkd->nd", weights.to(dt), o)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The elementwise and summation dtype: float32, or float64 for float64 tensors."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mm(t: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs of ``t``'s expert rows run in: ``t``'s own (torch's 16-bit GEMMs
    accumulate in float32 and round the product once), except float16 on a CPU, where
    torch's float16 GEMM is about 2.5x slower than upcasting to float32."""
    if t.dtype == torch.float16 and t.device.type == "cpu":
        return torch.float32
    return t.dtype


def _ranges(offsets: torch.Tensor):
    """(e, lo, hi) for every expert with rows, from offsets read to the host (this is the
    CPU/torch path; the Triton stages read offsets on the device)."""
    bounds = offsets.tolist()      # host sync on purpose: the CPU path's per-expert loop
    return [(e, lo, hi) for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])) if hi > lo]


def permute(experts: torch.Tensor, num_experts: int):
    """(order, offsets, position), int32 each, by a stable sort of the flattened expert ids:
    slots grouped by expert ascending, by slot index within an expert."""
    flat = experts.reshape(-1).long()
    sorted_ids, order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts + 1, device=flat.device, dtype=torch.long)
    offsets = torch.searchsorted(sorted_ids, bounds)                    # first p with id >= e
    position = torch.empty_like(order).scatter_(0, order, torch.arange(
        flat.numel(), device=flat.device, dtype=order.dtype))
    return order.int(), offsets.int(), position.int()


def _sorted_rows(x: torch.Tensor, order: torch.Tensor, k: int, mm: torch.dtype):
    """x's row for every sorted position, [N·K, D] in the GEMM dtype ``mm``."""
    return x.index_select(0, order.long() // k).to(mm)


def _grouped_mm_here(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM serves these operands: bfloat16 on a CPU, where
    ``torch.nn.functional.grouped_mm`` (torch >= 2.9) runs the per-expert products in C++
    (bitwise the same as one torch.mm per expert, 7-18% faster with 64 small experts)."""
    if not (a.device.type == "cpu" and a.dtype == b.dtype == torch.bfloat16 and a.numel() > 0
            and hasattr(torch.nn.functional, "grouped_mm")):
        return False
    # its layout rule, which other shapes (D or F not a multiple of 8, or 1) leave to the
    # loop: 16-byte aligned operands whose last two dims are > 1, one of them of stride 1,
    # every other stride a multiple of 16 bytes
    def fits(t: torch.Tensor) -> bool:
        inner = sorted(t.stride()[-2:])
        return (t.data_ptr() % 16 == 0 and min(t.shape[-2:]) > 1 and inner[0] == 1
                and all(st * 2 % 16 == 0 for st in (inner[1], *t.stride()[:-2])))
    return fits(a) and fits(b)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mm: torch.dtype) -> None:
    """out = a·b in the GEMM dtype ``mm``: written in place when every operand is in it,
    else computed in ``mm`` and rounded into ``out``."""
    if out.dtype == mm and a.dtype == mm and b.dtype == mm:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a.to(mm) @ b.to(mm))


def _per_expert(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, mm: torch.dtype,
                out_dtype: torch.dtype) -> torch.Tensor:
    """[N·K, Q]: row p of expert e's range is a[p]·b[e] (a [N·K, P], b [E, P, Q], any
    strides), in the GEMM dtype ``mm``, rounded to ``out_dtype``."""
    if _grouped_mm_here(a, b) and out_dtype == a.dtype:
        return torch.nn.functional.grouped_mm(a, b, offs=offsets[1:])
    out = torch.empty(a.shape[0], b.shape[2], dtype=out_dtype, device=a.device)
    for e, lo, hi in _ranges(offsets):
        _mm_into(out[lo:hi], a[lo:hi], b[e], mm)
    return out


def _per_expert_sum(a: torch.Tensor, c: torch.Tensor, offsets: torch.Tensor, mm: torch.dtype,
                    like: torch.Tensor) -> torch.Tensor:
    """[E, P, Q] in ``like``'s dtype: Σ_{p in e} a[p]ᵀ·c[p] for each expert e (a [N·K, P],
    c [N·K, Q]; 0 for an expert without rows), in the GEMM dtype ``mm``."""
    if _grouped_mm_here(a, c) and like.dtype == a.dtype:
        return torch.nn.functional.grouped_mm(a.t(), c, offs=offsets[1:])
    out = torch.empty_like(like)
    ranges = _ranges(offsets)
    hit = {e for e, _, _ in ranges}
    for e in range(out.shape[0]):
        if e not in hit:
            out[e].zero_()
    for e, lo, hi in ranges:
        _mm_into(out[e], a[lo:hi].t(), c[lo:hi], mm)
    return out


#: Rows of the elementwise SwiGLU stages per step: about 2^18 values, so that their float32
#: temporaries stay in cache (2.5x faster than one pass over [N·K, F] at Mixtral's shape).
_CHUNK_VALUES = 1 << 18


def _row_chunks(rows: int, width: int):
    """Row slices covering [0, rows), each about ``_CHUNK_VALUES`` values of ``width``."""
    step = max(1, _CHUNK_VALUES // max(width, 1))
    return [slice(lo, min(lo + step, rows)) for lo in range(0, rows, step)]


def gate_up(x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
            w_gate_up: torch.Tensor, k: int):
    """(h [N·K, F], gu [N·K, 2F]) in x's dtype: gu[p] = x[n]·W_gu[e]ᵀ (gate then up) and
    h[p] = silu(g[p])·u[p], n = order[p] // k. gu is kept for the backward, which then
    does not redo this GEMM (on a CPU the recompute cost 15% of a fwd+bwd at Mixtral's
    shape; keeping gu costs 2F values a slot, the eager autograd path keeps more)."""
    NK, F = order.numel(), w_gate_up.shape[1] // 2
    acc, mm = _acc(x.dtype), _mm(x)
    rows = _sorted_rows(x, order, k, mm)
    gu = _per_expert(rows, w_gate_up.transpose(1, 2), offsets, mm, x.dtype)
    h = torch.empty(NK, F, dtype=x.dtype, device=x.device)
    for c in _row_chunks(NK, F):
        g = gu[c, :F].to(acc)
        h[c] = torch.nn.functional.silu(g).mul_(gu[c, F:].to(acc))
    return h, gu


def down(h: torch.Tensor, offsets: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """o [N·K, D]: o[p] = h[p]·w_down[e]ᵀ."""
    return _per_expert(h, w_down.transpose(1, 2), offsets, _mm(h), h.dtype)


def _slot_sum(rows: torch.Tensor, position: torch.Tensor, N: int, K: int,
              scale: torch.Tensor | None = None) -> torch.Tensor:
    """[N, D] in float32 (float64 for float64 rows): Σ_{j ascending} s_j·rows[position[n·K +
    j]], s_j = scale[:, j] (or 1), one [N, D] gather at a time (no [N·K, D] float32 copy)."""
    acc = _acc(rows.dtype)
    pos = position.view(N, K).long()
    total = None
    for j in range(K):
        term = rows.index_select(0, pos[:, j]).to(acc)        # a fresh tensor: in place ok
        if scale is not None:
            term.mul_(scale[:, j, None])
        total = term if total is None else total.add_(term)
    return total


def combine(o: torch.Tensor, position: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y [N, D]: y[n] = Σ_{j ascending} weights[n, j] · o[position[n·K + j]], summed in
    float32 (float64 for float64 o), in o's dtype."""
    N, K = weights.shape
    return _slot_sum(o, position, N, K, weights.to(_acc(o.dtype))).to(o.dtype)


def combine_backward(dy: torch.Tensor, o: torch.Tensor, position: torch.Tensor,
                     weights: torch.Tensor):
    """(do [N·K, D] in o's dtype, dweights [N, K] in weights' dtype), p = position[n·K + j]:
    do[p] = weights[n, j]·dy[n]; dweights[n, j] = <dy[n], o[p]>."""
    N, K = weights.shape
    acc = _acc(o.dtype)
    pos = position.view(N, K).long()
    dyf, w = dy.to(acc), weights.to(acc)
    do = torch.empty_like(o)
    dweights = torch.empty(N, K, dtype=acc, device=o.device)
    for j in range(K):
        do.index_copy_(0, pos[:, j], (dyf * w[:, j, None]).to(o.dtype))
        dweights[:, j] = (o.index_select(0, pos[:, j]).to(acc) * dyf).sum(-1)
    return do, dweights.to(weights.dtype)


def down_backward(do: torch.Tensor, h: torch.Tensor, offsets: torch.Tensor,
                  w_down: torch.Tensor):
    """(dh [N·K, F] in h's dtype, dw_down [E, D, F] in w_down's dtype):
    dh[p] = do[p]·w_down[e]; dw_down[e] = Σ_{p in e} do[p]ᵀ·h[p] (0 for an expert without
    rows)."""
    mm = _mm(h)
    dh = _per_expert(do, w_down, offsets, mm, h.dtype)
    return dh, _per_expert_sum(do, h, offsets, mm, w_down)


def gate_up_backward(dh: torch.Tensor, gu: torch.Tensor, x: torch.Tensor,
                     order: torch.Tensor, position: torch.Tensor, offsets: torch.Tensor,
                     w_gate_up: torch.Tensor, k: int):
    """(dx [N, D] in x's dtype, dw_gate_up [E, 2F, D] in w_gate_up's dtype), from the gu
    that :func:`gate_up` returned: dgu[p] = [dh·u·silu'(g), dh·silu(g)] (rounded to the
    GEMM dtype); dw_gate_up[e] = Σ_{p in e} dgu[p]ᵀ·x[n(p)] (0 for an expert without rows);
    dx[n] = Σ_{j ascending} dgu[position[n·K + j]]·w_gate_up[e_j], each term rounded to
    the GEMM dtype, then summed over j in float32."""
    if gu is None:
        raise ValueError("moe gate_up_backward (torch stages): gu: expected the [N·K, 2F] "
                         "products that gate_up returned, got None")
    N, D = x.shape
    F = w_gate_up.shape[1] // 2
    acc, mm = _acc(x.dtype), _mm(x)
    rows = _sorted_rows(x, order, k, mm)
    dgu = torch.empty(order.numel(), 2 * F, dtype=mm, device=x.device)
    for c in _row_chunks(order.numel(), F):
        g, d = gu[c, :F].to(acc), dh[c].to(acc)
        dgu[c, :F] = torch.ops.aten.silu_backward(d * gu[c, F:].to(acc), g)  # dh·u·silu'(g)
        dgu[c, F:] = torch.nn.functional.silu(g).mul_(d)                     # dh·silu(g)
    dw = _per_expert_sum(dgu, rows, offsets, mm, w_gate_up)
    dxs = _per_expert(dgu, w_gate_up, offsets, mm, mm)                 # per sorted position
    dx = _slot_sum(dxs, position, N, k)
    return dx.to(x.dtype), dw
