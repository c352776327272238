"""`dump_config` writes what `load_config` reads back: the way tools run a changed copy of a
node's config (`pmnc-runtime torture`) without knowing its keys or formats themselves."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pmnc.runtime.config import HttpAddress, dump_config, load_config


def test_every_key_survives_a_round_trip(tmp_path: Path) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    source = tmp_path / "node.yaml"
    source.write_text(
        "node: n1\n"
        "data_dir: var\n"
        "graceful_timeout: 3\n"
        "checkpoint_interval: 7.5\n"
        "durable: false\n"
        "max_body: 4096\n"
        "heartbeat_timeout: 4\n"
        "keepalive_timeout: 2\n"
        "request_timeout: 9\n"
        "max_connections: 17\n"
        "cache_size: 5242880\n"
        "cages:\n"
        "  - name: a\n    modules: modules\n    workers: 3\n    threads: 5\n"
        "    http: 127.0.0.1:18080\n"
        "  - name: b\n    modules: modules\n"
        "  - name: c\n    modules: modules\n    http: '[::1]:18081'\n"
        "replication:\n"
        "  address: 127.0.0.1:17100\n"
        "  ack: one\n"
        "  priority: 7\n"
        "  peers:\n"
        "    - {node: n2, address: '[::1]:17200', http: {a: 10.0.0.2:18080, c: '[::1]:18081'}}\n"
        "    - {node: n3, address: n3.example:17300}\n"
    )
    cfg = load_config(source)
    copy = tmp_path / "elsewhere" / "copy.yaml"
    copy.parent.mkdir()
    copy.write_text(dump_config(cfg))
    again = load_config(copy)
    assert again == dataclasses.replace(cfg, file=copy)
    assert again.cages[2].http == HttpAddress("::1", 18081)
    # Nothing is left at a default by omission: a changed default would not change the copy.
    assert "max_connections: 17" in copy.read_text()
    assert again.cache_size == 5 << 20
    assert again.replication is not None and again.replication.peers[0].http["c"] == HttpAddress(
        "::1", 18081
    )


def test_a_node_without_replication_is_dumped_without_it(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    source = tmp_path / "node.yaml"
    source.write_text(f"node: n\ncages:\n  - name: c\n    modules: {tmp_path / 'm'}\n")
    text = dump_config(load_config(source))
    assert "replication" not in text
    copy = tmp_path / "copy.yaml"
    copy.write_text(text)
    assert load_config(copy).replication is None


def test_a_changed_copy_keeps_the_safe_paths_of_the_config_module(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    source = tmp_path / "node.yaml"
    source.write_text(f"node: n\ncages:\n  - name: c\n    modules: {tmp_path / 'm'}\n")
    cfg = load_config(source)
    scratch = dataclasses.replace(cfg, data_dir=tmp_path / "scratch")
    out = tmp_path / "scratch.yaml"
    out.write_text(dump_config(scratch))
    assert load_config(out).safe_dir("c", "x") == tmp_path / "scratch" / "safe" / "n.c.x"
