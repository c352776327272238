"""A node whose disk fills up: writes fail cleanly, reads go on, writes resume, nothing is lost.

The data directory is a size-limited tmpfs mounted by the test (root only; skipped with the
reason otherwise). A filler file takes the space until less than the safes' reserve
(`min_free_space`, 64 MiB by default) is left: a write then answers 500 with SafeNoSpaceError
and the worker lives on; reads answer 200. Removing the filler lets writes through again.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import Client, Node, small_tmpfs, worker_pids, write_modules
from pmnc.safe import Safe, verify

pytestmark = pytest.mark.stress

SIZE_MIB = 192
KV = """
pmnc_safe = globals()["pmnc_safe"]


def put(key, value):
    pmnc_safe[key] = value


def get(key):
    return pmnc_safe.get(key)
"""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    # Requested before node_factory, so torn down after it has killed the node.
    with small_tmpfs(tmp_path / "disk", SIZE_MIB) as mount:
        yield mount


def fill(path: Path, leave: int) -> int:
    """Grow the file at `path` until only about `leave` bytes are free; its size."""
    st = os.statvfs(path.parent)
    size = max(0, st.f_bavail * st.f_frsize - leave)
    with open(path, "wb") as f, contextlib.suppress(OSError):  # ENOSPC: as full as it gets
        os.posix_fallocate(f.fileno(), 0, size)
    return path.stat().st_size


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_full_disk_refuses_writes_keeps_reads_and_recovers(
    tmp_path: Path,
    small_disk: Path,
    node_factory: Callable[..., Node],
    stress_seconds: float,
) -> None:
    modules = write_modules(tmp_path / "modules", {"kv": KV})
    node = node_factory(modules, workers=2, threads=2)
    # node_factory puts data_dir next to the config; point it at the small disk instead.
    text = node.config.read_text()
    node.config.write_text(text.replace(f"data_dir: {tmp_path / 'var'}", f"data_dir: {small_disk}"))
    node.start()
    workers = worker_pids(node.pid)
    client = Client(node.port)
    acked: dict[str, object] = {}
    for i in range(200):
        acked[f"k{i}"] = [i, "x" * 100]
        assert client.result("kv", "put", key=f"k{i}", value=acked[f"k{i}"]) is None

    filler = small_disk / "filler"
    fill(filler, 16 << 20)  # 16 MiB left: under the 64 MiB reserve
    print(f"\nfree after filling: {free(small_disk) >> 20} MiB of {SIZE_MIB} MiB")
    time.sleep(0.5)  # a safe trusts its last free-space reading for 0.2 s
    deadline = time.monotonic() + max(stress_seconds, 2.0)
    refused = reads = 0
    while time.monotonic() < deadline:
        status, answer = client.call("kv", "put", key=f"full{refused}", value=refused)
        assert status == 500, (status, answer)
        assert answer["error"].startswith("SafeNoSpaceError: "), answer
        assert str(small_disk) in answer["error"] and "free" in answer["error"], answer
        refused += 1
        for key in ("k0", f"k{refused % 200}"):
            assert client.result("kv", "get", key=key) == acked[key]
            reads += 1
        time.sleep(0.01)
    assert worker_pids(node.pid) == workers, "a worker died on the full disk"
    assert client.result("kv", "get", key="full0") is None, "a refused write was stored"
    print(f"disk full: {refused} writes refused (500 SafeNoSpaceError), {reads} reads served")

    filler.unlink()
    deadline = time.monotonic() + 10
    while True:
        status, answer = client.call("kv", "put", key="after", value="free again")
        if status == 200:
            break
        assert answer["error"].startswith("SafeNoSpaceError: "), answer
        assert time.monotonic() < deadline, "writes did not resume after space was freed"
        time.sleep(0.05)
    acked["after"] = "free again"
    for i in range(200, 400):
        acked[f"k{i}"] = i
        assert client.result("kv", "put", key=f"k{i}", value=i) is None
    client.close()
    assert node.stop() == 0
    safe_dir = small_disk / "safe" / "test.demo.kv"
    with Safe.open(safe_dir, create=False) as safe:
        lost = [k for k, v in acked.items() if safe.get(k) != v]
    assert not lost, f"{len(lost)} acknowledged writes lost: {lost[:5]}"
    verify(safe_dir)
