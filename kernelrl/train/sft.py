"""Supervised fine-tuning (SFT): train a causal LM to write the demonstrated responses.

This is step 1 of InstructGPT (Ouyang et al. 2022, "Training language models to follow
instructions with human feedback", §3.5): fine-tune the pretrained model on
(prompt, demonstration) pairs with the language-modelling loss, counted on the response
tokens only. For one optimizer step over micro-batches m = 1..M (``--grad-accum``),

    L(θ) = − (1 / N) Σ_m Σ_{b, t: response token} log π_θ(y[b, t] | y[b, <t])
    N    = Σ_m (response tokens of micro-batch m)

Legend: B batch (``--batch-size`` sequences, or packed rows), T time, N label tokens of
the whole step, V vocabulary, R LoRA rank. The log-probs come from
``kernelrl.models.logprobs.token_logprobs`` (hidden states and the lm_head through
``kernelrl.ops.linear_logprobs``; the [B, T, V] logits are never built).

Token-exact accumulation: the step's M micro-batches are fetched first, N is summed over
them, and each micro-batch's backward uses (its log-prob sum) / N, so the accumulated
gradient is the gradient of L over the step's B·M sequences at once. The data order is
drawn per step (``--batch-size`` × ``--grad-accum`` sequences), then cut into micro-batches:
``--batch-size 2 --grad-accum 4`` and ``--batch-size 8 --grad-accum 1`` see the same
sequences in every step and give the same parameters up to float rounding.

Where this deviates from the paper:
- the loss is a mean over tokens, not over sequences (long demonstrations weigh more);
- InstructGPT trains 16 epochs with residual dropout 0.2 and picks the final SFT model by
  the reward model's score on a validation set; here the schedule (linear warmup, cosine
  decay), the epochs and any dropout are settings, the held-out score is the mean token
  negative log-likelihood, and the model of the last step is the one exported;
- optional LoRA (``--lora-r``: only rank-R adapters train) and sequence packing
  (``--packing``: several examples per row, each attending only to itself).

Run folder (``--out``): config.toml, metrics.jsonl (loss, lr, grad_norm, tokens_per_s,
tokens_seen, epoch, eval_loss), curves.png, checkpoints/step-<N>/ and the final model
(``model/`` or, with LoRA, the PEFT folder ``adapter/``). ``--resume latest`` (or
``--resume DIR``) continues a run stopped at any point, bitwise as if it had not stopped.

Command line: ``python -m kernelrl.train.sft --help`` (or ``kernelrl sft``).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch

from kernelrl.models.hf import load_tokenizer, local_folder
from kernelrl.models.logprobs import token_logprobs
from kernelrl.models.lora import DEFAULT_TARGET_MODULES
from kernelrl.train.batching import BatchLoader, SFTBatch
from kernelrl.train.checkpoint import CheckpointError, save_due
from kernelrl.train.common import (autocast, build_optimizer, choose_device, clip_gradients,
                                   describe_model, export_model, restore, save_state,
                                   seed_everything, setup_model, start_run,
                                   trainable_parameters, warmup_cosine, warmup_steps_for,
                                   write_config)
from kernelrl.train.config import add_dataclass_args, config_from_namespace
from kernelrl.train.data import OVERLONG, SFTDataset, load_sft
from kernelrl.train.metrics import NonFiniteLossError, RunLogger, check_finite

__all__ = ["SFTConfig", "train", "evaluate", "main"]


@dataclass
class SFTConfig:
    """Supervised fine-tuning on prompt/response demonstrations (loss on the response)."""

    model: str = field(metadata={"help": "local model folder (config.json + safetensors, "
                                         "as save_pretrained writes it); never downloaded"})
    data: str = field(metadata={"help": "training JSONL: {\"prompt\", \"response\"} or "
                                        "{\"messages\"} per line"})
    out: str = field(metadata={"help": "run folder: config, metrics, checkpoints, final "
                                       "model; must not hold another run's checkpoints"})
    tokenizer: Optional[str] = field(default=None, metadata={
        "help": "tokenizer folder (default: the --model folder)"})
    eval_data: Optional[str] = field(default=None, metadata={
        "help": "held-out JSONL in the same format (or use --eval-fraction)"})
    eval_fraction: float = field(default=0.0, metadata={
        "help": "fraction of --data held out for evaluation, picked by --seed"})
    eval_every: int = field(default=0, metadata={
        "help": "evaluate every this many steps (0: only at the end); needs held-out data"})
    epochs: int = field(default=1, metadata={"help": "passes over the training data"})
    max_steps: Optional[int] = field(default=None, metadata={
        "help": "optimizer steps to run; overrides --epochs (the data then cycles)"})
    batch_size: int = field(default=4, metadata={
        "help": "sequences (or packed rows) per micro-batch, per device"})
    grad_accum: int = field(default=1, metadata={
        "help": "micro-batches per optimizer step; the loss is normalised by the label "
                "tokens of the whole step"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate (AdamW)"})
    min_lr_ratio: float = field(default=0.0, metadata={
        "help": "final learning rate of the cosine decay, as a fraction of --lr"})
    weight_decay: float = field(default=0.0, metadata={
        "help": "AdamW weight decay (matrices only; not biases or norms)"})
    warmup_steps: int = field(default=0, metadata={
        "help": "linear warmup steps (or use --warmup-ratio)"})
    warmup_ratio: float = field(default=0.0, metadata={
        "help": "linear warmup as a fraction of the steps (or use --warmup-steps)"})
    max_grad_norm: float = field(default=1.0, metadata={
        "help": "clip the gradients' global L2 norm to this (0: no clipping)"})
    max_length: int = field(default=1024, metadata={
        "help": "tokens per example (prompt + response); also the packed row length"})
    overlong: Literal["truncate", "drop"] = field(default="truncate", metadata={
        "help": "an example over --max-length: truncate (prompt first) or drop it"})
    keep_prompt_tokens: Optional[int] = field(default=None, metadata={
        "help": "when truncating, keep at least this many prompt tokens (default: "
                "max_length // 2)"})
    chat_template: bool = field(default=True, metadata={
        "help": "format with the tokenizer's chat template when it has one"})
    packing: bool = field(default=False, metadata={
        "help": "pack several examples into each row of --max-length tokens"})
    shuffle: bool = field(default=True, metadata={
        "help": "shuffle the examples each epoch (seeded by --seed)"})
    lora_r: int = field(default=0, metadata={
        "help": "LoRA rank R; 0 trains every parameter (full fine-tuning)"})
    lora_alpha: float = field(default=16.0, metadata={
        "help": "LoRA alpha (the update is scaled by alpha / R)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    lora_targets: str = field(default=",".join(DEFAULT_TARGET_MODULES), metadata={
        "help": "comma-separated module names that get adapters, or all-linear"})
    dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={
        "help": "dtype of the model weights"})
    autocast: Literal["none", "bfloat16"] = field(default="none", metadata={
        "help": "run the forward under bf16 autocast (weights keep --dtype)"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={
        "help": "auto: cuda when available, else cpu"})
    attn_implementation: Optional[str] = field(default=None, metadata={
        "help": "attention kernel: sdpa, eager, flash_attention_2, ... (default: "
                "transformers' choice)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in the backward to save memory"})
    seed: int = field(default=0, metadata={
        "help": "seed for the initialisation, data order, split and dropout"})
    resume: Optional[str] = field(default=None, metadata={
        "help": "continue a run: latest (the last checkpoint in --out), or a run folder "
                "or checkpoints/step-<N> folder"})
    save_every: int = field(default=500, metadata={
        "help": "checkpoint every this many steps (0: only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={
        "help": "checkpoints kept (the newest ones)"})
    log_every: int = field(default=1, metadata={
        "help": "write metrics every this many steps (the loss averaged over them)"})

    def __post_init__(self):
        def need(ok: bool, flag: str, expected: str, value) -> None:
            if not ok:
                raise ValueError(f"--{flag}: expected {expected}, got {value!r}")

        for name in ("epochs", "batch_size", "grad_accum", "max_length", "log_every",
                     "keep_checkpoints"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, name.replace("_", "-"),
                 "an int >= 1", value)
        for name in ("eval_every", "save_every", "warmup_steps", "lora_r"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 0, name.replace("_", "-"),
                 "an int >= 0", value)
        need(self.max_steps is None or self.max_steps >= 1, "max-steps", "an int >= 1 or none",
             self.max_steps)
        need(math.isfinite(self.lr) and self.lr > 0, "lr", "a finite number > 0", self.lr)
        need(0.0 <= self.eval_fraction < 1.0, "eval-fraction", "a number in [0, 1)",
             self.eval_fraction)
        need(0.0 <= self.warmup_ratio < 1.0, "warmup-ratio", "a number in [0, 1)",
             self.warmup_ratio)
        need(0.0 <= self.min_lr_ratio <= 1.0, "min-lr-ratio", "a number in [0, 1]",
             self.min_lr_ratio)
        need(self.weight_decay >= 0, "weight-decay", "a number >= 0", self.weight_decay)
        need(self.max_grad_norm >= 0, "max-grad-norm", "a number >= 0 (0: off)",
             self.max_grad_norm)
        need(self.overlong in OVERLONG, "overlong", f"one of {OVERLONG}", self.overlong)
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError(f"--warmup-steps {self.warmup_steps} and --warmup-ratio "
                             f"{self.warmup_ratio}: give one or the other")
        if self.eval_data is not None and self.eval_fraction:
            raise ValueError("--eval-data and --eval-fraction: give one or the other")


def _real_tokens(batch: SFTBatch) -> int:
    """Tokens that are not padding (counted on the CPU batch: no device sync)."""
    if batch.packed:
        return int((batch.segment_ids > 0).sum())
    return int(batch.attention_mask.sum())


def _sum_logprobs(model, batch: SFTBatch, device: torch.device, precision: str) -> torch.Tensor:
    """Σ log π(label) over the batch's label tokens: a 0-d float32 tensor on ``device``."""
    batch = batch.to(device)
    inputs = batch.model_inputs(mask="position_ids")     # packed: mask None, position restarts
    with autocast(device, precision):
        return token_logprobs(model, batch.input_ids, inputs["attention_mask"], batch.labels,
                              position_ids=batch.position_ids, reduction="sum")


def evaluate(model, dataset: SFTDataset, cfg: SFTConfig, device: torch.device) -> float:
    """Mean token NLL of the held-out set: − Σ log π(response token) / (response tokens),
    over the whole set at once (not a mean of batch means). Runs without gradients in
    eval mode, draws nothing from the global RNG (so it does not change the training
    run), and leaves the model in train mode."""
    loader = BatchLoader(dataset, cfg.batch_size, shuffle=False, num_epochs=1,
                         packing=cfg.packing)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    model.eval()
    with torch.no_grad():
        for batch in loader:
            total -= _sum_logprobs(model, batch, device, cfg.autocast).double()
            count += batch.num_label_tokens
    model.train()
    return total.item() / max(count, 1)


def train(cfg: SFTConfig) -> Path:
    """Run (or resume) SFT as ``cfg`` says; returns the run folder (see the module
    docstring for its contents)."""
    device = choose_device(cfg.device)
    seed_everything(cfg.seed)

    # -- 1. The inputs, checked before the run folder is touched --------------------------
    local_folder(cfg.model, "--model")
    tokenizer_dir = cfg.tokenizer if cfg.tokenizer is not None else cfg.model
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer is None:
        raise ValueError(f"--tokenizer: the folder {tokenizer_dir} holds no tokenizer "
                         f"(tokenizer.json, tokenizer_config.json, ...); pass --tokenizer")
    train_set, eval_set = load_sft(
        cfg.data, tokenizer, max_length=cfg.max_length, overlong=cfg.overlong,
        keep_prompt_tokens=cfg.keep_prompt_tokens, use_chat_template=cfg.chat_template,
        eval_path=cfg.eval_data, eval_fraction=cfg.eval_fraction, seed=cfg.seed)
    # One sampler batch = one optimizer step's sequences, cut into micro-batches below.
    step_batch = cfg.batch_size * cfg.grad_accum
    loader = BatchLoader(train_set, step_batch, seed=cfg.seed,
                         num_epochs=None if cfg.max_steps else cfg.epochs,
                         shuffle=cfg.shuffle, packing=cfg.packing)
    steps_per_epoch = len(loader)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = warmup_steps_for(cfg.warmup_steps, cfg.warmup_ratio, total_steps)

    # -- 2. Run folder, model, optimizer, schedule; the checkpoint's state if resuming ---
    run_dir, ckpt = start_run(cfg.out, cfg.resume, device=device)
    model = setup_model(cfg.model, dtype=cfg.dtype, device=device, lora_r=cfg.lora_r,
                        lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        lora_targets=cfg.lora_targets,
                        gradient_checkpointing=cfg.gradient_checkpointing,
                        attn_implementation=cfg.attn_implementation)
    params = trainable_parameters(model)
    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, warmup_steps=warmup, total_steps=total_steps,
                              min_lr_ratio=cfg.min_lr_ratio)
    step, data_state, extra = restore(ckpt, model, optimizer, scheduler)
    if data_state is not None:
        if extra.get("step_batch", step_batch) != step_batch:
            raise CheckpointError(
                f"--resume: the run used --batch-size x --grad-accum = {extra['step_batch']} "
                f"sequences per step, this one {step_batch}; the data position only "
                f"carries over with the same number")
        loader.load_state_dict(data_state)
    write_config(run_dir, cfg, resumed=ckpt is not None)
    tokens_seen = int(extra.get("tokens_seen", 0))
    order = iter(loader.sampler)

    with RunLogger(run_dir, total_steps, resume_step=ckpt.step if ckpt else None,
                   desc="sft") as logger:
        logger.write(describe_model(model))
        if ckpt is None:
            stats = {f"train_{k}": v for k, v in train_set.stats.as_dict().items()
                     if not k.startswith("pairs")}
            if eval_set is not None:
                stats |= {f"eval_{k}": v for k, v in eval_set.stats.as_dict().items()
                          if not k.startswith("pairs")}
            logger.write("data: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
            logger.log(0, **stats)
        else:
            logger.write(f"resumed from {ckpt.path} at step {step} of {total_steps}")
        window_loss, window_steps, window_tokens = 0.0, 0, 0

        # -- 3. The loop: one optimizer step per iteration --------------------------------
        while step < total_steps:
            step += 1
            units = next(order)
            micro = [loader.collate(units[i:i + cfg.batch_size])
                     for i in range(0, len(units), cfg.batch_size)]
            n_labels = max(sum(b.num_label_tokens for b in micro), 1)    # N of the step
            loss = torch.zeros((), device=device)
            for batch in micro:
                micro_loss = -_sum_logprobs(model, batch, device, cfg.autocast) / n_labels
                micro_loss.backward()
                loss += micro_loss.detach()
            grad_norm = clip_gradients(params, cfg.max_grad_norm)

            # The step's one host sync: the loss and norm are checked before the update,
            # so a diverged step changes nothing and saves nothing.
            loss_value, norm_value = torch.stack([loss, grad_norm.float()]).tolist()
            check_finite(step, loss_value)
            if not math.isfinite(norm_value):
                raise NonFiniteLossError(
                    f"gradient norm is {norm_value} at step {step} (loss {loss_value:.4g}): "
                    f"training diverged, and nothing was saved for this step. Resume from "
                    f"the last checkpoint with a lower --lr or --max-grad-norm")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            n_tokens = sum(_real_tokens(b) for b in micro)
            tokens_seen += n_tokens
            window_loss, window_steps = window_loss + loss_value, window_steps + 1
            window_tokens += n_tokens

            metrics = {}
            if eval_set is not None and (step == total_steps
                                         or cfg.eval_every and step % cfg.eval_every == 0):
                metrics["eval_loss"] = evaluate(model, eval_set, cfg, device)
            if metrics or step % cfg.log_every == 0 or step == total_steps:
                logger.log(step, tokens=window_tokens, loss=window_loss / window_steps,
                           lr=lr, grad_norm=norm_value, tokens_seen=tokens_seen,
                           epoch=round(step / steps_per_epoch, 4), **metrics)
                window_loss, window_steps, window_tokens = 0.0, 0, 0
            if save_due(step, cfg.save_every, total_steps):
                # After the step's batches were fetched: the position is the next step's.
                save_state(run_dir, step, model=model, optimizer=optimizer,
                           scheduler=scheduler, data_state=loader.state_dict(),
                           extra={"tokens_seen": tokens_seen, "step_batch": step_batch},
                           keep=cfg.keep_checkpoints)

        final = export_model(model, run_dir, tokenizer=tokenizer, base_model=cfg.model)
        logger.write(f"final model: {final}")
    return run_dir


def main(argv: Sequence[str] | None = None, prog: str = "kernelrl sft") -> int:
    """The command line: parse ``argv`` (default ``sys.argv[1:]``) into an SFTConfig and
    train. Bad flags or settings exit with status 2 (argparse's usage error); an input or
    run-folder problem, or a diverged loss, prints one line naming it and returns 1."""
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Supervised fine-tuning of a causal LM on prompt/response "
                    "demonstrations (loss on the response tokens).",
        epilog="Settings may also come from --config FILE.toml (same names, flags override "
               "it); a run's config.toml repeats it.")
    add_dataclass_args(parser, SFTConfig)
    namespace = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        cfg = config_from_namespace(SFTConfig, namespace)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        train(cfg)
    except (ValueError, OSError, CheckpointError, NonFiniteLossError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m kernelrl.train.sft"))
