"""kernelrl.train.sft: the SFT trainer end to end on a tiny random Llama (CPU, fp32).

Learning through the command line, token-exact gradient accumulation, bitwise resume
after SIGKILL and at an epoch boundary, the run folder, the PEFT adapter export, the
held-out NLL. Errors that leave an existing run alone and a diverged loss stopping the run
are tested for every trainer in test_train_common.py.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

import train_helpers
from train_helpers import (Interrupt, Runs, assert_bitwise, assert_weights_close, help_text,
                           patch_from_call, run_records, sft_examples, write_jsonl)
from kernelrl.train import sft
from kernelrl.train.checkpoint import find_latest, load_checkpoint
from kernelrl.train.config import config_from_args
from kernelrl.train.metrics import read_metrics

one_thread = train_helpers.one_thread     # the shared fixtures, in use in this module
model_dir = train_helpers.model_dir


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """SFT runs of the tiny model on 24 training examples."""
    data = write_jsonl(tmp_path_factory.mktemp("sft") / "train.jsonl", sft_examples(24, seed=0))
    return Runs(sft.SFTConfig, model_dir, data, {"device": "cpu", "lr": 1e-2, "seed": 3})


def _steps(run_dir):
    """(step, loss, lr, grad_norm) of every training record in metrics.jsonl."""
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in read_metrics(run_dir)
            if "loss" in r]


def _tensors(path):
    return load_file(str(path))


# ----------------------------------------------------------------------------------------


def test_help_shows_the_sft_settings(capsys):
    text = " ".join(help_text(sft, capsys).split())
    assert "peak learning rate (AdamW) (default: 2e-05)" in text
    assert "--model STR local model folder" in text and "(required)" in text
    assert "--packing, --no-packing" in text and "--config FILE.toml" in text


def test_loss_decreases_through_the_cli(runs, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ("--epochs", 6, "--batch-size", 4, "--warmup-steps", 2, "--eval-fraction", 0.25,
             "--eval-every", 10, "--save-every", 10)
    assert sft.main(runs.args(out, *flags)) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "train_kept 18" in err and "eval_kept 6" in err          # data stats at start

    records, steps = run_records(out, 30, ("loss", "lr", "grad_norm", "tokens_per_s",
                                           "tokens_seen", "epoch"))    # 6 epochs x 5 steps
    assert records[0]["train_examples"] == 18
    first = sum(r["loss"] for r in steps[:3]) / 3
    last = sum(r["loss"] for r in steps[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    evals = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
    assert [s for s, _ in evals] == [10, 20, 30]
    assert evals[-1][1] < evals[0][1]

    assert (out / "curves.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        ["latest.json", "step-20", "step-30"]
    final = out / "model"
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    assert_bitwise(_tensors(final / "model.safetensors"),
                   _tensors(out / "checkpoints" / "step-30" / "model.safetensors"))
    # config.toml holds the settings used and reads back into the same config
    again = config_from_args(sft.SFTConfig, ["--config", str(out / "config.toml")])
    assert again == config_from_args(sft.SFTConfig, runs.args(out, *flags))


def test_grad_accum_matches_one_big_batch(runs, tmp_path):
    """2 x 4 micro-batches and one batch of 8 see the same sequences per step and give the
    same parameters up to fp32 rounding; a batch of 4 per step (another effective batch)
    does not. Tolerance: Adam turns a rounding-level gradient difference on a near-zero
    gradient into an update difference of a fraction of lr (1e-2), so parameters are
    compared to lr / 100, the losses to 1e-5 relative."""
    def run(name, batch_size, grad_accum):
        cfg = runs.cfg(tmp_path / name, batch_size=batch_size, grad_accum=grad_accum,
                       epochs=2, warmup_steps=1, save_every=0, weight_decay=0.1)
        return _tensors(sft.train(cfg) / "model" / "model.safetensors")

    split, whole, other = run("split", 2, 4), run("whole", 8, 1), run("other", 4, 1)
    assert_weights_close(split, whole, atol=1e-4)
    flat = [[x for row in _steps(tmp_path / name) for x in row] for name in ("split", "whole")]
    assert flat[0] == pytest.approx(flat[1], rel=1e-5)
    assert max((other[n] - whole[n]).abs().max().item() for n in whole) > 1e-2


_CHILD = textwrap.dedent("""
    import pathlib, sys, time
    import torch
    from kernelrl.train import sft
    real, marker, hang_at = sft.token_logprobs, pathlib.Path(sys.argv[1]), int(sys.argv[2])
    calls = 0
    def slow(*args, **kwargs):
        global calls
        calls += 1
        if calls == hang_at:       # mid-step: the parent kills us here with SIGKILL
            marker.write_text("hanging")
            time.sleep(120)
        return real(*args, **kwargs)
    sft.token_logprobs = slow
    sys.exit(sft.main(sys.argv[3:]))
""")


def test_sigkill_then_resume_is_bitwise(runs, tmp_path):
    # 24 examples, 2 x 2 per step: 6 steps an epoch, 12 steps; checkpoints every 3 steps.
    flags = ("--batch-size", 2, "--grad-accum", 2, "--epochs", 2, "--warmup-steps", 2,
             "--save-every", 3, "--weight-decay", 0.1)
    reference = tmp_path / "reference"
    assert sft.main(runs.args(reference, *flags)) == 0

    out = tmp_path / "killed"
    marker = tmp_path / "hanging"
    # Hang in the second micro-batch of step 5: step 4 is done but not checkpointed, and
    # step 5 has a backward accumulated.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(marker), str(4 * 2 + 2),
         *runs.args(out, *flags)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if child.poll() is not None:
            pytest.fail(f"the child exited early ({child.returncode}): {child.stderr.read()}")
        assert time.monotonic() < deadline, "the child never reached the hang point"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert child.returncode == -signal.SIGKILL
    assert find_latest(out).name == "step-3"
    assert max(r["step"] for r in read_metrics(out)) == 4         # logged, never saved

    assert sft.main(runs.args(out, *flags, "--resume", "latest")) == 0
    assert_bitwise(_tensors(out / "model" / "model.safetensors"),
                   _tensors(reference / "model" / "model.safetensors"))
    assert _steps(out) == _steps(reference)                        # steps 1..12 once each
    ckpt, ref_ckpt = load_checkpoint(out), load_checkpoint(reference)
    assert ckpt.step == ref_ckpt.step == 12 and ckpt.data == ref_ckpt.data


def test_resume_at_an_epoch_boundary_skips_nothing(runs, tmp_path, monkeypatch):
    """LoRA with dropout (so the RNG state matters), 3 steps an epoch, stopped right after
    the checkpoint that closes epoch 1."""
    def cfg(name, **changes):
        return runs.cfg(tmp_path / name, batch_size=4, grad_accum=2, epochs=3,
                        save_every=3, lora_r=4, lora_alpha=8, lora_dropout=0.1, **changes)

    reference = sft.train(cfg("reference"))

    patch_from_call(monkeypatch, sft, "token_logprobs", 3 * 2 + 1)   # first call of step 4
    with pytest.raises(Interrupt):
        sft.train(cfg("stopped"))
    monkeypatch.undo()
    ckpt = load_checkpoint(tmp_path / "stopped")
    assert ckpt.step == 3 and ckpt.data["epoch"] == 1 and ckpt.data["position"] == 0

    resumed = sft.train(cfg("stopped", resume="latest"))
    assert_bitwise(_tensors(resumed / "adapter" / "adapter_model.safetensors"),
                    _tensors(reference / "adapter" / "adapter_model.safetensors"))
    assert _steps(resumed) == _steps(reference)
    epochs = [r["epoch"] for r in read_metrics(resumed) if "loss" in r]
    assert epochs == pytest.approx([1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2, 7 / 3, 8 / 3, 3],
                                   abs=1e-4)


def test_lora_run_saves_a_peft_adapter(runs, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from kernelrl.models.lora import load_adapter
    from kernelrl.train.common import setup_model

    model_dir = runs.model
    run = sft.train(runs.cfg(tmp_path / "run", max_steps=3, batch_size=8, lora_r=4,
                             lora_alpha=8, lora_targets="q_proj,v_proj,down_proj"))
    adapter = run / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert not (run / "model").exists()
    weights = _tensors(adapter / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in weights.items())

    ids = torch.tensor([[2, 22, 23, 5, 24, 8, 28, 5, 6]])
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    theirs = peft.PeftModel.from_pretrained(base, adapter).eval()
    ours = load_adapter(setup_model(model_dir), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_evaluate_is_the_mean_token_nll_however_batched(runs):
    """One number over the whole set: Σ NLL / N, equal to transformers' own loss summed
    example by example, with any batch size and with packing."""
    from kernelrl.models.hf import load_model, load_tokenizer
    from kernelrl.train.data import load_sft

    model_dir, data = runs.model, runs.data
    dataset, _ = load_sft(data, load_tokenizer(model_dir), max_length=64)
    model = load_model(model_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in dataset.samples:
            ids = torch.tensor([sample.input_ids])
            labels = torch.tensor([sample.labels])
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    expected = total / count
    cpu = torch.device("cpu")
    for batch_size, packing in ((1, False), (5, False), (3, True)):
        cfg = sft.SFTConfig(model="-", data="-", out="-", batch_size=batch_size,
                            packing=packing, max_length=64)
        assert sft.evaluate(model, dataset, cfg, cpu) == pytest.approx(expected, rel=1e-5)
    assert model.training


def test_packing_checkpointing_and_bf16_autocast_run(runs, tmp_path):
    run = sft.train(runs.cfg(tmp_path / "run", max_steps=3, batch_size=2, packing=True,
                             max_length=48, gradient_checkpointing=True, autocast="bfloat16",
                             eval_fraction=0.2, save_every=0))
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss"] is not None and r["loss"] > 0 for r in records)
    assert records[-1]["eval/loss"] is not None
    # a packed step holds several examples per row: more tokens than 2 examples would have
    assert records[0]["tokens_seen"] > 2 * 20
