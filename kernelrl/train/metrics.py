"""What a training run reports while it runs, and the record it leaves behind.

``RunLogger`` owns one run folder's reporting:

- a tqdm progress bar on stderr (steps, ETA, and loss and tokens/s as its postfix) when
  stderr is a terminal; otherwise (a log file, a batch job) a plain line every
  ``print_every`` steps, since a bar redrawn with carriage returns is noise in a file;
- ``metrics.jsonl``: one JSON object per ``log`` call, flushed line by line so a crash
  loses nothing already logged. A resumed run first drops the lines with a step after
  the checkpoint it resumed from (they will be logged again), so the file always
  describes one history. Non-finite values are written as null (JSON has no NaN);
- TensorBoard scalars under ``<run>/tensorboard`` when ``torch.utils.tensorboard`` can be
  imported (it needs the tensorboard package); otherwise skipped with a one-time note.

``plot_curves(run_dir)`` draws ``curves.png`` from ``metrics.jsonl`` at the end of a run
(matplotlib's Agg canvas, no display and no global backend change). ``check_finite``
stops a diverged run with the step named, before anything is saved for it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"
_PLOTTED = ("loss", "reward", "accuracy", "score")
_MAX_PANELS = 9
_tensorboard_noted = False


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step."""


def check_finite(step: int, loss: Any) -> None:
    """Raise ``NonFiniteLossError`` naming ``step`` if ``loss`` (a number or a tensor,
    which is then read back to the host) is or holds NaN or an infinity. Trainers call it
    before saving anything for the step, so no checkpoint ever holds a diverged state."""
    if isinstance(loss, torch.Tensor):
        values = loss.detach().flatten()
        finite = torch.isfinite(values)
        if bool(finite.all()):
            return
        value = values[~finite][0].item()
    else:
        value = float(loss)
        if math.isfinite(value):
            return
    raise NonFiniteLossError(
        f"loss is {value} at step {step}: training diverged, and nothing was saved for "
        f"this step. Resume from the last checkpoint with a lower learning rate or "
        f"stronger gradient clipping, or inspect the batch of step {step}.")


def _number(value: Any) -> float | int | None:
    """A plain Python number from a number, a 0-d/1-element tensor or a numpy scalar."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    if hasattr(value, "item") and (not hasattr(value, "numel") or value.numel() == 1):
        item = value.item()
        if isinstance(item, (int, float)):
            return item
    return None


def _json_value(value: Any) -> Any:
    number = _number(value)
    if number is None:
        if isinstance(value, (str, type(None))):
            return value
        raise TypeError(f"metric value {value!r} ({type(value).__name__}) is neither a "
                        f"number, a one-element tensor nor a string")
    if isinstance(number, float) and not math.isfinite(number):
        return None
    return number


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _format_number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class TokenMeter:
    """Tokens per second over the last ``window`` updates (since the start until then)."""

    def __init__(self, window: int = 20, clock: Callable[[], float] = time.perf_counter):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.clock = clock
        self.start = clock()
        self.total = 0
        self._events: deque[tuple[float, int]] = deque(maxlen=window + 1)

    def update(self, tokens: int) -> None:
        self.total += int(tokens)
        self._events.append((self.clock(), int(tokens)))

    @property
    def rate(self) -> float | None:
        """Tokens/s, or None before the first update (or with no time elapsed)."""
        if not self._events:
            return None
        if len(self._events) == 1:
            elapsed, tokens = self._events[0][0] - self.start, self._events[0][1]
        else:
            elapsed = self._events[-1][0] - self._events[0][0]
            tokens = sum(n for _, n in list(self._events)[1:])
        return tokens / elapsed if elapsed > 0 else None


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of ``path`` with step <= ``last_step`` (and drop a line cut short by
    a crash), rewriting the file atomically."""
    kept = [line for line, record in _jsonl_records(path) if record.get("step", 0) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _open_tensorboard(log_dir: Path, purge_step: int | None):
    global _tensorboard_noted
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:          # ImportError, or a tensorboard install that fails to load
        if not _tensorboard_noted:
            _tensorboard_noted = True
            print("kernelrl: TensorBoard logging skipped (torch.utils.tensorboard needs "
                  "`pip install tensorboard`); metrics.jsonl has every value",
                  file=sys.stderr)
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class RunLogger:
    """Progress, ``metrics.jsonl`` and TensorBoard for one run folder.

    run_dir: the run folder (created). total_steps: the step count the run ends at.
    resume_step: the step of the checkpoint resumed from (None: a fresh run, which starts
    a new metrics.jsonl). progress: True forces the bar, False never shows it, "auto"
    shows it when ``stream`` is a terminal. print_every: plain-line period in steps when
    there is no bar (default: about 50 lines per run). stream: where progress goes
    (default: stderr). tensorboard: False skips TensorBoard.
    """

    def __init__(self, run_dir: str | os.PathLike, total_steps: int, *,
                 resume_step: int | None = None, progress: bool | str = "auto",
                 print_every: int | None = None, stream: TextIO | None = None,
                 tensorboard: bool = True, desc: str | None = None):
        if progress not in (True, False, "auto"):
            raise ValueError(f"progress must be True, False or 'auto', got {progress!r}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = int(total_steps)
        self.start_step = int(resume_step or 0)
        self.stream = stream if stream is not None else sys.stderr
        self.print_every = max(1, print_every or self.total_steps // 50 or 1)
        self.tokens = TokenMeter()
        self._started = time.perf_counter()
        self.last_step = self.start_step

        self.metrics_path = self.run_dir / METRICS_FILE
        if resume_step is not None and self.metrics_path.exists():
            _truncate_jsonl(self.metrics_path, resume_step)
            self._file = open(self.metrics_path, "a", encoding="utf-8")
        else:
            self._file = open(self.metrics_path, "w", encoding="utf-8")

        self._writer = None
        if tensorboard:
            purge = resume_step + 1 if resume_step is not None else None
            self._writer = _open_tensorboard(self.run_dir / TENSORBOARD_DIR, purge)

        isatty = getattr(self.stream, "isatty", lambda: False)
        show_bar = progress is True or (progress == "auto" and isatty())
        self._bar = None
        if show_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_steps, initial=self.start_step,
                             file=self.stream, desc=desc, unit="step", dynamic_ncols=True)
        self.desc = desc

    # ------------------------------------------------------------------------------------

    def log(self, step: int, *, tokens: int | None = None, **metrics: Any) -> dict:
        """Record the metrics of ``step`` (numbers, one-element tensors or strings).
        ``tokens``: tokens processed since the previous call, for the tokens/s meter.
        Returns the record written to metrics.jsonl."""
        if tokens is not None:
            self.tokens.update(tokens)
        record: dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            try:
                record[key] = _json_value(value)
            except TypeError as exc:
                raise TypeError(f"RunLogger.log(step={step}): {key}: {exc}") from None
        rate = self.tokens.rate
        if tokens is not None and rate is not None:
            record["tokens_per_s"] = round(rate, 2)
        record["time"] = round(time.time(), 3)

        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

        if self._writer is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, global_step=int(step))

        advanced = int(step) - self.last_step
        self.last_step = int(step)
        if self._bar is not None:
            postfix = []
            if record.get("loss") is not None:
                postfix.append(f"loss={_format_number(record['loss'])}")
            if "tokens_per_s" in record:
                postfix.append(f"tok/s={record['tokens_per_s']:.0f}")
            self._bar.set_postfix_str(", ".join(postfix), refresh=False)
            self._bar.update(max(advanced, 0))
        elif step % self.print_every == 0 or step >= self.total_steps:
            self._print_line(record)
        return record

    def eta(self) -> float | None:
        """Seconds left at the pace since this logger started, or None before a step."""
        done = self.last_step - self.start_step
        if done <= 0:
            return None
        elapsed = time.perf_counter() - self._started
        return elapsed / done * max(self.total_steps - self.last_step, 0)

    def _print_line(self, record: dict) -> None:
        parts = [f"step {record['step']}/{self.total_steps}"]
        for key, value in record.items():
            if key in ("step", "time", "tokens_per_s"):
                continue
            parts.append(f"{key} {_format_number(value)}")
        if "tokens_per_s" in record:
            parts.append(f"tokens/s {record['tokens_per_s']:.0f}")
        eta = self.eta()
        if eta is not None:
            parts.append(f"eta {_format_duration(eta)}")
        prefix = f"{self.desc}: " if self.desc else ""
        print(prefix + " | ".join(parts), file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """Print a message without breaking the progress bar."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self, *, plot: bool = True) -> Path | None:
        """Close the bar, the files and TensorBoard; with ``plot``, write curves.png
        and return its path."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return plot_curves(self.run_dir) if plot else None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(plot=exc_type is None)


# ----------------------------------------------------------------------------------------


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``<run_dir>/metrics.jsonl`` (a line cut short by a crash skipped)."""
    path = Path(run_dir) / METRICS_FILE
    return [record for _, record in _jsonl_records(path)] if path.exists() else []


def _jsonl_records(path: Path) -> list[tuple[str, dict]]:
    """(line ending in a newline, its JSON object) for every whole object line of ``path``;
    a line cut short by a crash does not parse and is skipped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append((line if line.endswith("\n") else line + "\n", record))
    return out


def plot_curves(run_dir: str | os.PathLike) -> Path | None:
    """Draw ``<run_dir>/curves.png``: one panel per metric whose name contains loss,
    reward, accuracy or score, against the step. Returns the path, or None when
    metrics.jsonl has nothing to draw."""
    records = read_metrics(run_dir)
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        step = record.get("step")
        for key, value in record.items():
            if key == "step" or not any(word in key.lower() for word in _PLOTTED):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(step)
                ys.append(value)
    if not series:
        return None
    names = sorted(series, key=lambda k: (0 if "loss" in k.lower() else 1, k))[:_MAX_PANELS]

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(len(names), 3)
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    for index, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, index + 1)
        xs, ys = series[name]
        ax.plot(xs, ys, linewidth=1.2, marker="." if len(xs) < 30 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    path = Path(run_dir) / CURVES_FILE
    fig.savefig(path, dpi=100)
    return path
