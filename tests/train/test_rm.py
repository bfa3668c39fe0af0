"""kernelrl.train.rm: the reward-model trainer end to end on a tiny random Llama (CPU, fp32).

Learning a preference through the command line, the loss of rankings against the same
pairs written out (and its forwards), prompt-exact gradient accumulation, bitwise resume,
both exports read back (transformers' sequence classifier, load_reward_model), errors that
leave an existing run alone, and a diverged loss stopping the run with its step named.
"""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from rm_helpers import as_pairs, ranked_examples, right_padded, trained_from_checkpoint
from train_helpers import snapshot, write_jsonl, write_model_folder
from kernelrl.models.hf import load_model, load_tokenizer
from kernelrl.models.reward import RewardModel
from kernelrl.train import rm
from kernelrl.train.batching import BatchLoader
from kernelrl.train.checkpoint import find_latest, load_checkpoint
from kernelrl.train.config import config_from_args
from kernelrl.train.data import load_preferences
from kernelrl.train.metrics import NonFiniteLossError, read_metrics

CPU = torch.device("cpu")
LORA = {"r": 4, "alpha": 8.0, "target_modules": ("q_proj", "v_proj", "down_proj")}
LORA_FLAGS = {"lora_r": 4, "lora_alpha": 8.0, "lora_targets": "q_proj,v_proj,down_proj"}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: a shared, busy machine runs tiny steps faster so, and the
    bitwise comparisons need the same thread count in every run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model folder (with its tokenizer) and 32 prompts with K = 2, 3 or 4."""
    root = tmp_path_factory.mktemp("rm")
    model = write_model_folder(root / "model")
    data = write_jsonl(root / "train.jsonl", ranked_examples(32, seed=1))
    return model, data


def _args(files, out, *extra):
    model, data = files
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu",
            "--lr", "3e-3", "--seed", "3", *map(str, extra)]


def _cfg(files, out, **changes):
    model, data = files
    base = rm.RMConfig(model=str(model), data=str(data), out=str(out), device="cpu", lr=3e-3,
                       seed=3)
    return replace(base, **changes)


def _steps(run_dir):
    return [(r["step"], r["loss"], r["accuracy"], r["margin"], r["lr"], r["grad_norm"])
            for r in read_metrics(run_dir) if "loss" in r]


def _assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class _Interrupt(Exception):
    pass


def _patch_scores(monkeypatch, call, value=None):
    """From its ``call``-th call on (1-based), rm.score_sequences raises (value None) or
    returns its scores times ``value``."""
    real = rm.score_sequences
    count = {"n": 0}

    def patched(*args, **kwargs):
        count["n"] += 1
        scores = real(*args, **kwargs)
        if count["n"] >= call:
            if value is None:
                raise _Interrupt(f"call {count['n']}")
            return scores * value
        return scores

    monkeypatch.setattr(rm, "score_sequences", patched)


def _texts(n=6, seed=7):
    """Prompt + response texts of varied lengths (for right-padded scoring)."""
    rows = as_pairs(ranked_examples(n, seed=seed))
    return [row["prompt"] + row[key] for row in rows for key in ("chosen", "rejected")]


# ----------------------------------------------------------------------------------------


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        rm.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in rm.RMConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text, name
    assert "(default: 9e-06)" in text and "(default: reward)" in text
    assert "--center-coef FLOAT" in text and "--margin FLOAT" in text
    assert "--model STR" in text and "(required)" in text


def test_learns_a_marker_preference_through_the_cli(files, tmp_path, capsys):
    """Better responses hold more marker words: the held-out loss falls far below the
    untrained model's and nearly every held-out pair is ranked right."""
    model_dir, data = files
    flags = ("--epochs", 3, "--batch-size", 4, "--warmup-steps", 2, "--eval-fraction", 0.25,
             "--eval-every", 6, "--save-every", 6)
    out = tmp_path / "run"
    assert rm.main(_args(files, out, *flags)) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "train_kept 24" in err and "eval_kept 8" in err and "train_pairs" in err

    records = read_metrics(out)
    assert records[0]["step"] == 0 and records[0]["eval_examples"] == 8
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 19))         # 3 epochs x 6 steps
    for key in ("loss", "accuracy", "margin", "lr", "grad_norm", "tokens_per_s",
                "tokens_seen", "epoch"):
        assert all(key in r for r in steps), key
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6, 12, 18]
    assert all({"eval_accuracy", "eval_margin"} <= r.keys() for r in evals)
    assert steps[0]["loss"] > 0.5                                   # ~log 2 at the start
    assert sum(r["loss"] for r in steps[-3:]) / 3 < 0.3 * steps[0]["loss"]
    assert evals[-1]["eval_accuracy"] >= 0.9 and evals[-1]["eval_margin"] > 1
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]

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
    assert after["loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)
    assert after["accuracy"] == evals[-1]["eval_accuracy"]

    assert (out / "curves.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        ["latest.json", "step-12", "step-18"]
    assert (out / "model" / "tokenizer.json").is_file() and not (out / "adapter").exists()
    assert cfg == config_from_args(rm.RMConfig, _args(files, out, *flags))


def test_rankings_give_the_loss_of_their_pairs_with_fewer_forwards(files, tmp_path):
    """Two prompts with K = 4 ranked responses (8 sequences) against their 12 pairs written
    out as chosen/rejected lines (24 sequences): the same loss and gradients. Both equal
    the loss computed by hand, Σ pair_weight · (−logσ(gap − margin) + c·(sum)²)."""
    rows = ranked_examples(2, seed=5, ks=(4,))
    ranked = write_jsonl(tmp_path / "ranked.jsonl", rows)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", as_pairs(rows))
    model_dir, _ = files
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


def test_unequal_rankings_weigh_every_prompt_once(files):
    """Prompts with 1, 3 and 6 pairs in one batch: the loss is the mean over prompts of
    each prompt's mean over its pairs (reward_loss per prompt, averaged)."""
    from kernelrl.ops import reward_loss

    model_dir, data = files
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


def test_grad_accum_matches_one_big_batch(files, tmp_path):
    """2 x 2 micro-batches and one batch of 4 prompts see the same prompts per step and
    give the same parameters up to fp32 rounding; 2 prompts per step (another batch) does
    not. K is 2 to 4, so micro-batches hold unequal numbers of pairs, and 30 prompts end
    each epoch with a step of one micro-batch (which 1 / --grad-accum would halve). Adam
    can turn a rounding-level gradient difference into a fraction of lr, so parameters
    are compared to lr / 30 and the logged values of later steps to 2e-4 relative (the
    first step's to 1e-6)."""
    model_dir, _ = files
    data = write_jsonl(tmp_path / "30.jsonl", ranked_examples(30, seed=1))   # last step: 2

    def run(name, batch_size, grad_accum):
        cfg = _cfg((model_dir, data), tmp_path / name, batch_size=batch_size,
                   grad_accum=grad_accum, epochs=2, warmup_steps=1, save_every=0,
                   weight_decay=0.1, center_coef=0.01, margin=0.5)
        return load_file(str(rm.train(cfg) / "model" / "model.safetensors"))

    split = run("split", 2, 2)
    whole = run("whole", 4, 1)
    other = run("other", 2, 1)
    assert split.keys() == whole.keys()
    for name in split:
        torch.testing.assert_close(split[name], whole[name], rtol=0, atol=1e-4)
    split_steps, whole_steps = _steps(tmp_path / "split"), _steps(tmp_path / "whole")
    assert split_steps[0] == pytest.approx(whole_steps[0], rel=1e-6)     # before any drift
    flat = [[x for row in steps for x in row] for steps in (split_steps, whole_steps)]
    assert flat[0] == pytest.approx(flat[1], rel=2e-4)
    assert max((other[n] - whole[n]).abs().max().item() for n in whole) > 1e-2


def test_resume_from_an_earlier_checkpoint_is_bitwise(files, tmp_path):
    """4 steps; then the same run resumed from its step-2 checkpoint redoes steps 3 and 4
    exactly: the same model, the same metrics, one history in metrics.jsonl."""
    flags = ("--max-steps", 4, "--batch-size", 2, "--grad-accum", 2, "--save-every", 2,
             "--keep-checkpoints", 3, "--warmup-steps", 1, "--weight-decay", 0.1)
    out = tmp_path / "run"
    assert rm.main(_args(files, out, *flags)) == 0
    final = load_file(str(out / "model" / "model.safetensors"))
    steps, ckpt = _steps(out), load_checkpoint(out)

    assert rm.main(_args(files, out, *flags, "--resume", out / "checkpoints" / "step-2")) == 0
    _assert_bitwise(load_file(str(out / "model" / "model.safetensors")), final)
    assert _steps(out) == steps and [s[0] for s in steps] == [1, 2, 3, 4]
    again = load_checkpoint(out)
    assert again.step == 4 and again.data == ckpt.data and again.extra == ckpt.extra
    _assert_bitwise(again.model, ckpt.model)


def test_lora_interrupted_and_resumed_is_bitwise(files, tmp_path, monkeypatch):
    """LoRA with dropout (so the RNG state matters), 4 steps an epoch, 2 epochs, stopped in
    step 3 after the step-2 checkpoint: the resumed run ends where an uninterrupted one
    does, adapter and head alike."""
    def cfg(name, **changes):
        return _cfg(files, tmp_path / name, batch_size=4, grad_accum=2, epochs=2,
                    save_every=2, lora_dropout=0.1, **LORA_FLAGS, **changes)

    reference = rm.train(cfg("reference"))
    _patch_scores(monkeypatch, call=2 * 2 + 2)                  # 2nd micro-batch of step 3
    with pytest.raises(_Interrupt):
        rm.train(cfg("stopped"))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "stopped").step == 2
    resumed = rm.train(cfg("stopped", resume="latest"))
    for name in ("adapter_model.safetensors", rm.SCORE_FILE):
        _assert_bitwise(load_file(str(resumed / "adapter" / name)),
                        load_file(str(reference / "adapter" / name)))
    assert _steps(resumed) == _steps(reference)


def test_full_export_is_a_transformers_sequence_classifier(files, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model_dir, _ = files
    run = rm.train(_cfg(files, tmp_path / "run", max_steps=3, batch_size=4))
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


def test_lora_export_loads_onto_a_base_with_other_adapters(files, tmp_path):
    """adapter/ holds the PEFT folder and score.safetensors; load_reward_model reads them
    onto the base folder, or onto a loaded causal LM that already carries another adapter
    (a PPO policy's), drawing nothing from the global RNG."""
    from kernelrl.models.lora import active_adapter, apply_lora, use_adapter

    model_dir, _ = files
    run = rm.train(_cfg(files, tmp_path / "run", max_steps=3, batch_size=4, **LORA_FLAGS))
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


def test_errors_leave_an_existing_run_alone(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert rm.main(_args(files, out, "--max-steps", 2)) == 0
    before = snapshot(out)
    capsys.readouterr()

    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "count", "chosen": "one", "rejected": "two"},
        {"prompt": "count", "chosen": "one", "rejected": 2}])
    args = _args(files, out, "--max-steps", 2)
    args[args.index("--data") + 1] = str(bad)
    assert rm.main(args) == 1
    assert f"{bad}:2:" in capsys.readouterr().err

    args = _args(files, out, "--max-steps", 2)
    args[args.index("--model") + 1] = str(tmp_path / "no-such-model")
    assert rm.main(args) == 1
    err = capsys.readouterr().err
    assert "--model" in err and "no-such-model" in err

    for flags, message in ((("--center-coef", -1), "--center-coef: expected a finite number"),
                           (("--adapter-name", "my-rm"), "--adapter-name: expected a Python"),
                           (("--eval-every", 5), "--eval-every 5: there is no held-out"),
                           (("--batch-size", 0), "--batch-size: expected an int >= 1, got 0")):
        with pytest.raises(SystemExit) as exit_info:
            rm.main(_args(files, out, *flags))
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err

    assert rm.main(_args(files, out, "--max-steps", 2)) == 1     # same run again, no --resume
    assert "already holds" in capsys.readouterr().err

    assert rm.main(_args(files, out, "--max-steps", 2, "--batch-size", 8,
                         "--resume", "latest")) == 1
    assert "--batch-size x --grad-accum = 4 prompts" in capsys.readouterr().err
    assert snapshot(out) == before


def test_nan_loss_stops_with_the_step_named(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _patch_scores(monkeypatch, call=3, value=float("nan"))          # step 3's scores
    assert rm.main(_args(files, out, "--batch-size", 8, "--max-steps", 6,
                         "--save-every", 2)) == 1
    assert "at step 3" in capsys.readouterr().err
    assert find_latest(out).name == "step-2"
    assert not (out / "checkpoints" / "step-3").exists() and not (out / "model").exists()
    assert max(r["step"] for r in read_metrics(out)) == 2
    with pytest.raises(NonFiniteLossError, match="step 3"):
        rm.train(_cfg(files, out, batch_size=8, max_steps=6, save_every=2, resume="latest"))


def test_checkpointing_and_bf16_autocast_run(files, tmp_path):
    run = rm.train(_cfg(files, tmp_path / "run", max_steps=2, batch_size=4,
                        gradient_checkpointing=True, autocast="bfloat16", eval_fraction=0.25,
                        save_every=0, **LORA_FLAGS))
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss"] is not None and r["loss"] > 0 for r in records)
    assert records[-1]["eval_accuracy"] is not None
