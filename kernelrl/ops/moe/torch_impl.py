"""moe_ffn in torch: the float64 reference (the tests' oracle) and the torch stage functions
of the kernel contract (see the package docstring for the stages and their buffers).

The stages are the CPU path (and the fallback anywhere): ``gate_up``, ``down`` and their
backward loop over the experts, reading ``offsets`` to the host, and run each expert's rows
as one matmul. On a GPU the stages are Triton grouped GEMMs (``triton_impl``), which read
``offsets`` on the device and never wait on the host. Products are computed in float32 (the
inputs upcast, so 16-bit products are exact and their sums float32, as the kernels
accumulate; float64 for float64 inputs) and every stage output is rounded once to the
dtype of its input, the kernels' convention: h, o, do, dh and dx in x's dtype, the weight
gradients in the weights' dtype, dweights in ``weights``' dtype.
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
    """The accumulation dtype: float32, or float64 for float64 tensors."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _gate_up_rows(x: torch.Tensor, order: torch.Tensor, lo: int, hi: int, w: torch.Tensor,
                  k: int, acc: torch.dtype):
    """x's rows of sorted positions [lo, hi) (in acc) and their g, u = x·W_gᵀ, x·W_uᵀ."""
    rows = x.index_select(0, order[lo:hi].long() // k).to(acc)
    gu = rows @ w.to(acc).t()
    F = w.shape[0] // 2
    return rows, gu[:, :F], gu[:, F:]


def gate_up(x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
            w_gate_up: torch.Tensor, k: int) -> torch.Tensor:
    """h [N·K, F]: h[p] = silu(x[n]·W_g[e]ᵀ) · (x[n]·W_u[e]ᵀ), n = order[p] // k."""
    NK, F = order.numel(), w_gate_up.shape[1] // 2
    acc = _acc(x.dtype)
    h = torch.empty(NK, F, dtype=x.dtype, device=x.device)
    for e, lo, hi in _ranges(offsets):
        _, g, u = _gate_up_rows(x, order, lo, hi, w_gate_up[e], k, acc)
        h[lo:hi] = torch.nn.functional.silu(g) * u
    return h


def down(h: torch.Tensor, offsets: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """o [N·K, D]: o[p] = h[p]·w_down[e]ᵀ."""
    acc = _acc(h.dtype)
    o = torch.empty(h.shape[0], w_down.shape[1], dtype=h.dtype, device=h.device)
    for e, lo, hi in _ranges(offsets):
        o[lo:hi] = h[lo:hi].to(acc) @ w_down[e].to(acc).t()
    return o


def combine(o: torch.Tensor, position: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y [N, D]: y[n] = Σ_{j ascending} weights[n, j] · o[position[n·K + j]], summed in
    float32 (float64 for float64 o), in o's dtype."""
    N, K = weights.shape
    acc = _acc(o.dtype)
    og = o.index_select(0, position.long()).view(N, K, o.shape[1]).to(acc)
    w = weights.to(acc)
    y = og[:, 0] * w[:, 0, None]
    for j in range(1, K):
        y = y + og[:, j] * w[:, j, None]
    return y.to(o.dtype)


def combine_backward(dy: torch.Tensor, o: torch.Tensor, position: torch.Tensor,
                     weights: torch.Tensor):
    """(do [N·K, D] in o's dtype, dweights [N, K] in weights' dtype), p = position[n·K + j]:
    do[p] = weights[n, j]·dy[n]; dweights[n, j] = <dy[n], o[p]>."""
    N, K = weights.shape
    acc = _acc(o.dtype)
    pos = position.long()
    dyf = dy.to(acc)
    per_slot = (weights.to(acc)[:, :, None] * dyf[:, None, :]).reshape(N * K, o.shape[1])
    do = torch.empty_like(o).index_copy_(0, pos, per_slot.to(o.dtype))
    og = o.index_select(0, pos).view(N, K, o.shape[1]).to(acc)
    dweights = (og * dyf[:, None, :]).sum(-1)
    return do, dweights.to(weights.dtype)


def down_backward(do: torch.Tensor, h: torch.Tensor, offsets: torch.Tensor,
                  w_down: torch.Tensor):
    """(dh [N·K, F] in h's dtype, dw_down [E, D, F] in w_down's dtype):
    dh[p] = do[p]·w_down[e]; dw_down[e] = Σ_{p in e} do[p]ᵀ·h[p] (0 for an expert without
    rows)."""
    acc = _acc(h.dtype)
    dh = torch.empty_like(h)
    dw = torch.zeros(w_down.shape, dtype=acc, device=w_down.device)
    for e, lo, hi in _ranges(offsets):
        d = do[lo:hi].to(acc)
        dh[lo:hi] = d @ w_down[e].to(acc)
        dw[e] = d.t() @ h[lo:hi].to(acc)
    return dh, dw.to(w_down.dtype)


def gate_up_backward(dh: torch.Tensor, x: torch.Tensor, order: torch.Tensor,
                     position: torch.Tensor, offsets: torch.Tensor, w_gate_up: torch.Tensor,
                     k: int):
    """(dx [N, D] in x's dtype, dw_gate_up [E, 2F, D] in w_gate_up's dtype), recomputing
    g and u: dgu[p] = [dh·u·silu'(g), dh·silu(g)];
    dw_gate_up[e] = Σ_{p in e} dgu[p]ᵀ·x[n(p)];
    dx[n] = Σ_{j ascending} dgu[position[n·K + j]]·w_gate_up[e_j]."""
    N, D = x.shape
    acc = _acc(x.dtype)
    dxs = torch.zeros(order.numel(), D, dtype=acc, device=x.device)     # per sorted position
    dw = torch.zeros(w_gate_up.shape, dtype=acc, device=w_gate_up.device)
    for e, lo, hi in _ranges(offsets):
        rows, g, u = _gate_up_rows(x, order, lo, hi, w_gate_up[e], k, acc)
        d = dh[lo:hi].to(acc)
        sig = torch.sigmoid(g)
        dgu = torch.cat([d * u * sig * (1 + g * (1 - sig)), d * g * sig], dim=1)
        dw[e] = dgu.t() @ rows
        dxs[lo:hi] = dgu @ w_gate_up[e].to(acc)
    per_slot = dxs.index_select(0, position.long()).view(N, k, D)
    dx = per_slot[:, 0]
    for j in range(1, k):
        dx = dx + per_slot[:, j]
    return dx.to(x.dtype), dw.to(w_gate_up.dtype)
