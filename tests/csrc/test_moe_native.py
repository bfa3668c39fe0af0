"""The moe family of kernelrl._native (csrc/moe), called raw (pointers as ints) and through
kernelrl.ops.moe.native_impl.permute.

Checks moe_permute_cpu against torch's stable sort of the flattened ids (order, offsets,
position = the inverse of order), bit for bit, on every output element (outputs and workspace
are poisoned first): one token, 100k random slots, every slot on one expert, experts with no
slots, E = 1, 2, 64, 128, 1024 (tiles of several chunks), K = 1, 2, 8, int32 and int64 ids;
ids outside [0, E) (counted in `bad`, sorted after every expert, a ValueError naming `experts`
from the wrapper); 1 vs many OpenMP threads bitwise; argument validation; the custom op under
opcheck and torch.compile; that moe.cu compiles with nvcc; and, on a GPU, the CUDA kernels
against the CPU twin.

Shape legend: N tokens, K experts per token, E experts, S = N·K slots.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

native = pytest.importorskip(
    "kernelrl._native", reason="kernelrl._native is not built (pip install -e . builds it)"
)
from kernelrl.ops.moe import native_impl  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
POISON = -7777  # written into outputs and the workspace first: an unwritten element shows up
ID_BYTES = {torch.int32: 4, torch.int64: 8}
CHUNK = 4096     # kMoeChunk
TABLE_CAP = 1 << 18


# ---- raw calls and the reference ---------------------------------------------------------------


def run_raw(ids: torch.Tensor, num_experts: int, *, fn=None, workspace_size=None):
    """moe_permute_cpu (or fn) on contiguous [N, K] ids; poisoned outputs and workspace.
    Returns (order, offsets, position, bad) as tensors."""
    n, k = ids.shape
    s, dev = n * k, ids.device
    i32 = dict(dtype=torch.int32, device=dev)
    order, position = torch.full((s,), POISON, **i32), torch.full((s,), POISON, **i32)
    offsets, bad = torch.full((num_experts + 1,), POISON, **i32), torch.full((1,), POISON, **i32)
    size = native.moe_permute_workspace_size(s, num_experts)
    workspace = torch.full((size,), POISON, **i32)
    args = [ids.data_ptr(), order.data_ptr(), offsets.data_ptr(), position.data_ptr(),
            bad.data_ptr(), workspace.data_ptr(), n, k, num_experts, ID_BYTES[ids.dtype],
            size if workspace_size is None else workspace_size]
    if fn is None:
        native.moe_permute_cpu(*args)
    else:
        fn(*args)
    return order, offsets, position, bad


def reference(ids: torch.Tensor, num_experts: int):
    """(order, offsets, position, bad) from torch's stable sort; ids outside [0, E) go to an
    extra bucket E after every expert (the kernels' contract)."""
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_experts + 1)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])[:num_experts + 1]
    position = torch.empty_like(order).scatter_(0, order, torch.arange(flat.numel()))
    bad = torch.tensor([int(counts[num_experts])])
    return order.int(), offsets.int(), position.int(), bad.int()


def assert_same(got, want):
    for name, g, w in zip(("order", "offsets", "position", "bad"), got, want):
        assert g.dtype == torch.int32, name
        assert torch.equal(g.cpu(), w), f"{name}: first mismatch at " \
            f"{int((g.cpu() != w).nonzero()[0, 0]) if g.shape == w.shape else g.shape}"


def random_ids(n, k, num_experts, dtype=torch.int64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_experts, (n, k), generator=gen).to(dtype)


# ---- correctness against the stable sort -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("num_experts", [1, 2, 64, 128])
def test_one_token(dtype, k, num_experts):
    ids = random_ids(1, k, num_experts, dtype, seed=k)
    assert_same(run_raw(ids, num_experts), reference(ids, num_experts))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n,k,num_experts", [
    (12_500, 8, 128),     # Qwen3-MoE routing, 100k slots: 25 tiles
    (50_000, 2, 64),      # Mixtral-style top-2
    (100_000, 1, 2),
    (4096, 1, 64),        # exactly one chunk
    (4097, 1, 64),        # one slot into the second tile
    (1_000, 3, 7),
])
def test_random_ids(dtype, n, k, num_experts):
    ids = random_ids(n, k, num_experts, dtype, seed=n + k)
    got = run_raw(ids, num_experts)
    assert_same(got, reference(ids, num_experts))
    order, offsets, position, bad = got
    assert int(offsets[-1]) == n * k and int(bad) == 0


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_all_slots_on_one_expert(dtype):
    n, k, e = 30_000, 4, 64
    ids = torch.full((n, k), 37, dtype=dtype)
    got = run_raw(ids, e)
    assert_same(got, reference(ids, e))
    order, offsets, position, _ = got
    assert torch.equal(order, torch.arange(n * k, dtype=torch.int32))  # the identity
    assert offsets[:38].eq(0).all() and offsets[38:].eq(n * k).all()


def test_experts_without_slots():
    n, k, e = 9_000, 8, 64
    used = torch.tensor([3, 17, 18, 63])
    ids = used[torch.randint(0, len(used), (n, k), generator=torch.Generator().manual_seed(1))]
    got = run_raw(ids, e)
    assert_same(got, reference(ids, e))
    counts = got[1].diff()
    assert set(counts.nonzero().flatten().tolist()) == set(used.tolist())


def test_max_experts_tiles_of_several_chunks():
    """E = 1024: the table cap makes tiles of two chunks (the multi-chunk path of the kernels)."""
    e = native.moe_max_experts
    assert e == native_impl.MAX_EXPERTS == 1024
    s = 300 * CHUNK + 123
    tiles = math.ceil(s / (2 * CHUNK))
    assert native.moe_permute_workspace_size(s, e) == (e + 1) * tiles
    ids = random_ids(s, 1, e, torch.int32, seed=5)
    assert_same(run_raw(ids, e), reference(ids, e))


def test_skewed_ids_across_tiles():
    """Half the slots on two hot experts, the rest spread: per-tile counts vary widely."""
    gen = torch.Generator().manual_seed(2)
    n, k, e = 20_000, 8, 128
    ids = torch.randint(0, e, (n, k), generator=gen)
    hot = torch.rand(n, k, generator=gen) < 0.5
    ids[hot] = torch.randint(0, 2, (int(hot.sum()),), generator=gen) * 101
    assert_same(run_raw(ids, e), reference(ids, e))


def test_zero_tokens():
    ids = torch.empty(0, 4, dtype=torch.int64)
    order, offsets, position, bad = run_raw(ids, 16)
    assert order.numel() == 0 and position.numel() == 0
    assert offsets.eq(0).all() and int(bad) == 0
    # null order / position / experts are fine when there are no slots
    offsets = torch.full((17,), POISON, dtype=torch.int32)
    bad = torch.full((1,), POISON, dtype=torch.int32)
    ws = torch.full((native.moe_permute_workspace_size(0, 16),), POISON, dtype=torch.int32)
    native.moe_permute_cpu(0, 0, offsets.data_ptr(), 0, bad.data_ptr(), ws.data_ptr(), 0, 4, 16,
                           8, ws.numel())
    assert offsets.eq(0).all() and int(bad) == 0
    order, offsets, position = native_impl.permute(ids, 16)
    assert order.shape == (0,) and position.shape == (0,) and offsets.eq(0).all()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), k=st.integers(1, 8), e=st.integers(1, 40),
       int64=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_property_small(n, k, e, int64, seed):
    """Random shapes with a few ids out of range (-2 .. E + 1)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-2, e + 2, (n, k), generator=gen).to(torch.int64 if int64 else torch.int32)
    assert_same(run_raw(ids, e), reference(ids, e))


# ---- ids out of range --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_out_of_range_ids_are_counted_and_sorted_last(dtype):
    n, k, e = 5_000, 2, 64
    ids = random_ids(n, k, e, dtype, seed=3)
    info = torch.iinfo(dtype)
    bad_values = [-1, e, e + 1, info.min, info.max]
    if dtype == torch.int64:
        bad_values += [2**32 + 1, 2**32, -(2**32) + 5]  # not expert 1 / 0 / 5 after truncation
    where = torch.randperm(n * k, generator=torch.Generator().manual_seed(4))[:len(bad_values)]
    ids.view(-1)[where] = torch.tensor(bad_values, dtype=dtype)
    got = run_raw(ids, e)
    assert_same(got, reference(ids, e))
    order, offsets, position, bad = got
    assert int(bad) == len(bad_values)
    assert int(offsets[e]) == n * k - len(bad_values)
    # the invalid slots, in slot order, after every expert's
    assert torch.equal(order[int(offsets[e]):].long(), where.sort().values)


@pytest.mark.parametrize("value", [-1, 64, 2**32 + 1])
def test_wrapper_raises_naming_experts(value):
    ids = random_ids(100, 2, 64, seed=6)
    ids[37, 1] = value
    with pytest.raises(ValueError, match=r"experts: expected expert ids in \[0, 64\), got "
                                         + str(value) + r" at \[37, 1\] \(1 such ids\)"):
        native_impl.permute(ids, 64)


# ---- threads -----------------------------------------------------------------------------------


def test_threads_bitwise_equal():
    ids = random_ids(40_000, 8, 128, seed=7)     # 79 tiles
    ids.view(-1)[::997] = -3                     # and some invalid ids
    before = native.get_num_threads()
    try:
        native.set_num_threads(1)
        one = run_raw(ids, 128)
        outs = []
        for threads in (2, 3, 8, 16):
            native.set_num_threads(threads)
            outs.append(run_raw(ids, 128))
    finally:
        native.set_num_threads(before)
    for out in outs:
        for a, b in zip(one, out):
            assert torch.equal(a, b)
    assert_same(one, reference(ids, 128))


# ---- the wrapper -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int16, torch.uint8])
def test_wrapper_matches_sort(dtype):
    ids = random_ids(3_000, 8, 128 if dtype != torch.uint8 else 100, seed=8).to(dtype)
    e = 128
    order, offsets, position = native_impl.permute(ids, e)
    ref = reference(ids, e)
    assert_same((order, offsets, position, ref[3]), ref)


def test_wrapper_non_contiguous_input():
    base = random_ids(2_000, 16, 64, seed=9)
    ids = base[:, ::2]                           # [N, 8], stride (16, 2)
    assert not ids.is_contiguous()
    order, offsets, position = native_impl.permute(ids, 64)
    ref = reference(ids.contiguous(), 64)
    assert_same((order, offsets, position, ref[3]), ref)


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(4, 2), 8), r"experts: expected an integer dtype .*got float32"),
    ((torch.zeros(4, 2, dtype=torch.bool), 8), r"experts: expected an integer dtype .*got bool"),
    (([[0, 1]], 8), r"experts: expected a torch.Tensor, got list"),
    ((torch.zeros(8, dtype=torch.int64), 8), r"experts: expected 2 dimensions \[N, K\], got "
                                             r"shape \(8,\)"),
    ((torch.zeros(4, 9, dtype=torch.int64), 8), r"experts: expected K \(columns\) in \[1, 8\], "
                                                r"got shape \(4, 9\)"),
    ((torch.zeros(4, 0, dtype=torch.int64), 8), r"experts: expected K \(columns\) in \[1, 8\]"),
    ((torch.zeros(4, 2, dtype=torch.int64), 0), r"num_experts: expected an int in \[1, 1024\], "
                                                r"got 0"),
    ((torch.zeros(4, 2, dtype=torch.int64), 1025), r"num_experts: expected an int in "
                                                   r"\[1, 1024\], got 1025"),
    ((torch.zeros(4, 2, dtype=torch.int64), 8.0), r"num_experts: expected a Python int, got "
                                                  r"float"),
    ((torch.zeros(4, 2, dtype=torch.int64), True), r"num_experts: expected a Python int, got "
                                                   r"bool"),
    ((torch.zeros(4, 2, dtype=torch.int64, device="meta"), 8), r"experts: expected a CPU or "
                                                               r"CUDA tensor, got one on meta"),
])
def test_wrapper_validation(args, match):
    with pytest.raises(ValueError, match=match):
        native_impl.permute(*args)


def test_custom_op_opcheck():
    ids = random_ids(300, 4, 32, seed=10)
    torch.library.opcheck(native_impl._permute_op, (ids, 32))


def test_torch_compile_traces_the_custom_op():
    ids = random_ids(500, 2, 16, seed=11)

    def f(x):
        order, offsets, position = native_impl.permute(x, 16)
        return order + 1, offsets, position

    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(ids)
    want = reference(ids, 16)
    assert torch.equal(got[0] - 1, want[0])
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


# ---- raw argument validation -------------------------------------------------------------------


def raw_args(**override):
    """Valid arguments for a [4, 2] int64 problem over 8 experts (pointers to real buffers),
    with `override` applied; returns (args, buffers to keep alive)."""
    ids = torch.zeros(4, 2, dtype=torch.int64)
    bufs = dict(order=torch.empty(8, dtype=torch.int32), offsets=torch.empty(9, dtype=torch.int32),
                position=torch.empty(8, dtype=torch.int32), bad=torch.empty(1, dtype=torch.int32),
                workspace=torch.empty(native.moe_permute_workspace_size(8, 8), dtype=torch.int32))
    args = dict(experts=ids.data_ptr(), **{k: v.data_ptr() for k, v in bufs.items()},
                n_tokens=4, top_k=2, num_experts=8, id_bytes=8,
                workspace_size=bufs["workspace"].numel())
    args.update(override)
    return args, (ids, bufs)


@pytest.mark.parametrize("override,match", [
    (dict(top_k=0), r"top_k: expected 1 <= top_k <= 8, got 0"),
    (dict(top_k=9), r"top_k: expected 1 <= top_k <= 8, got 9"),
    (dict(n_tokens=-1), r"n_tokens: expected >= 0, got -1"),
    (dict(n_tokens=2**31 // 2, top_k=2), r"n_tokens: expected n_tokens \* top_k <= 2\^31 - 1"),
    (dict(num_experts=0), r"num_experts: expected 1 <= num_experts <= 1024, got 0"),
    (dict(num_experts=1025), r"num_experts: expected 1 <= num_experts <= 1024, got 1025"),
    (dict(id_bytes=2), r"id_bytes: expected 4 \(int32 ids\) or 8 \(int64 ids\), got 2"),
    (dict(workspace_size=8), r"workspace_size: expected >= 9 \(moe_permute_workspace_size\), "
                             r"got 8"),
    (dict(experts=0), r"experts: expected a non-null pointer, got 0"),
    (dict(order=0), r"order: expected a non-null pointer"),
    (dict(offsets=0), r"offsets: expected a non-null pointer"),
    (dict(position=0), r"position: expected a non-null pointer"),
    (dict(bad=0), r"bad: expected a non-null pointer"),
    (dict(workspace=0), r"workspace: expected a non-null pointer"),
])
@pytest.mark.parametrize("entry", ["moe_permute_cpu", "moe_permute_cuda"])
def test_raw_validation(override, match, entry):
    """Both entry points validate before anything else (the CUDA one before any CUDA call)."""
    if entry == "moe_permute_cuda" and not native.has_cuda():
        pytest.skip("this build has no CUDA part (its moe_permute_cuda raises RuntimeError)")
    args, _keep = raw_args(**override)
    fn = getattr(native, entry)
    if entry.endswith("_cuda"):
        args["stream"] = 0
    with pytest.raises(ValueError, match=f"{entry}: {match}"):
        fn(**args)


def test_workspace_size():
    for s, e in [(0, 1), (1, 1), (4096, 128), (4097, 128), (10**6, 128), (2**31 - 1, 1024),
                 (2**31 - 1, 1), (12_345_678, 256)]:
        size = native.moe_permute_workspace_size(s, e)
        assert size % (e + 1) == 0
        tiles = size // (e + 1)
        assert 1 <= tiles and size <= max(TABLE_CAP, e + 1)
        tile_len = math.ceil(max(1, math.ceil(s / CHUNK)) / min(max(1, math.ceil(s / CHUNK)),
                                                                 max(1, TABLE_CAP // (e + 1))))
        assert tiles == max(1, math.ceil(s / (tile_len * CHUNK)))
    with pytest.raises(ValueError, match=r"moe_permute_workspace_size: n_slots"):
        native.moe_permute_workspace_size(-1, 8)
    with pytest.raises(ValueError, match=r"moe_permute_workspace_size: num_experts"):
        native.moe_permute_workspace_size(8, 1025)


# ---- CUDA ----------------------------------------------------------------------------------------


def test_moe_cu_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    cmd = [nvcc, "-arch=sm_90", "-std=c++17", "-O3", "-I", str(ROOT / "csrc"), "-c",
           str(ROOT / "csrc" / "moe" / "moe.cu"), "-o", str(tmp_path / "moe.o"),
           "-Xptxas", "-warn-spills"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "warning" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr


def test_cuda_entry_point_without_gpu():
    if native.has_cuda() and native.cuda_device_count() > 0:
        pytest.skip("a GPU is present: the CUDA tests below run instead")
    args, _keep = raw_args()
    with pytest.raises(RuntimeError, match="moe_permute_cuda|built without CUDA"):
        native.moe_permute_cuda(**args, stream=0)


cuda = pytest.mark.skipif(not (native.has_cuda() and torch.cuda.is_available()),
                          reason="needs the CUDA part of kernelrl._native and a GPU")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n,k,e", [(1, 1, 2), (1, 8, 128), (12_500, 8, 128), (50_000, 2, 64),
                                   (100_000, 1, 2), (4097, 1, 64), (300 * CHUNK + 123, 1, 1024),
                                   (0, 4, 16), (3_000, 8, 1)])
def test_cuda_matches_cpu_twin(dtype, n, k, e):
    ids = random_ids(n, k, e, dtype, seed=n + e)
    if n > 10:
        ids.view(-1)[::501] = torch.tensor(-1 if dtype == torch.int32 else 2**32 + 3, dtype=dtype)
    want = run_raw(ids, e)
    stream = torch.cuda.current_stream().cuda_stream

    def cuda_fn(*args):
        native.moe_permute_cuda(*args, stream)

    got = run_raw(ids.cuda(), e, fn=cuda_fn)
    torch.cuda.synchronize()
    assert_same(got, reference(ids, e))
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)


@cuda
@pytest.mark.gpu
def test_cuda_skewed_and_one_expert():
    for ids in (torch.full((20_000, 8), 5, device="cuda"),
                torch.randint(0, 2, (20_000, 8), device="cuda") * 127):
        order, offsets, position = native_impl.permute(ids, 128)
        ref = reference(ids.cpu(), 128)
        assert_same((order, offsets, position, ref[3]), ref)


@cuda
@pytest.mark.gpu
def test_cuda_bad_ids_checked_in_debug_mode_only(monkeypatch):
    ids = random_ids(1_000, 2, 64, seed=12).cuda()
    ids[10, 1] = 64
    order, offsets, position = native_impl.permute(ids, 64)   # no check, no host sync
    assert int(offsets[-1]) == 2_000 - 1
    monkeypatch.setenv("KERNELRL_DEBUG", "1")
    with pytest.raises(ValueError, match=r"experts: expected expert ids in \[0, 64\), got 64 "
                                         r"at \[10, 1\]"):
        native_impl.permute(ids, 64)
