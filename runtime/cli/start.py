"""`pmnc-runtime start CONFIG`: run a node in the foreground until it is stopped."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import ConfigError, check_ports, load_config
from ..supervisor import Supervisor

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "start",
        help="run a node in the foreground",
        description="Run the node described by CONFIG in the foreground, logging to stderr. "
        "SIGTERM or SIGINT stop it gracefully, SIGHUP reloads the config and the modules.",
    )
    parser.add_argument("config", metavar="CONFIG", help="the node's YAML file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the config (exit 2 listing every error, nothing started), then supervise."""
    try:
        config = load_config(args.config)
    except ConfigError as e:
        errors = e.errors
    else:
        # A port already taken is a config error too: say which key, before any safe is made.
        errors = check_ports(config)
        if not errors:
            return Supervisor(config).run()
    for line in errors:
        print(line, file=sys.stderr)
    return 2
