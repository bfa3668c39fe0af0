"""moe_ffn, every backend against the float64 reference: forward and every gradient with a
random upstream, on odd shapes (N = 1, E = 2 to 64, K = 1, 2, 8, experts without tokens,
every token on one expert, an expert named twice by a token), float32 / float16 / bfloat16;
the permutation contract; gradcheck; determinism; poisoned allocations; Hugging Face's
Mixtral experts module; argument errors."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from backends import DEVICES, use_backend
from numerics import check
from kernelrl import backend
from kernelrl.ops import moe_ffn, topk_route
from kernelrl.ops.moe import op as moe_op
from kernelrl.ops.moe.torch_impl import moe_ffn_reference

BACKENDS = ["native", "triton", "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _use(monkeypatch, name, device, dtype=torch.float32):
    """Force backend ``name`` for moe_ffn, or skip saying why it cannot run here."""
    if name != "torch" and importlib.util.find_spec(f"kernelrl.ops.moe.{name}_impl") is None:
        pytest.skip(f"kernelrl/ops/moe/{name}_impl.py is not in this checkout yet")
    use_backend(monkeypatch, name, device, "moe_ffn", dtype)


def _interpreter_skip(name, keep: bool, why: str) -> None:
    """Under TRITON_INTERPRET (milliseconds per program) the triton backend runs a subset
    of a sweep; on a GPU every case runs."""
    if name == "triton" and backend.triton_interpret() and not keep:
        pytest.skip(f"triton under the interpreter: {why}")


def _routing(mode, N, E, K, device, gen):
    """(weights fp32 [N, K], experts int64 [N, K]) for a routing pattern."""
    logits = torch.randn(N, E, generator=gen)
    if mode == "empty":                   # only experts 1, E-3 and E-1 get tokens
        allowed = torch.zeros(E, dtype=torch.bool)
        allowed[[1, E - 3, E - 1]] = True
        logits[:, ~allowed] = -30.0
    weights, experts = topk_route(logits, K)
    if mode in ("one", "dup"):            # every slot on expert E // 2 (twice per token: dup)
        experts = torch.full((N, K), E // 2, dtype=torch.long)
        weights = torch.rand(N, K, generator=gen) + 0.1
    return weights.to(device), experts.to(device)


def _inputs(device, dtype, N, D, Fw, E, K, mode="random", seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    weights, experts = _routing(mode, N, E, K, device, gen)
    x = (torch.randn(N, D, generator=gen) * scale).to(device, dtype)
    w_gu = (torch.randn(E, 2 * Fw, D, generator=gen) * D ** -0.5).to(device, dtype)
    w_d = (torch.randn(E, D, Fw, generator=gen) * Fw ** -0.5).to(device, dtype)
    return x, weights.to(dtype), experts, w_gu, w_d


def _eager(x, weights, experts, w_gate_up, w_down):
    """Hugging Face's eager MixtralExperts loop, in the inputs' dtype."""
    y = torch.zeros_like(x)
    for e in range(w_gate_up.shape[0]):
        tok, j = torch.where(experts == e)
        if tok.numel() == 0:
            continue
        g, u = F.linear(x[tok], w_gate_up[e]).chunk(2, dim=-1)
        o = F.linear(F.silu(g) * u, w_down[e]) * weights[tok, j, None]
        y = y.index_add(0, tok, o.to(x.dtype))
    return y


GRAD_NAMES = ("dx", "dweights", "dw_gate_up", "dw_down")


def _compare(x, weights, experts, w_gu, w_d, dtype, ill_conditioned=False):
    """moe_ffn (as dispatched) against the float64 reference and eager torch, forward and
    the four gradients under one random upstream."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weights, w_gu, w_d)]
    y = moe_ffn(leaves[0], leaves[1], experts, leaves[2], leaves[3])
    assert y.dtype == x.dtype and y.shape == x.shape
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(99)).to(y)
    grads = torch.autograd.grad(y, leaves, g)
    r_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = moe_ffn_reference(r_leaves[0], r_leaves[1], experts, r_leaves[2], r_leaves[3])
    r_grads = torch.autograd.grad(ref, r_leaves, g.double())
    e_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    eager = _eager(e_leaves[0], e_leaves[1], experts, e_leaves[2], e_leaves[3])
    e_grads = torch.autograd.grad(eager, e_leaves, g)
    check("y", y, ref, eager, dtype, ill_conditioned)
    for name, got, r, e, leaf in zip(GRAD_NAMES, grads, r_grads, e_grads, leaves):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, name
        check(name, got, r, e, dtype, ill_conditioned)
    return y, grads


CASES = [  # N, D, F, E, K, routing
    (37, 67, 45, 8, 2, "random"),      # Mixtral-like, odd widths
    (1, 67, 45, 8, 2, "random"),       # one token
    (29, 33, 21, 2, 1, "random"),      # two experts, top-1
    (19, 40, 24, 64, 8, "random"),     # Qwen3-like top-8 of many: most experts empty
    (23, 67, 45, 8, 2, "empty"),       # experts that receive no tokens
    (17, 35, 19, 4, 1, "one"),         # every token on one expert
    (13, 35, 19, 4, 2, "dup"),         # each token names that expert twice
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D,Fw,E,K,mode", CASES)
def test_moe_ffn_matches_float64(monkeypatch, name, device, dtype, N, D, Fw, E, K, mode):
    i = CASES.index((N, D, Fw, E, K, mode))
    _interpreter_skip(name, dtype == DTYPES[i % 3], "each case in one dtype, rotating")
    _use(monkeypatch, name, device, dtype)
    _compare(*_inputs(device, dtype, N, D, Fw, E, K, mode, seed=N + E), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_routing_weights_with_16bit_x(monkeypatch, name, device, dtype):
    """Mixtral's router leaves the weights in float32: accepted, dweights in float32."""
    _interpreter_skip(name, dtype == torch.bfloat16, "bfloat16 only")
    _use(monkeypatch, name, device, dtype)
    x, w, e, w_gu, w_d = _inputs(device, dtype, 31, 40, 24, 8, 2)
    _compare(x, w.float(), e, w_gu, w_d, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
def test_extreme_activations(monkeypatch, name, device):
    """|x| ~ 1e2: gates deep in silu's saturated tails (σ(g) = 0 or 1 in float32)."""
    _use(monkeypatch, name, device)
    _compare(*_inputs(device, torch.float32, 21, 48, 40, 4, 2, scale=100.0), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("experts_dtype", [torch.int64, torch.int32])
def test_permutation_contract(monkeypatch, name, device, experts_dtype):
    """order: slots grouped by expert ascending, slot ascending within; offsets: exclusive
    scan of the counts; position: order's inverse. Enough slots for several tiles."""
    _use(monkeypatch, name, device)
    gen = torch.Generator().manual_seed(3)
    E, N, K = 7, 300, 3
    experts = torch.randint(0, E - 2, (N, K), generator=gen)          # experts 5, 6 empty
    experts[::5, 0] = 0
    order, offsets, position = moe_op._KERNELS[name].permute(
        experts.to(device, experts_dtype), E)
    flat = experts.reshape(-1).tolist()
    want_order = sorted(range(N * K), key=lambda s: (flat[s], s))
    counts = [flat.count(e) for e in range(E)]
    want_offsets = [sum(counts[:e]) for e in range(E + 1)]
    assert order.dtype == offsets.dtype == position.dtype == torch.int32
    assert order.cpu().tolist() == want_order
    assert offsets.cpu().tolist() == want_offsets
    want_position = [0] * (N * K)
    for p, s in enumerate(want_order):
        want_position[s] = p
    assert position.cpu().tolist() == want_position


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic(monkeypatch, name, device, dtype):
    _interpreter_skip(name, dtype == torch.bfloat16, "bfloat16 only")
    _use(monkeypatch, name, device, dtype)
    x, w, e, w_gu, w_d = _inputs(device, dtype, 45, 40, 24, 8, 2)
    g = torch.randn(45, 40).to(device, dtype)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, w, w_gu, w_d)]
        y = moe_ffn(leaves[0], leaves[1], e, leaves[2], leaves[3])
        runs.append((y, *torch.autograd.grad(y, leaves, g)))
    for name_, a, b in zip(("y",) + GRAD_NAMES, *runs):
        assert torch.equal(a, b), name_


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
def test_outputs_are_fully_written(monkeypatch, name, device):
    """Poison every fresh allocation: an element the stages leave unwritten fails."""
    _use(monkeypatch, name, device)
    inputs = _inputs(device, torch.float32, 23, 67, 45, 8, 2, "empty")
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(7777.0) if t.is_floating_point() else t.fill_(-7)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    _compare(*inputs, torch.float32)


def test_gradcheck_float64_torch_backend():
    """The Function's backward against finite differences: float64 through the torch
    stages, with an expert named twice by one token and an expert without tokens."""
    gen = torch.Generator().manual_seed(5)
    N, D, Fw, E = 5, 6, 4, 4
    experts = torch.tensor([[0, 2], [2, 2], [1, 0], [2, 1], [0, 0]])   # expert 3: no tokens
    args = [torch.randn(N, D, generator=gen, dtype=torch.float64),
            torch.rand(N, 2, generator=gen, dtype=torch.float64),
            torch.randn(E, 2 * Fw, D, generator=gen, dtype=torch.float64) * 0.5,
            torch.randn(E, D, Fw, generator=gen, dtype=torch.float64) * 0.5]
    args = [a.requires_grad_() for a in args]
    fn = lambda x, w, gu, d: moe_op._MoEFFN.apply(x, w, experts, gu, d,  # noqa: E731
                                                  moe_op._KERNELS["torch"])
    assert torch.autograd.gradcheck(fn, args)


def test_router_to_output_gradients_reach_the_logits():
    """logits -> topk_route -> moe_ffn (int32 experts) -> backward: dlogits against float64
    autograd through the reference with the same experts."""
    x, _, _, w_gu, w_d = _inputs("cpu", torch.float32, 27, 20, 12, 6, 2)
    logits = torch.randn(27, 6).requires_grad_()
    w, e = topk_route(logits, 2)
    y = moe_ffn(x, w, e.int(), w_gu, w_d)
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, logits, g)
    l64 = logits.detach().double().requires_grad_()
    p = torch.softmax(l64, -1).gather(1, e)
    ref = moe_ffn_reference(x.double(), p / p.sum(-1, keepdim=True), e, w_gu.double(),
                            w_d.double())
    (ref_grad,) = torch.autograd.grad(ref, l64, g.double())
    check("dlogits", grad, ref_grad, None, torch.float32)


def test_second_order_gradients_refuse():
    from kernelrl.ops._autograd import SecondOrderError
    x, w, e, w_gu, w_d = _inputs("cpu", torch.float32, 7, 10, 6, 3, 2)
    x.requires_grad_()
    (dx,) = torch.autograd.grad(moe_ffn(x, w, e, w_gu, w_d).square().sum(), x,
                                create_graph=True)
    with pytest.raises(SecondOrderError, match="moe_ffn"):
        dx.sum().backward()


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without grouped_mm")
def test_cpu_grouped_gemm_path_equals_the_per_expert_loop(monkeypatch):
    """bfloat16 on a CPU with 16-byte strides runs torch's grouped_mm; it must give the
    same bits as the per-expert torch.mm loop that serves the other shapes."""
    from kernelrl.ops.moe import torch_impl
    x, w, e, w_gu, w_d = _inputs("cpu", torch.bfloat16, 45, 32, 24, 16, 2, mode="empty")
    calls = []
    real = torch_impl._grouped_mm_here

    def spy(a, b):
        calls.append(real(a, b))
        return calls[-1]

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, w_gu, w_d)]
        y = moe_ffn(leaves[0], leaves[1], e, leaves[2], leaves[3])
        return (y, *torch.autograd.grad(y, leaves, torch.ones_like(y)))

    monkeypatch.setenv("KERNELRL_BACKEND", "torch")
    monkeypatch.setattr(torch_impl, "_grouped_mm_here", spy)
    grouped = run()
    assert calls and all(calls)                       # every GEMM took grouped_mm
    monkeypatch.setattr(torch_impl, "_grouped_mm_here", lambda a, b: False)
    for name, a, b in zip(("y",) + GRAD_NAMES, grouped, run()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("D,Fw", [(16, 1), (1, 16)])
def test_bfloat16_width_one_takes_the_loop(D, Fw):
    """A width of 1 has strides grouped_mm refuses: the CPU stages take the loop (F = 1:
    h and the down GEMM; D = 1: x's rows)."""
    _compare(*_inputs("cpu", torch.bfloat16, 64, D, Fw, 3, 2), torch.bfloat16)


def test_torch_stages_need_the_kept_gate_up_products():
    from kernelrl.ops.moe import torch_impl
    x, _, e, w_gu, _ = _inputs("cpu", torch.float32, 5, 8, 4, 3, 2)
    order, offsets, position = torch_impl.permute(e, 3)
    with pytest.raises(ValueError, match="gu: expected the"):
        torch_impl.gate_up_backward(torch.zeros(10, 4), None, x, order, position, offsets,
                                    w_gu, 2)


def test_float64_public_op_runs_the_torch_backend():
    x, w, e, w_gu, w_d = _inputs("cpu", torch.float64, 11, 9, 7, 5, 3)
    assert backend.select("moe_ffn", x.device, torch.float64) == "torch"
    torch.testing.assert_close(moe_ffn(x, w, e, w_gu, w_d),
                               moe_ffn_reference(x, w, e, w_gu, w_d), rtol=1e-12, atol=1e-12)


def test_matches_hugging_face_mixtral_experts():
    """transformers 5's MixtralExperts on the same weights and routing (its layout)."""
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    cfg = mixtral.MixtralConfig(hidden_size=40, intermediate_size=24, num_local_experts=8,
                                num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    experts_module, router = mixtral.MixtralExperts(cfg), mixtral.MixtralTopKRouter(cfg)
    for p in (experts_module.gate_up_proj, experts_module.down_proj, router.weight):
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(33, 40)
    _, w, e = router(x)
    with torch.no_grad():
        want = experts_module(x, e, w)
        got = moe_ffn(x, w, e, experts_module.gate_up_proj, experts_module.down_proj)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_partial_gradients_and_empty_input():
    x, w, e, w_gu, w_d = _inputs("cpu", torch.float32, 9, 12, 8, 4, 2)
    xg = x.clone().requires_grad_()
    y = moe_ffn(xg, w, e, w_gu, w_d)                   # only x needs a gradient
    (dx,) = torch.autograd.grad(y, xg, torch.ones_like(y))
    assert dx.shape == x.shape
    with torch.no_grad():
        assert not moe_ffn(x, w, e, w_gu, w_d).requires_grad
    x0 = torch.zeros(0, 12, requires_grad=True)
    w0 = torch.zeros(0, 2, requires_grad=True)
    gu = w_gu.clone().requires_grad_()
    y0 = moe_ffn(x0, w0, e[:0], gu, w_d)
    assert y0.shape == (0, 12)
    (dgu,) = torch.autograd.grad(y0.sum(), gu)
    assert torch.all(dgu == 0)


def test_more_experts_than_the_kernels_take(monkeypatch):
    """E > 1024: the default dispatch runs the torch backend (same values as the reference);
    a forced kernel backend says why it cannot."""
    E, N, D, Fw = 1100, 6, 8, 4
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, D, generator=gen)
    experts = torch.tensor([[0, 1099], [5, 1024], [1050, 7], [3, 3], [1098, 2], [9, 600]])
    weights = torch.rand(N, 2, generator=gen)
    w_gu = torch.randn(E, 2 * Fw, D, generator=gen)
    w_d = torch.randn(E, D, Fw, generator=gen)
    torch.testing.assert_close(moe_ffn(x, weights, experts, w_gu, w_d),
                               moe_ffn_reference(x, weights, experts, w_gu, w_d))
    _use(monkeypatch, "native", "cpu")
    with pytest.raises(ValueError, match="at most 1024 experts, got E = 1100"):
        moe_ffn(x, weights, experts, w_gu, w_d)


def test_registration_and_examples():
    spec = backend.registered_ops()["moe_ffn"]
    assert "torch" in spec.impls and spec.fn is moe_ffn
    assert torch.float64 in spec.impls["torch"].dtypes
    label, args, kwargs = spec.examples(torch.device("cpu"), torch.float32)[0]
    assert "Mixtral" in label and args[2].shape == (512, 2)
    assert all(args[i].requires_grad for i in (0, 1, 3, 4))


# ---- errors ------------------------------------------------------------------------------

def _good():
    return _inputs("cpu", torch.float32, 6, 10, 4, 3, 2)


def _with(i, value):
    args = list(_good())
    args[i] = value
    return args


@pytest.mark.parametrize("args,match", [
    (_with(4, torch.zeros(4, 10, 4)), r"w_down: expected \[E, D, F\] = \[3, 10, 4\] "
     r"\(w_gate_up is \[3, 8, 10\], x is \[6, 10\]\), got \[4, 10, 4\]"),
    (_with(4, torch.zeros(3, 11, 4)), r"w_down: expected \[E, D, F\] = \[3, 10, 4\].*"
     r"got \[3, 11, 4\]"),
    (_with(4, torch.zeros(3, 10, 5)), r"w_down: expected \[E, D, F\] = \[3, 10, 4\].*"
     r"got \[3, 10, 5\]"),
    (_with(3, torch.zeros(3, 8, 9)), r"w_gate_up: expected hidden size D = 10 in \[E, 2F, D\] "
     r"\(x is \[6, 10\]\), got \[3, 8, 9\]"),
    (_with(3, torch.zeros(3, 7, 10)), r"w_gate_up: expected \[E, 2F, D\].*got \[3, 7, 10\]"),
    (_with(1, torch.zeros(6, 3)), r"weights: expected \[N, K\] = \[6, 2\] \(experts is "
     r"\[6, 2\]\), got \[6, 3\]"),
    (_with(2, torch.zeros(5, 2, dtype=torch.long)), r"experts: expected \[N, K\] with N = 6 "
     r"\(x is \[6, 10\]\) and 1 <= K <= 8, got \[5, 2\]"),
    (_with(2, torch.zeros(6, 9, dtype=torch.long)), r"1 <= K <= 8, got \[6, 9\]"),
    (_with(2, torch.full((6, 2), 3)), r"experts: expected expert ids in \[0, 3\), got 3"),
    (_with(2, torch.full((6, 2), -1)), r"expert ids in \[0, 3\), got -1"),
    (_with(2, torch.zeros(6, 2)), "experts: expected int32 or int64, got float32"),
    (_with(0, torch.zeros(6, 10, dtype=torch.bfloat16)),
     "w_gate_up: expected x's dtype bfloat16, got float32"),
    (_with(1, torch.zeros(6, 2, dtype=torch.float16)),
     "weights: expected float32, got float16"),
    ([t.to(torch.bfloat16) if t.is_floating_point() else t for t in _good()[:1]] +
     [torch.zeros(6, 2, dtype=torch.float16)] +
     [t.to(torch.bfloat16) if t.is_floating_point() else t for t in _good()[2:]],
     "weights: expected x's dtype bfloat16 or float32, got float16"),
    (_with(0, torch.zeros(6, 10, dtype=torch.int32)), "x: expected dtype"),
    (_with(0, torch.zeros(6, 2, 10)), "x: expected 2 dimensions"),
    (_with(3, torch.zeros(3, 8, 10, device="meta")),
     "w_gate_up: expected a tensor on x's device cpu, got one on meta"),
])
def test_errors_name_the_argument_and_both_shapes(args, match):
    with pytest.raises(ValueError, match=match):
        moe_ffn(*args)


@pytest.mark.gpu
def test_gpu_expert_ids_are_checked_in_debug_mode(monkeypatch):
    x, w, e, w_gu, w_d = (t.cuda() for t in _good())
    monkeypatch.setenv("KERNELRL_DEBUG", "1")
    with pytest.raises(ValueError, match=r"expert ids in \[0, 3\), got 5"):
        moe_ffn(x, w, torch.full_like(e, 5), w_gu, w_d)
