"""Shared fixtures: `node_factory` starts real nodes and always tears them down."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import DISK_FULL_NOT_RUN, Node, free_port, write_config


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """make(modules_dir, **config options) -> a Node (not started) on a free port."""
    nodes: list[Node] = []

    def make(modules: Path, **options: Any) -> Node:
        port = free_port()
        index = len(nodes)
        config = write_config(tmp_path / f"node{index}.yaml", modules, port, **options)
        node = Node(config, port, tmp_path / f"node{index}.log")
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.kill_group()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say loudly, in the run's summary, that the disk-full tests were skipped: a run without
    root passes without them (every test that needs `helpers.small_tmpfs`)."""
    skipped = [
        r for r in terminalreporter.stats.get("skipped", []) if DISK_FULL_NOT_RUN in str(r.longrepr)
    ]
    if skipped:
        terminalreporter.write_line(
            f"WARNING: {len(skipped)} disk-full test(s) skipped: they need root to mount a "
            "tmpfs; disk full was NOT tested on this run",
            yellow=True,
            bold=True,
        )
