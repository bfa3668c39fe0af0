"""LoRA on a Hugging Face causal LM: module replacement by type, adapter switching, merging,
and save/load in the PEFT adapter-folder format.

Shapes: R LoRA rank, H_in / H_out a targeted linear's input and output width.

``apply_lora(model, r, alpha, ...)`` walks the model and replaces each targeted linear, on its
parent module (``setattr``), by a ``kernelrl.nn.LoRALinear`` that wraps it: no forward
function is patched. Targets are matched on the module's qualified name: an entry of
``target_modules`` matches a name equal to it or ending in ``"." + entry`` (so ``"q_proj"``
matches every layer's ``self_attn.q_proj`` and ``"layers.0.mlp.up_proj"`` just one); a single
string is a regular expression matched against the whole name; ``"all-linear"`` means every
linear except the output layer. The default targets the attention and MLP projections of
Llama / Qwen2 / Mistral; lm_head and the embeddings are never wrapped unless named. Every
parameter that is not a LoRA adapter is frozen; the new adapter's A [R, H_in] and B
[H_out, R] are trainable.

Several named adapters can sit on one base (e.g. ``policy``, ``reward`` and ``value`` for PPO):
call apply_lora again with another ``adapter_name``. One adapter is active at a time;
``set_adapter`` / ``use_adapter`` switch it by changing a name on each layer (no weight is
copied), ``disable_adapters`` runs the bare base. Adding an adapter never changes which one
is active, except that the first adapter on a model becomes active.

Folder format (the one PEFT writes and reads): ``adapter_model.safetensors`` holds
``base_model.model.<module name>.lora_A.weight`` [R, H_in] and ``....lora_B.weight``
[H_out, R] (no adapter name in the key), and ``adapter_config.json`` holds peft_type "LORA",
r, lora_alpha, lora_dropout, target_modules, rank_pattern / alpha_pattern (per-module r and
alpha that differ from the defaults, keys matched as regexes against the end of the module
name), use_rslora and the fields PEFT needs to rebuild the model. PEFT features that change
the math (DoRA, LoRA bias, modules_to_save, ...) are rejected on load with an error naming
the field.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from kernelrl.nn.lora import LoRAAdapters, LoRALinear, check_adapter_name, \
    check_lora_hyperparameters

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj",
                          "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"
PEFT_PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"

# base module type → factory wrapping it in a LoRA layer (a module with ``.lora`` and
# ``.add_adapter``). Looked up along the base type's MRO.
_WRAPPERS: dict[type, Callable[[nn.Module], nn.Module]] = {nn.Linear: LoRALinear}


def register_lora_wrapper(base_type: type, wrapper: Callable[[nn.Module], nn.Module]) -> None:
    """Let apply_lora wrap modules of ``base_type`` with ``wrapper(module)`` (e.g. a 4-bit
    linear with a LoRA layer that composes ``LoRAAdapters``)."""
    if not (isinstance(base_type, type) and issubclass(base_type, nn.Module)):
        raise ValueError(f"base_type: expected an nn.Module subclass, got {base_type!r}")
    if not callable(wrapper):
        raise ValueError(f"wrapper: expected a callable, got {type(wrapper).__name__}")
    _WRAPPERS[base_type] = wrapper


def _is_lora(module: nn.Module) -> bool:
    return isinstance(getattr(module, "lora", None), LoRAAdapters)


def _wrapper_for(module: nn.Module):
    for cls in type(module).__mro__:
        if cls in _WRAPPERS:
            return _WRAPPERS[cls]
    return None


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) for every submodule, not descending into LoRA layers (their
    ``base`` is not a target of its own); a module shared by two parents is listed once."""
    seen = {id(model)}

    def rec(module: nn.Module, prefix: str):
        for child_name, child in module.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            full = f"{prefix}.{child_name}" if prefix else child_name
            yield full, child
            if not _is_lora(child):
                yield from rec(child, full)

    yield from rec(model, "")


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The LoRA layers of ``model`` as (qualified name, module), in module order."""
    return [(n, m) for n, m in _walk(model) if _is_lora(m)]


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name present on some layer, in order of first appearance."""
    return list(dict.fromkeys(n for _, m in lora_modules(model) for n in m.lora.names))


def _require_lora(model: nn.Module, fn: str) -> list[tuple[str, nn.Module]]:
    mods = lora_modules(model)
    if not mods:
        raise ValueError(f"model: expected a model with LoRA layers for {fn}, found none "
                         "(call apply_lora or load_adapter first)")
    return mods


def _require_adapter(model: nn.Module, name, fn: str) -> list[tuple[str, nn.Module]]:
    mods = _require_lora(model, fn)
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"adapter_name: expected one of the model's adapters {names}, "
                         f"got {name!r}")
    return mods


def active_adapter(model: nn.Module) -> str | None:
    """The model's active adapter name (None: none active, or no LoRA layers)."""
    actives = {m.lora.active for _, m in lora_modules(model)}
    if len(actives) > 1:
        raise ValueError(f"model: its LoRA layers disagree on the active adapter "
                         f"({sorted(map(str, actives))}); call set_adapter(model, name)")
    return actives.pop() if actives else None


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make ``name`` the active adapter of every LoRA layer (None: no adapter active).

    Layers without that adapter add nothing while it is active. Copies no weights.
    """
    mods = _require_lora(model, "set_adapter")
    if name is not None:
        _require_adapter(model, name, "set_adapter")
    for _, m in mods:
        m.lora.set_active(name, missing_ok=True)


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """Context manager: adapter ``name`` active (and adapters enabled) inside; every layer's
    previous state comes back on exit, also on an exception."""
    mods = _require_adapter(model, name, "use_adapter")
    saved = [(m.lora, m.lora.active, m.lora.enabled) for _, m in mods]
    try:
        for lora, _, _ in saved:
            lora.active, lora.enabled = name, True
        yield model
    finally:
        for lora, active, enabled in saved:
            lora.active, lora.enabled = active, enabled


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: the bare base model inside (e.g. the PPO/DPO reference); the previous
    state comes back on exit, also on an exception."""
    mods = _require_lora(model, "disable_adapters")
    saved = [(m.lora, m.lora.enabled) for _, m in mods]
    try:
        for lora, _ in saved:
            lora.enabled = False
        yield model
    finally:
        for lora, enabled in saved:
            lora.enabled = enabled


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer (the layers stay wrapped)."""
    for _, m in _require_adapter(model, name, "delete_adapter"):
        if name in m.lora:
            m.lora.remove(name)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def merge_lora(model: nn.Module, adapter_name: str | None = None, *,
               unload: bool = False) -> nn.Module:
    """Fold an adapter (default: the active one) into the base weights, rounding once into
    the base dtype, and delete it, so it is not applied twice. Refused (before anything is
    changed) where a layer holds another adapter. ``unload=True`` then puts the plain base
    linears back in place of the emptied LoRA layers. Returns ``model``."""
    mods = _require_lora(model, "merge_lora")
    name = adapter_name if adapter_name is not None else active_adapter(model)
    if name is None:
        raise ValueError(f"adapter_name: expected an adapter to merge, got None and none is "
                         f"active (adapters: {adapter_names(model)})")
    _require_adapter(model, name, "merge_lora")
    for mod_name, m in mods:
        others = [n for n in m.lora.names if n != name]
        if others:
            raise ValueError(f"adapter_name: merging {name!r} would change the base of "
                             f"{mod_name} under the other adapters {others}; delete them "
                             "first (delete_adapter) or merge a copy of the model")
    for mod_name, m in mods:
        if name in m.lora:
            merged = m.merge(name)       # NF4 layers return a new 16-bit nn.Linear
            if isinstance(merged, nn.Module):
                _replace(model, mod_name, merged)
    if unload:
        for mod_name, m in mods:
            if not m.lora.names:
                _replace(model, mod_name, m.base)
    return model


def trainable_parameters(model: nn.Module, adapter_name: str | None = None) -> list[nn.Parameter]:
    """The parameters with requires_grad; with ``adapter_name``, only that adapter's A and B
    (e.g. one optimizer per PPO adapter)."""
    if adapter_name is None:
        return [p for p in model.parameters() if p.requires_grad]
    mods = _require_adapter(model, adapter_name, "trainable_parameters")
    return [p for _, m in mods if adapter_name in m.lora
            for p in (m.lora.A[adapter_name], m.lora.B[adapter_name]) if p.requires_grad]


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (each shared parameter counted once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---- target resolution and installation -----------------------------------------------------

def _check_target_modules(target_modules, arg: str = "target_modules"):
    if isinstance(target_modules, str):
        if target_modules != ALL_LINEAR:
            try:
                re.compile(target_modules)
            except re.error as e:
                raise ValueError(f"{arg}: expected a list of module names or a regular "
                                 f"expression, got the invalid regex {target_modules!r} "
                                 f"({e})") from None
        return target_modules
    if isinstance(target_modules, (set, frozenset)):
        target_modules = sorted(target_modules)
    if (not isinstance(target_modules, (list, tuple)) or not target_modules
            or not all(isinstance(t, str) and t for t in target_modules)):
        raise ValueError(f"{arg}: expected a non-empty list of module names, a regex string or "
                         f"{ALL_LINEAR!r}, got {target_modules!r}")
    return tuple(target_modules)


def _name_matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _resolve_targets(model: nn.Module, target_modules, exclude_modules=None,
                     arg: str = "target_modules") -> list[tuple[str, nn.Module]]:
    """The modules that target_modules selects: existing LoRA layers or wrappable bases."""
    targets = _check_target_modules(target_modules, arg)
    out_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen, bad = [], []
    for name, m in _walk(model):
        if exclude_modules and _name_matches(name, exclude_modules):
            continue
        wrappable = _is_lora(m) or _wrapper_for(m) is not None
        if targets == ALL_LINEAR:
            base = m.base if _is_lora(m) else m
            if wrappable and base is not out_layer and name.rpartition(".")[2] != "lm_head":
                chosen.append((name, m))
        elif _name_matches(name, targets):
            (chosen if wrappable else bad).append((name, m))
    if bad:
        kinds = ", ".join(f"{n} ({type(m).__name__})" for n, m in bad[:4])
        raise ValueError(f"{arg}: expected names of linear layers "
                         f"({', '.join(t.__name__ for t in _WRAPPERS)}), got "
                         f"{target_modules!r} which also matches {kinds}")
    if not chosen:
        examples = sorted({n.rpartition(".")[2] for n, m in _walk(model)
                           if _is_lora(m) or _wrapper_for(m) is not None})
        raise ValueError(f"{arg}: expected names matching some linear layers of the model "
                         f"(their last name components: {examples[:12]}), got "
                         f"{target_modules!r} which matches none")
    return chosen


def _install(model: nn.Module, plan: list[tuple[str, nn.Module, int, float]],
             adapter_name: str, dropout: float, use_rslora: bool, dtype: torch.dtype,
             trainable: bool) -> dict[str, nn.Module]:
    """Wrap and add ``adapter_name`` to every planned module (checked first, then changed)."""
    for name, m, _, _ in plan:
        if _is_lora(m) and adapter_name in m.lora:
            raise ValueError(f"adapter_name: adapter {adapter_name!r} already exists on "
                             f"{name}; pick another name or delete_adapter it first")
    existing = lora_modules(model)
    if existing:
        previous_active = active_adapter(model)
        previous_enabled = all(m.lora.enabled for _, m in existing)
    else:
        previous_active, previous_enabled = adapter_name, True
    installed = {}
    for name, m, r, alpha in plan:
        if not _is_lora(m):
            m = _wrapper_for(m)(m)
            _replace(model, name, m)
        m.add_adapter(adapter_name, r, alpha, dropout, use_rslora=use_rslora, dtype=dtype)
        installed[name] = m
    adapter_ids = {id(p) for _, m in lora_modules(model) for p in m.lora.parameters()}
    for p in model.parameters():
        if id(p) not in adapter_ids:
            p.requires_grad_(False)
    for m in installed.values():
        m.lora.A[adapter_name].requires_grad_(trainable)
        m.lora.B[adapter_name].requires_grad_(trainable)
    for _, m in lora_modules(model):
        m.lora.set_active(previous_active, missing_ok=True)
        m.lora.enabled = previous_enabled
    return installed


def apply_lora(model: nn.Module, r: int = 16, alpha: float = 16, dropout: float = 0.0,
               target_modules: Sequence[str] | str = DEFAULT_TARGET_MODULES,
               adapter_name: str = "default", *, use_rslora: bool = False,
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """Add LoRA adapter ``adapter_name`` (rank r, scaling alpha/r) to the targeted linears of
    ``model`` in place, wrapping each in a LoRALinear (or adding to the existing one), and
    freeze everything but the adapters. Adapters are float32 by default over any base dtype.
    Returns ``model``."""
    check_adapter_name(adapter_name)
    r, alpha, dropout = check_lora_hyperparameters(r, alpha, dropout)
    targets = _resolve_targets(model, target_modules)
    _install(model, [(n, m, r, alpha) for n, m in targets], adapter_name, dropout,
             use_rslora, dtype, trainable=True)
    return model


def copy_adapter(model: nn.Module, src: str, dst: str, trainable: bool = True) -> nn.Module:
    """Add adapter ``dst`` to every layer that holds adapter ``src``, with its rank, alpha,
    dropout, rsLoRA setting and dtype, and a copy of its weights (e.g. a PPO value adapter
    started from the reward adapter, without reading it from disk again). Added as
    ``load_adapter`` adds one (initialised as new, drawing from the global RNG, then
    overwritten), trainable unless ``trainable=False``; the active adapter does not
    change. Returns ``model``."""
    check_adapter_name(dst)
    mods = [(n, m) for n, m in _require_adapter(model, src, "copy_adapter") if src in m.lora]
    kinds = {(m.lora.dropout_p(src), m.lora.rslora[src], m.lora.A[src].dtype) for _, m in mods}
    if len(kinds) > 1:
        raise ValueError(f"src: adapter {src!r} has a different dropout, rsLoRA setting or "
                         f"dtype on different layers; copy_adapter needs one of each")
    (dropout, use_rslora, dtype), = kinds
    installed = _install(model, [(n, m, m.lora.r[src], m.lora.alpha[src]) for n, m in mods],
                         dst, dropout, use_rslora, dtype, trainable)
    with torch.no_grad():
        for m in installed.values():
            m.lora.A[dst].copy_(m.lora.A[src])
            m.lora.B[dst].copy_(m.lora.B[src])
    return model


# ---- PEFT folder format ----------------------------------------------------------------------

def _plain_number(x: float):
    return int(x) if float(x).is_integer() else x


def save_adapter(model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default",
                 base_model_name_or_path: str | None = None, *,
                 task_type: str = "CAUSAL_LM") -> Path:
    """Write adapter ``adapter_name`` as a PEFT LoRA folder (adapter_model.safetensors +
    adapter_config.json) that ``peft.PeftModel.from_pretrained(base, folder)`` loads.
    ``base_model_name_or_path`` defaults to the model config's name_or_path. Returns the
    folder."""
    from safetensors.torch import save_file

    mods = [(n, m) for n, m in _require_adapter(model, adapter_name, "save_adapter")
            if adapter_name in m.lora]
    drops = {m.lora.dropout_p(adapter_name) for _, m in mods}
    rs_flags = {m.lora.rslora[adapter_name] for _, m in mods}
    if len(drops) > 1 or len(rs_flags) > 1:
        raise ValueError(f"adapter_name: adapter {adapter_name!r} has different dropout "
                         f"{sorted(drops)} or use_rslora {sorted(rs_flags)} across layers; the "
                         "PEFT format stores one value")
    ranks = {n: m.lora.r[adapter_name] for n, m in mods}
    alphas = {n: m.lora.alpha[adapter_name] for n, m in mods}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]

    adapted = set(ranks)
    short = sorted({n.rpartition(".")[2] for n in adapted})
    covered = {n for n, m in _walk(model) if (_is_lora(m) or _wrapper_for(m) is not None)
               and n.rpartition(".")[2] in short}
    target_modules = short if covered == adapted else sorted(adapted)

    tensors = {}
    for n, m in mods:
        tensors[f"{PEFT_PREFIX}{n}.lora_A.weight"] = m.lora.A[adapter_name].detach().cpu() \
            .contiguous()
        tensors[f"{PEFT_PREFIX}{n}.lora_B.weight"] = m.lora.B[adapter_name].detach().cpu() \
            .contiguous()
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path",
                                          None) or None
    config = {
        "peft_type": "LORA", "task_type": task_type,
        "r": r, "lora_alpha": _plain_number(alpha), "lora_dropout": drops.pop(),
        "target_modules": target_modules, "exclude_modules": None,
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: _plain_number(v) for n, v in alphas.items() if v != alpha},
        "use_rslora": rs_flags.pop(), "use_dora": False, "lora_bias": False,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "layer_replication": None, "target_parameters": None,
        "trainable_token_indices": None, "megatron_config": None,
        "megatron_core": "megatron.core", "loftq_config": {},
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "inference_mode": True, "auto_mapping": None,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    with open(folder / CONFIG_NAME, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    from kernelrl.models.qlora import write_nf4_record      # (qlora imports this module)
    write_nf4_record(model, folder)
    return folder


# adapter_config.json fields whose PEFT features kernelrl does not implement: (field, is-set).
_UNSUPPORTED = (
    ("use_dora", bool), ("lora_bias", bool), ("use_qalora", bool),
    ("fan_in_fan_out", bool), ("modules_to_save", bool), ("layers_to_transform",
                                                           lambda v: v is not None and v != []),
    ("layer_replication", bool), ("target_parameters", bool),
    ("trainable_token_indices", bool), ("alora_invocation_tokens", bool),
    ("use_bdlora", bool),
)


def _pattern_value(pattern: dict, name: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_config(path: Path) -> dict:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: expected a JSON adapter config, could not parse it ({e})") \
            from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        got = cfg.get("peft_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise ValueError(f"{path}: expected peft_type 'LORA', got {got!r}")
    for key, is_set in _UNSUPPORTED:
        if is_set(cfg.get(key)):
            raise ValueError(f"{path}: {key}={cfg[key]!r} is a PEFT feature kernelrl does not "
                             "implement; expected it unset")
    if cfg.get("bias", "none") not in (None, "none"):
        raise ValueError(f"{path}: bias={cfg['bias']!r} is not supported; expected 'none'")
    if cfg.get("target_modules") is None:
        raise ValueError(f"{path}: expected target_modules (a list or regex), got None")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise ValueError(f"{path}: missing field {key!r}")
    return cfg


def _read_weights(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    path = folder / WEIGHTS_NAME
    if path.is_file():
        from safetensors.torch import load_file
        return path, load_file(str(path))
    path = folder / WEIGHTS_NAME_BIN
    if path.is_file():
        return path, torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"folder: expected {folder / WEIGHTS_NAME} (or {WEIGHTS_NAME_BIN}) "
                            "in the adapter folder, found neither")


def load_adapter(model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default", *,
                 trainable: bool = True, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a PEFT LoRA folder (written by PEFT or by save_adapter) into ``model`` as adapter
    ``adapter_name``, wrapping the config's target modules where they are not LoRA layers yet.

    An adapter trained over 4-bit NF4 layers (its folder has ``kernelrl_nf4.json``) gets
    those layers of ``model`` quantized the same way, after the checks and before the
    adapter goes in (``kernelrl.models.qlora``).
    Every key and shape is checked before the model is touched; a missing, unexpected or
    mis-shaped tensor raises ValueError naming the file and the key. The adapter is stored in
    ``dtype`` (float32 by default) and is trainable unless ``trainable=False``. Like
    apply_lora, it becomes active only if the model had no adapter yet. Returns ``model``.
    """
    check_adapter_name(adapter_name)
    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"folder: expected {cfg_path} (a PEFT adapter folder), "
                                "not found")
    cfg = _read_config(cfg_path)
    weights_path, state = _read_weights(folder)
    r0, alpha0, dropout = check_lora_hyperparameters(
        cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0) or 0.0)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}

    by_module: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in state.items():
        rest = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        mod, _, leaf = rest.rpartition(".lora_")
        if leaf not in ("A.weight", "B.weight") or not mod:
            raise ValueError(f"{weights_path}: unexpected key {key!r}; expected only "
                             f"'{PEFT_PREFIX}<module>.lora_A.weight' / '.lora_B.weight'")
        by_module.setdefault(mod, {})[leaf[0]] = (key, t)

    targets = dict(_resolve_targets(model, cfg["target_modules"], cfg.get("exclude_modules"),
                                    arg=f"{cfg_path}: target_modules"))
    names = dict(_walk(model))
    for mod in by_module:
        if mod not in targets:
            why = ("is not a target module of the model" if mod in names
                   else "names no module of the model")
            key = next(iter(by_module[mod].values()))[0]
            raise ValueError(f"{weights_path}: key {key!r} {why} (target_modules="
                             f"{cfg['target_modules']!r} in {cfg_path})")

    plan = []
    for name, m in targets.items():
        r = _pattern_value(rank_pattern, name, r0)
        alpha = _pattern_value(alpha_pattern, name, alpha0)
        h_in, h_out = m.in_features, m.out_features
        for leaf, shape in (("A", (r, h_in)), ("B", (h_out, r))):
            key = f"{PEFT_PREFIX}{name}.lora_{leaf}.weight"
            if leaf not in by_module.get(name, {}):
                raise ValueError(f"{weights_path}: missing key {key!r} (module {name} is a "
                                 f"target of {cfg_path})")
            got_key, t = by_module[name][leaf]
            if tuple(t.shape) != shape or not t.dtype.is_floating_point:
                raise ValueError(f"{weights_path}: key {got_key!r}: expected a floating tensor "
                                 f"of shape {shape} (r={r}, {name} is {h_in}→{h_out}), got "
                                 f"{t.dtype} {tuple(t.shape)}")
        plan.append((name, m, r, alpha))

    from kernelrl.models.qlora import apply_nf4_record      # (qlora imports this module)
    if apply_nf4_record(model, folder):                     # the planned layers are now NF4
        plan = [(name, model.get_submodule(name), r, alpha) for name, _, r, alpha in plan]
    installed = _install(model, plan, adapter_name, dropout, bool(cfg.get("use_rslora")),
                         dtype, trainable)
    with torch.no_grad():
        for name, m in installed.items():
            m.lora.A[adapter_name].copy_(by_module[name]["A"][1])
            m.lora.B[adapter_name].copy_(by_module[name]["B"][1])
    return model
