"""QLoRA for a Hugging Face model: its linear layers replaced, by type, with 4-bit NF4 ones
(``kernelrl.nn.NF4Linear``), and LoRA adapters on top (``kernelrl.nn.NF4LoRALinear``).

Nothing is monkey-patched: the targeted ``nn.Linear`` modules are swapped for NF4 modules
in their parents, one layer at a time, so each full-precision weight can be freed as soon
as its layer is quantized (no second copy of the model, nor of any one weight beyond the
layer being quantized). The adapters are then added by ``apply_lora`` (NF4Linear is
registered with it as a LoRA base), so adapter names, switching, PEFT adapter files and the
trainers' four-roles-on-one-base setups work the same over a 4-bit base.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch
from torch import nn

from kernelrl.models.lora import (DEFAULT_TARGET_MODULES, _is_lora, _replace, _resolve_targets,
                                  apply_lora, register_lora_wrapper)
from kernelrl.nn.nf4_lora import NF4Linear, NF4LoRALinear

register_lora_wrapper(NF4Linear, NF4LoRALinear)


def nf4_modules(model: nn.Module) -> list[tuple[str, NF4Linear]]:
    """The NF4 linear layers of ``model`` (bare or under LoRA) as (name, NF4Linear)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]


def quantize_model(model: nn.Module, r: int = 16, alpha: float = 16, dropout: float = 0.0,
                   target_modules: Sequence[str] | str = DEFAULT_TARGET_MODULES, *,
                   blocksize: int = 64, double_quant: bool = True,
                   adapter_name: str = "default", dtype: torch.dtype = torch.float32,
                   progress: bool = False) -> nn.Module:
    """Quantize ``model``'s targeted linear layers to NF4 in place and, with r > 0, add LoRA
    adapter ``adapter_name`` (rank r, scaling alpha/r, float32 by default) to them.

    ``target_modules`` selects layers as ``apply_lora`` does (last name components, or
    ``"all-linear"``: every linear but the output head). Layers already NF4 are kept; layers
    that already carry LoRA adapters are refused (quantize first, then add adapters). Every
    parameter but the new adapters ends frozen. ``progress`` shows a bar over the layers on
    stderr. Returns ``model``."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r: expected an int >= 0 (0: quantize only), got {r!r}")
    targets = _resolve_targets(model, target_modules)
    for name, m in targets:
        if _is_lora(m):
            raise ValueError(f"{name} already has LoRA adapters ({', '.join(m.lora.names)}): "
                             "quantize_model before apply_lora, not after")
    todo = [(n, m) for n, m in targets if isinstance(m, nn.Linear)]
    bar = None
    if progress and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), unit="layer", desc="nf4", file=sys.stderr, leave=False)
    for name, m in todo:
        _replace(model, name, NF4Linear.from_linear(m, blocksize=blocksize,
                                                    double_quant=double_quant))
        m.weight = None              # the full-precision weight goes now, not at the end
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    if r:
        apply_lora(model, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                   adapter_name=adapter_name, dtype=dtype)
    else:
        model.requires_grad_(False)
    return model
