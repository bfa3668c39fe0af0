"""The ppo_loss family of kernelrl._native, called raw (pointers as ints).

Checks the C++ CPU kernels (ppo_loss_fwd_cpu, ppo_loss_bwd_cpu) against float64: the rows'
masked sums against a float64 evaluation of the columns, the finished loss, stats and
gradients against kernelrl.ops.ppo_loss.ppo_loss_reference; a hand-computed batch; results
bitwise independent of the thread count; padding never read; the exp path of k3 for |k| >= 2;
fp16 / bf16 gradients rounded to nearest even; argument validation. Both CPU code paths run:
the dispatched one (AVX2 where available) and the baseline one (KERNELRL_CPU_ISA=generic).

Also the CUDA twins' workspace size and argument validation (which run everywhere); their
results are checked in test_ppo_loss_cuda.py.

Shape legend: B rows, T tokens per row.
Error measure: ||out - ref|| / ||ref|| over the non-NaN entries; NaN patterns must match exactly.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from numerics import rel_err_matching_nan as rel_err

from kernelrl.ops.ppo_loss import COLUMNS, ppo_loss_reference

native = pytest.importorskip(
    "kernelrl._native", reason="kernelrl._native is not built (pip install -e . builds it)"
)

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MASK_KIND = {torch.uint8: 0, torch.float32: 1}
INPUTS = ("logprobs", "old_logprobs", "advantages", "mask", "values", "old_values", "returns",
          "entropy", "ref_logprobs", "rollout_logprobs")
GRADS = ("logprobs", "values", "entropy")
AGG = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2,
       "seq-mean-token-sum-norm": 3}
POISON = 7777.0  # written into outputs first: any element the kernel fails to write shows up
NCOLS = len(COLUMNS)
# clip_eps 0.2 / 0.28, dual clip 2.5, value_clip 0.2, tis_cap 1.1, entropy 0.03, kl 0.2
CFG = dict(lo=0.8, hi=1.28, dual_clip=2.5, value_clip=0.2, tis_cap=1.1, vf_coef=0.1,
           entropy_coef=0.03, kl_loss_coef=0.2)


# ---- raw calls ---------------------------------------------------------------------------------


def ptr(t):
    return 0 if t is None else t.data_ptr()


def run_fwd(x, *, agg="token-mean", norm_length=1.0, **over):
    """ppo_loss_fwd_cpu on the dict x (INPUTS, None where absent); poisoned outputs.
    Returns rows [B, 11], loss, stats [11], omega [B], vf_scale."""
    c = {**CFG, **over}
    B, T = x["logprobs"].shape
    rows = torch.full((B, NCOLS), POISON, dtype=torch.float64)
    loss, stats = torch.full((), POISON), torch.full((NCOLS,), POISON)
    omega, vf_scale = torch.full((B,), POISON), torch.full((), POISON)
    native.ppo_loss_fwd_cpu(
        *[ptr(x.get(n)) for n in INPUTS], rows.data_ptr(), loss.data_ptr(), stats.data_ptr(),
        omega.data_ptr(), vf_scale.data_ptr(), B, T, DTYPES[x["logprobs"].dtype],
        MASK_KIND[x["mask"].dtype], x["advantages"].dim() == 1, c["lo"], c["hi"],
        c["dual_clip"], c["value_clip"], c["tis_cap"], c["vf_coef"], c["entropy_coef"],
        c["kl_loss_coef"], AGG[agg], norm_length)
    return rows, loss, stats, omega, vf_scale


def run_bwd(x, omega, vf_scale, *, g=1.0, needs=(True, True, True), **over):
    """ppo_loss_bwd_cpu; poisoned gradients (None where not wanted or not given)."""
    c = {**CFG, **over}
    B, T = x["logprobs"].shape
    grads = [torch.full((B, T), POISON).to(x["logprobs"].dtype)
             if need and x.get(n) is not None else None for n, need in zip(GRADS, needs)]
    grad_loss = torch.tensor(g, dtype=torch.float32)   # alive through the call
    native.ppo_loss_bwd_cpu(
        *[ptr(x.get(n)) for n in INPUTS], grad_loss.data_ptr(), omega.data_ptr(),
        vf_scale.data_ptr(), *[ptr(t) for t in grads], B, T, DTYPES[x["logprobs"].dtype],
        MASK_KIND[x["mask"].dtype], x["advantages"].dim() == 1, c["lo"], c["hi"],
        c["dual_clip"], c["value_clip"], c["tis_cap"], c["entropy_coef"], c["kl_loss_coef"])
    return dict(zip(GRADS, grads))


def make_inputs(B, T, dtype=torch.float32, *, mask_dtype=torch.uint8, per_row=False,
                scale=0.3, holes=True, gen=None):
    """Every input given; right-padded rows of random lengths (row 0 full, row 1 empty when
    B > 2), with holes; ratios near 1 (some clipped), mixed-sign advantages."""
    def rand(s=1.0):
        return torch.randn(B, T, generator=gen) * s

    old = rand(scale)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    if B > 2:
        lengths[0], lengths[1] = T, 0
    real = torch.arange(T) < lengths[:, None]
    if holes:
        real &= torch.rand(B, T, generator=gen) > 0.1
    mask = real.to(mask_dtype)
    if mask_dtype == torch.float32:
        mask = mask * (0.5 + torch.rand(B, T, generator=gen))
    x = {"logprobs": old + rand(scale), "old_logprobs": old,
         "advantages": torch.randn(B, generator=gen) if per_row else rand(),
         "mask": mask, "values": rand(), "old_values": rand(), "returns": rand(),
         "entropy": rand().abs(), "rollout_logprobs": old + rand(0.2)}
    x["ref_logprobs"] = x["logprobs"] + rand(scale)
    return {k: v if k == "mask" else v.to(dtype) for k, v in x.items()}


def poison_padding(x, pad):
    """x with NaN, inf or -inf (in turn, per input) written on the padding ``pad`` of every
    [B, T] input but the mask."""
    return {k: v if k == "mask" or v.dim() == 1 else
            v.masked_fill(pad, (math.nan, math.inf, -math.inf)[i % 3])
            for i, (k, v) in enumerate(x.items())}


def reference_rows(x):
    """The rows' masked sums in float64, column by column (ppo_loss.h)."""
    d64 = {k: v.double() for k, v in x.items() if v is not None}
    m = d64["mask"]
    real = m != 0
    B, T = m.shape
    adv = d64["advantages"]
    adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv
    d = d64["logprobs"] - d64["old_logprobs"]
    r = d.exp()
    l1, l2 = -adv * r, -adv * r.clamp(CFG["lo"], CFG["hi"])
    pg = torch.maximum(l1, l2)
    pg = torch.where(adv < 0, torch.minimum(pg, -CFG["dual_clip"] * adv), pg)
    w_raw = (d64["old_logprobs"] - d64["rollout_logprobs"]).exp()
    w = w_raw.clamp(max=CFG["tis_cap"])
    e = d64["values"] - d64["returns"]
    lo, hi = d64["old_values"] - CFG["value_clip"], d64["old_values"] + CFG["value_clip"]
    ec = torch.maximum(torch.minimum(d64["values"], hi), lo) - d64["returns"]
    k = d64["logprobs"] - d64["ref_logprobs"]
    cols = [torch.ones_like(d), pg * w, (l2 > l1).double(), d * d / 2, r,
            torch.maximum(e * e, ec * ec) / 2, (ec * ec > e * e).double(), d64["entropy"],
            torch.expm1(-k) + k, w, (w_raw > CFG["tis_cap"]).double()]
    return torch.stack([torch.where(real, m * c, 0.0).sum(1) for c in cols], 1)


def reference(x, agg="token-mean", g=1.0, norm_length=None):
    """(loss, stats [11], grads) from ppo_loss_reference in float64."""
    leaves = {k: x[k].double().requires_grad_() for k in GRADS}
    kw = {k: (leaves[k] if k in leaves else v.double() if v.is_floating_point() else v)
          for k, v in x.items()}
    kw["mask"] = x["mask"].double() if x["mask"].is_floating_point() else x["mask"]
    loss, stats = ppo_loss_reference(
        **kw, clip_eps=1 - CFG["lo"], clip_eps_high=CFG["hi"] - 1, dual_clip=CFG["dual_clip"],
        value_clip=CFG["value_clip"], vf_coef=CFG["vf_coef"], entropy_coef=CFG["entropy_coef"],
        kl_loss_coef=CFG["kl_loss_coef"], tis_cap=CFG["tis_cap"], agg=agg,
        norm_length=norm_length)
    grads = torch.autograd.grad(loss * g, [leaves[k] for k in GRADS])
    count = (x["mask"].double() * (x["mask"] != 0)).sum()
    stats["count"] = count / (count if count else 1)     # column 0: Σm / Σm
    return loss.detach(), torch.stack([stats[c] for c in COLUMNS]), dict(zip(GRADS, grads))


# ---- against float64 -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("mask_dtype", list(MASK_KIND), ids=str)
@pytest.mark.parametrize("per_row", [False, True])
def test_matches_float64(isa, dtype, mask_dtype, per_row):
    """600 tokens per row: a chunk of 512 and a partial one; fp32 targets 1e-5, fp16/bf16
    1e-2 (against float64 of the rounded inputs, so only the kernel's own error counts)."""
    gen = torch.Generator().manual_seed(1)
    x = make_inputs(7, 600, dtype, mask_dtype=mask_dtype, per_row=per_row, gen=gen)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    rows, loss, stats, omega, vf_scale = run_fwd(x, agg="seq-mean-token-mean")
    assert rel_err(rows, reference_rows(x), "rows") < 1e-6
    ref_loss, ref_stats, ref_grads = reference(x, "seq-mean-token-mean", g=1.7)
    assert rel_err(loss, ref_loss, "loss") < 1e-6
    for j, name in enumerate(COLUMNS):
        assert rel_err(stats[j], ref_stats[j], name) < 1e-6, name
    n_b = torch.where(rows[:, 0] == 0, 1.0, rows[:, 0])
    torch.testing.assert_close(omega.double(), 1.0 / (n_b * 7), rtol=1e-7, atol=0)
    grads = run_bwd(x, omega, vf_scale, g=1.7)
    for name in GRADS:
        assert grads[name].dtype == dtype
        assert rel_err(grads[name], ref_grads[name], name) < tol, name


@pytest.mark.parametrize("agg", list(AGG))
def test_finish_of_every_aggregation(isa, agg):
    gen = torch.Generator().manual_seed(2)
    x = make_inputs(5, 90, gen=gen)
    norm = 128.0 if agg == "seq-mean-token-sum-norm" else None
    rows, loss, stats, omega, vf_scale = run_fwd(x, agg=agg, norm_length=norm or 1.0)
    ref_loss, ref_stats, ref_grads = reference(x, agg, norm_length=norm)
    assert rel_err(loss, ref_loss, "loss") < 1e-6
    assert rel_err(stats, ref_stats, "stats") < 1e-6
    assert vf_scale.item() == pytest.approx(CFG["vf_coef"] / rows[:, 0].sum().item(), rel=1e-7)
    grads = run_bwd(x, omega, vf_scale)
    for name in GRADS:
        assert rel_err(grads[name], ref_grads[name], name) < 1e-5, name


# ---- a hand-computed batch ------------------------------------------------------------------------


def test_hand_computed(isa):
    """3 rows x 2 tokens, clip 0.2, no dual clip, no optional input:
       (0,0) r=1.5, A=1: max(-1.5, -1.2) = -1.2, clipped;  (0,1) r=0.5, A=-2: 1.6, clipped
       (1,0) r=1.1, A=0.5: -0.55, unclipped: d/dlogprobs = omega (-A r) = -0.55 / 3
       (1,1) padding holding NaN; row 2 all padding. token-mean over 3 tokens: omega = 1/3."""
    lp = torch.tensor([[math.log(1.5), math.log(0.5)], [math.log(1.1), math.nan], [1.0, 2.0]])
    x = {"logprobs": lp, "old_logprobs": torch.zeros(3, 2),
         "advantages": torch.tensor([[1.0, -2.0], [0.5, 7.0], [3.0, 3.0]]),
         "mask": torch.tensor([[1, 1], [1, 0], [0, 0]], dtype=torch.uint8)}
    rows, loss, stats, omega, vf_scale = run_fwd(x, lo=0.8, hi=1.2, dual_clip=math.inf)
    kl0 = (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2
    expected = torch.zeros(3, NCOLS, dtype=torch.float64)
    expected[0, :5] = torch.tensor([2, -1.2 + 1.6, 2, kl0, 2.0])
    expected[1, :5] = torch.tensor([1, -0.55, 0, math.log(1.1) ** 2 / 2, 1.1])
    torch.testing.assert_close(rows, expected, rtol=1e-6, atol=1e-7)
    assert loss.item() == pytest.approx(-0.05, rel=1e-6)
    assert stats[2].item() == pytest.approx(2 / 3, rel=1e-6)
    assert omega.tolist() == pytest.approx([1 / 3] * 3, rel=1e-7)
    assert vf_scale.item() == pytest.approx(0.1 / 3, rel=1e-7)
    g = run_bwd(x, omega, vf_scale, lo=0.8, hi=1.2, dual_clip=math.inf)["logprobs"]
    torch.testing.assert_close(g, torch.tensor([[0.0, 0.0], [-0.55 / 3, 0.0], [0.0, 0.0]]),
                               rtol=1e-6, atol=0)


# ---- properties -------------------------------------------------------------------------------------


def test_results_do_not_depend_on_threads(isa):
    gen = torch.Generator().manual_seed(3)
    x = make_inputs(61, 2000, mask_dtype=torch.float32, gen=gen)
    before = native.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            native.set_num_threads(threads)
            rows, loss, stats, omega, vf_scale = run_fwd(x, agg="token-mean")
            outs.append((rows, loss, stats, omega, *run_bwd(x, omega, vf_scale).values()))
    finally:
        native.set_num_threads(before)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_mask_kinds_agree_bitwise(isa):
    """A uint8 mask and the same weights as float32 give the same bits (the uint8 path sums
    its integer columns in fp32 lanes, exactly)."""
    gen = torch.Generator().manual_seed(4)
    x = make_inputs(9, 700, gen=gen)
    x["mask"] = x["mask"] * torch.randint(1, 4, x["mask"].shape, generator=gen).to(torch.uint8)
    a = run_fwd(x)
    b = run_fwd({**x, "mask": x["mask"].float()})
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    ga, gb = run_bwd(x, a[3], a[4]), run_bwd({**x, "mask": x["mask"].float()}, b[3], b[4])
    assert all(torch.equal(ga[k], gb[k]) for k in GRADS)


@pytest.mark.parametrize("mask_dtype", list(MASK_KIND), ids=str)
def test_padding_is_never_read(isa, mask_dtype):
    """NaN / inf on padding (long runs of it across chunks, holes, empty rows) change no bit,
    and every gradient there is 0."""
    gen = torch.Generator().manual_seed(5)
    x = make_inputs(6, 1100, mask_dtype=mask_dtype, gen=gen)
    x["mask"][3] = 0
    x["mask"][3, 5] = x["mask"][3, 1000] = 1      # two real tokens in 1100
    clean = run_fwd(x, agg="seq-mean-token-mean")
    clean_g = run_bwd(x, clean[3], clean[4])
    pad = x["mask"] == 0
    dirty_x = poison_padding(x, pad)
    dirty = run_fwd(dirty_x, agg="seq-mean-token-mean")
    assert all(torch.equal(a, b) for a, b in zip(clean, dirty))
    dirty_g = run_bwd(dirty_x, dirty[3], dirty[4])
    for name in GRADS:
        assert torch.equal(clean_g[name], dirty_g[name])
        assert torch.all(dirty_g[name][pad] == 0)


def test_nan_on_a_real_token_propagates(isa):
    gen = torch.Generator().manual_seed(6)
    x = make_inputs(4, 300, holes=False, gen=gen)
    x["mask"][2, :10] = 1
    x["logprobs"][2, 7] = math.nan
    rows, loss, stats, omega, vf_scale = run_fwd(x)
    assert loss.isnan() and rows[2, 1].isnan() and not rows[[0, 1, 3]].isnan().any()
    g = run_bwd(x, omega, vf_scale)["logprobs"]
    assert g[2, 7].isnan() and g.isnan().sum() == 1


def test_kl_beyond_the_series(isa):
    """|k| >= 2 on a few tokens of some chunks: k3 and g_kl take the exp there (a chunk is run
    again with it), the series elsewhere; k ~ 1e-4 keeps its digits."""
    gen = torch.Generator().manual_seed(7)
    x = make_inputs(5, 800, gen=gen)
    x["ref_logprobs"] = x["logprobs"] + 1e-4 * torch.randn(5, 800, generator=gen)
    x["ref_logprobs"][1, 300] = x["logprobs"][1, 300] - 9.0
    x["ref_logprobs"][3, 7] = x["logprobs"][3, 7] + 2.5
    x["ref_logprobs"][3, 8] = x["logprobs"][3, 8] - 2.0
    x["mask"][1, 300] = x["mask"][3, 7] = x["mask"][3, 8] = 1
    rows, loss, stats, omega, vf_scale = run_fwd(x)
    assert rel_err(rows[:, 8], reference_rows(x)[:, 8], "kl rows") < 1e-6
    ref_loss, ref_stats, ref_grads = reference(x)
    assert rel_err(stats[8], ref_stats[8], "kl_loss") < 1e-6
    g = run_bwd(x, omega, vf_scale)["logprobs"]
    assert rel_err(g, ref_grads["logprobs"], "grad") < 1e-5
    # the three tokens alone: g_kl = 1 - exp(-k) within a few fp32 ulps
    for i, t in ((1, 300), (3, 7), (3, 8)):
        assert g[i, t].item() == pytest.approx(ref_grads["logprobs"][i, t].item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_gradients_round_to_nearest_even(isa, dtype):
    """The kernels upcast exactly, so their fp32 gradients of the half inputs are those of
    the same values as float32: rounded to nearest even, they must be torch's .to(dtype)."""
    gen = torch.Generator().manual_seed(8)
    x = make_inputs(4, 333, dtype, gen=gen)
    x32 = {k: v if k == "mask" else v.float() for k, v in x.items()}
    f = run_fwd(x)
    f32 = run_fwd(x32)
    assert all(torch.equal(a, b) for a, b in zip(f, f32))
    g, g32 = run_bwd(x, f[3], f[4], g=3.3), run_bwd(x32, f32[3], f32[4], g=3.3)
    for name in GRADS:
        assert torch.equal(g[name], g32[name].to(dtype)), name


def test_only_the_wanted_gradients_and_absent_inputs():
    gen = torch.Generator().manual_seed(9)
    x = make_inputs(3, 50, gen=gen)
    for gone in ("values", "old_values", "returns", "entropy", "ref_logprobs",
                 "rollout_logprobs"):
        x[gone] = None
    rows, loss, stats, omega, vf_scale = run_fwd(x)
    assert torch.all(rows[:, 5:] == 0) and torch.all(rows[:, :5] != POISON)
    g = run_bwd(x, omega, vf_scale, needs=(True, False, False))
    assert g["values"] is None and g["logprobs"].ne(POISON).all()


def test_empty_shapes():
    for B, T in ((0, 5), (3, 0), (0, 0)):
        x = make_inputs(max(B, 1), max(T, 1))
        x = {k: v[:B, :T] if v.dim() == 2 else v[:B] for k, v in x.items()}
        x = {k: v.contiguous() for k, v in x.items()}
        rows, loss, stats, omega, vf_scale = run_fwd(x)
        assert loss.item() == 0 and torch.all(stats == 0) and torch.all(rows == 0)
        assert torch.all(omega == 1.0) and vf_scale.item() == pytest.approx(0.1)  # 1/N: N=0
        run_bwd(x, omega, vf_scale)


def n_params(fn) -> int:
    """Parameter count of a pybind11 function, from the signature line of its docstring."""
    signature = fn.__doc__.splitlines()[0]
    return len(re.findall(r"(\w+): ", signature[signature.index("(") + 1:signature.rindex(")")]))


def test_entry_points():
    """The CPU twins, and in every build the CUDA twins (their arguments plus a stream) and the
    workspace size."""
    for step in ("fwd", "bwd"):
        cpu = getattr(native, f"ppo_loss_{step}_cpu")
        cuda = getattr(native, f"ppo_loss_{step}_cuda")
        assert callable(cpu) and callable(cuda)
        assert n_params(cuda) == n_params(cpu) + 1
        assert "stream: " in cuda.__doc__.splitlines()[0]
    assert callable(native.ppo_loss_cuda_workspace)
    assert "ppo_loss:" in native.__doc__


# The CUDA forward's tile (kPpoCudaTile in csrc/ppo_loss/ppo_loss.h): its workspace holds NCOLS
# partial sums per row and tile.
CUDA_TILE = 2048


def test_cuda_workspace_size():
    ws = native.ppo_loss_cuda_workspace
    for B, T in ((0, 0), (0, 7), (5, 0)):
        assert ws(B, T) == 0
    shapes = [(B, T) for B in (1, 2, 3, 64, 1000) for T in (1, 2, 2047, 2048, 2049, 5000, 10**6)]
    for B, T in shapes:
        size = ws(B, T)
        assert size >= B * NCOLS and size % (B * NCOLS) == 0
        assert size == B * math.ceil(T / CUDA_TILE) * NCOLS
        assert ws(B + 1, T) >= size and ws(B, T + 1) >= size   # monotone
    assert ws(2**20, 2**20) == 2**20 * 512 * NCOLS   # int64, no overflow
    with pytest.raises(ValueError, match=r"ppo_loss_cuda_workspace: n_rows: expected >= 0"):
        ws(-1, 8)
    with pytest.raises(ValueError, match=r"ppo_loss_cuda_workspace: n_cols: expected >= 0"):
        ws(8, -2)


# ---- argument errors ----------------------------------------------------------------------------


def _fwd_args(**change):
    x = make_inputs(2, 8)
    args = dict(zip(INPUTS, (ptr(x[n]) for n in INPUTS)))
    keep = [x, torch.zeros(2, NCOLS, dtype=torch.float64), torch.zeros(NCOLS + 3)]
    args.update(rows=keep[1].data_ptr(), loss=keep[2].data_ptr(), stats=keep[2].data_ptr(),
                omega=keep[2].data_ptr(), vf_scale=keep[2].data_ptr(), n_rows=2, n_cols=8,
                dtype=0, mask_kind=0, adv_per_row=False, lo=0.8, hi=1.2, dual_clip=math.inf,
                value_clip=0.2, tis_cap=math.inf, vf_coef=0.1, entropy_coef=0.0,
                kl_loss_coef=0.0, agg=0, norm_length=1.0)
    args.update(change)
    return args, keep


def entry(name, args):
    """native.<name> with args; a CUDA entry point gets stream=0 (its checks come first)."""
    if name.endswith("_cuda"):
        if not native.has_cuda():
            pytest.skip("this build has no CUDA part (its _cuda functions raise RuntimeError)")
        args = {**args, "stream": 0}
    return lambda: getattr(native, name)(**args)


@pytest.mark.parametrize("name", ["ppo_loss_fwd_cpu", "ppo_loss_fwd_cuda"])
@pytest.mark.parametrize("change,message", [
    (dict(n_rows=-1), "n_rows: expected >= 0, got -1"),
    (dict(n_cols=-3), "n_cols: expected >= 0, got -3"),
    (dict(mask_kind=2), r"mask_kind: expected 0 \(uint8\) or 1 \(float32\), got 2"),
    (dict(dtype=7), "dtype: expected 0 \\(float32\\)"),
    (dict(agg=4), "agg: expected 0 \\(token-mean\\)"),
    (dict(agg=3, norm_length=0.0), "norm_length: expected a finite number > 0"),
    (dict(old_values=0), "old_values: expected values, old_values and returns all given"),
    (dict(values=0), "values: expected values, old_values and returns all given"),
    (dict(logprobs=0), "logprobs: expected a non-null pointer"),
    (dict(mask=0), "mask: expected a non-null pointer"),
    (dict(advantages=0, adv_per_row=True), "advantages: expected a non-null pointer"),
    (dict(stats=0), "stats: expected a non-null pointer"),
    (dict(omega=0), "omega: expected a non-null pointer"),
])
def test_fwd_argument_errors_name_the_argument(name, change, message):
    args, _keep = _fwd_args(**change)
    call = entry(name, args)
    with pytest.raises(ValueError, match=f"{name}: " + message):
        call()


def test_cuda_fwd_needs_its_workspace():
    """rows is the CUDA forward's workspace: required, unless it would be empty (T = 0)."""
    args, _keep = _fwd_args(rows=0)
    call = entry("ppo_loss_fwd_cuda", args)
    with pytest.raises(ValueError, match="ppo_loss_fwd_cuda: rows: expected a non-null pointer"):
        call()
    if native.cuda_device_count() == 0:   # past the checks, the launch fails without a GPU
        args, _keep = _fwd_args(rows=0, n_cols=0)
        with pytest.raises(RuntimeError, match="CUDA"):
            native.ppo_loss_fwd_cuda(**args, stream=0)


def _bwd_args(**change):
    x = make_inputs(2, 8)
    keep = [x, torch.ones(4), torch.zeros(3, 2, 8)]
    args = dict(zip(INPUTS, (ptr(x[n]) for n in INPUTS)))
    args.update(grad_loss=keep[1].data_ptr(), omega=keep[1].data_ptr(),
                vf_scale=keep[1].data_ptr(), grad_logprobs=keep[2][0].data_ptr(),
                grad_values=0, grad_entropy=0, n_rows=2, n_cols=8, dtype=0, mask_kind=0,
                adv_per_row=False, lo=0.8, hi=1.2, dual_clip=math.inf, value_clip=0.2,
                tis_cap=math.inf, entropy_coef=0.0, kl_loss_coef=0.0)
    args.update(change)
    return args, keep


@pytest.mark.parametrize("name", ["ppo_loss_bwd_cpu", "ppo_loss_bwd_cuda"])
@pytest.mark.parametrize("change,message", [
    (dict(grad_values=1, values=0, old_values=0, returns=0),
     "grad_values: expected null without values"),
    (dict(grad_entropy=1, entropy=0), "grad_entropy: expected null without entropy"),
    (dict(grad_loss=0), "grad_loss: expected a non-null pointer"),
    (dict(omega=0), "omega: expected a non-null pointer"),
    (dict(mask_kind=-1), "mask_kind: expected 0"),
    (dict(returns=0), "returns: expected values, old_values and returns all given"),
])
def test_bwd_argument_errors_name_the_argument(name, change, message):
    args, _keep = _bwd_args(**change)
    call = entry(name, args)
    with pytest.raises(ValueError, match=f"{name}: " + message):
        call()
