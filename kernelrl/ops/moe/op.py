"""The public moe_ffn and its autograd.Function over one backend's stage functions; registers
the op's backends (see the package docstring for the math, the stages and the buffers)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from kernelrl import backend as _backend
from kernelrl.ops._autograd import first_order_only
from kernelrl.ops._checks import FLOAT_DTYPES, KERNEL_DTYPES, check_tensor
from kernelrl.ops.moe import torch_impl
from kernelrl.ops.moe.routing import MAX_EXPERTS, MAX_TOP_K, check_expert_ids, topk_route

#: The stage functions every backend module provides (the kernel contract).
STAGES = ("permute", "gate_up", "down", "combine", "combine_backward", "down_backward",
          "gate_up_backward")


@dataclass(frozen=True)
class MoEKernels:
    """One backend's stages, with the contract's signatures:

    permute(experts [N, K], E) -> (order [N·K], offsets [E + 1], position [N·K]) int32
    gate_up(x, order, offsets, w_gate_up, K) -> (h [N·K, F], gu [N·K, 2F] or None)
    down(h, offsets, w_down) -> o [N·K, D]
    combine(o, position, weights) -> y [N, D]
    combine_backward(dy, o, position, weights) -> (do [N·K, D], dweights [N, K])
    down_backward(do, h, offsets, w_down) -> (dh [N·K, F], dw_down [E, D, F])
    gate_up_backward(dh, gu, x, order, position, offsets, w_gate_up, K) -> (dx, dw_gate_up)

    gu is the gate and up products, kept by a backend whose backward reads them (the torch
    stages: the CPU path, where the GEMM recompute would cost more than the memory is
    worth) and None from one that recomputes them (Triton); gate_up_backward takes what
    its own gate_up returned.
    """

    permute: Callable
    gate_up: Callable
    down: Callable
    combine: Callable
    combine_backward: Callable
    down_backward: Callable
    gate_up_backward: Callable


def _native():
    from kernelrl.ops.moe import native_impl
    return native_impl


def _triton():
    from kernelrl.ops.moe import triton_impl
    return triton_impl


def _lazy(loader: Callable, name: str) -> Callable:
    """``loader().<name>``, imported on first call (the backend modules load their kernels)."""
    def run(*args):
        return getattr(loader(), name)(*args)
    run.__name__ = name
    return run


def _by_device(name: str) -> Callable:
    """The native backend's non-permute stages: the torch stages for CPU tensors, the
    Triton ones for CUDA tensors (csrc/moe holds only the permutation)."""
    def run(first, *rest):
        module = _triton() if first.device.type == "cuda" else torch_impl
        return getattr(module, name)(first, *rest)
    run.__name__ = name
    return run


_KERNELS = {
    "native": MoEKernels(_lazy(_native, "permute"), *(_by_device(s) for s in STAGES[1:])),
    "triton": MoEKernels(*(_lazy(_triton, s) for s in STAGES)),
    "torch": MoEKernels(*(getattr(torch_impl, s) for s in STAGES)),
}


class _MoEFFN(torch.autograd.Function):
    """(x, weights, experts, w_gate_up, w_down, kernels) -> y; gradients to x, weights,
    w_gate_up and w_down.

    Memory: the forward saves h [N·K, F] and o [N·K, D] (x's dtype) besides the inputs and
    the int32 permutation; the backward needs o for dweights and h for dw_down. Recomputing
    h instead would redo the gate_up GEMM (2/3 of the forward's FLOPs) in every backward.
    The torch stages (the CPU path) also keep gu [N·K, 2F], so that their backward does
    not redo that GEMM for g and u; the Triton stages recompute g and u in the backward's
    first GEMM instead. With activation checkpointing the layer's forward reruns anyway,
    so these live for one layer's backward only."""

    @staticmethod
    def forward(ctx, x, weights, experts, w_gate_up, w_down, kernels):
        K, E = experts.shape[1], w_gate_up.shape[0]
        order, offsets, position = kernels.permute(experts, E)
        h, gu = kernels.gate_up(x, order, offsets, w_gate_up, K)
        o = kernels.down(h, offsets, w_down)
        y = kernels.combine(o, position, weights)
        ctx.kernels, ctx.k = kernels, K
        ctx.save_for_backward(x, weights, w_gate_up, w_down, order, offsets, position, h, o,
                              gu)
        return y

    @staticmethod
    @first_order_only("moe_ffn")
    def backward(ctx, dy):
        x, weights, w_gate_up, w_down, order, offsets, position, h, o, gu = ctx.saved_tensors
        kernels, K = ctx.kernels, ctx.k
        need_x, need_w, _, need_gu, need_down = ctx.needs_input_grad[:5]
        dx = dweights = dw_gate_up = dw_down = None
        do, dweights = kernels.combine_backward(dy.contiguous(), o, position, weights)
        if need_x or need_gu or need_down:
            dh, dw_down = kernels.down_backward(do, h, offsets, w_down)
            if need_x or need_gu:
                dx, dw_gate_up = kernels.gate_up_backward(dh, gu, x, order, position,
                                                          offsets, w_gate_up, K)
        return (dx if need_x else None, dweights if need_w else None, None,
                dw_gate_up if need_gu else None, dw_down if need_down else None, None)


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _check(x, weights, experts, w_gate_up, w_down) -> None:
    """Every argument check of moe_ffn (ValueError naming the argument, what was expected
    and what was given; mismatches name both shapes). No host sync on a GPU."""
    check_tensor("moe_ffn: x", x, dtypes=FLOAT_DTYPES, ndim=2)
    N, D = x.shape
    dt = _backend.dtype_name(x.dtype)
    check_tensor("moe_ffn: w_gate_up", w_gate_up, ndim=3)
    check_tensor("moe_ffn: w_down", w_down, ndim=3)
    E, F2, Dg = w_gate_up.shape
    if D < 1 or E < 1 or F2 < 2 or F2 % 2:
        raise ValueError(f"moe_ffn: w_gate_up: expected [E, 2F, D] with E >= 1, F >= 1 and "
                         f"D = {D} >= 1 (x is {_shape(x)}), got {_shape(w_gate_up)}")
    if Dg != D:
        raise ValueError(f"moe_ffn: w_gate_up: expected hidden size D = {D} in [E, 2F, D] "
                         f"(x is {_shape(x)}), got {_shape(w_gate_up)}")
    F = F2 // 2
    if tuple(w_down.shape) != (E, D, F):
        raise ValueError(f"moe_ffn: w_down: expected [E, D, F] = {[E, D, F]} (w_gate_up is "
                         f"{_shape(w_gate_up)}, x is {_shape(x)}), got {_shape(w_down)}")
    for name, t in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if t.dtype != x.dtype:
            raise ValueError(f"moe_ffn: {name}: expected x's dtype {dt}, got "
                             f"{_backend.dtype_name(t.dtype)}")
    check_tensor("moe_ffn: experts", experts, ndim=2)
    if experts.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"moe_ffn: experts: expected int32 or int64, got "
                         f"{_backend.dtype_name(experts.dtype)}")
    K = experts.shape[1]
    if experts.shape[0] != N or not 1 <= K <= MAX_TOP_K:
        raise ValueError(f"moe_ffn: experts: expected [N, K] with N = {N} (x is {_shape(x)}) "
                         f"and 1 <= K <= {MAX_TOP_K}, got {_shape(experts)}")
    check_tensor("moe_ffn: weights", weights, ndim=2)
    if weights.shape != experts.shape:
        raise ValueError(f"moe_ffn: weights: expected [N, K] = {_shape(experts)} (experts is "
                         f"{_shape(experts)}), got {_shape(weights)}")
    if weights.dtype not in (x.dtype, torch.float32):
        allowed = "float32" if x.dtype == torch.float32 else f"x's dtype {dt} or float32"
        raise ValueError(f"moe_ffn: weights: expected {allowed}, got "
                         f"{_backend.dtype_name(weights.dtype)}")
    for name, t in (("weights", weights), ("experts", experts), ("w_gate_up", w_gate_up),
                    ("w_down", w_down)):
        if t.device != x.device:
            raise ValueError(f"moe_ffn: {name}: expected a tensor on x's device {x.device}, "
                             f"got one on {t.device}")
    check_expert_ids("moe_ffn: experts", experts, E)


def moe_ffn(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
            w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """A dropless top-k MoE feed-forward layer with SwiGLU experts, the Hugging Face
    transformers 5 layout (Mixtral, Qwen3-MoE ``Experts`` modules): the math, the stages
    and the determinism guarantees are in the package docstring.

    Args:
        x: [N, D] float32, float16 or bfloat16 (float64: torch backend). Gets gradients.
        weights: [N, K] routing weights, x's dtype or float32 (Mixtral's router keeps
            float32). Gets gradients (in its own dtype).
        experts: [N, K] int32 or int64 expert ids in [0, E), K <= 8 (``topk_route``'s
            output; a token may name an expert twice). Ids are range-checked on CPU always,
            on a GPU only with ``KERNELRL_DEBUG=1`` (the check is a host sync).
        w_gate_up: [E, 2F, D] in x's dtype, gate rows (0..F-1) then up rows. Gets gradients.
            E > 1024 runs the torch backend (the kernels take at most 1024 experts).
        w_down: [E, D, F] in x's dtype. Gets gradients.

    Returns:
        y [N, D] in x's dtype: y[n] = Σ_j weights[n, j]·down_e(silu(gate_e(x[n]))·up_e(x[n])).
    """
    _check(x, weights, experts, w_gate_up, w_down)
    backend = _backend.select("moe_ffn", x.device, x.dtype)
    E = w_gate_up.shape[0]
    if x.shape[0] == 0:
        backend = "torch"            # nothing to route: the torch stages return zeros
    elif backend != "torch" and E > MAX_EXPERTS:
        if _backend.forced_now() is not None:
            raise ValueError(f"moe_ffn: w_gate_up: the {backend} kernels take at most "
                             f"{MAX_EXPERTS} experts, got E = {E} ({_shape(w_gate_up)}); "
                             f"the torch backend takes any number")
        backend = "torch"
    kernels = _KERNELS[backend]
    return _MoEFFN.apply(x.contiguous(), weights.contiguous(), experts.contiguous(),
                         w_gate_up.contiguous(), w_down.contiguous(), kernels)


# ---------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------
def _examples(device: torch.device, dtype: torch.dtype) -> list:
    """For ``kernelrl tune``: a small Mixtral-like layer (8 experts, top-2, SwiGLU with
    F = 3.5·D) on 512 tokens, routed by ``topk_route`` of random router logits."""
    gen = torch.Generator(device=device).manual_seed(0)
    N, D, F, E, K = 512, 512, 1792, 8, 2

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype)

    logits = torch.randn(N, E, device=device, generator=gen)
    weights, experts = topk_route(logits, K)
    return [(f"Mixtral-like N={N} D={D} F={F} E={E} K={K}",
             (randn(N, D).requires_grad_(), weights.to(dtype).requires_grad_(), experts,
              randn(E, 2 * F, D, scale=D ** -0.5).requires_grad_(),
              randn(E, D, F, scale=F ** -0.5).requires_grad_()), {})]


def _present(name: str) -> bool:
    """Whether the backend module ``kernelrl.ops.moe.<name>_impl`` is in this checkout.
    A backend whose module is absent is not registered, so that dispatch never picks it
    and forcing it says the op has no such implementation."""
    return importlib.util.find_spec(f"kernelrl.ops.moe.{name}_impl") is not None


_IMPLS = {"torch": _backend.Implementation(FLOAT_DTYPES, _KERNELS["torch"])}
for _name in ("native", "triton"):
    if _present(_name):
        _IMPLS[_name] = _backend.Implementation(KERNEL_DTYPES, _KERNELS[_name])

_backend.register_op("moe_ffn", _IMPLS,
                     skip=_backend.not_yet_measured("cuda", "native", "triton"),
                     examples=_examples, fn=moe_ffn)
