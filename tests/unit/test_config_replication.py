"""The `replication:` section of a node config: what loads, the ports each safe takes
(`safe_sites`), and every way it is refused, as `FILE:LINE: key.path: expected X, got Y` like
the rest of the config (tests/unit/test_config.py). The supervisor opens one replicated safe per
(cage, module) on these ports, so a port clash found here is one that would otherwise show as a
safe that cannot start, on one node of the group only.
"""

from __future__ import annotations

import argparse
import socket
import textwrap
from pathlib import Path

import pytest
from pmnc.runtime.cli import check as cmd_check
from pmnc.runtime.config import (
    ACK_POLICIES,
    ConfigError,
    HttpAddress,
    PeerConfig,
    ReplicationConfig,
    check_ports,
    dump_config,
    load_config,
    replication_errors,
    safe_sites,
)
from pmnc.runtime.harness import free_port

REPO = Path(__file__).resolve().parents[2]

CAGES = """
node: n1
cages:
  - name: a
    modules: ma
    http: 127.0.0.1:8100
  - name: b
    modules: mb
    http: 127.0.0.1:8101
"""


def node(tmp_path: Path, replication: str, *, modules: tuple[int, int] = (2, 1)) -> Path:
    """A node with cages a (modules a0, a1...) and b (b0...), plus the given YAML appended."""
    for cage, count in zip("ab", modules, strict=True):
        directory = tmp_path / f"m{cage}"
        directory.mkdir(exist_ok=True)
        for i in range(count):
            (directory / f"{cage}{i}.py").write_text("")
    path = tmp_path / "node.yaml"
    path.write_text(CAGES.lstrip("\n") + textwrap.dedent(replication).lstrip("\n"))
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.errors


# --- what loads --------------------------------------------------------------------------------


def test_full_section_loads_into_exact_objects(tmp_path: Path) -> None:
    path = node(
        tmp_path,
        """
        replication:
          address: 127.0.0.1:7100
          ack: all
          priority: 0
          peers:
            - node: n2
              address: 10.0.0.2:7100
              http: {a: 10.0.0.2:8100, b: "[::1]:8101"}
            - node: n3
              address: host-3.example:7100
        """,
    )
    cfg = load_config(path)
    assert cfg.replication == ReplicationConfig(
        address=HttpAddress("127.0.0.1", 7100),
        ack="all",
        priority=0,
        peers=(
            PeerConfig(
                "n2",
                HttpAddress("10.0.0.2", 7100),
                {"a": HttpAddress("10.0.0.2", 8100), "b": HttpAddress("::1", 8101)},
            ),
            PeerConfig("n3", HttpAddress("host-3.example", 7100), {}),
        ),
    )
    hash(cfg)  # still hashable, the peers' http maps notwithstanding


def test_defaults_and_absence(tmp_path: Path) -> None:
    cfg = load_config(node(tmp_path, "replication: {address: 127.0.0.1:7100}\n"))
    assert cfg.replication == ReplicationConfig(HttpAddress("127.0.0.1", 7100))
    assert (cfg.replication.ack, cfg.replication.priority, cfg.replication.peers) == (
        "quorum",
        100,
        (),
    )
    assert ACK_POLICIES == ("quorum", "all", "one", "none")
    alone = load_config(node(tmp_path, ""))
    assert alone.replication is None
    assert safe_sites(alone) == {}


def test_each_safe_gets_the_port_of_its_index_on_every_node(tmp_path: Path) -> None:
    path = node(
        tmp_path,
        """
        replication:
          address: 127.0.0.1:7100
          peers:
            - {node: n2, address: 127.0.0.1:7200}
            - {node: n3, address: 10.1.1.1:9000}
        """,
    )
    # Sorted by (cage, module) over all cages: a0, a1, b0.
    assert safe_sites(load_config(path)) == {
        ("a", "a0"): (("127.0.0.1", 7100), [("127.0.0.1", 7200), ("10.1.1.1", 9000)]),
        ("a", "a1"): (("127.0.0.1", 7101), [("127.0.0.1", 7201), ("10.1.1.1", 9001)]),
        ("b", "b0"): (("127.0.0.1", 7102), [("127.0.0.1", 7202), ("10.1.1.1", 9002)]),
    }


def test_the_sample_group_loads_and_its_nodes_agree_on_every_port() -> None:
    """config/group/node{1,2,3}.yaml: what node X calls node Y's port for a safe is the port
    node Y itself listens on for that safe, and node Y's cages are where X would call them."""
    cfgs = {f"node{n}": load_config(REPO / "config" / "group" / f"node{n}.yaml") for n in (1, 2, 3)}
    sites = {name: safe_sites(cfg) for name, cfg in cfgs.items()}
    reference = load_config(REPO / "config" / "node.yaml")
    assert set(sites["node1"]) == set(reference.safes())  # the sample node's cages and modules
    for name, cfg in cfgs.items():
        assert cfg.replication is not None
        assert cfg.data_dir == REPO / "var" / name
        assert len(sites[name]) == 4  # counter, kv, ratelimit, sessions
        for j, peer in enumerate(cfg.replication.peers):
            for safe, (_, peers) in sites[name].items():
                assert peers[j] == sites[peer.node][safe][0]
            assert peer.http == {cage.name: cage.http for cage in cfgs[peer.node].cages}
        assert {p.node for p in cfg.replication.peers} == set(cfgs) - {name}


def test_dump_round_trips_the_section(tmp_path: Path) -> None:
    cfg = load_config(REPO / "config" / "group" / "node1.yaml")
    copy = tmp_path / "copy.yaml"
    copy.write_text(dump_config(cfg))
    again = load_config(copy)
    assert again.replication == cfg.replication
    assert again.cages == cfg.cages


# --- what is refused ---------------------------------------------------------------------------


def test_every_mistake_in_the_section_is_reported_at_once(tmp_path: Path) -> None:
    path = node(
        tmp_path,
        """
        replication:
          address: 0.0.0.0:7100
          ack: majority
          priority: true
          peers:
            - node: n1
              address: 127.0.0.1:7200
            - node: n2
              address: 127.0.0.1
            - node: n2
              address: 127.0.0.1:7400
              http: {a: 127.0.0.1:8400, web: 127.0.0.1:8401}
            - node: bad name
              adress: 127.0.0.1:7500
        """,
    )
    f = str(path)
    assert errors_of(path) == [
        f'{f}:10: replication.address: expected an address "HOST:PORT" or "[IPV6]:PORT" '
        "that peers can connect to (not a wildcard such as 0.0.0.0 or ::), PORT 1..65535, got "
        "'0.0.0.0:7100' (a wildcard)",
        f"{f}:11: replication.ack: expected one of quorum, all, one, none, got 'majority' "
        "(a string)",
        f"{f}:12: replication.priority: expected an integer from 0 (never master) to 1000000, "
        "got true (a boolean)",
        f"{f}:14: replication.peers[0].node: expected another node's name, got 'n1' (this node)",
        f'{f}:17: replication.peers[1].address: expected an address "HOST:PORT" or '
        '"[IPV6]:PORT" that peers can connect to (not a wildcard such as 0.0.0.0 or ::), '
        "PORT 1..65535, got '127.0.0.1' (no ':PORT')",
        f"{f}:18: replication.peers[2].node: expected each peer once, got 'n2' again "
        "(first at line 16)",
        f"{f}:20: replication.peers[2].http.web: expected one of a, b, got an unknown key",
        f"{f}:21: replication.peers[3].node: expected a name of 1 to 64 characters from "
        "[A-Za-z0-9_-], got 'bad name' (a string)",
        f'{f}:21: replication.peers[3].address: expected an address "HOST:PORT" or '
        '"[IPV6]:PORT" that peers can connect to (not a wildcard such as 0.0.0.0 or ::), '
        "PORT 1..65535, got nothing (a required key is missing)",
        f"{f}:22: replication.peers[3].adress: expected one of node, address, http, got an "
        "unknown key; did you mean 'address'?",
    ]


@pytest.mark.parametrize(
    ("section", "line", "key", "says"),
    [
        ("replication: 127.0.0.1:7100", 9, "replication", "expected a mapping of settings"),
        ("replication:\n  ack: one", 10, "replication.address", "a required key is missing"),
        (
            "replication:\n  address: 127.0.0.1:7100\n  priority: 1000001",
            11,
            "replication.priority",
            "got 1000001 (an integer)",
        ),
        (
            "replication:\n  address: 127.0.0.1:7100\n  peers: n2",
            11,
            "replication.peers",
            "expected a list of peer nodes (may be empty), got 'n2'",
        ),
    ],
)
def test_a_malformed_section_is_refused(
    tmp_path: Path, section: str, line: int, key: str, says: str
) -> None:
    path = node(tmp_path, section + "\n")
    (error,) = errors_of(path)
    assert error.startswith(f"{path}:{line}: {key}: ")
    assert says in error


# --- the ports -----------------------------------------------------------------------------------


def test_the_node_s_ports_must_not_take_a_cage_s_http_port(tmp_path: Path) -> None:
    # Three safes from 8099: 8099, 8100 (cage a's), 8101 (cage b's).
    path = node(tmp_path, "replication: {address: 127.0.0.1:8099}\n")
    f = str(path)
    assert errors_of(path) == [
        f"{f}:9: replication.address: expected ports nothing else of the group listens on, "
        f"got '127.0.0.1:8099' (ports 8099..8101: overlaps cages[0].http, port 8100 at {f}:5)",
        f"{f}:9: replication.address: expected ports nothing else of the group listens on, "
        f"got '127.0.0.1:8099' (ports 8099..8101: overlaps cages[1].http, port 8101 at {f}:8)",
    ]
    # A wildcard cage address takes the port on every IPv4 address, 127.0.0.1 included.
    (tmp_path / "wild.yaml").write_text(
        path.read_text().replace("127.0.0.1:8100", "0.0.0.0:8100").replace("8099", "8098")
    )
    assert any("overlaps cages[0].http" in e for e in errors_of(tmp_path / "wild.yaml"))


def test_two_nodes_on_one_host_need_ranges_apart(tmp_path: Path) -> None:
    path = node(
        tmp_path,
        """
        replication:
          address: 127.0.0.1:7100
          peers:
            - {node: n2, address: 127.0.0.1:7102, http: {a: 127.0.0.1:7101}}
            - {node: n3, address: 127.0.0.2:7100}
            - {node: n4, address: localhost:7100}
        """,
    )
    f = str(path)
    # n2's range 7102..7104 meets ours at 7102, and its cage a's http is our port 7101; n3 is
    # another address (another machine, or another interface) and n4 a name: not compared.
    assert errors_of(path) == [
        f"{f}:12: replication.peers[0].address: expected ports nothing else of the group "
        f"listens on, got '127.0.0.1:7102' (ports 7102..7104: overlaps replication.address, "
        f"ports 7100..7102 at {f}:10)",
        f"{f}:12: replication.peers[0].http.a: expected ports nothing else of the group "
        f"listens on, got '127.0.0.1:7101' (port 7101: overlaps replication.address, "
        f"ports 7100..7102 at {f}:10)",
    ]
    apart = node(
        tmp_path,
        "replication:\n  address: 127.0.0.1:7100\n  peers: [{node: n2, address: 127.0.0.1:7103}]\n",
    )
    assert load_config(apart).replication is not None  # 7100..7102 and 7103..7105


def test_ports_past_65535_and_more_than_100_safes(tmp_path: Path) -> None:
    path = node(tmp_path, "replication: {address: 127.0.0.1:65534}\n")
    (error,) = errors_of(path)
    assert error == (
        f"{path}:9: replication.address: expected a port of at most 65533 (one port per safe, "
        "3 safes), got '127.0.0.1:65534' (ports 65534..65536)"
    )
    (tmp_path / "many").mkdir()
    many = node(tmp_path / "many", "replication: {address: 127.0.0.1:20000}\n", modules=(60, 41))
    (error,) = errors_of(many)
    assert error == (
        f"{many}:9: replication.address: expected at most 100 modules on a replicated node "
        "(each safe takes a port), got 101"
    )
    (many.parent / "mb" / "b40.py").unlink()
    assert len(safe_sites(load_config(many))) == 100


def test_a_module_added_after_loading_is_checked_by_safe_sites(tmp_path: Path) -> None:
    """The ports follow the module files: one added since the config was loaded moves the
    node's range; `safe_sites` (what the supervisor uses) checks it again, and refuses."""
    path = node(tmp_path, "replication: {address: 127.0.0.1:8097}\n")  # 8097..8099: fits
    cfg = load_config(path)
    assert replication_errors(cfg) == []
    (tmp_path / "mb" / "b1.py").write_text("")  # 8097..8100 now takes cage a's port
    with pytest.raises(ConfigError) as info:
        safe_sites(cfg)
    assert info.value.errors == replication_errors(cfg)
    assert "overlaps cages[0].http, port 8100" in info.value.errors[0]


def test_check_ports_tries_each_replication_port(tmp_path: Path) -> None:
    base = free_port()
    while not all(_free(base + i) for i in range(3)) or base + 2 > 65535:
        base = free_port()
    path = node(tmp_path, f"replication: {{address: 127.0.0.1:{base}}}\n")
    text = path.read_text().replace("8100", str(free_port()))
    path.write_text(text.replace("8101", str(free_port())))
    cfg = load_config(path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", base + 1))
        busy.listen(1)
        errors = [e for e in check_ports(cfg) if "replication" in e]
    assert len(errors) == 1
    assert errors[0].startswith(
        f"{path}:9: replication.address: expected an address this host can listen on, got "
        f"'127.0.0.1:{base + 1}' for safe a.a1 ("
    )


def _free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_pmnc_runtime_check_says_the_node_is_replicated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = free_port()
    while not all(_free(base + i) for i in range(3)) or base + 2 > 65535:
        base = free_port()
    path = node(
        tmp_path,
        f"replication:\n  address: 127.0.0.1:{base}\n"
        f"  peers: [{{node: n2, address: 10.0.0.2:{base}}}]\n",
    )
    text = path.read_text().replace("8100", str(free_port()))
    path.write_text(text.replace("8101", str(free_port())))
    assert cmd_check.run(argparse.Namespace(config=str(path))) == 0
    assert capsys.readouterr().out == (
        f"{path}: node n1: 2 cages, 3 modules, replicated at 127.0.0.1:{base} with 1 peer, ok\n"
    )
