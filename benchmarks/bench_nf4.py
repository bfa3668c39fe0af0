"""Benchmark: NF4 weights (bitsandbytes' format): the decode GEMV, the dequant-matmul with a
LoRA branch (fwd+bwd), and quantization, against bitsandbytes and dense bf16.

Shape legend: M rows of x (tokens), N out features, K in features (the weight is [N, K]),
r the LoRA rank. Every row of a case uses the very same NF4 weight: kernelrl's
``nf4_quantize`` output, handed to bitsandbytes through its state dict (kernelrl writes
bitsandbytes' key names), and its dequantization Ŵ (rounded to bf16) is the dense weight.

Cases:

  "nf4 decode" (id decode; forward only, under no_grad, no LoRA, bf16 x; M = 1, 8, 16)
      impls: kernelrl.ops.nf4_linear (M <= 16 runs the dispatch op "nf4_gemv"; a row per
             backend that can run it here, forced) | dense (F.linear on the dense bf16 Ŵ:
             the ceiling) | bnb (bitsandbytes.matmul_4bit(x, packed.t(), quant_state)) |
             bnb_linear4bit (bitsandbytes.nn.Linear4bit.forward in eval mode: on a CPU with
             AVX512-BF16 it repacks the weight once, at the first call, for bitsandbytes'
             own C++ GEMV gemv_4bit_inference_cpu_nf4_bf16; on a GPU its CUDA GEMV)
             | eager (nf4_dequantize's torch path, kernelrl.ops.nf4.format.
             dequantize_reference, then F.linear) | compile (torch.compile of eager).
      bytes: the NF4 bytes, N·K/2 packed codes + the scales (one uint8 per block of 64, the
             float32 nested absmax and code tables): what a decode step must read. x and y
             are not counted (at most 2% at M = 16). flops: 2·M·N·K.
  "nf4 train fwd+bwd" (id train; LoRA r = 16, alpha = 16 (scale 1), bf16 x, A, B; M = 512,
      4096): y = x·Ŵᵀ + s·(x·Aᵀ)·Bᵀ, then the gradients to x, A and B for a random upstream
      gradient g.
      impls: kernelrl.ops.nf4_linear with lora_a / lora_b (M > 16: dispatch op
             "nf4_matmul") | dense (F.linear on the dense bf16 Ŵ plus the bf16 LoRA branch:
             the 1.15x target's baseline) | bnb_peft (bitsandbytes.nn.Linear4bit in a
             module, wrapped by peft.get_peft_model with LoraConfig(r=16, lora_alpha=16):
             PEFT's own bitsandbytes LoRA layer, as a QLoRA user gets it through
             transformers; its lora_A / lora_B are the same bf16 tensors) | eager (as in
             decode, plus the LoRA branch in torch; autograd keeps the dequantized Ŵ for
             dx) | compile (torch.compile of eager, backward through AOTAutograd).
      flops: 4·M·N·K (forward, and dx) + 6·M·r·(N + K) (the LoRA products, forward and
             backward); the frozen weight gets no gradient.
  "nf4 quantize" (id quantize; a [N, K] weight in fp32 or bf16 (the case's dtype), blocks of
      64, double quantization of the absmax)
      impls: kernelrl.ops.nf4_quantize(w, double_quant=True) (kernelrl: as dispatched, the
             native C++ quantizer on a CPU where it is built, else the torch path;
             kernelrl[native] / kernelrl[torch] forced) | bnb
             (bitsandbytes.functional.quantize_4bit(w, blocksize=64,
             compress_statistics=True, quant_type="nf4")).
      bytes: the weight read + the packed codes and scales written. Each row also carries
             ``params`` (N·K) and, once the targets are checked, ``mparams_per_s`` (params
             over the median time), printed on the quantize target lines.

Checks before timing: every decode and train row against a float64 reference on the same
Ŵ (kernelrl.ops.nf4.torch_impl.linear_reference; gradients in float64 by autograd): the
output and each gradient within 1% by relative norm, and no element off by more than 5% of
the largest (bf16 outputs land near 0.25%; bnb_linear4bit, which rounds the scales to bf16
for its CPU kernel, a little above).
Quantize rows against bitsandbytes (the reference row; kernelrl[torch] where bitsandbytes
is not installed): the packed bytes equal, byte for byte; the nested absmax and the offset
within 1e-6; the plain absmax (nf4_quantize(double_quant=False), every kernelrl path that
runs here, once per case) equal to bitsandbytes' (compress_statistics=False); and the
double-quantized absmax codes equal on at least 95% of the blocks, every code that differs
at least as near to the true value as bitsandbytes' (whose CPU quantizer does not always
round to nearest: quantize_check says more).

Inputs: Ŵ from w = 0.02·randn([N, K]) (one weight per shape and dtype; input sets other
than the first hold copies of it, in their own memory, so that a GPU run rotates through
separate weights while torch.compile sees the same offset), x ~ randn, A, B ~ 0.01·randn
(both non-zero, so every gradient is), g ~ randn.

Plans:
  CPU default (run.py without --full, or --quick; well under a minute): decode N=K=1024,
      M = 1; train N=K=1024, M=64; quantize N=K=1024 bf16. Most of its time is the fresh
      processes of the CPU memory figures (importing bitsandbytes alone takes 3 s here).
  CPU --full: decode at 4096x4096 and 14336x4096, M = 1, 8, 16; train M = 512 at both
      shapes; quantize at both shapes, fp32 and bf16. Train M = 4096 is left out on a CPU:
      there the torch rows take over ten seconds per fwd+bwd at 14336x4096 (7 calls each,
      plus the memory processes) and the float64 check alone is about a TFLOP. On the 2-core
      development VM under load, --full with --impls kernelrl,dense,bnb,bnb_linear4bit,
      bnb_peft --no-mem took 3 min 12 s (kernelrl native; M = 512 train 0.4 to 1.5 s).
  GPU (default and --full): the issue's shapes, decode M = 1, 8, 16 and train M = 512,
      4096 at 4096x4096 and 14336x4096, quantize at both shapes in fp32 and bf16.

Targets (printed MET / NOT MET / NOT CHECKED with the numbers; never asserted):
  CPU  decode M = 1, 8, 16 at 4096x4096 and 14336x4096 bf16: kernelrl faster than dense
       (bf16 F.linear) and than bitsandbytes' best path (each of bnb and bnb_linear4bit).
       bitsandbytes' fastest CPU kernel, gemm_4bit_forward from the Hub package
       kernels-community/quantization-bitsandbytes, needs the `kernels` package and the
       network: it is not available offline, so bitsandbytes falls back to its own C++ GEMV
       (bnb_linear4bit) or dequantize + matmul (bnb). Its published figures with the Hub
       kernel: 0.54-0.61 ms at 4096x4096 M=1, 1.6-1.7 ms at 14336x4096 (another machine).
  CPU  quantize at 4096x4096 and 14336x4096, fp32 and bf16: kernelrl >= 220 Mparam/s and
       >= 4x bitsandbytes' speed.
  GPU  decode M=1 at both shapes: kernelrl >= 75% of the copy ceiling on the NF4 bytes
       (do_bench clears L2 before each call and the input sets rotate; timed through the
       public call, Python dispatch included).
  GPU  train M=4096 r=16 at both shapes: kernelrl fwd+bwd <= 1.15x dense (bf16 F.linear +
       bf16 LoRA), and faster than bnb_peft.
  GPU  train M=4096 at both shapes: no transient the size of a full bf16 weight: kernelrl's
       peak extra memory minus its outputs (y, dx, dA, dB) below N·K·2 bytes. The CPU
       memory figures are printed but this target is NOT CHECKED on a CPU.
  CPU verdicts are medians of >= 5 paired round-robin runs (targets.py), GPU ones ratios
  of medians.

Usage:
  python benchmarks/run.py nf4                                   # CPU default plan
  python benchmarks/bench_nf4.py --quick --device cpu --impls kernelrl[torch],dense,bnb
  python benchmarks/bench_nf4.py --device cpu --cases quantize --out cpu.json   # --full
  python benchmarks/bench_nf4.py --device cuda --out gpu.json
Where the native CPU kernels are not built, the "kernelrl" and "kernelrl[native]" rows are
error rows on a CPU (their message says why): pass --impls kernelrl[torch],...
(KERNELRL_BACKEND does not change the "kernelrl" row, which is the default dispatch).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cases  # noqa: E402
import common  # noqa: E402
import progress  # noqa: E402
import report  # noqa: E402
import suite  # noqa: E402
from cases import (KERNELRL_IMPLS, Case, Impl, compiled, float64_mismatch,  # noqa: E402
                   kernelrl_impls, short_error)
from targets import faster, mib, ms, target, why_missing  # noqa: E402

BENCH = "nf4"
CASE_NAMES = {"decode": "nf4 decode", "train": "nf4 train fwd+bwd", "quantize": "nf4 quantize"}
PEERS = ("dense", "bnb", "bnb_linear4bit", "bnb_peft", "eager", "compile")
IMPLS = KERNELRL_IMPLS + PEERS

# The table's legend (cases.LEGEND names every family's peers; these are this family's).
for _name, _text in (("dense", "bf16 F.linear on the dequantized weight"),
                     ("bnb", "bitsandbytes.matmul_4bit"),
                     ("bnb_linear4bit", "bitsandbytes Linear4bit eval forward"),
                     ("bnb_peft", "bitsandbytes Linear4bit + PEFT LoRA")):
    cases.LEGEND.setdefault(_name, _text)

SHAPES = ((4096, 4096), (14336, 4096))           # the issue's [out, in] shapes
DECODE_M = (1, 8, 16)
TRAIN_M = (512, 4096)
RANK, ALPHA = 16, 16
BLOCKSIZE = 64
QUICK = {"N": 1024, "K": 1024}
QUICK_DECODE_M = (1,)
QUICK_TRAIN_M = 64
CPU_TRAIN_M = (512,)                             # M = 4096 is left out on a CPU (docstring)
TOL = {"bf16": 1e-2, "fp16": 2e-3, "fp32": 1e-4}  # relative-norm error against float64
MAX_ERR = 5.0                                    # x TOL: max |error| over max |reference|
CODE_MISMATCH = 0.05                             # nested absmax codes allowed to differ

CPU_QUANTIZE_MPARAMS = 220.0
CPU_QUANTIZE_VS_BNB = 4.0
GPU_DECODE_FRACTION = 0.75
GPU_TRAIN_VS_DENSE = 1.15
GPU_TRAIN_M = 4096


def plan(device: str, quick: bool) -> list:
    """[(case_id, shape, dtype)]: see the module docstring ("Plans")."""
    if quick and not common.is_cuda(device):
        n, k = QUICK["N"], QUICK["K"]
        return ([("decode", {"M": m, "N": n, "K": k}, "bf16") for m in QUICK_DECODE_M]
                + [("train", {"M": QUICK_TRAIN_M, "N": n, "K": k, "r": RANK}, "bf16")]
                + [("quantize", {"N": n, "K": k}, "bf16")])
    train_m = TRAIN_M if common.is_cuda(device) else CPU_TRAIN_M
    out = []
    for n, k in SHAPES:
        out += [("decode", {"M": m, "N": n, "K": k}, "bf16") for m in DECODE_M]
    for n, k in SHAPES:
        out += [("train", {"M": m, "N": n, "K": k, "r": RANK}, "bf16") for m in train_m]
    for n, k in SHAPES:
        out += [("quantize", {"N": n, "K": k}, dt) for dt in ("fp32", "bf16")]
    return out


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------
_WEIGHTS: dict = {}   # (N, K, dtype, device) -> (NF4Weight, dense Ŵ in bf16): quantized once


def _weight(N: int, K: int, tdt, device: str):
    """The case's NF4 weight (kernelrl's nf4_quantize of 0.02·randn in ``tdt``) and Ŵ in
    the activation dtype, made once per process."""
    import torch
    from kernelrl.ops import nf4_quantize
    from kernelrl.ops.nf4.torch_impl import dequantize_rows

    key = (N, K, tdt, str(device))
    if key not in _WEIGHTS:
        _WEIGHTS.clear()           # one shape at a time: the full shapes are hundreds of MiB
        g = torch.Generator(device=device).manual_seed(7000 + N + K)
        w = (0.02 * torch.randn(N, K, generator=g, device=device)).to(tdt)
        try:
            q = nf4_quantize(w, blocksize=BLOCKSIZE, double_quant=True)
        except Exception as e:     # the inputs do not depend on the native quantizer
            progress.log(f"  nf4_quantize failed ({short_error(e)}); the inputs' weight is "
                         "quantized by its torch path")
            with quantize_backend("torch"):
                q = nf4_quantize(w, blocksize=BLOCKSIZE, double_quant=True)
        del w
        dense = torch.empty(N, K, dtype=tdt, device=device)
        step = max(1, (1 << 22) // K)          # Ŵ in plain torch, a slice of rows at a time
        for r0 in range(0, N, step):
            dense[r0:r0 + step] = dequantize_rows(q, r0, min(r0 + step, N), tdt)
        _WEIGHTS[key] = (q, dense)
    return _WEIGHTS[key]


def _copy_weight(q):
    """The same NF4 weight in its own memory (offset and metadata equal)."""
    from kernelrl.ops import NF4Weight

    def c(t):
        return None if t is None else t.clone()

    return NF4Weight(c(q.data), c(q.absmax), q.shape, q.dtype, q.blocksize,
                     c(q.nested_absmax), c(q.nested_code), q.offset, c(q.code))


def _linear_inputs(case_id: str, M: int, N: int, K: int, r: int, tdt, device: str):
    import torch

    def make_inputs(seed):
        q, dense = _weight(N, K, tdt, device)
        if seed:
            q, dense = _copy_weight(q), dense.clone()
        g = torch.Generator(device=device).manual_seed(8000 + seed)

        def randn(*size, scale=1.0):
            return (scale * torch.randn(*size, generator=g, device=device)).to(tdt)

        # q_data: the packed codes once more as a plain entry, so that the input-set size
        # that decides how many copies a GPU run rotates through counts the NF4 bytes
        x = {"q": q, "q_data": q.data, "w": dense, "x": randn(M, K)}
        if case_id == "train":
            x["x"].requires_grad_(True)
            x.update(a=randn(r, K, scale=0.01).requires_grad_(True),
                     b=randn(N, r, scale=0.01).requires_grad_(True), g=randn(M, N))
        return x

    return make_inputs


# ----------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------
def _missing(module: str, pip: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{module} not installed (pip install {pip} to compare)"
    return None


def _per_input_set(make):
    """``make(x) -> obj``, built once per input set (keyed by the set; the set is kept so
    that its id is not reused): a bitsandbytes module or QuantState over the set's
    tensors. Built at the first call on a set (the check, or the warm-up), so a CPU memory
    figure counts it (as it counts what the call keeps), but the modules it needs are
    imported by the implementation's build(), before the inputs: the memory child takes
    its baseline after the inputs, and importing bitsandbytes costs some 70 MiB."""
    built: dict = {}

    def get(x):
        hit = built.get(id(x))
        if hit is None:
            hit = built[id(x)] = (x, make(x))
        return hit[1]

    return get


def _bnb_state(q):
    """(packed uint8 [ceil(n/2), 1], bitsandbytes QuantState) of kernelrl's NF4Weight, read
    from the state dict kernelrl writes under bitsandbytes' key names (shares the tensors)."""
    from bitsandbytes.functional import QuantState

    sd = q.to_state_dict("weight")
    stats = {k[len("weight."):]: v for k, v in sd.items() if k != "weight"}
    return sd["weight"], QuantState.from_dict(stats, device=q.device), stats


def _bnb_linear4bit(q, compute_dtype):
    """A bitsandbytes Linear4bit holding kernelrl's NF4 weight (Params4bit.from_prequantized,
    as transformers loads a prequantized checkpoint)."""
    import bitsandbytes as bnb

    packed, _, stats = _bnb_state(q)
    N, K = q.shape
    lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=compute_dtype,
                            compress_statistics=True, quant_type="nf4", device="meta")
    lin.weight = bnb.nn.Params4bit.from_prequantized(data=packed, quantized_stats=stats,
                                                     requires_grad=False, device=q.device)
    return lin


def _bnb_peft(x, compute_dtype):
    """PEFT's LoRA over a Linear4bit, its lora_A / lora_B the input set's a and b."""
    import peft
    import torch
    from torch import nn

    class Holder(nn.Module):
        is_loaded_in_4bit = True     # what transformers sets: PEFT then uses its bnb layer

        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, h):
            return self.proj(h)

    model = peft.get_peft_model(
        Holder(_bnb_linear4bit(x["q"], compute_dtype)),
        peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                        target_modules=["proj"]))
    layer = model.base_model.model.proj
    if not type(layer).__module__.endswith("lora.bnb"):
        raise RuntimeError(f"PEFT wrapped Linear4bit in {type(layer).__qualname__}, not its "
                           "bitsandbytes LoRA layer")
    with torch.no_grad():   # the input set's tensors, shared: a Parameter over the same storage
        layer.lora_A["default"].weight = nn.Parameter(x["a"])
        layer.lora_B["default"].weight = nn.Parameter(x["b"])
    model.train()
    return model, (layer.lora_A["default"].weight, layer.lora_B["default"].weight)


def _dequantize_torch(q, dtype):
    """nf4_dequantize's torch path (what it runs where the native dequantizer is not built,
    and on GPUs): plain torch, which torch.compile can trace."""
    from kernelrl.ops.nf4.format import dequantize_reference
    return dequantize_reference(q, dtype)


def eager_linear(x, q, a=None, b=None, scale=1.0):
    """Dequantize, then F.linear (+ the LoRA branch): what one writes without a fused kernel."""
    import torch.nn.functional as F
    y = F.linear(x, _dequantize_torch(q, x.dtype))
    if a is not None:
        y = y + scale * F.linear(F.linear(x, a), b)
    return y


def dense_linear(x, w, a=None, b=None, scale=1.0):
    import torch.nn.functional as F
    y = F.linear(x, w)
    if a is not None:
        y = y + scale * F.linear(F.linear(x, a), b)
    return y


def _decode_fn(forward):
    import torch

    def run(x):
        with torch.no_grad():
            return (forward(x),)

    return run


def _train_fn(forward):
    """forward(x) -> (y, leaves): y, then the gradients to the leaves for the upstream g."""
    import torch

    def run(x):
        y, leaves = forward(x)
        grads = torch.autograd.grad(y, leaves, x["g"])
        return (y.detach(), *grads)

    return run


def _linear_impls(case_id: str, device: str, tdt) -> dict:
    scale = ALPHA / RANK
    train = case_id == "train"
    wrap = _train_fn if train else _decode_fn

    def leaves(x):
        return (x["x"], x["a"], x["b"])

    def kernelrl_op():
        from kernelrl.ops import nf4_linear
        if train:
            return wrap(lambda x: (nf4_linear(x["x"], x["q"], lora_a=x["a"], lora_b=x["b"],
                                              lora_scale=scale), leaves(x)))
        return wrap(lambda x: nf4_linear(x["x"], x["q"]))

    def dense():
        if train:
            return wrap(lambda x: (dense_linear(x["x"], x["w"], x["a"], x["b"], scale),
                                   leaves(x)))
        return wrap(lambda x: dense_linear(x["x"], x["w"]))

    def eager(fn):
        if train:
            return wrap(lambda x: (fn(x["x"], x["q"], x["a"], x["b"], scale), leaves(x)))
        return wrap(lambda x: fn(x["x"], x["q"]))

    def bnb_matmul():
        import bitsandbytes as bnb
        state = _per_input_set(lambda x: _bnb_state(x["q"])[:2])

        def forward(x):
            packed, qs = state(x)
            return bnb.matmul_4bit(x["x"], packed.t(), quant_state=qs)

        return wrap(forward)

    def bnb_linear4bit():
        import bitsandbytes  # noqa: F401  (here, not in the first call: see _per_input_set)
        module = _per_input_set(lambda x: _bnb_linear4bit(x["q"], tdt).eval())
        return wrap(lambda x: module(x)(x["x"]))

    def bnb_peft():
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        model = _per_input_set(lambda x: _bnb_peft(x, tdt))

        def forward(x):
            m, (a, b) = model(x)
            return m(x["x"]), (x["x"], a, b)

        return wrap(forward)

    bnb_why = _missing("bitsandbytes", "bitsandbytes")
    op = "nf4_matmul" if train else "nf4_gemv"
    impls = {**_cannot_run(op, device, kernelrl_impls(op, device, tdt, kernelrl_op)),
             "dense": Impl(dense)}
    if train:
        impls["bnb_peft"] = Impl(bnb_peft, skip=bnb_why or _missing("peft", "peft"))
    else:
        impls["bnb"] = Impl(bnb_matmul, skip=bnb_why)
        impls["bnb_linear4bit"] = Impl(bnb_linear4bit, skip=bnb_why)
    impls["eager"] = Impl(lambda: eager(eager_linear))
    impls["compile"] = Impl(lambda: eager(compiled(eager_linear)))
    return impls


def _cannot_run(op: str, device: str, impls: dict) -> dict:
    """The forced rows of backends that the op's registration says cannot run on this
    device type (a skip entry other than "not yet measured": native nf4_matmul on CUDA)
    become "not run" entries with that reason: backend.availability() does not read those
    entries, so the row would otherwise be an error row."""
    try:
        from kernelrl import backend as kb
        skip = kb.registered_ops()[op].skip
        not_measured = kb.NOT_YET_MEASURED
    except Exception:          # kernelrl does not import: kernelrl_impls said why
        return impls
    device_type = "cuda" if common.is_cuda(device) else "cpu"
    for (backend, where), why in skip.items():
        name = f"kernelrl[{backend}]"
        if where == device_type and why != not_measured and name in impls:
            impls[name] = Impl(impls[name].build, skip=why, row=False)
            if impls["kernelrl"].same_as == name:
                impls["kernelrl"].same_as = None
    return impls


def _float64_reference(case_id: str, x: dict):
    """The float64 outputs (y, and for train dx, dA, dB) on the same Ŵ."""
    import torch
    from kernelrl.ops.nf4.torch_impl import linear_reference

    f64 = torch.float64
    if case_id != "train":
        return (linear_reference(x["x"], x["q"], dtype=f64),)
    xs, a, b = (x[k].detach().to(f64).requires_grad_(True) for k in ("x", "a", "b"))
    y = linear_reference(xs, x["q"], lora_a=a, lora_b=b, lora_scale=ALPHA / RANK, dtype=f64)
    grads = torch.autograd.grad(y, (xs, a, b), x["g"].to(f64))
    return (y.detach(), *grads)


def close_to_float64(reference, tol: float, names: tuple):
    """(ref, out) -> None or a message: every tensor of ``out`` within ``tol`` of the float64
    ``reference()`` (computed once) by relative norm, and none of its elements off by more
    than MAX_ERR·tol of the reference's largest. ``ref`` (the reference row's outputs, eager)
    is held to the same, once: a miss is logged, as the check cannot fail the row it
    compares the others with."""
    cached: dict = {}

    def compare(out, want):
        return float64_mismatch(names, out, want, tol, MAX_ERR)

    def check(ref, out):
        if "want" not in cached:
            cached["want"] = reference()
            problem = compare(ref, cached["want"])
            if problem:
                progress.log(f"  WARNING: the reference row (eager) itself: {problem}")
        return compare(out, cached["want"])

    return check


# ----------------------------------------------------------------------------------------
# Quantize
# ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def quantize_backend(backend):
    """Run nf4_quantize with ``backend`` forced (None: the default choice). nf4_quantize
    picks native or torch from KERNELRL_BACKEND alone (op._use_native reads
    backend.forced_backend(), which does not see backend.force()), so both are set."""
    from kernelrl.backend import force

    old = os.environ.pop("KERNELRL_BACKEND", None)
    if backend is not None:
        os.environ["KERNELRL_BACKEND"] = backend
    try:
        with force(backend):
            yield
    finally:
        os.environ.pop("KERNELRL_BACKEND", None)
        if old is not None:
            os.environ["KERNELRL_BACKEND"] = old


def native_quantize_status(device: str) -> tuple:
    """(whether nf4_quantize has its native kernel here, why not)."""
    if common.is_cuda(device):
        return False, "nf4_quantize's native kernel is CPU-only (on a GPU it runs torch)"
    try:
        from kernelrl import backend as kb
        kb.native_module()
        from kernelrl.ops.nf4 import native_impl
    except Exception as e:
        return False, f"native nf4 unavailable: {short_error(e)}"
    if not hasattr(native_impl, "quantize"):
        return False, "kernelrl.ops.nf4.native_impl has no quantize"
    return True, "native"


def _kernelrl_quantize(x, backend):
    import torch
    from kernelrl.ops import nf4_quantize

    with quantize_backend(backend):
        q = nf4_quantize(x["w"], blocksize=BLOCKSIZE, double_quant=True)
    return (q.data, q.absmax, q.nested_absmax,
            torch.tensor([q.offset], dtype=torch.float32, device=q.device))


def _bnb_quantize_fn():
    import bitsandbytes.functional  # noqa: F401  (before the inputs: see _per_input_set)
    return _bnb_quantize


def _bnb_quantize(x):
    import bitsandbytes.functional as bf

    packed, state = bf.quantize_4bit(x["w"], blocksize=BLOCKSIZE, compress_statistics=True,
                                     quant_type="nf4")
    return (packed.reshape(-1), state.absmax, state.state2.absmax,
            state.offset.reshape(1).float())


def _quantize_impls(device: str, params: int) -> dict:
    native_ok, why = native_quantize_status(device)
    default = "native" if native_ok else "torch"
    info = {"params": params}

    def run(backend):
        return lambda x: _kernelrl_quantize(x, backend)

    return {
        "kernelrl": Impl(lambda: run(None), same_as=f"kernelrl[{default}]",
                         info=dict(info, dispatch=default,
                                   dispatch_source="nf4_quantize: native on a CPU where built")),
        "kernelrl[native]": Impl(lambda: run("native"), skip=None if native_ok else why,
                                 row=native_ok, info=info),
        "kernelrl[triton]": Impl(lambda: run("triton"), row=False,
                                 skip="nf4_quantize has no Triton kernel (its GPU path is torch)"),
        "kernelrl[torch]": Impl(lambda: run("torch"), info=info),
        "bnb": Impl(_bnb_quantize_fn, skip=_missing("bitsandbytes", "bitsandbytes"), info=info),
    }


def quantize_check(make_inputs, device: str):
    """(ref, out) -> None or a message, ``ref`` being bitsandbytes' quantize_4bit (or, where
    it is not installed, kernelrl[torch]); see the module docstring.

    The double-quantized absmax codes: bitsandbytes' CPU quantizer does not always round to
    the nearest value of the dynamic map (near zero it can be 2 or 3 codes off), and with
    16-bit weights many blocks share one absmax, so one such value can move a few percent of
    the codes at once (1.35% at 1024x1024 bf16 here). So against bitsandbytes a row's codes
    may differ on up to CODE_MISMATCH of the blocks, provided every differing code is at
    least as near to the block's true scaled absmax as bitsandbytes' code is; against
    kernelrl[torch] (no bitsandbytes) they must be equal."""
    import torch

    plain: dict = {}

    def plain_absmax():
        """Once per case: bitsandbytes' plain absmax (compress_statistics=False), and the
        first of nf4_quantize(double_quant=False)'s absmax, on every kernelrl path that runs
        here, that differs from it (a message), else None. (None, None) without
        bitsandbytes."""
        if "amax" in plain:
            return plain["amax"], plain["problem"]
        plain["amax"] = plain["problem"] = None
        if _missing("bitsandbytes", "bitsandbytes"):
            return None, None
        import bitsandbytes.functional as bf
        from kernelrl.ops import nf4_quantize

        w = make_inputs(0)["w"]
        _, state = bf.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=False,
                                    quant_type="nf4")
        plain["amax"] = amax = state.absmax.reshape(-1).float()
        paths = ["torch"] + (["native"] if native_quantize_status(device)[0] else [])
        for path in paths:
            try:
                with quantize_backend(path):
                    mine = nf4_quantize(w, blocksize=BLOCKSIZE, double_quant=False).absmax
            except Exception as e:   # that path's own row fails too, saying why
                progress.log(f"  plain absmax check: the {path} path failed: {short_error(e)}")
                continue
            differ = int((mine != amax.to(mine.device)).sum())
            if differ:
                plain["problem"] = (f"plain absmax ({path} path, double_quant=False): "
                                    f"{differ} of {mine.numel()} blocks differ from "
                                    "bitsandbytes'")
                break
        return plain["amax"], plain["problem"]

    def codes_problem(codes, rcodes, nested, offset, amax):
        differ = codes != rcodes
        share = differ.float().mean().item()
        if amax is None:
            return (f"double-quantized absmax codes differ on {int(differ.sum())} of "
                    f"{differ.numel()} blocks from kernelrl[torch]'s" if share else None)
        if share > CODE_MISMATCH:
            return (f"double-quantized absmax codes differ on {100 * share:.2f}% of the "
                    f"blocks from bitsandbytes' (at most {100 * CODE_MISMATCH:g}%)")
        if not share:
            return None
        from kernelrl.ops.nf4.format import NESTED_BLOCKSIZE, dynamic_map

        table = dynamic_map().to(codes.device)
        idx = differ.nonzero().reshape(-1)
        true = ((amax.to(codes.device)[idx] - offset.float())
                / nested.float()[idx // NESTED_BLOCKSIZE])
        mine = (table[codes[idx].long()] - true).abs()
        theirs = (table[rcodes[idx].long()] - true).abs()
        farther = int((mine > theirs * (1 + 1e-6) + 1e-12).sum())
        if farther:
            return (f"double-quantized absmax codes: {farther} of the {idx.numel()} that "
                    "differ from bitsandbytes' are farther from the true value than its")
        return None

    def check(ref, out):
        if len(out) != 4:
            return f"returned {len(out)} tensors, expected 4"
        data, codes, nested, offset = (t.to(ref[0].device) for t in out)
        rdata, rcodes, rnested, roffset = ref
        if data.dtype != torch.uint8 or data.shape != rdata.shape:
            return f"packed codes {data.dtype} {tuple(data.shape)} != {tuple(rdata.shape)}"
        differ = int((data != rdata).sum())
        if differ:
            return f"packed bytes: {differ} of {data.numel()} differ from the reference's"
        if codes.shape != rcodes.shape or nested.shape != rnested.shape:
            return (f"absmax codes {tuple(codes.shape)} / nested {tuple(nested.shape)} != "
                    f"{tuple(rcodes.shape)} / {tuple(rnested.shape)}")
        for name, a, b in (("nested absmax", nested, rnested), ("offset", offset, roffset)):
            err = ((a.float() - b.float()).abs() / b.float().abs().clamp(min=1e-30)).max()
            if not err.item() <= 1e-6:
                return f"{name} differs from the reference's by {err.item():.3g} (relative)"
        amax, problem = plain_absmax()
        return problem or codes_problem(codes, rcodes, nested, offset, amax)

    return check


# ----------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------
def _ints(shape: dict, keys: tuple) -> tuple:
    try:
        return tuple(int(shape[k]) for k in keys)
    except KeyError as e:
        raise ValueError(f"shape: expected {', '.join(keys)}, got {shape}") from e


def out_bytes(shape: dict, itemsize: int = 2) -> int:
    """Bytes of the train case's outputs: y [M, N], dx [M, K], dA [r, K], dB [N, r]."""
    M, N, K, r = (int(shape[k]) for k in ("M", "N", "K", "r"))
    return (M * N + M * K + r * K + N * r) * itemsize


def make_case(case_id: str, shape: dict, dtype: str, device: str) -> Case:
    import torch

    if case_id not in CASE_NAMES:
        raise ValueError(f"case_id: expected one of {sorted(CASE_NAMES)}, got {case_id!r}")
    tdt = common.torch_dtype(dtype)
    itemsize = torch.empty((), dtype=tdt).element_size()
    if case_id == "quantize":
        N, K = _ints(shape, ("N", "K"))
        n = N * K

        def make_inputs(seed):
            g = torch.Generator(device=device).manual_seed(9000 + seed)
            return {"w": (0.02 * torch.randn(N, K, generator=g, device=device)).to(tdt)}

        impls = _quantize_impls(device, n)
        nblocks = -(-n // BLOCKSIZE)
        return Case(
            bench=BENCH, case_id=case_id, case=CASE_NAMES[case_id], shape={"N": N, "K": K},
            dtype=dtype, make_inputs=make_inputs, impls=impls, device=device,
            check=quantize_check(make_inputs, device),
            ref="bnb" if not _missing("bitsandbytes", "bitsandbytes") else "kernelrl[torch]",
            bytes_moved=n * itemsize + (n + 1) // 2 + nblocks + 4 * -(-nblocks // 256))

    if case_id == "train":
        M, N, K, r = _ints(shape, ("M", "N", "K", "r"))
        shape = {"M": M, "N": N, "K": K, "r": r}
        flops = 4 * M * N * K + 6 * M * r * (N + K)
        names = ("y", "dx", "dA", "dB")
    else:
        M, N, K = _ints(shape, ("M", "N", "K"))
        r = 0
        shape = {"M": M, "N": N, "K": K}
        flops = 2 * M * N * K
        names = ("y",)
    try:  # registers the ops (kernelrl_impls imports kernelrl.ops, which may not export them)
        import kernelrl.ops.nf4  # noqa: F401
    except Exception:  # kernelrl_impls then says why kernelrl is unavailable
        pass
    make_inputs = _linear_inputs(case_id, M, N, K, r, tdt, device)
    nbytes = None
    if case_id == "decode":   # the NF4 bytes: packed codes and scales
        nblocks = -(-N * K // BLOCKSIZE)
        nbytes = (N * K + 1) // 2 + nblocks + 4 * -(-nblocks // 256) + 4 * 256 + 4 * 16
    return Case(
        bench=BENCH, case_id=case_id, case=CASE_NAMES[case_id], shape=shape, dtype=dtype,
        make_inputs=make_inputs, impls=_linear_impls(case_id, device, tdt), device=device,
        check=close_to_float64(lambda: _float64_reference(case_id, make_inputs(0)),
                               TOL[dtype], names),
        bytes_moved=nbytes, flops=flops)


# ----------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------
def _at(shape: dict) -> str:
    return f"{shape['N']}x{shape['K']}"


def annotate_rates(rows: list) -> None:
    """mparams_per_s on the quantize rows: params (N·K) over the median time."""
    for r in rows:
        if r.get("case") == CASE_NAMES["quantize"] and r.get("status") == "ok" and \
                r.get("median_ms"):
            params = int(r["shape"]["N"]) * int(r["shape"]["K"])
            r["params"] = params
            r["mparams_per_s"] = params / (r["median_ms"] * 1e-3) / 1e6


def _all_of(label: str, parts: list) -> dict:
    """One target over several checks: NOT MET if any is, MET if the others are MET and at
    least one is, else NOT CHECKED; the details joined."""
    statuses = [p["status"] for p in parts]
    if "NOT MET" in statuses:
        status = "NOT MET"
    elif "MET" in statuses:
        status = "MET"
    else:
        status = "NOT CHECKED"
    return target(label, status, "; ".join(p["detail"] for p in parts))


def _cpu_decode(rows: list) -> list:
    out = []
    case = CASE_NAMES["decode"]
    for n, k in SHAPES:
        for m in DECODE_M:
            shape = {"M": m, "N": n, "K": k}
            at = f"CPU {case} {_at(shape)} M={m} bf16"
            out.append(faster(rows, case, shape, "bf16", "dense",
                              f"{at}: kernelrl faster than dense bf16 F.linear", cpu=True))
            parts = [faster(rows, case, shape, "bf16", peer, peer, cpu=True)
                     for peer in ("bnb", "bnb_linear4bit")]
            out.append(_all_of(f"{at}: kernelrl faster than bitsandbytes' best path "
                               "(bnb and bnb_linear4bit)", parts))
    return out


def _cpu_quantize(rows: list) -> list:
    out = []
    case = CASE_NAMES["quantize"]
    for n, k in SHAPES:
        for dtype in ("fp32", "bf16"):
            shape = {"N": n, "K": k}
            at = f"CPU {case} {_at(shape)} {dtype}"
            row = report.find_row(rows, case, "kernelrl", shape, dtype)
            label = f"{at}: kernelrl >= {CPU_QUANTIZE_MPARAMS:g} Mparam/s"
            if ms(row) is None:
                out.append(target(label, "NOT CHECKED", why_missing(row, "kernelrl")))
            else:
                rate = row["mparams_per_s"]
                peer = report.find_row(rows, case, "bnb", shape, dtype)
                also = (f"; bnb {peer['mparams_per_s']:.1f} Mparam/s" if ms(peer) is not None
                        else "")
                out.append(target(label, "MET" if rate >= CPU_QUANTIZE_MPARAMS else "NOT MET",
                                  f"kernelrl {rate:.1f} Mparam/s ({n * k} params in "
                                  f"{ms(row):.3f} ms, median){also}"))
            out.append(faster(rows, case, shape, dtype, "bnb",
                              f"{at}: kernelrl >= {CPU_QUANTIZE_VS_BNB:g}x bitsandbytes' speed",
                              cpu=True, or_equal=True, factor=CPU_QUANTIZE_VS_BNB))
    return out


def _gpu_decode(rows: list, ceilings: dict) -> list:
    out = []
    case = CASE_NAMES["decode"]
    for n, k in SHAPES:
        shape = {"M": 1, "N": n, "K": k}
        label = (f"GPU {case} {_at(shape)} M=1 bf16: kernelrl >= "
                 f"{100 * GPU_DECODE_FRACTION:g}% of the copy ceiling on the NF4 bytes")
        row = report.find_row(rows, case, "kernelrl", shape, "bf16")
        if ms(row) is None or row.get("fraction_of_ceiling") is None:
            why = (why_missing(row, "kernelrl") if ms(row) is None
                   else "no copy ceiling measured in this run")
            out.append(target(label, "NOT CHECKED", why))
            continue
        frac = row["fraction_of_ceiling"]
        out.append(target(label, "MET" if frac >= GPU_DECODE_FRACTION else "NOT MET",
                          f"{100 * frac:.1f}% ({row['gbps']:.0f} GB/s of "
                          f"{ceilings.get('copy_gbps') or 0:.0f}; {ms(row) * 1e3:.1f} us)"))
    return out


def _gpu_train(rows: list) -> list:
    out = []
    case = CASE_NAMES["train"]
    for n, k in SHAPES:
        shape = {"M": GPU_TRAIN_M, "N": n, "K": k, "r": RANK}
        at = f"GPU {case} {_at(shape)} M={GPU_TRAIN_M} r={RANK} bf16"
        k_row = report.find_row(rows, case, "kernelrl", shape, "bf16")
        d_row = report.find_row(rows, case, "dense", shape, "bf16")
        label = f"{at}: kernelrl <= {GPU_TRAIN_VS_DENSE:g}x dense bf16 + bf16 LoRA time"
        if ms(k_row) is None or ms(d_row) is None:
            missing, name = (k_row, "kernelrl") if ms(k_row) is None else (d_row, "dense")
            out.append(target(label, "NOT CHECKED", why_missing(missing, name)))
        else:
            ratio = ms(k_row) / ms(d_row)
            out.append(target(label, "MET" if ratio <= GPU_TRAIN_VS_DENSE else "NOT MET",
                              f"kernelrl/dense time {ratio:.2f}x (ratio of medians); kernelrl "
                              f"{ms(k_row):.3f} ms vs dense {ms(d_row):.3f} ms"))
        out.append(faster(rows, case, shape, "bf16", "bnb_peft",
                          f"{at}: kernelrl faster than bnb_peft", cpu=False))
        out.append(_transient(k_row, shape, f"{at}: {_transient_goal()}"))
    return out


def _transient_goal() -> str:
    return "kernelrl peak extra memory minus its outputs < one bf16 weight (N*K*2 bytes)"


def _transient(row, shape: dict, label: str) -> dict:
    if ms(row) is None:
        return target(label, "NOT CHECKED", why_missing(row, "kernelrl"))
    peak = row.get("peak_mem_bytes")
    if peak is None:
        return target(label, "NOT CHECKED",
                      f"kernelrl peak memory not measured ({row.get('mem_error', 'off')})")
    weight = int(shape["N"]) * int(shape["K"]) * 2
    outs = out_bytes(shape)
    extra = peak - outs
    return target(label, "MET" if extra < weight else "NOT MET",
                  f"peak extra {mib(peak)} - outputs {mib(outs)} = {mib(extra)} vs a bf16 "
                  f"weight {mib(weight)}")


def targets(rep: dict) -> list:
    rows = rep["results"]
    annotate_rates(rows)
    if rep.get("device_kind") == "cuda":
        return (_gpu_decode(rows, rep.get("ceilings") or {}) + _gpu_train(rows)
                + [target("CPU nf4 decode and quantize targets", "NOT CHECKED",
                          "a GPU run: CPU speed is only claimed from a CPU run")])
    shapes = " and ".join(_at({"N": n, "K": k}) for n, k in SHAPES)
    gpu = "a CPU run: GPU figures are only claimed from a GPU run"
    return _cpu_decode(rows) + _cpu_quantize(rows) + [
        target(f"GPU {CASE_NAMES['decode']} {shapes} M=1 bf16: kernelrl >= "
               f"{100 * GPU_DECODE_FRACTION:g}% of the copy ceiling on the NF4 bytes",
               "NOT CHECKED", gpu),
        target(f"GPU {CASE_NAMES['train']} {shapes} M={GPU_TRAIN_M} r={RANK} bf16: kernelrl "
               f"<= {GPU_TRAIN_VS_DENSE:g}x dense bf16 + bf16 LoRA, faster than bnb_peft",
               "NOT CHECKED", gpu),
        target(f"GPU {CASE_NAMES['train']} {shapes} M={GPU_TRAIN_M}: {_transient_goal()}",
               "NOT CHECKED", gpu + " (the CPU peak memory is in the table)"),
    ]


if __name__ == "__main__":
    sys.exit(suite.bench_main(sys.modules[__name__]))
