"""Crash-safe, pickle-free checkpoints for kernelrl's trainers.

A run folder holds its checkpoints as ``<run>/checkpoints/step-<N>/``; each one has

    model.safetensors          the trainable state the caller passes (full weights or adapters)
    optimizer.json/.safetensors  the optimizer's ``state_dict()``: tensors in the safetensors
                               file under flattened keys, structure and numbers in the JSON
    scheduler.json             the LR scheduler's ``state_dict()``
    rng.json/.safetensors      Python ``random``, numpy, torch CPU (and CUDA) generator states
    trainer_state.json         the step, the data iterator's position and any other JSON-able
                               state the trainer passes (``extra``), written last

Why no pickle: a checkpoint is data that may be shared, and unpickling runs code. Tensors go
to safetensors, everything else to JSON. 0-d tensors (AdamW's per-parameter ``step``) are
stored in the JSON as numbers with their dtype, which is exact for every real dtype, so an
optimizer state round-trips bitwise.

Why it is crash safe: a checkpoint is written into a hidden temporary folder beside its
final place, every file and the folder are fsynced, and one ``os.rename`` makes it
appear complete. Then ``checkpoints/latest.json`` (written to a temporary file and renamed
over the old one) names it, and only then are old checkpoints beyond ``keep`` removed.
A save interrupted at any point leaves the previous checkpoint and the marker as they
were; ``find_latest`` also falls back to scanning the folders if the marker is missing.
One process (rank 0) writes a run's checkpoints.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT = "kernelrl-checkpoint"
VERSION = 1
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_SCRATCH_PREFIXES = (".tmp-", ".old-")

# 0-d tensors of these dtypes are stored in the JSON as numbers (exact: Python floats
# are doubles, Python ints are unbounded).
_SCALAR_DTYPES = {
    str(dt).removeprefix("torch."): dt
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8,
               torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)
}


class CheckpointError(Exception):
    """A checkpoint or run folder that cannot be used as asked; the message says why."""


@dataclass
class Checkpoint:
    """The pieces of one saved checkpoint, as plain Python objects and CPU tensors.

    ``optimizer`` and ``scheduler`` are ready for ``load_state_dict``; ``rng`` for
    ``restore_rng_state``; ``data`` and ``extra`` are what the trainer passed.
    A piece that was not saved is None (``extra`` is then ``{}``).
    """

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict | None = None
    scheduler: dict | None = None
    rng: dict | None = None
    data: Any = None
    extra: dict = field(default_factory=dict)
    saved_at: str | None = None


# ----------------------------------------------------------------------------------------
# JSON <-> Python trees. Tensors leave the tree for a safetensors file and are referenced
# by key; tuples and non-string dict keys (optimizer state is keyed by int) are tagged so
# that they come back as they were.


def _encode(obj: Any, path: list[str], tensors: dict[str, torch.Tensor], piece: str) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        name = str(t.dtype).removeprefix("torch.")
        if t.dim() == 0 and name in _SCALAR_DTYPES:
            return {"__scalar__": t.item(), "dtype": name}
        key = ".".join(path) or "tensor"
        while key in tensors:
            key += "_"
        tensors[key] = t
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, path + [str(i)], tensors, piece)
                              for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, path + [str(i)], tensors, piece) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        plain = all(isinstance(k, str) and not k.startswith("__") for k in obj)
        if plain:
            return {k: _encode(v, path + [k], tensors, piece) for k, v in obj.items()}
        return {"__items__": [[_encode(k, path + ["key"], tensors, piece),
                               _encode(v, path + [str(k)], tensors, piece)]
                              for k, v in obj.items()]}
    where = ".".join(path) or "(top level)"
    raise CheckpointError(
        f"checkpoint piece {piece!r}: {where} is of type {type(obj).__name__}; only tensors, "
        "numpy arrays and JSON-able values (dict, list, tuple, str, int, float, bool, None) "
        "can be saved (no pickle)")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__scalar__" in obj:
        return torch.tensor(obj["__scalar__"], dtype=_SCALAR_DTYPES[obj["dtype"]])
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=obj["dtype"]).reshape(obj["shape"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _cpu_unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous copies where needed; safetensors refuses tensors sharing storage
    (tied weights), so a second tensor over an already seen storage is cloned."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
        else:
            seen.add(ptr)
        out[key] = t
    return out


# ----------------------------------------------------------------------------------------
# Files


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:           # platforms that cannot open a folder (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    save_file(_cpu_unshared(tensors), str(path), metadata={"format": FORMAT})
    _fsync_file(path)


def _write_piece(folder: Path, name: str, obj: Any) -> None:
    """``name.json`` with the structure, ``name.safetensors`` if the tree holds tensors."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, [], tensors, name)
    if tensors:
        _write_tensors(folder / f"{name}.safetensors", tensors)
    _write_json(folder / f"{name}.json", tree)


def _read_piece(folder: Path, name: str) -> Any:
    path = folder / f"{name}.json"
    if not path.is_file():
        return None
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    tensor_file = folder / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.is_file() else {}
    return _decode(tree, tensors)


def _replace_atomically(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    _write_json(tmp, obj)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ----------------------------------------------------------------------------------------
# RNG


def capture_rng_state() -> dict:
    """The global generators' states: Python ``random``, numpy, torch CPU, and every CUDA
    device's when CUDA is available."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping) -> None:
    """Set the global generators from ``capture_rng_state()``'s dict (or ``Checkpoint.rng``).
    CUDA states are restored for the devices present; a checkpoint from a machine with
    CUDA restored on one without warns once and restores the rest."""
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda:
        if not torch.cuda.is_available():
            warnings.warn("the checkpoint holds CUDA RNG states but torch sees no CUDA "
                          "device here; they are not restored", stacklevel=2)
            return
        count = torch.cuda.device_count()
        if len(cuda) != count:
            warnings.warn(f"the checkpoint holds {len(cuda)} CUDA RNG states and this "
                          f"machine has {count} devices; restoring the first "
                          f"{min(count, len(cuda))}", stacklevel=2)
        for index, gen_state in enumerate(cuda[:count]):
            torch.cuda.set_rng_state(gen_state, index)


# ----------------------------------------------------------------------------------------
# Listing and finding


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def _is_complete(path: Path) -> bool:
    return (path / "trainer_state.json").is_file() and (path / "model.safetensors").is_file()


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """The run's complete checkpoints as ``(step, path)``, oldest step first."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and _is_complete(entry):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """The last complete checkpoint of the run in ``run_dir``: the one ``latest.json``
    names, or if that is missing or names no complete checkpoint, the highest step
    found; None when there is none."""
    folder = checkpoints_dir(run_dir)
    marker = folder / LATEST
    if marker.is_file():
        try:
            name = json.loads(marker.read_text(encoding="utf-8"))["dir"]
            if _STEP_DIR.match(str(name)) and _is_complete(folder / name):
                return folder / name
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path | None:
    """A checkpoint folder from ``path``: a ``step-<N>`` folder itself, a run's
    ``checkpoints`` folder or a run folder (its latest checkpoint)."""
    path = Path(path)
    if _is_complete(path):
        return path
    if path.name == CHECKPOINTS:
        return find_latest(path.parent)
    return find_latest(path)


# ----------------------------------------------------------------------------------------
# Saving


def save_due(step: int, every: int | None, last_step: int) -> bool:
    """Whether a trainer saves after ``step``: every ``every`` steps (None or 0: only at
    the end) and always at ``last_step``."""
    return step == last_step or bool(every) and step % every == 0


def _state_dict_of(obj: Any) -> Any:
    return obj.state_dict() if hasattr(obj, "state_dict") else obj


def _remove_scratch(folder: Path) -> None:
    """Temporary folders left by a save that crashed (one writer per run)."""
    for entry in folder.iterdir():
        if entry.name.startswith(_SCRATCH_PREFIXES) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _prune(run_dir: Path, step: int, keep: int | None) -> None:
    """Keep the newest ``keep`` checkpoints at or before ``step``. Checkpoints after
    ``step`` belong to a run that was resumed from an earlier point and are removed, so
    that the folder holds one consistent history."""
    found = list_checkpoints(run_dir)
    stale = [path for s, path in found if s > step]
    current = [path for s, path in found if s <= step]
    if keep is not None:
        stale += current[:-keep]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(run_dir: str | os.PathLike, step: int, *,
                    model_state: Mapping[str, torch.Tensor],
                    optimizer: Any = None, scheduler: Any = None,
                    data_state: Any = None, extra: Mapping | None = None,
                    rng: bool = True, keep: int | None = 2) -> Path:
    """Write ``<run_dir>/checkpoints/step-<step>/`` atomically and return its path.

    model_state: name -> tensor (a full state dict or the adapters alone).
    optimizer, scheduler: the objects (their ``state_dict()`` is taken) or state dicts.
    data_state: the data iterator's position, JSON-able. extra: other JSON-able trainer
    state (tensors allowed). rng: capture the global RNG states. keep: how many
    checkpoints to keep, this one included (None keeps all).
    """
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"step must be a non-negative int, got {step!r}")
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise CheckpointError(f"keep must be a positive int or None, got {keep!r}")
    if not isinstance(model_state, Mapping):
        raise CheckpointError(f"model_state must be a dict of name -> tensor, got "
                              f"{type(model_state).__name__}")
    for key, value in model_state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"model_state must map str names to tensors; entry "
                                  f"{key!r} is {type(value).__name__}")
    if extra is not None and not isinstance(extra, Mapping):
        raise CheckpointError(f"extra must be a dict, got {type(extra).__name__}")

    run_dir = Path(run_dir)
    folder = checkpoints_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_scratch(folder)
    name = f"step-{step}"
    final = folder / name

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=folder))
    try:
        _write_tensors(tmp / "model.safetensors", model_state)
        if optimizer is not None:
            _write_piece(tmp, "optimizer", _state_dict_of(optimizer))
        if scheduler is not None:
            _write_piece(tmp, "scheduler", _state_dict_of(scheduler))
        if rng:
            _write_piece(tmp, "rng", capture_rng_state())
        _write_piece(tmp, "trainer_state", {
            "format": FORMAT, "version": VERSION, "step": step,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "data": data_state, "extra": dict(extra or {})})
        _fsync_dir(tmp)
        if final.exists():       # the same step saved again (after a resume)
            old = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=folder))
            os.rename(final, old / name)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    _replace_atomically(folder / LATEST, {"dir": name, "step": step})
    _prune(run_dir, step, keep)
    return final


# ----------------------------------------------------------------------------------------
# Loading and applying


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint: a ``step-<N>`` folder, or a run folder (its latest checkpoint).
    Model tensors are placed on ``device``; the other tensors stay on CPU
    (``optimizer.load_state_dict`` moves them to the parameters' device)."""
    resolved = resolve_checkpoint(path)
    if resolved is None:
        raise CheckpointError(f"no complete checkpoint at {path} (expected a step-<N> "
                              f"folder with trainer_state.json, or a run folder with "
                              f"{CHECKPOINTS}/)")
    state = _read_piece(resolved, "trainer_state")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{resolved / 'trainer_state.json'} is not a {FORMAT} file")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{resolved} was written by a newer kernelrl (format version "
                              f"{state['version']}, this one reads up to {VERSION})")
    model = load_file(str(resolved / "model.safetensors"), device=str(device))
    return Checkpoint(path=resolved, step=int(state["step"]), model=model,
                      optimizer=_read_piece(resolved, "optimizer"),
                      scheduler=_read_piece(resolved, "scheduler"),
                      rng=_read_piece(resolved, "rng"), data=state.get("data"),
                      extra=state.get("extra") or {}, saved_at=state.get("saved_at"))


def load_model_state(params: Mapping[str, torch.Tensor] | torch.nn.Module,
                     state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``params`` in place: a dict of name -> tensor (e.g.
    ``dict(model.named_parameters())`` or the adapters) or a module (its
    ``state_dict()``'s entries). Names, shapes and dtypes must match exactly."""
    if isinstance(params, torch.nn.Module):
        params = params.state_dict(keep_vars=True)
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise CheckpointError(
            f"the checkpoint's model state does not match the parameters given: "
            f"missing from the checkpoint {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"not among the parameters {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}")
    for name, target in params.items():
        source = state[name]
        if source.shape != target.shape or source.dtype != target.dtype:
            raise CheckpointError(
                f"parameter {name!r}: the checkpoint has {tuple(source.shape)} "
                f"{source.dtype}, the model has {tuple(target.shape)} {target.dtype}")
    with torch.no_grad():
        for name, target in params.items():
            target.copy_(state[name])


def apply_checkpoint(ckpt: Checkpoint, params: Any = None, optimizer: Any = None,
                     scheduler: Any = None, *, rng: bool = False) -> None:
    """Load the checkpoint's pieces into the objects given (those left None are skipped):
    ``params`` as in ``load_model_state``, ``optimizer`` and ``scheduler`` through their
    ``load_state_dict``; ``rng=True`` also restores the global RNG states. Build the
    optimizer over the same parameters, in the same order, as the run that saved it."""
    if params is not None:
        load_model_state(params, ckpt.model)
    if optimizer is not None:
        if ckpt.optimizer is None:
            raise CheckpointError(f"{ckpt.path} holds no optimizer state")
        optimizer.load_state_dict(ckpt.optimizer)
    if scheduler is not None:
        if ckpt.scheduler is None:
            raise CheckpointError(f"{ckpt.path} holds no scheduler state")
        scheduler.load_state_dict(ckpt.scheduler)
    if rng:
        if ckpt.rng is None:
            raise CheckpointError(f"{ckpt.path} holds no RNG state")
        restore_rng_state(ckpt.rng)


# ----------------------------------------------------------------------------------------
# The run folder guard


def prepare_run_dir(out: str | os.PathLike, resume: bool | str | os.PathLike | None = None
                    ) -> Path | None:
    """Create ``out`` if needed and return the checkpoint to resume from, or None.

    resume None/False: a fresh run; ``out`` must not hold checkpoints already (a run is
    never overwritten). resume True: the latest checkpoint in ``out``. resume DIR: the
    checkpoint at DIR (a step folder, or a run folder's latest); if ``out`` holds
    checkpoints, DIR must be one of them, so that one folder never mixes two runs.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} exists and is not a folder")
    existing = find_latest(out)
    if resume is None or resume is False:
        if existing is not None:
            raise CheckpointError(
                f"--out {out} already holds a run's checkpoints (latest: {existing.name}); "
                f"pass --resume to continue that run, or choose another --out "
                f"(a run is never overwritten)")
        out.mkdir(parents=True, exist_ok=True)
        return None
    if resume is True:
        if existing is None:
            raise CheckpointError(f"--resume given, but {checkpoints_dir(out)} holds no "
                                  f"complete checkpoint to resume from")
        return existing
    target = resolve_checkpoint(resume)
    if target is None:
        raise CheckpointError(f"--resume {resume}: no complete checkpoint there (expected "
                              f"a step-<N> folder or a run folder with {CHECKPOINTS}/)")
    inside = target.resolve().parent == checkpoints_dir(out).resolve()
    if existing is not None and not inside:
        raise CheckpointError(
            f"--out {out} already holds checkpoints of a run (latest: {existing.name}), and "
            f"--resume {resume} is not one of them; choose another --out to continue from "
            f"{target} (runs are never mixed in one folder)")
    out.mkdir(parents=True, exist_ok=True)
    return target
