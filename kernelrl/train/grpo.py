"""Group Relative Policy Optimization (GRPO): policy-gradient RL without a critic.

Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
Language Models", §4.1. For each prompt q the policy samples a group of G completions
o_1..o_G; a reward model or a rule scores them r_1..r_G; each completion's advantage is its
score relative to its group (outcome supervision, §4.1.2):

    A_i = (r_i − mean(r_1..r_G)) / (std(r_1..r_G) + ε)           one number per completion

so the group itself is the baseline, and no value model is trained. The policy then
maximises the clipped surrogate with a KL term to a frozen reference π_ref, as a loss term
rather than a reward penalty (eq. 3):

    ρ_{i,t} = π_θ(o_{i,t} | q, o_{i,<t}) / π_old(o_{i,t} | q, o_{i,<t})
    L(θ) = −(1/G) Σ_i (1/|o_i|) Σ_t [ min(ρ_{i,t} A_i, clip(ρ_{i,t}, 1 − ε_l, 1 + ε_h) A_i)
                                       − β · k3_{i,t} ]
    k3_{i,t} = π_ref/π_θ − log(π_ref/π_θ) − 1                    (eq. 4, always ≥ 0)

averaged over the step's prompts. Legend: B prompts (``--batch-size`` per micro-batch), G
group size (``--group-size``), so B·G sequences per micro-batch; T time (prompt +
response); R LoRA rank. The formulas are those of ``kernelrl.ops.group_advantages``
(A_i) and ``kernelrl.ops.ppo_loss`` (L, fused forward and backward).

A step (what ``--max-steps`` counts):
    1. draw ``--batch-size`` × ``--grad-accum`` prompts (a seeded, resumable order);
    2. per micro-batch of B prompts: sample G completions each (``generate``, KV cache,
       eval mode, no gradients; never ``--bad-token-ids``, by default the tokenizer's
       special tokens but EOS), the old and reference log-probs [B·G, T] and the scores
       (``kernelrl.train.rl.collect_experience``), minus ``--missing-eos-penalty`` for a
       completion cut off by ``--max-new-tokens``;
    3. A_i = ``group_advantages`` of all the step's scores [B·G·M];
    4. μ = ``--num-ppo-epochs`` passes over the micro-batches, cut into mini-batches of
       ``--mini-batch-size`` prompts: each mini-batch is one optimizer update, its
       micro-batches' gradients accumulated. The first update of a step has ρ = 1 exactly
       (the old log-probs come from the same call on the same weights; the ban of
       ``--bad-token-ids`` filters the sampler only, ``kernelrl.train.rollout``). The
       learning-rate schedule advances once per step, after its last update
       (``kernelrl.train.rl_update.run_updates``, the update phase PPO runs too).

Gradient normalisation. ``ppo_loss`` aggregates a micro-batch (``--loss-agg``); the
update's loss is the same aggregate over its whole mini-batch, so micro-batch m (B_m
sequences, n_m response tokens) is weighted by B_m / Σ B_m for the per-sequence modes and
by n_m / Σ n_m for ``token-mean``: ``--batch-size 2 --grad-accum 2`` and
``--batch-size 4`` give the same update up to float rounding.

Host syncs in a step, each on purpose: those of sampling and of each log-prob call
(``kernelrl.train.rollout``), the reward function's (it reads texts), one for the step's
rollout metrics (``rl.rollout_metrics``), and one per optimizer update
(``common.sync_and_check``: its loss must be finite before the weights change).

Where this deviates from the paper (options give the variants that followed it):
- ``--loss-agg``: ``seq-mean-token-mean`` is eq. 3; ``token-mean`` is DAPO's token-level
  loss (Yu et al. 2025); ``seq-mean-token-sum-norm`` is Dr. GRPO's (Liu et al. 2025), each
  completion's token sum divided by a constant, ``--max-new-tokens``;
- ``--baseline loo`` is RLOO's leave-one-out baseline (Ahmadian et al. 2024);
  ``--no-normalize-std`` drops the division by the group's std (Dr. GRPO);
- ``--clip-eps-high`` above ``--clip-eps`` is DAPO's clip-higher; no dynamic sampling
  (groups with equal scores have A = 0 and still count in the averages);
- ``--kl-penalty β`` instead puts the KL into the score, r_i − β · Σ_t log(π_old/π_ref),
  before the group normalisation (with ``--kl-target``, β adapts as in Ziegler et al.
  2019); the paper's k3 loss term is ``--kl-loss-coef`` (0.04 by default, as the paper);
- the reference stays the initial model (the paper's iterative GRPO resets it and
  retrains the reward model); no dropout in the policy (the ratio needs the same network
  at sampling and update; ``--lora-dropout`` must be 0);
- optional LoRA (``--lora-r``): the reference is then the base with the adapters
  disabled, no copy; a LoRA reward model trained on the same ``--model`` then sits on the
  same base.

Metrics per step: loss, pg_loss, reward (mean score before penalties), reward_std, kl
(mean Σ_t log π_old/π_ref, with a reference), kl_loss (k3, with ``--kl-loss-coef``),
kl_coef (with ``--kl-penalty``), clipfrac, approx_kl, entropy, response_length, truncated
(fraction without EOS), rollout/logprob_drift, rollout/tokens_per_s (generated tokens per
second of sampling), update/tokens_per_s, lr, grad_norm (the mean over the step's
updates), aux_loss (a mixture-of-experts policy's router load-balancing loss of the update
forwards, added to the loss × ``--router-aux-coef``: ``common.RouterAux``); eval/reward and
eval/response_length on held-out prompts.

Run folder (``--out``): config.toml, metrics.jsonl, curves.png, checkpoints/step-<N>/
(the policy's trainable state, optimizer, schedule, RNG, prompt order, KL coefficient:
``--resume latest`` continues bitwise, the same completions sampled as without the stop),
and the policy as the other trainers export it (``model/`` or, with LoRA, ``adapter/``).

Command line: ``python -m kernelrl.train.grpo --help`` (or ``kernelrl grpo``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
from torch import nn

from kernelrl.ops import group_advantages, ppo_loss
from kernelrl.train import common, rl, rl_update, settings
from kernelrl.train.metrics import RunLogger

__all__ = ["GRPOConfig", "UPDATE_METRICS", "grpo_loss", "train", "main"]

#: the ppo_loss statistics logged per step (kl_loss with --kl-loss-coef), besides the loss
UPDATE_METRICS = ("pg_loss", "clipfrac", "approx_kl", "kl_loss")


@dataclass
class GRPOConfig(settings.RLConfig):
    """GRPO: group-relative advantages, no critic, a KL loss term to the initial model.

    The settings every trainer takes are declared in ``kernelrl.train.settings.TrainConfig``,
    those GRPO shares with PPO in its subclass ``RLConfig``; the fields below change the
    default or help of some of them, then add GRPO's own."""

    batch_size: int = field(default=4, metadata={
        "help": "prompts per micro-batch, per device; each is sampled --group-size times, "
                "and the micro-batch is generated, scored and trained on together"})
    lr: float = field(default=1e-6, metadata={"help": "peak learning rate (AdamW; the "
                                                      "paper: 1e-6)"})
    clip_eps: float = field(default=0.2, metadata={"help": "ε: the ratio is clipped to "
                                                           "[1 - ε, 1 + ε_high]"})
    group_size: int = field(default=8, metadata={
        "help": "G: completions sampled per prompt (the paper: 64)"})
    baseline: Literal["mean", "loo"] = field(default="mean", metadata={
        "help": "mean: the group's mean (GRPO); loo: the mean of the others (RLOO)"})
    normalize_std: Optional[bool] = field(default=None, metadata={
        "help": "divide advantages by the group's std (default: on for mean, off for "
                "loo; off with mean is Dr. GRPO)"})
    clip_eps_high: Optional[float] = field(default=None, metadata={
        "help": "ε_high (default ε; larger is DAPO's clip-higher, e.g. 0.28)"})
    loss_agg: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = field(
        default="seq-mean-token-mean", metadata={
        "help": "seq-mean-token-mean (GRPO), token-mean (DAPO), seq-mean-token-sum-norm "
                "(Dr. GRPO, divided by --max-new-tokens)"})
    kl_loss_coef: float = field(default=0.04, metadata={
        "help": "β of the k3 KL loss term to the reference (the paper: 0.04; 0: off)"})
    kl_penalty: float = field(default=0.0, metadata={
        "help": "β of a KL penalty subtracted from each score instead (0: off)"})
    kl_target: Optional[float] = field(default=None, metadata={
        "help": "adapt --kl-penalty towards this KL per completion (Ziegler et al.)"})
    kl_horizon: int = field(default=10000, metadata={
        "help": "completions over which the adaptive --kl-penalty moves"})

    def __post_init__(self):
        settings.validate_rl(self)
        settings.check_ints(self, {"group_size": 2, "kl_horizon": 1})
        settings.check_numbers(self, {"kl_loss_coef": settings.NONNEGATIVE,
                                      "kl_penalty": settings.NONNEGATIVE})
        settings.check_numbers(self, {"clip_eps_high": settings.NONNEGATIVE,
                                      "kl_target": settings.POSITIVE}, optional=True)
        if self.kl_target is not None and not self.kl_penalty:
            raise ValueError("--kl-target: adapts --kl-penalty, which is 0; give --kl-penalty")
        if self.kl_penalty and self.kl_loss_coef:
            raise ValueError(f"--kl-penalty {self.kl_penalty} and --kl-loss-coef "
                             f"{self.kl_loss_coef}: give one or the other (--kl-loss-coef 0)")


def main(argv: Sequence[str] | None = None, prog: str = "kernelrl grpo") -> int:
    """``kernelrl grpo``: ``run_main`` for GRPOConfig and ``train`` (exit status 0, 1 or 2)."""
    return common.run_main(GRPOConfig, train, argv, prog=prog,
                           description="Group Relative Policy Optimization of a causal LM "
                                       "on prompts, scored by a reward model or a Python "
                                       "function (GRPO, RLOO, DAPO and Dr. GRPO variants).")

# ----------------------------------------------------------------------------------------
# One micro-batch's loss


def grpo_loss(model: nn.Module, exp: rl.Experience, advantages: torch.Tensor, cfg: GRPOConfig,
              weight: torch.Tensor | float = 1.0, aux: common.RouterAux | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``weight`` · the clipped GRPO loss of one micro-batch of experience (module
    docstring), ready for ``backward``, and ``weight`` · its UPDATE_METRICS (detached).
    ``advantages`` [B·G], one per completion. ``aux``: adds the MoE router's aux loss of
    this forward (and ``aux_loss`` to the statistics)."""
    logprobs, entropy = rl.policy_logprobs(model, exp.rollout, cfg.temperature, cfg.autocast)
    use_kl = cfg.kl_loss_coef > 0
    loss, stats = ppo_loss(
        logprobs, exp.logprobs, advantages, exp.rollout.response_mask,
        clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
        entropy=entropy if cfg.entropy_coef else None, entropy_coef=cfg.entropy_coef,
        ref_logprobs=exp.ref_logprobs if use_kl else None, kl_loss_coef=cfg.kl_loss_coef,
        agg=cfg.loss_agg,
        norm_length=cfg.max_new_tokens if cfg.loss_agg == "seq-mean-token-sum-norm" else None)
    loss, stats = loss * weight, {k: stats[k] * weight for k in UPDATE_METRICS if k in stats}
    if aux is not None:
        loss, stats = aux.add(loss, stats, weight=weight, mask=exp.rollout.attention_mask)
    return loss, stats


def _weigh_by(agg: str) -> str:
    """What weighs a micro-batch in its mini-batch (module docstring): its share of the
    response tokens for token-mean, of the sequences otherwise (``rl_update.shares``)."""
    return "tokens" if agg == "token-mean" else "rows"


# ----------------------------------------------------------------------------------------
# The trainer


def train(cfg: GRPOConfig) -> Path:
    """Run (or resume) GRPO as ``cfg`` says; returns the run folder (module docstring)."""
    device = common.choose_device(cfg.device)
    common.seed_everything(cfg.seed)

    # -- 1. The inputs, checked before the run folder is touched --------------------------
    tokenizer = common.load_run_tokenizer(cfg)
    train_set, eval_set, sampling = rl.run_prompts(cfg, tokenizer)
    # One sampler batch = one step's prompts, cut into micro-batches below.
    loader, total_steps = common.step_loader(train_set, cfg)

    # -- 2. Run folder, policy, reward, reference, optimizer; the checkpoint's state ------
    run_dir, ckpt = common.start_run(cfg.out, cfg.resume, device=device)
    common.check_step_batch(ckpt, cfg, "prompts")
    model = common.setup_model_from_config(cfg, device)
    aux = common.RouterAux(model, cfg)                   # the MoE router's aux loss, or off
    reward, reward_line = rl.run_reward(cfg, model, tokenizer, device)
    rl.disable_dropout(model)       # the policy, and a reward adapter loaded onto it
    reference, ref_line = (rl.Reference.for_policy(model, cfg, device)
                           if cfg.kl_loss_coef or cfg.kl_penalty else (None, "reference: none"))
    kl_ctl = rl_update.kl_controller(cfg.kl_penalty, cfg.kl_target, cfg.kl_horizon)
    state = rl_update.RunState(loader, kl_controller=kl_ctl)   # what a checkpoint's data holds
    optimizer, scheduler = common.optimizer_and_schedule(model, cfg, total_steps)
    step, _, extra = common.restore(ckpt, model, optimizer, scheduler, state)
    common.write_config(run_dir, cfg, resumed=ckpt is not None)

    with RunLogger(run_dir, total_steps, resume_step=step if ckpt else None,
                   desc="grpo") as logger:
        common.log_start(logger, model, ckpt, step, total_steps,
                         {"train": train_set, "eval": eval_set}, skip=("pairs", "pairs_dropped"),
                         aux=aux)
        logger.write(f"{reward_line}; {ref_line}")
        books = common.Bookkeeper(
            logger, run_dir, cfg, total_steps, model=model, optimizer=optimizer,
            scheduler=scheduler, loader=state, extra=extra,
            evaluate=None if eval_set is None else lambda: rl.evaluate_rewards(
                model, eval_set, batch_size=cfg.batch_size * cfg.group_size,
                sampling=sampling, reward=reward, seed=cfg.seed, precision=cfg.autocast))

        # -- 3. The loop: one rollout and its updates per iteration ----------------------
        params = common.trainable_parameters(model)      # what the loop clips
        order = iter(loader.sampler)
        while step < total_steps:
            step += 1
            samples = [train_set[i] for i in next(order)]
            # Rollout: G completions per prompt, scored, with old and reference log-probs.
            experience = [rl.collect_experience(
                model, part, sampling=sampling, reward=reward, repeats=cfg.group_size,
                reference=reference, missing_eos_penalty=cfg.missing_eos_penalty,
                precision=cfg.autocast) for part in common.micro_batches(samples, cfg.batch_size)]
            metrics, tokens = rl.rollout_metrics(experience)          # one host sync
            scores = torch.cat([e.scores for e in experience])
            if cfg.kl_penalty:
                scores = scores - kl_ctl.value * torch.cat([e.kl for e in experience])
            advantages = group_advantages(scores, cfg.group_size, baseline=cfg.baseline,
                                          normalize_std=cfg.normalize_std)
            advantages = advantages.split([e.rollout.batch_size for e in experience])

            # Update: μ epochs of mini-batches, one optimizer update each.
            update = rl_update.run_updates(
                experience, lambda i, weight: grpo_loss(model, experience[i], advantages[i],
                                                        cfg, weight, aux),
                cfg, step=step, weigh_by=_weigh_by(cfg.loss_agg), params=params,
                optimizer=optimizer, scheduler=scheduler)
            if cfg.kl_penalty:
                metrics["kl_coef"] = kl_ctl.value            # the β this step's scores used
                kl_ctl.update(metrics["kl"], len(scores))

            seconds = max(update.seconds, 1e-9)
            metrics["update/tokens_per_s"] = tokens * cfg.num_ppo_epochs / seconds
            books.end_step(step, tokens, lr=update.lr, grad_norm=update.grad_norm,
                           **update.means, **metrics)

        final = common.export_model(model, run_dir, tokenizer=tokenizer, base_model=cfg.model)
        logger.write(f"final model: {final}")
    return run_dir


if __name__ == "__main__":
    sys.exit(main(prog="python -m kernelrl.train.grpo"))
