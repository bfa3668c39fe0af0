"""NF4 Triton kernels (kernelrl.ops.nf4.triton_impl) against float64 references: the
dequant-GEMM in both directions (odd shapes, K odd so rows start mid-byte, K a multiple of
the blocksize), both scale modes, fp32/fp16/bf16, bias and LoRA (R = 4, 16), small tiles
(many programs, grouped ordering, two scale candidates), the decode GEMV for 1, 5 and 16
rows with and without K splits, NaN-poisoned outputs, zero weight blocks, extreme
activations, bad arguments.

Runs under the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 when
there is no GPU) and compiled on a GPU. References: Ŵ dequantized in float32 exactly
(format.dequantize_reference), then float64 math; "eager" is torch in the tested dtype on
Ŵ cast to that dtype, the bound of numerics.check.
"""

import pytest
import torch
import torch.nn.functional as F
import triton

from backends import DEVICES
from kernelrl import backend
from kernelrl.ops.nf4 import nf4_quantize, triton_impl
from kernelrl.ops.nf4.format import dequantize_reference
from numerics import check

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["fp32", "fp16", "bf16"]
# (N, K, blocksize): K odd (rows start mid-byte, blocks straddle rows); K a multiple of the
# blocksize (every row starts a block)
SHAPES = [(37, 129, 32), (40, 128, 64)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=DEVICES)
def device(request):
    name = request.param
    if name == "cpu" and not backend.triton_interpret():
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    return name


def quantized(N, K, blocksize, double_quant, device, zero_rows=()):
    w = torch.randn(N, K, device=device) * 0.05
    for r in zero_rows:
        w[r] = 0.0
    qw = nf4_quantize(w, blocksize=blocksize, double_quant=double_quant)
    return qw, dequantize_reference(qw, torch.float32)


def poisoned(*shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def matmul_refs(a, w32, transpose_w, dtype, bias=None, left=None, right=None, scale=1.0):
    """(float64 reference, eager result in ``dtype``) of a·op(Ŵ) + bias + scale·left·right."""
    w64 = w32.double()
    ref = a.double() @ (w64.t() if transpose_w else w64)
    wd = w32.to(dtype)
    eager = F.linear(a, wd, bias) if transpose_w else a @ wd
    if bias is not None and not transpose_w:
        eager = eager + bias
    if bias is not None:
        ref = ref + bias.double()
    if left is not None:
        ref = ref + scale * (left.double() @ right.double())
        eager = eager + scale * (left @ right)
    return ref, eager


# ---------------------------------------------------------------------------------------
# dequant-GEMM
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("transpose_w", [True, False], ids=["fwd", "dx"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("N,K,blocksize", SHAPES)
def test_matmul_matches_float64(device, N, K, blocksize, double_quant, transpose_w, dtype):
    qw, w32 = quantized(N, K, blocksize, double_quant, device)
    M = 33
    a = torch.randn(M, K if transpose_w else N, device=device).to(dtype)
    out = poisoned(M, N if transpose_w else K, dtype=dtype, device=device)
    y = triton_impl.dequant_matmul(a, qw, transpose_w=transpose_w, out=out)
    assert y is out and y.dtype == dtype
    ref, eager = matmul_refs(a, w32, transpose_w, dtype)
    check("out", y, ref, eager, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("N,K,blocksize", SHAPES)
def test_decode_is_exact(device, N, K, blocksize, double_quant, dtype):
    """Identity activations read Ŵ back bit for bit: every element decoded as float32
    code·scale (the double-quantized scale multiplied, then offset added), rounded once to
    nearest even in the dtype; both directions of the GEMM and both GEMV paths."""
    qw, w32 = quantized(N, K, blocksize, double_quant, device)
    want = w32.to(dtype)
    eye_k = torch.eye(K, device=device, dtype=dtype)
    assert torch.equal(triton_impl.dequant_matmul(eye_k, qw, transpose_w=True), want.t())
    eye_n = torch.eye(N, device=device, dtype=dtype)
    assert torch.equal(triton_impl.dequant_matmul(eye_n, qw, transpose_w=False), want)
    for cols in ([K - 1], list(range(0, K, K // 15))[:16]):       # M = 1 and M = 16
        assert torch.equal(triton_impl.gemv(eye_k[cols], qw), want.t()[cols])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("transpose_w", [True, False], ids=["fwd", "dx"])
@pytest.mark.parametrize("extras", ["bias", "lora4", "bias+lora16"])
def test_matmul_bias_and_lora(device, extras, transpose_w, dtype):
    N, K, blocksize = 37, 129, 32
    qw, w32 = quantized(N, K, blocksize, True, device)
    M = 33
    Q, P = (K, N) if transpose_w else (N, K)
    a = torch.randn(M, Q, device=device).to(dtype)
    bias = (torch.randn(P, device=device) if "bias" in extras else None)
    bias = bias.to(dtype) if bias is not None else None
    left = right = None
    scale = 0.5
    if "lora" in extras:
        R = int(extras.split("lora")[1])
        left = torch.randn(M, R, device=device).to(dtype)
        # the forward's right factor is Bᵀ, a transposed view of B [N, R]
        right = (torch.randn(P, R, device=device).to(dtype).t() if transpose_w
                 else torch.randn(R, P, device=device).to(dtype))
    out = poisoned(M, P, dtype=dtype, device=device)
    y = triton_impl.dequant_matmul(a, qw, transpose_w=transpose_w, bias=bias, lora_left=left,
                                   lora_right=right, lora_scale=scale, out=out)
    ref, eager = matmul_refs(a, w32, transpose_w, dtype, bias, left, right, scale)
    check("out", y, ref, eager, dtype)


@pytest.mark.parametrize("transpose_w", [True, False], ids=["fwd", "dx"])
@pytest.mark.parametrize("blocksize", [32, 64])
def test_matmul_small_tiles(device, monkeypatch, blocksize, transpose_w):
    """Tiles of 16x32x32: many programs in GROUP_M order, K steps with a tail, runs of 32
    elements over one or two blocks (the GPU's usual case), the LoRA rank in steps."""
    if device == "cuda":
        pytest.skip("the interpreter's config is replaced; on a GPU the autotuner picks")
    cfg = triton.Config(dict(BLOCK_M=16, BLOCK_P=32, BLOCK_Q=32, GROUP_M=2), num_warps=4)
    monkeypatch.setattr(triton_impl._nf4_gemm, "configs", [cfg])
    N, K, M, R = 75, 97, 70, 20
    qw, w32 = quantized(N, K, blocksize, True, device)
    Q, P = (K, N) if transpose_w else (N, K)
    a = torch.randn(M, Q, device=device)
    bias = torch.randn(P, device=device)
    left, right = torch.randn(M, R, device=device), torch.randn(R, P, device=device)
    out = poisoned(M, P, dtype=torch.float32, device=device)
    y = triton_impl.dequant_matmul(a, qw, transpose_w=transpose_w, bias=bias, lora_left=left,
                                   lora_right=right, lora_scale=2.0, out=out)
    ref, eager = matmul_refs(a, w32, transpose_w, torch.float32, bias, left, right, 2.0)
    check("out", y, ref, eager, torch.float32)


def test_matmul_strided_operands(device):
    """a, the LoRA factors and out as transposed views; the default output allocation."""
    N, K, M, R = 37, 129, 33, 4
    qw, w32 = quantized(N, K, 32, True, device)
    a = torch.randn(K, M, device=device).t()
    left = torch.randn(R, M, device=device).t()
    right = torch.randn(N, R, device=device).t()
    y = triton_impl.dequant_matmul(a, qw, transpose_w=True, lora_left=left, lora_right=right)
    ref, eager = matmul_refs(a, w32, True, torch.float32, None, left, right)
    check("out", y, ref, eager, torch.float32)
    out_t = poisoned(N, M, dtype=torch.float32, device=device)
    y2 = triton_impl.dequant_matmul(a, qw, transpose_w=True, lora_left=left, lora_right=right,
                                    out=out_t.t())
    assert torch.equal(y2, y)


def test_matmul_zero_blocks(device):
    """Zero rows (whole blocks of code 7, absmax 0, and double-quantized scales that
    decode near 0) give exact zeros; an all-zero weight gives exactly bias."""
    N, K = 40, 128
    qw, w32 = quantized(N, K, 64, True, device, zero_rows=(0, 5, 6, 39))
    a = torch.randn(33, K, device=device)
    y = triton_impl.dequant_matmul(a, qw, transpose_w=True)
    assert torch.all(y[:, [0, 5, 6, 39]] == 0)
    ref, eager = matmul_refs(a, w32, True, torch.float32)
    check("out", y, ref, eager, torch.float32)
    zero = nf4_quantize(torch.zeros(N, K, device=device))
    bias = torch.randn(N, device=device)
    y0 = triton_impl.dequant_matmul(a, zero, transpose_w=True, bias=bias)
    assert torch.equal(y0, bias.expand(33, N))
    g = torch.randn(33, N, device=device)
    assert torch.equal(triton_impl.dequant_matmul(g, zero, transpose_w=False),
                       torch.zeros(33, K, device=device))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("transpose_w", [True, False], ids=["fwd", "dx"])
def test_matmul_extreme_activations(device, transpose_w, dtype):
    """Rows from tiny to huge (within the dtype's range after the product), and a NaN:
    NaN only in its own row."""
    N, K, M = 37, 129, 33
    qw, w32 = quantized(N, K, 32, True, device)
    Q = K if transpose_w else N
    top = 3.0 if dtype == torch.float16 else 25.0
    exps = torch.linspace(-top, top, M, device=device)
    a = (torch.randn(M, Q, device=device) * 10.0 ** exps[:, None]).to(dtype)
    a[7, 3] = float("nan")
    y = triton_impl.dequant_matmul(a, qw, transpose_w=transpose_w)
    ref, eager = matmul_refs(a, w32, transpose_w, dtype)
    assert torch.isnan(y[7]).all() and not torch.isnan(y[torch.arange(M) != 7]).any()
    keep = torch.arange(M, device=device) != 7
    # row by row: each row's relative error (a single norm would see only the largest rows)
    for m in range(0, M, 4):
        if keep[m]:
            check(f"row {m}", y[m], ref[m], eager[m], dtype)


@pytest.mark.parametrize("N,K", [(1, 1), (1, 65), (3, 1), (2, 3)])
def test_tiny_weights(device, N, K):
    """One-element rows (both strides 1), one row, a weight smaller than a block."""
    qw, w32 = quantized(N, K, 32, True, device)
    a = torch.randn(17, K, device=device)
    g = torch.randn(17, N, device=device)
    check("fwd", triton_impl.dequant_matmul(a, qw, transpose_w=True),
          *matmul_refs(a, w32, True, torch.float32), torch.float32)
    check("dx", triton_impl.dequant_matmul(g, qw, transpose_w=False),
          *matmul_refs(g, w32, False, torch.float32), torch.float32)
    for M in (1, 3):
        check("gemv", triton_impl.gemv(a[:M], qw), *matmul_refs(a[:M], w32, True,
                                                                   torch.float32), torch.float32)


def test_matmul_empty(device):
    qw, _ = quantized(37, 129, 32, True, device)
    assert triton_impl.dequant_matmul(torch.zeros(0, 129, device=device), qw,
                                      transpose_w=True).shape == (0, 37)
    assert triton_impl.dequant_matmul(torch.zeros(0, 37, device=device), qw,
                                      transpose_w=False).shape == (0, 129)


# ---------------------------------------------------------------------------------------
# decode GEMV
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("N,K,blocksize", SHAPES)
def test_gemv_matches_float64(device, N, K, blocksize, double_quant, M, dtype):
    qw, w32 = quantized(N, K, blocksize, double_quant, device)
    x = torch.randn(M, K, device=device).to(dtype)
    out = poisoned(M, N, dtype=dtype, device=device)
    y = triton_impl.gemv(x, qw, out=out)
    assert y is out
    ref, eager = matmul_refs(x, w32, True, dtype)
    check("y", y, ref, eager, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("N,K,blocksize", SHAPES)
def test_gemv_split_k(device, monkeypatch, N, K, blocksize, M, dtype):
    """K in 3 splits of 32-element steps (the partial-sum path, two scale candidates)."""
    monkeypatch.setattr(triton_impl, "_gemv_config", lambda M, N, K, bs: (16, 16, 3, 4))
    qw, w32 = quantized(N, K, blocksize, True, device)
    x = torch.randn(M, K, device=device).to(dtype)
    y = triton_impl.gemv(x, qw, out=poisoned(M, N, dtype=dtype, device=device))
    ref, eager = matmul_refs(x, w32, True, dtype)
    check("y", y, ref, eager, dtype)


def test_gemv_zero_blocks_and_extremes(device):
    N, K = 37, 129
    qw, w32 = quantized(N, K, 32, True, device, zero_rows=(2, 3, 36))
    x = torch.randn(3, K, device=device) * torch.tensor([1e-30, 1.0, 1e30], device=device)[:, None]
    y = triton_impl.gemv(x, qw)
    assert torch.all(y[:, [2, 3, 36]] == 0)
    ref, eager = matmul_refs(x, w32, True, torch.float32)
    for m in range(3):
        check(f"row {m}", y[m], ref[m], eager[m], torch.float32)
    x1 = torch.randn(1, K, device=device)
    x1[0, 100] = float("nan")
    assert torch.isnan(triton_impl.gemv(x1, qw)).all()


def test_gemv_matches_matmul(device):
    """The two kernels agree (fp32: both exact Ŵ, fp32 accumulation)."""
    qw, _ = quantized(37, 129, 32, True, device)
    x = torch.randn(5, 129, device=device)
    torch.testing.assert_close(triton_impl.gemv(x, qw),
                               triton_impl.dequant_matmul(x, qw, transpose_w=True),
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------

def test_bad_arguments_name_the_argument(device):
    qw, _ = quantized(37, 129, 32, True, device)
    a = torch.randn(33, 129, device=device)
    mm = triton_impl.dequant_matmul
    cases = [
        (lambda: mm(a[:, :128], qw, transpose_w=True), "a: expected 129 columns"),
        (lambda: mm(a, qw, transpose_w=False), "a: expected 37 columns"),
        (lambda: mm(a.double(), qw, transpose_w=True), "a: expected dtype"),
        (lambda: mm(a[0], qw, transpose_w=True), "a: expected 2 dimensions"),
        (lambda: mm(a, "w", transpose_w=True), "qweight: expected an NF4Weight"),
        (lambda: mm(a, qw, transpose_w=True, bias=torch.zeros(36, device=device)),
         "bias: expected shape (37,)"),
        (lambda: mm(a, qw, transpose_w=True, lora_left=torch.zeros(33, 4, device=device)),
         "lora_left, lora_right: expected both"),
        (lambda: mm(a, qw, transpose_w=True, lora_left=torch.zeros(33, 4, device=device),
                    lora_right=torch.zeros(4, 36, device=device)),
         "lora_right: expected shape (4, 37)"),
        (lambda: mm(a, qw, transpose_w=True, lora_left=torch.zeros(33, 4, device=device),
                    lora_right=torch.zeros(4, 37, device=device, dtype=torch.bfloat16)),
         "lora_right: expected dtype in (float32)"),
        (lambda: mm(a, qw, transpose_w=True, out=torch.zeros(33, 37, dtype=torch.float16,
                                                              device=device)),
         "out: expected dtype"),
        (lambda: triton_impl.gemv(torch.randn(17, 129, device=device), qw),
         "x2d: expected 1 to 16 rows"),
        (lambda: triton_impl.gemv(torch.randn(2, 128, device=device), qw),
         "x2d: expected 129 columns"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    qw, _ = quantized(37, 129, 32, True, "cpu")
    monkeypatch.setattr(backend, "triton_interpret", lambda: False)
    with pytest.raises(ValueError, match="a: expected a CUDA tensor"):
        triton_impl.dequant_matmul(torch.randn(3, 129), qw, transpose_w=True)
    with pytest.raises(ValueError, match="x2d: expected a CUDA tensor"):
        triton_impl.gemv(torch.randn(3, 129), qw)
