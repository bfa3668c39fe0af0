"""token_logprobs: every backend against the float64 reference, forward and backward."""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends import DEVICES, use_backend
from kernelrl.backend import BackendError
from kernelrl.ops import token_logprobs
from kernelrl.ops.logprobs import token_logprobs_reference
from numerics import check

BACKENDS = ["torch", "triton", "native"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(shape, vocab, dtype, device, scale=3.0, ignore_frac=0.1, ignore_index=-100):
    logits = (torch.randn(*shape, vocab, device=device) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape, device=device)
    labels[torch.rand(shape, device=device) < ignore_frac] = ignore_index
    return logits, labels


def run(fn, logits, labels, g_logp, g_ent, **kw):
    """Forward, then backward with per-element upstream gradients; returns (logp, ent, grad)."""
    x = logits.detach().clone().requires_grad_()
    out = fn(x, labels, return_entropy=g_ent is not None, **kw)
    logp, ent = out if g_ent is not None else (out, None)
    loss = (logp * g_logp).nansum() + ((ent * g_ent).sum() if g_ent is not None else 0)
    loss.backward()
    return logp.detach(), None if ent is None else ent.detach(), x.grad


def compare(logits, labels, *, temperature=1.0, entropy=True, ignore_index=-100):
    """Run the op (backend already forced) and check it against fp64 and eager torch."""
    dtype = logits.dtype
    g_logp = torch.randn(labels.shape, device=logits.device)
    g_ent = torch.randn(labels.shape, device=logits.device) if entropy else None
    kw = dict(temperature=temperature, ignore_index=ignore_index)
    out = run(token_logprobs, logits, labels, g_logp, g_ent, **kw)
    ref = run(token_logprobs_reference, logits.double(), labels, g_logp.double(),
              None if g_ent is None else g_ent.double(), **kw)
    eager = run(token_logprobs_reference, logits, labels, g_logp, g_ent, **kw)
    assert out[0].dtype == torch.float32
    check("logp", out[0], ref[0], eager[0], dtype)
    if entropy:
        check("entropy", out[1], ref[1], eager[1], dtype)
    assert out[2].dtype == dtype
    check("grad", out[2], ref[2], eager[2], dtype)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("temperature,entropy", [(1.0, False), (0.7, True)])
def test_matches_reference_odd_shape(monkeypatch, name, dtype, device, temperature, entropy):
    use_backend(monkeypatch, name, device, dtype=dtype)
    logits, labels = make_inputs((3, 47), 1271, dtype, device)
    compare(logits, labels, temperature=temperature, entropy=entropy)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("vocab", [1, 17, 4097, 16385])
def test_vocab_not_a_multiple_of_the_block(monkeypatch, name, vocab, device):
    use_backend(monkeypatch, name, device)
    logits, labels = make_inputs((5,), vocab, torch.float32, device, ignore_frac=0.2)
    compare(logits, labels, temperature=1.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", BACKENDS)
def test_llama3_vocabulary(monkeypatch, name, dtype, device):
    use_backend(monkeypatch, name, device, dtype=dtype)
    logits, labels = make_inputs((4,), 128256, dtype, device, ignore_frac=0.0)
    compare(logits, labels)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", BACKENDS)
def test_extreme_logits(monkeypatch, name, dtype, device):
    use_backend(monkeypatch, name, device, dtype=dtype)
    logits, labels = make_inputs((2, 19), 3001, dtype, device, scale=1e4)
    logits[0, 0] = 1e4                      # one row dominated by a single huge logit
    logits[0, 0, 7] = -1e4
    logits[0, 1] = -1e4                     # a constant row: uniform softmax
    compare(logits, labels, entropy=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
def test_minus_inf_logits_are_masked_vocabulary(monkeypatch, name, device):
    use_backend(monkeypatch, name, device)
    logits, labels = make_inputs((6,), 300, torch.float32, device, ignore_frac=0.0)
    logits[:, 100:] = float("-inf")
    labels = labels % 100
    logp, ent = token_logprobs(logits, labels, return_entropy=True)
    ref, ref_ent = token_logprobs_reference(logits.double(), labels, return_entropy=True)
    check("logp", logp, ref, None, torch.float32)
    check("entropy", ent, ref_ent, None, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("ignore_index", [-100, 0, -1])
def test_ignore_index_rows_are_zero_with_zero_gradient(monkeypatch, name, device, ignore_index):
    use_backend(monkeypatch, name, device)
    logits, labels = make_inputs((4, 33), 777, torch.float32, device,
                                 ignore_frac=0.3, ignore_index=ignore_index)
    labels[1] = ignore_index                 # an all-masked sequence
    logp, ent, grad = compare(logits, labels, temperature=0.9, ignore_index=ignore_index)
    ignored = labels == ignore_index
    assert torch.all(logp[ignored] == 0) and torch.all(ent[ignored] == 0)
    assert torch.all(grad[ignored] == 0)
    assert torch.all(grad[~ignored].abs().sum(-1) > 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
def test_all_ignored_and_empty(monkeypatch, name, device):
    use_backend(monkeypatch, name, device)
    logits = torch.randn(3, 50, device=device, requires_grad=True)
    labels = torch.full((3,), -100, device=device)
    logp = token_logprobs(logits, labels)
    logp.sum().backward()
    assert torch.all(logp == 0) and torch.all(logits.grad == 0)
    empty = torch.randn(0, 7, 50, device=device, requires_grad=True)
    out, ent = token_logprobs(empty, torch.zeros(0, 7, dtype=torch.long, device=device),
                              return_entropy=True)
    assert out.shape == (0, 7) and ent.shape == (0, 7)
    (out.sum() + ent.sum()).backward()
    assert empty.grad.shape == empty.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
def test_out_of_range_label_gives_nan_not_a_number(monkeypatch, name, device):
    use_backend(monkeypatch, name, device)
    logits, labels = make_inputs((8,), 100, torch.float32, device, ignore_frac=0.0)
    labels[2], labels[5] = 100, -7
    logits.requires_grad_()
    logp, ent = token_logprobs(logits, labels, return_entropy=True)
    assert logp[2].isnan() and logp[5].isnan()
    assert logp[[0, 1, 3, 4, 6, 7]].isfinite().all() and ent.isfinite().all()
    logp.nansum().backward()
    assert logits.grad[[2, 5]].isnan().all()
    assert logits.grad[[0, 1, 3, 4, 6, 7]].isfinite().all()


def test_debug_mode_raises_on_out_of_range_label(monkeypatch):
    monkeypatch.setenv("KERNELRL_DEBUG", "1")
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 10\)"):
        token_logprobs(logits, torch.tensor([1, 2, 10, -100]))
    token_logprobs(logits, torch.tensor([1, 2, 9, -100]))   # in range: no error


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
def test_gradient_through_entropy_alone(monkeypatch, name, device):
    use_backend(monkeypatch, name, device)
    logits, labels = make_inputs((9,), 211, torch.float32, device)
    x = logits.clone().requires_grad_()
    _, ent = token_logprobs(x, labels, temperature=1.7, return_entropy=True)
    g = torch.randn_like(ent)
    (ent * g).sum().backward()
    x64 = logits.double().requires_grad_()
    _, ref = token_logprobs_reference(x64, labels, temperature=1.7, return_entropy=True)
    (ref * g.double()).sum().backward()
    check("grad", x.grad, x64.grad, None, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
def test_non_contiguous_logits_and_int32_labels(monkeypatch, name, device):
    use_backend(monkeypatch, name, device)
    wide = torch.randn(6, 5, 400, device=device)
    for logits in (wide[..., :300], wide[..., :300].transpose(0, 1), wide[::2, :, :300],
                   wide[..., :300].transpose(-1, -2).contiguous().transpose(-1, -2)):
        labels = torch.randint(0, 300, logits.shape[:-1], device=device, dtype=torch.int32)
        compare(logits, labels)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
def test_outputs_are_fully_written(monkeypatch, name, device):
    """Poison every fresh allocation: an element the kernels leave unwritten fails."""
    use_backend(monkeypatch, name, device)
    logits, labels = make_inputs((37,), 1000, torch.float32, device, ignore_frac=0.2)
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(7.25) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    compare(logits, labels, entropy=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
@settings(max_examples=int(os.environ.get("KERNELRL_HYPOTHESIS_EXAMPLES", 12)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 40), vocab=st.integers(1, 2500),
       dtype=st.sampled_from(DTYPES), temperature=st.floats(0.25, 4.0),
       scale=st.sampled_from([1.0, 10.0, 300.0]), ignore_frac=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**31 - 1))
def test_hypothesis_shapes_and_values(monkeypatch, name, device, rows, vocab, dtype,
                                      temperature, scale, ignore_frac, seed):
    use_backend(monkeypatch, name, device, dtype=dtype)
    torch.manual_seed(seed)           # the tensors too are drawn by hypothesis: replayable
    logits, labels = make_inputs((rows,), vocab, dtype, device, scale=scale,
                                 ignore_frac=ignore_frac)
    compare(logits, labels, temperature=temperature)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_gradcheck_float64(temperature):
    logits = torch.randn(4, 3, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (4, 3))
    labels[0, 1] = -100

    def fn(x):
        return token_logprobs(x, labels, temperature=temperature, return_entropy=True)

    assert torch.autograd.gradcheck(fn, (logits,))


def test_float64_cannot_be_forced_onto_a_kernel_backend(monkeypatch):
    monkeypatch.setenv("KERNELRL_BACKEND", "triton")
    with pytest.raises(BackendError, match="triton token_logprobs takes float32"):
        token_logprobs(torch.randn(2, 5, dtype=torch.float64), torch.tensor([1, 2]))


@pytest.mark.parametrize("call,message", [
    (lambda: token_logprobs([1.0], torch.tensor([0])), "logits: expected a torch.Tensor"),
    (lambda: token_logprobs(torch.ones(2, 5, dtype=torch.int64), torch.tensor([0, 1])),
     r"logits: expected dtype in \(float64, float32, float16, bfloat16\), got int64"),
    (lambda: token_logprobs(torch.ones(2, 5), torch.tensor([0.0, 1.0])),
     "labels: expected an integer dtype, got float32"),
    (lambda: token_logprobs(torch.ones(2, 5), torch.tensor([0, 1, 2])),
     r"labels: expected shape \(2,\), got \(3,\)"),
    (lambda: token_logprobs(torch.ones(2, 5), torch.tensor([0, 1]), temperature=0.0),
     "temperature: expected a finite value > 0, got 0.0"),
    (lambda: token_logprobs(torch.ones(2, 5), torch.tensor([0, 1]), temperature=math.nan),
     "temperature: expected a finite value > 0"),
    (lambda: token_logprobs(torch.ones(2, 0), torch.tensor([0, 1])),
     "logits: expected a vocabulary dimension of size >= 1, got 0"),
    (lambda: token_logprobs(torch.ones(()), torch.tensor(0)),
     r"logits: expected at least 1 dimension\(s\)"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- regression tests for defects found in review -------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", BACKENDS)
def test_nan_logit_gives_nan_logp_entropy_and_gradient(monkeypatch, name, dtype, device):
    """A NaN logit must poison its row on every backend, forward and backward alike (the
    Triton forward once skipped it, because max and the comparisons ignore NaN)."""
    use_backend(monkeypatch, name, device, dtype=dtype)
    logits = torch.zeros(3, 16, device=device, dtype=dtype)
    logits[0, 3] = float("nan")
    logits[2, 0] = float("nan")            # NaN in the first column, the max elsewhere
    logits[2, 5] = 4.0
    logits.requires_grad_()
    labels = torch.tensor([1, 2, 5], device=device)
    logp, ent = token_logprobs(logits, labels, return_entropy=True)
    assert logp[0].isnan() and ent[0].isnan() and logp[2].isnan() and ent[2].isnan()
    assert logp[1].isfinite() and ent[1].isfinite()
    (logp.nan_to_num() + ent.nan_to_num()).sum().backward()
    assert logits.grad[[0, 2]].isnan().all()
    assert logits.grad[1].isfinite().all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
def test_confident_token_keeps_its_fp32_gradient(monkeypatch, name, device):
    """Label logit 20 over randn: p ≈ 1 at the label. g − g·p there cancels to 1e-3
    relative error; −g·expm1(log p) keeps it at the float32 target on every backend."""
    use_backend(monkeypatch, name, device)
    logits = torch.randn(6, 4000, device=device)
    labels = torch.randint(0, 4000, (6,), device=device)
    logits[torch.arange(6), labels] = 20.0
    g = torch.randn(6, device=device)
    out = run(token_logprobs, logits, labels, g, None)
    ref = run(token_logprobs_reference, logits.double(), labels, g.double(), None)
    check("grad", out[2], ref[2], None, torch.float32)
    at = out[2][torch.arange(6), labels].double()
    ref_at = ref[2][torch.arange(6), labels]
    assert ((at - ref_at).abs() / ref_at.abs()).max() < 1e-5
