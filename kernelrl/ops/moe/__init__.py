"""Mixture-of-experts: the router (top-k, load-balancing and z losses) and a dropless,
deterministic MoE feed-forward layer with SwiGLU experts.

Shapes (the package legend): N tokens, D hidden (model) width, F expert FFN width, E experts,
K top-k (K <= 8; Mixtral routes 2 of 8, Qwen3-MoE 8 of 128). The layout is Hugging Face
transformers 5's fused ``Experts`` modules: w_gate_up [E, 2F, D] holds the gate rows
(0..F-1) then the up rows (F..2F-1); w_down [E, D, F].

    expert_e(v) = W_d[e]·(silu(W_g[e]·v) ⊙ W_u[e]·v)          silu(g) = g·σ(g)
    y[n]        = Σ_{j=0..K-1} weights[n, j] · expert_{experts[n, j]}(x[n])

Dropless: every routed slot is computed (no capacity). Deterministic: bitwise-identical
outputs and gradients on every run; no atomics anywhere.

Permutation (slot s = n·K + j, the row-major flattening of ``experts``): offsets int32
[E + 1] is the exclusive scan of the per-expert slot counts (offsets[E] = N·K); order int32
[N·K] lists the slots grouped by expert ascending, by slot index within an expert (a stable
counting sort); position int32 [N·K] is its inverse, position[order[p]] = p. For sorted
position p: s = order[p], n = s // K, e the expert with offsets[e] <= p < offsets[e + 1].
Every buffer is sized from the shapes alone: nothing waits on the host.

Forward stages (on the sorted order):
    gate_up   h[p] = silu(x[n]·W_g[e]ᵀ) ⊙ (x[n]·W_u[e]ᵀ)           h [N·K, F]
    down      o[p] = h[p]·W_d[e]ᵀ                                   o [N·K, D]
    combine   y[n] = Σ_{j ascending} weights[n, j]·o[position[n·K + j]]   (float32 sum)
Backward (dy = ∂L/∂y [N, D]):
    combine   do[p] = weights[n, j]·dy[n];  dweights[n, j] = <dy[n], o[p]>   p = position[n·K + j]
    down      dh[p] = do[p]·W_d[e];  dW_d[e] = Σ_{p in e} do[p]ᵀ·h[p]
    gate_up   g, u kept from the forward (torch stages) or recomputed (Triton);
              dg = dh·u·silu'(g), du = dh·silu(g), dgu[p] = [dg, du];
              dW_gu[e] = Σ_{p in e} dgu[p]ᵀ·x[n(p)];
              dx[n] = Σ_{j ascending} dgu[p_j]·W_gu[e_j]    p_j = position[n·K + j]
    silu'(g) = σ(g)·(1 + g·(1 − σ(g)))
Sums over an expert's rows run in a fixed order; dx is a gather over j, not a scatter.
dtypes: float32, float16, bfloat16 (float64 on the torch backend); accumulation in float32;
outputs and gradients in their input's dtype.

Implementations (chosen per call, see kernelrl.backend), each a module of the seven stage
functions (``op.MoEKernels``):
    native   C++ / CUDA permutation (csrc/moe) with the torch stages on CPU and the Triton
             stages on CUDA; the CPU default
    triton   the GPU path: Triton permutation, grouped GEMMs gathering x's rows through
             ``order`` in their loads, combine, and the backward
    torch    a stable sort and a loop over the experts, one GEMM each in the input dtype
             (float16 upcast on a CPU), keeping the gate and up products for the
             backward (any device; float64)
The oracle is ``moe_ffn_reference`` (torch_impl): per (token, choice), autograd, float64.

Modules:
    routing     topk_route, load_balancing_loss, router_z_loss
    torch_impl  the reference and the torch stages
    native_impl kernelrl._native's permutation (csrc/moe)
    triton_impl the Triton stages
    op          moe_ffn, its autograd.Function and the registration
"""

from kernelrl.ops.moe.op import moe_ffn
from kernelrl.ops.moe.routing import load_balancing_loss, router_z_loss, topk_route
from kernelrl.ops.moe.torch_impl import moe_ffn_reference

__all__ = ["moe_ffn", "moe_ffn_reference", "topk_route", "load_balancing_loss",
           "router_z_loss"]
