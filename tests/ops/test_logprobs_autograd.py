"""token_logprobs / linear_logprobs under torch.compile, opcheck of their custom ops, and
second-order gradients (refused with a clear error on every backend)."""

import importlib

import pytest
import torch

from backends import use_backend
from kernelrl import backend
from kernelrl.ops import linear_logprobs, token_logprobs

logprobs_module = importlib.import_module("kernelrl.ops.logprobs")
BACKENDS = ["torch", "triton", "native"]


def _grads(fn, inputs, g):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    (out * g).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _token(x, y):
    logp, ent = token_logprobs(x, y, return_entropy=True, temperature=0.9)
    return logp + 0.5 * ent


def _linear_tokens(h, w, y):                 # 2 row tiles
    return linear_logprobs(h, w, y, chunk_size=4)


def _linear_mean(h, w, y):                   # the scalar (gradient-in-forward) path
    return linear_logprobs(h, w, y, reduction="mean")


@pytest.mark.parametrize("name", ["default", "torch"])
@pytest.mark.parametrize("case", ["token", "linear_tokens", "linear_mean"])
def test_compiles_with_fullgraph_forward_and_backward(monkeypatch, case, name):
    """The default CPU path (native custom ops) and the torch path (the default on GPUs
    until tuned) compile without a graph break; results match eager bit for bit or to
    float32 rounding."""
    if name != "default":
        use_backend(monkeypatch, name, "cpu", op="token_logprobs")
    torch._dynamo.reset()
    y = torch.randint(0, 300, (7,))
    y[2] = -100
    if case == "token":
        fn, inputs = _token, [torch.randn(7, 300)]
    else:
        fn = _linear_tokens if case == "linear_tokens" else _linear_mean
        inputs = [torch.randn(7, 16), torch.randn(300, 16) / 4]
    g = torch.randn(7) if case != "linear_mean" else torch.tensor(1.7)
    compiled = torch.compile(lambda *a: fn(*a, y), fullgraph=True)
    out_c, grads_c = _grads(compiled, inputs, g)
    out_e, grads_e = _grads(lambda *a: fn(*a, y), inputs, g)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(backend.availability("native", torch.device("cpu"), torch.float32,
                                         backend.registered_ops()["token_logprobs"])[0] is False,
                    reason="kernelrl._native is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_custom_ops_pass_opcheck(dtype):
    logits = torch.randn(5, 70).to(dtype)
    labels = torch.tensor([0, 69, -100, 3, 12])
    fwd_args = (logits, labels, 1.25, -100, True)
    torch.library.opcheck(logprobs_module._native_fwd, fwd_args)
    _, stats, ent = logprobs_module._native_fwd(*fwd_args)
    grad_logp, grad_ent = torch.randn(5), torch.randn(5)
    bwd_args = (logits, labels, stats, ent, grad_logp, grad_ent, 1.25, -100, 70, 0)
    torch.library.opcheck(logprobs_module._native_bwd_op, bwd_args)
    torch.library.opcheck(logprobs_module._native_bwd_inplace_op,
                          (logits.clone(),) + bwd_args[1:])
    # the in-place op writes the same gradient the functional one returns
    tile = logits.clone()
    logprobs_module._native_bwd_inplace_op(tile, *bwd_args[1:])
    assert torch.equal(tile, logprobs_module._native_bwd_op(*bwd_args))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("op", ["token_logprobs", "linear_logprobs", "linear_mean"])
def test_second_order_gradients_are_refused_clearly(monkeypatch, name, op):
    """create_graph=True gives a first-order gradient; differentiating it again raises
    (a fused backward is not itself differentiable) instead of dropping terms silently."""
    use_backend(monkeypatch, name, "cpu", op="linear_logprobs" if op != "token_logprobs" else op)
    if op == "token_logprobs":
        x = torch.randn(4, 33, requires_grad=True)
        out = token_logprobs(x, torch.tensor([1, 2, 3, 4])).sum()
    else:
        x = torch.randn(4, 8, requires_grad=True)
        w = torch.randn(33, 8)
        y = torch.tensor([1, 2, 3, 4])
        out = linear_logprobs(x, w, y, reduction="mean" if op == "linear_mean" else "none").sum()
    (grad,) = torch.autograd.grad(out, x, create_graph=True)
    assert grad.isfinite().all() and grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="second-order gradients are not supported"):
        torch.autograd.grad((grad ** 2).sum(), x)
