"""kernelrl.train.dpo: the DPO trainer end to end on a tiny random Llama (CPU, fp32).

log 2 at the first step with each kind of reference, learning through the command line,
every loss type against kernelrl.ops.dpo_loss on the same log-probs, prompt-exact gradient
accumulation, a ranking against its explicit pairs, bitwise resume, the precomputed
reference against the copy. Errors that leave an existing run alone (with DPO's own bad
settings) and a diverged loss stopping the run are tested for every trainer in
test_train_common.py.
"""

import math

import pytest
import torch
from safetensors.torch import load_file

import train_helpers
from dpo_helpers import as_pairs, direct_loss, pair_examples, ranking_example
from train_helpers import (Interrupt, Runs, assert_weights_close, help_text, patch_from_call,
                           run_records, write_jsonl, write_model_folder)
from kernelrl.models.hf import load_model, load_tokenizer
from kernelrl.ops import dpo_loss
from kernelrl.ops.preference import LOSS_TYPES
from kernelrl.train import dpo
from kernelrl.train.batching import collate_preferences
from kernelrl.train.checkpoint import find_latest, load_checkpoint, load_model_state
from kernelrl.train.config import config_from_args
from kernelrl.train.data import load_preferences
from kernelrl.train.metrics import read_metrics

one_thread = train_helpers.one_thread     # the shared fixtures, in use in this module
model_dir = train_helpers.model_dir
LOG2 = math.log(2.0)


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """DPO runs of the tiny model on three data files: 24 pairs (the default); 8 pairs;
    19 pairs and 3 rankings of 3 (prompts with 1 and 3 pairs, so per-prompt weights
    matter)."""
    root = tmp_path_factory.mktemp("dpo")
    mixed = pair_examples(19, seed=2) + [ranking_example(0, 3), ranking_example(2, 5),
                                         ranking_example(1, 4)]
    data = {"pairs": write_jsonl(root / "pairs.jsonl", pair_examples(24, seed=0)),
            "small": write_jsonl(root / "small.jsonl", pair_examples(8, seed=1)),
            "mixed": write_jsonl(root / "mixed.jsonl", mixed)}
    return Runs(dpo.DPOConfig, model_dir, data,
                {"device": "cpu", "lr": 1e-2, "beta": 0.5, "seed": 3})


def _records(run_dir):
    """The training records of metrics.jsonl without the wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")}
            for r in read_metrics(run_dir) if "loss" in r]


def _weights(run_dir):
    for name in ("model/model.safetensors", "adapter/adapter_model.safetensors"):
        if (run_dir / name).is_file():
            return load_file(str(run_dir / name))
    raise AssertionError(f"{run_dir} holds no exported model")


# ----------------------------------------------------------------------------------------


def test_help_shows_the_dpo_settings_and_every_loss_type(capsys):
    text = " ".join(help_text(dpo, capsys).split())
    assert "{" + ",".join(LOSS_TYPES) + "}" in text
    assert "(default: sigmoid)" in text and "(default: copy)" in text
    assert "ignored with --lora-r > 0" in text
    assert "peak learning rate (AdamW) (default: 1e-06)" in text


@pytest.mark.parametrize("kind", ["copy", "precompute", "lora"])
def test_first_step_loss_is_log2_when_the_policy_is_the_reference(runs, tmp_path, capsys,
                                                                   kind):
    """At step 1 the policy is the reference, so every pair's loss is −log σ(0) = log 2,
    with each way of keeping the reference. 8 prompts of a shuffled order: a precomputed
    reference looked up for the wrong sequences would not give log 2."""
    out = tmp_path / "run"
    flags = ["--max-steps", 1, "--batch-size", 8]
    flags += (["--lora-r", 4, "--lora-dropout", 0.1, "--ref", "precompute"] if kind == "lora"
              else ["--ref", kind])
    assert dpo.main(runs.args(out, *flags)) == 0
    err = capsys.readouterr().err
    [first] = _records(out)
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first["logps/chosen"] < -1.0             # real log-probs, not zeros
    expected = {"copy": "reference: a frozen copy of",
                "precompute": "sequences precomputed into",
                "lora": "adapters disabled (--ref precompute is ignored with LoRA)"}[kind]
    assert expected in err
    assert (out / dpo.REFERENCE_FILE).is_file() == (kind == "precompute")


def test_learns_a_preference_through_the_cli(runs, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ("--epochs", 6, "--batch-size", 4, "--lr", "2e-3", "--warmup-steps", 2,
             "--eval-fraction", 0.25, "--eval-every", 10, "--save-every", 10)
    assert dpo.main(runs.args(out, *flags)) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "train_pairs 18" in err and "eval_pairs 6" in err        # data stats at start

    records, steps = run_records(out, 30, ("loss", "lr", "grad_norm", "tokens_per_s",
                                           "tokens_seen", *dpo.METRICS))   # 6 epochs x 5 steps
    assert records[0]["train_kept"] == 18
    for r in steps:
        assert r["rewards/margins"] == pytest.approx(
            r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)
    first, last = steps[:3], steps[-3:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)   # noqa: E731
    assert mean(last, "loss") < 0.5 * mean(first, "loss")
    assert mean(last, "rewards/accuracies") > mean(first, "rewards/accuracies") + 0.3
    assert mean(last, "rewards/margins") > 1.0

    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] < LOG2
    assert evals[-1]["eval/rewards/accuracies"] >= 5 / 6
    assert all(f"eval/{m}" in evals[-1] for m in dpo.METRICS)

    assert (out / "curves.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        ["latest.json", "step-20", "step-30"]
    assert (out / "model" / "config.json").is_file()
    assert (out / "model" / "tokenizer.json").is_file()
    again = config_from_args(dpo.DPOConfig, ["--config", str(out / "config.toml")])
    assert again == config_from_args(dpo.DPOConfig, runs.args(out, *flags))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_matches_dpo_loss_on_the_same_logprobs(runs, tmp_path, loss_type):
    """Two steps over all 8 prompts. Step 1 (policy = reference) is dpo_loss at c = r = 0;
    step 2 is recomputed here from the step-1 checkpoint, the initial model and
    kernelrl.ops.dpo_loss on their sequence log-probs (means for ipo)."""
    cfg = runs.cfg(tmp_path / "run", data="small", loss_type=loss_type, batch_size=8,
                   max_steps=2, save_every=1, label_smoothing=0.1)
    run = dpo.train(cfg)
    steps = _records(run)
    zero = torch.zeros(1)
    at_zero, _, _ = dpo_loss(zero, zero, zero, zero, beta=0.5, loss_type=loss_type,
                             label_smoothing=0.1)
    assert steps[0]["loss"] == pytest.approx(at_zero.item(), rel=1e-5)

    policy = load_model(runs.model)
    load_model_state(dict(policy.named_parameters()),
                     load_checkpoint(run / "checkpoints" / "step-1").model)
    dataset, _ = load_preferences(runs.data["small"], load_tokenizer(runs.model),
                                  max_length=cfg.max_length)
    batch = collate_preferences(dataset.samples, dataset.pad_token_id)
    with torch.no_grad():
        loss, metrics = direct_loss(policy, load_model(runs.model), batch, cfg)
    assert steps[1]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert abs(loss.item() - at_zero.item()) > 1e-4       # step 2 is not step 1 again
    for key, value in metrics.items():
        assert steps[1][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_grad_accum_matches_one_big_batch(runs, tmp_path):
    """2 x 2 micro-batches and one batch of 4 prompts see the same prompts per step and
    give the same run up to fp32 rounding, also at the end of an epoch (22 prompts: the
    last step holds 2) and with prompts of 1 and 3 pairs; 2 prompts per step does not.
    Parameters are compared to lr / 100, the metrics to 1e-5 relative."""
    def run(name, batch_size, grad_accum):
        cfg = runs.cfg(tmp_path / name, data="mixed", batch_size=batch_size,
                       grad_accum=grad_accum, epochs=2, warmup_steps=1, save_every=0,
                       weight_decay=0.1)
        return dpo.train(cfg)

    split, whole, other = run("split", 2, 2), run("whole", 4, 1), run("other", 2, 1)
    b = _weights(whole)
    assert_weights_close(_weights(split), b, atol=1e-4)
    steps_a, steps_b = _records(split), _records(whole)
    assert len(steps_a) == len(steps_b) == 12
    for ra, rb in zip(steps_a, steps_b):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    c = _weights(other)
    assert max((c[n] - b[n]).abs().max().item() for n in b) > 1e-2


def test_a_ranking_is_its_pairs_in_fewer_forwards(runs, tmp_path, monkeypatch):
    """One prompt ranking 3 responses, against the same 3 pairs written out as 3 lines:
    the same loss and gradients, from 3 forwarded sequences instead of 6."""
    tokenizer = load_tokenizer(runs.model)
    example = ranking_example(0, 4)
    paths = {"ranking": write_jsonl(tmp_path / "ranking.jsonl", [example]),
             "pairs": write_jsonl(tmp_path / "pairs.jsonl", as_pairs(example))}
    policy = load_model(write_model_folder(tmp_path / "policy", seed=5))
    reference = load_model(runs.model)
    cfg = dpo.DPOConfig(model="-", data="-", out="-", beta=0.5)
    rows = []
    real = dpo.sequence_logprobs

    def counted(model, input_ids, *args, **kwargs):
        rows.append(input_ids.shape[0])
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(dpo, "sequence_logprobs", counted)
    results = {}
    for name, path in paths.items():
        dataset, _ = load_preferences(path, tokenizer, max_length=64)
        batch = collate_preferences(dataset.samples, dataset.pad_token_id)
        ref = dpo.reference_logps(reference, batch, cfg)
        policy.zero_grad(set_to_none=True)
        loss, stats = dpo.dpo_step_loss(policy, batch, ref, cfg)
        loss.backward()
        results[name] = loss.detach(), stats, [p.grad.clone() for p in policy.parameters()]
    assert rows == [3, 3, 6, 6]           # reference and policy: K rows vs 2·C(K, 2)
    (loss_r, stats_r, grads_r), (loss_p, stats_p, grads_p) = results["ranking"], \
        results["pairs"]
    assert loss_r.item() == pytest.approx(loss_p.item(), rel=1e-6)
    assert abs(loss_r.item() - LOG2) > 1e-3
    for name in dpo.METRICS:
        assert stats_r[name].item() == pytest.approx(stats_p[name].item(), rel=1e-5, abs=1e-6)
    for g_r, g_p in zip(grads_r, grads_p):
        torch.testing.assert_close(g_r, g_p)
    assert max(g.abs().max().item() for g in grads_r) > 1e-3


@pytest.mark.parametrize("setup", ["precompute", "lora"])
def test_stop_and_resume_is_bitwise(runs, tmp_path, monkeypatch, setup):
    """4 steps straight, against 4 steps stopped in the second micro-batch of step 3 and
    resumed from the step-2 checkpoint: the same weights and metrics, bit for bit. The
    precomputed reference is read back, not recomputed; LoRA runs with dropout, so the
    restored RNG state matters."""
    extra = (dict(ref="precompute") if setup == "precompute"
             else dict(lora_r=4, lora_alpha=8, lora_dropout=0.1))

    def cfg(name, **changes):
        return runs.cfg(tmp_path / name, data="mixed", batch_size=2, grad_accum=2,
                        max_steps=4, save_every=2, eval_fraction=0.2, **extra, **changes)

    reference = dpo.train(cfg("reference"))
    patch_from_call(monkeypatch, dpo, "dpo_step_loss", 2 * 2 + 2)   # step 3, 2nd micro-batch
    with pytest.raises(Interrupt):
        dpo.train(cfg("stopped"))
    monkeypatch.undo()
    assert find_latest(tmp_path / "stopped").name == "step-2"

    def no_recompute(*args, **kwargs):
        raise AssertionError("the reference log-probs were computed again")

    monkeypatch.setattr(dpo, "precompute_reference", no_recompute)
    resumed = dpo.train(cfg("stopped", resume="latest"))
    a, b = _weights(resumed), _weights(reference)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _records(resumed) == _records(reference)
    assert [r["step"] for r in _records(resumed)] == [1, 2, 3, 4]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_precompute_gives_the_losses_of_copy(runs, tmp_path, loss_type):
    """The same run with a frozen copy and with precomputed log-probs (sums, or means for
    ipo), train and eval, over rankings too: equal up to fp32 rounding (the cache was
    computed in other batches, so with other padding). At step 1 every margin is 0 up
    to that rounding, so which side of 0 it falls on, rewards/accuracies, is not compared."""
    records = {}
    for ref in ("copy", "precompute"):
        cfg = runs.cfg(tmp_path / ref, data="mixed", ref=ref, loss_type=loss_type,
                       batch_size=3, max_steps=6, eval_fraction=0.2, eval_every=3, save_every=0)
        records[ref] = _records(dpo.train(cfg))
    assert len(records["copy"]) == 6 and "eval/loss" in records["copy"][2]
    for a, b in zip(records["copy"], records["precompute"]):
        assert a.keys() == b.keys()
        for key in a.keys() - ({"rewards/accuracies"} if a["step"] == 1 else set()):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)


def test_lora_checkpointing_and_bf16_autocast_run(runs, tmp_path):
    run = dpo.train(runs.cfg(tmp_path / "run", data="mixed", max_steps=3, batch_size=2,
                             lora_r=4, lora_alpha=8, gradient_checkpointing=True,
                             autocast="bfloat16", loss_type="ipo", eval_fraction=0.2,
                             save_every=0))
    records = _records(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss"] is not None and r["grad_norm"] > 0 for r in records)
    assert records[-1]["eval/loss"] is not None
    assert (run / "adapter" / "adapter_config.json").is_file() and not (run / "model").exists()
