"""`./dev bench footprint` runs end to end: an idle footprint and a bytes-per-payload row for
every store, pmnc's idle footprint within its bound, its data file within 1.5x in key order."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_bench_footprint_quick(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "footprint", "--payload", "0.5", "--dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    idle = dict(re.findall(r"^(\w+)\s+([\d.]+) MiB$", out, re.MULTILINE))
    assert set(idle) >= {"pmnc", "berkeleydb", "diskcache", "lmdb", "sqlitedict"}, out
    assert float(idle["pmnc"]) <= 8.0, out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if " / " in line}
    pmnc = rows["pmnc"]
    data_ratios = [float(pmnc[i]) for i in range(0, 12, 3)]  # "data / total" per size, in order
    assert all(0 < r <= 1.5 for r in data_ratios), out
    assert not list(tmp_path.iterdir()) or all(
        not p.name.startswith("footprint-") for p in tmp_path.iterdir()
    ), "the stores were left behind"
