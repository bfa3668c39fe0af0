"""Reward-model training: a Bradley–Terry model of which of two responses people prefer.

This is step 2 of InstructGPT (Ouyang et al. 2022, "Training language models to follow
instructions with human feedback", §3.5): a decoder with a scalar head, r_θ(x, y) read at
the last real token of prompt x and response y (``kernelrl.models.RewardModel``). A
ranking of K responses to a prompt (K = 4 to 9 in the paper) gives all C(K, 2) pairs
(better, worse); Bradley–Terry: P(better ≻ worse) = σ(r_better − r_worse). The loss (the
paper's eq. 1) averages over a prompt's pairs, then over prompts; for one optimizer step
over micro-batches m = 1..M (``--grad-accum``) of B_m prompts each:

    ℓ(p) = (1 / |pairs(p)|) Σ_{(i, j) ∈ pairs(p)} [ −logσ(r_i − r_j − μ) + c · (r_i + r_j)² ]
    L(θ) = (1 / B) Σ_m Σ_{p ∈ m} ℓ(p),      B = Σ_m B_m   (the step's prompts)

with μ = ``--margin`` and c = ``--center-coef`` (both 0 by default: the paper's loss).
Legend: B prompts, K responses of a prompt, S = ΣK sequences of a micro-batch, P pairs,
T time, H hidden width, R LoRA rank.

All of a prompt's pairs are in one batch, and each response is forwarded once: a
micro-batch is S sequences in one forward, S scores, and the pairs index into them
(``PreferenceBatch.better``, ``.worse`` [P]); K sequences per prompt, not 2·C(K, 2) (9, not
72, for K = 9). The paper does the same, for the speed and because it stops the reward
model overfitting, as it does when a prompt's pairs are seen one at a time.

The formula is ``kernelrl.ops.reward_loss``'s, a mean over the pairs it is given. Prompts
with the same number of pairs n weigh each of their pairs equally (1 / (n·B_m),
``PreferenceBatch.pair_weight``), so each such group goes through reward_loss once, its
mean weighted by the group's share of prompts: Σ_n (prompts with n pairs / B_m) ·
reward_loss(their pairs) = Σ_P pair_weight · ℓ_pair (one call for chosen/rejected data).

Prompt-exact accumulation: a step's prompts are drawn at once (``--batch-size`` ×
``--grad-accum``) and cut into micro-batches; micro-batch m's backward uses its loss times
B_m / B, so the accumulated gradient is that of L over all the step's prompts, and
``--batch-size 2 --grad-accum 2`` equals ``--batch-size 4`` up to float rounding.

Where this deviates from the paper:
- InstructGPT starts from the SFT model (pass its export as ``--model``; any local causal
  LM folder works) and does not say how the new head starts; here N(0, 1/(H + 1));
- InstructGPT shifts the trained model by a bias so that labeler demonstrations score 0
  on average; not done here (the data holds no demonstrations). ``--center-coef``
  (Eisenstein et al. 2023's (r_i + r_j)² term) keeps scores near 0 during training instead;
- ``--margin`` is one constant: Llama 2 (Touvron et al. 2023, eq. 2) takes a per-pair
  margin from the labelers' ratings, which these data formats do not carry;
- the schedule (linear warmup, cosine decay) and the epochs are settings (1 by default:
  the paper found more overfit); optional LoRA (``--lora-r``: adapter ``--adapter-name``
  on the decoder, and the head, train);
- the logged ``accuracy`` (fraction of pairs with r_better > r_worse) and ``margin`` (mean
  r_better − r_worse, not ``--margin``) count every pair once; the loss every prompt once;
- a mixture-of-experts base (``--moe-kernels``) adds its router's load-balancing loss,
  ``--router-aux-coef`` × aux, weighed per micro-batch as its loss (``common.RouterAux``;
  ``aux_loss`` logged).

Run folder (``--out``): config.toml, metrics.jsonl (loss, accuracy, margin, lr, grad_norm,
tokens_per_s, tokens_seen, epoch; eval/loss, eval/accuracy, eval/margin at eval steps and
at the end), curves.png, checkpoints/step-<N>/ (the trainable state, with the head;
optimizer, schedule, RNG, data position: ``--resume`` continues exactly), and the final
model, which ``load_reward_model`` reads back:
- full fine-tuning: ``model/``, a Hugging Face sequence-classification checkpoint with one
  label (``AutoModelForSequenceClassification.from_pretrained`` loads it) and the tokenizer;
- LoRA: ``adapter/``, the adapter as a PEFT LoRA folder keyed like the ``--model`` causal
  LM (``load_adapter(causal_lm, folder, "reward")`` or PEFT loads it), the head as
  ``adapter/score.safetensors`` (tensor ``weight`` [1, H]; metadata pad_token_id and
  adapter_name) and the tokenizer. A PPO trainer loads adapter and head onto the base its
  policy trains on (``load_reward_model(run, base=policy_lm)``): one base in memory.

Command line: ``python -m kernelrl.train.rm --help`` (or ``kernelrl rm``).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from kernelrl.models.hf import load_model, local_folder
from kernelrl.models.lora import CONFIG_NAME, load_adapter
from kernelrl.models.reward import RewardModel
from kernelrl.nn.lora import check_adapter_name
from kernelrl.ops.preference import reward_loss
from kernelrl.train import common
from kernelrl.train.batching import BatchLoader, PreferenceBatch
from kernelrl.train.common import ADAPTER_DIR, MODEL_DIR
from kernelrl.train.data import PreferenceDataset, load_preferences
from kernelrl.train.metrics import RunLogger

__all__ = ["RMConfig", "SCORE_FILE", "score_sequences", "pairwise_loss", "evaluate", "train",
           "load_reward_model", "main"]

SCORE_FILE = "score.safetensors"     # the head of a LoRA export, beside the adapter


@dataclass
class RMConfig(common.TrainConfig):
    """Reward-model training on ranked comparisons (Bradley–Terry on scalar scores).

    The settings every trainer takes are declared in ``kernelrl.train.common.TrainConfig``;
    the fields below change the default or help of some of them, then add the reward
    model's own."""

    data: str = field(metadata={"help": common.PREFERENCE_DATA_HELP})
    epochs: int = field(default=1, metadata={
        "help": "passes over the training data (InstructGPT: 1, the reward model overfits "
                "after that)"})
    lr: float = field(default=9e-6, metadata={
        "help": "peak learning rate (AdamW; InstructGPT's reward model: 9e-6)"})
    lora_r: int = field(default=0, metadata={
        "help": "LoRA rank R; 0 trains every decoder parameter (full fine-tuning)"})
    seed: int = field(default=0, metadata={
        "help": "seed for the head and adapter initialisation, data order, split, dropout"})
    margin: float = field(default=0.0, metadata={
        "help": "margin subtracted inside the sigmoid: −logσ(r_better − r_worse − margin) "
                "(0: the paper's loss)"})
    center_coef: float = field(default=0.0, metadata={
        "help": "weight of the reward-centering term (r_better + r_worse)², which keeps "
                "scores near 0 (0: off, the paper's loss; TRL suggests 0.01)"})
    adapter_name: str = field(default="reward", metadata={
        "help": "name of the LoRA adapter (the name a PPO trainer loads it under)"})

    def __post_init__(self):
        common.validate_common(self)
        common.check_numbers(self, {
            "margin": (math.isfinite, "a finite number"),
            "center_coef": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")})
        try:
            check_adapter_name(self.adapter_name)
        except ValueError:
            raise common.bad_setting(self, "adapter_name", "a Python identifier (it becomes "
                                                           "a parameter name)") from None


def main(argv: Sequence[str] | None = None, prog: str = "kernelrl rm") -> int:
    """``kernelrl rm``: ``run_main`` for RMConfig and ``train`` (exit status 0, 1 or 2)."""
    return common.run_main(RMConfig, train, argv, prog=prog,
                           description="Train a Bradley-Terry reward model on ranked "
                                       "comparisons (chosen/rejected pairs or K-way rankings, "
                                       "all C(K,2) pairs of a prompt in one batch).")

# ----------------------------------------------------------------------------------------
# Scores and the loss


def score_sequences(model: RewardModel, batch: PreferenceBatch, device: torch.device,
                    precision: str = "none") -> torch.Tensor:
    """The scores [S] (float32, on ``device``) of the batch's S sequences: one forward of
    the whole batch, each response once."""
    ids = batch.input_ids.to(device, non_blocking=True)
    mask = batch.attention_mask.to(device, non_blocking=True)
    with common.autocast(device, precision):
        return model(ids, mask)


def _pair_groups(batch: PreferenceBatch) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
    """(share, better, worse) for each group of the batch's prompts that have the same
    number of pairs: share = the group's prompts / the batch's prompts; better and worse
    index the group's pairs into the batch's sequences. Computed on the CPU batch (the
    collated tensors), so no device sync."""
    per_prompt = torch.bincount(batch.pair_prompt, minlength=batch.num_prompts)   # [B]
    pair_count = per_prompt[batch.pair_prompt]                                    # [P]
    groups = []
    for n in sorted(set(per_prompt.tolist()) - {0}):
        picked = pair_count == n
        share = int((per_prompt == n).sum()) / batch.num_prompts
        groups.append((share, batch.better[picked], batch.worse[picked]))
    return groups


def pairwise_loss(scores: torch.Tensor, batch: PreferenceBatch, *, margin: float = 0.0,
                  center_coef: float = 0.0) -> torch.Tensor:
    """The batch's loss: ℓ(p) (module docstring) averaged over its prompts, i.e.
    Σ_P pair_weight · (−logσ(r_better − r_worse − margin) + center_coef·(r_better +
    r_worse)²), through ``reward_loss`` once per group of prompts with the same number of
    pairs. ``scores`` [S] from ``score_sequences``; ``batch`` the CPU batch they came from.
    A 0-d float32 tensor on the scores' device."""
    total = scores.new_zeros(())
    for share, better, worse in _pair_groups(batch):
        better = better.to(scores.device, non_blocking=True)
        worse = worse.to(scores.device, non_blocking=True)
        group = reward_loss(scores[better], scores[worse], margin=margin or None,
                            center_coef=center_coef or None)
        total = total + share * group
    return total


def _gaps(scores: torch.Tensor, batch: PreferenceBatch) -> torch.Tensor:
    """r_better − r_worse of every pair [P], detached."""
    better = batch.better.to(scores.device, non_blocking=True)
    worse = batch.worse.to(scores.device, non_blocking=True)
    return (scores[better] - scores[worse]).detach()


def evaluate(model: RewardModel, dataset: PreferenceDataset, cfg: RMConfig,
             device: torch.device) -> dict[str, float]:
    """{"loss", "accuracy", "margin"} over the whole held-out set at once: the loss averaged
    over its prompts (as L), the fraction of its pairs ranked right (r_better > r_worse)
    and their mean r_better − r_worse. Runs without gradients in eval mode, draws nothing
    from the global RNG, and leaves the model in train mode."""
    loader = BatchLoader(dataset, cfg.batch_size, shuffle=False, num_epochs=1)
    sums = torch.zeros(3, dtype=torch.float64, device=device)     # loss·B, right, gap
    prompts = pairs = 0
    model.eval()
    with torch.no_grad():
        for batch in loader:
            scores = score_sequences(model, batch, device, cfg.autocast)
            loss = pairwise_loss(scores, batch, margin=cfg.margin, center_coef=cfg.center_coef)
            gaps = _gaps(scores, batch)
            sums += torch.stack([loss * batch.num_prompts, (gaps > 0).sum().float(),
                                 gaps.sum()])
            prompts, pairs = prompts + batch.num_prompts, pairs + batch.num_pairs
    model.train()
    loss_sum, right, gap = sums.tolist()
    return {"loss": loss_sum / prompts, "accuracy": right / pairs, "margin": gap / pairs}


# ----------------------------------------------------------------------------------------
# The model and its export


def _build_model(cfg: RMConfig, device: torch.device,
                 pad_token_id: int) -> tuple[RewardModel, nn.Module | None]:
    """The reward model: the ``--model`` causal LM's decoder under a new head (drawn from
    the global RNG). With LoRA, the decoder carries adapter ``--adapter-name`` and only it
    and the head train; the causal LM is returned too, since the adapter's PEFT key names
    are relative to it. Without LoRA every decoder weight and the head train, and the
    causal LM (its lm_head unused) is not kept."""
    lm = common.setup_model_from_config(cfg, device, adapter_name=cfg.adapter_name)
    model = RewardModel.from_causal_lm(lm, pad_token_id=pad_token_id)
    model.score.requires_grad_(True)       # LoRA froze the rest; the head trains
    model.train()
    return model, (lm if cfg.lora_r else None)


def _export_lora(model: RewardModel, lm: nn.Module, run_dir: Path, cfg: RMConfig,
                 tokenizer) -> Path:
    """``<run>/adapter``: the PEFT folder of the adapter (keyed like the causal LM), the
    head, the tokenizer."""
    from safetensors.torch import save_file

    folder = common.export_model(lm, run_dir, tokenizer=tokenizer, base_model=cfg.model,
                                 adapter_name=cfg.adapter_name)
    head = model.score.weight.detach().cpu().contiguous()
    save_file({"weight": head}, str(folder / SCORE_FILE),
              metadata={"format": "pt", "pad_token_id": str(model.pad_token_id),
                        "adapter_name": cfg.adapter_name})
    return folder


def _read_head(path: Path) -> tuple[torch.Tensor, int | None]:
    """(head weight [1, H], pad_token_id) from an exported ``score.safetensors``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if "weight" not in f.keys():
            raise ValueError(f"{path}: expected a tensor named 'weight' (the reward head, "
                             f"[1, H]), got {sorted(f.keys())}")
        weight = f.get_tensor("weight")
        pad = (f.metadata() or {}).get("pad_token_id")
    if weight.ndim != 2 or weight.shape[0] != 1:
        raise ValueError(f"{path}: expected the head's weight of shape [1, H], got "
                         f"{tuple(weight.shape)}")
    return weight, int(pad) if pad not in (None, "None") else None


def load_reward_model(path: str | os.PathLike, base: str | os.PathLike | nn.Module | None = None,
                      *, adapter_name: str = "reward", dtype: str | torch.dtype = "float32",
                      device: torch.device | str = "cpu",
                      attn_implementation: str | None = None,
                      trainable: bool = False) -> RewardModel:
    """A reward model written by this trainer, from either export.

    path: a run folder (its ``model/`` or ``adapter/`` is used), a sequence-classification
        folder (config.json with num_labels=1, as ``model/``), or a LoRA export folder
        (adapter_config.json with ``score.safetensors``, as ``adapter/``).
    base: LoRA export only. The causal LM the adapter goes on: a local folder (default:
        the adapter's recorded base_model_name_or_path), or a loaded causal LM, e.g. a PPO
        policy's. A loaded one is changed in place (the adapter is added under
        ``adapter_name``, its base weights frozen, its other adapters left as they are)
        and shared: the returned model's decoder is its decoder. Its active adapter does
        not change when it already had one, so score inside
        ``kernelrl.models.lora.use_adapter(base, adapter_name)``.
    dtype, device, attn_implementation: for what is loaded from folders.
    trainable: whether the loaded adapter (or, for a full export, every weight) and the
        head require gradients; False (frozen) by default.

    A model loaded from folders is returned in eval mode; with a loaded ``base`` the mode
    is left to the caller (the policy's own). Loading draws nothing from the global RNG.
    """
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):        # new layers draw from it: undone
        folder = Path(path).expanduser()
        for sub, marker in ((MODEL_DIR, "config.json"), (ADAPTER_DIR, SCORE_FILE)):
            if (folder / sub / marker).is_file():
                folder = folder / sub
                break
        if (folder / SCORE_FILE).is_file():
            return _load_lora_export(folder, base, adapter_name, dtype, device,
                                     attn_implementation, trainable)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"path: {str(path)!r} holds no reward model: expected a run folder with "
                f"{MODEL_DIR}/ or {ADAPTER_DIR}/, a sequence-classification folder "
                f"(config.json + safetensors), or a LoRA export ({CONFIG_NAME} + "
                f"{SCORE_FILE})")
        if base is not None:
            raise ValueError(f"base: only a LoRA export needs a base model; {str(folder)!r} "
                             f"is a full sequence-classification checkpoint")
        model = RewardModel.from_pretrained(folder, dtype=dtype, device=device,
                                            attn_implementation=attn_implementation)
    return model.requires_grad_(trainable).eval()


def _load_lora_export(folder: Path, base, adapter_name, dtype, device, attn_implementation,
                      trainable) -> RewardModel:
    weight, pad_token_id = _read_head(folder / SCORE_FILE)
    owned = not isinstance(base, nn.Module)
    if base is None:
        config = json.loads((folder / CONFIG_NAME).read_text()) \
            if (folder / CONFIG_NAME).is_file() else {}
        base = config.get("base_model_name_or_path")
        if not base:
            raise ValueError(f"base: {folder / CONFIG_NAME} records no base model "
                             f"(base_model_name_or_path); pass base=")
    lm = load_model(local_folder(base, "base"), dtype=dtype, device=device,
                    attn_implementation=attn_implementation) if owned else base
    embeddings = lm.get_input_embeddings().weight
    if weight.shape[1] != embeddings.shape[1]:        # checked before the base is changed
        raise ValueError(f"{folder / SCORE_FILE}: the head has width {weight.shape[1]}, the "
                         f"base model's hidden width is {embeddings.shape[1]} (another base?)")
    load_adapter(lm, folder, adapter_name, trainable=trainable)
    head = nn.Linear(weight.shape[1], 1, bias=False, device="meta")     # no RNG draw
    head.weight = nn.Parameter(weight.to(device=embeddings.device, dtype=embeddings.dtype),
                               requires_grad=trainable)
    model = RewardModel(lm.get_decoder(), head, pad_token_id=pad_token_id)
    return model.eval() if owned else model


# ----------------------------------------------------------------------------------------
# The training loop


def train(cfg: RMConfig) -> Path:
    """Run (or resume) reward-model training as ``cfg`` says; returns the run folder (see
    the module docstring for its contents)."""
    device = common.choose_device(cfg.device)
    common.seed_everything(cfg.seed)

    # -- 1. The inputs, checked before the run folder is touched --------------------------
    tokenizer = common.load_run_tokenizer(cfg)
    train_set, eval_set = load_preferences(cfg.data, tokenizer, **common.data_options(cfg))
    loader, total_steps = common.step_loader(train_set, cfg)   # one sampler batch = one step

    # -- 2. Run folder, model, optimizer, schedule; the checkpoint's state if resuming ---
    run_dir, ckpt = common.start_run(cfg.out, cfg.resume, device=device)
    common.check_step_batch(ckpt, cfg, "prompts")
    model, lm = _build_model(cfg, device, train_set.pad_token_id)
    aux = common.RouterAux(model, cfg)                   # the MoE router's aux loss, or off
    optimizer, scheduler = common.optimizer_and_schedule(model, cfg, total_steps)
    step, _, extra = common.restore(ckpt, model, optimizer, scheduler, loader)
    common.write_config(run_dir, cfg, resumed=ckpt is not None)

    with RunLogger(run_dir, total_steps, resume_step=step if ckpt else None, desc="rm") as logger:
        common.log_start(logger, model, ckpt, step, total_steps,
                         {"train": train_set, "eval": eval_set}, aux=aux)
        books = common.Bookkeeper(
            logger, run_dir, cfg, total_steps, model=model, optimizer=optimizer,
            scheduler=scheduler, loader=loader, extra=extra,
            evaluate=None if eval_set is None else lambda: {
                f"eval/{k}": v for k, v in evaluate(model, eval_set, cfg, device).items()})

        # -- 3. The loop: one optimizer step per iteration --------------------------------
        params = common.trainable_parameters(model)      # what the loop clips
        order = iter(loader.sampler)
        while step < total_steps:
            step += 1
            units = next(order)
            micro = [loader.collate(part) for part in common.micro_batches(units, cfg.batch_size)]
            prompts = sum(b.num_prompts for b in micro)                # B of the step
            sums = torch.zeros((), device=device)       # + [loss, right, Σ gap (, aux_loss)]
            for batch in micro:
                scores = score_sequences(model, batch, device, cfg.autocast)
                micro_loss = pairwise_loss(scores, batch, margin=cfg.margin,
                                           center_coef=cfg.center_coef)
                micro_loss = micro_loss * (batch.num_prompts / prompts)
                micro_loss, stats = aux.add(micro_loss, {}, weight=batch.num_prompts / prompts,
                                            mask=batch.attention_mask)
                micro_loss.backward()
                gaps = _gaps(scores, batch)
                sums = sums + torch.stack([micro_loss.detach(), (gaps > 0).sum().float(),
                                           gaps.sum(), *stats.values()])
            grad_norm = common.clip_gradients(params, cfg.max_grad_norm)
            (loss_value, right, gap, *values), norm = common.sync_and_check(step, sums,
                                                                            grad_norm)
            lr = common.optimizer_step(optimizer, scheduler)
            # accuracy and margin: means over the window's pairs; the loss over its steps
            pairs = sum(b.num_pairs for b in micro)
            books.end_step(step, sum(int(b.lengths.sum()) for b in micro), lr=lr,
                           grad_norm=norm, loss=loss_value, accuracy=(right, pairs),
                           margin=(gap, pairs), **dict(zip(stats, values)))

        if lm is not None:
            final = _export_lora(model, lm, run_dir, cfg, tokenizer)
        else:
            final = common.export_model(model, run_dir, tokenizer=tokenizer)
            if model.pad_token_id == tokenizer.eos_token_id:
                logger.write("note: the pad id is the EOS id, so Hugging Face's sequence "
                             "classifier scores the token before a final EOS, where "
                             "kernelrl (load_reward_model) scores the EOS itself; give the "
                             "tokenizer a pad token of its own to make them agree")
        logger.write(f"final model: {final}")
    return run_dir


if __name__ == "__main__":
    sys.exit(main(prog="python -m kernelrl.train.rm"))
