"""Autograd helpers shared by the op families.

Fused backward kernels are not themselves differentiable. ``first_order_only`` makes that
explicit: a backward decorated with it runs without building a graph, and when the caller
asked for one (``create_graph=True``, e.g. for a gradient penalty) the gradients it
returns carry a node that raises as soon as anything differentiates through them. Without
it the gradient would silently have no graph, and a second-order term would be dropped.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["first_order_only", "SecondOrderError"]


class SecondOrderError(RuntimeError):
    """Differentiating through the gradient of a fused, first-order-only op."""


class _Refuse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, op_name, *inputs):
        ctx.op_name = op_name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, *grads):
        raise SecondOrderError(
            f"kernelrl.ops.{ctx.op_name}: second-order gradients are not supported (its fused "
            "backward is not differentiable). A gradient taken with create_graph=True cannot "
            "be differentiated again; compute that term without this op, e.g. with "
            f"kernelrl.ops.{ctx.op_name}_reference.")


def first_order_only(op_name: str):
    """Decorator for ``autograd.Function.backward``: see the module docstring. The
    Function must ``save_for_backward`` the inputs that take gradients."""
    def wrap(backward):
        @functools.wraps(backward)
        def run(ctx, *grads):
            if not torch.is_grad_enabled():          # plain backward: no graph wanted
                return backward(ctx, *grads)
            # the refusing node hangs off the op's saved inputs, so that differentiating
            # the gradient with respect to them (or anything upstream) reaches it
            inputs = [t for t in ctx.saved_tensors if t is not None and t.requires_grad]
            with torch.no_grad():
                outs = backward(ctx, *grads)
            return tuple(None if g is None else _Refuse.apply(g.detach(), op_name, *inputs)
                         for g in outs)
        return run
    return wrap
