"""`pmnc-runtime safe dump/load` carry expiry times and queue items (`pmnc-dump 2`,
docs/dump-format.md): real safes in tmp_path, the real CLI in a subprocess.

Before format 2 a dump and load turned every expiring key into a permanent one and dropped every
queue item; these tests assert what a user of `set(..., ttl=)` and `queue()` depends on across a
dump and load: the moment of expiry, every item, FIFO order, and that old dumps still load.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import queue
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pmnc.runtime.cli import dumpfile
from pmnc.safe import Safe

CLI = [sys.executable, "-m", "pmnc.runtime.cli", "safe"]


def cli(*args: str | Path, timeout: float = 60) -> Any:
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, timeout=timeout, check=False
    )


def ok(*args: str | Path) -> str:
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    return str(result.stdout.decode())


def drain(safe: Safe, name: str) -> list[object]:
    got = []
    q = safe.queue(name)
    while True:
        try:
            with q.get(timeout=0) as item:
                got.append(item)
        except queue.Empty:
            return got


def deadlines(path: Path) -> dict[str, float | None]:
    with Safe.open(path, create=False) as safe:
        return {key: expires for key, _, expires in safe.raw_records()}


def layout(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, tag) of every record of a dump, read by the layout docs/dump-format.md gives."""
    out, at = [], 12
    while data[at : at + 1] != b"E":
        tag = data[at : at + 1]
        out.append((at, tag))
        (n,) = struct.unpack_from(">I", data, at + 1)
        at += 5 + n + (8 if tag == b"T" else 0)
        (n,) = struct.unpack_from(">Q", data, at)
        at += 8 + n
    return out


def test_keys_expiry_times_and_queues_round_trip_through_dump_and_load(tmp_path: Path) -> None:
    source, dump = tmp_path / "src", tmp_path / "d"
    with Safe.open(source) as s:
        s["plain"] = {"a": [1, 2]}
        s.set("soon", "short-lived", ttl=3)
        s.set("later", "long-lived", ttl=3600)
        s.set("gone", "expired before the dump", ttl=0.05)
        for i in range(200):
            s.queue("orders").put({"n": i})
        s.queue("mail").put("only")
        time.sleep(0.1)  # "gone" has expired: it must not be dumped
        # An item in work while the dump runs (this process holds its lease; the CLI joins the
        # safe in use): dumped too, as a ready item (at least once).
        in_work = s.queue("orders").get(timeout=1, lease=600)
        assert in_work.item == {"n": 0}
        summary = ok("dump", source, "-o", dump)
        with in_work:
            pass  # done in the source: the dump still has it
        source_deadlines = {k: e for k, _, e in s.raw_records()}
    assert "dumped 3 keys (2 expiring) and 201 queue items" in summary, summary
    with open(dump, "rb") as f:
        assert dumpfile.totals(f) == dumpfile.Totals(keys=3, expiring=2, items=201)

    summary = ok("load", tmp_path / "dst", dump)  # a new safe: load creates it
    assert "loaded 3 keys (2 expiring) and 201 queue items" in summary, summary
    # The deadlines are the dumped safe's own, to the bit: not re-armed from the load's time.
    assert deadlines(tmp_path / "dst") == source_deadlines
    soon = source_deadlines["soon"]
    assert soon is not None
    with Safe.open(tmp_path / "dst", create=False) as d:
        assert dict(d.items()) == {
            "plain": {"a": [1, 2]},
            "soon": "short-lived",
            "later": "long-lived",
        }
        left = d.ttl("soon")
        assert left is not None and abs((time.time() + left) - soon) < 1
        assert d.ttl("plain") is None
        assert sorted(d.queues()) == ["mail", "orders"]
        assert drain(d, "orders") == [{"n": i} for i in range(200)]  # the leased one first
        assert drain(d, "mail") == ["only"]
        time.sleep(max(0.0, soon - time.time()) + 0.2)
        assert "soon" not in d and len(d) == 2  # expired at the dumped safe's moment


def test_queue_items_of_many_shards_load_in_the_order_the_source_delivers_them(
    tmp_path: Path,
) -> None:
    """Concurrent putters write to different shards (docs/queues.md); the dump merges them by
    put time, which is the order `get` delivers them."""
    source, dump = tmp_path / "src", tmp_path / "d"
    with Safe.open(source) as s:
        q = s.queue("work")

        def put(t: int) -> None:
            for i in range(100):
                q.put((t, i))

        threads = [threading.Thread(target=put, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        ok("dump", source, "-o", dump)
        delivered = drain(s, "work")
    assert sorted(delivered, key=repr) == sorted(
        [(t, i) for t in range(4) for i in range(100)], key=repr
    )
    with open(dump, "rb") as f:
        dumped = [pickle.loads(r.value) for r in dumpfile.records(f)]
    assert dumped == delivered
    ok("load", tmp_path / "dst", dump)
    with Safe.open(tmp_path / "dst", create=False) as d:
        assert drain(d, "work") == delivered


def test_loaded_items_go_after_the_items_the_queue_already_holds(tmp_path: Path) -> None:
    with Safe.open(tmp_path / "src") as s:
        for i in range(5):
            s.queue("jobs").put(f"dumped-{i}")
    ok("dump", tmp_path / "src", "-o", tmp_path / "d")
    with Safe.open(tmp_path / "dst") as t:
        t.queue("jobs").put("here-0")
        t.queue("jobs").put("here-1")
    ok("load", tmp_path / "dst", tmp_path / "d")
    with Safe.open(tmp_path / "dst", create=False) as t:
        assert drain(t, "jobs") == ["here-0", "here-1"] + [f"dumped-{i}" for i in range(5)]


def test_a_key_whose_time_passes_between_dump_and_load_is_absent_after_the_load(
    tmp_path: Path,
) -> None:
    """It expires at the dumped safe's moment, so after that moment the loaded key is absent,
    and it replaced the value the target had (a key is stored as the dump has it)."""
    with Safe.open(tmp_path / "src") as s:
        s.set("k", "from the dump", ttl=1)
    ok("dump", tmp_path / "src", "-o", tmp_path / "d")
    with Safe.open(tmp_path / "dst") as t:
        t["k"] = "the target's"
    time.sleep(1.2)
    ok("load", tmp_path / "dst", tmp_path / "d")
    with Safe.open(tmp_path / "dst", create=False) as t:
        assert "k" not in t and len(t) == 0


def v1_dump(items: dict[str, bytes]) -> bytes:
    """A `pmnc-dump 1` file written by the layout docs/dump-format.md gives, not by pmnc."""
    body = b"pmnc-dump 1\n"
    for key, value in items.items():
        k = key.encode("utf-8", "surrogatepass")
        body += b"R" + struct.pack(">I", len(k)) + k + struct.pack(">Q", len(value)) + value
    return body + b"E" + struct.pack(">Q", len(items)) + hashlib.sha256(body).digest()


def test_version_1_dumps_still_load(tmp_path: Path) -> None:
    old = tmp_path / "old.dump"
    old.write_bytes(v1_dump({"a": pickle.dumps([1, 2], 4), "\udc80": pickle.dumps(None, 2)}))
    summary = ok("load", tmp_path / "dst", old)
    assert "loaded 2 keys and 0 queue items" in summary
    with Safe.open(tmp_path / "dst", create=False) as t:
        assert dict(t.items()) == {"a": [1, 2], "\udc80": None}
        assert t.ttl("a") is None and t.queues() == []
    # A version 1 file knows no other record kinds: a "T" in one is damage, not an expiry.
    bad = bytearray(old.read_bytes())
    bad[12:13] = b"T"
    old.write_bytes(bytes(bad))
    result = cli("load", tmp_path / "dst2", old)
    assert result.returncode == 3
    assert "damaged at byte 12: unknown record tag b'T'" in result.stderr.decode()


def test_a_damaged_version_2_dump_is_refused_with_its_offset_and_writes_nothing(
    tmp_path: Path,
) -> None:
    with Safe.open(tmp_path / "src") as s:
        s["a"] = 1
        s.set("b", 2, ttl=3600)
        s.queue("q").put("item")
    ok("dump", tmp_path / "src", "-o", tmp_path / "d")
    data = (tmp_path / "d").read_bytes()
    records = layout(data)
    assert [tag for _, tag in records] == [b"R", b"T", b"Q"]
    expiring, item = records[1][0], records[2][0]
    end = len(data) - 41

    def damaged(at: int, new: bytes) -> bytes:
        return data[:at] + new + data[at + len(new) :]

    expiry_at = expiring + 5 + 1  # tag, key length, the key "b"
    cases = {
        "tag": (damaged(expiring, b"Z"), f"damaged at byte {expiring}: unknown record tag"),
        "nan": (
            damaged(expiry_at, struct.pack(">d", math.nan)),
            f"damaged at byte {expiring}: expiry time nan",
        ),
        "cut": (data[: item + 3], f"truncated at byte {item + 3}"),
        "item": (
            damaged(end - 2, bytes([data[end - 2] ^ 1])),
            f"checksum mismatch over bytes 0-{end - 1} (trailer at byte {end})",
        ),
        "count": (
            damaged(end + 1, struct.pack(">Q", 2)),
            f"the trailer at byte {end} counts 2 records, the file holds 3",
        ),
        "extra": (data + b"\0", f"unexpected data after the trailer at byte {len(data)}"),
    }
    for name, (content, reason) in cases.items():
        path = tmp_path / f"{name}.dump"
        path.write_bytes(content)
        result = cli("load", tmp_path / f"target-{name}", path)
        assert result.returncode == 3, name
        line = result.stderr.decode().strip()
        assert line.startswith(f"{path}: refused, nothing loaded: "), line
        assert reason in line, (name, line)
        assert not (tmp_path / f"target-{name}").exists(), name
