"""Mixture-of-experts Hugging Face models on kernelrl's MoE kernels: their sparse blocks
replaced, by type, with ``kernelrl.nn.SparseMoE``, and the router's auxiliary loss.

Shapes: B batch, T time, N tokens (B·T), E experts, K top-k, L MoE layers.

``patch_moe(model)`` walks the model and replaces every ``MixtralSparseMoeBlock`` and
``Qwen3MoeSparseMoeBlock`` (transformers 4's per-expert or 5's stacked layout), on its
parent module (``setattr``), by ``SparseMoE.from_hf(block)``: no forward function is
patched, and the new modules' parameters keep transformers 5's names (and, in the stacked
layout, are the very same tensors), so state dicts, ``save_pretrained`` and checkpoints
are unchanged. A module that looks like an MoE block (it has ``.gate`` and ``.experts``)
but is of another class (Qwen2-MoE with its shared expert, DeepSeek, OLMoE, ...) is not
guessed at: ValueError naming it. Dense models are left alone.

The router's auxiliary loss (``router_aux_loss``) is what transformers' Mixtral and
Qwen3-MoE causal LMs add to their loss with ``output_router_logits=True``:

    loss = lm_loss + router_aux_loss_coef · aux
    aux  = E · Σ_e f̄_e · P̄_e        over the L MoE layers' last forward, pooled:
    f̄_e  = #{(l, n, j): expert[l, n, j] = e} / (L·T)    (Σ_e f̄_e = K; T kept tokens)
    P̄_e  = Σ_{l, n} p[l, n, e] / (L·T)

i.e. ``load_balancing_loss_func(router_logits, E, K, attention_mask)`` (it is K at perfect
balance, and not the mean of the per-layer losses: a product of pooled means). Computed as
K · ``kernelrl.ops.load_balancing_loss`` of the layers' logits and experts concatenated, the
mask repeated L times. So a trainer's ``--router-aux-coef`` means what the config's
``router_aux_loss_coef`` means to transformers.

transformers' own aux loss does not see a patched model: its ``output_router_logits``
records the outputs of its router classes (forward hooks on ``MixtralTopKRouter``, ...),
which are gone, so a patched causal LM called with ``output_router_logits=True`` returns no
router logits and its loss computation fails. kernelrl never asks for them (it calls the
decoder); use ``router_aux_loss`` instead.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kernelrl.models.lora import _replace
from kernelrl.nn.moe import HF_BLOCK_TYPES, SparseMoE
from kernelrl.ops import load_balancing_loss

__all__ = ["patch_moe", "moe_modules", "hf_moe_blocks", "router_aux_loss",
           "config_router_aux_coef", "looks_like_moe"]


def looks_like_moe(module: nn.Module) -> bool:
    """Whether ``module`` has the shape of a sparse MoE block: ``.gate`` and ``.experts``."""
    return hasattr(module, "gate") and hasattr(module, "experts")


def hf_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every MoE block of ``model`` not (yet) a SparseMoE: the known
    transformers classes and any module with ``.gate`` and ``.experts``; not descending
    into them (a module shared by two parents listed once). What ``patch_moe`` replaces,
    or refuses."""
    found, seen = [], {id(model)}

    def rec(module: nn.Module, prefix: str):
        for child_name, child in module.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            full = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, SparseMoE):
                continue
            if type(child).__name__ in HF_BLOCK_TYPES or looks_like_moe(child):
                found.append((full, child))
                continue
            rec(child, full)

    rec(model, "")
    return found


def patch_moe(model: nn.Module) -> list[tuple[str, str]]:
    """Replace, in place, every known sparse MoE block of ``model`` by a ``SparseMoE``
    computing the same (module docstring). Returns [(qualified name, original class
    name)] of the replaced modules, in module order; [] for a model without MoE blocks
    (and for one already patched). Every block is converted before any is replaced, so an
    error leaves the model as it was: ValueError naming the module for an unknown class
    with ``.gate`` and ``.experts``, or for a known one whose layout ``SparseMoE.from_hf``
    cannot read."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    blocks = hf_moe_blocks(model)
    unknown = [(n, m) for n, m in blocks if type(m).__name__ not in HF_BLOCK_TYPES]
    if unknown:
        kinds = ", ".join(f"{n} ({type(m).__name__})" for n, m in unknown[:4])
        raise ValueError(f"model: {kinds} look like mixture-of-experts blocks (.gate and "
                         f".experts) of a kind kernelrl's SparseMoE does not implement "
                         f"(known: {', '.join(sorted(HF_BLOCK_TYPES))})")
    replacements = []
    for name, block in blocks:
        try:
            replacements.append((name, type(block).__name__, SparseMoE.from_hf(block)))
        except ValueError as exc:
            raise ValueError(f"model: {name}: {exc}") from None
    for name, _, moe in replacements:
        _replace(model, name, moe)
    return [(name, kind) for name, kind, _ in replacements]


def moe_modules(model: nn.Module) -> list[tuple[str, SparseMoE]]:
    """The SparseMoE layers of ``model`` as (qualified name, module), in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseMoE)]


def router_aux_loss(model: nn.Module, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """transformers' pooled load-balancing loss over ``model``'s SparseMoE layers, of
    their last forward (module docstring): K · load_balancing_loss(cat_l logits_l,
    cat_l experts_l, mask repeated L times). mask: None or the forward's attention mask
    (B·T elements; nonzero = a real token). 0-d float32 with gradients to the routers.
    ValueError without SparseMoE layers, before their first forward, or for layers that
    disagree on E or K."""
    layers = [m for _, m in moe_modules(model)]
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no SparseMoE layers "
                         f"(kernelrl.models.patch_moe replaces a model's MoE blocks)")
    if any(m.last_router_logits is None for m in layers):
        raise ValueError("router_aux_loss: a SparseMoE layer has not run a forward yet; it "
                         "reads the router logits of the last forward")
    shapes = {(m.num_experts, m.top_k) for m in layers}
    if len(shapes) > 1:
        raise ValueError(f"router_aux_loss: the layers disagree on (E, K): {sorted(shapes)}; "
                         f"the pooled loss needs one expert count and top-k")
    logits = torch.cat([m.last_router_logits for m in layers])                  # [L·N, E]
    experts = torch.cat([m.last_experts for m in layers])                       # [L·N, K]
    if mask is not None:
        tokens = layers[0].last_router_logits.shape[0]
        if mask.numel() != tokens:
            raise ValueError(f"router_aux_loss: mask: expected the last forward's N = "
                             f"{tokens} tokens (B·T), got shape {tuple(mask.shape)}")
        mask = mask.reshape(-1).repeat(len(layers))                             # [L·N]
    return layers[0].top_k * load_balancing_loss(logits, experts, mask)


def config_router_aux_coef(model: nn.Module) -> float:
    """The ``router_aux_loss_coef`` of the first config found on ``model`` or a
    submodule (a reward model's decoder, ...); 0.0 for a model whose config has none."""
    for module in model.modules():
        value = getattr(getattr(module, "config", None), "router_aux_loss_coef", None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.0
