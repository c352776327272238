"""`./dev bench replication` runs end to end, as small as it goes: the single node, the master
and a client of one quorum group loaded by wrk for a second each, then one kill -9 of the
master's node (bench/replication.py). Every row has a positive rate and no failed write, the
group serves writes again within the contract's 10 s (tests/integration/test_group.py,
FAILOVER_S) without losing an acknowledged increment, and the nodes' directories are gone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(90)
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (./dev bench does)")
def test_bench_replication_quick(tmp_path: Path) -> None:
    raw = tmp_path / "raw.json"
    runs = tmp_path / "runs"
    out = tmp_path / "out.txt"
    with out.open("wb") as o:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench",
                "replication",
                "--acks",
                "quorum",
                "--failovers",
                "1",
                "--seconds",
                "1",
                "--node",
                "1x2",
                "--wrk",
                "1x4",
                "--fsync-seconds",
                "0.2",
                "--dir",
                str(runs),
                "--json",
                str(raw),
            ],
            cwd=ROOT,
            stdout=o,
            stderr=subprocess.STDOUT,
            timeout=85,
            check=False,
        )
    text = out.read_text()
    assert proc.returncode == 0, text
    assert "single node (anchor)" in text and "x single node" in text, text
    part = json.loads(raw.read_text())
    assert not part["notes"], text
    loads = {(r["target"], r["ack"]): r["wrk"] for r in part["loads"]}
    assert set(loads) == {("single node", "-"), ("master", "quorum"), ("client", "quorum")}, text
    for key, r in loads.items():
        assert r["requests"] > 0 and r["per_s"] > 0, (key, r)
        assert r["status_errors"] == 0 and r["timeouts"] == 0, (key, r)
    (failover,) = part["failovers"]
    assert failover["took_s"] is not None and failover["took_s"] < 10.0, failover
    assert failover["lost"] is False, failover
    assert failover["rejoined_s"] is not None, failover
    assert part["fsync"] and all(f["per_s"] > 0 for f in part["fsync"]), part["fsync"]
    assert not list(runs.iterdir()), "the nodes' directories were left behind"
