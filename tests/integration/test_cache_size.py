"""The node-level `cache_size` key (README "### Config") sets every safe's Berkeley DB cache
maximum, on real nodes: each a real `pmnc-runtime start`, its safes created by the supervisor's
`prepare()` (or, on a replicated node, by the cage's replication process) and read back by a
real worker through `Safe.stats()` (`cache_max_bytes` is libdb's `memp_stat()["regmax"]` of the
shared region, so it is what the region's creator set, not what the worker asked for).

libdb rounds the size: below 500 MB it adds 25 % for its own overhead, plus a few KiB
(docs/footprint.md, "Where the disk goes": regmax = 1.25 x the cache size + 8 KiB), so the
assertions are ranges, 1x to 1.5x the key. Region settings belong to the region's creator
(docs/berkeleydb.md): a changed key does not resize the cache of a safe whose regions exist,
which the restart below shows, as docs/footprint.md says.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pmnc.runtime.harness import Client, NodeProcess, free_port_range, write_config

from tests.helpers import write_modules

MiB = 1 << 20

PROBE = """
    from typing import Any

    pmnc_safe: Any = globals()["pmnc_safe"]


    def cache() -> dict[str, int]:
        figures = pmnc_safe.stats()
        return {"max": figures["cache_max_bytes"], "now": figures["cache_bytes"]}


    def fill(count: int) -> int:
        for start in range(0, count, 100):
            stop = min(count, start + 100)
            pmnc_safe.update({f"k{i:06d}": "x" * 4000 for i in range(start, stop)})
        return len(pmnc_safe)
"""


@pytest.fixture
def nodes() -> Iterator[list[NodeProcess]]:
    """Nodes started by the test, killed (whole process group) whatever happens."""
    started: list[NodeProcess] = []
    yield started
    for node in started:
        node.kill_group()


def call(node: NodeProcess, function: str, **kwargs: Any) -> Any:
    client = Client("127.0.0.1", node.port, timeout=15.0, keep_alive=False)
    try:
        status, answer = client.call("probe", function, **kwargs)
    finally:
        client.close()
    assert status == 200, (status, answer)
    return answer["result"]


def status(node: NodeProcess) -> dict[str, Any]:
    client = Client("127.0.0.1", node.port, timeout=15.0, keep_alive=False)
    try:
        code, body = client.request("GET", "/_status")
    finally:
        client.close()
    assert code == 200, body
    document: dict[str, Any] = json.loads(body)
    return document


def eventually(check: Callable[[], Any], timeout: float) -> Any:
    """The first truthy result of `check`, polled every 0.1 s (workers report about once a
    second); the test fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.1)


def region_bytes(node: NodeProcess) -> int:
    """The probe safe's `region_bytes` in /_status, once a worker has reported it."""
    figure = eventually(lambda: status(node)["safes"].get("probe", {}).get("region_bytes"), 10)
    assert isinstance(figure, int)
    return figure


def assert_follows(maximum: int, key: int) -> None:
    assert key <= maximum <= key * 3 // 2, f"cache maximum {maximum} for cache_size {key}"


def test_each_safe_cache_follows_the_node_cache_size(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    modules = write_modules(tmp_path / "modules", {"probe": PROBE})
    small = NodeProcess.one_cage(
        tmp_path, modules, name="small", data_dir=tmp_path / "small", cache_size=4 * MiB
    )
    large = NodeProcess.one_cage(
        tmp_path, modules, name="large", data_dir=tmp_path / "large", cache_size=64 * MiB
    )
    nodes += [small, large]
    for node in nodes:
        node.start(wait_ready=False)
    for node in nodes:
        node.wait_log(" ready: ", 20)

    small_max = call(small, "cache")["max"]
    large_max = call(large, "cache")["max"]
    assert_follows(small_max, 4 * MiB)
    assert_follows(large_max, 64 * MiB)
    # The cache region grows as pages are read or written, up to its maximum (docs/footprint.md):
    # 12 MB of data fill the small cache and take the large one past it, well below its own.
    assert call(small, "fill", count=3000) == 3000
    assert call(large, "fill", count=3000) == 3000
    small_now, large_now = call(small, "cache")["now"], call(large, "cache")["now"]
    assert small_now <= small_max
    assert large_now > small_now and large_now < large_max // 2
    # What /_status shows of it: the regions on disk, the mutex region growing with the cache
    # maximum (0.42 MiB for 4 MiB, 3.9 MiB for 64 MiB: docs/footprint.md).
    regions = [region_bytes(small), region_bytes(large)]
    assert regions[1] > regions[0] + 2 * MiB, regions

    # A restart with another cache_size keeps the regions a clean stop left, and their cache.
    assert small.stop(20) == 0
    write_config(
        small.config,
        modules,
        small.port,
        data_dir=tmp_path / "small",
        cache_size=64 * MiB,
    )
    small.start(timeout=20)
    assert call(small, "cache")["max"] == small_max


def test_a_replicated_safe_is_created_with_the_node_cache_size(
    tmp_path: Path, nodes: list[NodeProcess]
) -> None:
    """On a replicated node the cage's replication process creates the safe (replicator.py);
    a group of one (no peers) makes it master at once."""
    modules = write_modules(tmp_path / "modules", {"probe": PROBE})
    base = free_port_range(1)
    node = NodeProcess.one_cage(
        tmp_path,
        modules,
        cache_size=4 * MiB,
        replication={"address": f"127.0.0.1:{base}", "peers": []},
    )
    nodes.append(node)
    node.start(timeout=20)
    assert_follows(call(node, "cache")["max"], 4 * MiB)
    assert (tmp_path / "var" / "safe" / "test.demo.probe" / "safe.db").exists()
