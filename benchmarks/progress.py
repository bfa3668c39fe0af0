"""Progress on stderr, so stdout stays the table: a one-line bar redrawn in place when
stderr is a terminal, plain lines when it is not (a log file, a pipe, CI).

The bar reads ``[=====     ] case 3/12 <case> | <impl> <phase> | 01:23``. Log lines
(:func:`log`) print above it. tqdm is not a dependency, and a bar needs little.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Optional

_active: Optional["Bar"] = None


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m:02d}:{s:02d}"


class Bar:
    """Progress over ``total`` cases. ``case(i, label)`` starts case i (1-based),
    ``step(impl, phase)`` says what runs now; ``done()`` ends the bar."""

    def __init__(self, total: int, stream=None, tty: Optional[bool] = None, width: int = 20):
        self.total = max(1, int(total))
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(self.stream.isatty()) if tty is None else tty
        self.width = width
        self.start = time.monotonic()
        self.index = 0
        self.label = ""
        self.impl = ""
        self.phase = ""
        self._drawn = False
        self._last_plain = None

    def __enter__(self):
        global _active
        self._previous, _active = _active, self
        return self

    def __exit__(self, *exc):
        global _active
        self.done()
        _active = self._previous

    def line(self) -> str:
        done = max(0, self.index - 1)
        filled = round(self.width * done / self.total)
        bar = "=" * filled + " " * (self.width - filled)
        what = f" | {self.impl} {self.phase}".rstrip() if self.impl else ""
        return (f"[{bar}] case {self.index}/{self.total} {self.label}{what} | "
                f"{_clock(time.monotonic() - self.start)}")

    def case(self, index: int, label: str) -> None:
        self.index, self.label, self.impl, self.phase = index, label, "", ""
        self._show()

    def step(self, impl: str, phase: str = "") -> None:
        self.impl, self.phase = impl, phase
        self._show()

    def log(self, msg: str) -> None:
        self._clear()
        print(f"[bench {_clock(time.monotonic() - self.start)}] {msg}", file=self.stream,
              flush=True)
        if self.tty and self.index:
            self._draw()

    def done(self) -> None:
        if self.tty and self._drawn:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def _show(self) -> None:
        if self.tty:
            self._draw()
            return
        # Plain lines: one when the case or the kind of work changes (check, warm-up,
        # rounds, memory), not one per implementation and round: a log stays readable.
        key = (self.index, self.phase.split(" ")[0] if self.phase else self.impl)
        if key != self._last_plain:
            self._last_plain = key
            print(self.line(), file=self.stream, flush=True)

    def _draw(self) -> None:
        cols = shutil.get_terminal_size((120, 24)).columns
        text = self.line()
        if len(text) >= cols:
            text = text[:max(10, cols - 4)] + "..."
        self.stream.write("\r" + text + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def log(msg: str) -> None:
    """A progress line on stderr, above the bar when one is active."""
    if _active is not None:
        _active.log(msg)
    else:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def step(impl: str, phase: str = "") -> None:
    """Tell the active bar (if any) what runs now."""
    if _active is not None:
        _active.step(impl, phase)
