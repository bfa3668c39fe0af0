"""MoE Triton stage functions (kernelrl.ops.moe.triton_impl) against float64 references
written here from the contract: the permutation by a stable torch.sort, per-expert
matmuls and autograd in float64.

Each stage is checked on the inputs it is given (the previous stage's kernel output), at
odd shapes: N=37, D=67, F=45, E=5, K=2 with an expert that receives no token; every token
on one expert (several row tiles of it); N=1; E=64 with K=8 at tiny D/F; E=1; N=0. Also:
fp32/fp16/bf16; every buffer the launchers allocate poisoned (NaN, or INT32_MIN); small
tiles (several permutation tiles, scan steps and expert chunks; partial row tiles, K steps
and grouped program order); strided inputs; fp32 weights under bf16 activations; bitwise
determinism of two runs; bad arguments; the debug-mode check of expert ids. The sm_90
compile of the kernels is tests/ops/test_triton_compile.py (the modules' AOT_SIGNATURES).

Runs under the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 when
there is no GPU) and compiled on a GPU.
"""

import re

import pytest
import torch
import torch.nn.functional as F

from backends import DEVICES
from kernelrl import backend
from kernelrl.ops.moe import triton_impl
from numerics import check

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["fp32", "fp16", "bf16"]
EMPTY_EXPERT = 3
# name: (N, D, F, E, K, routing)
CASES = {
    "odd": (37, 67, 45, 5, 2, "skip"),          # expert 3 receives no token
    "one_expert": (130, 33, 20, 3, 1, "one"),   # all 130 rows on expert 1: 3 row tiles
    "one_token": (1, 67, 45, 5, 2, "random"),
    "many_experts": (8, 16, 8, 64, 8, "random"),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every buffer the launchers allocate starts as NaN (floats) or INT32_MIN (ints)."""
    def poisoned(*shape, dtype, device):
        t = torch.empty(shape, dtype=dtype, device=device)
        return t.fill_(float("nan") if dtype.is_floating_point else -2 ** 31)
    monkeypatch.setattr(triton_impl, "_empty", poisoned)


@pytest.fixture(params=DEVICES)
def device(request):
    name = request.param
    if name == "cpu" and not backend.triton_interpret():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    return name


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles small enough for several permutation tiles, scan blocks and expert chunks,
    partial row tiles, several K steps and row steps, and grouped program order."""
    gemm = {"gate_up": dict(BLOCK_M=16, BLOCK_F=16, BLOCK_K=32, GROUP_M=4),
            "grouped": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4),
            "wgrad": dict(BLOCK_P=32, BLOCK_Q=32, BLOCK_R=16)}
    monkeypatch.setattr(triton_impl, "_gemm_config",
                        lambda kind, dtype, P, Q: gemm[kind] | dict(num_warps=4, num_stages=1))
    monkeypatch.setattr(triton_impl, "_permute_config",
                        lambda E: dict(BLOCK_S=16, BLOCK_E=16, BLOCK_T=4))
    monkeypatch.setattr(triton_impl, "_combine_config", lambda D: (16, 32, 4))


# ---------------------------------------------------------------------------------------
# inputs and float64 references
# ---------------------------------------------------------------------------------------

def routing(N, E, K, kind, device):
    """experts [N, K] int64 (distinct per token) and softmax weights [N, K] fp32."""
    if kind == "one":
        experts = torch.full((N, K), 1, dtype=torch.long)
    else:
        pool = [e for e in range(E) if not (kind == "skip" and e == EMPTY_EXPERT)]
        pool = torch.tensor(pool)
        experts = torch.cat([pool[torch.randperm(len(pool))[:K]][None] for _ in range(N)]
                            + [torch.zeros(0, K, dtype=torch.long)])
    weights = torch.softmax(torch.randn(N, K), dim=-1)
    return experts.to(device), weights.to(device)


def make_inputs(case, dtype, device, weight_dtype=None):
    N, D, Fw, E, K, kind = CASES[case] if isinstance(case, str) else case
    wdt = weight_dtype or dtype
    experts, weights = routing(N, E, K, kind, device)
    return dict(
        N=N, D=D, F=Fw, E=E, K=K, experts=experts,
        weights=weights.to(dtype if weight_dtype is None else weight_dtype),
        x=torch.randn(N, D, device=device).to(dtype),
        w_gate_up=(torch.randn(E, 2 * Fw, D, device=device) / D ** 0.5).to(wdt),
        w_down=(torch.randn(E, D, Fw, device=device) / Fw ** 0.5).to(wdt),
        dy=torch.randn(N, D, device=device).to(dtype))


def ref_permute(experts, E):
    flat = experts.flatten().long().cpu()
    order = torch.sort(flat, stable=True).indices
    offsets = torch.cat([torch.zeros(1, dtype=torch.long),
                         torch.bincount(flat, minlength=E).cumsum(0)])
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel())
    return order, offsets, position


def f64(t):
    return t.detach().double().cpu()


def expert_rows(offsets):
    """[(e, lo, hi)] of the sorted rows of each expert."""
    off = offsets.tolist()
    return [(e, off[e], off[e + 1]) for e in range(len(off) - 1)]


def ref_gate_up(x, order, offsets, w, K):
    """h in float64, per expert; x and w float64 (autograd flows through)."""
    Fw = w.shape[1] // 2
    tokens = order.long() // K
    h = []
    for e, lo, hi in expert_rows(offsets):
        xs = x[tokens[lo:hi]]
        h.append(F.silu(xs @ w[e, :Fw].T) * (xs @ w[e, Fw:].T))
    return torch.cat(h) if h else x.new_zeros(0, Fw)


def ref_down(h, offsets, w):
    return torch.cat([h[lo:hi] @ w[e].T for e, lo, hi in expert_rows(offsets)])


def ref_combine(o, position, weights):
    N, K = weights.shape
    return (weights[:, :, None] * o[position.long()].view(N, K, -1)).sum(1)


def grads(out, grad, *inputs):
    return torch.autograd.grad(out, inputs, grad)


# ---------------------------------------------------------------------------------------
# the stages, each against its reference on the inputs it is given
# ---------------------------------------------------------------------------------------

def run_stages(t):
    ti, K, E = triton_impl, t["K"], t["E"]
    order, offsets, position = ti.permute(t["experts"], E)
    h, gu = ti.gate_up(t["x"], order, offsets, t["w_gate_up"], K)
    assert gu is None
    o = ti.down(h, offsets, t["w_down"])
    y = ti.combine(o, position, t["weights"])
    do, dweights = ti.combine_backward(t["dy"], o, position, t["weights"])
    dh, dw_down = ti.down_backward(do, h, offsets, t["w_down"])
    dx, dw_gate_up = ti.gate_up_backward(dh, gu, t["x"], order, position, offsets,
                                         t["w_gate_up"], K)
    return dict(order=order, offsets=offsets, position=position, h=h, o=o, y=y, do=do,
                dweights=dweights, dh=dh, dw_down=dw_down, dx=dx, dw_gate_up=dw_gate_up)


def check_stages(t, r, dtype):
    K, E = t["K"], t["E"]
    # -- permutation: exact
    order, offsets, position = ref_permute(t["experts"], E)
    for name, ref in (("order", order), ("offsets", offsets), ("position", position)):
        assert r[name].dtype == torch.int32, f"{name}: dtype {r[name].dtype}"
        assert torch.equal(r[name].long().cpu(), ref), f"{name}: {r[name]} != {ref}"
    # -- forward, each stage from the kernel's previous output
    x = f64(t["x"]).requires_grad_()
    w_gu = f64(t["w_gate_up"]).requires_grad_()
    h_ref = ref_gate_up(x, order, offsets, w_gu, K)
    check("h", r["h"], h_ref, None, dtype)
    h = f64(r["h"]).requires_grad_()
    w_d = f64(t["w_down"]).requires_grad_()
    o_ref = ref_down(h, offsets, w_d)
    check("o", r["o"], o_ref, None, dtype)
    o = f64(r["o"]).requires_grad_()
    weights = f64(t["weights"]).requires_grad_()
    y_ref = ref_combine(o, position, weights)
    check("y", r["y"], y_ref, None, dtype)
    # -- backward, by float64 autograd of the same references
    do_ref, dweights_ref = grads(y_ref, f64(t["dy"]), o, weights)
    check("do", r["do"], do_ref, None, dtype)
    check("dweights", r["dweights"], dweights_ref, None, t["weights"].dtype)
    o_ref = ref_down(h, offsets, w_d)
    dh_ref, dw_down_ref = grads(o_ref, f64(r["do"]), h, w_d)
    check("dh", r["dh"], dh_ref, None, dtype)
    check("dw_down", r["dw_down"], dw_down_ref, None, dtype)
    dx_ref, dw_gate_up_ref = grads(h_ref, f64(r["dh"]), x, w_gu)
    check("dx", r["dx"], dx_ref, None, dtype)
    check("dw_gate_up", r["dw_gate_up"], dw_gate_up_ref, None, dtype)
    for name, like in (("h", "x"), ("o", "x"), ("y", "x"), ("do", "x"), ("dh", "x"),
                       ("dx", "x"), ("dweights", "weights"), ("dw_down", "w_down"),
                       ("dw_gate_up", "w_gate_up")):
        assert r[name].dtype == t[like].dtype, f"{name}: dtype {r[name].dtype}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_stages(case, dtype, device):
    t = make_inputs(case, dtype, device)
    r = run_stages(t)
    check_stages(t, r, dtype)
    if case == "odd":       # the expert without tokens gets zero weight gradients
        assert not r["dw_down"][EMPTY_EXPERT].any()
        assert not r["dw_gate_up"][EMPTY_EXPERT].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_small_tiles_deterministic(small_tiles, dtype, device):
    t = make_inputs("odd", dtype, device)
    first = run_stages(t)
    check_stages(t, first, dtype)
    second = run_stages(t)
    for name, value in first.items():
        assert torch.equal(value, second[name]), f"{name}: two runs differ"


def test_small_tiles_one_expert(small_tiles, device):
    t = make_inputs("one_expert", torch.float32, device)
    check_stages(t, run_stages(t), torch.float32)


def test_strided_inputs(device):
    """Transposed storage for x, dy, the weights and experts; a column slice for weights."""
    t = make_inputs("odd", torch.float16, device)
    for name in ("x", "dy", "experts"):
        t[name] = t[name].T.contiguous().T
    for name in ("w_gate_up", "w_down"):
        t[name] = t[name].transpose(1, 2).contiguous().transpose(1, 2)
    t["weights"] = torch.cat([t["weights"], t["weights"]], dim=1)[:, ::2]
    assert not t["x"].is_contiguous() and not t["w_down"].is_contiguous()
    check_stages(t, run_stages(t), torch.float16)


def test_fp32_weights_bf16_activations(device):
    t = make_inputs("odd", torch.bfloat16, device, weight_dtype=torch.float32)
    check_stages(t, run_stages(t), torch.bfloat16)


def test_permute_index_dtypes(small_tiles, device):
    experts, _ = routing(37, 64, 8, "random", device)
    ref = ref_permute(experts, 64)
    for idx in (experts.int(), experts.to(torch.uint8)):
        for got, want in zip(triton_impl.permute(idx, 64), ref):
            assert torch.equal(got.long().cpu(), want)


def test_single_expert(device):
    t = make_inputs((5, 16, 8, 1, 1, "random"), torch.float32, device)
    check_stages(t, run_stages(t), torch.float32)


def test_no_tokens(device):
    t = make_inputs((0, 67, 45, 5, 2, "random"), torch.float32, device)
    r = run_stages(t)
    assert r["offsets"].tolist() == [0] * 6
    assert r["y"].shape == (0, 67) and r["dx"].shape == (0, 67)
    assert r["h"].shape == (0, 45) and r["o"].shape == (0, 67)
    assert not r["dw_down"].any() and not r["dw_gate_up"].any()


# ---------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------

def test_bad_arguments(device):
    ti = triton_impl
    t = make_inputs("odd", torch.float32, device)
    x, wgu, wd, K = t["x"], t["w_gate_up"], t["w_down"], t["K"]
    order, offsets, position = ti.permute(t["experts"], t["E"])
    h, _ = ti.gate_up(x, order, offsets, wgu, K)
    cases = [
        (lambda: ti.permute(t["experts"].float(), 5), "experts: expected dtype"),
        (lambda: ti.permute(t["experts"], 0), "num_experts: expected a Python int >= 1"),
        (lambda: ti.permute(t["experts"].repeat(1, 5), 5), "experts (columns K): expected 1"),
        (lambda: ti.gate_up(x, order, offsets, wgu, 3), "order: expected shape (111,)"),
        (lambda: ti.gate_up(x, order, offsets, wgu, 9), "k: expected 1 <= K <= 8"),
        (lambda: ti.gate_up(x, order.long(), offsets, wgu, K), "order: expected dtype"),
        (lambda: ti.gate_up(x, order, offsets[:-1], wgu, K), "offsets: expected shape (6,)"),
        (lambda: ti.gate_up(x, order, offsets, wgu[:, :-1], K), "w_gate_up: expected an even"),
        (lambda: ti.gate_up(x, order, offsets, wgu[..., :-1], K),
         "w_gate_up: expected shape (*, *, 67)"),
        (lambda: ti.gate_up(x.double(), order, offsets, wgu, K), "x: expected dtype"),
        (lambda: ti.gate_up_backward(h, h, x, order, position, offsets, wgu, K),
         "gu: expected None"),
        (lambda: ti.down(h, offsets, wd[..., :-1]), "w_down: expected shape (*, *, 45)"),
        (lambda: ti.down_backward(h.new_zeros(74, 67).half(), h, offsets, wd),
         "h: expected dtype float16 (that of do)"),
        (lambda: ti.combine_backward(t["dy"][:-1], h, position, t["weights"]),
         "dy: expected shape (37, 45)"),
        (lambda: ti.combine(h, position[:-1], t["weights"]), "position: expected shape (74,)"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            fn()


def test_out_of_range_ids_stay_in_bounds(device):
    """Without KERNELRL_DEBUG an id outside [0, E) is not checked: its slot is dropped
    (position −1, not counted), and nothing reads or writes out of bounds."""
    t = make_inputs((6, 16, 8, 4, 2, "random"), torch.float32, device)
    t["experts"][2, 1] = 4
    r = run_stages(t)
    assert r["position"][5].item() == -1 and r["offsets"][-1].item() == 11
    for name in ("y", "do", "dweights", "dx", "dw_down", "dw_gate_up"):
        value = r[name][:11] if name == "do" else r[name]
        assert value.isfinite().all(), f"{name}: not finite"
    assert r["dweights"][2, 1].item() == 0.0


def test_debug_checks_expert_ids(monkeypatch, device):
    experts, _ = routing(5, 4, 2, "random", device)
    experts[2, 1] = 4
    monkeypatch.setenv("KERNELRL_DEBUG", "1")
    with pytest.raises(ValueError, match=r"experts: expected ids in \[0, 4\), got 4"):
        triton_impl.permute(experts, 4)
