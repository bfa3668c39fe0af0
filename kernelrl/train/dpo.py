"""Direct Preference Optimization (DPO): fit a policy to preferences without a reward model.

Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model", eq. 7. For a prompt x with a better response y_w and a worse one y_l, the
policy π_θ and a frozen reference policy π_ref (the model training starts from),

    c = log π_θ(y_w | x) − log π_ref(y_w | x),    r = log π_θ(y_l | x) − log π_ref(y_l | x)
    loss = −log σ(β · (c − r))

β.c and β.r are the implicit rewards: DPO is the RLHF objective max E[reward] − β·KL(π_θ ‖
π_ref) solved in closed form, so β is the strength of the pull towards the reference (small
β: the policy may drift far). ``--loss-type`` picks another loss on the same four log-probs
(IPO, SLiC hinge, robust DPO, EXO, NCA, BCO, SPPO, APO, DiscoPOP; the formulas and papers are
in ``kernelrl.ops.preference``); ``ipo`` gets length-averaged log-probs, as in TRL, the
others the sums over the response tokens.

Legend: B prompts (``--batch-size`` per micro-batch), K responses of one prompt, S = ΣK
sequences, P pairs, T time. A log-prob log π(y | x) is the sum of the response tokens'
log-probs (``kernelrl.models.logprobs.sequence_logprobs``: hidden states and the lm_head
through ``kernelrl.ops.linear_logprobs``; the [S, T, V] logits are never built). Each of the
S responses is forwarded once, through the policy and through the reference, whatever its
number of pairs: a ranking of K responses costs K forwards, not 2·C(K, 2).

The step's loss, over micro-batches m = 1..M (``--grad-accum``) of B_m prompts each,

    L = Σ_m (B_m / Σ_m B_m) · Σ_{pairs p of m} w_p · loss_p,   w_p = 1 / (pairs of its prompt) / B_m

is the loss averaged over each prompt's pairs, then over all the step's prompts: prompt-exact
accumulation, so ``--batch-size 2 --grad-accum 2`` and ``--batch-size 4`` give the same
step up to float rounding. The logged metrics are the same weighted means over the step's
pairs: rewards/chosen (β·c), rewards/rejected (β·r), rewards/margins, rewards/accuracies
(the fraction with β·c > β·r), logps/chosen and logps/rejected (the policy's), and eval/…
of all of them on held-out data.

The reference (``--ref``):
- with LoRA (``--lora-r`` > 0) it is the same model with its adapters disabled: no second
  copy, and ``--ref`` is ignored;
- ``copy``: a frozen second copy of the initial model, loaded from ``--model``;
- ``precompute``: the reference log-probs of every train and eval sequence, computed once
  before training (with the initial model, which then trains) and kept in memory and in the
  run folder (``reference_logps.safetensors``), so a resumed run does not recompute them.
The reference runs in eval mode (no dropout) without gradients, so all three give the same
values up to float rounding.

A mixture-of-experts policy (``--moe-kernels``) adds its router's load-balancing loss of the
policy forward (not the reference's), ``--router-aux-coef`` × aux, to each micro-batch's
loss with the micro-batch's weight (``common.RouterAux``); ``aux_loss`` is logged.

Where this deviates from the paper and from TRL:
- rankings: K ranked responses give all C(K, 2) pairs, averaged per prompt (a chosen/
  rejected file gives exactly TRL's mean over pairs);
- TRL switches dropout off in the policy by default; here the policy keeps the dropout its
  config and ``--lora-dropout`` give it (the reference never has any);
- the schedule is linear warmup then cosine decay (TRL: linear decay); no SFT term on the
  chosen response (TRL's ``rpo_alpha``), no reference-model updates (TR-DPO), and
  ``bco_pair`` without BCO's running reward mean;
- overlong examples are cut as ``kernelrl.train.data`` says (the prompt's oldest tokens
  first, one cut shared by all K responses).

Run folder (``--out``): config.toml, metrics.jsonl, curves.png, checkpoints/step-<N>/, with
``precompute`` reference_logps.safetensors, and the final model (``model/`` or, with LoRA,
the PEFT folder ``adapter/``). ``--resume latest`` continues a stopped run bitwise.

Command line: ``python -m kernelrl.train.dpo --help`` (or ``kernelrl dpo``).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from kernelrl.models.logprobs import sequence_logprobs
from kernelrl.models.lora import disable_adapters, lora_modules
from kernelrl.ops import dpo_loss
from kernelrl.train import common
from kernelrl.train.batching import BatchLoader, PreferenceBatch
from kernelrl.train.data import PreferenceDataset, load_preferences
from kernelrl.train.metrics import RunLogger

__all__ = ["DPOConfig", "Reference", "REFERENCE_FILE", "METRICS", "dpo_step_loss",
           "reference_logps", "precompute_reference", "evaluate", "train", "main"]

REFERENCE_FILE = "reference_logps.safetensors"
#: the per-step metrics besides the loss, each a weighted mean over the step's pairs
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


@dataclass
class DPOConfig(common.TrainConfig):
    """Direct Preference Optimization on chosen/rejected pairs or rankings.

    The settings every trainer takes are declared in ``kernelrl.train.common.TrainConfig``;
    the fields below change the default or help of some of them, then add DPO's own."""

    model: str = field(metadata={"help": "local model folder (config.json + safetensors, "
                                         "as save_pretrained writes it), usually an SFT "
                                         "model; also the reference. Never downloaded"})
    data: str = field(metadata={"help": common.PREFERENCE_DATA_HELP})
    lr: float = field(default=1e-6, metadata={"help": "peak learning rate (AdamW)"})
    dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={
        "help": "dtype of the model weights (the reference's too)"})
    autocast: Literal["none", "bfloat16"] = field(default="none", metadata={
        "help": "run the forwards under bf16 autocast (weights keep --dtype)"})
    ref: Literal["copy", "precompute"] = field(default="copy", metadata={
        "help": "the reference policy: copy (a frozen second copy of --model) or precompute "
                "(its log-probs computed once before training and cached in --out); "
                "ignored with --lora-r > 0, where the reference is the model with its "
                "adapters disabled"})
    beta: float = field(default=0.1, metadata={
        "help": "β: the strength of the pull towards the reference (the KL coefficient)"})
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair",
                       "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop"] = field(
        default="sigmoid", metadata={"help": "the preference loss; sigmoid is DPO (ipo uses "
                                             "length-averaged log-probs)"})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "ε, the assumed rate of flipped labels: sigmoid (cDPO), robust ([0, 0.5)) "
                "and exo_pair ((0, 1)) use it"})
    discopop_tau: float = field(default=0.05, metadata={
        "help": "τ, the temperature of the discopop loss's mixing weight"})

    def __post_init__(self):
        common.validate_common(self)
        if self.ref not in ("copy", "precompute"):
            raise ValueError(f"--ref: expected copy or precompute, got {self.ref!r}")
        # β, ε (whose range depends on the loss type), τ and the loss type: the op's checks.
        zero = torch.zeros(1)
        try:
            dpo_loss(zero, zero, zero, zero, beta=self.beta, loss_type=self.loss_type,
                     label_smoothing=self.label_smoothing, discopop_tau=self.discopop_tau)
        except ValueError as exc:
            name, _, rest = str(exc).partition(":")
            raise ValueError(f"--{name.replace('_', '-')}:{rest}") from None


def main(argv: Sequence[str] | None = None, prog: str = "kernelrl dpo") -> int:
    """``kernelrl dpo``: ``run_main`` for DPOConfig and ``train`` (exit status 0, 1 or 2)."""
    return common.run_main(DPOConfig, train, argv, prog=prog,
                           description="Direct Preference Optimization (DPO and its loss "
                                       "variants) of a causal LM on preference pairs or "
                                       "rankings, against a frozen reference.")

# ----------------------------------------------------------------------------------------
# One step's loss, and the reference


def dpo_step_loss(policy: nn.Module, batch: PreferenceBatch, ref_logps: torch.Tensor,
                  cfg: DPOConfig, *, weight: float = 1.0
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss of one micro-batch (on the policy's device), ready for ``backward``.

    Forwards the batch's S sequences once through ``policy`` (under ``cfg.autocast``),
    takes each pair's (better, worse) log-probs and ``ref_logps`` [S] (the reference's,
    same order, e.g. from ``reference_logps``), and returns

        loss  = weight · Σ_p pair_weight_p · dpo_loss_p        (0-d, with gradients)
        stats = {name: weight · Σ_p pair_weight_p · value_p}   (0-d, detached; METRICS)

    ``weight`` = B_m / (prompts of the step) makes the sum over a step's micro-batches the
    step's loss and its metrics' means (module docstring); 1 gives this batch's own.
    """
    average = cfg.loss_type == "ipo"
    with common.autocast(batch.input_ids.device, cfg.autocast):
        logps = sequence_logprobs(policy, batch.input_ids, batch.attention_mask,
                                  batch.labels, average=average)            # [S]
    ref_logps = ref_logps.to(logps.dtype)
    chosen, rejected = logps[batch.better], logps[batch.worse]              # [P]
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen, rejected, ref_logps[batch.better], ref_logps[batch.worse], beta=cfg.beta,
        loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
        discopop_tau=cfg.discopop_tau)
    w = batch.pair_weight.to(losses) * weight                               # [P]
    values = (chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).to(w),
              chosen_rewards - rejected_rewards, chosen.detach(), rejected.detach())
    stats = {name: (w * v.to(w)).sum() for name, v in zip(METRICS, values)}
    return (w * losses).sum(), stats


def reference_logps(model: nn.Module, batch: PreferenceBatch, cfg: DPOConfig, *,
                    adapters_off: bool = False) -> torch.Tensor:
    """The reference's log-probs of the batch's S sequences: [S], no gradients, computed
    in eval mode (``model``'s mode is restored after) and, with ``adapters_off``, with the
    LoRA adapters disabled (the LoRA policy's own reference)."""
    training = model.training
    off = disable_adapters(model) if adapters_off else contextlib.nullcontext()
    model.eval()
    try:
        with torch.no_grad(), off, common.autocast(batch.input_ids.device, cfg.autocast):
            return sequence_logprobs(model, batch.input_ids, batch.attention_mask,
                                     batch.labels, average=cfg.loss_type == "ipo")
    finally:
        model.train(training)


def precompute_reference(model: nn.Module, dataset: PreferenceDataset, cfg: DPOConfig,
                         device: torch.device, *, adapters_off: bool = False) -> torch.Tensor:
    """``reference_logps`` of every sequence of ``dataset``, in dataset order (example 0's
    responses, then example 1's, ...): [Σ K] on ``device``. Batches of ``cfg.batch_size``
    prompts."""
    loader = BatchLoader(dataset, cfg.batch_size, shuffle=False, num_epochs=1)
    return torch.cat([reference_logps(model, batch.to(device), cfg, adapters_off=adapters_off)
                      for batch in loader])


class Reference:
    """π_ref's log-probs for a batch, whichever way it is kept (module docstring): a model
    (the frozen copy, or the LoRA policy with ``adapters_off``), or ``cache``: split name
    ("train", "eval") -> that split's precomputed log-probs in dataset order."""

    def __init__(self, cfg: DPOConfig, model: nn.Module | None = None, *,
                 adapters_off: bool = False, cache: dict[str, torch.Tensor] | None = None,
                 datasets: dict[str, PreferenceDataset] | None = None):
        self.cfg, self.model, self.adapters_off, self.cache = cfg, model, adapters_off, cache
        self.first: dict[str, list[int]] = {}     # split -> first sequence of each example
        for split, data in (datasets or {}).items():
            self.first[split] = [0]
            for sample in data.samples:
                self.first[split].append(self.first[split][-1] + len(sample.responses))

    def logps(self, batch: PreferenceBatch, units: Sequence[int], split: str) -> torch.Tensor:
        """[S] for ``batch`` (on the model's device), collated from examples ``units`` of
        the split ``split``."""
        if self.cache is None:
            return reference_logps(self.model, batch, self.cfg, adapters_off=self.adapters_off)
        first = self.first[split]
        index = [s for u in units for s in range(first[u], first[u + 1])]
        table = self.cache[split]
        return table[torch.tensor(index, dtype=torch.long).to(table.device, non_blocking=True)]


def _cache_key(cfg: DPOConfig) -> dict[str, str]:
    """What the cached reference log-probs depend on besides the data, stored with them."""
    return {"model": str(Path(cfg.model).resolve()), "average": str(cfg.loss_type == "ipo"),
            "dtype": cfg.dtype, "autocast": cfg.autocast}


def _read_cache(path: Path, datasets: dict[str, PreferenceDataset], key: dict[str, str],
                device: torch.device) -> dict[str, torch.Tensor] | None:
    """The cached reference log-probs at ``path`` if they were computed with these
    settings (``_cache_key``) for datasets of these sizes; None otherwise (they are then
    recomputed)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if f.metadata() != key or set(f.keys()) != set(datasets):
                return None
            cache = {split: f.get_tensor(split) for split in datasets}
    except (OSError, SafetensorError):          # unreadable: recompute it
        return None
    for split, data in datasets.items():
        if cache[split].shape != (sum(len(s.responses) for s in data.samples),):
            return None
    return {split: t.to(device) for split, t in cache.items()}


def _write_cache(path: Path, cache: dict[str, torch.Tensor], key: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in cache.items()}, str(tmp),
              metadata=key)
    os.replace(tmp, path)


def evaluate(model: nn.Module, reference: Reference, dataset: PreferenceDataset,
             cfg: DPOConfig, device: torch.device, split: str = "eval") -> dict[str, float]:
    """The loss and METRICS over the whole held-out set at once (each prompt weighing the
    same, as in training), keyed ``eval/loss``, ``eval/rewards/chosen``, ... Runs in eval
    mode without gradients, draws nothing from the global RNG, and leaves ``model`` in
    train mode."""
    loader = BatchLoader(dataset, cfg.batch_size, shuffle=False, num_epochs=1)
    totals = torch.zeros(1 + len(METRICS), dtype=torch.float64, device=device)
    model.eval()
    with torch.no_grad():
        for units in loader.sampler:
            batch = loader.collate(units).to(device)
            loss, stats = dpo_step_loss(model, batch, reference.logps(batch, units, split),
                                        cfg, weight=len(units) / len(dataset))
            totals += torch.stack([loss, *stats.values()]).double()
    model.train()
    return dict(zip(("eval/loss",) + tuple(f"eval/{m}" for m in METRICS), totals.tolist()))


# ----------------------------------------------------------------------------------------
# The trainer


def _build_reference(cfg: DPOConfig, model: nn.Module, device: torch.device,
                     datasets: dict[str, PreferenceDataset], run_dir: Path,
                     ckpt_run: Path | None) -> tuple[Reference, str, bool]:
    """(the reference for this run, a line for the log, whether its cache is still to be
    written to the run folder). Call it before the checkpoint is restored: ``precompute``
    with full fine-tuning computes with ``model`` as loaded from ``--model``."""
    if lora_modules(model):
        return (Reference(cfg, model, adapters_off=True), f"reference: the model with its "
                f"LoRA adapters disabled (--ref {cfg.ref} is ignored with LoRA)", False)
    if cfg.ref == "copy":
        return (Reference(cfg, common.frozen_copy(cfg, device)),
                f"reference: a frozen copy of {cfg.model}", False)
    here = run_dir / REFERENCE_FILE
    for source in (here, ckpt_run / REFERENCE_FILE if ckpt_run else None):
        cache = _read_cache(source, datasets, _cache_key(cfg), device) if source else None
        if cache is not None:
            return (Reference(cfg, cache=cache, datasets=datasets),
                    f"reference: log-probs read from {source}", source != here)
    cache = {split: precompute_reference(model, data, cfg, device)
             for split, data in datasets.items()}
    count = sum(len(t) for t in cache.values())
    return (Reference(cfg, cache=cache, datasets=datasets),
            f"reference: log-probs of {count} sequences precomputed into {here}", True)


def train(cfg: DPOConfig) -> Path:
    """Run (or resume) DPO as ``cfg`` says; returns the run folder (module docstring)."""
    device = common.choose_device(cfg.device)
    common.seed_everything(cfg.seed)

    # -- 1. The inputs, checked before the run folder is touched --------------------------
    tokenizer = common.load_run_tokenizer(cfg)
    train_set, eval_set = load_preferences(cfg.data, tokenizer, **common.data_options(cfg))
    datasets = {"train": train_set} | ({"eval": eval_set} if eval_set is not None else {})
    # One sampler batch = one optimizer step's prompts, cut into micro-batches below.
    loader, total_steps = common.step_loader(train_set, cfg)

    # -- 2. Run folder, model, reference, optimizer, schedule; the checkpoint's state -----
    run_dir, ckpt = common.start_run(cfg.out, cfg.resume, device=device)
    common.check_step_batch(ckpt, cfg, "prompts")     # before the reference's forwards
    model = common.setup_model_from_config(cfg, device)
    aux = common.RouterAux(model, cfg)                   # the MoE router's aux loss, or off
    optimizer, scheduler = common.optimizer_and_schedule(model, cfg, total_steps)
    reference, ref_line, unsaved = _build_reference(
        cfg, model, device, datasets, run_dir, ckpt.path.parent.parent if ckpt else None)
    step, _, extra = common.restore(ckpt, model, optimizer, scheduler, loader)
    common.write_config(run_dir, cfg, resumed=ckpt is not None)
    if unsaved:
        _write_cache(run_dir / REFERENCE_FILE, reference.cache, _cache_key(cfg))

    with RunLogger(run_dir, total_steps, resume_step=step if ckpt else None, desc="dpo") as logger:
        common.log_start(logger, model, ckpt, step, total_steps, datasets, aux=aux)
        logger.write(ref_line)
        books = common.Bookkeeper(
            logger, run_dir, cfg, total_steps, model=model, optimizer=optimizer,
            scheduler=scheduler, loader=loader, extra=extra,
            evaluate=None if eval_set is None else (
                lambda: evaluate(model, reference, eval_set, cfg, device)))

        # -- 3. The loop: one optimizer step per iteration --------------------------------
        params = common.trainable_parameters(model)      # what the loop clips
        order = iter(loader.sampler)
        while step < total_steps:
            step += 1
            units = next(order)
            sums = torch.zeros((), device=device)      # + [loss, METRICS (, aux_loss)]
            n_tokens = 0
            for part in common.micro_batches(units, cfg.batch_size):
                cpu_batch = loader.collate(part)
                n_tokens += int(cpu_batch.attention_mask.sum())
                batch = cpu_batch.to(device)
                ref = reference.logps(batch, part, "train")
                loss, stats = dpo_step_loss(model, batch, ref, cfg,
                                            weight=len(part) / len(units))
                loss, stats = aux.add(loss, stats, weight=len(part) / len(units),
                                      mask=batch.attention_mask)     # the policy forward's
                loss.backward()
                sums = sums + torch.stack([loss.detach(), *stats.values()]).to(sums)
            grad_norm = common.clip_gradients(params, cfg.max_grad_norm)
            values, norm = common.sync_and_check(step, sums, grad_norm)
            lr = common.optimizer_step(optimizer, scheduler)
            books.end_step(step, n_tokens, lr=lr, grad_norm=norm,
                           **dict(zip(("loss", *stats), values)))

        final = common.export_model(model, run_dir, tokenizer=tokenizer, base_model=cfg.model)
        logger.write(f"final model: {final}")
    return run_dir


if __name__ == "__main__":
    sys.exit(main(prog="python -m kernelrl.train.dpo"))
