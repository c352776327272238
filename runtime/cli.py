"""The `pmnc-runtime` command: argparse and exit codes, nothing else.

Each subcommand lives in its own module exposing `add_parser(subparsers)` (which registers the
parser and sets `func`) so that this file stays a table. Exit codes: 0 success, 1 a failed
check or a missing key, 2 bad usage or an invalid config, 3 an operational failure.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Subcommand modules, in the order `--help` lists them. A module that is not there yet is skipped
# so that the CLI works while the runtime grows.
_COMMANDS = ("start", "check", "status", "safe_commands", "torture")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pmnc-runtime",
        description="Run a pmnc node, and operate its module safes.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"pmnc.runtime.cmd_{name}")
        except ModuleNotFoundError as e:
            if e.name != f"pmnc.runtime.cmd_{name}":
                raise
            continue
        module.add_parser(sub)
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


if __name__ == "__main__":
    sys.exit(main())
