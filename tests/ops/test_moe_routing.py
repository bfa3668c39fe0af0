"""The MoE router: topk_route against Hugging Face's Mixtral and Qwen3-MoE routers on the
same logits (values, experts, gradients), the tie rule, load_balancing_loss at perfect
balance and against transformers' pooled load_balancing_loss_func, the z-loss, errors."""

import types

import pytest
import torch

from numerics import check
from kernelrl.ops import load_balancing_loss, router_z_loss, topk_route

mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
qwen3 = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")


def _hf_router(kind, E, k, D, norm_topk_prob=True, dtype=torch.float32):
    cfg = types.SimpleNamespace(num_experts_per_tok=k, num_local_experts=E, num_experts=E,
                                hidden_size=D, norm_topk_prob=norm_topk_prob)
    router = (mixtral.MixtralTopKRouter if kind == "mixtral" else qwen3.Qwen3MoeTopKRouter)(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, D))
    return router.to(dtype)


def _untied(logits, k):
    """Rows whose k + 1 largest probabilities are distinct: there the tie rule plays no
    part, and the experts must be HF's exactly."""
    p = torch.softmax(logits.float(), -1).sort(-1, descending=True).values[:, :k + 1]
    return (p[:, :-1] > p[:, 1:]).all(-1)


def _reference(logits64, experts, renormalize):
    """The routing weights of the given experts, plainly, in float64."""
    p = torch.softmax(logits64, dim=-1).gather(1, experts)
    return p / p.sum(-1, keepdim=True) if renormalize else p


# ---- topk_route against Hugging Face ---------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("E,k", [(8, 1), (8, 2), (8, 8), (128, 8)])
def test_matches_mixtral_router(dtype, E, k):
    """Mixtral: fp32 softmax, top-k, renormalized, weights left in float32."""
    torch.manual_seed(E + k)
    router = _hf_router("mixtral", E, k, 24, dtype=dtype)
    hidden = torch.randn(53, 24).to(dtype)
    logits, hf_w, hf_e = router(hidden)
    w, e = topk_route(logits, k, weights_dtype=torch.float32)
    assert e.dtype == torch.int64 and w.dtype == hf_w.dtype == torch.float32
    assert torch.equal(w, hf_w)                 # tied weights are equal, whatever the order
    untied = _untied(logits, k)
    assert untied.sum() >= 10
    assert torch.equal(e[untied], hf_e[untied])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("E,k", [(8, 2), (128, 8), (16, 1)])
def test_matches_qwen3_moe_router(dtype, norm, E, k):
    """Qwen3-MoE: the same, renormalized only with norm_topk_prob, cast to the logits' dtype."""
    torch.manual_seed(E * 3 + k)
    router = _hf_router("qwen3", E, k, 24, norm_topk_prob=norm, dtype=dtype)
    logits, hf_w, hf_e = router(torch.randn(41, 24).to(dtype))
    w, e = topk_route(logits, k, renormalize=norm)
    assert w.dtype == dtype
    assert torch.equal(w, hf_w)
    untied = _untied(logits, k)
    assert untied.sum() >= 10
    assert torch.equal(e[untied], hf_e[untied])


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_gradients_match_float64_and_hf(renormalize, k):
    torch.manual_seed(k)
    E = 12
    router = _hf_router("qwen3", E, k, 16, norm_topk_prob=renormalize)
    hidden = torch.randn(33, 16)
    logits = (hidden @ router.weight.detach().t()).requires_grad_()
    w, e = topk_route(logits, k, renormalize=renormalize)
    g = torch.randn_like(w)
    (grad,) = torch.autograd.grad(w, logits, g)
    l64 = logits.detach().double().requires_grad_()
    ref = _reference(l64, e, renormalize)
    (ref_grad,) = torch.autograd.grad(ref, l64, g.double())
    check("weights", w, ref, None, torch.float32)
    if k == 1 and renormalize:              # w ≡ 1: the exact gradient is 0 (rounding only)
        assert torch.all(w == 1) and grad.abs().max() < 1e-6
    else:
        check("dlogits", grad, ref_grad, None, torch.float32)
    # HF's router, differentiated through its own topk and in-place division, agrees
    hl = logits.detach().clone().requires_grad_()
    probs = torch.softmax(hl, dtype=torch.float, dim=-1)
    top, _ = torch.topk(probs, k, dim=-1)
    if renormalize:
        top = top / top.sum(-1, keepdim=True)
    (hf_grad,) = torch.autograd.grad(top, hl, g)
    torch.testing.assert_close(grad, hf_grad, rtol=1e-6, atol=1e-7)


def test_float64_logits_compute_in_float64():
    logits = torch.randn(9, 6, dtype=torch.float64)
    w, e = topk_route(logits, 3)
    assert w.dtype == torch.float64
    torch.testing.assert_close(w, _reference(logits, e, True), rtol=1e-15, atol=0)


# ---- ties ------------------------------------------------------------------------------

def test_ties_go_to_the_lower_expert_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [5.0, -1.0, 5.0, 5.0, 5.0, -1.0],
                           [-1.0, 2.0, -1.0, -1.0, -1.0, 2.0]])
    _, e1 = topk_route(logits, 1)
    _, e3 = topk_route(logits, 3)
    _, e5 = topk_route(logits, 5)
    assert e1[:, 0].tolist() == [1, 0, 0, 1]
    assert e3.tolist() == [[1, 2, 4], [0, 1, 2], [0, 2, 3], [1, 5, 0]]
    assert e5.tolist() == [[1, 2, 4, 5, 0], [0, 1, 2, 3, 4], [0, 2, 3, 4, 1],
                           [1, 5, 0, 2, 3]]
    w, _ = topk_route(logits, 3)
    torch.testing.assert_close(w[1], torch.full((3,), 1 / 3))


def test_ties_in_bf16_logits_keep_the_rule():
    """bf16 logits tie often (8 bits of mantissa): the rule holds row by row."""
    torch.manual_seed(0)
    logits = torch.randint(-2, 3, (200, 16)).to(torch.bfloat16)
    _, e = topk_route(logits, 8)
    p = torch.softmax(logits.float(), -1)
    for row, ids in zip(p, e):
        chosen = [(-row[i].item(), i) for i in ids.tolist()]
        assert chosen == sorted((-row[i].item(), i) for i in range(16))[:8]


# ---- load balancing loss -----------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 8])
def test_load_balancing_loss_is_one_at_perfect_balance(k):
    """Token n's logits are a fixed ramp rolled by n (N a multiple of E): P_e = 1/E and
    every expert gets N·K/E slots. Ours is 1; transformers' pooled function gives K."""
    E, N = 8, 24
    ramp = -torch.arange(E, dtype=torch.float32)
    logits = torch.stack([ramp.roll(n) for n in range(N)]).requires_grad_()
    _, experts = topk_route(logits.detach(), k)
    loss = load_balancing_loss(logits, experts)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, torch.tensor(1.0))
    hf = mixtral.load_balancing_loss_func((logits.detach(),), E, k)
    torch.testing.assert_close(hf, torch.tensor(float(k)))
    assert torch.isfinite(torch.autograd.grad(loss, logits)[0]).all()


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("E,k", [(8, 2), (16, 4), (6, 1)])
def test_load_balancing_loss_vs_hf_pooled(layers, masked, E, k):
    """HF(layers) = K · load_balancing_loss(cat(logits), cat(experts), mask repeated)."""
    torch.manual_seed(layers * 10 + E + k)
    B, T = 3, 11
    per_layer = [torch.randn(B * T, E) * 2 for _ in range(layers)]
    experts = [topk_route(lg, k)[1] for lg in per_layer]
    mask = None
    if masked:
        mask = (torch.rand(B, T) > 0.3).long()
        mask[:, 0] = 1
    hf = mixtral.load_balancing_loss_func(tuple(per_layer), E, k, mask)
    flat = None if mask is None else mask.reshape(-1).repeat(layers)
    ours = load_balancing_loss(torch.cat(per_layer), torch.cat(experts), flat)
    torch.testing.assert_close(k * ours, hf, rtol=1e-5, atol=1e-6)
    if layers == 1:
        return
    per = torch.stack([load_balancing_loss(lg, ex, None if mask is None else mask)
                       for lg, ex in zip(per_layer, experts)])
    assert abs(k * per.mean().item() - hf.item()) > 1e-4   # pooling is not a mean of layers


def test_load_balancing_loss_gradient_and_mask():
    torch.manual_seed(1)
    N, E, k = 29, 7, 2
    logits = torch.randn(N, E, requires_grad=True)
    _, experts = topk_route(logits.detach(), k)
    mask = torch.rand(N) > 0.25
    with torch.no_grad():
        logits[~mask] = float("nan")                     # never read into a result
    loss = load_balancing_loss(logits, experts, mask)
    (grad,) = torch.autograd.grad(loss, logits)
    l64 = logits.detach().double().requires_grad_()
    keep = mask.double()
    p = torch.softmax(torch.where(mask[:, None], l64, 0.0), -1)
    counts = torch.zeros(E, dtype=torch.float64).index_add_(
        0, experts.reshape(-1), keep.repeat_interleave(k))
    f = counts / (k * keep.sum())                          # a count: no gradient
    P = (p * keep[:, None]).sum(0) / keep.sum()
    ref = E * (f * P).sum()
    (ref_grad,) = torch.autograd.grad(ref, l64)
    check("loss", loss, ref, None, torch.float32)
    check("dlogits", grad, ref_grad, None, torch.float32)
    assert torch.all(grad[~mask] == 0)
    none_kept = load_balancing_loss(logits, experts, torch.zeros(N, dtype=torch.bool))
    assert none_kept.item() == 0.0


# ---- z-loss ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_router_z_loss(dtype):
    torch.manual_seed(2)
    logits = (torch.randn(31, 9) * 3).to(dtype).requires_grad_()
    mask = torch.rand(31) > 0.3
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for m in (None, mask):
        z = router_z_loss(logits, m)
        assert z.dtype == loss_dtype
        (grad,) = torch.autograd.grad(z, logits)
        l64 = logits.detach().double().requires_grad_()
        per = torch.logsumexp(l64, -1) ** 2
        ref = per.mean() if m is None else per[m].mean()
        (ref_grad,) = torch.autograd.grad(ref, l64)
        check("z", z, ref, None, loss_dtype)       # computed in float32 from exact inputs
        check("dlogits", grad, ref_grad, None, dtype)


def test_router_z_loss_extremes_and_empty():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], requires_grad=True)
    z = router_z_loss(logits)
    torch.testing.assert_close(z, torch.tensor((1e8 + (-1e4 + torch.log(torch.tensor(3.0)))
                                                .item() ** 2) / 2))
    assert torch.isfinite(torch.autograd.grad(z, logits)[0]).all()
    assert router_z_loss(torch.zeros(0, 4)).item() == 0.0
    assert router_z_loss(logits, torch.zeros(2)).item() == 0.0


# ---- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 9, 7, True, 2.0])
def test_topk_route_rejects_bad_k(k):
    with pytest.raises(ValueError, match=r"k: expected an int in \[1, min\(8, E = 6\)\]"):
        topk_route(torch.randn(4, 6), k)


@pytest.mark.parametrize("call,match", [
    (lambda: topk_route(torch.randn(4), 1), "router_logits: expected 2 dimensions"),
    (lambda: topk_route(torch.randn(4, 3).long(), 1), "router_logits: expected dtype"),
    (lambda: topk_route(torch.randn(4, 3), 1, weights_dtype=torch.int32), "weights_dtype"),
    (lambda: load_balancing_loss(torch.randn(4, 3), torch.zeros(5, 2, dtype=torch.long)),
     r"experts: expected \[N, K\] = \[4, K >= 1\] \(router_logits is \(4, 3\)\), got \(5, 2\)"),
    (lambda: load_balancing_loss(torch.randn(4, 3), torch.zeros(4, 2)), "integer dtype"),
    (lambda: load_balancing_loss(torch.randn(4, 3), torch.full((4, 2), 3)),
     r"expert ids in \[0, 3\), got 3"),
    (lambda: load_balancing_loss(torch.randn(4, 3), torch.full((4, 1), -1)),
     r"expert ids in \[0, 3\), got -1"),
    (lambda: load_balancing_loss(torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long),
                                 torch.ones(5)), "mask: expected N = 4 elements"),
    (lambda: router_z_loss(torch.randn(4, 3), torch.ones(2, 3)), "mask: expected N = 4"),
])
def test_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
