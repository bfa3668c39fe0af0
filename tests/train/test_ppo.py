"""kernelrl.train.ppo: the PPO trainer end to end on a tiny random Llama (CPU, fp32).

The first update of a step with ratio and values exactly those of the rollout, learning a
rule-based reward through the command line, the KL held by a large ``--kl-coef``, the four
roles on one base (the value starting as the reward model, the memory against four
copies, gradient checkpointing), micro-batches adding up to the mini-batch, the adaptive
KL coefficient, bitwise resume after an interrupt, and the settings' errors. Errors that
leave an existing run alone and a diverged loss stopping the run are tested for every
trainer in test_train_common.py.
"""

import pytest
import torch
from safetensors.torch import load_file

import train_helpers
from ppo_helpers import build_roles, role_bytes, train_lora_rm
from rl_helpers import (SHARED_BAD_SETTINGS, exits_2_naming_the_flag, interrupt_then_resume,
                        marker_reward, missing_reward_model_exits_1, prompt_rows,
                        slice_experience)
from train_helpers import Runs, cli_args, help_text, make_tokenizer, run_records, write_jsonl
from kernelrl.models.lora import lora_modules
from kernelrl.train import common, ppo, rl, rl_update
from kernelrl.train.checkpoint import load_checkpoint
from kernelrl.train.metrics import read_metrics

one_thread = train_helpers.one_thread     # the shared fixtures, in use in this module
model_dir = train_helpers.model_dir

KEYS = ("loss", "pg_loss", "vf_loss", "vf_clipfrac", "clipfrac", "approx_kl", "ratio_mean",
        "reward", "score", "kl", "non_score_reward", "kl_coef", "value",
        "explained_variance", "entropy", "response_length", "truncated",
        "rollout/logprob_drift", "rollout/tokens_per_s", "update/tokens_per_s", "lr",
        "grad_norm")


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """PPO runs of the tiny model on 32 prompts, rewarded per marker word."""
    data = write_jsonl(tmp_path_factory.mktemp("ppo") / "prompts.jsonl", prompt_rows(32))
    return Runs(ppo.PPOConfig, model_dir, data,
                {"device": "cpu", "lr": 1e-2, "seed": 3, "reward_fn": "rl_helpers:marker_reward",
                 "max_new_tokens": 8, "num_ppo_epochs": 2})


@pytest.fixture(scope="module")
def rm_run(model_dir, tmp_path_factory):
    """A LoRA reward model (adapter ``reward`` + head) trained on the tiny model."""
    return train_lora_rm(model_dir, tmp_path_factory.mktemp("rm") / "rm")


def _records(run_dir):
    return [r for r in read_metrics(run_dir) if "loss" in r]


def _mean(values):
    return sum(values) / len(values)


def _shared(runs, rm_run, out, **changes):
    """The config of a LoRA run whose reward model sits on the policy's base."""
    return runs.cfg(out, reward_fn=None, reward_model=str(rm_run), lora_r=4, lora_alpha=8,
                    **changes)


# ----------------------------------------------------------------------------------------


def test_help_shows_the_ppo_settings(capsys):
    text = " ".join(help_text(ppo, capsys).split())
    assert "the SFT policy (InstructGPT's --policy)" in text
    assert "--kl-estimator {k1,k2,k3}" in text and "--adaptive-kl, --no-adaptive-kl" in text
    assert "--whiten, --no-whiten" in text and "--reward-model STR" in text


def test_first_update_has_ratio_and_values_of_the_rollout(runs, tmp_path, monkeypatch):
    """Two epochs of two mini-batches a step: each step's first ppo_loss call has ratio
    exactly 1, nothing clipped and values bitwise the old ones; the later calls of a step
    come after an update."""
    calls = []
    real = ppo.ppo_loss

    def recording(logprobs, old_logprobs, *args, values, old_values, **kwargs):
        loss, stats = real(logprobs, old_logprobs, *args, values=values,
                           old_values=old_values, **kwargs)
        calls.append(({k: v.item() for k, v in stats.items()},
                      torch.equal(logprobs, old_logprobs), torch.equal(values, old_values)))
        return loss, stats

    monkeypatch.setattr(ppo, "ppo_loss", recording)
    ppo.train(runs.cfg(tmp_path / "run", max_steps=3, batch_size=2, grad_accum=2,
                       mini_batch_size=2, lora_r=4, lora_alpha=8, kl_coef=0.1,
                       reward_fn="rl_helpers:length_reward"))     # never all 0
    assert len(calls) == 3 * 4
    for first in calls[::4]:
        stats, same_logprobs, same_values = first
        assert same_logprobs and same_values
        assert stats["ratio_mean"] == 1.0 and stats["clipfrac"] == 0.0
        assert stats["approx_kl"] == 0.0 and stats["vf_clipfrac"] == 0.0
    later = [c for i, c in enumerate(calls) if i % 4]
    assert not any(same for _, same, _ in later) and any(s["ratio_mean"] != 1 for s, _, _ in later)


def test_reward_rises_through_the_cli(runs, tmp_path, capsys):
    out = tmp_path / "run"
    assert ppo.main(runs.args(out, "--max-steps", 20)) == 0
    _, steps = run_records(out, 20, KEYS)
    rewards = [r["reward"] for r in steps]
    assert _mean(rewards[-5:]) > _mean(rewards[:5]) + 1.0, rewards
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-5)         # step 1: π = π_ref
    assert all(r["kl_coef"] == 0.02 for r in steps)               # fixed β
    assert all(r["rollout/logprob_drift"] < 1e-4 for r in steps)
    assert (out / "model" / "model.safetensors").is_file()
    log = capsys.readouterr()
    assert "value: a copy of" in log.out + log.err and "a frozen copy" in log.out + log.err


def test_a_large_kl_coef_keeps_the_policy_near_the_reference(runs, tmp_path):
    kl = {}
    for coef in (1e-3, 2.0):
        out = tmp_path / f"kl-{coef}"
        assert ppo.main(runs.args(out, "--max-steps", 20, "--kl-coef", coef,
                                  "--kl-estimator", "k3")) == 0
        kl[coef] = [(r["kl"], r["non_score_reward"]) for r in _records(out)]
    loose = _mean([k for k, _ in kl[1e-3][-5:]])                   # mean Σ_t k1 at the end
    held = [k for k, _ in kl[2.0]]
    assert loose > 2.0, kl[1e-3]
    assert _mean(held[-5:]) < loose / 4 and max(held) < loose / 3, kl[2.0]
    assert all(penalty <= 0 for _, penalty in kl[2.0])           # −β·Σ k3, k3 >= 0


def test_value_starts_as_the_reward_model_on_one_base(runs, rm_run, tmp_path):
    """Shared layout: value adapter = reward adapter, value head = reward head, both
    trainable copies; reward and base frozen; one base in memory, against four copies
    with full fine-tuning."""
    model, reward, reference, lines = build_roles(_shared(runs, rm_run, tmp_path / "a"))
    assert "on the policy's base" in lines[0] and "adapters disabled" in lines[1]
    assert "copied from the reward model's" in lines[2]
    assert reward.base is model.policy and reference.model is model.policy
    value = model.value
    assert torch.equal(value.head.weight, reward.model.score.weight)
    assert value.head.weight.requires_grad and not reward.model.score.weight.requires_grad
    layers = [m for _, m in lora_modules(model.policy) if "reward" in m.lora]
    assert layers and all("value" in m.lora for m in layers)
    for m in layers:
        for kind in (m.lora.A, m.lora.B):
            assert torch.equal(kind["value"], kind["reward"]) and kind["value"].requires_grad
            assert not kind["reward"].requires_grad
    trained = list(common.trainable_state(model))
    assert trained[-1] == "value.head.weight"
    assert {n.rsplit(".", 1)[1] for n in trained[:-1]} == {"policy", "value"}

    # the memory of the roles: one base, its three adapters and two heads, against four
    # copies (full fine-tuning)
    shared = role_bytes(model, reward, reference)
    adapters = sum(4 * p.numel() for _, m in lora_modules(model.policy)
                   for p in m.lora.parameters())
    base = sum(4 * p.numel() for p in model.policy.parameters()) - adapters
    assert shared == base + adapters + 2 * value.head.weight.numel() * 4
    full_rm = train_lora_rm(runs.model, tmp_path / "rm-full", full=True)
    copies = role_bytes(*build_roles(runs.cfg(tmp_path / "b", reward_fn=None,
                                              reward_model=str(full_rm)))[:3])
    print(f"parameter bytes: one base {shared}, four copies {copies} (base {base}, "
          f"adapters {adapters})")
    assert copies > 3.5 * base


def test_the_shared_layout_through_the_cli(runs, rm_run, tmp_path, capsys):
    out = tmp_path / "run"
    settings = {k: v for k, v in runs.settings.items() if k != "reward_fn"}
    assert ppo.main(cli_args(runs.model, runs.path(), out, "--max-steps", 2, "--lora-r", 4,
                             "--lora-alpha", 8, "--reward-model", rm_run, "--eval-fraction",
                             0.25, "--eval-every", 1, **settings)) == 0
    log = capsys.readouterr()
    assert "value: adapter 'value' and head copied" in log.out + log.err
    records, steps = run_records(out, 2, KEYS + ("eval/reward",))
    policy = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    reward = load_file(str(rm_run / "adapter" / "adapter_model.safetensors"))
    assert policy.keys() == reward.keys()                  # the policy's adapter only
    state = load_checkpoint(out).model
    start = common.trainable_state(build_roles(_shared(runs, rm_run, tmp_path / "x"))[0])
    assert state.keys() == start.keys() and not any(".reward" in k for k in state)
    value = [k for k in state if k.endswith(".value") or k.startswith("value.")]
    assert len(value) == len(policy) + 1                   # its adapter and head
    assert all(not torch.equal(state[k], start[k]) for k in value if ".lora.B." in k)


def test_gradient_checkpointing_on_one_base_keeps_each_roles_gradients(runs, rm_run, tmp_path):
    """With checkpointing, a layer's backward recomputes it under the adapter active then:
    the two-phase backward gives the gradients of the plain run, a single one does not."""
    tok = make_tokenizer()
    records = [(f"p:{i}", r["prompt"]) for i, r in enumerate(prompt_rows(3, seed=5))]
    data = rl.tokenize_prompts(records, tok, max_prompt_length=32)

    def gradients(checkpointing, two_phase=True):
        cfg = _shared(runs, rm_run, tmp_path / "x", gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        model, reward, reference, _ = build_roles(cfg)
        with torch.no_grad():                     # a policy adapter that is not 0
            for _, m in lora_modules(model.policy):
                m.lora.B["policy"].normal_(0, 0.05)
        torch.manual_seed(1)
        exp = rl.collect_experience(model.policy, data.samples, reward=reward,
                                    sampling=rl.Sampling(8, data.eos_token_id, data.pad_token_id),
                                    reference=reference)
        with torch.no_grad():
            old = model.value(exp.rollout)
        targets, _ = ppo.step_targets([exp], [old], cfg, 0.1)
        targets[0].returns.add_(torch.linspace(-1, 1, targets[0].returns.shape[1]))
        loss, _ = ppo.ppo_micro_loss(model.policy, model.value, exp, targets[0], cfg)
        (ppo._backward if two_phase else lambda loss, *_: loss.backward())(loss, model, cfg)
        return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                for n, p in common.trainable_state(model).items()}

    plain = gradients(False)
    assert any(g.abs().sum() > 0 for n, g in plain.items() if n.endswith(".value"))
    checkpointed = gradients(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)
    wrong = gradients(True, two_phase=False)
    assert any(not torch.allclose(wrong[n], plain[n], rtol=1e-3, atol=1e-5) for n in plain)


def test_micro_batches_add_up_to_the_mini_batch_loss(runs, model_dir):
    """The micro-batch losses weighted by their token shares have the gradient of the
    loss over their whole mini-batch, for rows of different response lengths."""
    cfg = runs.cfg("-", entropy_coef=0.05, kl_coef=0.1)
    tok = make_tokenizer()
    records = [(f"p:{i}", r["prompt"]) for i, r in enumerate(prompt_rows(6, seed=5))]
    data = rl.tokenize_prompts(records, tok, max_prompt_length=32)
    policy = rl.disable_dropout(common.setup_model(model_dir))
    value, _ = ppo.build_value(cfg, policy, None, torch.device("cpu"))
    reference, _ = rl.Reference.for_policy(policy, cfg, torch.device("cpu"))
    torch.manual_seed(0)
    exp = rl.collect_experience(policy, data.samples, reward=rl.RewardFunction(marker_reward, tok),
                                sampling=rl.Sampling(8, data.eos_token_id, data.pad_token_id),
                                reference=reference)
    assert len(set(exp.rollout.response_lengths.tolist())) > 1
    with torch.no_grad():
        value.head.weight.normal_(0, 0.3)
        old = value(exp.rollout)
        for p in list(policy.parameters()) + list(value.decoder.parameters()):
            p.add_(torch.randn_like(p) * 0.02)       # ratios ≠ 1, values moved
    targets, _ = ppo.step_targets([exp], [old], cfg, 0.1)
    params = common.trainable_parameters(ppo.PPOModel(policy, value))

    def gradient(pieces):
        for (piece, target), share in zip(pieces, rl_update.shares([e for e, _ in pieces],
                                                                   "tokens")):
            loss, _ = ppo.ppo_micro_loss(policy, value, piece, target, cfg, share)
            loss.backward()
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return grads

    whole = gradient([(exp, targets[0])])
    cuts = (slice(0, 2), slice(2, 6))
    split = gradient([(slice_experience(exp, c),
                       ppo.Targets(*(x[c] for x in (targets[0].old_values,
                                                    targets[0].advantages, targets[0].returns))))
                      for c in cuts])
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_adaptive_kl_moves_beta_the_right_way(runs, tmp_path):
    """β_{s+1} = β_s·(1 + clip(KL_s / target − 1, ±0.2)·n / horizon): down while the KL is
    under the target (step 1: KL = 0), up once it is over."""
    out = tmp_path / "run"
    assert ppo.main(runs.args(out, "--max-steps", 12, "--adaptive-kl", "--kl-coef", 0.05,
                              "--kl-target", 1.0, "--kl-horizon", 20)) == 0
    steps = _records(out)
    for now, after in zip(steps, steps[1:]):
        error = min(max(now["kl"] / 1.0 - 1, -0.2), 0.2)
        assert after["kl_coef"] == pytest.approx(now["kl_coef"] * (1 + error * 4 / 20))
    moves = [b["kl_coef"] - a["kl_coef"] for a, b in zip(steps, steps[1:])]
    assert moves[0] < 0 and any(m > 0 for m in moves), [(r["kl"], r["kl_coef"]) for r in steps]


def test_interrupt_then_resume_is_bitwise(runs, rm_run, tmp_path, monkeypatch):
    """The shared layout, 2 prompts a micro-batch, 2 micro-batches a step, 2 epochs of 2
    mini-batches (shuffled), the adaptive KL coefficient; stopped in step 5, resumed from
    the checkpoint of step 3."""
    def cfg(name, **changes):
        return _shared(runs, rm_run, tmp_path / name, max_steps=6, batch_size=2,
                       grad_accum=2, mini_batch_size=2, adaptive_kl=True, kl_coef=0.05,
                       kl_target=0.01, kl_horizon=50, save_every=3, entropy_coef=0.01,
                       missing_eos_penalty=0.5, **changes)

    interrupt_then_resume(ppo, cfg, monkeypatch, "kl_penalized_advantages", 0.05,
                          ("loss", "vf_loss", "reward", "kl", "kl_coef", "clipfrac",
                           "explained_variance", "grad_norm", "lr"))


@pytest.mark.parametrize("flags, message", [
    *SHARED_BAD_SETTINGS,
    (("--kl-estimator", "k4"), "--kl-estimator: expected one of k1, k2, k3"),
    (("--kl-coef", -1), "--kl-coef: expected a finite number >= 0"),
    (("--adaptive-kl", "--kl-coef", 0), "--adaptive-kl: multiplies --kl-coef"),
    (("--kl-target", 0), "--kl-target: expected a finite number > 0"),
    (("--kl-horizon", 0), "--kl-horizon: expected an int >= 1"),
    (("--gamma", 1.5), "--gamma: expected a number in [0, 1]"),
    (("--lam", -0.1), "--lam: expected a number in [0, 1]"),
    (("--reward-clip", 0), "--reward-clip: expected a finite number > 0"),
    (("--value-clip", -1), "--value-clip: expected a finite number >= 0"),
    (("--vf-coef", "nan"), "--vf-coef: expected a finite number >= 0"),
])
def test_bad_settings_exit_2_naming_the_flag(runs, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    exits_2_naming_the_flag(ppo.main, runs.args(out, *flags), out, capsys, message)


def test_a_missing_reward_model_exits_1(runs, tmp_path, capsys):
    missing_reward_model_exits_1(ppo.main, runs, tmp_path / "run", capsys)
