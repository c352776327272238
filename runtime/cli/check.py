"""`pmnc-runtime check CONFIG`: everything `start` would refuse, found without starting anything.

Beyond `load_config` it does what loading must not (bind the ports for an instant) and what
only a start would otherwise reveal (a data directory the node cannot write, a module that does
not compile), so that a deployment can be vetted before it goes live. It creates no safe and no
directory, and never imports or runs a module: compiling shows syntax errors, nothing more.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from pmnc.runtime.config import ConfigError, NodeConfig, check_ports, load_config, locate


def add_parser(subparsers: Any) -> None:
    """Register `check CONFIG` (the CLI keeps one module per subcommand)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "check",
        help="validate a node config without starting anything",
        description="Validate CONFIG, its ports, data directory and modules; start nothing. "
        "Exit 0 if all is well, 2 listing every problem otherwise.",
    )
    parser.add_argument("config", metavar="CONFIG", help="the node's YAML file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print every problem to stderr and return 2, or a one-line summary and return 0."""
    label = str(args.config)
    try:
        cfg = load_config(label)
    except ConfigError as e:
        return _fail(e.errors)
    errors = check_ports(cfg) + _check_data_dir(cfg)
    modules = 0
    for i, cage in enumerate(cfg.cages):
        names = cfg.module_names(cage)
        modules += len(names)
        errors += _check_safes(cfg, cage.name, names)
        errors += _check_modules(i, cage.modules, names)
    if errors:
        return _fail(errors)
    cages = len(cfg.cages)
    group = ""
    if cfg.replication is not None:  # its ports were checked with the cages' (check_ports)
        peers = len(cfg.replication.peers)
        group = f", replicated at {cfg.replication.address} with {_count(peers, 'peer')}"
    print(
        f"{label}: node {cfg.node}: {_count(cages, 'cage')}, {_count(modules, 'module')}{group}, ok"
    )
    return 0


def _fail(errors: list[str]) -> int:
    for error in errors:
        print(error, file=sys.stderr)
    return 2


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _data_dir_error(cfg: NodeConfig, why: str) -> str:
    return (
        f"{locate(cfg, 'data_dir')}: data_dir: expected a directory where safes can be "
        f"created, got {str(cfg.data_dir)!r} ({why})"
    )


def _check_data_dir(cfg: NodeConfig) -> list[str]:
    """Whether <data_dir>/safe exists writable, or could be created, without creating it.

    The nearest existing ancestor decides: `start` would `mkdir -p` from there. os.access also
    reports a read-only file system (EROFS), which a mode check would miss.
    """
    target = cfg.data_dir / "safe"
    existing = target
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [_data_dir_error(cfg, f"{existing} is not a directory")]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [_data_dir_error(cfg, f"{existing} is not writable")]
    return []


def _check_safes(cfg: NodeConfig, cage: str, modules: list[str]) -> list[str]:
    """A module's safe that already exists must be a directory the node can write."""
    errors = []
    for module in modules:
        path = cfg.safe_dir(cage, module)
        if not os.path.lexists(path):
            continue
        if not path.is_dir():
            errors.append(_data_dir_error(cfg, f"safe {path} is not a directory"))
        elif not os.access(path, os.W_OK | os.X_OK):
            errors.append(_data_dir_error(cfg, f"safe {path} is not writable"))
    return errors


def _check_modules(index: int, directory: Path, names: list[str]) -> list[str]:
    """Each module must read and compile; its errors point at the module's own file and line."""
    errors = []
    key = f"cages[{index}].modules"
    for name in names:
        path = directory / f"{name}.py"
        try:
            source = path.read_bytes()
            compile(source, str(path), "exec", dont_inherit=True)
        except SyntaxError as e:
            where = f"{path}:{e.lineno}" if e.lineno else str(path)
            errors.append(f"{where}: {key}: expected a module that compiles, got {e.msg}")
        except (OSError, ValueError) as e:  # unreadable, or null bytes in the source
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            errors.append(f"{path}: {key}: expected a readable Python module, got {reason}")
    return errors
