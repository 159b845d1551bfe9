"""Training progress that reads well wherever it goes: a tqdm bar on a terminal, plain lines in a log.

A tqdm bar redraws one line with carriage returns; written to a file, a pipe or a CI log it is either a wall of
``\\r`` updates or, with the bar turned off, nothing for the whole run. ``training_progress`` gives the bar when the
stream is a terminal and otherwise ``ProgressLines``: a line every tenth of the run or every 30 seconds, whichever
comes first, with the step, the elapsed time, an estimate of the time left and the latest loss.

Example (a clock that ticks 10 s a call):
    >>> import io
    >>> log = io.StringIO()  # not a terminal
    >>> progress = training_progress(4, stream=log, every_steps=2, clock=iter(range(0, 100, 10)).__next__)
    >>> for step in range(4):
    ...     progress.set_postfix(loss=f"{1.0 / (step + 1):.4f}")
    ...     progress.update(1)
    >>> progress.close()
    >>> print(log.getvalue(), end="")
    training: step 2/4 (50%), 20 s elapsed, 20 s left, loss=0.5000
    training: step 4/4 (100%), 40 s elapsed, loss=0.2500
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

EVERY_SECONDS = 30.0
LINES_PER_RUN = 10


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``.

    Example:
        >>> _duration(42.4), _duration(185), _duration(3725)
        ('42 s', '3 min 05 s', '1 h 02 min')
    """
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class ProgressLines:
    """A stand-in for a tqdm bar (``update``, ``set_postfix``, ``close``) that writes whole lines: one when
    ``every_steps`` steps (default: a tenth of the run) or ``every_seconds`` seconds have passed since the last one,
    whichever comes first, and one at the end. ``clock`` is for tests.
    """

    def __init__(self, total: int, *, initial: int = 0, desc: str = "training", stream: IO[str] | None = None,
                 every_seconds: float = EVERY_SECONDS, every_steps: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.n, self.desc = total, initial, desc
        self.stream = stream if stream is not None else sys.stderr
        self.every_seconds = every_seconds
        self.every_steps = every_steps or max(1, total // LINES_PER_RUN)
        self.clock = clock
        self.postfix: dict[str, Any] = {}
        self._initial = initial
        self._started = self._last_time = clock()
        self._last_step = initial
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if self.n - self._last_step >= self.every_steps or now - self._last_time >= self.every_seconds:
            self._write(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **values: Any) -> None:
        """The values shown after the step (as tqdm's ``set_postfix``); they appear on the next line written."""
        self.postfix = {**(ordered_dict or {}), **values}

    def close(self) -> None:
        if not self._closed and self.n != self._last_step:
            self._write(self.clock())
        self._closed = True

    def line(self, now: float) -> str:
        """The line for the current step at time ``now``."""
        elapsed = now - self._started
        parts = [f"step {self.n}/{self.total} ({self.n / max(self.total, 1):.0%})", f"{_duration(elapsed)} elapsed"]
        done = self.n - self._initial
        if 0 < done and self.n < self.total:
            parts.append(f"{_duration(elapsed / done * (self.total - self.n))} left")
        parts += [f"{name}={value}" for name, value in self.postfix.items()]
        return f"{self.desc}: " + ", ".join(parts)

    def _write(self, now: float) -> None:
        self.stream.write(self.line(now) + "\n")
        self.stream.flush()
        self._last_step, self._last_time = self.n, now


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def training_progress(total: int, *, initial: int = 0, disable: bool = False, desc: str = "training",
                      stream: IO[str] | None = None, **line_options: Any) -> Any:
    """A progress display for ``total`` steps, ``initial`` of them done: a tqdm bar when ``stream`` (default:
    stderr) is a terminal, ``ProgressLines`` when it is not, and nothing when ``disable``. All three have tqdm's
    ``update(n)``, ``set_postfix(**values)`` and ``close()``. ``line_options`` go to ``ProgressLines``
    (``every_seconds``, ``every_steps``).
    """
    from tqdm import tqdm

    stream = stream if stream is not None else sys.stderr
    if disable or _is_terminal(stream):
        return tqdm(total=total, initial=initial, disable=disable, desc=desc, unit="step", file=stream)
    return ProgressLines(total, initial=initial, desc=desc, stream=stream, **line_options)
