"""kernelrl.train.grpo: the GRPO trainer end to end on a tiny random Llama (CPU, fp32).

Learning a rule-based reward through the command line, the KL held by a large
``--kl-loss-coef``, bitwise resume after an interrupt (LoRA, several updates a step, the
adaptive KL penalty), each ``--loss-agg`` and baseline, micro-batch weighting equal to the
loss over the whole mini-batch, held-out evaluation that does not change the run, a
reward model on the policy's base, and the settings' errors. Errors that leave an
existing run alone and a diverged loss stopping the run are tested for every trainer in
test_train_common.py.
"""

import pytest
import torch
from safetensors.torch import load_file

import train_helpers
from rl_helpers import (SHARED_BAD_SETTINGS, exits_2_naming_the_flag, interrupt_then_resume,
                        marker_reward, missing_reward_model_exits_1, prompt_rows,
                        slice_experience)
from rm_helpers import ranked_examples
from train_helpers import (Runs, assert_bitwise, cli_args, help_text, make_tokenizer,
                           run_records, write_jsonl)
from kernelrl.ops import group_advantages
from kernelrl.train import common, grpo, rl, rl_update, rm
from kernelrl.train.metrics import read_metrics

one_thread = train_helpers.one_thread     # the shared fixtures, in use in this module
model_dir = train_helpers.model_dir

KEYS = ("loss", "pg_loss", "clipfrac", "approx_kl", "reward", "reward_std", "entropy",
        "response_length", "truncated", "rollout/logprob_drift", "rollout/tokens_per_s",
        "update/tokens_per_s", "lr", "grad_norm")


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """GRPO runs of the tiny model on 32 prompts, rewarded per marker word."""
    data = write_jsonl(tmp_path_factory.mktemp("grpo") / "prompts.jsonl", prompt_rows(32))
    return Runs(grpo.GRPOConfig, model_dir, data,
                {"device": "cpu", "lr": 1e-2, "seed": 3, "reward_fn": "rl_helpers:marker_reward",
                 "group_size": 4, "max_new_tokens": 8, "kl_loss_coef": 0.0})


def _records(run_dir):
    return [r for r in read_metrics(run_dir) if "loss" in r]


def _mean(values):
    return sum(values) / len(values)


# ----------------------------------------------------------------------------------------


def test_help_shows_the_grpo_settings(capsys):
    text = " ".join(help_text(grpo, capsys).split())
    assert "G: completions sampled per prompt (the paper: 64) (default: 8)" in text
    assert "--reward-fn STR" in text and "--kl-loss-coef FLOAT" in text
    assert "--normalize-std, --no-normalize-std" in text


def test_reward_rises_through_the_cli(runs, tmp_path):
    out = tmp_path / "run"
    assert grpo.main(runs.args(out, "--max-steps", 20)) == 0
    _, steps = run_records(out, 20, KEYS)
    rewards = [r["reward"] for r in steps]
    assert _mean(rewards[-5:]) > _mean(rewards[:5]) + 1.0, rewards
    assert all(r["clipfrac"] == 0 and r["approx_kl"] == 0 for r in steps)   # ρ = 1: μ = 1
    assert all(r["rollout/logprob_drift"] < 1e-4 for r in steps)
    assert "kl" not in steps[0]                          # no reference without a KL term
    assert (out / "model" / "model.safetensors").is_file()


def test_the_rollouts_never_hold_the_banned_tokens(runs, tmp_path, monkeypatch, capsys):
    """--bad-token-ids reaches every rollout (by default the tokenizer's special tokens but
    EOS); the first update's ratio stays 1 (clipfrac and approx_kl 0 with one epoch)."""
    tok = make_tokenizer()
    specials = {tok.pad_token_id, tok.bos_token_id, tok.unk_token_id}
    said = []
    real = rl.collect_experience

    def spy(*args, **kw):
        exp = real(*args, **kw)
        said.append({t for row in exp.rollout.responses() for t in row})
        return exp

    monkeypatch.setattr(rl, "collect_experience", spy)
    tokens = {}
    for name, flags in (("default", ()), ("none", ("--bad-token-ids", "")),
                        ("more", ("--bad-token-ids", "special,4,5"))):
        said.clear()
        out = tmp_path / name
        assert grpo.main(runs.args(out, "--max-steps", 3, *flags)) == 0
        tokens[name] = set().union(*said)
        _, steps = run_records(out, 3, KEYS)
        assert all(r["clipfrac"] == 0 and r["approx_kl"] == 0 for r in steps)
        assert all(r["rollout/logprob_drift"] < 1e-4 for r in steps)
    assert not tokens["default"] & specials and tokens["none"] & specials
    assert not tokens["more"] & (specials | {4, 5})
    eos = str(tok.eos_token_id)
    assert grpo.main(runs.args(tmp_path / "eos", "--bad-token-ids", eos)) == 1
    assert f"--bad-token-ids: {eos} is the EOS token" in capsys.readouterr().err
    assert not (tmp_path / "eos").exists()


def test_a_large_kl_loss_keeps_the_policy_near_the_reference(runs, tmp_path):
    kl = {}
    for coef in (1e-3, 1.0):
        out = tmp_path / f"kl-{coef}"
        assert grpo.main(runs.args(out, "--max-steps", 20, "--kl-loss-coef", coef)) == 0
        kl[coef] = [(r["kl"], r["kl_loss"]) for r in _records(out)]
    assert kl[1e-3][0] == (pytest.approx(0.0, abs=1e-5), 0.0)        # step 1: π = π_ref
    loose = [_mean(column) for column in zip(*kl[1e-3][-5:])]        # (Σ_t k1, k3) of the end
    held = [_mean(column) for column in zip(*kl[1.0][-5:])]
    assert loose[0] > 2.0 and loose[1] > 0.3, kl[1e-3]
    assert held[0] < loose[0] / 4 and held[1] < loose[1] / 4, kl[1.0]
    assert max(k3 for _, k3 in kl[1.0]) < 0.2


def test_interrupt_then_resume_is_bitwise(runs, tmp_path, monkeypatch):
    """LoRA, 2 prompts a micro-batch, 2 micro-batches a step, 2 epochs of 2 mini-batches
    (4 updates a step, shuffled), the adaptive KL penalty; stopped in step 5, resumed from
    the checkpoint of step 3."""
    def cfg(name, **changes):
        return runs.cfg(tmp_path / name, max_steps=6, batch_size=2, grad_accum=2,
                        mini_batch_size=2, num_ppo_epochs=2, lora_r=4, lora_alpha=8,
                        kl_penalty=0.05, kl_target=0.01, kl_horizon=50, save_every=3,
                        clip_eps_high=0.28, entropy_coef=0.01, **changes)

    reference, _ = interrupt_then_resume(
        grpo, cfg, monkeypatch, "group_advantages", 0.05,
        ("loss", "reward", "kl", "kl_coef", "clipfrac", "approx_kl", "grad_norm", "lr"))
    assert any(r["clipfrac"] > 0 for r in _records(reference))      # later updates clip


@pytest.mark.parametrize("agg, baseline, std", [
    ("seq-mean-token-mean", "mean", None), ("token-mean", "mean", None),
    ("seq-mean-token-sum-norm", "mean", False), ("seq-mean-token-mean", "loo", None),
    ("token-mean", "loo", True)])
def test_each_loss_and_baseline_runs(runs, tmp_path, agg, baseline, std):
    run = grpo.train(runs.cfg(tmp_path / "run", max_steps=2, loss_agg=agg, baseline=baseline,
                              normalize_std=std, kl_loss_coef=0.1, lora_r=2,
                              missing_eos_penalty=1.0))
    _, steps = run_records(run, 2, KEYS + ("kl", "kl_loss"))
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_add_up_to_the_mini_batch_loss(runs, model_dir, agg):
    """The weighted micro-batch losses (as the loop accumulates them) have the gradient of
    the loss over their whole mini-batch, for rows of different response lengths."""
    cfg = runs.cfg("-", loss_agg=agg, kl_loss_coef=0.2, entropy_coef=0.05)
    tok = make_tokenizer()
    records = [(f"p:{i}", r["prompt"]) for i, r in enumerate(prompt_rows(3, seed=5))]
    data = rl.tokenize_prompts(records, tok, max_prompt_length=32)
    model = rl.disable_dropout(common.setup_model(model_dir))
    reference, _ = rl.Reference.for_policy(model, cfg, torch.device("cpu"))
    torch.manual_seed(0)
    exp = rl.collect_experience(model, data.samples, reward=rl.RewardFunction(marker_reward, tok),
                                sampling=rl.Sampling(8, data.eos_token_id, data.pad_token_id),
                                repeats=4, reference=reference)
    assert len(set(exp.rollout.response_lengths.tolist())) > 1
    with torch.no_grad():                   # move the policy: ratios ≠ 1, some clipped
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    advantages = group_advantages(exp.scores + torch.arange(12.0) / 7, 4)
    params = common.trainable_parameters(model)

    def gradient(pieces):
        weights = rl_update.shares([e for e, _ in pieces], grpo._weigh_by(agg))
        for (piece, adv), weight in zip(pieces, weights):
            loss, _ = grpo.grpo_loss(model, piece, adv, cfg, weight)
            loss.backward()
        grads = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        return grads

    whole = gradient([(exp, advantages)])
    cuts = (slice(0, 4), slice(4, 12))
    split = gradient([(slice_experience(exp, c), advantages[c]) for c in cuts])
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_evaluation_logs_held_out_reward_and_leaves_the_run_alone(runs, tmp_path):
    flags = ("--max-steps", 4, "--batch-size", 2, "--save-every", 0)
    assert grpo.main(runs.args(tmp_path / "plain", *flags)) == 0
    assert grpo.main(runs.args(tmp_path / "evaluated", *flags, "--eval-fraction", 0.25,
                               "--eval-every", 2)) == 0
    evals = [r for r in read_metrics(tmp_path / "evaluated") if "eval/reward" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0 < r["eval/response_length"] <= 8 for r in evals)
    # the split changes the training prompts; the same split without evaluation:
    assert grpo.main(runs.args(tmp_path / "split", *flags, "--eval-fraction", 0.25)) == 0
    assert_bitwise(load_file(str(tmp_path / "split" / "model" / "model.safetensors")),
                   load_file(str(tmp_path / "evaluated" / "model" / "model.safetensors")))


def test_lora_policy_with_a_lora_reward_model_on_its_base(runs, model_dir, tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", ranked_examples(16, seed=2))
    assert rm.main(cli_args(model_dir, pairs, tmp_path / "rm", "--max-steps", 2,
                            device="cpu", lora_r=4, lora_alpha=8)) == 0
    out = tmp_path / "run"
    settings = {k: v for k, v in runs.settings.items() if k != "reward_fn"}
    assert grpo.main(cli_args(model_dir, runs.path(), out, "--max-steps", 2, "--lora-r", 4,
                              "--reward-model", tmp_path / "rm", "--kl-loss-coef", 0.04,
                              **settings)) == 0
    log = capsys.readouterr()
    _, steps = run_records(out, 2, KEYS + ("kl",))
    policy = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    reward = load_file(str(tmp_path / "rm" / "adapter" / "adapter_model.safetensors"))
    assert policy.keys() == reward.keys()            # the same targets, the policy's only
    assert not any(torch.equal(policy[k], reward[k]) for k in policy if "lora_B" in k)
    assert "on the policy's base" in log.out + log.err


@pytest.mark.parametrize("flags, message", [
    *SHARED_BAD_SETTINGS,
    (("--group-size", 1), "--group-size: expected an int >= 2"),
    (("--kl-target", 1.0), "--kl-target: adapts --kl-penalty"),
    (("--kl-penalty", 0.1, "--kl-loss-coef", 0.1), "give one or the other"),
    (("--clip-eps-high", -1), "--clip-eps-high: expected a finite number >= 0"),
])
def test_bad_settings_exit_2_naming_the_flag(runs, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    exits_2_naming_the_flag(grpo.main, runs.args(out, *flags), out, capsys, message)


def test_a_missing_reward_model_exits_1(runs, tmp_path, capsys):
    missing_reward_model_exits_1(grpo.main, runs, tmp_path / "run", capsys)
