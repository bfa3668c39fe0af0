"""Benchmark: top-k MoE dispatch (issue 10): one dropless MoE feed-forward layer with SwiGLU
experts, forward and backward, against Hugging Face's Mixtral experts, the dense einsum
formulation and dense GEMMs of the same FLOPs; and the routing permutation alone.

Shape legend (kernelrl.ops.moe's): N tokens, D hidden width, F expert FFN width, E experts,
K experts per token (top-k). Expert weights in transformers 5's fused layout: w_gate_up
[E, 2F, D] (gate rows, then up rows), w_down [E, D, F].

Cases:

  "moe_ffn fwd+bwd" (id ffn; bf16 x and expert weights, float32 routing weights as
      Mixtral's router leaves them): y = moe_ffn(x, weights, experts, w_gate_up, w_down),
      then the gradients to x, weights, w_gate_up and w_down for a random upstream
      gradient g [N, D]. The routing (weights, experts) is an input, made once.
      impls: kernelrl.ops.moe_ffn (the default dispatch; a row per backend that can run it
             here, forced: native = the C++/CUDA permutation with the torch stages on a CPU
             and the Triton stages on a GPU, triton = Triton permutation and stages, torch =
             a stable sort and one matmul per expert) |
             hf_eager (transformers 5's MixtralExperts.forward with
             experts_implementation="eager": its loop over the experts hit, one F.linear
             pair per expert and an index_add_ into the output; the module built on the meta
             device from a MixtralConfig, its gate_up_proj / down_proj the input set's
             tensors through torch.func.functional_call) |
             hf_grouped_mm (the same module with experts_implementation="grouped_mm", which
             transformers 5.24 also makes the default of from_pretrained: a sort by expert,
             then torch.nn.functional.grouped_mm for both projections (on a CPU with torch
             <= 2.8, transformers' own fallback loop; the JSON row's grouped_mm_path says
             which ran); its other implementations are not rows: batched_mm gathers one
             [2F, D] weight per slot (N·K·2F·D elements, 1.9 TB at Mixtral's shape),
             deepgemm and sonicmoe are GPU kernels fetched from the Hub) |
             einsum (every expert on every token, masked by the routing: gu = einsum(x,
             w_gate_up) over all E experts [E, N, 2F], h = silu(g)·u, o [E, N, D], y =
             einsum(C, o) with C [N, E] the routing weights scattered densely (zero where not
             routed): E/K times the FLOPs of the routed work, 4x for Mixtral, 32x at E=64,
             K=2, 8x at E=64, K=8) |
             dense (the ceiling, not the same function: plain bf16 GEMMs with the routed
             work's FLOPs, [N·K, D]x[D, 2F] and [N·K, F]x[F, D] (y1 = a·W1ᵀ, y2 = h·W2ᵀ), then
             the gradients to a, W1, h and W2 for random upstream gradients: 6 GEMMs).
      flops: 18·N·K·D·F, the routed work every row does: forward 4·N·K·D·F (gate_up) +
             2·N·K·D·F (down), backward twice that. Recompute is not counted (kernelrl's
             Triton backward recomputes g and u; its torch stages, the CPU path, keep
             them), nor einsum's E/K-fold excess (its TFLOP/s is the
             useful rate), nor the routing combine (O(N·K·D)).

  "moe permute" (id permute; experts [N, K] int64 as topk_route returns them): the stable
      counting sort of the N·K slots by expert, (order, offsets, position) int32, alone.
      impls: kernelrl (the permutation of the backend moe_ffn's default dispatch picks for
             bf16 x here) | kernelrl[native] (kernelrl.ops.moe.native_impl.permute: C++ on
             a CPU, CUDA on a GPU) | kernelrl[torch] (torch_impl.permute: torch.sort(stable=
             True), searchsorted, scatter) | kernelrl[triton] (triton_impl.permute; GPU only).
      bytes: the ids read (8 bytes a slot) + order and position written (4 + 4) + offsets.
      Each row carries ``slots`` (N·K) in the JSON.

Routing: router logits l[n, e] = z[n, e] + b[e], z ~ N(0, 1) per token and expert, b ~
N(0, 0.2²) one bias per expert (fixed per shape), then topk_route(l, K) (softmax, top K,
renormalized; float32 weights). The bias makes the experts' loads uneven, as trained
routers' are, where pure noise gives near-even counts (0.96 to 1.04 of the mean at
N=8192, E=8, K=2); each row records the per-expert slot counts and their min / max over
the mean (``expert_load``). Per-expert slots, min to max over the mean: GPU N=8192 E=8 K=2
0.77 to 1.35, E=64 K=2 0.28 to 2.08, E=64 K=8 0.38 to 2.09; CPU default N=256 E=8 K=2 0.86
to 1.17, E=64 K=8 0.38 to 1.91; CPU --full N=1024 E=8 K=2 0.69 to 1.27, E=64 K=2 0.28 to
2.5, E=64 K=8 0.33 to 1.65. The permute case routes the same way.

Inputs: x ~ N(0, 1), w_gate_up ~ N(0, 1/D), w_down ~ N(0, 1/F), g ~ N(0, 1), all rounded to
bf16; every input set holds the same values in its own memory (a GPU run rotates through
copies so that L2 does not serve them; the routing, and so the work, is the same in each).

Checks before timing: every ffn row (but dense) against float64 on the same inputs: y, dx,
dweights, dw_gate_up and dw_down each within 1% by relative norm (bf16; fp32: 1e-4) and no
element off by more than 5% of the largest. The float64 values come from
kernelrl.ops.moe.torch_impl.moe_ffn_reference (per (token, choice), autograd), run over
chunks of tokens; it gathers each slot's expert weights, K·3·F·D·8 bytes a token (2.8 GB
at Mixtral's shape), and autograd makes each chunk a float64 gradient of all the expert
weights, so where one token's share exceeds 64 MiB or the chunks would move more than
4 GiB in all (every --full and GPU shape; the default CPU plan and the tests use it) it
is the same formula per expert instead (each expert's tokens as one float64 matmul,
autograd; the tests check the two agree). dense computes another function: its outputs
are checked for their shapes and finite values only.
Permute rows: order, offsets and position equal, bit for bit, to a stable sort of the
flattened ids (torch.sort(stable=True), bincount, inverse by scatter).
Determinism: on the check inputs every ffn row but dense runs 3 times and its outputs and
gradients are compared bit for bit (in the JSON row: ``deterministic``, and
``determinism`` saying what differed); not in the CPU memory processes.

Plans:
  CPU default (run.py without --full, or --quick; well under a minute but for the memory
      processes): ffn N=256 D=256 F=512 E=8 K=2 and N=256 D=128 F=128 E=64 K=8; permute at
      the issue's sizes, N=8192 E=8 K=2 (N·K = 16,384) and N=8192 E=64 K=8 (65,536).
  CPU --full: the issue's ffn shapes are far too heavy for a CPU (Mixtral's is 17 TFLOP per
      fwd+bwd, einsum's 69, and the float64 check more): reduced shapes with the same
      ratios instead, N=1024 D=1024 F=3584 E=8 K=2 (Mixtral's F/D = 3.5) and N=1024 D=512
      F=512 E=64 with K=2 and K=8; permute as in the default plan.
  GPU (default and --full): the issue's shapes, N=8192 D=4096 F=14336 E=8 K=2 (Mixtral
      8x7B) and N=8192 D=1024 F=1024 E=64 with K=2 and K=8 (the issue names no K for the
      small-expert shape: both); permute as above.

Targets (printed MET / NOT MET / NOT CHECKED with the numbers; never asserted):
  any  kernelrl moe_ffn (the default-dispatch row) bitwise identical across 3 runs, outputs
       and gradients, at every ffn shape run (a property, checked on either device; the
       detail lists every other row's result too).
  GPU  at each GPU ffn shape: kernelrl >= 2x faster than hf_eager (ratio of medians), and
       kernelrl's time <= 1.3x dense's (the same FLOPs as plain GEMMs).
  CPU  no speed target (the issue states none): the permutation's speed is in the table.

Usage:
  python benchmarks/run.py moe                                   # CPU default plan
  python benchmarks/bench_moe.py --quick --device cpu --impls kernelrl[torch],hf_eager,einsum
  python benchmarks/bench_moe.py --device cpu --cases permute --out cpu.json   # --full
  python benchmarks/bench_moe.py --device cuda --out gpu.json
"""

from __future__ import annotations

import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cases  # noqa: E402
import common  # noqa: E402
import progress  # noqa: E402
import report  # noqa: E402
import suite  # noqa: E402
from cases import (KERNELRL_IMPLS, Case, Impl, float64_mismatch, kernelrl_impls,  # noqa: E402
                   short_error)
from targets import faster, ms, target, why_missing  # noqa: E402

BENCH = "moe"
CASE_NAMES = {"ffn": "moe_ffn fwd+bwd", "permute": "moe permute"}
PEERS = ("hf_eager", "hf_grouped_mm", "einsum", "dense")
IMPLS = KERNELRL_IMPLS + PEERS

# The table's legend (cases.LEGEND holds every family's peers, "dense" among them).
for _name, _text in (("hf_eager", "HF MixtralExperts, eager per-expert loop"),
                     ("hf_grouped_mm", "HF MixtralExperts, experts_implementation=grouped_mm"),
                     ("einsum", "every expert on every token, masked (E/K x the FLOPs)")):
    cases.LEGEND.setdefault(_name, _text)

GPU_FFN = ({"N": 8192, "D": 4096, "F": 14336, "E": 8, "K": 2},      # Mixtral 8x7B
           {"N": 8192, "D": 1024, "F": 1024, "E": 64, "K": 2},
           {"N": 8192, "D": 1024, "F": 1024, "E": 64, "K": 8})
CPU_FULL_FFN = ({"N": 1024, "D": 1024, "F": 3584, "E": 8, "K": 2},
                {"N": 1024, "D": 512, "F": 512, "E": 64, "K": 2},
                {"N": 1024, "D": 512, "F": 512, "E": 64, "K": 8})
QUICK_FFN = ({"N": 256, "D": 256, "F": 512, "E": 8, "K": 2},
             {"N": 256, "D": 128, "F": 128, "E": 64, "K": 8})
PERMUTE = ({"N": 8192, "K": 2, "E": 8}, {"N": 8192, "K": 8, "E": 64})
DTYPE = "bf16"
ID_DTYPE = "int64"                    # the permute case's "dtype": topk_route's expert ids
ROUTER_BIAS_STD = 0.2
TOL = {"bf16": 1e-2, "fp16": 2e-3, "fp32": 1e-4}  # relative-norm error against float64
MAX_ERR = 5.0                                    # x TOL: max |error| over max |reference|
REF_GATHER_BYTES = 64 * 2**20         # moe_ffn_reference's gathered weights per chunk
REF_TRAFFIC_BYTES = 4 * 2**30         # ... and what all its chunks move (else per expert)
RUNS = 3                              # determinism: runs compared bit for bit
NAMES = ("y", "dx", "dweights", "dw_gate_up", "dw_down")
DENSE_NAMES = ("y1", "y2", "da", "dW1", "dh", "dW2")

GPU_VS_HF = 2.0
GPU_VS_DENSE = 1.3


def plan(device: str, quick: bool) -> list:
    """[(case_id, shape, dtype)]: see the module docstring ("Plans")."""
    if common.is_cuda(device):
        ffn = GPU_FFN
    else:
        ffn = QUICK_FFN if quick else CPU_FULL_FFN
    return ([("ffn", dict(s), DTYPE) for s in ffn]
            + [("permute", dict(s), ID_DTYPE) for s in PERMUTE])


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------
def _routing(N: int, E: int, K: int, device: str):
    """(weights [N, K] float32, experts [N, K] int64): topk_route of biased random logits
    (the module docstring, "Routing"); the same for a given shape every time."""
    import torch
    from kernelrl.ops import topk_route

    g = torch.Generator(device=device).manual_seed(1000 + 31 * N + 7 * E + K)
    bias = ROUTER_BIAS_STD * torch.randn(E, generator=g, device=device)
    logits = torch.randn(N, E, generator=g, device=device) + bias
    return topk_route(logits, K, weights_dtype=torch.float32)


def expert_load(experts, E: int) -> dict:
    """Per-expert slot counts: min and max over their mean, and the counts themselves."""
    import torch
    counts = torch.bincount(experts.reshape(-1).long().cpu(), minlength=E)
    mean = counts.sum().item() / E
    return {"min_over_mean": round(counts.min().item() / mean, 3),
            "max_over_mean": round(counts.max().item() / mean, 3),
            "counts": counts.tolist()}


def _ffn_inputs(N, D, F, E, K, tdt, device, with_dense: bool):
    import torch

    def make_inputs(seed):
        # every set the same values (the routing decides the work), in its own memory
        g = torch.Generator(device=device).manual_seed(2000 + N + D + F + E + K)

        def randn(*size, scale=1.0):
            return (scale * torch.randn(*size, generator=g, device=device)).to(tdt)

        weights, experts = _routing(N, E, K, device)
        x = {"x": randn(N, D).requires_grad_(True),
             "weights": weights.detach().requires_grad_(True),
             "experts": experts,
             "w_gate_up": randn(E, 2 * F, D, scale=D ** -0.5).requires_grad_(True),
             "w_down": randn(E, D, F, scale=F ** -0.5).requires_grad_(True),
             "g": randn(N, D)}
        if with_dense:     # the dense row's GEMM operands: the routed work's shapes
            S = N * K
            x.update(a=randn(S, D).requires_grad_(True),
                     w1=randn(2 * F, D, scale=D ** -0.5).requires_grad_(True),
                     hh=randn(S, F).requires_grad_(True),
                     w2=randn(D, F, scale=F ** -0.5).requires_grad_(True),
                     g1=randn(S, 2 * F), g2=randn(S, D))
        return x

    return make_inputs


# ----------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------
def _train_fn(forward):
    """forward(x) -> y: y, then the gradients to x, weights, w_gate_up, w_down for g."""
    import torch

    def run(x):
        y = forward(x)
        leaves = (x["x"], x["weights"], x["w_gate_up"], x["w_down"])
        grads = torch.autograd.grad(y, leaves, x["g"])
        return (y.detach(), *grads)

    return run


def einsum_moe(x, weights, experts, w_gate_up, w_down):
    """Every expert on every token, masked by the routing: E/K times the routed FLOPs."""
    import torch
    import torch.nn.functional as F_

    N, E, F = x.shape[0], w_gate_up.shape[0], w_down.shape[2]
    gu = torch.einsum("nd,efd->enf", x, w_gate_up)                     # [E, N, 2F]
    h = F_.silu(gu[..., :F]) * gu[..., F:]
    o = torch.einsum("enf,edf->end", h, w_down)                        # [E, N, D]
    dense_w = torch.zeros(N, E, dtype=weights.dtype, device=x.device).scatter_add(
        1, experts.long(), weights)                                    # 0 where not routed
    return torch.einsum("ne,end->nd", dense_w.to(x.dtype), o)


def _dense_fn(x):
    import torch
    import torch.nn.functional as F_

    y1 = F_.linear(x["a"], x["w1"])                                    # [N·K, 2F]
    y2 = F_.linear(x["hh"], x["w2"])                                   # [N·K, D]
    grads = torch.autograd.grad((y1, y2), (x["a"], x["w1"], x["hh"], x["w2"]),
                                (x["g1"], x["g2"]))
    return (y1.detach(), y2.detach(), *grads)


def _hf_why() -> str | None:
    if importlib.util.find_spec("transformers") is None:
        return "transformers not installed (pip install transformers to compare)"
    try:
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts  # noqa: F401
    except Exception as e:
        return (f"transformers has no MixtralExperts (the 5.x fused-experts layout): "
                f"{short_error(e)}")
    return None


def _hf_grouped_why() -> str | None:
    why = _hf_why()
    if why:
        return why
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except Exception as e:
        return f"transformers.integrations.moe unavailable: {short_error(e)}"
    if "grouped_mm" not in ALL_EXPERTS_FUNCTIONS:
        return "this transformers has no grouped_mm experts implementation"
    return None


def hf_experts(implementation: str, D: int, F: int, E: int, K: int):
    """transformers' MixtralExperts with ``experts_implementation``, on the meta device (its
    weights come from the input set at each call)."""
    import torch
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                        num_experts_per_tok=K, experts_implementation=implementation)
    cfg._experts_implementation = implementation
    with torch.device("meta"):
        return MixtralExperts(cfg)


def _hf_forward(module):
    from torch.func import functional_call

    def forward(x):
        return functional_call(module, {"gate_up_proj": x["w_gate_up"],
                                        "down_proj": x["w_down"]},
                               (x["x"], x["experts"], x["weights"]))

    return forward


def grouped_mm_path(device: str, tdt) -> str:
    """Which grouped GEMM transformers' grouped_mm implementation runs here."""
    import torch
    try:
        from transformers.integrations.moe import _can_use_grouped_mm
        w = torch.empty(2, 16, 16, dtype=tdt, device=device)
        a = torch.empty(4, 16, dtype=tdt, device=device)
        offs = torch.tensor([2, 4], dtype=torch.int32, device=device)
        if not _can_use_grouped_mm(a, w, offs):
            return "transformers' grouped_mm_fallback (a loop over the experts)"
    except Exception as e:
        return f"unknown ({short_error(e)})"
    import torch.nn.functional as F_
    return ("torch.nn.functional.grouped_mm" if hasattr(F_, "grouped_mm")
            else "torch._grouped_mm")


def bitwise_runs(fn, x, first: tuple, runs: int = RUNS) -> tuple:
    """(identical, detail): ``fn(x)`` run ``runs - 1`` more times after ``first`` (its
    first result), every output compared with ``first`` bit for bit."""
    import torch

    names = NAMES if len(first) == len(NAMES) else tuple(f"out{i}" for i in range(len(first)))
    differ = []
    for run in range(2, runs + 1):
        out = tuple(t.detach() for t in fn(x))
        for name, a, b in zip(names, first, out):
            if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
                n = int((a != b).sum()) if a.shape == b.shape else a.numel()
                differ.append(f"run {run}: {name} differs in {n} of {a.numel()} elements")
        del out
    if differ:
        return False, "; ".join(differ)
    return True, f"{runs} runs bitwise identical ({', '.join(names)})"


def deterministic(fn, info: dict, runs: int = RUNS):
    """``fn`` whose first call also runs it ``runs - 1`` more times on the same inputs and
    records in ``info`` (the row's extra JSON keys) whether every output is bitwise the
    same: ``deterministic`` and ``determinism``. Later calls are plain ``fn``."""
    state = {"done": False}

    def run(x):
        out = fn(x)
        if not state["done"]:
            state["done"] = True
            try:
                info["deterministic"], info["determinism"] = bitwise_runs(
                    fn, x, tuple(t.detach() for t in out), runs)
            except Exception as e:
                info["deterministic"] = None
                info["determinism"] = f"not checked: {short_error(e)}"
        return out

    return run


def _ffn_impls(shape: dict, device: str, tdt, check_determinism: bool,
               extra_info: dict | None = None) -> dict:
    """The ffn rows; ``extra_info`` goes into every row's JSON. With ``check_determinism``
    every row but dense records whether 3 runs agree bit for bit (:func:`deterministic`
    writes into the row's info dict, so that dict is made here, once)."""
    N, D, F, E, K = (shape[k] for k in ("N", "D", "F", "E", "K"))

    def kernelrl_op():
        from kernelrl.ops import moe_ffn
        return _train_fn(lambda x: moe_ffn(x["x"], x["weights"], x["experts"],
                                           x["w_gate_up"], x["w_down"]))

    def hf(implementation):
        def build():
            return _train_fn(_hf_forward(hf_experts(implementation, D, F, E, K)))
        return build

    impls = kernelrl_impls("moe_ffn", device, tdt, kernelrl_op)
    # a CPU memory process for another row does not import transformers (seconds)
    hf_needed = cases._only in (None, "hf_eager", "hf_grouped_mm")
    hf_why = _hf_why() if hf_needed else None
    grouped_why = _hf_grouped_why() if hf_needed else None
    impls["hf_eager"] = Impl(hf("eager"), skip=hf_why)
    impls["hf_grouped_mm"] = Impl(
        hf("grouped_mm"), skip=grouped_why,
        info={"grouped_mm_path": grouped_mm_path(device, tdt)} if hf_needed and not grouped_why
        else None)
    impls["einsum"] = Impl(lambda: _train_fn(lambda x: einsum_moe(
        x["x"], x["weights"], x["experts"], x["w_gate_up"], x["w_down"])))
    impls["dense"] = Impl(lambda: _dense_fn)
    for name, impl in impls.items():
        impl.info = dict(impl.info or {}, **(extra_info or {}))
        if check_determinism and name != "dense" and not impl.skip:
            impl.build = (lambda build=impl.build, info=impl.info:
                          deterministic(build(), info))
    return impls


def _permute_impls(device: str, E: int) -> dict:
    """The permutation of whichever backend moe_ffn's dispatch picks (kernelrl_impls forces
    each in turn around the call). The backend is looked up at a row's first call (the
    check, under that row's forcing) and kept, so that the timed work is the permutation
    alone, not the dispatch decision."""
    import torch

    def build():
        from kernelrl import backend as kb
        from kernelrl.ops.moe import op

        dev = torch.device(device)
        chosen: list = []

        def run(x):
            if not chosen:
                chosen.append(op._KERNELS[kb.select("moe_ffn", dev, torch.bfloat16)].permute)
            return chosen[0](x["experts"], E)

        return run

    return kernelrl_impls("moe_ffn", device, torch.bfloat16, build)


# ----------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------
def _reference_chunks(x: dict) -> int:
    """Tokens per chunk of moe_ffn_reference within REF_GATHER_BYTES, or 0 where one
    token's gathered expert weights alone exceed it or where the chunks would move more
    than REF_TRAFFIC_BYTES in all (the gathers, and each chunk's float64 gradient of the
    whole w_gate_up and w_down, which autograd makes per chunk)."""
    E, F2, D = x["w_gate_up"].shape
    N, K = x["experts"].shape
    weights = 3 * (F2 // 2) * D * 8               # one expert's w_gate_up + w_down, float64
    chunk = REF_GATHER_BYTES // (K * weights)
    if chunk == 0 or N * K * weights + -(-N // chunk) * E * weights > REF_TRAFFIC_BYTES:
        return 0
    return chunk


def per_expert_reference(x, weights, experts, w_gate_up, w_down, upstream):
    """(y, dx, dweights, dw_gate_up, dw_down) by the same formula as moe_ffn_reference,
    per expert: each expert's (token, choice) pairs as one matmul pair, the gradients for
    the upstream gradient by autograd through those matmuls (per-expert leaves: autograd
    through ``w[e]`` or ``x[rows]`` of a stacked leaf makes a full-size gradient per
    expert), scattered back by hand. In the inputs' dtype (float64 here)."""
    import torch
    import torch.nn.functional as F_

    N, D = x.shape
    E, F, K = w_down.shape[0], w_down.shape[2], experts.shape[1]
    flat = experts.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=E).tolist()
    y = torch.zeros_like(x)
    dx = torch.zeros_like(x)
    dweights = torch.zeros_like(weights).reshape(-1)
    dgu = torch.zeros_like(w_gate_up)
    ddn = torch.zeros_like(w_down)
    lo = 0
    for e, n in enumerate(counts):
        slots = order[lo:lo + n]
        lo += n
        if n == 0:
            continue
        tok = slots // K
        rows = x.index_select(0, tok).requires_grad_(True)
        w = weights.reshape(-1).index_select(0, slots).requires_grad_(True)
        gu_w = w_gate_up[e].clone().requires_grad_(True)
        dn_w = w_down[e].clone().requires_grad_(True)
        gu = rows @ gu_w.t()
        h = F_.silu(gu[:, :F]) * gu[:, F:]
        o = (h @ dn_w.t()) * w.unsqueeze(1)
        g_rows, g_w, g_gu, g_dn = torch.autograd.grad(
            o, (rows, w, gu_w, dn_w), upstream.index_select(0, tok))
        y.index_put_((tok,), o.detach(), accumulate=True)
        dx.index_put_((tok,), g_rows, accumulate=True)
        dweights[slots] = g_w
        dgu[e] = g_gu
        ddn[e] = g_dn
    return y, dx, dweights.reshape(weights.shape), dgu, ddn


def float64_reference(x: dict, keep_dtype=None) -> tuple:
    """(y, dx, dweights, dw_gate_up, dw_down) in float64 (stored in ``keep_dtype`` if
    given) for the input set ``x`` and its upstream gradient: moe_ffn_reference over chunks
    of tokens, or per_expert_reference where a token's gathered weights are too large."""
    import torch
    from kernelrl.ops.moe.torch_impl import moe_ffn_reference

    f64 = torch.float64
    xs = x["x"].detach().to(f64)
    w = x["weights"].detach().to(f64)
    experts = x["experts"]
    gu = x["w_gate_up"].detach().to(f64).requires_grad_(True)
    dn = x["w_down"].detach().to(f64).requires_grad_(True)
    g = x["g"].to(f64)
    chunk = _reference_chunks(x)
    if chunk == 0:
        out = per_expert_reference(xs, w, experts, gu.detach(), dn.detach(), g)
    else:
        N = xs.shape[0]
        ys, dxs, dws = [], [], []
        dgu = torch.zeros_like(gu)
        ddn = torch.zeros_like(dn)
        for lo in range(0, N, chunk):
            xc = xs[lo:lo + chunk].clone().requires_grad_(True)
            wc = w[lo:lo + chunk].clone().requires_grad_(True)
            y = moe_ffn_reference(xc, wc, experts[lo:lo + chunk], gu, dn)
            dx, dw, dg, dd = torch.autograd.grad(y, (xc, wc, gu, dn), g[lo:lo + chunk])
            ys.append(y.detach())
            dxs.append(dx)
            dws.append(dw)
            dgu += dg
            ddn += dd
        out = (torch.cat(ys), torch.cat(dxs), torch.cat(dws), dgu, ddn)
    if keep_dtype is not None:
        out = tuple(t.to(keep_dtype) for t in out)
    return out


def _compare(out, want, tol: float) -> str | None:
    return float64_mismatch(NAMES, out, want, tol, MAX_ERR)


def dense_shapes(shape: dict) -> tuple:
    N, D, F, K = (shape[k] for k in ("N", "D", "F", "K"))
    S = N * K
    return ((S, 2 * F), (S, D), (S, D), (2 * F, D), (S, F), (D, F))


def ffn_check(make_inputs, shape: dict, tol: float):
    """(ref, out) -> None or a message: ``out`` against float64 (computed once, kept in
    float32); the dense row (its six tensors of the dense GEMMs' shapes) for its shapes
    and finite values only. The reference row (einsum) is held to the same, once: a miss
    is logged, as the check cannot fail the row it compares the others with."""
    import torch

    cached: dict = {}
    dense = dense_shapes(shape)

    def check(ref, out):
        if len(out) == len(DENSE_NAMES) and all(tuple(o.shape) == s
                                                for o, s in zip(out, dense)):
            for name, o in zip(DENSE_NAMES, out):
                if not torch.isfinite(o).all():
                    return f"dense {name} has non-finite values"
            return None
        if "want" not in cached:
            cached["want"] = float64_reference(make_inputs(0), keep_dtype=torch.float32)
            problem = _compare(ref, cached["want"], tol)
            if problem:
                progress.log(f"  WARNING: the reference row (einsum) itself: {problem}")
        return _compare(out, cached["want"], tol)

    return check


def stable_sort_permutation(experts, E: int) -> tuple:
    """(order, offsets, position) int32 by torch.sort(stable=True), bincount, scatter."""
    import torch

    flat = experts.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=E)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    position = torch.empty_like(order).scatter_(
        0, order, torch.arange(flat.numel(), device=flat.device))
    return order.int(), offsets.int(), position.int()


def permute_check(make_inputs, E: int):
    """(ref, out) -> None or a message: order, offsets and position equal to the stable
    sort's (:func:`stable_sort_permutation`, computed once), bit for bit."""
    import torch

    cached: dict = {}

    def compare(out, want):
        if len(out) != 3:
            return f"returned {len(out)} tensors, expected 3"
        for name, o, w in zip(("order", "offsets", "position"), out, want):
            o = o.to(w.device)
            if o.dtype != w.dtype or o.shape != w.shape:
                return f"{name} {o.dtype} {tuple(o.shape)} != {w.dtype} {tuple(w.shape)}"
            if not torch.equal(o, w):
                return (f"{name} differs from the stable sort's in "
                        f"{int((o != w).sum())} of {w.numel()} entries")
        return None

    def check(ref, out):
        if "want" not in cached:
            cached["want"] = stable_sort_permutation(make_inputs(0)["experts"], E)
            problem = compare(ref, cached["want"])
            if problem:
                progress.log(f"  WARNING: the reference row (kernelrl[torch]) itself: {problem}")
        return compare(out, cached["want"])

    return check


# ----------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------
def _ints(shape: dict, keys: tuple) -> dict:
    try:
        return {k: int(shape[k]) for k in keys}
    except KeyError as e:
        raise ValueError(f"shape: expected {', '.join(keys)}, got {shape}") from e


def make_case(case_id: str, shape: dict, dtype: str, device: str) -> Case:
    if case_id not in CASE_NAMES:
        raise ValueError(f"case_id: expected one of {sorted(CASE_NAMES)}, got {case_id!r}")
    try:  # registers moe_ffn (kernelrl_impls then says why kernelrl is unavailable)
        import kernelrl.ops.moe  # noqa: F401
    except Exception:
        pass
    # a CPU memory process measures one row: no other row's inputs, no extra check runs
    only = cases._only
    if case_id == "permute":
        shape = _ints(shape, ("N", "K", "E"))
        N, K, E = shape["N"], shape["K"], shape["E"]

        def make_inputs(seed):
            return {"experts": _routing(N, E, K, device)[1]}

        experts = make_inputs(0)["experts"]
        load = expert_load(experts, E)
        impls = _permute_impls(device, E)
        for impl in impls.values():
            impl.info = dict(impl.info or {}, slots=N * K, expert_load=load)
        S = N * K
        return Case(bench=BENCH, case_id=case_id, case=CASE_NAMES[case_id], shape=shape,
                    dtype=dtype, make_inputs=make_inputs, impls=impls, device=device,
                    check=permute_check(make_inputs, E), ref="kernelrl[torch]",
                    bytes_moved=S * experts.element_size() + 8 * S + 4 * (E + 1))

    shape = _ints(shape, ("N", "D", "F", "E", "K"))
    N, D, F, E, K = (shape[k] for k in ("N", "D", "F", "E", "K"))
    tdt = common.torch_dtype(dtype)
    make_inputs = _ffn_inputs(N, D, F, E, K, tdt, device,
                              with_dense=only is None or only == "dense")
    extra = {"expert_load": expert_load(_routing(N, E, K, device)[1], E)} if only is None else {}
    impls = _ffn_impls(shape, device, tdt, check_determinism=only is None, extra_info=extra)
    return Case(bench=BENCH, case_id=case_id, case=CASE_NAMES[case_id], shape=shape,
                dtype=dtype, make_inputs=make_inputs, impls=impls, device=device,
                check=ffn_check(make_inputs, shape, TOL[dtype]), ref="einsum",
                flops=18 * N * K * D * F)


# ----------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------
def _at(shape: dict) -> str:
    return " ".join(f"{k}={shape[k]}" for k in ("N", "D", "F", "E", "K"))


def _ffn_shapes(rows: list) -> list:
    """The ffn shapes of this report's rows, in the order they ran."""
    seen = []
    for r in rows:
        if r.get("case") == CASE_NAMES["ffn"] and r.get("shape") not in seen:
            seen.append(r.get("shape"))
    return seen


def _determinism(rows: list) -> list:
    case = CASE_NAMES["ffn"]
    goal = "kernelrl outputs and gradients bitwise identical across 3 runs"
    shapes = _ffn_shapes(rows)
    if not shapes:
        return [target(f"{case}: {goal}", "NOT CHECKED", "no ffn case in this run")]
    out = []
    for shape in shapes:
        label = f"{case} {_at(shape)} {DTYPE}: {goal}"
        row = report.find_row(rows, case, "kernelrl", shape, DTYPE)
        others = []
        for r in rows:
            if r.get("case") == case and r.get("shape") == shape and r is not row and \
                    r.get("deterministic") is not None:
                others.append(f"{r['impl']} {'identical' if r['deterministic'] else 'DIFFERS'}")
        also = f"; other rows: {', '.join(others)}" if others else ""
        if row is None or row.get("status") != "ok":
            out.append(target(label, "NOT CHECKED", why_missing(row, "kernelrl") + also))
        elif row.get("deterministic") is None:
            out.append(target(label, "NOT CHECKED",
                              (row.get("determinism") or "not recorded in this run") + also))
        else:
            out.append(target(label, "MET" if row["deterministic"] else "NOT MET",
                              f"{row.get('determinism')}{also}"))
    return out


def _gpu_speed(rows: list) -> list:
    case = CASE_NAMES["ffn"]
    out = []
    for shape in GPU_FFN:
        at = f"GPU {case} {_at(shape)} {DTYPE}"
        out.append(faster(rows, case, shape, DTYPE, "hf_eager",
                          f"{at}: kernelrl >= {GPU_VS_HF:g}x faster than HF's eager loop",
                          cpu=False, or_equal=True, factor=GPU_VS_HF))
        label = f"{at}: kernelrl <= {GPU_VS_DENSE:g}x the dense GEMMs' time (same FLOPs)"
        k_row = report.find_row(rows, case, "kernelrl", shape, DTYPE)
        d_row = report.find_row(rows, case, "dense", shape, DTYPE)
        if ms(k_row) is None or ms(d_row) is None:
            missing, name = (k_row, "kernelrl") if ms(k_row) is None else (d_row, "dense")
            out.append(target(label, "NOT CHECKED", why_missing(missing, name)))
            continue
        ratio = ms(k_row) / ms(d_row)
        out.append(target(label, "MET" if ratio <= GPU_VS_DENSE else "NOT MET",
                          f"kernelrl/dense time {ratio:.2f}x (ratio of medians); kernelrl "
                          f"{ms(k_row):.3f} ms vs dense {ms(d_row):.3f} ms"))
    return out


def targets(rep: dict) -> list:
    rows = rep["results"]
    out = _determinism(rows)
    if rep.get("device_kind") == "cuda":
        return out + _gpu_speed(rows)
    shapes = "; ".join(_at(s) for s in GPU_FFN)
    return out + [target(f"GPU {CASE_NAMES['ffn']} ({shapes}) {DTYPE}: kernelrl >= "
                         f"{GPU_VS_HF:g}x faster than HF's eager loop and <= {GPU_VS_DENSE:g}x "
                         "the dense GEMMs' time", "NOT CHECKED",
                         "a CPU run: GPU figures are only claimed from a GPU run (the CPU has "
                         "no speed target; the permutation's speed is in the table)")]


if __name__ == "__main__":
    sys.exit(suite.bench_main(sys.modules[__name__]))
