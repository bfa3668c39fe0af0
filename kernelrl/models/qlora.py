"""QLoRA for a Hugging Face model: its linear layers replaced, by type, with 4-bit NF4 ones
(``kernelrl.nn.NF4Linear``), and LoRA adapters on top (``kernelrl.nn.NF4LoRALinear``).

Nothing is monkey-patched: the targeted ``nn.Linear`` modules are swapped for NF4 modules
in their parents, one layer at a time, so each full-precision weight can be freed as soon
as its layer is quantized (no second copy of the model, nor of any one weight beyond the
layer being quantized). The adapters are then added by ``apply_lora`` (NF4Linear is
registered with it as a LoRA base), so adapter names, switching, PEFT adapter files and the
trainers' four-roles-on-one-base setups work the same over a 4-bit base.

An adapter trained over NF4 layers is only right over the same 4-bit weights, so
``save_adapter`` also writes ``kernelrl_nf4.json`` (which layers were NF4, block size, double
quantization) into the PEFT folder, and ``load_adapter`` quantizes those layers of a
full-precision model the same way before loading it (quantization is deterministic: the
same 4-bit base comes back). PEFT ignores the file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from kernelrl.models.lora import (DEFAULT_TARGET_MODULES, _is_lora, _replace, _resolve_targets,
                                  apply_lora, register_lora_wrapper)
from kernelrl.nn.nf4_lora import NF4Linear, NF4LoRALinear

register_lora_wrapper(NF4Linear, NF4LoRALinear)

#: The record of an adapter's NF4 base, next to adapter_config.json.
NF4_RECORD = "kernelrl_nf4.json"


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
    _quantize_layers(model, [(n, m) for n, m in targets if isinstance(m, nn.Linear)],
                     blocksize, double_quant, progress)
    if r:
        apply_lora(model, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                   adapter_name=adapter_name, dtype=dtype)
    else:
        model.requires_grad_(False)
    return model


def _quantize_layers(model: nn.Module, layers: list[tuple[str, nn.Linear]], blocksize: int,
                     double_quant: bool, progress: bool) -> None:
    bar = None
    if progress and layers:
        from tqdm import tqdm
        bar = tqdm(total=len(layers), unit="layer", desc="nf4", file=sys.stderr, leave=False)
    for name, m in layers:
        _replace(model, name, NF4Linear.from_linear(m, blocksize=blocksize,
                                                    double_quant=double_quant))
        m.weight = None              # the full-precision weight goes now, not at the end
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()


def write_nf4_record(model: nn.Module, folder: str | os.PathLike) -> None:
    """Write ``kernelrl_nf4.json`` into an adapter folder when ``model`` has NF4 layers
    (their names, block size and double quantization); remove a stale one otherwise."""
    path = Path(folder) / NF4_RECORD
    mods = nf4_modules(model)
    if not mods:
        path.unlink(missing_ok=True)
        return
    names = [n.removesuffix(".base") for n, _ in mods]
    metas = {(m.qweight.blocksize, m.qweight.double_quant) for _, m in mods}
    if len(metas) > 1:
        raise ValueError(f"save_adapter: the NF4 layers mix block sizes / double "
                         f"quantization {sorted(metas)}; the record stores one setting")
    blocksize, double_quant = metas.pop()
    path.write_text(json.dumps({"modules": names, "blocksize": blocksize,
                                "double_quant": double_quant}, indent=2) + "\n")


def apply_nf4_record(model: nn.Module, folder: str | os.PathLike) -> bool:
    """Before an adapter is loaded from ``folder``: if it was trained over NF4 layers
    (``kernelrl_nf4.json``) and ``model`` has none, quantize those layers as recorded and
    return True. A model that already has NF4 layers is taken as it is."""
    path = Path(folder) / NF4_RECORD
    if not path.is_file() or nf4_modules(model):
        return False
    try:
        record = json.loads(path.read_text())
        names, blocksize = list(record["modules"]), int(record["blocksize"])
        double_quant = bool(record["double_quant"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a valid NF4 record ({exc})") from None
    layers = []
    for name in names:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: the model has no layer {name!r} to quantize") from None
        if _is_lora(m):
            raise ValueError(f"{path}: the model already has LoRA layers over full-precision "
                             f"weights; load this 4-bit adapter into a model without adapters")
        if not isinstance(m, nn.Linear):
            raise ValueError(f"{path}: {name!r} is a {type(m).__name__}, not nn.Linear")
        layers.append((name, m))
    _quantize_layers(model, layers, blocksize, double_quant, progress=False)
    return True


def from_bitsandbytes(model: nn.Module) -> list[str]:
    """Replace every bitsandbytes NF4 ``Linear4bit`` of ``model`` (a checkpoint loaded
    already quantized) by an ``NF4Linear`` holding the same bytes and scales, through the
    format both libraries share; returns the replaced names. Other 4-bit types (FP4) and
    weights that bitsandbytes has repacked for its CPU kernel are refused, naming the layer."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    from kernelrl.ops import NF4Weight

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    for name, m in found:
        state = m.weight.quant_state
        if state is None or state.quant_type != "nf4":
            raise ValueError(f"{name}: a bitsandbytes {getattr(state, 'quant_type', '?')} "
                             f"layer; kernelrl reads NF4 only")
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError(f"{name}: bitsandbytes has repacked this weight for its CPU "
                             f"kernel; load the checkpoint afresh before converting it")
        sd = {"weight": m.weight.data.reshape(-1)}
        sd.update({f"weight.{k}": v for k, v in state.as_dict(packed=True).items()})
        q = NF4Weight.from_state_dict(sd, "weight")
        if q.shape != (m.out_features, m.in_features):
            raise ValueError(f"{name}: quantized shape {tuple(q.shape)} is not "
                             f"[{m.out_features}, {m.in_features}]")
        _replace(model, name, NF4Linear(q, m.bias))
    return [n for n, _ in found]
