"""Fixtures of the node-group tests (helpers in tests/integration/groups.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pmnc.runtime.harness import Client, NodeProcess, write_group_configs

from tests.helpers import EXAMPLES
from tests.integration.groups import start_group


@pytest.fixture
def group(tmp_path: Path) -> Iterator[list[NodeProcess]]:
    """A formed group of three nodes (2 workers x 4 threads, the example modules), killed at
    the end whatever happened."""
    nodes = write_group_configs(tmp_path, EXAMPLES, workers=2, threads=4)
    try:
        start_group(nodes)
        yield nodes
    finally:
        for node in nodes:
            node.kill_group()


@pytest.fixture
def connect() -> Iterator[Callable[..., Client]]:
    """Clients closed at the end of the test (an open socket left over fails it). A new
    connection per request by default: a worker of a group may make way for a fresh one
    shortly after the group formed (runtime/worker.py, cut off from a site), closing its idle
    keep-alive connections, which a client reusing one would see as a broken pipe."""
    made: list[Client] = []

    def client(node: NodeProcess, timeout: float = 15.0, keep_alive: bool = False) -> Client:
        made.append(Client(port=node.port, timeout=timeout, keep_alive=keep_alive))
        return made[-1]

    yield client
    for c in made:
        c.close()
