"""Progress display: a tqdm bar on a terminal, plain periodic lines everywhere else (logs, CI).

tqdm writes carriage-return redraws, which are unreadable in a log file, and its
``disable=None`` hides the bar entirely when stderr is not a terminal, so a long job would
print nothing for an hour. :func:`bar` keeps tqdm for terminals and otherwise returns a
:class:`PlainProgress` that prints ``desc: n/total (pct) elapsed, ETA, postfix`` every
``every`` seconds and at the end.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class PlainProgress:
    """The subset of tqdm's interface the l2o loops use, printing one line per ``every`` seconds."""

    def __init__(self, total: int, desc: str = "", initial: int = 0, every: float = 30.0,
                 file: TextIO | None = None) -> None:
        self.total, self.desc, self.n, self.start_n, self.every = total, desc, initial, initial, every
        self.file = file or sys.stderr
        self.t0 = self.last = time.monotonic()
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every or self.n == self.total:
            self.last = now
            self.file.write(self.line() + "\n")
            self.file.flush()

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        done = self.n - self.start_n
        eta = _clock(elapsed / done * max(self.total - self.n, 0)) if done > 0 else "?"
        pct = f"{100 * self.n / self.total:.0f}%" if self.total else "-"
        tail = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {self.n}/{self.total} ({pct}) elapsed {_clock(elapsed)}, ETA {eta}{tail}"

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kw: Any) -> None:
        items = {**(ordered_dict or {}), **kw}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def write(self, msg: str) -> None:
        self.file.write(msg + "\n")
        self.file.flush()

    def close(self) -> None:
        pass


def bar(total: int, desc: str, enabled: bool = True, initial: int = 0, leave: bool = True, unit: str = "it",
        every: float = 30.0):
    """A progress display: tqdm on a terminal, :class:`PlainProgress` otherwise, a silent one if not ``enabled``."""
    from tqdm import tqdm

    if enabled and not sys.stderr.isatty():
        return PlainProgress(total, desc, initial, every)
    return tqdm(total=total, initial=initial, desc=desc, leave=leave, unit=unit, disable=not enabled,
                dynamic_ncols=True)
