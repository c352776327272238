"""The `pmnc-runtime` command: argparse and exit codes, nothing else.

The node's core (supervisor, worker, server, config) lives in `pmnc.runtime`; this package holds
the command-line tools built on it, one module per subcommand, each exposing
`add_parser(subparsers)` (which registers the parser and sets `func`), so this file stays a
table: `start`, `check`, `status`, `safe` (with the dump format, the restricted unpickler and the
progress bar it alone uses) and `torture`. Exit codes: 0 success, 1 a failed check or a missing
key, 2 bad usage or an invalid config, 3 an operational failure.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import check, safe, start, status, torture

__all__ = ["build_parser", "main"]

# In the order `--help` lists them.
_COMMANDS = (start, check, status, safe, torture)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pmnc-runtime",
        description="Run a pmnc node, and operate its module safes.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = args.func
    try:
        code: int = func(args)
    except KeyboardInterrupt:
        return 130
    return code
