"""kl_penalized_advantages: every backend against the float64 reversed loop (the reference),
hand-computed cases, properties, torch.compile and opcheck of its custom op."""

import importlib
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends import DEVICES, use_backend
from kernelrl import backend
from kernelrl.backend import BackendError
from kernelrl.ops.advantages import (Advantages, kl_penalized_advantages,
                                     kl_penalized_advantages_reference)
from numerics import check

OP = "kl_penalized_advantages"
advantages_module = importlib.import_module("kernelrl.ops.advantages")
BACKENDS = ["torch", "triton", "native"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EXAMPLES = int(os.environ.get("KERNELRL_HYPOTHESIS_EXAMPLES", 8))
LENGTHS = [37, 0, 1, 611, 256, 255, 257, 128]   # empty, single-token and tile/chunk edges
ROW_LENGTH = st.one_of(st.just(0), st.just(1), st.integers(0, 300))   # (clipped to T)


def make_inputs(lengths, n_cols, dtype=torch.float32, device="cpu", score_scale=2.0, gen=None):
    """Policy / reference log-probs (d = lp − ref mostly in [−1, 1], k3's two branches),
    values, scores and a right-padded bool mask with the given row lengths."""
    n = len(lengths)
    lp = -2 * torch.rand(n, n_cols, generator=gen)
    ref = lp + 0.7 * torch.randn(n, n_cols, generator=gen)
    values = torch.randn(n, n_cols, generator=gen)
    scores = score_scale * torch.randn(n, generator=gen)
    mask = torch.arange(n_cols) < torch.tensor(lengths)[:, None]
    return ([x.to(dtype).to(device) for x in (lp, ref, values)]
            + [scores.to(device), mask.to(device)])


def compare(inputs, dtype, **kw):
    """Run the op (backend already forced); check every output against float64 and eager."""
    out = kl_penalized_advantages(*inputs, **kw)
    ref = kl_penalized_advantages_reference(*[x.double() for x in inputs[:4]], inputs[4], **kw)
    eager = kl_penalized_advantages_reference(*inputs, **kw)
    assert isinstance(out, Advantages)
    for name, o, r, e in zip(Advantages._fields, out, ref, eager):
        assert o.dtype == torch.float32 and o.shape == inputs[0].shape, name
        check(name, o, r, e, dtype)
    return out, ref


def scaled_check(out, ref):
    """Every output against float64, relative to the reference's largest magnitude (so that
    outputs ~1e-20 or ~1e20 are checked as strictly as outputs ~1)."""
    for name, o, r in zip(Advantages._fields, out, ref):
        scale = r.abs().max().item() or 1.0
        check(name, o / scale, r / scale, None, torch.float32)


# ---- every backend against float64 ----------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", BACKENDS)
def test_matches_reference(monkeypatch, name, dtype, device):
    use_backend(monkeypatch, name, device, op=OP, dtype=dtype)
    inputs = make_inputs(LENGTHS, 611, dtype, device)
    compare(inputs, dtype, kl_estimator="k3", gamma=0.99, lam=0.95, reward_clip=1.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("whiten", [True, False])
def test_estimators_and_whitening(monkeypatch, name, estimator, whiten, device):
    use_backend(monkeypatch, name, device, op=OP)
    inputs = make_inputs([130, 3, 0, 300], 300, device=device)
    compare(inputs, torch.float32, kl_estimator=estimator, whiten=whiten, kl_coef=0.2,
            gamma=0.9, lam=0.8)


@pytest.mark.parametrize("name", BACKENDS)
def test_hand_computed(monkeypatch, name):
    """Two rows (lengths 3 and 2), kl_coef 0.5, γ = λ = 0.5, k1; every number worked by hand.

    row 0: d = [0.5, 0, −0.5], rewards = −0.5·d + [0, 0, 1] = [−0.25, 0, 1.25], V = [1, 2, 0.5]
        δ2 = 1.25 − 0.5 = 0.75               A2 = 0.75
        δ1 = 0 + 0.5·0.5 − 2 = −1.75         A1 = −1.75 + 0.25·0.75 = −1.5625
        δ0 = −0.25 + 0.5·2 − 1 = −0.25       A0 = −0.25 + 0.25·(−1.5625) = −0.640625
    row 1: d = [0, 2], rewards = [0, −1 − 2] = [0, −3], V = [0.5, −1] (its padding is NaN)
        δ1 = −3 + 1 = −2                     A1 = −2
        δ0 = 0 − 0.5 − 0.5 = −1              A0 = −1 + 0.25·(−2) = −1.5
    whitened over the 5 real tokens: mean = −0.990625, unbiased var = 1.189404296875.
    """
    use_backend(monkeypatch, name, "cpu", op=OP)
    nan = math.nan
    lp = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, nan]])
    ref = torch.tensor([[-1.5, -2.0, -0.5], [-1.0, -3.0, 5.0]])
    values = torch.tensor([[1.0, 2.0, 0.5], [0.5, -1.0, nan]])
    scores = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = kl_penalized_advantages(lp, ref, values, scores, mask, kl_coef=0.5, gamma=0.5,
                                  lam=0.5, whiten=False)
    expect = {
        "advantages": [[-0.640625, -1.5625, 0.75], [-1.5, -2.0, 0.0]],
        "returns": [[0.359375, 0.4375, 1.25], [-1.0, -3.0, 0.0]],
        "rewards": [[-0.25, 0.0, 1.25], [0.0, -3.0, 0.0]],
        "kl": [[0.5, 0.0, -0.5], [0.0, 2.0, 0.0]],
    }
    for field, value in expect.items():
        torch.testing.assert_close(getattr(out, field), torch.tensor(value), rtol=1e-6, atol=0)
    white = kl_penalized_advantages(lp, ref, values, scores, mask, kl_coef=0.5, gamma=0.5,
                                    lam=0.5).advantages
    torch.testing.assert_close(white, torch.tensor(
        [[0.32092481, -0.52436821, 1.59602784], [-0.46706021, -0.92552423, 0.0]]),
        rtol=1e-6, atol=1e-7)
    # the other estimators and the clip: k2 = d²/2, k3 = e^(−d) − 1 + d, score 1 -> 0.8
    k2 = kl_penalized_advantages(lp, ref, values, scores, mask, kl_estimator="k2")
    k3 = kl_penalized_advantages(lp, ref, values, scores, mask, kl_estimator="k3",
                                 kl_coef=0.0, reward_clip=0.8)
    torch.testing.assert_close(k2.kl, torch.tensor([[0.125, 0.0, 0.125], [0.0, 2.0, 0.0]]))
    torch.testing.assert_close(k3.kl, torch.tensor(
        [[0.10653066, 0.0, 0.14872127], [0.0, 1.13533528, 0.0]]), rtol=1e-6, atol=0)
    torch.testing.assert_close(k3.rewards, torch.tensor([[0.0, 0.0, 0.8], [0.0, -0.8, 0.0]]))


# ---- properties -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", BACKENDS)
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_cols=st.integers(1, 300), lengths=st.lists(ROW_LENGTH, min_size=1, max_size=6),
       dtype=st.sampled_from(DTYPES), estimator=st.sampled_from(["k1", "k2", "k3"]),
       gamma=st.sampled_from([0.0, 0.5, 0.99, 1.0]), lam=st.sampled_from([0.0, 0.95, 1.0]),
       kl_coef=st.sampled_from([0.0, 0.05, 1.0]), clip=st.sampled_from([None, 0.5, 3.0]),
       score_scale=st.sampled_from([1e-20, 1.0, 1e20]), whiten=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_hypothesis(monkeypatch, name, n_cols, lengths, dtype, estimator, gamma, lam, kl_coef,
                    clip, score_scale, whiten, seed):
    """Rows of different lengths (padding in the middle of the batch), of length 0 and 1,
    huge and tiny scores."""
    use_backend(monkeypatch, name, "cpu", op=OP, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    inputs = make_inputs([min(n, n_cols) for n in lengths], n_cols, dtype,
                         score_scale=score_scale, gen=gen)
    compare(inputs, dtype, kl_estimator=estimator, gamma=gamma, lam=lam, kl_coef=kl_coef,
            reward_clip=clip, whiten=whiten)


@pytest.mark.parametrize("name", BACKENDS)
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_cols=st.integers(1, 300), lengths=st.lists(ROW_LENGTH, min_size=1, max_size=6),
       kl_coef=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2**31 - 1))
def test_gamma_lambda_one_is_reward_to_go_minus_value(monkeypatch, name, n_cols, lengths,
                                                     kl_coef, seed):
    """γ = λ = 1: A[t] = Σ_{s ≥ t} r[s] − V[t] (the values telescope); with kl_coef = 0 the
    rewards are the score alone, on each row's last real token."""
    use_backend(monkeypatch, name, "cpu", op=OP)
    gen = torch.Generator().manual_seed(seed)
    lp, ref, values, scores, mask = make_inputs([min(n, n_cols) for n in lengths], n_cols,
                                                gen=gen)
    out = kl_penalized_advantages(lp, ref, values, scores, mask, kl_coef=kl_coef, gamma=1.0,
                                  lam=1.0, whiten=False)
    r = out.rewards.double()
    to_go = r.flip(1).cumsum(1).flip(1)
    expect = torch.where(mask, to_go - values.double(), 0.0)
    check("advantages", out.advantages, expect, None, torch.float32)
    check("returns", out.returns, torch.where(mask, to_go, 0.0), None, torch.float32)
    if kl_coef == 0:
        last = torch.arange(n_cols) == (mask.sum(1) - 1)[:, None]
        assert torch.equal(out.rewards, torch.where(last, scores[:, None], 0.0))
        assert torch.all(out.kl[~mask] == 0)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("scale", [1e-20, 1e-6, 1e6, 1e20])
@pytest.mark.parametrize("whiten", [True, False])
def test_huge_and_tiny_scores(monkeypatch, name, scale, whiten):
    """Scores from 1e-20 to 1e20 (kl_coef = 0, zero values: every output scales with them).
    The whitening statistics are float64, so squares of 1e20 neither overflow nor vanish."""
    use_backend(monkeypatch, name, "cpu", op=OP)
    lp, ref, values, scores, mask = make_inputs([200, 1, 0, 77], 200, score_scale=scale)
    values = torch.zeros_like(values)
    kw = dict(kl_coef=0.0, gamma=0.99, lam=0.95, whiten=whiten)
    out = kl_penalized_advantages(lp, ref, values, scores, mask, **kw)
    ref64 = kl_penalized_advantages_reference(lp.double(), ref.double(), values.double(),
                                              scores.double(), mask, **kw)
    assert all(o.isfinite().all() for o in out)
    scaled_check(out, ref64)
    # and with the KL penalty and values present (the score dominates, or vanishes)
    lp, ref, values, scores, mask = make_inputs([200, 1, 0, 77], 200, score_scale=scale)
    compare([lp, ref, values, scores, mask], torch.float32, whiten=whiten)


@pytest.mark.parametrize("name", BACKENDS)
def test_whitening_with_one_or_no_real_token(monkeypatch, name):
    """One real token in the batch: var is taken as 0, A − mean = 0, so the whitened
    advantage is exactly 0 (no NaN); no real token at all: everything is 0."""
    use_backend(monkeypatch, name, "cpu", op=OP)
    lp, ref, values, scores, mask = make_inputs([0, 1, 0], 9)
    out = kl_penalized_advantages(lp, ref, values, scores, mask)
    assert torch.all(out.advantages == 0)
    assert out.returns[1, 0] != 0 and out.rewards[1, 0] != 0
    assert torch.count_nonzero(out.returns) == 1
    empty = kl_penalized_advantages(lp, ref, values, scores, torch.zeros_like(mask))
    assert all(torch.all(o == 0) for o in empty)


@pytest.mark.parametrize("name", BACKENDS)
def test_mask_dtypes_give_the_same_result(monkeypatch, name):
    use_backend(monkeypatch, name, "cpu", op=OP)
    lp, ref, values, scores, mask = make_inputs([5, 0, 17, 9], 17)
    base = kl_penalized_advantages(lp, ref, values, scores, mask, kl_estimator="k3")
    for dtype in (torch.int64, torch.int32, torch.uint8, torch.float32, torch.bfloat16):
        other = kl_penalized_advantages(lp, ref, values, scores, mask.to(dtype),
                                        kl_estimator="k3")
        for a, b in zip(base, other):
            assert torch.equal(a, b), dtype


@pytest.mark.parametrize("name", BACKENDS)
def test_a_hole_reads_as_the_prefix_of_the_rows_count(monkeypatch, name):
    """Without KERNELRL_DEBUG a row with a hole is read as the prefix of its count of real
    tokens (as veRL places the score at mask.sum(-1) − 1)."""
    use_backend(monkeypatch, name, "cpu", op=OP)
    lp, ref, values, scores, mask = make_inputs([6, 3], 8)
    holes = torch.tensor([[1, 0, 1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 0]])
    for a, b in zip(kl_penalized_advantages(lp, ref, values, scores, holes),
                    kl_penalized_advantages(lp, ref, values, scores, mask)):
        assert torch.equal(a, b)


def test_debug_mode_raises_on_a_hole(monkeypatch):
    monkeypatch.setenv("KERNELRL_DEBUG", "1")
    lp, ref, values, scores, _ = make_inputs([3, 3], 4)
    with pytest.raises(ValueError, match=r"mask: expected each row's real tokens to be a "
                                         r"prefix.*row 1"):
        kl_penalized_advantages(lp, ref, values, scores,
                                torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]]))
    kl_penalized_advantages(lp, ref, values, scores, torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]))


# ---- NaN, padding, poison --------------------------------------------------------------------

@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("whiten", [True, False])
def test_nan_on_a_real_token_propagates(monkeypatch, name, whiten):
    """NaN positions match the reference exactly: A and returns at and before the token in
    its row (the whole batch's advantages when whitening); a NaN score through the clip."""
    use_backend(monkeypatch, name, "cpu", op=OP)
    lp, ref, values, scores, mask = make_inputs([40, 30, 20, 40], 40)
    lp[0, 10] = math.nan
    values[1, 29] = math.nan          # the last real token's value
    scores[2] = math.nan
    out, _ = compare([lp, ref, values, scores, mask], torch.float32, whiten=whiten,
                     reward_clip=1.0)
    assert out.rewards[0, 10].isnan() and out.rewards[0, 11:].isfinite().all()
    assert out.returns[0, :11].isnan().all() and out.returns[0, 11:].isfinite().all()
    assert out.rewards[2, 19].isnan() and out.returns[2, :20].isnan().all()
    assert out.returns[3].isfinite().all()
    assert out.advantages[mask].isnan().all() == whiten


@pytest.mark.parametrize("name", BACKENDS)
def test_padding_is_never_read(monkeypatch, name):
    """NaN and inf at padding change nothing; every output is exactly 0 there."""
    use_backend(monkeypatch, name, "cpu", op=OP)
    lp, ref, values, scores, mask = make_inputs([7, 0, 19, 12], 19)
    clean = kl_penalized_advantages(lp, ref, values, scores, mask, kl_estimator="k3")
    for x, poison in ((lp, math.nan), (ref, math.inf), (values, math.nan)):
        x[~mask] = poison
    scores[1] = math.nan               # the score of an empty row is not used either
    dirty = kl_penalized_advantages(lp, ref, values, scores, mask, kl_estimator="k3")
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b) and torch.all(b[~mask] == 0)


@pytest.mark.parametrize("name", BACKENDS)
def test_outputs_are_fully_written(monkeypatch, name):
    """Poison every fresh allocation: an element the kernels leave unwritten fails."""
    use_backend(monkeypatch, name, "cpu", op=OP)
    inputs = make_inputs([29, 0, 64, 1, 65], 65)
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(7.25) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    out, _ = compare(inputs, torch.float32, kl_estimator="k2")
    assert all(torch.all(o[~inputs[4]] == 0) for o in out)


# ---- layouts, dtypes, gradients --------------------------------------------------------------

@pytest.mark.parametrize("name", BACKENDS)
def test_strided_and_mixed_dtype_inputs(monkeypatch, name):
    """Row strides wider than T, a transposed (column-strided) tensor, bf16 values next to
    fp32 log-probs (promoted), a strided mask: the same result as contiguous fp32 inputs."""
    use_backend(monkeypatch, name, "cpu", op=OP)
    lp, ref, values, scores, mask = make_inputs([50, 13, 0], 50)
    values = values.bfloat16()
    wide = torch.randn(3, 70)
    wide[:, 5:55] = lp
    tall = ref.t().contiguous().t()
    mask_wide = torch.zeros(3, 60, dtype=torch.bool)
    mask_wide[:, 3:53] = mask
    out = kl_penalized_advantages(wide[:, 5:55], tall, values, scores[::1], mask_wide[:, 3:53],
                                  kl_estimator="k3")
    base = kl_penalized_advantages(lp, ref, values.float(), scores, mask, kl_estimator="k3")
    for a, b in zip(out, base):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", BACKENDS)
def test_outputs_carry_no_gradient(monkeypatch, name):
    """Forward-only: the outputs are detached even when the inputs require gradients."""
    use_backend(monkeypatch, name, "cpu", op=OP)
    lp, ref, values, scores, mask = make_inputs([5, 3], 5)
    leaves = [x.requires_grad_() for x in (lp, ref, values, scores)]
    out = kl_penalized_advantages(*leaves, mask)
    assert all(not o.requires_grad and o.grad_fn is None for o in out)


def test_float64_runs_on_torch_and_cannot_be_forced_onto_a_kernel(monkeypatch):
    inputs = make_inputs([6, 2], 6, torch.float64)
    inputs[3] = inputs[3].double()
    out = kl_penalized_advantages(*inputs)
    ref = kl_penalized_advantages_reference(*inputs)
    for o, r in zip(out, ref):
        assert o.dtype == torch.float64
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    monkeypatch.setenv("KERNELRL_BACKEND", "native")
    with pytest.raises(BackendError, match="native kl_penalized_advantages takes float32"):
        kl_penalized_advantages(*inputs)


@pytest.mark.parametrize("name", ["native", "torch"])
def test_whitening_statistics_at_256k_tokens(monkeypatch, name):
    """B·T = 256K real tokens: the float64 statistics keep the whitened advantages within
    1e-5 of float64 (a float32 sum over the batch would not be guaranteed to)."""
    use_backend(monkeypatch, name, "cpu", op=OP)
    torch.manual_seed(0)
    inputs = make_inputs([1024] * 256, 1024, score_scale=30.0)
    compare(inputs, torch.float32, kl_estimator="k3")


@pytest.mark.parametrize("call,message", [
    (lambda x, m: kl_penalized_advantages(x, x[:, :3], x, x[:, 0], m),
     r"ref_logprobs: expected shape \(4, 5\) \(as logprobs\), got \(4, 3\)"),
    (lambda x, m: kl_penalized_advantages(x, x, x[:3], x[:, 0], m),
     r"values: expected shape \(4, 5\)"),
    (lambda x, m: kl_penalized_advantages(x, x, x, x[:, 0], m[:, :4]),
     r"mask: expected shape \(4, 5\)"),
    (lambda x, m: kl_penalized_advantages(x, x, x, x[:3, 0], m),
     r"scores: expected shape \(4,\) \(one per row of logprobs\), got \(3,\)"),
    (lambda x, m: kl_penalized_advantages(x, x, x, x, m), r"scores: expected shape \(4,\)"),
    (lambda x, m: kl_penalized_advantages(x, x, x, x[:, 0], m, kl_estimator="kl"),
     r"kl_estimator: expected one of \('k1', 'k2', 'k3'\), got 'kl'"),
    (lambda x, m: kl_penalized_advantages(x, x, x, x[:, 0], m, gamma=1.5),
     r"gamma: expected a value in \[0.0, 1.0\], got 1.5"),
    (lambda x, m: kl_penalized_advantages(x, x, x, x[:, 0], m, lam=math.nan),
     r"lam: expected a value in \[0.0, 1.0\], got nan"),
    (lambda x, m: kl_penalized_advantages(x, x, x, x[:, 0], m, kl_coef=-0.1),
     r"kl_coef: expected a value in \[0.0, inf\]"),
    (lambda x, m: kl_penalized_advantages(x, x, x, x[:, 0], m, reward_clip=0.0),
     r"reward_clip: expected a value in \(0.0, inf\], got 0.0"),
    (lambda x, m: kl_penalized_advantages(x, x, x, x[:, 0], m, gamma=torch.tensor(0.9)),
     "gamma: expected a Python float, got Tensor"),
    (lambda x, m: kl_penalized_advantages(x, x, x, x[:, 0], m, whiten=1),
     "whiten: expected a bool, got int"),
    (lambda x, m: kl_penalized_advantages(x[0], x[0], x[0], x[:, 0], m[0]),
     r"logprobs: expected 2 dimensions, got shape \(5,\)"),
    (lambda x, m: kl_penalized_advantages(x.long(), x, x, x[:, 0], m),
     r"logprobs: expected dtype in \(float64, float32, float16, bfloat16\), got int64"),
    (lambda x, m: kl_penalized_advantages(x, x, x.int(), x[:, 0], m),
     r"values: expected dtype in \("),
    (lambda x, m: kl_penalized_advantages(x, x, x, x[:, 0], m.to(torch.complex64)),
     "mask: expected a bool, integer or float dtype"),
    (lambda x, m: kl_penalized_advantages(x, x, x, [1.0] * 4, m),
     "scores: expected a torch.Tensor, got list"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(4, 5), torch.ones(4, 5, dtype=torch.bool))


def test_empty_batch_and_empty_rows():
    for n, t in ((0, 5), (3, 0)):
        x = torch.randn(n, t)
        out = kl_penalized_advantages(x, x, x, torch.randn(n), torch.ones(n, t))
        assert all(o.shape == (n, t) and o.dtype == torch.float32 for o in out)


def test_default_cpu_backend_is_native_when_built():
    ok = backend.availability("native", torch.device("cpu"), torch.float32,
                              backend.registered_ops()[OP])[0]
    assert backend.select(OP, torch.device("cpu"), torch.float32) == ("native" if ok else "torch")


# ---- torch.compile and the custom op ---------------------------------------------------------

@pytest.mark.parametrize("name", ["default", "torch"])
def test_compiles_with_fullgraph(monkeypatch, name):
    """The default CPU path (the native custom op) and the torch path compile without a
    graph break and give eager's results."""
    if name != "default":
        use_backend(monkeypatch, name, "cpu", op=OP)
    torch._dynamo.reset()
    inputs = make_inputs([30, 0, 12, 1], 30)

    def fn(*args):
        return kl_penalized_advantages(*args, kl_estimator="k3", reward_clip=1.0, gamma=0.99)

    compiled = torch.compile(fn, fullgraph=True)
    for a, b in zip(compiled(*inputs), fn(*inputs)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not backend.availability("native", torch.device("cpu"), torch.float32,
                                             backend.registered_ops()[OP])[0],
                    reason="kernelrl._native is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("whiten", [True, False])
def test_custom_op_passes_opcheck(dtype, whiten):
    lp, ref, values, scores, mask = make_inputs([9, 0, 4], 9, dtype)
    args = (lp, ref, values, scores, mask.view(torch.uint8), 2, 0.05, 0.95, 0.05, 1.5, whiten)
    torch.library.opcheck(advantages_module._native_advantages, args)
