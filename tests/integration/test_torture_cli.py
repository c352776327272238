"""`pmnc-runtime torture` end to end: a real node, real kill -9, a report ending in `lost: 0`."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from helpers import cli, free_port


def tiny_config(tmp_path: Path) -> Path:
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "echo.py").write_text("def echo(x=None):\n    return x\n")
    config = tmp_path / "node.yaml"
    config.write_text(
        "node: tiny\n"
        "data_dir: var\n"
        "cages:\n"
        "  - name: demo\n"
        "    modules: modules\n"
        "    workers: 2\n"
        "    threads: 2\n"
        f"    http: 127.0.0.1:{free_port()}\n"
    )
    return config


def test_torture_kills_workers_and_loses_nothing(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    out = tmp_path / "torture.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [*cli(), "torture", str(config), "--duration", "6", "--kill-every", "1.5"],
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        code = proc.wait(120)
    finally:
        # torture's own node is in a session of its own: a hung torture leaves it to us.
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    text = out.read_text()
    print(text)
    lines = text.strip().splitlines()
    assert code == 0, text
    assert lines[-1] == "lost: 0"
    kills = next(line for line in lines if line.startswith("kills: "))
    assert int(kills.split()[1]) >= 2, text
    recoveries = next(line for line in lines if line.startswith("recoveries: "))
    assert recoveries.split()[1].rstrip(",") == kills.split()[1], text
    assert "verify: ok" in text
    # The user's config is untouched: a scratch data_dir was used and removed.
    assert not (tmp_path / "var").exists()
    assert sorted(p.name for p in (tmp_path / "modules").iterdir()) == ["echo.py"]


def test_torture_refuses_a_config_without_http(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    (tmp_path / "modules").mkdir()
    config.write_text("node: n\ncages:\n  - name: c\n    modules: modules\n")
    proc = subprocess.run(
        [*cli(), "torture", str(config), "--duration", "1"],
        capture_output=True,
        check=False,
        timeout=60,
        text=True,
    )
    assert proc.returncode == 2
    assert "no cage has an http interface" in proc.stderr


def test_torture_group_kills_the_masters_node_and_loses_nothing(tmp_path: Path) -> None:
    """`torture --group 3` (README, "Replicated safes"): three nodes on this machine, the node
    mastering the probe's safe SIGKILLed each round under writes sent to every node, started
    again; every write answered 200 must then be readable on every node, and every failover
    must stay within the group's 10 s (tests/integration/test_group.py)."""
    config = tiny_config(tmp_path)
    out = tmp_path / "torture.out"
    command = [*cli(), "torture", str(config), "--group", "3", "--rounds", "2"]
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [*command, "--kill-every", "1", "--clients", "2", "--seed", "7"],
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        code = proc.wait(150)
    finally:
        if proc.poll() is None:  # its nodes are in sessions of their own: kill torture's
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    text = out.read_text()
    print(text)
    lines = text.strip().splitlines()
    assert code == 0, text
    assert lines[-1] == "lost: 0"
    killed = [line for line in lines if line.startswith("round ")]
    assert len(killed) == 2, text
    assert all("(master), writes served again after" in line for line in killed), text
    assert all("back as a synced client" in line for line in killed), text
    rounds = next(line for line in lines if line.startswith("rounds: "))
    assert rounds.startswith("rounds: 2 of 2,"), text
    failover = float(rounds.split("max failover: ")[1].split()[0])
    assert 0 < failover <= 10.0, text
    acked = int(next(line for line in lines if line.startswith("acknowledged: ")).split()[1])
    checked = next(line for line in lines if line.startswith("checked: "))
    assert acked > 0 and checked.startswith(f"checked: {acked} acknowledged writes on each of 3")
    assert "final stop: exit statuses 0, 0, 0" in text
    assert "verify: ok (3 safe(s))" in text
    assert not (tmp_path / "var").exists()
    assert sorted(p.name for p in (tmp_path / "modules").iterdir()) == ["echo.py"]


def test_torture_refuses_a_group_of_two(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*cli(), "torture", str(tiny_config(tmp_path)), "--group", "2"],
        capture_output=True,
        check=False,
        timeout=60,
        text=True,
    )
    assert proc.returncode == 2
    assert "at least 3 nodes" in proc.stderr
    assert "majority" in proc.stderr
