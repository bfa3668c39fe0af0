"""nf4_linear, every backend against the float64 reference: forward and backward, both shape
regimes (decode GEMV up to 16 rows, dequant-matmul above), LoRA with and without dropout."""

import pytest
import torch

from backends import DEVICES, use_backend
from numerics import check
from kernelrl.ops import nf4_dequantize, nf4_linear, nf4_quantize
from kernelrl.ops.nf4.torch_impl import linear_reference

BACKENDS = ["native", "triton", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _eager(x, qweight, bias, a, b, s):
    """What a user would write in x's dtype: dequantize, then F.linear plus the LoRA branch."""
    w = nf4_dequantize(qweight, x.dtype)
    y = torch.nn.functional.linear(x, w, bias)
    if a is not None:
        y = y + s * (x @ a.t()) @ b.t()
    return y


def _inputs(device, dtype, rows, n_out, n_in, rank, bias, double_quant, scale=1.0):
    w = torch.randn(n_out, n_in, device=device) * 0.05
    w[:, :7] = 0                                   # zero blocks where blocks are short rows
    qw = nf4_quantize(w.to(dtype), blocksize=32, double_quant=double_quant)
    x = (torch.randn(rows, n_in, device=device) * scale).to(dtype).requires_grad_()
    bb = (torch.randn(n_out, device=device) * 0.1).to(dtype).requires_grad_() if bias else None
    a = b = None
    if rank:
        a = (torch.randn(rank, n_in, device=device) * 0.1).to(dtype).requires_grad_()
        b = (torch.randn(n_out, rank, device=device) * 0.1).to(dtype).requires_grad_()
    return qw, x, bb, a, b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,rank,bias,double_quant", [
    (1, 0, False, True), (5, 4, True, False), (16, 16, False, True), (37, 4, True, True),
    (70, 0, True, False)])
def test_nf4_linear_matches_float64(monkeypatch, device, backend, dtype, rows, rank, bias,
                                    double_quant):
    op = "nf4_gemv" if rows <= 16 else "nf4_matmul"
    use_backend(monkeypatch, backend, device, op, dtype)
    n_out, n_in = 43, 129                          # odd: rows start mid-byte, blocks straddle
    qw, x, bb, a, b = _inputs(device, dtype, rows, n_out, n_in, rank, bias, double_quant)
    s = 2.0
    y = nf4_linear(x, qw, bias=bb, lora_a=a, lora_b=b, lora_scale=s)
    g = torch.randn_like(y)
    leaves = [t for t in (x, bb, a, b) if t is not None]
    grads = torch.autograd.grad(y, leaves, g)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    rx = next(it)
    rb = next(it) if bias else None
    ra, rB = (next(it), next(it)) if rank else (None, None)
    ref = linear_reference(rx, qw, rb, ra, rB, s)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g.double())
    eag_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    it = iter(eag_leaves)
    ex = next(it)
    eb = next(it) if bias else None
    ea, eB = (next(it), next(it)) if rank else (None, None)
    eager = _eager(ex, qw, eb, ea, eB, s)
    eager_grads = torch.autograd.grad(eager, eag_leaves, g)
    assert y.dtype == dtype and y.shape == (rows, n_out)
    check("y", y, ref, eager, dtype)
    for name, got, r, e in zip(("dx", "dbias", "da", "db")[:len(leaves)] if bias else
                               ("dx", "da", "db"), grads, ref_grads, eager_grads):
        check(name, got, r, e, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nf4_linear_extreme_activations(monkeypatch, backend):
    use_backend(monkeypatch, backend, "cpu", "nf4_matmul", torch.float32)
    qw, x, _, a, b = _inputs("cpu", torch.float32, 33, 24, 64, 4, False, True, scale=1e4)
    y = nf4_linear(x, qw, lora_a=a, lora_b=b)
    ref = linear_reference(x.detach(), qw, None, a.detach(), b.detach())
    eager = _eager(x.detach(), qw, None, a.detach(), b.detach(), 1.0)
    check("y", y, ref, eager, torch.float32)


def test_nf4_linear_leading_dims_and_no_grad():
    qw, x, _, _, _ = _inputs("cpu", torch.float32, 6, 20, 64, 0, False, True)
    x3 = x.detach().view(2, 3, 64)
    with torch.no_grad():
        y = nf4_linear(x3, qw)
    assert y.shape == (2, 3, 20) and not y.requires_grad
    torch.testing.assert_close(y.view(6, 20), nf4_linear(x.detach(), qw))
    assert nf4_linear(torch.zeros(0, 64), qw).shape == (0, 20)


def test_lora_dropout_gradients():
    """With dropout, the LoRA branch sees the dropped input; the same mask in the reference
    (by seeding) gives the same output and gradients."""
    qw, x, _, a, b = _inputs("cpu", torch.float32, 40, 24, 64, 8, False, True)
    torch.manual_seed(7)
    y = nf4_linear(x, qw, lora_a=a, lora_b=b, lora_scale=0.5, lora_dropout=0.3)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, a, b), g)
    torch.manual_seed(7)
    keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(0.7)
    leaves = [t.detach().double().requires_grad_() for t in (x, a, b)]
    xl = leaves[0] * keep / 0.7
    ref = linear_reference(leaves[0], qw, None, leaves[1], leaves[2], 0.5, x_lora=xl)
    ref_grads = torch.autograd.grad(ref, leaves, g.double())
    check("y", y, ref, None, torch.float32)
    for name, got, r in zip(("dx", "da", "db"), grads, ref_grads):
        check(name, got, r, None, torch.float32)
    assert not torch.equal(y, nf4_linear(x, qw, lora_a=a, lora_b=b, lora_scale=0.5))


def test_gradcheck_float64_lora_path():
    """The Function's backward against finite differences (float64 activations through the
    torch chunked path; the NF4 weight is a constant)."""
    qw, _, _, _, _ = _inputs("cpu", torch.float32, 1, 6, 32, 0, False, True)
    from kernelrl.ops.nf4 import op
    x = torch.randn(20, 32, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda x, bias, a, b: op._NF4Linear.apply(x, bias, a, b, qw, 1.5, 0.0, "torch")
    assert torch.autograd.gradcheck(fn, (x, bias, a, b))


@pytest.mark.parametrize("kwargs,match", [
    (dict(lora_a=torch.zeros(4, 64)), "both lora_a and lora_b"),
    (dict(lora_a=torch.zeros(4, 63), lora_b=torch.zeros(20, 4)), r"lora_a must be \[r, 64\]"),
    (dict(lora_a=torch.zeros(4, 64), lora_b=torch.zeros(20, 3)), r"lora_b must be \[20, 4\]"),
    (dict(bias=torch.zeros(19)), r"bias must be \[20\]"),
    (dict(lora_a=torch.zeros(4, 64), lora_b=torch.zeros(20, 4), lora_dropout=1.0),
     "lora_dropout"),
])
def test_nf4_linear_errors(kwargs, match):
    qw = nf4_quantize(torch.randn(20, 64))
    with pytest.raises(ValueError, match=match):
        nf4_linear(torch.randn(3, 64), qw, **kwargs)
    with pytest.raises(ValueError, match="in_features 64"):
        nf4_linear(torch.randn(3, 65), qw)
    with pytest.raises(TypeError, match="NF4Weight"):
        nf4_linear(torch.randn(3, 64), torch.randn(20, 64))


def test_nf4_linear_under_autocast_runs_in_the_autocast_dtype():
    """As F.linear: bf16 in and out under CPU autocast, float32 adapters included, and the
    gradients reach the float32 leaves in their own dtype."""
    qw, x, bb, a, b = _inputs("cpu", torch.float32, 20, 24, 64, 4, True, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = nf4_linear(x, qw, bias=bb, lora_a=a, lora_b=b)
    assert y.dtype == torch.bfloat16
    ref = linear_reference(x.detach(), qw, bb.detach(), a.detach(), b.detach())
    assert (y.double() - ref).norm() / ref.norm() < 1e-2
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and a.grad.dtype == torch.float32
