"""The pieces kernelrl's trainers (SFT, reward model, DPO) share: the settings they all
take (``TrainConfig``, checked by ``validate_common``), plain functions, and one small
stateful helper for the end of each optimizer step (``Bookkeeper``: the logging window,
evaluation and checkpoint cadence). Each trainer's loop calls them in the same order:

    device = choose_device(cfg.device);  seed_everything(cfg.seed)
    tokenizer = load_run_tokenizer(cfg)                 # checks --model first
    train_set, eval_set = load_<format>(cfg.data, tokenizer, **data_options(cfg))
    loader, total_steps = step_loader(train_set, cfg)   # one sampler batch = one step
    run_dir, ckpt = start_run(cfg.out, cfg.resume)      # refuses to overwrite a run
    check_step_batch(ckpt, cfg, "prompts")              # the data position must carry over
    model = setup_model_from_config(cfg, device)     # MoE blocks patched (--moe-kernels)
    aux = RouterAux(model, cfg)                       # the MoE router's aux loss, or off
    optimizer, scheduler = optimizer_and_schedule(model, cfg, total_steps)
    step, _, extra = restore(ckpt, model, optimizer, scheduler, loader)   # 0, None, {} fresh
    write_config(run_dir, cfg, resumed=ckpt is not None)
    with RunLogger(run_dir, total_steps, resume_step=step if ckpt else None) as logger:
        log_start(logger, model, ckpt, step, total_steps, {"train": ..., "eval": ...}, aux=aux)
        books = Bookkeeper(logger, run_dir, cfg, total_steps, model=model, optimizer=...,
                           scheduler=..., loader=loader, extra=extra, evaluate=...)
        params, order = trainable_parameters(model), iter(loader.sampler)
        while step < total_steps:
            step += 1
            for part in micro_batches(next(order), cfg.batch_size):
                ... forward, under autocast(device, cfg.autocast)
                loss, stats = aux.add(loss, stats, weight=..., mask=...)   # + c · aux
                ... backward
            grad_norm = clip_gradients(params, cfg.max_grad_norm)
            values, norm = sync_and_check(step, sums, grad_norm)   # the step's one host sync
            lr = optimizer_step(optimizer, scheduler)
            books.end_step(step, tokens, lr=lr, grad_norm=norm, loss=values[0], ...)
        export_model(model, run_dir, tokenizer=tokenizer, base_model=cfg.model)

``run_main(ConfigClass, train, argv, prog=..., description=...)`` is every trainer's
``main``: bad flags or settings exit with status 2, a run error returns 1.

What a run folder holds (``<out>/``): ``config.toml`` (the settings used, written when the
run starts; ``--config <out>/config.toml`` repeats the run), ``metrics.jsonl``,
``curves.png``, ``checkpoints/step-<N>/`` (``kernelrl.train.checkpoint``), and the final
model: ``model/`` (full fine-tuning: ``save_pretrained`` safetensors + config.json + the
tokenizer) or ``adapter/`` (LoRA: a PEFT adapter folder, adapter_model.safetensors +
adapter_config.json, plus the tokenizer). Metric names: training metrics plain (``loss``,
``accuracy``, ``rewards/chosen``), held-out ones under ``eval/`` (``eval/loss``,
``eval/accuracy``, ``eval/rewards/chosen``), the data statistics of step 0 as
``train_<stat>`` and ``eval_<stat>``.

The trainable state. With LoRA (``lora_r > 0``) only the adapters train and only they are
checkpointed (the base is reloaded from ``--model`` on resume); with full fine-tuning
every parameter trains and is checkpointed. Either way it is
``trainable_state(model)``: the parameters with ``requires_grad``, by name. Adapters are
named (``adapter_name``, "default" unless given): several can sit on one base, e.g. a PPO
trainer's ``policy`` and ``value``.

The settings (``TrainConfig``, ``validate_common``, ``run_main``) live in
``kernelrl.train.settings``, the optimizer, schedule and step checks in
``kernelrl.train.optim``; both are re-exported here, so a trainer needs ``common`` alone.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from kernelrl.models.hf import load_model, load_tokenizer, local_folder, resolve_dtype
from kernelrl.models.moe import (config_router_aux_coef, hf_moe_blocks, moe_modules, patch_moe,
                                 router_aux_loss)
from kernelrl.models.qlora import nf4_modules, quantize_model
from kernelrl.models.lora import (ALL_LINEAR, DEFAULT_TARGET_MODULES, apply_lora, lora_modules,
                                  parameter_counts, save_adapter)
from kernelrl.train.batching import BatchLoader
from kernelrl.train.checkpoint import (Checkpoint, CheckpointError, apply_checkpoint,
                                       load_checkpoint, prepare_run_dir, save_checkpoint,
                                       save_due)
from kernelrl.train.config import load_config_file, save_config
from kernelrl.train.metrics import RunLogger
from kernelrl.train.optim import (autocast, build_optimizer, clip_gradients,  # noqa: F401
                                  lr_factor, optimizer_and_schedule, optimizer_step,
                                  sync_and_check, trainable_parameters, warmup_cosine,
                                  warmup_steps_for)
from kernelrl.train.settings import (PREFERENCE_DATA_HELP, TrainConfig,  # noqa: F401
                                     bad_setting, check_numbers, run_main, validate_common)

__all__ = ["CONFIG_FILE", "MODEL_DIR", "ADAPTER_DIR", "PREFERENCE_DATA_HELP", "TrainConfig",
           "validate_common", "bad_setting", "check_numbers", "run_main",
           "load_run_tokenizer", "data_options", "step_loader", "micro_batches",
           "choose_device", "seed_everything", "parse_targets", "setup_model",
           "setup_model_from_config", "make_trainable", "trainable_parameters",
           "trainable_state", "build_optimizer", "warmup_steps_for", "lr_factor",
           "warmup_cosine", "optimizer_and_schedule", "clip_gradients", "sync_and_check",
           "optimizer_step", "autocast", "resume_target", "start_run", "write_config",
           "check_step_batch", "restore", "save_state", "log_start", "Bookkeeper",
           "export_model", "describe_model", "RouterAux"]

CONFIG_FILE = "config.toml"
MODEL_DIR = "model"          # final full model (save_pretrained layout)
ADAPTER_DIR = "adapter"      # final LoRA adapter (PEFT layout)


# ----------------------------------------------------------------------------------------
# The inputs


def load_run_tokenizer(cfg: TrainConfig) -> Any:
    """The run's tokenizer, from ``--tokenizer`` or else the ``--model`` folder. Checks
    first that the ``--model`` folder exists (FileNotFoundError naming ``--model``); a
    folder without a tokenizer is a ValueError naming ``--tokenizer``. Touches no run
    folder."""
    local_folder(cfg.model, "--model")
    folder = cfg.tokenizer if cfg.tokenizer is not None else cfg.model
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise ValueError(f"--tokenizer: the folder {folder} holds no tokenizer "
                         f"(tokenizer.json, tokenizer_config.json, ...); pass --tokenizer")
    return tokenizer


def data_options(cfg: TrainConfig) -> dict[str, Any]:
    """The keyword arguments of ``kernelrl.train.data.load_sft`` / ``load_preferences``
    that come from the settings: length limits, chat template, held-out split, seed."""
    return {"max_length": cfg.max_length, "overlong": cfg.overlong,
            "keep_prompt_tokens": cfg.keep_prompt_tokens,
            "use_chat_template": cfg.chat_template, "eval_path": cfg.eval_data,
            "eval_fraction": cfg.eval_fraction, "seed": cfg.seed}


def step_loader(dataset: Any, cfg: TrainConfig, **options: Any) -> tuple[BatchLoader, int]:
    """(loader, S): the training loader and the run's optimizer steps S.

    One sampler batch is one optimizer step's ``--batch-size`` × ``--grad-accum`` examples
    (prompts, or sequences / packed rows for SFT), drawn in a ``--seed``-ed order
    (``--shuffle``), which the loop cuts into micro-batches (``micro_batches``); so the
    data of a step does not depend on how it is split. S is ``--max-steps`` (the data
    then cycles) or ``--epochs`` × the steps of an epoch (``len(loader)``). ``options``
    go to ``BatchLoader`` (``packing=True``)."""
    loader = BatchLoader(dataset, cfg.batch_size * cfg.grad_accum, seed=cfg.seed,
                         num_epochs=None if cfg.max_steps else cfg.epochs,
                         shuffle=cfg.shuffle, **options)
    return loader, cfg.max_steps or cfg.epochs * len(loader)


def micro_batches(units: Sequence[int], batch_size: int) -> list[Sequence[int]]:
    """A step's sampler batch ``units`` cut into micro-batches of ``batch_size`` (the last
    one may be shorter), in order."""
    return [units[i:i + batch_size] for i in range(0, len(units), batch_size)]


# ----------------------------------------------------------------------------------------
# Device and seeds


def choose_device(name: str) -> torch.device:
    """``"auto"``: CUDA when torch sees a GPU, else the CPU; ``"cpu"``; ``"cuda"`` (an
    error naming ``--device`` when there is no GPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device on this machine; "
                             "use --device cpu or auto")
        return torch.device("cuda")
    raise ValueError(f"--device: expected auto, cpu or cuda, got {name!r}")


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, numpy and torch (every device). A resumed run then
    replaces these states with the checkpoint's (``restore``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------
# The model


def parse_targets(text: str) -> tuple[str, ...] | str:
    """``--lora-targets``: comma-separated module names (``q_proj,v_proj``), or
    ``all-linear`` (every linear but the output layer)."""
    text = text.strip()
    if text == ALL_LINEAR:
        return ALL_LINEAR
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise ValueError(f"--lora-targets: expected comma-separated module names (e.g. "
                         f"q_proj,v_proj) or {ALL_LINEAR}, got {text!r}")
    return names


def setup_model(source: str | os.PathLike, *, dtype: str | torch.dtype = "float32",
                device: torch.device | str = "cpu", lora_r: int = 0, lora_alpha: float = 16.0,
                lora_dropout: float = 0.0,
                lora_targets: str = ",".join(DEFAULT_TARGET_MODULES),
                gradient_checkpointing: bool = False,
                attn_implementation: str | None = None,
                adapter_name: str = "default", qlora: bool = False,
                moe_kernels: bool = True) -> nn.Module:
    """The causal LM a trainer trains: loaded from ``source`` (a local model folder,
    config.json + safetensors; never the Hub) in ``dtype`` on ``device``, then
    ``make_trainable`` (its MoE blocks on kernelrl's kernels unless ``moe_kernels`` is
    False; LoRA adapter ``adapter_name`` when ``lora_r`` > 0). Raises FileNotFoundError
    naming ``--model`` for a missing folder.
    """
    local_folder(source, "--model")
    model = load_model(source, dtype=resolve_dtype(dtype, "--dtype"), device=device,
                       attn_implementation=attn_implementation)
    return make_trainable(model, lora_r=lora_r, lora_alpha=lora_alpha,
                          lora_dropout=lora_dropout, lora_targets=lora_targets,
                          gradient_checkpointing=gradient_checkpointing,
                          adapter_name=adapter_name, qlora=qlora, moe_kernels=moe_kernels)


def setup_model_from_config(cfg: TrainConfig, device: torch.device | str, *,
                            adapter_name: str = "default") -> nn.Module:
    """``setup_model`` with the settings of ``cfg``: ``--model``, ``--dtype``, the
    ``--lora-*`` settings, ``--qlora``, ``--gradient-checkpointing``,
    ``--attn-implementation`` and ``--moe-kernels``."""
    return setup_model(cfg.model, dtype=cfg.dtype, device=device, lora_r=cfg.lora_r,
                       lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                       lora_targets=cfg.lora_targets,
                       gradient_checkpointing=cfg.gradient_checkpointing,
                       attn_implementation=cfg.attn_implementation, adapter_name=adapter_name,
                       qlora=cfg.qlora, moe_kernels=cfg.moe_kernels)


def frozen_copy(cfg: TrainConfig, device: torch.device | str) -> nn.Module:
    """A frozen copy of ``--model`` for a reference policy: loaded as the policy is
    (``--dtype``, ``--attn-implementation``), its MoE blocks on kernelrl's kernels when
    the policy's are (``--moe-kernels``), so that both compute with the same numerics
    and the first step's KL is exactly 0; in eval mode, without gradients."""
    copy = load_model(cfg.model, dtype=cfg.dtype, device=device,
                      attn_implementation=cfg.attn_implementation)
    if cfg.moe_kernels:
        patch_moe(copy)
    return copy.eval().requires_grad_(False)


def make_trainable(model: nn.Module, *, lora_r: int = 0, lora_alpha: float = 16.0,
                   lora_dropout: float = 0.0,
                   lora_targets: str = ",".join(DEFAULT_TARGET_MODULES),
                   gradient_checkpointing: bool = False,
                   adapter_name: str = "default", qlora: bool = False,
                   moe_kernels: bool = True) -> nn.Module:
    """Choose what trains, in place, and put ``model`` in train mode; returns it.

    moe_kernels: first replace the model's sparse MoE blocks (Mixtral, Qwen3-MoE) by
    ``kernelrl.nn.SparseMoE`` (``kernelrl.models.patch_moe``: same parameters, same
    names); a model with an MoE block of another kind is refused (ValueError naming
    ``--moe-kernels``). The experts and routers then train or freeze like any base weight:
    LoRA never targets them (they are not linear layers), so with ``lora_r`` > 0 they stay
    frozen.

    lora_r: 0 leaves every parameter trainable (full fine-tuning); R > 0 freezes the whole
    model and adds the LoRA adapter ``adapter_name`` of rank R (scaling alpha / R, float32
    weights whatever the base dtype) to ``lora_targets`` (see ``parse_targets``). Calling
    it again with another ``adapter_name`` adds a second adapter to the same base (PPO's
    ``policy`` and ``value``): every adapter's weights then train, and the active adapter
    stays the first one (``kernelrl.models.lora.use_adapter`` switches). A module that
    must train beside the adapters (a reward head) is set ``requires_grad_(True)`` by the
    caller afterwards. qlora: first quantize the ``lora_targets`` linears to 4-bit NF4
    (``kernelrl.models.quantize_model``; once: a second adapter goes on the same 4-bit
    base), so the adapters train over a frozen NF4 base. gradient_checkpointing: the outermost Hugging Face model inside
    ``model`` recomputes each layer's activations in the backward instead of keeping them
    (non-reentrant, so frozen inputs are fine), trading compute for memory.
    """
    if isinstance(lora_r, bool) or not isinstance(lora_r, int) or lora_r < 0:
        raise ValueError(f"--lora-r: expected an int >= 0 (0 = full fine-tuning), got "
                         f"{lora_r!r}")
    if moe_kernels:
        try:
            patch_moe(model)
        except ValueError as exc:
            raise ValueError(f"--moe-kernels: {exc}; pass --no-moe-kernels to train it with "
                             f"transformers' own blocks") from None
    if qlora:
        if lora_r <= 0:
            raise ValueError("--qlora: needs --lora-r > 0 (adapters over the 4-bit base)")
        if not nf4_modules(model):
            quantize_model(model, r=0, target_modules=parse_targets(lora_targets),
                           progress=sys.stderr.isatty())
    if lora_r > 0:
        apply_lora(model, r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
                   target_modules=parse_targets(lora_targets), adapter_name=adapter_name)
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        hf = next((m for m in model.modules() if hasattr(m, "gradient_checkpointing_enable")),
                  None)
        if hf is None:
            raise ValueError(f"--gradient-checkpointing: {type(model).__name__} holds no "
                             f"Hugging Face model to enable it on")
        if hasattr(hf, "activation_checkpointing_enable"):        # transformers >= 5.24
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> parameter, for every parameter with ``requires_grad``: the whole model
    when fully fine-tuned, the LoRA adapters alone otherwise. The live tensors (not
    copies): ``save_checkpoint`` writes them, ``load_model_state`` copies into them.
    A parameter shared by two modules (tied embeddings) appears once."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def describe_model(model: nn.Module) -> str:
    """One line for the log: the trainable and total parameter counts and the method."""
    trainable, total = parameter_counts(model)
    method = f"LoRA on {len(lora_modules(model))} layers" if lora_modules(model) else "full"
    if nf4_modules(model):
        method = f"QLoRA: {method} over {len(nf4_modules(model))} NF4 layers"
    if moe_modules(model):
        method += f"; MoE: {len(moe_modules(model))} blocks on kernelrl's kernels"
    elif hf_moe_blocks(model):
        method += f"; MoE: {len(hf_moe_blocks(model))} blocks on transformers' own"
    return (f"model: {trainable:,} trainable of {total:,} parameters "
            f"({100 * trainable / max(total, 1):.2f}%, {method})")


class RouterAux:
    """The MoE router's load-balancing term of a trainer's loss, for its policy forwards:

        loss_m ← loss_m + c · w_m · aux_m,    aux_m = router_aux_loss(model, mask_m)

    aux_m is transformers' pooled load-balancing loss of the forward just run (K at
    perfect balance; ``kernelrl.models.router_aux_loss``), so c = ``--router-aux-coef``
    means what the config's ``router_aux_loss_coef`` means to transformers (the default:
    that value). w_m is the micro-batch's share of the step, the weight of its own loss,
    so ``aux_loss`` = Σ_m w_m · aux_m, logged, is the step's mean aux. Off (``add``
    changes nothing, nothing logged) for a dense model, with c = 0, and with
    ``--no-moe-kernels``: transformers' own blocks leave no router logits to read, so
    there the default is 0 and an explicit c > 0 is refused (ValueError naming the flag).
    ``note``: a line for the log ('' for a dense model)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        self.model, patched, unpatched = model, moe_modules(model), hf_moe_blocks(model)
        coef = cfg.router_aux_coef
        if coef and not patched:
            why = ("its MoE blocks run on transformers' own code (--no-moe-kernels), which "
                   "keeps no router logits for kernelrl" if unpatched
                   else "the model has no mixture-of-experts blocks")
            raise ValueError(f"--router-aux-coef {coef}: {why}; give 0 or none")
        source = "--router-aux-coef" if coef is not None else "the config's router_aux_loss_coef"
        self.coef = float(coef if coef is not None else
                          config_router_aux_coef(model) if patched else 0.0)
        if patched and self.coef:
            self.note = (f"router aux loss: {self.coef:g} x the load-balancing loss "
                         f"({source}), logged as aux_loss")
        elif patched or unpatched:
            self.note = ("router aux loss: off" + (f" ({source} is 0)" if patched else
                                                   " (--no-moe-kernels)"))
        else:
            self.note = ""

    def add(self, loss: torch.Tensor, stats: dict[str, torch.Tensor], *,
            weight: torch.Tensor | float = 1.0, mask: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss + c · weight · aux, stats with ``aux_loss`` = weight · aux, detached), for
        the policy forward just run (call it before any other forward of the model);
        (loss, stats) as given when off. mask: that forward's attention mask [B, T] (any
        device), None when every token is real."""
        if not self.coef:
            return loss, stats
        if mask is not None:
            mask = mask.to(loss.device, non_blocking=True)
        aux = router_aux_loss(self.model, mask) * weight
        return loss + self.coef * aux.to(loss.dtype), {**stats, "aux_loss": aux.detach()}


# ----------------------------------------------------------------------------------------
# The run folder, resume and saving


def resume_target(value: str | None) -> bool | str | None:
    """``--resume``'s value for ``prepare_run_dir``: None (a fresh run), ``latest`` (True:
    the latest checkpoint in ``--out``), or a folder (a run folder, its ``checkpoints``
    folder or one ``step-<N>`` folder)."""
    if value is None or value == "":
        return None
    if value == "latest":
        return True
    return value


def _config_changes(path: Path, cfg: Any) -> list[str]:
    """The fields of ``cfg`` that differ from the config.toml a run wrote before."""
    try:
        before = load_config_file(type(cfg), path)
    except ValueError as exc:
        return [f"(could not read {path}: {exc})"]
    now = dataclasses.asdict(cfg)
    return [f"{name}: {before.get(name)!r} -> {now[name]!r}" for name in now
            if name != "resume" and before.get(name) != now[name]]


def start_run(out: str | os.PathLike, resume: str | None, *,
              device: torch.device | str = "cpu") -> tuple[Path, Checkpoint | None]:
    """Open the run folder ``out``; returns (run folder, checkpoint to resume from or None).

    A fresh run (``resume`` None) refuses an ``out`` that already holds a run's
    checkpoints (``CheckpointError`` naming ``--out``), so a run is never overwritten.
    ``resume`` (see ``resume_target``) loads that checkpoint, model tensors on ``device``.
    Nothing is written into ``out`` here (it is only created); ``write_config`` follows
    once the checkpoint is known to fit.
    """
    target = prepare_run_dir(out, resume_target(resume))
    ckpt = load_checkpoint(target, device=device) if target is not None else None
    return Path(out), ckpt


def write_config(run_dir: str | os.PathLike, cfg: Any, *, resumed: bool = False) -> Path:
    """Write ``<run>/config.toml``: the settings of this run (of its latest leg, when
    resumed; the fields that differ from the earlier config.toml are printed then)."""
    path = Path(run_dir) / CONFIG_FILE
    if resumed and path.is_file():
        changes = _config_changes(path, cfg)
        if changes:
            print("kernelrl: resuming with settings that differ from the run's "
                  "config.toml: " + "; ".join(changes), file=sys.stderr)
    return save_config(cfg, path)


def check_step_batch(ckpt: Checkpoint | None, cfg: TrainConfig, unit: str) -> None:
    """On resume, refuse (``CheckpointError`` naming the flags) a ``--batch-size`` ×
    ``--grad-accum`` other than the checkpoint's: the saved data position counts sampler
    batches of that many ``unit`` ("prompts", "sequences"), so it only carries over with
    the same number. ``Bookkeeper`` stores the number as ``step_batch`` (checkpoints of
    the first reward-model and DPO trainers: ``step_prompts``). Call it before anything
    slow or any write."""
    step_batch = cfg.batch_size * cfg.grad_accum
    if ckpt is None:
        return
    saved = ckpt.extra.get("step_batch", ckpt.extra.get("step_prompts", step_batch))
    if saved != step_batch:
        raise CheckpointError(
            f"--resume: the run used --batch-size x --grad-accum = {saved} {unit} per step, "
            f"this one {step_batch}; the data position only carries over with the same "
            f"number")


def restore(ckpt: Checkpoint | None, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any, loader: BatchLoader | None = None) -> tuple[int, Any, dict]:
    """Load a checkpoint into a freshly set-up model, optimizer and scheduler: the
    trainable state, the optimizer and scheduler states, the global RNG states, and, when
    ``loader`` is given, the data position into it. Returns (step, data_state, extra), or
    (0, None, {}) when ``ckpt`` is None. Build the model, optimizer and scheduler exactly
    as the saving run did before calling it."""
    if ckpt is None:
        return 0, None, {}
    try:
        apply_checkpoint(ckpt, trainable_state(model), optimizer, scheduler, rng=True)
    except (CheckpointError, ValueError, KeyError) as exc:
        raise CheckpointError(f"--resume: {ckpt.path} does not fit this model and "
                              f"settings (same --model and --lora-* as the run that saved "
                              f"it?): {exc}") from None
    if loader is not None and ckpt.data is not None:
        loader.load_state_dict(ckpt.data)
    return ckpt.step, ckpt.data, dict(ckpt.extra)


def save_state(run_dir: str | os.PathLike, step: int, *, model: nn.Module,
               optimizer: torch.optim.Optimizer, scheduler: Any, data_state: Any,
               extra: dict | None = None, keep: int | None = 2) -> Path:
    """Checkpoint ``step``: the trainable state (``trainable_state``) as safetensors, the
    optimizer, scheduler and RNG states, the data position and ``extra``. Call it only
    after the step's loss passed ``check_finite``. Returns the checkpoint folder."""
    return save_checkpoint(run_dir, step, model_state=trainable_state(model),
                           optimizer=optimizer, scheduler=scheduler, data_state=data_state,
                           extra=extra, rng=True, keep=keep)


# ----------------------------------------------------------------------------------------
# Logging


def log_start(logger: RunLogger, model: nn.Module, ckpt: Checkpoint | None, step: int,
              total_steps: int, datasets: dict[str, Any], *, skip: Sequence[str] = (),
              aux: RouterAux | None = None) -> None:
    """The run's opening lines: the model (``describe_model``) and, for an MoE model, its
    router aux loss (``aux.note``), then ``resumed from
    <checkpoint> at step s of S``, or, for a fresh run, the data statistics
    (``DataStats``) of each of ``datasets`` (split name -> dataset; None left out) as
    ``<split>_<stat>``, printed and logged at step 0. ``skip``: statistics left out (SFT
    has no pairs)."""
    logger.write(describe_model(model))
    if aux is not None and aux.note:
        logger.write(aux.note)
    if ckpt is not None:
        logger.write(f"resumed from {ckpt.path} at step {step} of {total_steps}")
        return
    stats = {f"{split}_{key}": value for split, data in datasets.items() if data is not None
             for key, value in data.stats.as_dict().items() if key not in skip}
    logger.write("data: " + ", ".join(f"{key} {value}" for key, value in stats.items()))
    logger.log(0, **stats)


class Bookkeeper:
    """What happens after each optimizer step, on the settings' cadence: the metrics
    record, held-out evaluation and the checkpoint. One ``end_step(...)`` call per step.

    The logging window: the steps and tokens since the last record and, for each metric,
    a (sum, count) total logged as sum / count. A metric passed as a plain value counts 1,
    so it is logged as its mean over the window's steps; a (sum, count) pair gives another
    mean (the reward model's accuracy: (pairs ranked right, pairs)). ``tokens_seen``
    counts the tokens of every step of the run; it is checkpointed, and continued on
    resume from the checkpoint's ``extra``.

    logger: the run's ``RunLogger``. run_dir, cfg: where and how often (``--log-every``,
    ``--eval-every``, ``--save-every``, ``--keep-checkpoints``). total_steps: S.
    model, optimizer, scheduler, loader: what a checkpoint holds (``save_state``; the
    loader's data position, and ``len(loader)`` steps per epoch for the logged epoch).
    evaluate: ``evaluate()`` returns the held-out metrics keyed ``eval/<name>``; None when
    there is no held-out data. extra: the resumed checkpoint's ``extra`` ({} when fresh).
    """

    def __init__(self, logger: RunLogger, run_dir: str | os.PathLike, cfg: TrainConfig,
                 total_steps: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, loader: BatchLoader,
                 evaluate: Callable[[], dict[str, float]] | None = None,
                 extra: dict | None = None) -> None:
        self.logger, self.run_dir, self.cfg, self.total_steps = logger, run_dir, cfg, total_steps
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.loader, self.evaluate = loader, evaluate
        self.tokens_seen = int((extra or {}).get("tokens_seen", 0))
        self.tokens, self.totals = 0, {}

    def end_step(self, step: int, tokens: int, *, lr: float, grad_norm: float,
                 **metrics: float | tuple[float, float]) -> None:
        """After optimizer step ``step``'s update: add its ``tokens`` (not padding), the
        learning rate it used, its gradient norm and its ``metrics`` (values or (sum,
        count) pairs: see the class docstring) to the window. Then:

        - after the last step and every ``--eval-every`` steps, ``evaluate()``;
        - every ``--log-every`` steps, with an evaluation and after the last step, one
          record: tokens, the window's means (in the order first given), lr, grad_norm,
          tokens_seen, epoch, the held-out metrics; the window is then emptied;
        - every ``--save-every`` steps and after the last step (``save_due``), a
          checkpoint (``save_state``) keeping the newest ``--keep-checkpoints``, with the
          loader's data position (call this after the step's batches were fetched, so it
          is the next step's) and extra ``tokens_seen`` and ``step_batch`` (for
          ``check_step_batch``).
        """
        cfg = self.cfg
        self.tokens_seen += tokens
        self.tokens += tokens
        for name, value in metrics.items():
            total, count = value if isinstance(value, tuple) else (value, 1)
            before, seen = self.totals.get(name, (0.0, 0))
            self.totals[name] = (before + total, seen + count)
        last = step == self.total_steps
        evals: dict[str, float] = {}
        if self.evaluate is not None and (last or cfg.eval_every
                                          and step % cfg.eval_every == 0):
            evals = self.evaluate()
        if evals or last or step % cfg.log_every == 0:
            means = {name: total / count for name, (total, count) in self.totals.items()}
            self.logger.log(step, tokens=self.tokens, **means, lr=lr, grad_norm=grad_norm,
                            tokens_seen=self.tokens_seen,
                            epoch=round(step / len(self.loader), 4), **evals)
            self.tokens, self.totals = 0, {}
        if save_due(step, cfg.save_every, self.total_steps):
            extra = {"tokens_seen": self.tokens_seen,
                     "step_batch": cfg.batch_size * cfg.grad_accum}
            save_state(self.run_dir, step, model=self.model, optimizer=self.optimizer,
                       scheduler=self.scheduler, data_state=self.loader.state_dict(),
                       extra=extra, keep=cfg.keep_checkpoints)


# ----------------------------------------------------------------------------------------
# The final model


def export_model(model: nn.Module, run_dir: str | os.PathLike, *, tokenizer: Any = None,
                 base_model: str | os.PathLike | None = None,
                 adapter_name: str = "default") -> Path:
    """Write the trained model for use outside kernelrl and return its folder:
    ``<run>/adapter`` (a PEFT LoRA folder of the adapter ``adapter_name``:
    ``PeftModel.from_pretrained(base, folder)`` loads it; ``base_model`` is recorded as its
    base) when the model has LoRA adapters, else ``<run>/model`` (``save_pretrained``:
    config.json + safetensors, loadable with ``from_pretrained``). The tokenizer, when
    given, is saved beside it."""
    run_dir = Path(run_dir)
    if lora_modules(model):
        folder = run_dir / ADAPTER_DIR
        base = str(Path(base_model).resolve()) if base_model is not None else None
        save_adapter(model, folder, adapter_name=adapter_name, base_model_name_or_path=base)
    else:
        folder = run_dir / MODEL_DIR
        model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
