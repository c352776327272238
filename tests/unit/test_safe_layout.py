"""`is_safe` and `disk_usage`: what a tool asks of a directory instead of knowing a safe's files.

`pmnc-runtime safe` (runtime/cli/safe.py) must never create a safe by opening a directory that
holds none, and its `list` shows each safe's data, log and region bytes; both come from these
two functions of pmnc.safe (docs/safe-api.md), on real safes here.
"""

from __future__ import annotations

import os
from pathlib import Path

from pmnc.safe import Safe, disk_usage, is_safe, prepare


def test_is_safe_only_for_a_directory_holding_a_safe(tmp_path: Path) -> None:
    empty, note, missing = tmp_path / "empty", tmp_path / "note", tmp_path / "missing"
    empty.mkdir()
    note.write_text("not a safe")
    for path in (empty, note, missing):
        assert not is_safe(path), path
    assert sorted(os.listdir(empty)) == [], "asking created something"
    assert not missing.exists()
    with Safe.open(tmp_path / "s") as s:
        s["k"] = 1
        assert is_safe(tmp_path / "s")
    assert is_safe(str(tmp_path / "s"))  # a str as well as a Path


def test_disk_usage_counts_the_data_the_log_and_the_regions(tmp_path: Path) -> None:
    path = tmp_path / "s"
    prepare(path)
    before = disk_usage(path)
    assert before.data > 0 and before.log > 0 and before.regions > 0
    with Safe.open(path) as s:
        for i in range(280):
            s[f"key{i}"] = b"x" * 3000  # ~820 KiB on the data file's pages (under its limit)
    after = disk_usage(path)
    assert after.data >= before.data + 800 * 1024
    assert after.log > 0  # a log file's size is set when libdb makes it, not as it fills
    assert after.data == (path / "safe.db").stat().st_size
