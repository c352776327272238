"""The benchmark runs end to end: a quick pass over pmnc, raw berkeleydb and diskcache, two
configurations and two operations, each row with a positive rate."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.timeout(120)
def test_bench_quick(tmp_path: Path) -> None:
    # ./dev installs the peers with the test tools: a missing one is a set-up failure.
    assert _have("diskcache"), "the benchmark's peers are not installed (./dev installs them)"
    stores = ["pmnc", "berkeleydb", "diskcache"]
    configs, ops = ["1x1", "2x2"], ["set_new", "get"]
    out = tmp_path / "out.txt"
    err = tmp_path / "err.txt"
    raw = tmp_path / "raw.json"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench",
                "--quick",
                "--stores",
                ",".join(stores),
                "--configs",
                ",".join(configs),
                "--ops",
                ",".join(ops),
                "--dir",
                str(tmp_path / "stores"),
                "--json",
                str(raw),
            ],
            cwd=ROOT,
            stdout=o,
            stderr=e,
            timeout=100,
            check=False,
        )
    text = out.read_text()
    assert proc.returncode == 0, text + err.read_text()
    assert "append" in text and "overwrite" in text  # the fdatasync rates
    for op in ops:
        section = text.split(f"({op}) ==", 1)[1].split("==", 1)[0]
        for store in stores:
            for config in configs:
                m = re.search(rf"^{store}\s+{config}\s+([\d,]+)\s", section, re.MULTILINE)
                assert m, f"no row for {store} {op} {config}:\n{text}"
                assert int(m.group(1).replace(",", "")) > 0, m.group(0)
    cells = json.loads(raw.read_text())["cells"]
    assert len(cells) == len(stores) * len(configs) * len(ops)
    assert all(c["ops_per_s"] > 0 and not c["failed"] for c in cells)
