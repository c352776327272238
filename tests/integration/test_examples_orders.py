"""examples/orders/run.py end to end, bounded: orders placed over HTTP while workers are killed
with `kill -9` are all shipped, none twice (the example checks and prints the counts)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parents[2] / "examples" / "orders" / "run.py"


def test_orders_survive_kills_with_nothing_lost_or_shipped_twice(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with open(out, "w") as f:
        done = subprocess.run(
            [sys.executable, str(RUN), "--seconds", "3", "--kill-every", "1", "--clients", "3"],
            check=False,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=180,
            start_new_session=True,
        )
    text = out.read_text()
    assert done.returncode == 0, text
    acknowledged = int(re.search(r"acknowledged\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    assert acknowledged > 50, text
    assert re.search(r"shipped\s+(\d+)\s+lost: 0\b", text), text
    assert f"shipped      {acknowledged:>7}" in text, text
    assert re.search(r"kills\s+[1-9]\d*\s+still queued: 0", text), text
