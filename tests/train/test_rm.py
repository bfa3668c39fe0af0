"""kernelrl.train.rm: the reward-model trainer end to end on a tiny random Llama (CPU, fp32).

Learning a preference through the command line, the loss of rankings against the same
pairs written out (and its forwards), prompt-exact gradient accumulation, bitwise resume,
both exports read back (transformers' sequence classifier, load_reward_model). Errors that
leave an existing run alone (with the reward model's own bad settings) and a diverged loss
stopping the run are tested for every trainer in test_train_common.py.
"""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import train_helpers
from rm_helpers import as_pairs, ranked_examples, right_padded, trained_from_checkpoint
from train_helpers import (Interrupt, Runs, assert_bitwise, assert_weights_close, help_text,
                           patch_from_call, run_records, write_jsonl)
from kernelrl.models.hf import load_model, load_tokenizer
from kernelrl.models.reward import RewardModel
from kernelrl.train import rm
from kernelrl.train.batching import BatchLoader
from kernelrl.train.checkpoint import load_checkpoint
from kernelrl.train.config import config_from_args
from kernelrl.train.data import load_preferences
from kernelrl.train.metrics import read_metrics

one_thread = train_helpers.one_thread     # the shared fixtures, in use in this module
model_dir = train_helpers.model_dir
CPU = torch.device("cpu")
LORA = {"r": 4, "alpha": 8.0, "target_modules": ("q_proj", "v_proj", "down_proj")}
LORA_FLAGS = {"lora_r": 4, "lora_alpha": 8.0, "lora_targets": "q_proj,v_proj,down_proj"}


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """Reward-model runs of the tiny model on 32 prompts with K = 2, 3 or 4."""
    data = write_jsonl(tmp_path_factory.mktemp("rm") / "train.jsonl", ranked_examples(32, seed=1))
    return Runs(rm.RMConfig, model_dir, data, {"device": "cpu", "lr": 3e-3, "seed": 3})


def _steps(run_dir):
    return [(r["step"], r["loss"], r["accuracy"], r["margin"], r["lr"], r["grad_norm"])
            for r in read_metrics(run_dir) if "loss" in r]


def _texts(n=6, seed=7):
    """Prompt + response texts of varied lengths (for right-padded scoring)."""
    rows = as_pairs(ranked_examples(n, seed=seed))
    return [row["prompt"] + row[key] for row in rows for key in ("chosen", "rejected")]


# ----------------------------------------------------------------------------------------


def test_help_shows_the_reward_model_settings(capsys):
    text = " ".join(help_text(rm, capsys).split())
    assert "(default: 9e-06)" in text and "(default: reward)" in text
    assert "--center-coef FLOAT" in text and "--margin FLOAT" in text
    assert "--model STR" in text and "(required)" in text


def test_learns_a_marker_preference_through_the_cli(runs, tmp_path, capsys):
    """Better responses hold more marker words: the held-out loss falls far below the
    untrained model's and nearly every held-out pair is ranked right."""
    model_dir, data = runs.model, runs.data
    flags = ("--epochs", 3, "--batch-size", 4, "--warmup-steps", 2, "--eval-fraction", 0.25,
             "--eval-every", 6, "--save-every", 6)
    out = tmp_path / "run"
    assert rm.main(runs.args(out, *flags)) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "train_kept 24" in err and "eval_kept 8" in err and "train_pairs" in err

    records, steps = run_records(out, 18, ("loss", "accuracy", "margin", "lr", "grad_norm",
                                           "tokens_per_s", "tokens_seen", "epoch"))
    assert records[0]["eval_examples"] == 8                          # 3 epochs x 6 steps
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [6, 12, 18]
    assert all({"eval/accuracy", "eval/margin"} <= r.keys() for r in evals)
    assert steps[0]["loss"] > 0.5                                   # ~log 2 at the start
    assert sum(r["loss"] for r in steps[-3:]) / 3 < 0.3 * steps[0]["loss"]
    assert evals[-1]["eval/accuracy"] >= 0.9 and evals[-1]["eval/margin"] > 1
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]

    # The untrained model on the same held-out prompts: its scores are close together
    # (loss near log 2), though its random head may already lean either way on the
    # marker, so its accuracy is no baseline. The export reproduces the last eval.
    cfg = config_from_args(rm.RMConfig, ["--config", str(out / "config.toml")])
    _, held_out = load_preferences(data, load_tokenizer(model_dir), max_length=cfg.max_length,
                                   eval_fraction=0.25, seed=cfg.seed)
    torch.manual_seed(0)
    before = rm.evaluate(RewardModel.from_causal_lm(load_model(model_dir)), held_out, cfg, CPU)
    after = rm.evaluate(rm.load_reward_model(out), held_out, cfg, CPU)
    assert before["loss"] > 0.5 and after["loss"] < 0.3 * before["loss"]
    assert after["loss"] == pytest.approx(evals[-1]["eval/loss"], rel=1e-5)
    assert after["accuracy"] == evals[-1]["eval/accuracy"]

    assert (out / "curves.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        ["latest.json", "step-12", "step-18"]
    assert (out / "model" / "tokenizer.json").is_file() and not (out / "adapter").exists()
    assert cfg == config_from_args(rm.RMConfig, runs.args(out, *flags))


def test_rankings_give_the_loss_of_their_pairs_with_fewer_forwards(runs, tmp_path):
    """Two prompts with K = 4 ranked responses (8 sequences) against their 12 pairs written
    out as chosen/rejected lines (24 sequences): the same loss and gradients. Both equal
    the loss computed by hand, Σ pair_weight · (−logσ(gap − margin) + c·(sum)²)."""
    rows = ranked_examples(2, seed=5, ks=(4,))
    ranked = write_jsonl(tmp_path / "ranked.jsonl", rows)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", as_pairs(rows))
    model_dir = runs.model
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(0)
    model = RewardModel.from_causal_lm(load_model(model_dir))
    sequences = []
    model.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: sequences.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True)
    options = {"margin": 0.5, "center_coef": 0.01}

    def loss_and_grads(path, prompts):
        dataset, _ = load_preferences(path, tokenizer, max_length=64)
        (batch,) = list(BatchLoader(dataset, prompts, shuffle=False))
        model.zero_grad()
        scores = rm.score_sequences(model, batch, CPU)
        loss = rm.pairwise_loss(scores, batch, **options)
        loss.backward()
        gap = scores[batch.better] - scores[batch.worse]
        total = scores[batch.better] + scores[batch.worse]
        by_hand = (batch.pair_weight * (-F.logsigmoid(gap - 0.5) + 0.01 * total ** 2)).sum()
        torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=0)
        return batch, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    batch_r, loss_r, grads_r = loss_and_grads(ranked, 2)
    assert sequences == [8] and batch_r.num_pairs == 12
    batch_p, loss_p, grads_p = loss_and_grads(pairs, 12)
    assert sequences == [8, 24] and batch_p.num_pairs == 12
    torch.testing.assert_close(loss_r, loss_p, rtol=1e-6, atol=0)
    assert grads_r.keys() == grads_p.keys()
    for name in grads_r:
        torch.testing.assert_close(grads_r[name], grads_p[name], rtol=1e-4, atol=1e-7)
    assert grads_r["score.weight"].abs().max() > 0


def test_unequal_rankings_weigh_every_prompt_once(runs):
    """Prompts with 1, 3 and 6 pairs in one batch: the loss is the mean over prompts of
    each prompt's mean over its pairs (reward_loss per prompt, averaged)."""
    from kernelrl.ops import reward_loss

    model_dir, data = runs.model, runs.data
    dataset, _ = load_preferences(data, load_tokenizer(model_dir), max_length=64)
    (batch,) = list(BatchLoader(dataset, len(dataset), shuffle=False))
    assert set(torch.bincount(batch.pair_prompt).tolist()) == {1, 3, 6}
    torch.manual_seed(0)
    model = RewardModel.from_causal_lm(load_model(model_dir))
    with torch.no_grad():
        scores = rm.score_sequences(model, batch, CPU)
        loss = rm.pairwise_loss(scores, batch, margin=-0.25)
        per_prompt = [reward_loss(scores[batch.better[batch.pair_prompt == p]],
                                  scores[batch.worse[batch.pair_prompt == p]], margin=-0.25)
                      for p in range(batch.num_prompts)]
    torch.testing.assert_close(loss, torch.stack(per_prompt).mean(), rtol=1e-6, atol=0)


def test_grad_accum_matches_one_big_batch(runs, tmp_path):
    """2 x 2 micro-batches and one batch of 4 prompts see the same prompts per step and
    give the same parameters up to fp32 rounding; 2 prompts per step (another batch) does
    not. K is 2 to 4, so micro-batches hold unequal numbers of pairs, and 30 prompts end
    each epoch with a step of one micro-batch (which 1 / --grad-accum would halve). Adam
    can turn a rounding-level gradient difference into a fraction of lr, so parameters
    are compared to lr / 30 and the logged values of later steps to 2e-4 relative (the
    first step's to 1e-6)."""
    data = write_jsonl(tmp_path / "30.jsonl", ranked_examples(30, seed=1))   # last step: 2

    def run(name, batch_size, grad_accum):
        cfg = runs.cfg(tmp_path / name, data=data, batch_size=batch_size,
                       grad_accum=grad_accum, epochs=2, warmup_steps=1, save_every=0,
                       weight_decay=0.1, center_coef=0.01, margin=0.5)
        return load_file(str(rm.train(cfg) / "model" / "model.safetensors"))

    split, whole, other = run("split", 2, 2), run("whole", 4, 1), run("other", 2, 1)
    assert_weights_close(split, whole, atol=1e-4)
    split_steps, whole_steps = _steps(tmp_path / "split"), _steps(tmp_path / "whole")
    assert split_steps[0] == pytest.approx(whole_steps[0], rel=1e-6)     # before any drift
    flat = [[x for row in steps for x in row] for steps in (split_steps, whole_steps)]
    assert flat[0] == pytest.approx(flat[1], rel=2e-4)
    assert max((other[n] - whole[n]).abs().max().item() for n in whole) > 1e-2


def test_resume_from_an_earlier_checkpoint_is_bitwise(runs, tmp_path):
    """4 steps; then the same run resumed from its step-2 checkpoint redoes steps 3 and 4
    exactly: the same model, the same metrics, one history in metrics.jsonl."""
    flags = ("--max-steps", 4, "--batch-size", 2, "--grad-accum", 2, "--save-every", 2,
             "--keep-checkpoints", 3, "--warmup-steps", 1, "--weight-decay", 0.1)
    out = tmp_path / "run"
    assert rm.main(runs.args(out, *flags)) == 0
    final = load_file(str(out / "model" / "model.safetensors"))
    steps, ckpt = _steps(out), load_checkpoint(out)

    assert rm.main(runs.args(out, *flags, "--resume", out / "checkpoints" / "step-2")) == 0
    assert_bitwise(load_file(str(out / "model" / "model.safetensors")), final)
    assert _steps(out) == steps and [s[0] for s in steps] == [1, 2, 3, 4]
    again = load_checkpoint(out)
    assert again.step == 4 and again.data == ckpt.data and again.extra == ckpt.extra
    assert_bitwise(again.model, ckpt.model)


def test_lora_interrupted_and_resumed_is_bitwise(runs, tmp_path, monkeypatch):
    """LoRA with dropout (so the RNG state matters), 4 steps an epoch, 2 epochs, stopped in
    step 3 after the step-2 checkpoint: the resumed run ends where an uninterrupted one
    does, adapter and head alike."""
    def cfg(name, **changes):
        return runs.cfg(tmp_path / name, batch_size=4, grad_accum=2, epochs=2,
                        save_every=2, lora_dropout=0.1, **LORA_FLAGS, **changes)

    reference = rm.train(cfg("reference"))
    patch_from_call(monkeypatch, rm, "score_sequences", 2 * 2 + 2)   # 2nd micro-batch, step 3
    with pytest.raises(Interrupt):
        rm.train(cfg("stopped"))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "stopped").step == 2
    resumed = rm.train(cfg("stopped", resume="latest"))
    for name in ("adapter_model.safetensors", rm.SCORE_FILE):
        assert_bitwise(load_file(str(resumed / "adapter" / name)),
                       load_file(str(reference / "adapter" / name)))
    assert _steps(resumed) == _steps(reference)


def test_full_export_is_a_transformers_sequence_classifier(runs, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model_dir = runs.model
    run = rm.train(runs.cfg(tmp_path / "run", max_steps=3, batch_size=4))
    trained = trained_from_checkpoint(model_dir, run)
    ids, mask = right_padded(_texts())
    assert (mask == 0).any()
    hf = AutoModelForSequenceClassification.from_pretrained(run / "model",
                                                            local_files_only=True).eval()
    assert hf.config.num_labels == 1
    with torch.no_grad():
        expected = trained(ids, mask)
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits[:, 0],
                                   expected, rtol=1e-5, atol=1e-5)
        loaded = rm.load_reward_model(run)
        torch.testing.assert_close(loaded(ids, mask), expected, rtol=1e-5, atol=1e-5)
        torch.manual_seed(0)
        untrained = RewardModel.from_causal_lm(load_model(model_dir))
        untrained.score.load_state_dict(trained.score.state_dict())
        assert (untrained(ids, mask) - expected).abs().max() > 1e-3   # the decoder trained
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    with pytest.raises(ValueError, match="base: only a LoRA export needs a base"):
        rm.load_reward_model(run, base=model_dir)


def test_lora_export_loads_onto_a_base_with_other_adapters(runs, tmp_path):
    """adapter/ holds the PEFT folder and score.safetensors; load_reward_model reads them
    onto the base folder, or onto a loaded causal LM that already carries another adapter
    (a PPO policy's), drawing nothing from the global RNG."""
    from kernelrl.models.lora import active_adapter, apply_lora, use_adapter

    model_dir = runs.model
    run = rm.train(runs.cfg(tmp_path / "run", max_steps=3, batch_size=4, **LORA_FLAGS))
    assert not (run / "model").exists()
    assert {"adapter_config.json", "adapter_model.safetensors", rm.SCORE_FILE,
            "tokenizer.json"} <= {p.name for p in (run / "adapter").iterdir()}
    trained = trained_from_checkpoint(model_dir, run, lora=LORA)
    ids, mask = right_padded(_texts())
    with torch.no_grad():
        expected = trained(ids, mask)
        rng = torch.get_rng_state()
        loaded = rm.load_reward_model(run)
        torch.testing.assert_close(loaded(ids, mask), expected, rtol=1e-5, atol=1e-5)
        assert not any(p.requires_grad for p in loaded.parameters())

        assert torch.equal(torch.get_rng_state(), rng)

        policy = load_model(model_dir)
        apply_lora(policy, r=2, alpha=4.0, adapter_name="policy")
        rng = torch.get_rng_state()
        shared = rm.load_reward_model(run / "adapter", base=policy)
        assert torch.equal(torch.get_rng_state(), rng)
        assert shared.decoder is policy.get_decoder() and active_adapter(policy) == "policy"
        assert any(p.requires_grad for p in policy.parameters())    # the policy still trains
        with use_adapter(policy, "reward"):
            torch.testing.assert_close(shared(ids, mask), expected, rtol=1e-5, atol=1e-5)

    with pytest.raises(FileNotFoundError, match="holds no reward model"):
        rm.load_reward_model(tmp_path)


def test_checkpointing_and_bf16_autocast_run(runs, tmp_path):
    run = rm.train(runs.cfg(tmp_path / "run", max_steps=2, batch_size=4,
                            gradient_checkpointing=True, autocast="bfloat16", eval_fraction=0.25,
                            save_every=0, **LORA_FLAGS))
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss"] is not None and r["loss"] > 0 for r in records)
    assert records[-1]["eval/accuracy"] is not None
