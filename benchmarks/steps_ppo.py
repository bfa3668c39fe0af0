"""The PPO case of the steps family (bench_steps.py, case ``ppo_lora``): one PPO iteration,
rollout and update, of a small Llama whose four roles share one base through LoRA adapters.

Shape legend: B prompts (one response each), Tp prompt and Tr response tokens per sequence
(T = Tp + Tr), the model's H, I, L, V as in steps_common; tok = B·T, the tokens of the
iteration's sequences. Target shape (--full): H=256 I=688 L=4 V=32000, B=8 Tp=64 Tr=64
(1,024 tokens); light (default): H=128 I=344 L=2 V=8000, B=4 Tp=32 Tr=32 (256 tokens).

The layout is kernelrl ppo's with --lora-r 16 and a LoRA reward model on the policy's base
(kernelrl/train/ppo.py): adapter ``policy`` (trains), the reference = the base with the
adapters off, adapter ``reward`` and a head (frozen), adapter ``value`` and a head copied
from the reward's (trains). Every row starts from the same weights: the Llama of
steps_common, each adapter's A and B drawn from a generator seeded by its name (B ≠ 0,
B_SCALE: the policy already differs from the reference, so the KL term is not 0 at the
first iteration), the reward head ~ N(0, 1/(H + 1)) from a seeded generator. Settings: the
PPOConfig defaults (β = 0.02 k1 KL, γ = 1, λ = 0.95, whitened advantages, ε = 0.2, ε_v =
0.2, c_v = 0.1, no entropy term) but lr 1e-4 and one PPO epoch of one mini-batch (the whole
batch), so an iteration is exactly one optimizer update; sampling at temperature 1, no
top-k or top-p, no banned tokens (the trainer bans the tokenizer's special tokens by
default, --bad-token-ids; there is no tokenizer here, and eager bans none either), and no
EOS (every response runs Tr tokens, so each row does the same work at every call). AdamW
(betas 0.9/0.999, eps 1e-8, no weight decay), the gradient norm of the policy's and the
value's weights clipped to 1.0 together. What one timed call is:

  kernelrl  what one iteration of kernelrl.train.ppo.train runs, by its functions:
            rl.collect_experience (rollout.generate: KV-cache sampler, lm_head on the last
            position only; old log-probs and entropies by policy_logprobs; the reference's
            with the adapters off; the reward model's scores under adapter ``reward``), the
            old values (ppo.ValueModel under adapter ``value``), ppo.step_targets
            (kernelrl.ops.kl_penalized_advantages, fused GAE and whitening),
            rl.rollout_metrics (its host sync), rl_update.run_updates with
            ppo.ppo_micro_loss (kernelrl.ops.ppo_loss) and ppo's backward, the gradient
            clip, the update's host sync, AdamW step and scheduler step. Roles set up as
            train() does: common.make_trainable (adapter ``policy``), the reward adapter
            added by apply_lora and frozen as rm.load_reward_model(base=policy) adds it,
            rl.RewardModelScorer, ppo.build_value (copy_adapter), rl.Reference.for_policy,
            common.optimizer_and_schedule.
  eager     the same algorithm as plain torch + transformers + PEFT: a PEFT model with the
            adapters ``policy``, ``reward`` and ``value`` (set_adapter switches; PEFT's
            set_adapter also freezes every other adapter, so the trainable ones are marked
            trainable again), HF model.generate (do_sample, top_k=0), full logits +
            log_softmax + gather for the log-probs, the reference under disable_adapter(),
            the reward and the values from the decoder's last hidden states and a head,
            the KL-penalised rewards, GAE as the reversed Python loop over time steps,
            whitening, the clipped PPO and value losses in plain torch, backward,
            clip_grad_norm_, torch AdamW step, zero_grad.

No TRL row: trl 1.16 has no PPOTrainer (``hasattr(trl, "PPOTrainer")`` is False; it was
removed after 0.2x). No full fine-tuning case: kernelrl's layout there is four model copies
with the reward and value models loaded from a reward model's folder (build_value), a
different benchmark.

Check before timing: the rows sample by different code (kernelrl: Gumbel-max in its own
KV-cache loop; eager: HF generate's torch.multinomial), so the check is on the update given
the same rollout. Each row returns its rollout, and the check replays eager's update on
that very rollout, from the same start, in a freshly built eager model: the row's loss must
equal the replay's (|diff| <= 1e-4 + 1e-5·|loss|) and its trainable parameters afterwards
(both adapters and the value head) must agree with the replay's to 0.1% of the replay's
update. Each rollout must also hold the prompts followed by Tr tokens. The seeds are fixed
(the global RNG reseeded as each row is built) and both rows sample with the same settings;
torch.multinomial of one sample is the same exponential race as kernelrl's Gumbel-max, so
the two first rollouts have come out identical here, but the check does not rely on it.
At the first update V = V_old, so the value clip (ε_v) is inert there and not checked.

flops (the same count for every row): decoder linears and attention (T² per layer) over
every position for the generation, the three forwards that score the response (old,
reference, update: lm_head on the B·Tr response positions only) and the three that read
hidden states (reward, old values, update values); backward once the linears (LoRA: no
gradients for frozen weights, LoRA's own flops not counted) and twice the attention, for
the policy's and the value's forward.
"""

from __future__ import annotations

import math

import steps_common as sc
from cases import Case, Impl

FULL = {"B": 8, "Tp": 64, "Tr": 64, **sc.MODEL_FULL}
QUICK = {"B": 4, "Tp": 32, "Tr": 32, **sc.MODEL_QUICK}
KL_COEF, GAMMA, LAM, WHITEN_EPS = 0.02, 1.0, 0.95, 1e-8
CLIP_EPS, VALUE_CLIP, VF_COEF, TEMPERATURE = 0.2, 0.2, 0.1, 1.0
B_SCALE, HEAD_SEED = 0.1, 4242
TRAINED = ("policy", "value")          # the adapters that train (with the value head)


def tokens(shape: dict) -> int:
    return shape["B"] * (shape["Tp"] + shape["Tr"])


def flops(shape: dict) -> float:
    H, I, L, V = (shape[k] for k in ("H", "I", "L", "V"))
    B, T, Tr = shape["B"], shape["Tp"] + shape["Tr"], shape["Tr"]
    n = B * T
    decoder = 2 * L * (4 * H * H + 3 * H * I) * n
    head = 2 * H * V * B * Tr
    attention = 4 * L * T * H * n
    hidden = decoder + attention
    backward = (decoder + head + 2 * attention) + (decoder + 2 * attention)
    # generation, the three scoring forwards, the three hidden-state ones, two backwards
    return (hidden + head) + 3 * (hidden + head) + 3 * hidden + backward


def _prompts(shape: dict, seed: int) -> list:
    import torch
    g = torch.Generator().manual_seed(9000 + seed)
    return [sc.draw_ids(g, shape["Tp"], shape["V"]) for _ in range(shape["B"])]


def make_inputs(shape: dict, seed: int, device: str) -> dict:
    """The prompts, as a [B, Tp] tensor (eager) and as the trainer's PromptSamples."""
    import torch
    from kernelrl.train.rl import PromptSample

    rows = _prompts(shape, seed)
    return {"prompts": torch.tensor(rows, device=device),
            "samples": [PromptSample(f"prompt {i}", r) for i, r in enumerate(rows)]}


def _reward_head(hidden: int, device: str):
    """The reward model's head, frozen: N(0, 1/(H + 1)) weights from a seeded generator."""
    import torch

    g = torch.Generator().manual_seed(HEAD_SEED)
    head = torch.nn.Linear(hidden, 1, bias=False, device="meta")          # no RNG draw
    weight = torch.randn(1, hidden, generator=g) / math.sqrt(hidden + 1)
    head.weight = torch.nn.Parameter(weight.to(device), requires_grad=False)
    return head


# ----------------------------------------------------------------------------------------
# kernelrl: one iteration of kernelrl.train.ppo.train
# ----------------------------------------------------------------------------------------
def config(shape: dict):
    from kernelrl.train.ppo import PPOConfig
    return PPOConfig(
        model="(in memory)", data="(in memory)", out="(unused)", reward_model="(in memory)",
        batch_size=shape["B"], lr=sc.LR, max_grad_norm=sc.MAX_GRAD_NORM, lora_r=sc.LORA_R,
        lora_alpha=sc.LORA_ALPHA, lora_targets=",".join(sc.LORA_TARGETS),
        max_length=shape["Tp"] + shape["Tr"], max_new_tokens=shape["Tr"],
        temperature=TEMPERATURE, num_ppo_epochs=1, kl_coef=KL_COEF, gamma=GAMMA, lam=LAM,
        clip_eps=CLIP_EPS, value_clip=VALUE_CLIP, vf_coef=VF_COEF, seed=sc.SEED)


def _kernelrl(shape: dict, device: str):
    import torch
    from kernelrl.models.lora import apply_lora
    from kernelrl.models.lora import trainable_parameters as adapter_parameters
    from kernelrl.models.reward import RewardModel
    from kernelrl.train import common, ppo, rl, rl_update

    cfg = config(shape)
    policy = common.make_trainable(sc.llama(shape, device), lora_r=cfg.lora_r,
                                   lora_alpha=cfg.lora_alpha, lora_targets=cfg.lora_targets,
                                   adapter_name=ppo.POLICY_ADAPTER)
    # The reward model on the policy's base, as rm.load_reward_model(base=policy) puts a
    # LoRA export there: a frozen adapter 'reward' and a frozen head.
    apply_lora(policy, r=cfg.lora_r, alpha=cfg.lora_alpha,
               target_modules=common.parse_targets(cfg.lora_targets),
               adapter_name=rl.REWARD_ADAPTER)
    for p in adapter_parameters(policy, rl.REWARD_ADAPTER):
        p.requires_grad_(False)
    sc.init_adapters(policy, b_scale=B_SCALE)
    scorer = RewardModel(policy.get_decoder(), _reward_head(shape["H"], device),
                         pad_token_id=sc.PAD)
    reward = rl.RewardModelScorer(scorer, base=policy, precision=cfg.autocast)
    value, _ = ppo.build_value(cfg, policy, reward, device)
    model = rl.disable_dropout(ppo.PPOModel(policy, value)).train()
    reference, _ = rl.Reference.for_policy(policy, cfg, device)
    kl_ctl = rl_update.kl_controller(cfg.kl_coef, None, cfg.kl_horizon)
    optimizer, scheduler = common.optimizer_and_schedule(model, cfg, sc.TOTAL_STEPS)
    params = common.trainable_parameters(model)
    sampling = rl.Sampling(cfg.max_new_tokens, None, sc.PAD, temperature=cfg.temperature,
                           top_k=cfg.top_k, top_p=cfg.top_p)
    out = sc.trainable(policy) + [value.head.weight]
    steps = [0]
    common.seed_everything(cfg.seed)

    def ppo_iteration(x):
        steps[0] += 1
        samples = x["samples"]
        experience, old_values = [], []
        for part in common.micro_batches(samples, cfg.batch_size):
            exp = rl.collect_experience(
                policy, part, sampling=sampling, reward=reward, reference=reference,
                missing_eos_penalty=cfg.missing_eos_penalty, precision=cfg.autocast)
            with torch.no_grad():
                old_values.append(value(exp.rollout, cfg.autocast))
            experience.append(exp)
        targets, stats = ppo.step_targets(experience, old_values, cfg, kl_ctl.value)
        metrics, _ = rl.rollout_metrics(experience, dict(zip(ppo.TARGET_METRICS, stats)))
        update = rl_update.run_updates(
            experience, lambda i, share: ppo.ppo_micro_loss(policy, value, experience[i],
                                                            targets[i], cfg, share),
            cfg, step=steps[0], weigh_by="tokens", params=params, optimizer=optimizer,
            scheduler=scheduler, backward=lambda loss: ppo._backward(loss, model, cfg))
        kl_ctl.update(metrics["kl"], len(samples))
        loss = torch.tensor([update.means["loss"]])
        return (loss, *out, torch.cat([e.rollout.sequences for e in experience]))

    return ppo_iteration


# ----------------------------------------------------------------------------------------
# eager: plain torch + transformers + PEFT
# ----------------------------------------------------------------------------------------
def _eager(shape: dict, device: str):
    """The eager iteration ``fn(x)``; ``fn.update(sequences)`` is its update phase alone
    (what the check replays) and ``fn.params`` the parameters it returns."""
    import torch
    from transformers import GenerationConfig

    Tp, Tr = shape["Tp"], shape["Tr"]
    model = sc.peft_lora(sc.llama(shape, device), adapter_name="policy")
    for name in ("reward", "value"):
        model.add_adapter(name, sc.peft_config())
    sc.init_adapters(model, b_scale=B_SCALE)
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    with torch.no_grad():                   # the value adapter starts as the reward's
        for n, p in lora.items():
            if ".value." in n:
                p.copy_(lora[n.replace(".value.", ".reward.")])
    reward_head = _reward_head(shape["H"], device)
    value_head = torch.nn.Linear(shape["H"], 1, bias=False, device="meta")
    value_head.weight = torch.nn.Parameter(reward_head.weight.detach().clone())
    base = model.get_base_model()
    base.generation_config.eos_token_id = None    # no EOS: every response runs Tr tokens
    decoder = base.get_decoder()

    def use(name):
        # PEFT's set_adapter marks only that adapter trainable: mark ours again
        model.set_adapter(name)
        for n, p in lora.items():
            p.requires_grad_(any(f".{a}." in n for a in TRAINED))

    use("policy")
    params = sc.trainable(model) + [value_head.weight]
    optimizer = torch.optim.AdamW(params, lr=sc.LR, weight_decay=0.0)
    sampling = GenerationConfig(do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0,
                                max_new_tokens=Tr, pad_token_id=sc.PAD)
    torch.manual_seed(sc.SEED)

    def logprobs(seq, mask):
        logits = model(input_ids=seq, attention_mask=mask, use_cache=False).logits
        logp = logits[:, Tp - 1:-1].log_softmax(-1)
        return logp.gather(-1, seq[:, Tp:].unsqueeze(-1)).squeeze(-1)

    def read(head, seq, mask, at):
        hidden = decoder(input_ids=seq, attention_mask=mask, use_cache=False).last_hidden_state
        return head(hidden[:, at]).squeeze(-1)

    def masked_mean(x, m):
        return (x * m).sum() / m.sum()

    def whiten(x, m):
        mean = masked_mean(x, m)
        var = masked_mean((x - mean) ** 2, m) * m.sum() / (m.sum() - 1)
        return (x - mean) * torch.rsqrt(var + WHITEN_EPS)

    def update(seq):
        mask = torch.ones_like(seq)
        m = mask[:, Tp:].float()                   # response tokens (no padding here)
        values_at = slice(Tp - 1, -1)              # the state before each response token
        with torch.no_grad():
            use("policy")
            old = logprobs(seq, mask)
            with model.disable_adapter():
                ref = logprobs(seq, mask)
            use("reward")
            score = read(reward_head, seq, mask, -1)
            use("value")
            old_values = read(value_head, seq, mask, values_at)
            rewards = -KL_COEF * (old - ref)
            rewards[:, -1] += score                # the response's last token
            lastgaelam, reversed_adv = 0.0, []
            for t in reversed(range(Tr)):
                next_values = old_values[:, t + 1] if t < Tr - 1 else 0.0
                delta = rewards[:, t] + GAMMA * next_values - old_values[:, t]
                lastgaelam = delta + GAMMA * LAM * lastgaelam
                reversed_adv.append(lastgaelam)
            advantages = torch.stack(reversed_adv[::-1], dim=1)
            returns = advantages + old_values
            advantages = whiten(advantages, m)
        use("policy")
        ratio = torch.exp(logprobs(seq, mask) - old)
        pg = torch.max(-advantages * ratio,
                       -advantages * torch.clamp(ratio, 1 - CLIP_EPS, 1 + CLIP_EPS))
        use("value")
        values = read(value_head, seq, mask, values_at)
        clipped = torch.clamp(values, old_values - VALUE_CLIP, old_values + VALUE_CLIP)
        vf = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)
        loss = masked_mean(pg, m) + VF_COEF * masked_mean(vf, m)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, sc.MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return (loss.detach().reshape(1), *params)

    def ppo_iteration(x):
        prompts = x["prompts"]
        use("policy")
        model.eval()
        with torch.no_grad():
            seq = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                 generation_config=sampling)
        model.train()
        return (*update(seq), seq)

    ppo_iteration.update, ppo_iteration.params = update, params
    return ppo_iteration


# ----------------------------------------------------------------------------------------
# The case
# ----------------------------------------------------------------------------------------
def _check(shape: dict, device: str):
    """(ref, out) -> None or why not: eager's update replayed on the row's own rollout
    (module docstring)."""
    def rollout_problem(who, seq):
        import torch
        prompts = torch.tensor(_prompts(shape, 0))
        want = (shape["B"], shape["Tp"] + shape["Tr"])
        if tuple(seq.shape) != want or not torch.equal(seq[:, :shape["Tp"]].cpu(), prompts):
            return (f"{who}'s rollout is not the {shape['B']} prompts followed by "
                    f"{shape['Tr']} tokens (got shape {tuple(seq.shape)})")
        return None

    def check(ref, out):
        problem = rollout_problem("eager", ref[-1]) or rollout_problem("this row", out[-1])
        if problem:
            return problem
        replay = _eager(shape, device)
        initial = [p.detach().clone() for p in replay.params]
        expected = [t.detach() for t in sc.pinned(replay.update, device)(out[-1])]
        return sc.compare_step(out[:-1], expected, lambda: initial)

    return check


def make_case(bench: str, case_id: str, name: str, shape: dict, dtype: str,
              device: str) -> Case:
    impls = {"kernelrl": Impl(lambda: sc.pinned(_kernelrl(shape, device), device)),
             "eager": Impl(lambda: sc.pinned(_eager(shape, device), device),
                           skip=sc.missing("peft"))}
    return Case(bench=bench, case_id=case_id, case=name, shape=shape, dtype=dtype,
                make_inputs=lambda seed: make_inputs(shape, seed, device), impls=impls,
                device=device, check=_check(shape, device), flops=flops(shape))
