"""kernelrl.train.sft: the SFT trainer end to end on a tiny random Llama (CPU, fp32).

Learning through the command line, token-exact gradient accumulation, bitwise resume
after SIGKILL and at an epoch boundary, the run folder, errors that leave an existing run
alone, the PEFT adapter export, and a diverged loss stopping the run with its step named.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import sft_examples, snapshot, write_jsonl, write_model_folder
from kernelrl.train import sft
from kernelrl.train.checkpoint import find_latest, load_checkpoint
from kernelrl.train.config import config_from_args
from kernelrl.train.metrics import NonFiniteLossError, read_metrics


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread (the subprocesses get OMP_NUM_THREADS=1 too): on a shared,
    busy machine two threads waiting on each other make tiny steps very slow, and the
    bitwise comparisons need the same thread count in every run."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model folder (with its tokenizer) and 24 training examples."""
    root = tmp_path_factory.mktemp("sft")
    model = write_model_folder(root / "model")
    data = write_jsonl(root / "train.jsonl", sft_examples(24, seed=0))
    return model, data


def _args(files, out, *extra):
    model, data = files
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu",
            "--lr", "1e-2", "--seed", "3", *map(str, extra)]


def _cfg(files, out, **changes):
    model, data = files
    base = sft.SFTConfig(model=str(model), data=str(data), out=str(out), device="cpu",
                         lr=1e-2, seed=3)
    return replace(base, **changes)


def _steps(run_dir):
    """(step, loss, lr, grad_norm) of every training record in metrics.jsonl."""
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in read_metrics(run_dir)
            if "loss" in r]


def _tensors(path):
    return load_file(str(path))


def _assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class _Interrupt(Exception):
    pass


def _fail_at_call(monkeypatch, call, value=None):
    """Make sft's token_logprobs raise (value None) or return ``value`` from its
    ``call``-th call on (1-based)."""
    real = sft.token_logprobs
    count = {"n": 0}

    def patched(*args, **kwargs):
        count["n"] += 1
        result = real(*args, **kwargs)
        if count["n"] >= call:
            if value is None:
                raise _Interrupt(f"call {count['n']}")
            return result * value
        return result

    monkeypatch.setattr(sft, "token_logprobs", patched)


# ----------------------------------------------------------------------------------------


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sft.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in sft.SFTConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text, name
    assert "peak learning rate (AdamW) (default: 2e-05)" in text
    assert "--model STR local model folder" in text and "(required)" in text
    assert "--packing, --no-packing" in text and "--config FILE.toml" in text


def test_loss_decreases_through_the_cli(files, tmp_path, capsys):
    out = tmp_path / "run"
    rc = sft.main(_args(files, out, "--epochs", 6, "--batch-size", 4, "--warmup-steps", 2,
                        "--eval-fraction", 0.25, "--eval-every", 10, "--save-every", 10))
    assert rc == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "train_kept 18" in err and "eval_kept 6" in err          # data stats at start

    records = read_metrics(out)
    assert records[0]["step"] == 0 and records[0]["train_examples"] == 18
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))        # 6 epochs x 5 steps
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "epoch"):
        assert all(key in r for r in steps), key
    first = sum(r["loss"] for r in steps[:3]) / 3
    last = sum(r["loss"] for r in steps[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    assert [s for s, _ in evals] == [10, 20, 30]
    assert evals[-1][1] < evals[0][1]

    assert (out / "curves.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        ["latest.json", "step-20", "step-30"]
    final = out / "model"
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    _assert_bitwise(_tensors(final / "model.safetensors"),
                    _tensors(out / "checkpoints" / "step-30" / "model.safetensors"))
    # config.toml holds the settings used and reads back into the same config
    again = config_from_args(sft.SFTConfig, ["--config", str(out / "config.toml")])
    assert again == config_from_args(sft.SFTConfig, _args(
        files, out, "--epochs", 6, "--batch-size", 4, "--warmup-steps", 2,
        "--eval-fraction", 0.25, "--eval-every", 10, "--save-every", 10))


def test_grad_accum_matches_one_big_batch(files, tmp_path):
    """2 x 4 micro-batches and one batch of 8 see the same sequences per step and give the
    same parameters up to fp32 rounding; a batch of 4 per step (another effective batch)
    does not. Tolerance: Adam turns a rounding-level gradient difference on a near-zero
    gradient into an update difference of a fraction of lr (1e-2), so parameters are
    compared to lr / 100, the losses to 1e-5 relative."""
    def run(name, batch_size, grad_accum):
        cfg = _cfg(files, tmp_path / name, batch_size=batch_size, grad_accum=grad_accum,
                   epochs=2, warmup_steps=1, save_every=0, weight_decay=0.1)
        return _tensors(sft.train(cfg) / "model" / "model.safetensors")

    split = run("split", 2, 4)
    whole = run("whole", 8, 1)
    other = run("other", 4, 1)
    assert split.keys() == whole.keys()
    for name in split:
        torch.testing.assert_close(split[name], whole[name], rtol=0, atol=1e-4)
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


def test_sigkill_then_resume_is_bitwise(files, tmp_path):
    # 24 examples, 2 x 2 per step: 6 steps an epoch, 12 steps; checkpoints every 3 steps.
    flags = ("--batch-size", 2, "--grad-accum", 2, "--epochs", 2, "--warmup-steps", 2,
             "--save-every", 3, "--weight-decay", 0.1)
    reference = tmp_path / "reference"
    assert sft.main(_args(files, reference, *flags)) == 0

    out = tmp_path / "killed"
    marker = tmp_path / "hanging"
    # Hang in the second micro-batch of step 5: step 4 is done but not checkpointed, and
    # step 5 has a backward accumulated.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(marker), str(4 * 2 + 2),
         *_args(files, out, *flags)],
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

    assert sft.main(_args(files, out, *flags, "--resume", "latest")) == 0
    _assert_bitwise(_tensors(out / "model" / "model.safetensors"),
                    _tensors(reference / "model" / "model.safetensors"))
    assert _steps(out) == _steps(reference)                        # steps 1..12 once each
    ckpt, ref_ckpt = load_checkpoint(out), load_checkpoint(reference)
    assert ckpt.step == ref_ckpt.step == 12 and ckpt.data == ref_ckpt.data


def test_resume_at_an_epoch_boundary_skips_nothing(files, tmp_path, monkeypatch):
    """LoRA with dropout (so the RNG state matters), 3 steps an epoch, stopped right after
    the checkpoint that closes epoch 1."""
    def cfg(name, **changes):
        return _cfg(files, tmp_path / name, batch_size=4, grad_accum=2, epochs=3,
                    save_every=3, lora_r=4, lora_alpha=8, lora_dropout=0.1, **changes)

    reference = sft.train(cfg("reference"))

    _fail_at_call(monkeypatch, call=3 * 2 + 1)                     # first call of step 4
    with pytest.raises(_Interrupt):
        sft.train(cfg("stopped"))
    monkeypatch.undo()
    ckpt = load_checkpoint(tmp_path / "stopped")
    assert ckpt.step == 3 and ckpt.data["epoch"] == 1 and ckpt.data["position"] == 0

    resumed = sft.train(cfg("stopped", resume="latest"))
    _assert_bitwise(_tensors(resumed / "adapter" / "adapter_model.safetensors"),
                    _tensors(reference / "adapter" / "adapter_model.safetensors"))
    assert _steps(resumed) == _steps(reference)
    epochs = [r["epoch"] for r in read_metrics(resumed) if "loss" in r]
    assert epochs == pytest.approx([1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2, 7 / 3, 8 / 3, 3],
                                   abs=1e-4)


def test_errors_leave_an_existing_run_alone(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert sft.main(_args(files, out, "--max-steps", 2)) == 0
    before = snapshot(out)
    capsys.readouterr()

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "count", "response": "one"},
                                               "{not json"])
    args = _args(files, out, "--max-steps", 2)
    args[args.index("--data") + 1] = str(bad)
    assert sft.main(args) == 1
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err

    args = _args(files, out, "--max-steps", 2)
    args[args.index("--model") + 1] = str(tmp_path / "no-such-model")
    assert sft.main(args) == 1
    err = capsys.readouterr().err
    assert "--model" in err and "no-such-model" in err

    toml = tmp_path / "bad.toml"
    toml.write_text('lr = 0.001\nbatch_sise = 4\n')
    with pytest.raises(SystemExit) as exit_info:
        sft.main(_args(files, out, "--config", toml))
    assert exit_info.value.code == 2
    assert "unknown key 'batch_sise'" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        sft.main(_args(files, out, "--batch-size", 0))
    assert "--batch-size: expected an int >= 1, got 0" in capsys.readouterr().err

    assert sft.main(_args(files, out, "--max-steps", 2)) == 1      # same run again, no --resume
    assert "already holds" in capsys.readouterr().err

    assert sft.main(_args(files, out, "--max-steps", 2, "--batch-size", 8,
                          "--resume", "latest")) == 1
    assert "--batch-size x --grad-accum = 4" in capsys.readouterr().err
    assert snapshot(out) == before


def test_lora_run_saves_a_peft_adapter(files, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from kernelrl.models.lora import load_adapter
    from kernelrl.train.common import setup_model

    model_dir, _ = files
    run = sft.train(_cfg(files, tmp_path / "run", max_steps=3, batch_size=8, lora_r=4,
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


def test_nan_loss_stops_with_the_step_named(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _fail_at_call(monkeypatch, call=3, value=float("nan"))           # step 3's loss
    assert sft.main(_args(files, out, "--batch-size", 8, "--max-steps", 6,
                          "--save-every", 2)) == 1
    assert "at step 3" in capsys.readouterr().err
    assert find_latest(out).name == "step-2"
    assert not (out / "checkpoints" / "step-3").exists() and not (out / "model").exists()
    assert max(r["step"] for r in read_metrics(out)) == 2
    with pytest.raises(NonFiniteLossError, match="step 3"):
        sft.train(_cfg(files, out, batch_size=8, max_steps=6, save_every=2, resume="latest"))


def test_evaluate_is_the_mean_token_nll_however_batched(files):
    """One number over the whole set: Σ NLL / N, equal to transformers' own loss summed
    example by example, with any batch size and with packing."""
    from kernelrl.models.hf import load_model, load_tokenizer
    from kernelrl.train.data import load_sft

    model_dir, data = files
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


def test_packing_checkpointing_and_bf16_autocast_run(files, tmp_path):
    run = sft.train(_cfg(files, tmp_path / "run", max_steps=3, batch_size=2, packing=True,
                         max_length=48, gradient_checkpointing=True, autocast="bfloat16",
                         eval_fraction=0.2, save_every=0))
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss"] is not None and r["loss"] > 0 for r in records)
    assert records[-1]["eval_loss"] is not None
    # a packed step holds several examples per row: more tokens than 2 examples would have
    assert records[0]["tokens_seen"] > 2 * 20
