"""Logging for the supervisor and its workers: one line per event on stderr.

Each line reads `TIME LEVEL NODE[/CAGE] PID MESSAGE`, so the output of every process of a node
can be interleaved on one stream (they share the supervisor's stderr) and still be told apart
and grepped. A traceback is folded into the same line: a reader of `grep ERROR` gets it whole.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["configure", "logger"]

logger = logging.getLogger("pmnc")


class _OneLineFormatter(logging.Formatter):
    """Folds multi-line messages and tracebacks into one line."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " | ")


def configure(where: str, *, level: int = logging.INFO) -> None:
    """Send `pmnc` log records to stderr tagged with `where` (node, or node/cage).

    Called by the supervisor at start and again by every worker after fork, to retag its lines.
    """
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    # `where` is made of [A-Za-z0-9_-/] (validated names), so it is safe inside a format string.
    handler.setFormatter(
        _OneLineFormatter(
            f"%(asctime)s.%(msecs)03d %(levelname)s {where} %(process)d %(message)s",
            "%Y-%m-%dT%H:%M:%S",
        )
    )
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
