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
       eval mode, no gradients), the old and reference log-probs [B·G, T] and the scores
       (``kernelrl.train.rl.collect_experience``), minus ``--missing-eos-penalty`` for a
       completion cut off by ``--max-new-tokens``;
    3. A_i = ``group_advantages`` of all the step's scores [B·G·M];
    4. μ = ``--num-ppo-epochs`` passes over the micro-batches, cut into mini-batches of
       ``--mini-batch-size`` prompts: each mini-batch is one optimizer update, its
       micro-batches' gradients accumulated. The first update of a step has ρ = 1 exactly
       (the old log-probs come from the same call on the same weights). The learning-rate
       schedule advances once per step, after its last update.

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
updates); eval/reward and eval/response_length on held-out prompts.

Run folder (``--out``): config.toml, metrics.jsonl, curves.png, checkpoints/step-<N>/
(the policy's trainable state, optimizer, schedule, RNG, prompt order, KL coefficient:
``--resume latest`` continues bitwise, the same completions sampled as without the stop),
and the policy as the other trainers export it (``model/`` or, with LoRA, ``adapter/``).

Command line: ``python -m kernelrl.train.grpo --help`` (or ``kernelrl grpo``).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
from torch import nn

from kernelrl.ops import group_advantages, ppo_loss
from kernelrl.train import common, rl
from kernelrl.train.metrics import RunLogger

__all__ = ["GRPOConfig", "UPDATE_METRICS", "grpo_loss", "train", "main"]

#: the ppo_loss statistics logged per step (kl_loss with --kl-loss-coef), besides the loss
UPDATE_METRICS = ("pg_loss", "clipfrac", "approx_kl", "kl_loss")


@dataclass
class GRPOConfig(common.TrainConfig):
    """GRPO: group-relative advantages, no critic, a KL loss term to the initial model.

    The settings every trainer takes are declared in ``kernelrl.train.common.TrainConfig``;
    the fields below change the default or help of some of them, then add GRPO's own."""

    data: str = field(metadata={"help": 'prompts JSONL: {"prompt": str} per line'})
    batch_size: int = field(default=4, metadata={
        "help": "prompts per micro-batch, per device; each is sampled --group-size times, "
                "and the micro-batch is generated, scored and trained on together"})
    grad_accum: int = field(default=1, metadata={
        "help": "micro-batches per step: a step samples --batch-size x --grad-accum "
                "prompts"})
    lr: float = field(default=1e-6, metadata={"help": "peak learning rate (AdamW; the "
                                                      "paper: 1e-6)"})
    max_length: int = field(default=1024, metadata={
        "help": "tokens per sequence: prompts are cut to --max-length - --max-new-tokens "
                "unless --max-prompt-length is given"})
    overlong: Literal["truncate", "drop"] = field(default="truncate", metadata={
        "help": "a prompt over its limit: truncate (its oldest tokens go) or drop it"})
    lora_dropout: float = field(default=0.0, metadata={
        "help": "must be 0: the policy runs without dropout (the importance ratio needs "
                "the same network when sampling and updating)"})
    reward_model: Optional[str] = field(default=None, metadata={
        "help": "reward model: a kernelrl rm run folder or its model/ or adapter/ export "
                "(or --reward-fn)"})
    reward_fn: Optional[str] = field(default=None, metadata={
        "help": "reward function module:function, importable from the working directory: "
                "fn(prompts: list[str], responses: list[str]) -> list[float] (or "
                "--reward-model)"})
    group_size: int = field(default=8, metadata={
        "help": "G: completions sampled per prompt (the paper: 64)"})
    max_new_tokens: int = field(default=256, metadata={"help": "tokens per completion"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0)"})
    top_k: int = field(default=0, metadata={"help": "sample from the k likeliest (0: off)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (1: off)"})
    max_prompt_length: Optional[int] = field(default=None, metadata={
        "help": "prompt tokens kept (the last ones; default --max-length - "
                "--max-new-tokens)"})
    baseline: Literal["mean", "loo"] = field(default="mean", metadata={
        "help": "mean: the group's mean (GRPO); loo: the mean of the others (RLOO)"})
    normalize_std: Optional[bool] = field(default=None, metadata={
        "help": "divide advantages by the group's std (default: on for mean, off for "
                "loo; off with mean is Dr. GRPO)"})
    num_ppo_epochs: int = field(default=1, metadata={
        "help": "μ: passes over each step's completions"})
    mini_batch_size: Optional[int] = field(default=None, metadata={
        "help": "prompts per optimizer update, a multiple of --batch-size dividing the "
                "step's (default: the whole step, one update per epoch)"})
    clip_eps: float = field(default=0.2, metadata={"help": "ε: the ratio is clipped to "
                                                           "[1 - ε, 1 + ε_high]"})
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
    entropy_coef: float = field(default=0.0, metadata={
        "help": "weight of the entropy bonus (0: off)"})
    missing_eos_penalty: Optional[float] = field(default=None, metadata={
        "help": "subtracted from the score of a completion cut off by --max-new-tokens"})

    def __post_init__(self):
        common.validate_common(self)
        if (self.reward_model is None) == (self.reward_fn is None):
            raise ValueError(f"--reward-model / --reward-fn: give exactly one, got "
                             f"{'both' if self.reward_model is not None else 'neither'}")
        if self.reward_fn is not None:
            rl.load_reward_fn(self.reward_fn)           # the import fails here, exit 2
        for name, least in (("group_size", 2), ("max_new_tokens", 1), ("top_k", 0),
                            ("num_ppo_epochs", 1), ("kl_horizon", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise common.bad_setting(self, name, f"an int >= {least}")
        finite = math.isfinite
        common.check_numbers(self, {
            "temperature": (lambda v: finite(v) and v > 0, "a finite number > 0"),
            "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
            "clip_eps": (lambda v: finite(v) and v >= 0, "a finite number >= 0"),
            "kl_loss_coef": (lambda v: finite(v) and v >= 0, "a finite number >= 0"),
            "kl_penalty": (lambda v: finite(v) and v >= 0, "a finite number >= 0"),
            "entropy_coef": (finite, "a finite number")})
        optional = {"clip_eps_high": (lambda v: finite(v) and v >= 0, "a finite number >= 0"),
                    "kl_target": (lambda v: finite(v) and v > 0, "a finite number > 0"),
                    "missing_eos_penalty": (finite, "a finite number")}
        common.check_numbers(self, {k: v for k, v in optional.items()
                                    if getattr(self, k) is not None})
        if self.lora_dropout != 0:
            raise common.bad_setting(self, "lora_dropout", "0 (RL runs the policy without "
                                                           "dropout)")
        if self.max_prompt_length is None:
            if self.max_new_tokens >= self.max_length:
                raise ValueError(f"--max-new-tokens {self.max_new_tokens}: leaves no room for "
                                 f"the prompt in --max-length {self.max_length}")
        elif isinstance(self.max_prompt_length, bool) or \
                not isinstance(self.max_prompt_length, int) or self.max_prompt_length < 1:
            raise common.bad_setting(self, "max_prompt_length", "an int >= 1 or none")
        step_prompts = self.batch_size * self.grad_accum
        mini = self.mini_batch_size
        if mini is not None and (isinstance(mini, bool) or not isinstance(mini, int) or mini < 1
                                 or mini % self.batch_size or step_prompts % mini):
            raise common.bad_setting(self, "mini_batch_size", f"a multiple of --batch-size "
                                     f"({self.batch_size}) that divides the step's "
                                     f"{step_prompts} prompts")
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
              weight: torch.Tensor | float = 1.0
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``weight`` · the clipped GRPO loss of one micro-batch of experience (module
    docstring), ready for ``backward``, and ``weight`` · its UPDATE_METRICS (detached).
    ``advantages`` [B·G], one per completion."""
    logprobs, entropy = rl.policy_logprobs(model, exp.rollout, cfg.temperature, cfg.autocast)
    use_kl = cfg.kl_loss_coef > 0
    loss, stats = ppo_loss(
        logprobs, exp.logprobs, advantages, exp.rollout.response_mask,
        clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
        entropy=entropy if cfg.entropy_coef else None, entropy_coef=cfg.entropy_coef,
        ref_logprobs=exp.ref_logprobs if use_kl else None, kl_loss_coef=cfg.kl_loss_coef,
        agg=cfg.loss_agg,
        norm_length=cfg.max_new_tokens if cfg.loss_agg == "seq-mean-token-sum-norm" else None)
    return loss * weight, {k: stats[k] * weight for k in UPDATE_METRICS if k in stats}


def _weights(batch: Sequence[rl.Experience], agg: str) -> list[torch.Tensor | float]:
    """Each micro-batch's share of its mini-batch (module docstring): tokens for
    token-mean (device tensors, no sync), sequences otherwise."""
    if agg == "token-mean":
        counts = [e.rollout.response_mask.sum().float() for e in batch]
        total = torch.stack(counts).sum()
        return [c / total for c in counts]
    rows = sum(e.rollout.batch_size for e in batch)
    return [e.rollout.batch_size / rows for e in batch]


# ----------------------------------------------------------------------------------------
# The trainer


def train(cfg: GRPOConfig) -> Path:
    """Run (or resume) GRPO as ``cfg`` says; returns the run folder (module docstring)."""
    device = common.choose_device(cfg.device)
    common.seed_everything(cfg.seed)

    # -- 1. The inputs, checked before the run folder is touched --------------------------
    tokenizer = common.load_run_tokenizer(cfg)
    if cfg.reward_model is not None:
        rl.check_reward_model(cfg.reward_model)
    prompt_limit = cfg.max_prompt_length or cfg.max_length - cfg.max_new_tokens
    train_set, eval_set = rl.load_prompts(
        cfg.data, tokenizer, max_prompt_length=prompt_limit, overlong=cfg.overlong,
        use_chat_template=cfg.chat_template, eval_path=cfg.eval_data,
        eval_fraction=cfg.eval_fraction, seed=cfg.seed)
    # One sampler batch = one step's prompts, cut into micro-batches below.
    loader, total_steps = common.step_loader(train_set, cfg)
    sampling = rl.Sampling(cfg.max_new_tokens, train_set.eos_token_id, train_set.pad_token_id,
                           temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)

    # -- 2. Run folder, policy, reward, reference, optimizer; the checkpoint's state ------
    run_dir, ckpt = common.start_run(cfg.out, cfg.resume, device=device)
    common.check_step_batch(ckpt, cfg, "prompts")
    model = common.setup_model_from_config(cfg, device)
    reward, reward_line = rl.build_reward(
        reward_model=cfg.reward_model, reward_fn=cfg.reward_fn, policy=model,
        tokenizer=tokenizer, model_path=cfg.model, dtype=cfg.dtype, device=device,
        attn_implementation=cfg.attn_implementation, use_chat_template=cfg.chat_template,
        precision=cfg.autocast)
    rl.disable_dropout(model)       # the policy, and a reward adapter loaded onto it
    reference, ref_line = (rl.Reference.for_policy(model, cfg, device)
                           if cfg.kl_loss_coef or cfg.kl_penalty else (None, "reference: none"))
    kl_ctl = rl.kl_controller(cfg.kl_penalty, cfg.kl_target, cfg.kl_horizon)
    state = rl.RunState(loader, kl_controller=kl_ctl)     # what a checkpoint's data holds
    optimizer, scheduler = common.optimizer_and_schedule(model, cfg, total_steps)
    step, _, extra = common.restore(ckpt, model, optimizer, scheduler, state)
    common.write_config(run_dir, cfg, resumed=ckpt is not None)

    with RunLogger(run_dir, total_steps, resume_step=step if ckpt else None,
                   desc="grpo") as logger:
        common.log_start(logger, model, ckpt, step, total_steps,
                         {"train": train_set, "eval": eval_set}, skip=("pairs", "pairs_dropped"))
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
        per_update = (cfg.mini_batch_size or cfg.batch_size * cfg.grad_accum) // cfg.batch_size
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
            start = time.perf_counter()
            minis = math.ceil(len(experience) / per_update)
            totals, norms = [], []
            for epoch in range(cfg.num_ppo_epochs):
                # Several updates a step: the micro-batches in a fresh order each epoch
                # (global RNG, so a resumed run draws the same); one update: as sampled.
                turn = (torch.randperm(len(experience)).tolist() if minis > 1
                        else list(range(len(experience))))
                for first in range(0, len(turn), per_update):
                    mini = turn[first:first + per_update]
                    weights = _weights([experience[i] for i in mini], cfg.loss_agg)
                    sums = None
                    for i, weight in zip(mini, weights):
                        loss, stats = grpo_loss(model, experience[i], advantages[i], cfg,
                                                weight)
                        loss.backward()
                        part = torch.stack([loss.detach().float(),
                                            *(v.float() for v in stats.values())])
                        sums = part if sums is None else sums + part
                    grad_norm = common.clip_gradients(params, cfg.max_grad_norm)
                    values, norm = common.sync_and_check(step, sums, grad_norm)
                    totals.append(values)
                    norms.append(norm)
                    if len(totals) < cfg.num_ppo_epochs * minis:
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    else:   # the step's last update also advances the schedule
                        lr = common.optimizer_step(optimizer, scheduler)
            seconds = time.perf_counter() - start
            if cfg.kl_penalty:
                metrics["kl_coef"] = kl_ctl.value            # the β this step's scores used
                kl_ctl.update(metrics["kl"], len(scores))

            names = ("loss",) + tuple(k for k in UPDATE_METRICS if k in stats)
            means = [sum(column) / len(totals) for column in zip(*totals)]
            metrics["update/tokens_per_s"] = tokens * cfg.num_ppo_epochs / max(seconds, 1e-9)
            books.end_step(step, tokens, lr=lr, grad_norm=sum(norms) / len(norms),
                           **dict(zip(names, means)), **metrics)

        final = common.export_model(model, run_dir, tokenizer=tokenizer, base_model=cfg.model)
        logger.write(f"final model: {final}")
    return run_dir


if __name__ == "__main__":
    sys.exit(main(prog="python -m kernelrl.train.grpo"))
