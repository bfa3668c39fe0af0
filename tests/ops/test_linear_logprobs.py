"""linear_logprobs: every backend against the float64 full-size reference, with gradients."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from backends import DEVICES, use_backend
from kernelrl.backend import BackendError
from kernelrl.ops import linear_logprobs
import importlib
linear_module = importlib.import_module("kernelrl.ops.linear_logprobs")
from kernelrl.ops.linear_logprobs import linear_logprobs_reference, tile_shape
from numerics import check

BACKENDS = ["torch", "triton", "native"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(n, width, vocab, dtype, device, bias=True, ignore_frac=0.1):
    hidden = torch.randn(n, width, device=device).to(dtype)
    weight = (torch.randn(vocab, width, device=device) / width ** 0.5 * 2).to(dtype)
    b = (torch.randn(vocab, device=device) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, vocab, (n,), device=device)
    labels[torch.rand(n, device=device) < ignore_frac] = -100
    return hidden, weight, b, labels


def run(fn, hidden, weight, bias, labels, g_logp, g_ent, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    out = fn(h, w, labels, bias=b, return_entropy=g_ent is not None, **kw)
    logp, ent = out if g_ent is not None else (out, None)
    loss = (logp * g_logp).sum() + ((ent * g_ent).sum() if g_ent is not None else 0)
    loss.backward()
    return logp.detach(), ent, h.grad, w.grad, None if b is None else b.grad


def compare(hidden, weight, bias, labels, *, entropy=True, temperature=1.0,
            ill_conditioned=False, **kw):
    dtype = hidden.dtype
    g_logp = torch.randn(labels.shape, device=hidden.device)
    g_ent = torch.randn(labels.shape, device=hidden.device) if entropy else None
    out = run(linear_logprobs, hidden, weight, bias, labels, g_logp, g_ent,
              temperature=temperature, **kw)
    to64 = (lambda t: None if t is None else t.double())
    ref = run(linear_logprobs_reference, to64(hidden), to64(weight), to64(bias), labels,
              g_logp.double(), to64(g_ent), temperature=temperature)
    eager = run(linear_logprobs_reference, hidden, weight, bias, labels, g_logp, g_ent,
                temperature=temperature)
    for i, name in enumerate(["logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"]):
        if ref[i] is not None:
            check(name, out[i], ref[i], eager[i], dtype, ill_conditioned)
    assert out[2].dtype == dtype and out[3].dtype == dtype
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("bias,entropy,temperature", [(True, True, 0.8), (False, False, 1.0)])
def test_matches_reference_across_chunks(monkeypatch, name, dtype, device, bias, entropy,
                                         temperature):
    use_backend(monkeypatch, name, device, op="linear_logprobs", dtype=dtype)
    monkeypatch.setattr(linear_module, "_MAX_BLOCK", 384)
    hidden, weight, b, labels = make_inputs(150, 48, 1000, dtype, device, bias=bias)
    # tiles of 150 rows x 384 columns: 1 row block, 3 vocabulary blocks (the last ragged)
    assert tile_shape(150, 1000, 64) == (150, 384)
    compare(hidden, weight, b, labels, entropy=entropy, temperature=temperature, chunk_size=64)
    # 4 row blocks (38, 38, 38 and a ragged 36) x 3 vocabulary blocks
    assert tile_shape(150, 1000, 16) == (38, 384)
    compare(hidden, weight, b, labels, entropy=entropy, temperature=temperature, chunk_size=16)


def test_row_blocks_are_even():
    """The row blocks share the rows evenly: as few blocks as the budget allows, each of
    the fewest rows that still covers N. A budget just short of all rows gives two halves,
    not a full block and a sliver (which once sent a GPU-sized case down the multi-block
    path with a last block of 8 rows)."""
    assert tile_shape(16384, 128256, (1 << 26) // 128256) == (8192, 4096)
    assert tile_shape(10, 100, 3) == (3, 100)
    for n, vocab, chunk in [(1, 5, 1), (7, 9000, 2), (1000, 32000, 33), (4097, 50, 1),
                            (16385, 128256, 523)]:
        rows, width = tile_shape(n, vocab, chunk)
        most = max(1, min(n, chunk * vocab // width))      # rows the budget allows
        blocks = -(-n // most)
        assert rows <= most and -(-n // rows) == blocks and -(-n // (rows - 1 or 1)) > blocks \
            or rows == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 7, None, 10_000])
def test_chunk_sizes(monkeypatch, name, device, chunk_size):
    use_backend(monkeypatch, name, device, op="linear_logprobs")
    hidden, weight, b, labels = make_inputs(23, 16, 301, torch.float32, device)
    compare(hidden, weight, b, labels, chunk_size=chunk_size)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reductions(monkeypatch, name, device, reduction):
    use_backend(monkeypatch, name, device, op="linear_logprobs")
    hidden, weight, b, labels = make_inputs(40, 32, 500, torch.float32, device, ignore_frac=0.3)
    h = hidden.clone().requires_grad_()
    logp, ent = linear_logprobs(h, weight, labels, bias=b, reduction=reduction,
                                return_entropy=True, chunk_size=16)
    (3.0 * logp - 0.5 * ent).backward()
    h64 = hidden.double().requires_grad_()
    ref, ref_ent = linear_logprobs_reference(h64, weight.double(), labels, bias=b.double(),
                                             return_entropy=True)
    count = (labels != -100).sum() if reduction == "mean" else 1
    ref, ref_ent = ref.sum() / count, ref_ent.sum() / count
    (3.0 * ref - 0.5 * ref_ent).backward()
    check("logp", logp.reshape(1), ref.reshape(1), None, torch.float32)
    check("entropy", ent.reshape(1), ref_ent.reshape(1), None, torch.float32)
    check("grad_hidden", h.grad, h64.grad, None, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", BACKENDS)
def test_batched_hidden_and_all_masked_sequence(monkeypatch, name, device):
    use_backend(monkeypatch, name, device, op="linear_logprobs")
    hidden = torch.randn(3, 11, 24, device=device)
    weight = torch.randn(257, 24, device=device)
    labels = torch.randint(0, 257, (3, 11), device=device)
    labels[1] = -100                                              # an all-masked sequence
    h = hidden.clone().requires_grad_()
    logp = linear_logprobs(h, weight, labels, chunk_size=5)       # weight frozen
    assert logp.shape == (3, 11)
    g = torch.randn_like(logp)
    (logp * g).sum().backward()
    h64 = hidden.double().requires_grad_()
    ref = linear_logprobs_reference(h64, weight.double(), labels)
    (ref * g.double()).sum().backward()
    check("logp", logp, ref, None, torch.float32)
    check("grad_hidden", h.grad, h64.grad, None, torch.float32)
    assert torch.all(h.grad[1] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", BACKENDS)
def test_extreme_logits(monkeypatch, name, dtype, device):
    """Logits in the thousands, from a matmul that is exact in every dtype (small integers:
    every product and partial sum is representable), so that no matmul algorithm's rounding
    (which differs with the tile shape, and between cuBLAS kernels) enters the comparison;
    only the 16-bit logits' own rounding does, the same for kernelrl and eager. The
    distributions are confident (p ≈ 1 up to e^-1000), the entropies and gradients
    ill-conditioned: the bound is 2x eager torch's error."""
    use_backend(monkeypatch, name, device, op="linear_logprobs", dtype=dtype)
    g = torch.Generator().manual_seed(7)
    hidden = (torch.randint(-15, 16, (60, 24), generator=g) * 16).to(device, dtype)
    weight = torch.randint(-3, 4, (301, 24), generator=g).to(device, dtype)
    b = torch.randint(-8, 9, (301,), generator=g).to(device, dtype)
    labels = torch.randint(0, 301, (60,), generator=g).to(device)
    labels[::7] = -100
    logits = hidden.double() @ weight.double().t()
    assert logits.abs().max() > 1000        # the case this test is about
    compare(hidden, weight, b, labels, chunk_size=16, ill_conditioned=True)


@pytest.mark.parametrize("name", ["torch", "native"])
def test_no_tensor_of_n_by_v_is_ever_created(monkeypatch, name):
    """Record every tensor any aten op returns during forward + backward.

    The tiling lives in the Python orchestrator, shared by every backend; the Triton
    interpreter's own host copies would only blur this, so it is left out here."""
    use_backend(monkeypatch, name, "cpu", op="linear_logprobs")
    n, width, vocab, chunk = 512, 8, 2048, 32
    hidden, weight, b, labels = make_inputs(n, width, vocab, torch.float32, "cpu")
    hidden.requires_grad_()
    weight.requires_grad_()

    class Largest(TorchDispatchMode):
        nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):   # bytes: the interpreter views tiles as bytes
                    Largest.nbytes = max(Largest.nbytes, t.numel() * t.element_size())
            return out

    with Largest():
        logp, ent = linear_logprobs(hidden, weight, labels, bias=b, chunk_size=chunk,
                                    return_entropy=True)
        (logp.sum() + ent.sum()).backward()
    # the largest tensor is one R x W tile of about C·V logits
    rows, width = tile_shape(n, vocab, chunk)
    assert rows * width <= chunk * vocab
    assert Largest.nbytes <= max(rows * width, n * width) * 4
    assert Largest.nbytes <= n * vocab * 4 // 8


@pytest.mark.parametrize("with_entropy", [False, True])
def test_gradcheck_float64(with_entropy):
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(70, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(70, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 70, (5,))
    labels[3] = -100

    def fn(h, w, b):      # chunk 2 -> two vocabulary blocks of 64 and 6 columns
        return linear_logprobs(h, w, labels, bias=b, temperature=0.9, chunk_size=2,
                               return_entropy=with_entropy)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_empty_input():
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    logp = linear_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long))
    logp.sum().backward()
    assert logp.shape == (0,) and torch.all(weight.grad == 0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(weight=torch.ones(10, 4, dtype=torch.float16)),
     r"weight: expected dtype in \(float32\), got float16"),
    (dict(weight=torch.ones(10, 5)), r"weight: expected shape \[V, 4\]"),
    (dict(bias=torch.ones(9)), r"bias: expected shape \[10\], got \(9,\)"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), r"labels: expected shape \(2,\)"),
    (dict(reduction="avg"), "reduction: expected one of"),
    (dict(chunk_size=0), "chunk_size: expected a positive int or None, got 0"),
    (dict(temperature=-1.0), "temperature: expected a finite value > 0"),
])
def test_bad_input_raises_value_error_naming_the_argument(kwargs, message):
    args = dict(hidden=torch.ones(2, 4), weight=torch.ones(10, 4),
                labels=torch.zeros(2, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        linear_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


# ---- the scalar (gradient-in-forward) path, NaN rows, all-ignored mean, memory -------------

# float64 runs on the torch backend only (forcing a kernel onto it: the test after this one)
SCALAR_PATH_CASES = [(name, dtype) for name in BACKENDS
                     for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
                     if dtype != torch.float64 or name == "torch"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("name,dtype", SCALAR_PATH_CASES, ids=str)
def test_scalar_path_matches_reference(monkeypatch, name, reduction, dtype, device):
    """reduction="sum"/"mean" without entropy computes the gradients during the forward and
    scales them by the (random, not 1) upstream scalar in backward (16-bit: on a GPU, with
    float32 accumulators; on a CPU 16-bit takes the per-token path, checked the same)."""
    use_backend(monkeypatch, name, device, op="linear_logprobs", dtype=dtype)
    hidden, weight, b, labels = make_inputs(37, 24, 700, dtype, device, ignore_frac=0.3)
    c = float(torch.randn(()))
    out = run(lambda *a, **k: c * linear_logprobs(*a, reduction=reduction, **k),
              hidden, weight, b, labels, torch.ones((), device=device), None, chunk_size=5)
    to64 = lambda t: t.double()
    count = (labels != -100).sum() if reduction == "mean" else 1
    ref = run(lambda *a, **k: c * linear_logprobs_reference(*a, **k).sum() / count,
              to64(hidden), to64(weight), to64(b), labels,
              torch.ones((), dtype=torch.float64, device=device), None)
    eager = run(lambda *a, **k: c * linear_logprobs_reference(*a, **k).sum() / count,
                hidden, weight, b, labels, torch.ones((), device=device), None)
    for i, what in [(0, "loss"), (2, "grad_hidden"), (3, "grad_weight"), (4, "grad_bias")]:
        check(what, out[i].reshape(-1), ref[i].reshape(-1), eager[i].reshape(-1), dtype)


@pytest.mark.parametrize("name", ["native", "triton"])
def test_float64_cannot_be_forced_onto_a_kernel(monkeypatch, name):
    monkeypatch.setenv("KERNELRL_BACKEND", name)
    hidden, weight, _, labels = make_inputs(5, 8, 40, torch.float64, "cpu")
    with pytest.raises(BackendError, match=f"KERNELRL_BACKEND={name} cannot run "
                                           "linear_logprobs on cpu float64: .* not float64"):
        linear_logprobs(hidden, weight, labels, reduction="mean")


def test_scalar_path_second_backward_raises():
    h = torch.randn(5, 8, requires_grad=True)
    loss = linear_logprobs(h, torch.randn(40, 8), torch.arange(5), reduction="mean")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated"):
        loss.backward()


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("reduction,entropy", [("mean", False), ("mean", True), ("sum", False)])
def test_all_ignored_mean_is_zero_with_zero_gradients(monkeypatch, name, reduction, entropy):
    """Chosen on purpose: an all-padding micro-batch gives 0 (F.cross_entropy gives NaN)."""
    use_backend(monkeypatch, name, "cpu", op="linear_logprobs")
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    out = linear_logprobs(h, w, torch.full((6,), -100), reduction=reduction,
                          return_entropy=entropy)
    loss = out[0] + out[1] if entropy else out
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_out_of_range_label_nan_reaches_exactly_what_the_docstring_says(monkeypatch, name,
                                                                         reduction):
    """Its own logp and grad_hidden row are NaN, and (summing over tokens) every row of
    grad_weight and grad_bias; other grad_hidden rows stay finite."""
    use_backend(monkeypatch, name, "cpu", op="linear_logprobs")
    hidden, weight, b, labels = make_inputs(9, 8, 130, torch.float32, "cpu", ignore_frac=0.0)
    labels[4] = 130
    h, w, bb = (t.clone().requires_grad_() for t in (hidden, weight, b))
    logp = linear_logprobs(h, w, labels, bias=bb, reduction=reduction, chunk_size=3)
    if reduction == "none":
        assert logp[4].isnan() and logp[torch.arange(9) != 4].isfinite().all()
        logp.nan_to_num().sum().backward()          # a finite upstream gradient for every row
    else:
        assert logp.isnan()
        logp.backward()
    others = torch.arange(9) != 4
    assert h.grad[4].isnan().all() and h.grad[others].isfinite().all()
    assert w.grad.isnan().any(dim=1).all() and bb.grad.isnan().all()


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of distinct storages that are still referenced from Python, sampled after
    every aten op: catches O(blocks·N) lists of per-block results."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                key = t.untyped_storage().data_ptr()
                self.live[key] = (weakref.ref(t), t.untyped_storage().nbytes())
        self.live = {k: v for k, v in self.live.items() if v[0]() is not None}
        self.peak = max(self.peak, sum(v[1] for v in self.live.values()))
        return out


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_memory_stays_bounded_for_the_smallest_chunk(monkeypatch, reduction):
    """chunk_size=1 once kept one result per vocabulary block alive ([blocks, N] floats,
    here 4 MiB); the bound O(C·V + N·H) must hold for every chunk size."""
    use_backend(monkeypatch, "native", "cpu", op="linear_logprobs")
    n, width, vocab = 1024, 8, 16384
    hidden, weight, _, labels = make_inputs(n, width, vocab, torch.float32, "cpu", bias=False)
    hidden.requires_grad_()
    weight.requires_grad_()
    mode = _LiveBytes()
    with mode:
        logp = linear_logprobs(hidden, weight, labels, chunk_size=1, reduction=reduction)
        (logp.sum() if reduction == "none" else logp).backward()
    inputs_and_grads = 2 * (n * width + vocab * width) * 4 + n * 8
    bound = inputs_and_grads + 4 * vocab * 4 + 24 * n * 8      # a tile, O(N) vectors
    assert mode.peak <= bound, f"peak live {mode.peak} bytes > bound {bound}"


def test_scalar_path_under_no_grad_computes_no_gradients(monkeypatch):
    """Evaluation (torch.no_grad) must not pay for the gradients the scalar path would
    otherwise compute during the forward: one matmul (the logits), no gradient matmuls."""
    use_backend(monkeypatch, "native", "cpu", op="linear_logprobs")
    hidden, weight, _, labels = make_inputs(64, 16, 3000, torch.float32, "cpu", bias=False)
    hidden.requires_grad_()
    weight.requires_grad_()

    class Matmuls(TorchDispatchMode):
        calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "mm" in func.__name__:
                Matmuls.calls.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Matmuls():
        linear_logprobs(hidden, weight, labels, reduction="mean")
    assert len(Matmuls.calls) == 3          # with gradients: logits, grad_hidden, grad_weight
    Matmuls.calls = []
    with torch.no_grad(), Matmuls():
        loss = linear_logprobs(hidden, weight, labels, reduction="mean")
    assert len(Matmuls.calls) == 1, Matmuls.calls
    ref = linear_logprobs_reference(hidden.double(), weight.double(), labels)
    check("loss", loss.reshape(1), ref[labels != -100].mean().reshape(1), None, torch.float32)
