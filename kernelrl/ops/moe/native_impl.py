"""The MoE permutation on kernelrl._native (csrc/moe): a stable counting sort of the N·K routing
slots by expert, C++ on CPU and CUDA on GPU, bit for bit the same (the permutation is unique).

:func:`permute` ``(experts [N, K], E) -> (order [N·K], offsets [E + 1], position [N·K])``, int32
on the experts' device: slot s = n·K + j; ``order[p]`` is the slot at sorted position p (experts
ascending, slots ascending within an expert); ``offsets`` the exclusive scan of the per-expert
counts (``offsets[E] = N·K``); ``position[order[p]] = p``. Bounds: 1 ≤ K ≤ 8, 1 ≤ E ≤ 1024,
N·K ≤ 2³¹ − 1; ids int32 or int64 (any other integer dtype is converted to int64 first).

Three phases, the same on both devices (csrc/moe/moe.h): per-tile histograms, one exclusive
scan, per-tile ranks in slot order; three CUDA launches, no atomics. The kernels also count the
ids outside [0, E) (they sort after every expert, so order and position stay a permutation and
nothing indexes out of bounds); :func:`permute` raises ValueError naming ``experts`` when there
are any — always on CPU (reading the count back is free there), on CUDA only with
``KERNELRL_DEBUG=1`` (it costs a host sync).

The call is a ``torch.library.custom_op`` (``kernelrl::moe_permute_native``, what torch.compile
traces; the id check runs inside it); run eagerly, the same function is called directly.
"""

from __future__ import annotations

import torch

from kernelrl import backend as _backend
from kernelrl.ops import _native
from kernelrl.ops.moe.routing import MAX_EXPERTS

__all__ = ["permute", "MAX_EXPERTS", "MAX_TOP_K", "MAX_SLOTS"]

#: Most experts per token (kMoeMaxTopK).
MAX_TOP_K = 8
#: Most slots N·K (int32 indices).
MAX_SLOTS = 2**31 - 1
_ID_BYTES = {torch.int32: 4, torch.int64: 8}
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_FN = "moe permute"


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check(experts, num_experts) -> None:
    """ValueError naming the argument, what was expected and what was given."""
    if not isinstance(experts, torch.Tensor):
        raise ValueError(f"{_FN}: experts: expected a torch.Tensor, got {type(experts).__name__}")
    if experts.dtype not in _INT_DTYPES:
        raise ValueError(f"{_FN}: experts: expected an integer dtype (int32 or int64), got "
                         f"{_dt(experts.dtype)}")
    if experts.dim() != 2:
        raise ValueError(f"{_FN}: experts: expected 2 dimensions [N, K], got shape "
                         f"{tuple(experts.shape)}")
    n, k = experts.shape
    if not 1 <= k <= MAX_TOP_K:
        raise ValueError(f"{_FN}: experts: expected K (columns) in [1, {MAX_TOP_K}], got shape "
                         f"{tuple(experts.shape)}")
    if n * k > MAX_SLOTS:
        raise ValueError(f"{_FN}: experts: expected at most 2^31 - 1 slots N·K, got "
                         f"{n}·{k} = {n * k}")
    if experts.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{_FN}: experts: expected a CPU or CUDA tensor, got one on "
                         f"{experts.device}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise ValueError(f"{_FN}: num_experts: expected a Python int, got "
                         f"{type(num_experts).__name__}")
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"{_FN}: num_experts: expected an int in [1, {MAX_EXPERTS}], got "
                         f"{num_experts}")


def _raise_bad_ids(experts: torch.Tensor, num_experts: int, n_bad: int) -> None:
    flat = experts.reshape(-1)
    # the error path only (after the kernel counted bad ids): name the first one
    first = int(((flat < 0) | (flat >= num_experts)).nonzero()[0, 0])
    n, j = divmod(first, experts.shape[1])
    raise ValueError(f"{_FN}: experts: expected expert ids in [0, {num_experts}), got "
                     f"{int(flat[first])} at [{n}, {j}] ({n_bad} such ids)")


def _permute_eager(experts: torch.Tensor, num_experts: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """experts: contiguous int32 / int64 [N, K] (checked by :func:`permute`)."""
    n, k = experts.shape
    s, device = n * k, experts.device
    i32 = dict(dtype=torch.int32, device=device)
    order, position = torch.empty(s, **i32), torch.empty(s, **i32)
    offsets, bad = torch.empty(num_experts + 1, **i32), torch.empty(1, **i32)
    lib = _native.library()
    workspace = torch.empty(lib.moe_permute_workspace_size(s, num_experts), **i32)
    _native.launch(device, lib.moe_permute_cpu, lib.moe_permute_cuda, experts.data_ptr(),
                   order.data_ptr(), offsets.data_ptr(), position.data_ptr(), bad.data_ptr(),
                   workspace.data_ptr(), n, k, num_experts, _ID_BYTES[experts.dtype],
                   workspace.numel())
    if device.type == "cpu" or _backend.debug_enabled():
        n_bad = int(bad.item())  # CUDA: host sync, debug mode only
        if n_bad:
            _raise_bad_ids(experts, num_experts, n_bad)
    return order, offsets, position


_permute_op = torch.library.custom_op("kernelrl::moe_permute_native",
                                      mutates_args=())(_permute_eager)


@_permute_op.register_fake
def _(experts, num_experts):
    s = experts.shape[0] * experts.shape[1]
    return (experts.new_empty(s, dtype=torch.int32),
            experts.new_empty(num_experts + 1, dtype=torch.int32),
            experts.new_empty(s, dtype=torch.int32))


def permute(experts: torch.Tensor, num_experts: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order [N·K], offsets [E + 1], position [N·K]), int32 on ``experts``' device: the stable
    counting sort of the slots s = n·K + j of ``experts`` [N, K] by expert id (see the module
    doc). ValueError naming ``experts`` for an id outside [0, num_experts): on CPU always, on
    CUDA with ``KERNELRL_DEBUG=1`` only."""
    _check(experts, num_experts)
    ids = experts.detach()
    if ids.dtype not in _ID_BYTES:
        ids = ids.to(torch.int64)
    ids = ids.contiguous()
    fn = _permute_op if torch.compiler.is_compiling() else _permute_eager
    return fn(ids, num_experts)
