"""dpo_loss (every loss type) and reward_loss against float64 references written out here."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from backends import use_backend
from kernelrl import backend
from kernelrl.backend import BackendError
from kernelrl.ops.preference import LOSS_TYPES, dpo_loss, reward_loss
from numerics import check

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TAU = 0.05


def smoothing(loss_type: str) -> float:
    """A label_smoothing every loss type accepts (exo_pair needs one in (0, 1))."""
    return 0.2 if loss_type in ("sigmoid", "robust", "exo_pair") else 0.0


# ---------------------------------------------------------------------------------------
# the oracle: TRL's formulas, written out independently of the module, run in float64
# ---------------------------------------------------------------------------------------

def reference(pc, pr, rc, rr, beta, loss_type, eps=0.0, tau=TAU):
    """Per-pair losses, with TRL's F.logsigmoid; DiscoPOP's exp(−z)·m is taken as 0 where m
    underflows to 0 (there exp(−z) may overflow, and inf·0 would be NaN)."""
    logsig, sig = F.logsigmoid, torch.sigmoid
    logits = (pc - pr) - (rc - rr)              # TRL: pi_logratios − ref_logratios
    z = beta * logits
    a, b = pc - rc, pr - rr                     # chosen and rejected log-ratios
    if loss_type == "sigmoid":
        return -logsig(z) * (1 - eps) - logsig(-z) * eps
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.clamp(1 - z, min=0)
    if loss_type == "robust":
        return (-logsig(z) * (1 - eps) + logsig(-z) * eps) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        return sig(z) * (logsig(z) - math.log(1 - eps)) + sig(-z) * (logsig(-z) - math.log(eps))
    if loss_type == "nca_pair":
        return -logsig(beta * a) - 0.5 * logsig(-beta * a) - 0.5 * logsig(-beta * b)
    if loss_type == "bco_pair":
        return -logsig(beta * a) - logsig(-beta * b)
    if loss_type == "sppo_hard":
        return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return (1 - sig(beta * a)) + sig(beta * b)
    if loss_type == "apo_down":
        return sig(beta * a) + (1 - sig(beta * (a - b)))
    assert loss_type == "discopop"
    m = sig(z / tau)
    live = m > 0
    safe_z = torch.where(live, z, torch.zeros_like(z))   # no exp overflow, even unselected
    return -logsig(z) * (1 - m) + torch.where(live, torch.exp(-safe_z) * m, torch.zeros_like(z))


def make_pairs(batch, dtype, *, spread=2.0, seed=0):
    """Summed log-probs of a realistic size, the policy within ``spread`` of the reference."""
    gen = torch.Generator().manual_seed(seed)
    pc, pr = (-200 + 30 * torch.randn(2, batch, generator=gen)).unbind(0)
    rc = pc + spread * torch.randn(batch, generator=gen)
    rr = pr + spread * torch.randn(batch, generator=gen)
    return [t.to(dtype) for t in (pc, pr, rc, rr)]


def run(fn, inputs, upstream, **kw):
    """Losses and the gradients of (losses · upstream).sum() w.r.t. all four inputs."""
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*xs, **kw)
    losses = out[0] if isinstance(out, tuple) else out
    (losses * upstream.to(losses.dtype)).nansum().backward()
    return losses.detach(), [x.grad for x in xs]


def compare(inputs, beta, loss_type, eps, *, tau=TAU, ill_conditioned=False):
    dtype = inputs[0].dtype
    upstream = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))
    kw = dict(beta=beta, loss_type=loss_type, label_smoothing=eps, discopop_tau=tau)
    out, grads = run(dpo_loss, inputs, upstream, **kw)
    rkw = dict(beta=beta, loss_type=loss_type, eps=eps, tau=tau)
    ref, ref_grads = run(reference, [t.double() for t in inputs], upstream.double(), **rkw)
    # eager torch in the input dtype: upcast inside, so its gradients round to that dtype too
    eager, eager_grads = run(lambda *a, **k: reference(*(t.float() for t in a), **k), inputs,
                             upstream, **rkw)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check(f"{loss_type} losses", out, ref, eager, dtype, ill_conditioned)
    for name, g, r, e in zip("pc pr rc rr".split(), grads, ref_grads, eager_grads):
        assert g.dtype == dtype
        check(f"{loss_type} grad {name}", g, r, e, dtype, ill_conditioned)
    return out, grads


# ---------------------------------------------------------------------------------------
# every loss type against the float64 reference, values and gradients
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_float64_reference(loss_type, dtype):
    compare(make_pairs(257, dtype), 0.1, loss_type, smoothing(loss_type))


@pytest.mark.parametrize("beta", [0.01, 0.5, 2.0])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_other_betas_and_no_smoothing(loss_type, beta):
    eps = 1e-3 if loss_type == "exo_pair" else 0.0
    # apo_down at β = 0.01: ∂/∂π_c = β·(σ′(βc) − σ′(βx)), two terms near β/4 = 2.5e-3 whose
    # difference is ~1e-6: float32 itself cannot meet 1e-5 there (eager torch's error is the
    # same 6e-5), so only the 2x-eager bound applies.
    ill = loss_type == "apo_down" and beta == 0.01
    compare(make_pairs(33, torch.float32, spread=5.0, seed=3), beta, loss_type, eps,
            ill_conditioned=ill)


@settings(deadline=None, max_examples=25, derandomize=True)
@given(loss_type=st.sampled_from(LOSS_TYPES), batch=st.integers(1, 40),
       beta=st.floats(0.02, 3.0), spread=st.floats(0.01, 20.0), seed=st.integers(0, 999))
def test_hypothesis_matches_reference(loss_type, batch, beta, spread, seed):
    compare(make_pairs(batch, torch.float32, spread=spread, seed=seed), beta, loss_type,
            smoothing(loss_type))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_float64(loss_type):
    inputs = [t.requires_grad_() for t in make_pairs(5, torch.float64, seed=7)]
    eps = smoothing(loss_type)
    assert torch.autograd.gradcheck(
        lambda *a: dpo_loss(*a, beta=0.3, loss_type=loss_type, label_smoothing=eps)[0],
        inputs)


def test_rewards_are_beta_times_log_ratios_and_detached():
    pc, pr, rc, rr = [t.requires_grad_() for t in make_pairs(9, torch.float32)]
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.25)
    assert losses.requires_grad and not chosen.requires_grad and not rejected.requires_grad
    torch.testing.assert_close(chosen, 0.25 * (pc - rc).detach(), rtol=0, atol=0)
    torch.testing.assert_close(rejected, 0.25 * (pr - rr).detach(), rtol=0, atol=0)


def test_gradients_flow_to_policy_only_when_the_reference_is_frozen():
    pc, pr, rc, rr = make_pairs(6, torch.float32)
    pc.requires_grad_(), pr.requires_grad_()
    dpo_loss(pc, pr, rc, rr)[0].sum().backward()
    assert pc.grad is not None and pr.grad is not None and rc.grad is None
    torch.testing.assert_close(pc.grad, -pr.grad)   # sigmoid DPO depends on c − r only


# ---------------------------------------------------------------------------------------
# hand-computed values: c = π_c − ρ_c = 1, r = π_r − ρ_r = −1, so x = 2
# ---------------------------------------------------------------------------------------

# log σ(1) = −0.31326168751822286, log σ(−1) = −1.3132616875182228
HAND = [
    # (loss_type, beta, label_smoothing, expected loss at x = 2)
    ("sigmoid", 0.5, 0.0, 0.31326168751822286),      # −logσ(1)
    ("sigmoid", 0.5, 0.1, 0.4132616875182229),       # −0.9·logσ(1) − 0.1·logσ(−1)
    ("ipo", 0.5, 0.0, 1.0),                          # (2 − 1/(2·0.5))²
    ("ipo", 0.1, 0.0, 9.0),                          # (2 − 5)²
    ("hinge", 0.5, 0.0, 0.0),                        # relu(1 − 1)
    ("hinge", 0.1, 0.0, 0.8),                        # relu(1 − 0.2)
    ("robust", 0.5, 0.0, 0.31326168751822286),       # ε = 0: plain DPO
    ("robust", 0.5, 0.1, 0.1882616875182229),        # (0.9·0.31326… − 0.1·1.31326…) / 0.8
    # σ(1)·(logσ(1) − log 0.9) + σ(−1)·(logσ(−1) − log 0.1)
    ("exo_pair", 0.5, 0.1, 0.11408210766749785),
    ("nca_pair", 0.5, 0.0, 1.1981539683602134),      # −logσ(.5) − ½logσ(−.5) − ½logσ(.5)
    ("bco_pair", 0.5, 0.0, 0.9481539683602134),      # −logσ(.5) − logσ(.5)
    ("sppo_hard", 0.5, 0.0, 0.0),                    # (1 − 1)² + (−1 + 1)²
    ("sppo_hard", 0.1, 0.0, 32.0),                   # (1 − 5)² + (−1 + 5)²
    ("apo_zero", 0.5, 0.0, 0.7550813375962908),      # 1 − σ(.5) + σ(−.5)
    ("apo_down", 0.5, 0.0, 0.8914007525718496),      # σ(.5) + 1 − σ(1)
    ("discopop", 0.5, 0.0, 0.3678794410588668),      # z = 1, m = σ(20): ≈ e^−1
    ("discopop", 0.05, 0.0, 0.8737921186731876),     # z = 0.1, m = σ(2)
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("loss_type,beta,eps,expected", HAND)
def test_hand_computed(loss_type, beta, eps, expected, dtype):
    # π_c = −10, ρ_c = −11 (c = 1); π_r = −12, ρ_r = −11 (r = −1)
    pc, pr, rc, rr = (torch.tensor([v], dtype=dtype) for v in (-10.0, -12.0, -11.0, -11.0))
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                                        label_smoothing=eps)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert losses.item() == pytest.approx(expected, rel=tol, abs=tol)
    assert chosen.item() == pytest.approx(beta) and rejected.item() == pytest.approx(-beta)


@pytest.mark.parametrize("loss_type,x,eps,expected", [
    # z = −2: σ(−2)·(logσ(−2) − log 0.7) + σ(2)·(logσ(2) − log 0.3)
    ("exo_pair", -4.0, 0.3, 0.7376385684574855),
    ("discopop", -2.0, 0.0, 1.3132616904141852),   # z = −1: 1.31326…·(1 − σ(−20)) + e·σ(−20)
    ("sigmoid", -2.0, 0.0, 1.3132616875182228),    # −logσ(−1)
])
def test_hand_computed_second_point(loss_type, x, eps, expected):
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (x, 0.0, 0.0, 0.0))
    losses = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type=loss_type, label_smoothing=eps)[0]
    assert losses.item() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------
# extreme inputs, NaN
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_extreme_log_ratios_stay_finite(loss_type, dtype):
    """|x| up to 2e4: every loss here is finite in exact math, and so must ours be (DiscoPOP's
    exp(−z)·σ(z/τ) included), with gradients that match the stable float64 reference."""
    c = torch.tensor([1e4, -1e4, 3e3, -3e3, 50.0, -50.0, 0.0, 1e4, 600.0])
    r = torch.tensor([-1e4, 1e4, 0.0, 0.0, 0.0, 0.0, 0.0, 1e4, 1100.0])   # x = c − r: ±2e4 …
    pc, pr = (-100 + c).to(dtype), (-100 + r).to(dtype)
    rc = rr = torch.full_like(pc, -100.0)
    out, grads = compare([pc, pr, rc, rr], 0.1, loss_type, smoothing(loss_type))
    assert torch.isfinite(out).all(), out
    for g in grads:
        assert torch.isfinite(g).all(), g


@pytest.mark.parametrize("tau", [0.7, 0.99])
def test_discopop_far_below_zero_with_tau_near_one(tau):
    """z ≪ 0 with τ near 1: exp(−z)·σ(z/τ) = exp(z·(1/τ − 1)) is not negligible there (e.g.
    e^−1 at z = −100, τ = 0.99), although exp(−z) alone overflows float32."""
    x = torch.tensor([-60.0, -90.0, -100.0, -150.0, -300.0, -40.0, 10.0])
    zeros = torch.zeros_like(x)
    compare([x - 5, zeros - 5, zeros, zeros], 1.0, "discopop", 0.0, tau=tau)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_nan_stays_in_its_pair(loss_type):
    pc, pr, rc, rr = make_pairs(5, torch.float32)
    pr[2] = float("nan")
    pc.requires_grad_()
    losses = dpo_loss(pc, pr, rc, rr, loss_type=loss_type, label_smoothing=smoothing(loss_type))[0]
    losses.sum().backward()
    nan_at = torch.tensor([False, False, True, False, False])
    assert torch.equal(losses.isnan(), nan_at)
    # Losses that are a sum of a term in c and a term in r: c's gradient stays finite;
    # hinge: relu's backward passes 0 at NaN. Every other gradient is NaN in that pair only.
    finite = loss_type in ("nca_pair", "bco_pair", "sppo_hard", "apo_zero", "hinge")
    assert torch.equal(pc.grad.isnan(), torch.zeros_like(nan_at) if finite else nan_at)


# ---------------------------------------------------------------------------------------
# torch.compile, dispatch
# ---------------------------------------------------------------------------------------

def _all_losses(pc, pr, rc, rr):
    total = 0
    for loss_type in LOSS_TYPES:
        losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=loss_type,
                                            label_smoothing=smoothing(loss_type))
        total = total + losses * (1 + LOSS_TYPES.index(loss_type)) + chosen - rejected
    return total + reward_loss(pc / 100, pr / 100, margin=rc - rr, center_coef=0.1)


def test_compiles_with_fullgraph_every_loss_type():
    """One graph holding every loss type and reward_loss: no graph break, forward and
    backward equal to eager."""
    torch._dynamo.reset()
    inputs = make_pairs(11, torch.float32, seed=5)
    upstream = torch.randn(11)
    compiled = torch.compile(_all_losses, fullgraph=True)
    out_c, grads_c = run(compiled, inputs, upstream)
    out_e, grads_e = run(_all_losses, inputs, upstream)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["dpo_loss", "reward_loss"])
def test_registered_with_torch_only_and_forcing_another_backend_runs_torch(monkeypatch, op):
    assert set(backend.registered_ops()[op].impls) == {"torch"}
    use_backend(monkeypatch, "torch", "cpu", op=op)
    pc, pr, rc, rr = make_pairs(3, torch.float32)
    call = (lambda: dpo_loss(pc, pr, rc, rr)) if op == "dpo_loss" else (lambda: reward_loss(pc, pr))
    expected = call()
    monkeypatch.setenv("KERNELRL_BACKEND", "triton")   # kernels forced: this op has none
    assert backend.select(op, torch.device("cpu"), torch.float32) == "torch"
    got = call()
    for a, b in zip(expected if isinstance(expected, tuple) else (expected,),
                    got if isinstance(got, tuple) else (got,)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# reward_loss
# ---------------------------------------------------------------------------------------

def test_reward_loss_hand_computed():
    s_c = torch.tensor([2.0, 0.0], dtype=torch.float64)
    s_r = torch.tensor([1.0, 1.0], dtype=torch.float64)
    # (−logσ(1) − logσ(−1)) / 2
    assert reward_loss(s_c, s_r).item() == pytest.approx(0.8132616875182228, rel=1e-12)
    # margin 0.5: (−logσ(0.5) − logσ(−1.5)) / 2
    assert reward_loss(s_c, s_r, margin=0.5).item() == pytest.approx(1.0877451310814297, rel=1e-12)
    # per-pair margins [0.5, −1]: (−logσ(0.5) + log 2) / 2
    margin = torch.tensor([0.5, -1.0], dtype=torch.float64)
    assert reward_loss(s_c, s_r, margin=margin).item() == pytest.approx(0.5836120823700259,
                                                                        rel=1e-12)
    # centering 0.1·mean([3², 1²]) = 0.5 on top of the first
    assert reward_loss(s_c, s_r, center_coef=0.1).item() == pytest.approx(1.3132616875182228,
                                                                          rel=1e-12)


def _reward_reference(s_c, s_r, margin, center_coef):
    diff = s_c - s_r - (0 if margin is None else margin)
    loss = torch.mean(-torch.log(torch.sigmoid(diff)))
    return loss + (0 if center_coef is None else center_coef * torch.mean((s_c + s_r) ** 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("margin,center_coef", [(None, None), (0.3, 0.01), ("tensor", 0.05)])
def test_reward_loss_matches_float64_reference(dtype, margin, center_coef):
    gen = torch.Generator().manual_seed(11)
    s_c, s_r, m = (2 * torch.randn(3, 301, generator=gen)).to(dtype).unbind(0)
    margin = m.abs() if margin == "tensor" else margin
    upstream = torch.tensor(1.7)

    def grads(fn, cast):
        xs = [cast(t).requires_grad_() for t in (s_c, s_r)]
        mm = cast(margin) if isinstance(margin, torch.Tensor) else margin
        loss = fn(*xs, mm, center_coef)
        (loss * upstream.to(loss.dtype)).backward()
        return loss.detach(), [x.grad for x in xs]

    out, g = grads(lambda a, b, mm, cc: reward_loss(a, b, margin=mm, center_coef=cc),
                   lambda t: t.detach().clone())
    ref, g_ref = grads(_reward_reference, lambda t: t.detach().double())
    # eager torch in the input dtype: upcast inside, its gradients rounded to that dtype
    eager, g_eager = grads(lambda a, b, mm, cc: _reward_reference(
        a.float(), b.float(), mm.float() if isinstance(mm, torch.Tensor) else mm, cc),
        lambda t: t.detach().clone())
    assert out.shape == () and out.dtype == torch.float32
    check("reward loss", out, ref, eager, dtype)
    for a, r, e in zip(g, g_ref, g_eager):
        check("reward grad", a, r, e, dtype)


def test_reward_loss_extreme_and_nan():
    s_c = torch.tensor([1e4, -1e4, 0.0])
    s_r = torch.tensor([-1e4, 1e4, 0.0], requires_grad=True)
    loss = reward_loss(s_c, s_r)
    loss.backward()
    assert loss.item() == pytest.approx((2e4 + math.log(2)) / 3)
    assert torch.isfinite(s_r.grad).all()
    assert reward_loss(s_c, torch.tensor([0.0, float("nan"), 0.0])).isnan()


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------

def _pairs():
    return make_pairs(4, torch.float32)


@pytest.mark.parametrize("change,message", [
    (lambda t: t.__setitem__(3, t[3][:3]), r"ref_rejected_logps: expected shape \(4,\)"),
    (lambda t: t.__setitem__(1, t[1].double()), "rejected_logps: expected dtype torch.float32"),
    (lambda t: t.__setitem__(2, t[2].to("meta")), "ref_chosen_logps: expected a tensor on cpu"),
    (lambda t: t.__setitem__(0, t[0].reshape(2, 2)), "chosen_logps: expected 1 dimensions"),
    (lambda t: t.__setitem__(0, t[0].long()), "chosen_logps: expected dtype in"),
    (lambda t: t.__setitem__(2, [1.0] * 4), "ref_chosen_logps: expected a torch.Tensor"),
])
def test_bad_tensors_name_the_argument(change, message):
    inputs = _pairs()
    change(inputs)
    with pytest.raises(ValueError, match=message):
        dpo_loss(*inputs)


@pytest.mark.parametrize("kwargs,message", [
    ({"loss_type": "kto_pair"}, r"loss_type: expected one of \('sigmoid', 'ipo', 'hinge'"),
    ({"beta": 0.0}, "beta: expected a finite value in"),
    ({"beta": -1.0}, "beta: expected a finite value in"),
    ({"beta": float("nan")}, "beta: expected a finite value in"),
    ({"beta": float("inf")}, "beta: expected a finite value in"),
    ({"beta": torch.tensor(0.1)}, "beta: expected a Python float"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, r"label_smoothing: .*\[0.0, 0.5\).*robust"),
    ({"loss_type": "exo_pair", "label_smoothing": 0.0},
     r"label_smoothing: .*\(0.0, 1.0\).*exo_pair"),
    ({"loss_type": "exo_pair", "label_smoothing": 1.0}, r"label_smoothing: .*exo_pair"),
    ({"label_smoothing": -0.1}, r"label_smoothing: expected a finite value in \[0.0, 1.0\]"),
    ({"loss_type": "discopop", "discopop_tau": 0.0}, "discopop_tau: expected a finite value"),
])
def test_bad_options_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dpo_loss(*_pairs(), **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"margin": torch.zeros(3)}, r"margin: expected a float or a tensor of shape \(4,\)"),
    ({"margin": float("nan")}, "margin: expected a finite value"),
    ({"margin": "0.5"}, "margin: expected a Python float"),
    ({"center_coef": -0.1}, r"center_coef: expected a finite value in \[0.0, inf\)"),
])
def test_reward_loss_bad_input(kwargs, message):
    s_c, s_r = _pairs()[:2]
    with pytest.raises(ValueError, match=message):
        reward_loss(s_c, s_r, **kwargs)
    with pytest.raises(ValueError, match=r"rejected_rewards: expected shape \(4,\)"):
        reward_loss(s_c, s_r[:2])
    with pytest.raises(ValueError, match="chosen_rewards: expected at least one pair"):
        reward_loss(s_c[:0], s_r[:0])
