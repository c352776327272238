"""A one-line progress bar on stderr for long safe operations.

Shown only when stderr is a terminal (or when asked), so logs and pipes never fill with
carriage returns; redrawn at most ten times a second so a fast loop does not pay for drawing.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

__all__ = ["Progress"]

_PERIOD_S = 0.1
_WIDTH = 30


class Progress:
    """`with Progress("dump", total) as bar: bar.advance()`; `total` may be a guess (or 0)."""

    def __init__(
        self, label: str, total: int, *, enabled: bool | None = None, stream: TextIO | None = None
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = label
        self.total = total
        self.done = 0
        self._started = time.monotonic()
        self._drawn = 0.0

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.enabled and time.monotonic() - self._drawn >= _PERIOD_S:
            self._draw()

    def _draw(self) -> None:
        self._drawn = time.monotonic()
        rate = self.done / max(self._drawn - self._started, 1e-9)
        if self.total > 0:
            # The total is read before a live safe changes: never draw more than full.
            share = min(self.done / self.total, 1.0)
            filled = int(share * _WIDTH)
            bar = f"[{'#' * filled}{'.' * (_WIDTH - filled)}] {share:4.0%}"
        else:
            bar = ""
        self.stream.write(f"\r{self.label} {bar} {self.done}/{self.total} ({rate:,.0f}/s) ")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.enabled:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
