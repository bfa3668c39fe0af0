"""kernelrl.train.metrics: metrics.jsonl, resume truncation, curves.png, check_finite,
plain progress lines without a terminal, the tokens/s meter."""

import io
import json
import math

import pytest
import torch

from kernelrl.train import metrics as metrics_mod
from kernelrl.train.metrics import (
    NonFiniteLossError, RunLogger, TokenMeter, check_finite, plot_curves, read_metrics)


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def _lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_jsonl_content(tmp_path):
    out = io.StringIO()
    logger = RunLogger(tmp_path, total_steps=3, stream=out, tensorboard=False)
    logger.log(1, loss=torch.tensor(2.5), lr=1e-3, tokens=100)
    # each line is on disk as soon as it is logged
    assert _lines(tmp_path)[0]["loss"] == 2.5
    logger.log(2, loss=2.0, accuracy=torch.tensor([0.75]), note="warmup", tokens=100)
    logger.log(3, loss=1.5, reward=float("nan"), margin=float("inf"))
    assert logger.close(plot=False) is None

    lines = _lines(tmp_path)
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert lines[0]["lr"] == 1e-3 and "time" in lines[0]
    assert lines[1]["accuracy"] == 0.75 and lines[1]["note"] == "warmup"
    assert lines[1]["tokens_per_s"] > 0
    assert lines[2]["reward"] is None and lines[2]["margin"] is None   # JSON has no NaN
    assert "tokens_per_s" not in lines[2]
    with pytest.raises(TypeError, match=r"log\(step=4\): bad: metric value \[1, 2\]"):
        RunLogger(tmp_path / "b", 4, stream=out, tensorboard=False).log(4, bad=[1, 2])


def test_resume_drops_later_steps(tmp_path):
    logger = RunLogger(tmp_path, 10, stream=io.StringIO(), tensorboard=False)
    for step in range(1, 7):
        logger.log(step, loss=1.0 / step)
    logger.close(plot=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 0.1')                  # a line cut short by a crash

    logger = RunLogger(tmp_path, 10, resume_step=4, stream=io.StringIO(), tensorboard=False)
    assert [r["step"] for r in _lines(tmp_path)] == [1, 2, 3, 4]
    logger.log(5, loss=0.3)
    logger.close(plot=False)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    assert read_metrics(tmp_path)[-1]["loss"] == 0.3

    RunLogger(tmp_path, 10, stream=io.StringIO(), tensorboard=False).close(plot=False)
    assert read_metrics(tmp_path) == []                       # a fresh run starts afresh


def test_curves_png(tmp_path):
    with RunLogger(tmp_path, 20, stream=io.StringIO(), tensorboard=False) as logger:
        for step in range(1, 21):
            logger.log(step, loss=1.0 / step, lr=1e-4,
                       **({"eval_accuracy": step / 20} if step % 5 == 0 else {}))
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves(tmp_path / "empty") is None


def test_check_finite():
    check_finite(3, 1.25)
    check_finite(3, torch.tensor(0.5))
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 17: training diverged"):
        check_finite(17, torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError, match="loss is inf at step 2"):
        check_finite(2, math.inf)
    with pytest.raises(NonFiniteLossError, match="loss is -inf at step 5"):
        check_finite(5, torch.tensor([1.0, -math.inf]))
    assert issubclass(NonFiniteLossError, FloatingPointError)


def test_plain_lines_without_a_tty(tmp_path):
    out = io.StringIO()
    logger = RunLogger(tmp_path, 10, stream=out, print_every=5, tensorboard=False, desc="sft")
    for step in range(1, 11):
        logger.log(step, loss=2.0 - step / 10, tokens=64)
    logger.close(plot=False)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert lines[0].startswith("sft: step 5/10 | loss 1.5 | tokens/s ")
    assert lines[1].startswith("sft: step 10/10 | loss 1 | tokens/s ")
    assert " | eta 0:00:00" in lines[1]


def test_progress_bar_when_tty_or_forced(tmp_path):
    tty = FakeTTY()
    logger = RunLogger(tmp_path, 4, stream=tty, tensorboard=False)
    logger.log(1, loss=0.5, tokens=10)
    logger.log(2, loss=0.25, tokens=10)
    logger.close(plot=False)
    text = tty.getvalue()
    assert "2/4" in text and "loss=0.25" in text and "tok/s=" in text

    forced = io.StringIO()
    logger = RunLogger(tmp_path, 4, resume_step=2, stream=forced, progress=True,
                       tensorboard=False)
    logger.log(3, loss=0.1)
    logger.close(plot=False)
    assert "3/4" in forced.getvalue() and "step 3/4 |" not in forced.getvalue()


def test_tensorboard_missing_is_noted_once(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    monkeypatch.setattr(metrics_mod, "_tensorboard_noted", False)
    for name in ("a", "b"):
        logger = RunLogger(tmp_path / name, 2, stream=io.StringIO())
        logger.log(1, loss=1.0)
        logger.close(plot=False)
    assert capsys.readouterr().err.count("TensorBoard logging skipped") == 1
    assert not (tmp_path / "a" / "tensorboard").exists()


def test_token_meter():
    now = [0.0]
    meter = TokenMeter(window=2, clock=lambda: now[0])
    assert meter.rate is None
    now[0] = 2.0
    meter.update(100)
    assert meter.rate == 50.0                                 # since the start
    for tokens in (300, 500, 700):
        now[0] += 1.0
        meter.update(tokens)
    assert meter.rate == 600.0                     # 500 + 700 tokens over the last 2 s
    assert meter.total == 1600
