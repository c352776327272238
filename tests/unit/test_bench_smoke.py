"""The benchmark runs end to end: a quick pass over pmnc, raw berkeleydb and diskcache, two
configurations and two operations, each row with a positive rate; and, where wrk and gunicorn
are installed, a quick pass of the HTTP part."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
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


@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (./dev bench does)")
@pytest.mark.skipif(
    not Path(sys.executable).with_name("gunicorn").exists() and shutil.which("gunicorn") is None,
    reason="gunicorn is not installed (the bench extra)",
)
def test_bench_http_quick(tmp_path: Path) -> None:
    """The HTTP part end to end, as small as it goes: pmnc-runtime and gunicorn at 2x2, one
    second of wrk reads each, then a fresh client beside a few hostile connections; every
    figure positive, every request answered, both servers stopped cleanly."""
    out = tmp_path / "out.txt"
    raw = tmp_path / "raw.json"
    with out.open("wb") as o:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench",
                "--http-only",
                "--quick",
                "--http-node",
                "2x2",
                "--wrk",
                "1x4",
                "--http-steps",
                "read,fresh_hostile",
                "--http-prefill",
                "50",
                "--hostile",
                "10,2",
                "--dir",
                str(tmp_path / "runs"),
                "--json",
                str(raw),
            ],
            cwd=ROOT,
            stdout=o,
            stderr=subprocess.STDOUT,
            timeout=100,
            check=False,
        )
    text = out.read_text()
    assert proc.returncode == 0, text
    assert "== targets (issue 8)" in text, text
    part = json.loads(raw.read_text())["http"]
    assert part["servers"] == ["pmnc", "gunicorn"], text
    assert not part["notes"], text
    for label in ("pmnc", "gunicorn"):
        (read,) = part["results"][label]["read"]
        assert read["requests"] > 0 and read["status_errors"] == 0, (label, read)
        (fresh,) = part["results"][label]["fresh_hostile"]
        assert not fresh["failed"], (label, fresh)
        (held,) = part["hostile"][label]
        assert held["after"]["idle_connected"] > 0 and held["after"]["slow_connected"] > 0, held
    # The new server answers a fresh client while the hostile connections are held.
    (fresh,) = part["results"]["pmnc"]["fresh_hostile"]
    assert fresh["requests"] > 0 and fresh["status_errors"] == 0, fresh
