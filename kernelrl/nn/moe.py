"""A sparse mixture-of-experts feed-forward block (Mixtral, Qwen3-MoE) on kernelrl's MoE ops.

Shapes (the MoE ops' legend): N tokens (all leading dims of the input, N = B·T), D hidden
(model) width, F expert FFN width, E experts, K top-k.

Math, for a token x [D] (``kernelrl.ops.moe`` has the op-level details):

    x      ← x ⊙ u,  u ~ U(1 − j, 1 + j) per element        training with jitter j > 0 only
    logits = x W_rᵀ                                          [E]      W_r = gate.weight [E, D]
    p      = softmax(logits)  (float32)
    S      = the K experts of largest p (ties: lower index first)
    w_k    = p_k / Σ_{k'∈S} p_k'    (renormalize)    or    p_k    (Qwen3's norm_topk_prob off)
    y      = Σ_{k∈S} w_k · W_d[k] (silu(W_g[k] x) ⊙ W_u[k] x)          [D]

with experts.gate_up_proj [E, 2F, D] holding W_g (rows 0..F−1) over W_u (rows F..2F−1) and
experts.down_proj [E, D, F] holding W_d: transformers 5's stacked layout. The router is
``kernelrl.ops.topk_route`` and the experts ``kernelrl.ops.moe_ffn`` (dropless: no token
is ever dropped for capacity; deterministic).

Numerics, as transformers 5's blocks: the router's linear runs in the input's dtype, the
softmax in float32; Mixtral keeps the routing weights in float32 (``float32_weights``),
Qwen3-MoE (and transformers 4's Mixtral) casts them to the logits' dtype first. The
experts' sum is accumulated in float32 and rounded once (HF rounds each expert's term into
the output dtype and adds in it: the same within bf16's rounding). Under autocast the
experts run in the autocast dtype, as HF's linears would, and y comes back in x's dtype.

Parameter names are transformers 5's (``gate.weight``, ``experts.gate_up_proj``,
``experts.down_proj``), so a patched model's state dict, ``save_pretrained`` files,
checkpoints and optimizer states are those of the unpatched model. The router is not an
``nn.Linear`` (neither is HF's), so LoRA's ``all-linear`` leaves it alone either way.

The auxiliary losses. Each forward keeps its router logits [N, E] (with their autograd
graph: an aux loss built on them trains the router) and chosen experts [N, K] in
``last_router_logits`` / ``last_experts``, until the next forward replaces them (also a
no-grad one: read them right after the forward they belong to). ``load_balancing_loss`` is
the Switch Transformer loss E·Σ_e f_e·P_e of that forward (1 at perfect balance;
transformers' ``load_balancing_loss_func`` for one layer is K times it), ``z_loss`` the
ST-MoE router z-loss. ``kernelrl.models.router_aux_loss`` pools a model's layers as
transformers does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from kernelrl.ops import load_balancing_loss, moe_ffn, router_z_loss, topk_route

__all__ = ["SparseMoE", "MoERouter", "MoEExperts", "HF_BLOCK_TYPES"]

#: The transformers block classes ``SparseMoE.from_hf`` reads (by class name; transformers 4
#: and 5 use the same names), and whether that family renormalizes its top-k weights by
#: default (None: the block or its config says, Qwen3's ``norm_topk_prob``).
HF_BLOCK_TYPES = {"MixtralSparseMoeBlock": True, "Qwen3MoeSparseMoeBlock": None}

# The largest K kernelrl's MoE kernels take.
_MAX_TOP_K = 8


class MoERouter(nn.Module):
    """The router's weight [E, D]: logits = x·weightᵀ. Not an ``nn.Linear`` (as in
    transformers 5), so LoRA targets never match it."""

    def __init__(self, num_experts: int, hidden_size: int, *, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype,
                                               device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [N, E] router logits (autocast applies, as to HF's ``F.linear``)."""
        return F.linear(x, self.weight)


class MoEExperts(nn.Module):
    """The stacked expert weights: ``gate_up_proj`` [E, 2F, D] (gate rows, then up rows)
    and ``down_proj`` [E, D, F]. A container; ``SparseMoE`` runs them through ``moe_ffn``."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, *, dtype=None,
                 device=None):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn_size, hidden_size,
                                                     dtype=dtype, device=device))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_size,
                                                  dtype=dtype, device=device))


def _check_int(name: str, value, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name}: expected an int >= {least}, got {value!r}")
    return value


class SparseMoE(nn.Module):
    """A top-K sparse MoE block with SwiGLU experts (module docstring):
    forward(hidden [..., D]) -> [..., D].

    Args:
        hidden_size: D.  ffn_size: F.  num_experts: E.
        top_k: K, 1 <= K <= min(8, E).
        renormalize: divide the K routing weights by their sum (Mixtral; Qwen3-MoE's
            ``norm_topk_prob``).
        jitter_noise: j in [0, 1): in training, the input is multiplied by U(1 − j, 1 + j)
            noise before routing (Mixtral's ``router_jitter_noise``).
        float32_weights: keep the routing weights in float32 (transformers 5's Mixtral)
            rather than casting them to the logits' dtype (Qwen3-MoE).
        dtype, device: of the parameters. Initialisation (as ``nn.Linear``'s): each
            weight U(−1/√fan_in, 1/√fan_in), fan_in D for the router and gate/up, F for
            down. ``from_hf`` takes a transformers block's weights instead.
    """

    def __init__(self, hidden_size: int, ffn_size: int, num_experts: int, top_k: int = 2, *,
                 renormalize: bool = True, jitter_noise: float = 0.0,
                 float32_weights: bool = False, dtype=None, device=None):
        super().__init__()
        self.hidden_size = _check_int("hidden_size", hidden_size, 1)
        self.ffn_size = _check_int("ffn_size", ffn_size, 1)
        self.num_experts = _check_int("num_experts", num_experts, 1)
        if (isinstance(top_k, bool) or not isinstance(top_k, int)
                or not 1 <= top_k <= min(_MAX_TOP_K, num_experts)):
            raise ValueError(f"top_k: expected an int in [1, min({_MAX_TOP_K}, num_experts = "
                             f"{num_experts})], got {top_k!r}")
        if isinstance(jitter_noise, bool) or not isinstance(jitter_noise, (int, float)) or not (
                0.0 <= jitter_noise < 1.0):
            raise ValueError(f"jitter_noise: expected a number in [0, 1), got {jitter_noise!r}")
        self.top_k, self.renormalize = top_k, bool(renormalize)
        self.jitter_noise, self.float32_weights = float(jitter_noise), bool(float32_weights)
        self.gate = MoERouter(num_experts, hidden_size, dtype=dtype, device=device)
        self.experts = MoEExperts(num_experts, hidden_size, ffn_size, dtype=dtype,
                                  device=device)
        self.last_router_logits: Optional[torch.Tensor] = None     # [N, E] of the last forward
        self.last_experts: Optional[torch.Tensor] = None           # [N, K] int64
        if torch.device(device if device is not None else "cpu").type != "meta":
            self.reset_parameters()

    # The weights under the names of the MoE ops' arguments.
    @property
    def router_weight(self) -> nn.Parameter:
        """W_r [E, D]."""
        return self.gate.weight

    @property
    def w_gate_up(self) -> nn.Parameter:
        """[E, 2F, D]: gate rows, then up rows."""
        return self.experts.gate_up_proj

    @property
    def w_down(self) -> nn.Parameter:
        """[E, D, F]."""
        return self.experts.down_proj

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for weight, fan_in in ((self.gate.weight, self.hidden_size),
                               (self.experts.gate_up_proj, self.hidden_size),
                               (self.experts.down_proj, self.ffn_size)):
            bound = 1.0 / math.sqrt(fan_in)
            weight.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, ffn_size={self.ffn_size}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, "
                f"renormalize={self.renormalize}, jitter_noise={self.jitter_noise}, "
                f"float32_weights={self.float32_weights}")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., D] in ``hidden``'s dtype; records ``last_router_logits`` [N, E]
        and ``last_experts`` [N, K]."""
        if hidden.ndim < 1 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"SparseMoE: hidden: expected [..., D = {self.hidden_size}], got "
                             f"shape {tuple(hidden.shape)}")
        shape = hidden.shape
        x = hidden
        if self.training and self.jitter_noise > 0:        # as Mixtral: before the reshape
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise,
                                                 1.0 + self.jitter_noise)
        x = x.reshape(-1, self.hidden_size)                                   # [N, D]
        logits = self.gate(x)                                                 # [N, E]
        weights, experts = topk_route(
            logits, self.top_k, renormalize=self.renormalize,
            weights_dtype=torch.float32 if self.float32_weights else None)   # [N, K] each
        self.last_router_logits, self.last_experts = logits, experts
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        if weights.dtype not in (dtype, torch.float32):
            weights = weights.to(dtype)
        with torch.autocast(kind, enabled=False):     # the op keeps its own precision
            y = moe_ffn(x.to(dtype), weights, experts, self.experts.gate_up_proj.to(dtype),
                        self.experts.down_proj.to(dtype))
        return y.to(hidden.dtype).reshape(shape)

    # ---- the auxiliary losses of the last forward ------------------------------------------

    def _last(self, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.last_router_logits is None:
            raise ValueError(f"SparseMoE.{fn}: no forward has run yet; it reads the router "
                             f"logits of the last forward")
        return self.last_router_logits, self.last_experts

    def load_balancing_loss(self, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """E·Σ_e f_e·P_e of the last forward (``kernelrl.ops.load_balancing_loss``: f_e the
        fraction of the routed slots that went to expert e, P_e its mean router
        probability; 1 at perfect balance; transformers' one-layer value is K times it).
        mask: None or N elements (e.g. the attention mask [B, T]), nonzero = the token
        counts. 0-d float32, with gradients to the router."""
        logits, experts = self._last("load_balancing_loss")
        return load_balancing_loss(logits, experts, mask)

    def z_loss(self, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The ST-MoE router z-loss of the last forward: mean over the kept tokens of
        logsumexp(logits[n])² (``kernelrl.ops.router_z_loss``). 0-d float32."""
        logits, _ = self._last("z_loss")
        return router_z_loss(logits, mask)

    # ---- from a transformers block ---------------------------------------------------------

    @classmethod
    def from_hf(cls, block: nn.Module) -> "SparseMoE":
        """A SparseMoE computing what the transformers block ``block`` computes: a
        ``MixtralSparseMoeBlock`` or ``Qwen3MoeSparseMoeBlock`` in either layout.

        transformers 5 (stacked): ``block.gate.weight`` [E, D] and ``block.experts``'
        ``gate_up_proj`` [E, 2F, D], ``down_proj`` [E, D, F]. These parameters are taken
        over, not copied (the SparseMoE and the block then share them: no second copy of a
        large model's experts). transformers 4 (per expert): ``block.gate`` an
        ``nn.Linear(D, E)``, ``block.experts`` a list of E MLPs with ``w1`` (gate) [F, D],
        ``w3`` (up) [F, D], ``w2`` (down) [D, F] (Mixtral) or ``gate_proj``, ``up_proj``,
        ``down_proj`` (Qwen3-MoE): stacked into new parameters. Either way each keeps its
        ``requires_grad``, and ``gate`` / ``experts`` come in the block's order.

        K from ``top_k`` (on the block or its router) or the config's
        ``num_experts_per_tok``; renormalization: always for Mixtral, ``norm_topk_prob``
        (block, router or config) for Qwen3-MoE; jitter: Mixtral's ``jitter_noise`` (or
        ``router_jitter_noise``), none for Qwen3-MoE. Float32 routing weights: Mixtral in
        the stacked layout. Another block type, a layout other than these two, biases or
        an activation other than SiLU: ValueError naming the type.
        """
        kind = type(block).__name__
        if kind not in HF_BLOCK_TYPES:
            raise ValueError(f"block: expected one of {sorted(HF_BLOCK_TYPES)}, got {kind}")
        gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
        router = getattr(gate, "weight", None)
        if not isinstance(router, torch.Tensor) or router.ndim != 2:
            raise ValueError(f"block: {kind} has no router weight [E, D] at .gate.weight; "
                             f"not a transformers 4 or 5 layout")
        if getattr(gate, "bias", None) is not None:
            raise ValueError(f"block: {kind}'s router has a bias; SparseMoE's has none")
        if isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
            w_gate_up, w_down, acts, stacked = _stacked(kind, experts)
        elif isinstance(experts, (nn.ModuleList, list, tuple)) and len(experts) > 0:
            w_gate_up, w_down, acts = _per_expert(kind, experts)
            stacked = False
        else:
            raise ValueError(f"block: {kind}'s .experts is a {type(experts).__name__}; "
                             f"expected stacked gate_up_proj / down_proj (transformers 5) "
                             f"or a list of per-expert MLPs (transformers 4)")
        for act in acts:
            _check_silu(kind, act)
        E, D = router.shape
        F_ = w_down.shape[-1]
        if tuple(w_gate_up.shape) != (E, 2 * F_, D) or tuple(w_down.shape) != (E, D, F_):
            raise ValueError(f"block: {kind}'s weights do not fit together: router "
                             f"{tuple(router.shape)}, gate_up {tuple(w_gate_up.shape)}, "
                             f"down {tuple(w_down.shape)} (expected [E, D], [E, 2F, D], "
                             f"[E, D, F])")
        config = getattr(block, "config", None) or getattr(experts, "config", None)
        top_k = _first(kind, "top_k", (block, "top_k"), (gate, "top_k"),
                       (config, "num_experts_per_tok"))
        renormalize = HF_BLOCK_TYPES[kind]
        if renormalize is None:
            renormalize = _first(kind, "norm_topk_prob", (block, "norm_topk_prob"),
                                 (gate, "norm_topk_prob"), (config, "norm_topk_prob"))
        jitter = 0.0
        if kind == "MixtralSparseMoeBlock":
            jitter = _first(kind, "jitter_noise", (block, "jitter_noise"),
                            (config, "router_jitter_noise"), default=0.0)
        moe = cls(D, F_, E, int(top_k), renormalize=bool(renormalize),
                  jitter_noise=float(jitter or 0.0),
                  float32_weights=stacked and kind == "MixtralSparseMoeBlock",
                  dtype=router.dtype, device="meta")
        moe.gate.weight = router if isinstance(router, nn.Parameter) else nn.Parameter(
            router.detach(), requires_grad=router.requires_grad)
        moe.experts.gate_up_proj, moe.experts.down_proj = w_gate_up, w_down
        parts = {"gate": moe.gate, "experts": moe.experts}
        del moe.gate, moe.experts
        for name in [n for n in block._modules if n in parts] or list(parts):
            setattr(moe, name, parts[name])        # the block's order: its parameter order
        moe.train(block.training)
        return moe


def _first(kind: str, what: str, *places, default=...):
    """The first attribute found among (object, attribute name) ``places``."""
    for obj, name in places:
        value = getattr(obj, name, None) if obj is not None else None
        if value is not None:
            return value
    if default is not ...:
        return default
    raise ValueError(f"block: {kind} does not say its {what} (looked for "
                     f"{', '.join(name for _, name in places)} on the block, its router and "
                     f"its config)")


def _stacked(kind: str, experts: nn.Module):
    """transformers 5's fused experts: (gate_up, down, [act], True), the parameters as
    they are."""
    w_gate_up, w_down = experts.gate_up_proj, getattr(experts, "down_proj", None)
    if not isinstance(w_down, torch.Tensor) or w_gate_up.ndim != 3 or w_down.ndim != 3:
        raise ValueError(f"block: {kind}'s experts: expected gate_up_proj [E, 2F, D] and "
                         f"down_proj [E, D, F], got {tuple(w_gate_up.shape)} and "
                         f"{getattr(w_down, 'shape', None)}")
    for flag, ok in (("is_transposed", False), ("has_bias", False), ("is_concatenated", True),
                     ("has_gate", True)):
        if getattr(experts, flag, ok) != ok:
            raise ValueError(f"block: {kind}'s experts have {flag}={not ok}; SparseMoE takes "
                             f"the layout {flag}={ok} only")

    def param(t):
        return t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach(),
                                                                  requires_grad=t.requires_grad)
    return param(w_gate_up), param(w_down), [getattr(experts, "act_fn", None)], True


# transformers 4's per-expert MLPs: (gate, up, down) attribute names.
_PER_EXPERT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


def _per_expert(kind: str, experts):
    """transformers 4's per-expert MLPs stacked: (gate_up [E, 2F, D], down [E, D, F], the
    activations)."""
    first = experts[0]
    names = next((n for n in _PER_EXPERT_NAMES if all(hasattr(first, a) for a in n)), None)
    if names is None:
        raise ValueError(f"block: {kind}'s experts[0] is a {type(first).__name__} without "
                         f"w1/w3/w2 or gate_proj/up_proj/down_proj linears; not a "
                         f"transformers 4 layout")
    gate_up, down, acts, grads = [], [], [], set()
    for expert in experts:
        layers = [getattr(expert, a) for a in names]
        if any(getattr(layer, "bias", None) is not None for layer in layers):
            raise ValueError(f"block: {kind}'s experts have biases; SparseMoE's have none")
        g, u, d = (layer.weight for layer in layers)
        gate_up.append(torch.cat([g.detach(), u.detach()], dim=0))
        down.append(d.detach())
        acts.append(getattr(expert, "act_fn", None))
        grads.update(w.requires_grad for w in (g, u, d))
    requires_grad = any(grads)
    return (nn.Parameter(torch.stack(gate_up), requires_grad=requires_grad),
            nn.Parameter(torch.stack(down), requires_grad=requires_grad), acts)


def _check_silu(kind: str, act) -> None:
    """The experts' activation must compute SiLU (transformers' SiLUActivation, nn.SiLU)."""
    probe = torch.linspace(-6.0, 6.0, 13)
    try:
        ok = callable(act) and torch.allclose(act(probe), F.silu(probe), atol=1e-6)
    except Exception:          # noqa: BLE001 - anything that cannot run the probe is refused
        ok = False
    if not ok:
        raise ValueError(f"block: {kind}'s experts use the activation {act!r}; SparseMoE's "
                         f"experts are SwiGLU (silu)")
