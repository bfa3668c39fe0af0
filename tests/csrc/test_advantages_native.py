"""The advantages family of kernelrl._native, called raw (pointers as ints).

Checks the C++ CPU kernels (advantages_fwd_cpu, advantages_whiten_cpu) against the float64
reversed loop (kernelrl.ops.advantages.kl_penalized_advantages_reference), the rows' whitening
partials and the combined statistics against float64 sums of the kernel's own advantages,
argument validation, and the CUDA entry points' behaviour without a GPU driver. Both CPU code
paths run: the dispatched one (AVX2 where available) and the baseline one
(KERNELRL_CPU_ISA=generic).

Shape legend: B rows, T tokens per row.
Error measure: ||out - ref|| / ||ref|| over the non-NaN entries; NaN patterns must match exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from numerics import rel_err_matching_nan as rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelrl.ops.advantages import kl_penalized_advantages_reference

native = pytest.importorskip(
    "kernelrl._native", reason="kernelrl._native is not built (pip install -e . builds it)"
)

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ESTIMATORS = {"k1": 0, "k2": 1, "k3": 2}
POISON = 7777.0  # written into outputs first: any element the kernel fails to write shows up
FIELDS = ("advantages", "returns", "rewards", "kl")


# ---- raw calls ---------------------------------------------------------------------------------


def run_fwd(lp, ref, values, scores, mask, *, estimator="k1", kl_coef=0.05, gamma=1.0,
            lam=0.95, clip=math.inf):
    """advantages_fwd_cpu on [B, >= T] views (row strides of their own); poisoned outputs.
    Returns the four [B, T] outputs and partials [B, 3]."""
    n, t = lp.shape
    outs = [torch.full((n, t), POISON) for _ in FIELDS]
    partials = torch.full((n, 3), POISON, dtype=torch.float64)
    native.advantages_fwd_cpu(
        lp.data_ptr(), ref.data_ptr(), values.data_ptr(), scores.data_ptr(), mask.data_ptr(),
        *[o.data_ptr() for o in outs], partials.data_ptr(), n, t,
        lp.stride(0), ref.stride(0), values.stride(0), mask.stride(0),
        DTYPES[lp.dtype], ESTIMATORS[estimator], kl_coef, gamma * lam, gamma * (1.0 - lam), clip)
    return outs, partials


def run_whiten(adv, partials):
    """advantages_whiten_cpu in place on a copy of adv; returns (whitened, stats)."""
    out = adv.clone()
    stats = torch.full((2,), POISON, dtype=torch.float64)
    native.advantages_whiten_cpu(out.data_ptr(), partials.data_ptr(), stats.data_ptr(),
                                 adv.shape[0], adv.shape[1])
    return out, stats


def make_inputs(lengths, n_cols, dtype, pad=0, gen=None):
    """Inputs with row strides n_cols + pad (pad = 0: contiguous) and a uint8 mask."""
    n = len(lengths)
    lp = -2 * torch.rand(n, n_cols + pad, generator=gen)
    ref = lp + 0.7 * torch.randn(n, n_cols + pad, generator=gen)
    values = torch.randn(n, n_cols + pad, generator=gen)
    mask = (torch.arange(n_cols + pad) < torch.tensor(lengths)[:, None]).to(torch.uint8)
    scores = 2 * torch.randn(n, generator=gen)
    return ([x.to(dtype)[:, :n_cols] for x in (lp, ref, values)]
            + [scores, mask[:, :n_cols]])


def check_against_reference(inputs, outs, partials, tol=1e-5, **kw):
    """Forward outputs vs float64 (not whitened); the partials and, after whitening, the
    statistics vs float64 sums over the kernel's own advantages; the whitened advantages."""
    lp, ref, values, scores, mask = inputs
    kw.setdefault("kl_estimator", "k1")
    r = kl_penalized_advantages_reference(lp.double(), ref.double(), values.double(),
                                          scores.double(), mask, whiten=False, **kw)
    for name, o, e in zip(FIELDS, outs, r):
        assert rel_err(o, e, name) < tol, name
        assert torch.all(o[mask == 0] == 0), f"{name}: not 0 on padding"
    real = mask != 0
    adv = outs[0].double()
    count = real.sum(1).double()
    mean = torch.where(real, adv, 0.0).sum(1) / count.clamp_min(1)
    m2 = torch.where(real, (adv - mean[:, None]) ** 2, 0.0).sum(1)
    assert torch.equal(partials[:, 0], count)
    torch.testing.assert_close(partials[:, 1], mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(partials[:, 2], m2, rtol=1e-12, atol=1e-12)

    white, stats = run_whiten(outs[0], partials)
    n = real.sum().double()
    total_mean = torch.where(real, adv, 0.0).sum() / n.clamp_min(1)
    var = torch.where(real, (adv - total_mean) ** 2, 0.0).sum() / (n - 1) if n > 1 else 0.0
    torch.testing.assert_close(stats[0], total_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats[1], torch.rsqrt(torch.as_tensor(var + 1e-8)).double(),
                               rtol=1e-12, atol=0)
    r_white = kl_penalized_advantages_reference(lp.double(), ref.double(), values.double(),
                                                scores.double(), mask, **kw).advantages
    assert rel_err(white, r_white, "whitened") < tol
    assert torch.all(white[mask == 0] == 0)


# ---- CUDA entry points on a machine without a GPU ------------------------------------------------


def test_cuda_without_driver_raises_runtime_error():
    if not native.has_cuda():
        pytest.skip("built without the CUDA part")
    if native.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present; this checks the no-driver/no-GPU path")
    # Pointers are never dereferenced: the launch fails first.
    with pytest.raises(RuntimeError, match="CUDA"):
        native.advantages_fwd_cuda(*[256] * 10, 2, 8, 8, 8, 8, 8, 0, 0, 0.05, 0.95, 0.05,
                                   math.inf, 0)
    with pytest.raises(RuntimeError, match="CUDA"):
        native.advantages_whiten_cuda(256, 256, 256, 2, 8, 0)
    assert native.cuda_device_count() == 0  # and it still answers


# ---- forward and whitening against float64 ------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_matches_float64(isa, dtype, estimator):
    """Rows of lengths 0, 1 and around the 256-token chunks, strided rows."""
    inputs = make_inputs([600, 0, 1, 255, 256, 257, 513, 77], 600, dtype, pad=9)
    kw = dict(estimator=estimator, kl_coef=0.3, gamma=0.99, lam=0.9, clip=1.5)
    outs, partials = run_fwd(*inputs, **kw)
    check_against_reference(inputs, outs, partials, kl_estimator=estimator, kl_coef=0.3,
                            gamma=0.99, lam=0.9, reward_clip=1.5)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.0), (0.0, 0.5), (0.5, 0.9)])
def test_discounts(isa, gamma, lam):
    inputs = make_inputs([300, 41, 2], 300, torch.float32)
    outs, partials = run_fwd(*inputs, estimator="k3", gamma=gamma, lam=lam)
    check_against_reference(inputs, outs, partials, kl_estimator="k3", gamma=gamma, lam=lam)


def test_special_rows(isa):
    """Padding is never read (NaN there), a NaN on a real token or in a score propagates as in
    the reference, the clip keeps a NaN score NaN, an empty row has partials (0, 0, 0)."""
    lp, ref, values, scores, mask = make_inputs([20, 0, 20, 20, 10], 20, torch.float32)
    lp[0, 10] = math.nan                   # a NaN on one real token
    lp[4, 10:] = math.nan
    ref[4, 10:] = math.inf
    values[4, 10:] = math.nan
    scores[1] = math.nan                   # an empty row's score is not used
    scores[2] = math.nan                   # a NaN score, clipped: still NaN
    values[3, 7] = math.nan                # a NaN value: A at and before it, returns too
    outs, partials = run_fwd(lp, ref, values, scores, mask, clip=1.0)
    r = kl_penalized_advantages_reference(lp.double(), ref.double(), values.double(),
                                          scores.double(), mask, reward_clip=1.0, whiten=False)
    for name, o, e in zip(FIELDS, outs, r):
        rel_err(o, e, name)                # NaN patterns equal
    adv, ret, rew, _ = outs
    assert adv[0, :11].isnan().all() and adv[0, 11:].isfinite().all()
    assert torch.all(torch.stack(outs)[:, 1] == 0) and torch.equal(partials[1], torch.zeros(3))
    assert rew[2, 19].isnan() and adv[2].isnan().all()
    assert adv[3, :8].isnan().all() and ret[3, 7].isnan() and ret[3, 8:].isfinite().all()
    assert torch.all(torch.stack(outs)[:, 4, 10:] == 0) and torch.stack(outs)[:, 4].isfinite().all()
    assert partials[4].isfinite().all() and partials[0, 1].isnan()
    white, stats = run_whiten(adv, partials)
    assert stats[0].isnan() and white[mask != 0].isnan().all() and torch.all(white[mask == 0] == 0)


def test_whitening_of_one_and_of_no_real_token():
    """n = 1: var = 0, so A - mean = 0 and rstd = 1 / sqrt(1e-8); n = 0: mean 0."""
    inputs = make_inputs([0, 1, 0], 5, torch.float32)
    outs, partials = run_fwd(*inputs)
    white, stats = run_whiten(outs[0], partials)
    assert stats[0] == outs[0][1, 0].double() and stats[1] == 1.0 / math.sqrt(1e-8)
    assert torch.all(white == 0)
    outs, partials = run_fwd(*make_inputs([0, 0], 5, torch.float32))
    white, stats = run_whiten(outs[0], partials)
    assert stats[0] == 0 and stats[1] == 1.0 / math.sqrt(1e-8) and torch.all(white == 0)


def test_huge_scores_keep_float64_statistics(isa):
    """|A| ~ 1e30: its squares overflow float32 but not the float64 partials."""
    gen = torch.Generator().manual_seed(1)
    lp, ref, values, scores, mask = make_inputs([300, 120, 7], 300, torch.float32, gen=gen)
    scores = scores * 1e30
    outs, partials = run_fwd(lp, ref, values, scores, mask, gamma=0.99)
    f32_max = torch.finfo(torch.float32).max
    assert partials.isfinite().all() and partials[:, 2].min() > f32_max
    r = kl_penalized_advantages_reference(lp.double(), ref.double(), values.double(),
                                          scores.double(), mask, gamma=0.99)
    white, _ = run_whiten(outs[0], partials)
    assert rel_err(white, r.advantages, "whitened") < 1e-5


def test_statistics_at_256k_tokens():
    """256 x 1024 real tokens: the combined mean and variance meet float64 to 1e-12."""
    gen = torch.Generator().manual_seed(0)
    inputs = make_inputs([1024] * 256, 1024, torch.float32, gen=gen)
    inputs[3] = inputs[3] * 30 + 100                 # a mean far from 0
    outs, partials = run_fwd(*inputs, estimator="k3")
    adv = outs[0].double()
    _, stats = run_whiten(outs[0], partials)
    torch.testing.assert_close(stats[0], adv.mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats[1], torch.rsqrt(adv.var() + 1e-8), rtol=1e-12, atol=0)


def test_results_do_not_depend_on_threads():
    inputs = make_inputs(torch.randint(0, 700, (64,)).tolist(), 700, torch.bfloat16)
    before = native.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            native.set_num_threads(threads)
            outs, partials = run_fwd(*inputs, estimator="k3")
            white, stats = run_whiten(outs[0], partials)
            results.append(outs + [partials, white, stats])
    finally:
        native.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_empty_shapes():
    native.advantages_fwd_cpu(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 5, 5, 5, 5, 0, 0, 0.0, 1.0,
                              0.0, math.inf)
    partials = torch.full((3, 3), POISON, dtype=torch.float64)
    scores = torch.zeros(3)
    native.advantages_fwd_cpu(0, 0, 0, scores.data_ptr(), 0, 0, 0, 0, 0, partials.data_ptr(),
                              3, 0, 0, 0, 0, 0, 0, 0, 0.0, 1.0, 0.0, math.inf)
    assert torch.all(partials == 0)
    stats = torch.full((2,), POISON, dtype=torch.float64)
    native.advantages_whiten_cpu(0, partials.data_ptr(), stats.data_ptr(), 3, 0)
    assert stats[0] == 0


# ---- argument validation ------------------------------------------------------------------------

FWD_OK = dict(n_rows=2, n_cols=4, stride_logprobs=4, stride_ref_logprobs=4, stride_values=4,
              stride_mask=4, dtype=0, kl_estimator=0)


@pytest.mark.parametrize("change,message", [
    (dict(n_rows=-1), "n_rows: expected >= 0, got -1"),
    (dict(n_cols=-2), "n_cols: expected >= 0, got -2"),
    (dict(kl_estimator=3), r"kl_estimator: expected 0 \(k1\), 1 \(k2\) or 2 \(k3\), got 3"),
    (dict(stride_logprobs=3), r"stride_logprobs: expected >= n_cols \(4\), got 3"),
    (dict(stride_ref_logprobs=0), "stride_ref_logprobs: expected >= n_cols"),
    (dict(stride_values=1), "stride_values: expected >= n_cols"),
    (dict(stride_mask=2), "stride_mask: expected >= n_cols"),
    (dict(dtype=5), r"advantages_fwd_cpu: dtype: expected 0 \(float32\), 1 \(float16\) or 2"),
    (dict(logprobs=0), "logprobs: expected a non-null pointer, got 0"),
    (dict(mask=0), "mask: expected a non-null pointer"),
    (dict(partials=0), "partials: expected a non-null pointer"),
    (dict(kl=0), "kl: expected a non-null pointer"),
])
def test_fwd_argument_errors_name_the_argument(change, message):
    buf = torch.zeros(64)
    args = dict(logprobs=buf.data_ptr(), ref_logprobs=buf.data_ptr(), values=buf.data_ptr(),
                scores=buf.data_ptr(), mask=buf.data_ptr(), advantages=buf.data_ptr(),
                returns=buf.data_ptr(), rewards=buf.data_ptr(), kl=buf.data_ptr(),
                partials=buf.data_ptr(), **FWD_OK, kl_coef=0.1, gamma_lambda=0.9,
                gamma_one_minus_lambda=0.1, reward_clip=math.inf)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        native.advantages_fwd_cpu(**args)


def test_whiten_argument_errors_name_the_argument():
    buf = torch.zeros(64, dtype=torch.float64)
    with pytest.raises(ValueError, match="advantages_whiten_cpu: stats: expected a non-null"):
        native.advantages_whiten_cpu(buf.data_ptr(), buf.data_ptr(), 0, 2, 4)
    with pytest.raises(ValueError, match="n_cols: expected >= 0, got -1"):
        native.advantages_whiten_cpu(buf.data_ptr(), buf.data_ptr(), buf.data_ptr(), 2, -1)
    with pytest.raises(ValueError, match="partials: expected a non-null pointer"):
        native.advantages_whiten_cpu(buf.data_ptr(), 0, buf.data_ptr(), 2, 4)


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 600), min_size=1, max_size=6),
    n_cols=st.integers(1, 600),
    pad=st.integers(0, 9),
    dtype=st.sampled_from(list(DTYPES)),
    estimator=st.sampled_from(list(ESTIMATORS)),
    gamma=st.sampled_from([0.0, 0.9, 1.0]),
    lam=st.sampled_from([0.0, 0.95, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property(lengths, n_cols, pad, dtype, estimator, gamma, lam, seed):
    gen = torch.Generator().manual_seed(seed)
    inputs = make_inputs([min(n, n_cols) for n in lengths], n_cols, dtype, pad, gen)
    outs, partials = run_fwd(*inputs, estimator=estimator, gamma=gamma, lam=lam)
    check_against_reference(inputs, outs, partials, kl_estimator=estimator, gamma=gamma,
                            lam=lam)
