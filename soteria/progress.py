"""Progress that shows in a terminal and in logs alike.

:func:`progress_bar` returns a tqdm bar when stderr is a terminal. When it is not (piped, CI,
``nohup``), tqdm hides its bar, so a :class:`LogProgress` prints a plain line to stderr instead
every ``every`` percent (default 5) and at least every 30 s, plus a last line at the end::

    find_heads 3 languages (atp): 45/150 trial (30%), 61 s elapsed, about 142 s left

Both take ``update(n)``, ``set_postfix_str(s)``, ``close()``, and work as context managers
and as iterables over ``iterable``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["LogProgress", "progress_bar"]


class LogProgress:
    """A progress reporter for non-terminals: one line per ``every`` percent (and per ``interval`` s)."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, every: float = 5.0,
                 interval: float = 30.0, iterable: Iterable | None = None, file=None):  # fmt: skip
        self.total, self.desc, self.unit = total, desc, unit
        self.every, self.interval = every, interval
        self.iterable = iterable
        self.file = file or sys.stderr
        self.n = 0
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self._next_pct = every
        self._closed = False
        if total:  # a first line at once, so a log shows the step has started
            print(f"{desc}: 0/{total} {unit}, starting", file=self.file, flush=True)

    def _line(self) -> str:
        elapsed = time.monotonic() - self._start
        if self.total:
            pct = 100.0 * self.n / self.total
            left = f", about {elapsed / self.n * (self.total - self.n):.0f} s left" if 0 < self.n < self.total else ""
            head = f"{_count(self.n)}/{self.total} {self.unit} ({pct:.0f}%), {elapsed:.0f} s elapsed{left}"
        else:
            head = f"{_count(self.n)} {self.unit}, {elapsed:.0f} s elapsed"
        return f"{self.desc}: {head}" + (f" [{self.postfix}]" if self.postfix else "")

    def _emit(self) -> None:
        print(self._line(), file=self.file, flush=True)
        self._last = time.monotonic()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        pct = 100.0 * self.n / self.total if self.total else 0.0
        if (self.total and pct >= self._next_pct) or now - self._last >= self.interval:
            while self.total and self._next_pct <= pct:
                self._next_pct += self.every
            self._emit()

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n and (not self.total or self._next_pct <= 100.0 or self.postfix):
                self._emit()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()


def _count(n: float) -> int | float:
    """A count as shown: whole when it is (up to float rounding), else to one decimal (the
    attribution's progress comes in fractions of a trial)."""
    return round(n) if abs(n - round(n)) < 1e-6 else round(n, 1)


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    leave: bool = True,
    **tqdm_kwargs,
):
    """A tqdm bar on a terminal, a :class:`LogProgress` elsewhere, a silent tqdm when not ``enabled``."""
    from tqdm.auto import tqdm

    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if enabled and not _is_terminal(sys.stderr):
        return LogProgress(total, desc, unit, iterable=iterable)

    class Bar(tqdm):  # "2.3/8", "8/8" rather than "2.3333333333/8", "8.0/8"
        @property
        def format_dict(self):
            return {**super().format_dict, "n": _count(self.n)}

    return Bar(iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=leave, **tqdm_kwargs)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
