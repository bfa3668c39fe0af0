"""PPO against a reward model with a per-token KL penalty: RLHF as InstructGPT's step 3.

Ouyang et al. 2022, "Training language models to follow instructions with human
feedback", §3.5; Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences", §2.2; Schulman et al. 2017, "Proximal Policy Optimization Algorithms".
The policy π_θ starts as the SFT model π_ref (``--model``) and samples one response y to
each prompt x; a reward model scores (x, y) once, r_φ(x, y). Each response token t gets a
reward (``kernelrl.ops.kl_penalized_advantages``):

    r_t = −β·KL_t + [t = last] · r_φ(x, y)          KL_t = k1 | k2 | k3 of
                                                    d_t = log π_old(y_t) − log π_ref(y_t)

(k1 = d, k2 = d²/2, k3 = e^(−d) − 1 + d: ``--kl-estimator``), so the return of the whole
response is r_φ − β·KL(π ‖ π_ref), Ziegler et al.'s eq. 2. A value function V(s_t) read at
every response position gives GAE advantages (Schulman et al. 2016):

    δ_t = r_t + γ·V_{t+1} − V_t,    A_t = Σ_l (γλ)^l δ_{t+l},    R_t = A_t + V_t

A then whitened over the step's real tokens (``--no-whiten`` keeps it raw). μ epochs of
mini-batches minimise PPO's clipped objective with the clipped value loss (its eq. 7 and
9; ``kernelrl.ops.ppo_loss``, token means, ρ_t = π_θ(y_t) / π_old(y_t)):

    L = mean_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε))
        + c_v · mean_t ½·max((V_t − R_t)², (clip(V_t, V_old ± ε_v) − R_t)²)
        − c_e · mean_t H_t

Legend: B prompts per micro-batch (``--batch-size``, one response each), P prompt width,
R response width, T = P + R, H hidden width. V [B, R] is a scalar head on the decoder's
final hidden states at positions P − 1 .. P + R − 2 (the state before each response token,
where its log-prob is read): no logits are formed for it.

Four roles, one base (``--lora-r`` > 0 and a LoRA reward model that ``kernelrl rm
--lora-r`` trained on the same ``--model``):
    policy     adapter ``policy`` on the base                     trains
    reference  the base with every adapter disabled               frozen
    reward     adapter ``reward`` and its head (the RM export)    frozen
    value      adapter ``value`` and a head, both copied from the reward adapter and head
               (InstructGPT initialises the value function from the RM)   trains
Switching roles switches the active adapter (``kernelrl.models.lora.use_adapter``), no
weight is copied. Memory, fp32, LoRA rank 4: on a random Llama with H = 512 and 8 layers
(25M parameters) the roles hold 100 MB of parameters on one base against 384 MB as four
copies, and one PPO step peaks at 0.96 GB resident against 1.48 GB (0.42 GB of either is
Python and torch; the four copies' run is a full fine-tune, AdamW moments included); on the
2-layer H = 32 test model, 131 KB (an 82 KB base, three adapters of 16 KB, two heads)
against 320 KB. Elsewhere the roles fall back to networks of their own:
    --lora-r > 0, another reward model (other base, full export) or ``--reward-fn``:
        value = a new ``value`` adapter (rank --lora-r) on the policy's base, zero head;
    --lora-r 0 (full fine-tuning): reference = a frozen copy of ``--model``; value = a
        trainable copy of the reward model (``--reward-model``), or of ``--model``'s
        decoder under a zero head (``--reward-fn``): four copies in memory (three without
        a reward model).

A step (what ``--max-steps`` counts):
    1. draw ``--batch-size`` × ``--grad-accum`` prompts (a seeded, resumable order);
    2. per micro-batch: sample (temperature, top-k, top-p; never ``--bad-token-ids``, by
       default the tokenizer's special tokens but EOS), the old and reference log-probs
       and the scores (``rl.collect_experience``, minus ``--missing-eos-penalty`` for a
       response cut off), then the old values V_old [B, R] (no gradients);
    3. r_t, A, R for the whole step at once (padded to the step's longest response, so
       the whitening covers every real token of the step);
    4. μ = ``--num-ppo-epochs`` passes over the micro-batches in mini-batches of
       ``--mini-batch-size`` prompts, one optimizer update each; micro-batch m weighs
       n_m / Σ n_m (its response tokens), so every term is a token mean over the
       mini-batch and ``--batch-size 2 --grad-accum 2`` equals ``--batch-size 4`` up to
       rounding. The first update of a step has ρ = 1 and V = V_old bitwise (the same
       calls on the same weights; the ban of ``--bad-token-ids`` filters the sampler
       only, ``kernelrl.train.rollout``). One AdamW over the policy's and the value's trainable
       weights, one learning rate and one global gradient clip over both (``--vf-coef``
       weighs the value term); the schedule advances after the step's last update
       (``kernelrl.train.rl_update.run_updates``, the update phase GRPO runs too).
With ``--adaptive-kl``, β then moves towards ``--kl-target`` (Ziegler et al.:
β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon), KL the mean Σ_t d_t of the step's n
responses, ``rl_update.AdaptiveKLController``).

Gradient checkpointing with the value on the policy's base: the backward recomputes a
layer with whichever adapter is active then, so each role's part of the backward runs
under its own adapter (``loss.backward(inputs=...)`` twice, the graph kept in between).

Host syncs in a step, each on purpose: sampling's and each log-prob call's
(``kernelrl.train.rollout``), the reward function's, one for the rollout metrics and the
step's value statistics (``rl.rollout_metrics``), and one per optimizer update (its loss
must be finite before the weights change).

Where this deviates from InstructGPT:
- no pretraining-mix term (PPO-ptx, their γ·E[log π(x_pretrain)]): plain PPO;
- one response per prompt per step and the reward model frozen, as there; the value
  function initialised from the reward model only when it sits on the policy's base (or
  with full fine-tuning), else from zeros;
- the policy runs without dropout (the ratio needs the same network when sampling and
  updating; ``--lora-dropout`` must be 0).

Metrics per step: loss, pg_loss, vf_loss, vf_clipfrac, clipfrac, approx_kl, ratio_mean
(means over the step's updates), reward (mean r_φ) and score (after the missing-EOS
penalty), kl (mean Σ_t d_t), non_score_reward (mean Σ_t −β·KL_t), kl_coef (β of the step),
value (mean V_old), explained_variance (1 − Var(R − V_old) / Var(R) over real tokens),
entropy, response_length, truncated, rollout/logprob_drift, rollout/tokens_per_s,
update/tokens_per_s, lr, grad_norm; aux_loss (a mixture-of-experts policy's router
load-balancing loss of the policy's update forwards, added × ``--router-aux-coef``:
``common.RouterAux``); eval/reward and eval/response_length on held-out prompts.

Run folder (``--out``): config.toml, metrics.jsonl, curves.png, checkpoints/step-<N>/
(the policy's and the value's trainable weights, value head included, optimizer,
schedule, RNG, prompt order, KL controller: ``--resume latest`` continues bitwise), and the
policy as the other trainers export it (``model/``, or with LoRA ``adapter/``).

Command line: ``python -m kernelrl.train.ppo --help`` (or ``kernelrl ppo``).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kernelrl.models.hf import load_model
from kernelrl.models.logprobs import final_hidden_states
from kernelrl.models.lora import apply_lora, copy_adapter, lora_modules, use_adapter
from kernelrl.ops import kl_penalized_advantages, ppo_loss
from kernelrl.train import common, rl, rl_update, settings
from kernelrl.train.metrics import RunLogger
from kernelrl.train.rm import load_reward_model
from kernelrl.train.rollout import Rollout

__all__ = ["PPOConfig", "ValueModel", "PPOModel", "Targets", "build_value", "step_targets",
           "ppo_micro_loss", "train", "main", "POLICY_ADAPTER", "VALUE_ADAPTER",
           "UPDATE_METRICS", "TARGET_METRICS"]

POLICY_ADAPTER = "policy"
VALUE_ADAPTER = "value"
#: ppo_loss's statistics logged per step (means over its updates), after the loss
UPDATE_METRICS = ("pg_loss", "vf_loss", "vf_clipfrac", "clipfrac", "approx_kl", "ratio_mean")
#: the statistics of the step's advantages and values (``step_targets``)
TARGET_METRICS = ("score", "non_score_reward", "value", "explained_variance")


@dataclass
class PPOConfig(settings.RLConfig):
    """PPO with a per-token KL penalty to the SFT model and a value function (RLHF).

    The settings every trainer takes are declared in ``kernelrl.train.settings.TrainConfig``,
    those PPO shares with GRPO in its subclass ``RLConfig``; the fields below change the
    default or help of some of them, then add PPO's own."""

    model: str = field(metadata={
        "help": "the SFT policy (InstructGPT's --policy): a local model folder; the "
                "reference is this model, frozen"})
    data: str = field(metadata={"help": 'prompts JSONL (InstructGPT\'s --prompts): '
                                        '{"prompt": str} per line'})
    batch_size: int = field(default=4, metadata={
        "help": "prompts per micro-batch, per device, one response each; sampled, scored "
                "and trained on together"})
    lr: float = field(default=3e-6, metadata={
        "help": "peak learning rate (one AdamW over the policy and the value function)"})
    reward_model: Optional[str] = field(default=None, metadata={
        "help": "reward model: a kernelrl rm run folder or its model/ or adapter/ export "
                "(or --reward-fn); a LoRA one on --model shares the policy's base"})
    num_ppo_epochs: int = field(default=4, metadata={
        "help": "μ: passes over each step's responses"})
    kl_coef: float = field(default=0.02, metadata={
        "help": "β of the per-token KL penalty in the reward (InstructGPT: 0.02); the "
                "initial β with --adaptive-kl"})
    kl_estimator: Literal["k1", "k2", "k3"] = field(default="k1", metadata={
        "help": "per-token KL estimate of the penalty: k1 = log π/π_ref, k2 = its square "
                "/ 2, k3 = π_ref/π − 1 − log(π_ref/π)"})
    adaptive_kl: bool = field(default=False, metadata={
        "help": "adapt β towards --kl-target (Ziegler et al. 2019)"})
    kl_target: float = field(default=6.0, metadata={
        "help": "with --adaptive-kl: the target KL per response, Σ_t log π/π_ref"})
    kl_horizon: int = field(default=10000, metadata={
        "help": "with --adaptive-kl: responses over which β moves"})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount γ in [0, 1]"})
    lam: float = field(default=0.95, metadata={"help": "GAE λ in [0, 1]"})
    reward_clip: Optional[float] = field(default=None, metadata={
        "help": "clip the reward model's score to [-c, c] before adding it (none: off)"})
    whiten: bool = field(default=True, metadata={
        "help": "whiten the advantages over the step's response tokens"})
    value_clip: float = field(default=0.2, metadata={
        "help": "ε_v: the new value is clipped to the old one ± ε_v in the value loss"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})

    def __post_init__(self):
        settings.validate_rl(self)
        settings.check_ints(self, {"kl_horizon": 1})
        unit = (lambda v: 0 <= v <= 1, "a number in [0, 1]")
        settings.check_numbers(self, {
            "kl_coef": settings.NONNEGATIVE, "kl_target": settings.POSITIVE, "gamma": unit,
            "lam": unit, "value_clip": settings.NONNEGATIVE, "vf_coef": settings.NONNEGATIVE})
        settings.check_numbers(self, {"reward_clip": settings.POSITIVE}, optional=True)
        if self.adaptive_kl and not self.kl_coef:
            raise ValueError("--adaptive-kl: multiplies --kl-coef, which is 0; give "
                             "--kl-coef > 0")


def main(argv: Sequence[str] | None = None, prog: str = "kernelrl ppo") -> int:
    """``kernelrl ppo``: ``run_main`` for PPOConfig and ``train`` (exit status 0, 1 or 2)."""
    return common.run_main(PPOConfig, train, argv, prog=prog,
                           description="PPO of an SFT policy against a reward model (or a "
                                       "Python function) with a per-token KL penalty to the "
                                       "SFT model and a value function (InstructGPT's RLHF).")

# ----------------------------------------------------------------------------------------
# The value role


class ValueModel(nn.Module):
    """V(s_t) at every response token of a rollout: ``head`` (nn.Linear(H, 1), float32)
    on ``decoder``'s final hidden states. ``base``: the policy whose decoder it is; the
    forward then runs under its adapter ``value`` (not registered as a submodule)."""

    def __init__(self, decoder: nn.Module, head: nn.Linear, *, base: nn.Module | None = None):
        super().__init__()
        self.decoder, self.head = decoder, head
        self.on_policy_base = base is not None
        self.switch = (functools.partial(use_adapter, base, VALUE_ADAPTER) if base is not None
                       else contextlib.nullcontext)

    def forward(self, rollout: Rollout, precision: str = "none") -> torch.Tensor:
        """[B, R] float32 values, 0 on padding, under the caller's grad mode."""
        device = rollout.sequences.device
        with self.switch(), common.autocast(device, precision):
            hidden = final_hidden_states(self.decoder, rollout.sequences,
                                         rollout.attention_mask, rollout.position_ids)
        start = rollout.prompt_length - 1          # position t holds the state before t + 1
        states = hidden[:, start:start + rollout.response_width]
        values = self.head(states.to(self.head.weight.dtype)).squeeze(-1).float()
        return values.masked_fill(rollout.response_mask == 0, 0.0)


class PPOModel(nn.Module):
    """What trains, is optimised and checkpointed: the policy and the value function
    (on one base their shared weights are listed once, under ``policy``)."""

    def __init__(self, policy: nn.Module, value: ValueModel):
        super().__init__()
        self.policy, self.value = policy, value


def _head(hidden: int, weight: torch.Tensor | None, device) -> nn.Linear:
    """A float32 nn.Linear(H, 1) head: a copy of ``weight``, or zeros. Draws no RNG."""
    head = nn.Linear(hidden, 1, bias=False, device="meta")
    init = weight.detach().float().clone() if weight is not None else torch.zeros(1, hidden)
    head.weight = nn.Parameter(init.to(device))
    return head


def build_value(cfg: PPOConfig, policy: nn.Module, reward, device) -> tuple[ValueModel, str]:
    """The value role for ``policy`` and the reward source ``build_reward`` gave, and a
    line for the log (the layouts: module docstring)."""
    width = policy.get_input_embeddings().weight.shape[1]
    if isinstance(reward, rl.RewardModelScorer) and reward.base is policy:
        copy_adapter(policy, rl.REWARD_ADAPTER, VALUE_ADAPTER, trainable=True)
        head = _head(width, reward.model.score.weight, device)
        return (ValueModel(policy.get_decoder(), head, base=policy),
                "value: adapter 'value' and head copied from the reward model's, on the "
                "policy's base")
    if lora_modules(policy):
        apply_lora(policy, r=cfg.lora_r, alpha=cfg.lora_alpha,
                   target_modules=common.parse_targets(cfg.lora_targets),
                   adapter_name=VALUE_ADAPTER)
        return (ValueModel(policy.get_decoder(), _head(width, None, device), base=policy),
                "value: a new adapter 'value' on the policy's base, zero head")
    if cfg.reward_model is not None:
        copy = load_reward_model(cfg.reward_model, adapter_name=VALUE_ADAPTER, dtype=cfg.dtype,
                                 device=device, attn_implementation=cfg.attn_implementation,
                                 trainable=True)
        decoder, head = copy.decoder, _head(copy.score.in_features, copy.score.weight, device)
        line = f"value: a trainable copy of the reward model {cfg.reward_model}"
    else:
        decoder = load_model(cfg.model, dtype=cfg.dtype, device=device,
                             attn_implementation=cfg.attn_implementation).get_decoder()
        decoder.requires_grad_(True)
        head = _head(width, None, device)
        line = f"value: a copy of {cfg.model}'s decoder, zero head"
    common.make_trainable(decoder, gradient_checkpointing=cfg.gradient_checkpointing,
                          moe_kernels=cfg.moe_kernels)
    return ValueModel(decoder, head), line


# ----------------------------------------------------------------------------------------
# Advantages and the loss


@dataclass
class Targets:
    """One micro-batch's regression and policy-gradient targets, [B, R] each."""
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def step_targets(experience: Sequence[rl.Experience], values: Sequence[torch.Tensor],
                 cfg: PPOConfig, kl_coef: float) -> tuple[list[Targets], torch.Tensor]:
    """(each micro-batch's Targets, the TARGET_METRICS [4] on the device) from the step's
    experience and old values: ``kl_penalized_advantages`` once over the whole step, the
    micro-batches right-padded to its longest response."""
    width = max(e.rollout.response_width for e in experience)

    def joined(tensors):
        return torch.cat([F.pad(t, (0, width - t.shape[1])) for t in tensors])

    mask = joined([e.rollout.response_mask for e in experience])
    old_values = joined(values)
    scores = torch.cat([e.scores for e in experience])
    out = kl_penalized_advantages(
        joined([e.logprobs for e in experience]), joined([e.ref_logprobs for e in experience]),
        old_values, scores, mask, kl_coef=kl_coef, kl_estimator=cfg.kl_estimator,
        gamma=cfg.gamma, lam=cfg.lam, reward_clip=cfg.reward_clip, whiten=cfg.whiten)
    real = mask != 0
    count = real.sum().clamp_min(1)

    def variance(x):
        mean = torch.where(real, x, 0.0).sum() / count
        return torch.where(real, (x - mean) ** 2, 0.0).sum() / count

    spread = variance(out.returns)
    explained = torch.where(spread > 0, 1 - variance(out.returns - old_values) / spread, 0.0)
    stats = torch.stack([scores.mean(), (-kl_coef * out.kl).sum() / len(scores),
                         old_values.sum() / count, explained])
    rows = [e.rollout.batch_size for e in experience]
    parts = [x.split(rows) for x in (old_values, out.advantages, out.returns)]
    targets = [Targets(*(p[:, :e.rollout.response_width] for p in group))
               for e, group in zip(experience, zip(*parts))]
    return targets, stats


def ppo_micro_loss(policy: nn.Module, value: ValueModel, exp: rl.Experience, targets: Targets,
                   cfg: PPOConfig, weight: torch.Tensor | float = 1.0,
                   aux: common.RouterAux | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``weight`` · the PPO loss of one micro-batch (module docstring), ready for
    ``backward``, and ``weight`` · its UPDATE_METRICS (detached). ``aux``: adds the MoE
    router's aux loss of the policy's forward (and ``aux_loss`` to the statistics)."""
    logprobs, entropy = rl.policy_logprobs(policy, exp.rollout, cfg.temperature, cfg.autocast)
    # The policy forward's router aux term c·weight·aux, read now: on the policy's base the
    # value's forward runs the same MoE layers. (0, {}) when off.
    aux_term, aux_stats = (aux.add(logprobs.new_zeros(()), {}, weight=weight,
                                   mask=exp.rollout.attention_mask)
                           if aux is not None else (0.0, {}))
    values = value(exp.rollout, cfg.autocast)
    loss, stats = ppo_loss(
        logprobs, exp.logprobs, targets.advantages, exp.rollout.response_mask,
        clip_eps=cfg.clip_eps, values=values, old_values=targets.old_values,
        returns=targets.returns, value_clip=cfg.value_clip, vf_coef=cfg.vf_coef,
        entropy=entropy if cfg.entropy_coef else None, entropy_coef=cfg.entropy_coef,
        agg="token-mean")
    stats = {k: stats[k] * weight for k in UPDATE_METRICS}
    return (loss * weight + aux_term, stats | aux_stats) if aux_stats else (loss * weight, stats)


def _backward(loss: torch.Tensor, model: PPOModel, cfg: PPOConfig) -> None:
    """``loss.backward()``; with gradient checkpointing on one base, the value's part
    under its adapter, then the policy's (module docstring)."""
    value = model.value
    if not (cfg.gradient_checkpointing and value.on_policy_base):
        loss.backward()
        return
    ids = {id(value.head.weight)} | {
        id(p) for _, m in lora_modules(model.policy) if VALUE_ADAPTER in m.lora
        for p in (m.lora.A[VALUE_ADAPTER], m.lora.B[VALUE_ADAPTER])}
    params = common.trainable_parameters(model)
    with value.switch():
        loss.backward(inputs=[p for p in params if id(p) in ids], retain_graph=True)
    loss.backward(inputs=[p for p in params if id(p) not in ids])


# ----------------------------------------------------------------------------------------
# The trainer


def train(cfg: PPOConfig) -> Path:
    """Run (or resume) PPO as ``cfg`` says; returns the run folder (module docstring)."""
    device = common.choose_device(cfg.device)
    common.seed_everything(cfg.seed)

    # -- 1. The inputs, checked before the run folder is touched --------------------------
    tokenizer = common.load_run_tokenizer(cfg)
    train_set, eval_set, sampling = rl.run_prompts(cfg, tokenizer)
    loader, total_steps = common.step_loader(train_set, cfg)   # one sampler batch = one step

    # -- 2. Run folder, the four roles, optimizer; the checkpoint's state -----------------
    run_dir, ckpt = common.start_run(cfg.out, cfg.resume, device=device)
    common.check_step_batch(ckpt, cfg, "prompts")
    policy = common.setup_model_from_config(cfg, device, adapter_name=POLICY_ADAPTER)
    aux = common.RouterAux(policy, cfg)                  # the MoE router's aux loss, or off
    reward, reward_line = rl.run_reward(cfg, policy, tokenizer, device)
    value, value_line = build_value(cfg, policy, reward, device)
    model = rl.disable_dropout(PPOModel(policy, value)).train()
    reference, ref_line = rl.Reference.for_policy(policy, cfg, device)
    kl_ctl = rl_update.kl_controller(cfg.kl_coef, cfg.kl_target if cfg.adaptive_kl else None,
                                     cfg.kl_horizon)
    state = rl_update.RunState(loader, kl_controller=kl_ctl)   # what a checkpoint's data holds
    optimizer, scheduler = common.optimizer_and_schedule(model, cfg, total_steps)
    step, _, extra = common.restore(ckpt, model, optimizer, scheduler, state)
    common.write_config(run_dir, cfg, resumed=ckpt is not None)

    with RunLogger(run_dir, total_steps, resume_step=step if ckpt else None,
                   desc="ppo") as logger:
        common.log_start(logger, model, ckpt, step, total_steps,
                         {"train": train_set, "eval": eval_set}, skip=("pairs", "pairs_dropped"),
                         aux=aux)
        logger.write(f"{reward_line}; {ref_line}; {value_line}")
        books = common.Bookkeeper(
            logger, run_dir, cfg, total_steps, model=model, optimizer=optimizer,
            scheduler=scheduler, loader=state, extra=extra,
            evaluate=None if eval_set is None else lambda: rl.evaluate_rewards(
                policy, eval_set, batch_size=cfg.batch_size, sampling=sampling,
                reward=reward, seed=cfg.seed, precision=cfg.autocast))

        # -- 3. The loop: one rollout, its targets and its updates per iteration ---------
        params = common.trainable_parameters(model)      # what the loop clips
        order = iter(loader.sampler)
        while step < total_steps:
            step += 1
            samples = [train_set[i] for i in next(order)]
            experience, old_values = [], []
            for part in common.micro_batches(samples, cfg.batch_size):
                exp = rl.collect_experience(
                    policy, part, sampling=sampling, reward=reward, reference=reference,
                    missing_eos_penalty=cfg.missing_eos_penalty, precision=cfg.autocast)
                with torch.no_grad():
                    old_values.append(value(exp.rollout, cfg.autocast))
                experience.append(exp)
            kl_coef = kl_ctl.value
            targets, stats = step_targets(experience, old_values, cfg, kl_coef)
            # One host sync for the rollout's numbers and the step's value statistics.
            metrics, tokens = rl.rollout_metrics(experience, dict(zip(TARGET_METRICS, stats)))

            # Update: μ epochs of mini-batches, one optimizer update each.
            update = rl_update.run_updates(
                experience, lambda i, share: ppo_micro_loss(policy, value, experience[i],
                                                            targets[i], cfg, share, aux),
                cfg, step=step, weigh_by="tokens", params=params, optimizer=optimizer,
                scheduler=scheduler, backward=lambda loss: _backward(loss, model, cfg))
            metrics["kl_coef"] = kl_coef                    # the β this step's rewards used
            kl_ctl.update(metrics["kl"], len(samples))

            seconds = max(update.seconds, 1e-9)
            metrics["update/tokens_per_s"] = tokens * cfg.num_ppo_epochs / seconds
            books.end_step(step, tokens, lr=update.lr, grad_norm=update.grad_norm,
                           **update.means, **metrics)

        final = common.export_model(policy, run_dir, tokenizer=tokenizer, base_model=cfg.model,
                                    adapter_name=POLICY_ADAPTER)
        logger.write(f"final model: {final}")
    return run_dir


if __name__ == "__main__":
    sys.exit(main(prog="python -m kernelrl.train.ppo"))
