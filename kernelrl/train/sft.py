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

A mixture-of-experts model (``--moe-kernels``) adds its router's load-balancing loss,
``--router-aux-coef`` × aux, to L (``common.RouterAux``; each micro-batch's aux weighed by
its share of the step's real tokens), as transformers' Mixtral does with
``output_router_logits``; ``aux_loss`` is logged.

Run folder (``--out``): config.toml, metrics.jsonl (loss, lr, grad_norm, tokens_per_s,
tokens_seen, epoch; ``eval/loss``, the held-out mean token NLL, at eval steps and at the
end), curves.png, checkpoints/step-<N>/ and the final model (``model/`` or, with LoRA,
the PEFT folder ``adapter/``). ``--resume latest`` (or
``--resume DIR``) continues a run stopped at any point, bitwise as if it had not stopped.

Command line: ``python -m kernelrl.train.sft --help`` (or ``kernelrl sft``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch

from kernelrl.models.logprobs import token_logprobs
from kernelrl.train import common
from kernelrl.train.batching import BatchLoader, SFTBatch
from kernelrl.train.data import SFTDataset, load_sft
from kernelrl.train.metrics import RunLogger

__all__ = ["SFTConfig", "train", "evaluate", "main"]


@dataclass
class SFTConfig(common.TrainConfig):
    """Supervised fine-tuning on prompt/response demonstrations (loss on the response).

    The settings every trainer takes are declared in ``kernelrl.train.common.TrainConfig``;
    the fields below change the default or help of some of them, then add SFT's own."""

    data: str = field(metadata={"help": "training JSONL: {\"prompt\", \"response\"} or "
                                        "{\"messages\"} per line"})
    batch_size: int = field(default=4, metadata={
        "help": "sequences (or packed rows) per micro-batch, per device"})
    grad_accum: int = field(default=1, metadata={
        "help": "micro-batches per optimizer step; the loss is normalised by the label "
                "tokens of the whole step"})
    lr: float = field(default=2e-5, metadata={"help": "peak learning rate (AdamW)"})
    max_length: int = field(default=1024, metadata={
        "help": "tokens per example (prompt + response); also the packed row length"})
    overlong: Literal["truncate", "drop"] = field(default="truncate", metadata={
        "help": "an example over --max-length: truncate (prompt first) or drop it"})
    packing: bool = field(default=False, metadata={
        "help": "pack several examples into each row of --max-length tokens"})

    def __post_init__(self):
        common.validate_common(self)


def main(argv: Sequence[str] | None = None, prog: str = "kernelrl sft") -> int:
    """``kernelrl sft``: ``run_main`` for SFTConfig and ``train`` (exit status 0, 1 or 2)."""
    return common.run_main(SFTConfig, train, argv, prog=prog,
                           description="Supervised fine-tuning of a causal LM on "
                                       "prompt/response demonstrations (loss on the response "
                                       "tokens).")


def _real_tokens(batch: SFTBatch) -> int:
    """Tokens that are not padding (counted on the CPU batch: no device sync)."""
    if batch.packed:
        return int((batch.segment_ids > 0).sum())
    return int(batch.attention_mask.sum())


def _real_mask(batch: SFTBatch) -> torch.Tensor:
    """[B, T] nonzero on the tokens that are not padding (what the router aux loss counts)."""
    return batch.segment_ids > 0 if batch.packed else batch.attention_mask


def _sum_logprobs(model, batch: SFTBatch, device: torch.device, precision: str) -> torch.Tensor:
    """Σ log π(label) over the batch's label tokens: a 0-d float32 tensor on ``device``."""
    batch = batch.to(device)
    inputs = batch.model_inputs(mask="position_ids")     # packed: mask None, position restarts
    with common.autocast(device, precision):
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
    device = common.choose_device(cfg.device)
    common.seed_everything(cfg.seed)

    # -- 1. The inputs, checked before the run folder is touched --------------------------
    tokenizer = common.load_run_tokenizer(cfg)
    train_set, eval_set = load_sft(cfg.data, tokenizer, **common.data_options(cfg))
    # One sampler batch = one optimizer step's sequences, cut into micro-batches below.
    loader, total_steps = common.step_loader(train_set, cfg, packing=cfg.packing)

    # -- 2. Run folder, model, optimizer, schedule; the checkpoint's state if resuming ---
    run_dir, ckpt = common.start_run(cfg.out, cfg.resume, device=device)
    common.check_step_batch(ckpt, cfg, "sequences")
    model = common.setup_model_from_config(cfg, device)
    aux = common.RouterAux(model, cfg)                   # the MoE router's aux loss, or off
    optimizer, scheduler = common.optimizer_and_schedule(model, cfg, total_steps)
    step, _, extra = common.restore(ckpt, model, optimizer, scheduler, loader)
    common.write_config(run_dir, cfg, resumed=ckpt is not None)

    with RunLogger(run_dir, total_steps, resume_step=step if ckpt else None, desc="sft") as logger:
        common.log_start(logger, model, ckpt, step, total_steps,
                         {"train": train_set, "eval": eval_set},
                         skip=("pairs", "pairs_dropped"), aux=aux)
        books = common.Bookkeeper(
            logger, run_dir, cfg, total_steps, model=model, optimizer=optimizer,
            scheduler=scheduler, loader=loader, extra=extra,
            evaluate=None if eval_set is None else (
                lambda: {"eval/loss": evaluate(model, eval_set, cfg, device)}))

        # -- 3. The loop: one optimizer step per iteration --------------------------------
        params = common.trainable_parameters(model)      # what the loop clips
        order = iter(loader.sampler)
        while step < total_steps:
            step += 1
            micro = [loader.collate(part)
                     for part in common.micro_batches(next(order), cfg.batch_size)]
            n_labels = max(sum(b.num_label_tokens for b in micro), 1)    # N of the step
            tokens = [_real_tokens(b) for b in micro]
            sums = torch.zeros((), device=device)          # the loss (and aux_loss)
            for batch, n_real in zip(micro, tokens):
                micro_loss = -_sum_logprobs(model, batch, device, cfg.autocast) / n_labels
                micro_loss, stats = aux.add(micro_loss, {}, weight=n_real / sum(tokens),
                                            mask=_real_mask(batch))
                micro_loss.backward()
                sums = sums + torch.stack([micro_loss.detach(), *stats.values()])
            grad_norm = common.clip_gradients(params, cfg.max_grad_norm)
            (loss_value, *values), norm = common.sync_and_check(step, sums, grad_norm)
            lr = common.optimizer_step(optimizer, scheduler)
            books.end_step(step, sum(tokens), lr=lr, grad_norm=norm, loss=loss_value,
                           **dict(zip(stats, values)))

        final = common.export_model(model, run_dir, tokenizer=tokenizer, base_model=cfg.model)
        logger.write(f"final model: {final}")
    return run_dir


if __name__ == "__main__":
    sys.exit(main(prog="python -m kernelrl.train.sft"))
