"""Progress that reads well wherever it goes: a bar on a terminal, log lines everywhere else.

`tqdm` here is a drop-in for `tqdm.auto.tqdm` as tapper's loops use it (total/desc/disable/leave,
update, set_postfix, iteration, close). It draws a bar only when stderr is a terminal and nothing
asked for log lines; otherwise it logs one INFO line through the `tapper.progress` logger when it
starts, then at most every `interval` seconds, and one when it finishes:

    stage 1 (task LoRA): 0/40 batches started
    stage 1 (task LoRA): 12/40 batches (30%), 0:41 elapsed, ~1:35 left, loss=2.3110
    stage 1 (task LoRA): 40/40 batches done in 2:17, loss=1.9020

Pipeline steps ask for log lines (`log_lines(True)`): a bar's carriage returns arrive in the
dashboard's step logs as one red ERROR row per redraw (they are written to stderr), and a step's
terminal is not the user's terminal anyway. `TAPPER_PROGRESS=log|bar` forces either;
`TAPPER_PROGRESS_INTERVAL` (seconds, default 15) spaces the lines.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Iterable

logger = logging.getLogger("tapper.progress")
_force_log: bool | None = None


def log_lines(on: bool | None = True) -> None:
    """Log lines instead of bars for every progress display in this process (None: decide per display)."""
    global _force_log
    _force_log = on


def _use_bar() -> bool:
    env = os.environ.get("TAPPER_PROGRESS", "").lower()
    if env in ("log", "bar"):
        return env == "bar"
    if _force_log is not None:
        return not _force_log
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LogProgress:
    """The part of tqdm's interface tapper uses, reported as log lines at intervals."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        total: int | None = None,
        desc: str | None = None,
        interval: float | None = None,
        unit: str = "batches",
        **_: Any,
    ) -> None:
        self.iterable = iterable
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total, self.desc, self.n, self.unit = total, desc or "progress", 0, unit
        self.interval = float(interval if interval is not None else os.environ.get("TAPPER_PROGRESS_INTERVAL", 15))
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.closed = False
        self._emit("started")

    def _emit(self, state: str = "") -> None:
        elapsed = time.monotonic() - self.start
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"]
        if state == "started":
            parts[0] += " started"
        elif state == "done":
            parts[0] += f" done in {_clock(elapsed)}"
        else:
            if self.total:
                parts[0] += f" ({100 * self.n / self.total:.0f}%)"
            parts.append(f"{_clock(elapsed)} elapsed")
            if self.total and self.n:
                parts.append(f"~{_clock(elapsed / self.n * (self.total - self.n))} left")
        if self.postfix and state != "started":
            parts.append(self.postfix)
        line = f"{self.desc}: {', '.join(parts)}"
        if logger.hasHandlers():
            logger.info(line)
        else:  # no logging set up (a plain `tapper experiment` in a log file): still one line
            print(line, file=sys.stderr, flush=True)
        self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval and not (self.total and self.n >= self.total):
            self._emit()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or self.desc

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._emit("done")

    def __iter__(self):
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def tqdm(iterable: Iterable | None = None, *args: Any, disable: bool = False, **kwargs: Any):
    """A tqdm bar on a terminal, `LogProgress` otherwise; a disabled display is tqdm's no-op."""
    from tqdm.auto import tqdm as bar

    if disable or _use_bar():
        return bar(iterable, *args, disable=disable, **kwargs)
    return LogProgress(iterable, **kwargs)
