"""The node config: what loads, what is refused and how the refusal reads, and `check`."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pmnc.runtime.cli import check as cmd_check
from pmnc.runtime.config import (
    CageConfig,
    ConfigError,
    HttpAddress,
    NodeConfig,
    check_ports,
    load_config,
)
from pmnc.runtime.harness import free_port
from pmnc.safe.store import DEFAULT_CACHE_SIZE

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def node_dir(tmp_path: Path) -> Path:
    """A config directory with a `modules/` beside it, as a real deployment has."""
    (tmp_path / "modules").mkdir()
    return tmp_path


def write(directory: Path, text: str, name: str = "node.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def one_error(path: Path) -> str:
    errors = errors_of(path)
    assert len(errors) == 1, errors
    return errors[0]


MINIMAL = """
node: n1
cages:
  - name: c
    modules: modules
"""


# --- what loads --------------------------------------------------------------------------------


def test_full_config_loads_into_exact_objects(node_dir: Path) -> None:
    (node_dir / "other").mkdir()
    path = write(
        node_dir,
        """
        node: node1
        data_dir: data
        graceful_timeout: 5
        checkpoint_interval: 2.5
        durable: false
        max_body: 4096
        heartbeat_timeout: 3.0
        cages:
          - name: demo
            modules: modules
            workers: 4
            threads: 8
            http: 127.0.0.1:8080
          - name: other_2
            modules: ./other/
            http: "[::1]:8081"
        """,
    )
    assert load_config(path) == NodeConfig(
        file=path,
        node="node1",
        data_dir=node_dir / "data",
        cages=(
            CageConfig(
                name="demo",
                modules=node_dir / "modules",
                workers=4,
                threads=8,
                http=HttpAddress("127.0.0.1", 8080),
            ),
            CageConfig(name="other_2", modules=node_dir / "other", http=HttpAddress("::1", 8081)),
        ),
        graceful_timeout=5.0,
        checkpoint_interval=2.5,
        durable=False,
        max_body=4096,
        heartbeat_timeout=3.0,
    )


def test_defaults(node_dir: Path) -> None:
    cfg = load_config(write(node_dir, MINIMAL))
    assert cfg.data_dir == node_dir / "var"
    assert cfg.cages == (CageConfig(name="c", modules=node_dir / "modules"),)
    cage = cfg.cages[0]
    assert (cage.workers, cage.threads, cage.http) == (1, 4, None)
    assert (cfg.graceful_timeout, cfg.checkpoint_interval, cfg.heartbeat_timeout) == (10, 30, 10)
    assert cfg.durable is True
    assert cfg.max_body == 1 << 20
    assert cfg.cache_size == DEFAULT_CACHE_SIZE  # what every safe had before the key existed
    assert isinstance(cfg.graceful_timeout, float)


@pytest.mark.parametrize("size", [1 << 20, 4 << 20, 64 << 30])
def test_cache_size_bounds_are_accepted(node_dir: Path, size: int) -> None:
    assert load_config(write(node_dir, f"cache_size: {size}\n" + MINIMAL)).cache_size == size


def test_a_bad_cache_size_names_the_range(node_dir: Path) -> None:
    path = write(node_dir, "cache_size: 1000\n" + MINIMAL.lstrip("\n"))
    assert one_error(path) == (
        f"{path}:1: cache_size: expected a number of bytes from 1048576 (1 MiB) to "
        "68719476736 (64 GiB), got 1000 (an integer)"
    )


def test_frozen(node_dir: Path) -> None:
    cfg = load_config(write(node_dir, MINIMAL))
    with pytest.raises(AttributeError):
        cfg.node = "x"  # type: ignore[misc]


def test_paths_are_relative_to_the_config_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (tmp_path / "mods").mkdir()
    write(
        conf,
        """
        node: n
        data_dir: ../state
        cages:
          - name: c
            modules: ../mods
        """,
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config("conf/node.yaml")
    assert cfg.file == conf / "node.yaml"
    assert cfg.file.is_absolute()
    assert cfg.data_dir == tmp_path / "state"
    assert cfg.cages[0].modules == tmp_path / "mods"


def test_absolute_paths_are_kept(node_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    path = write(
        node_dir,
        f"""
        node: n
        data_dir: {elsewhere}/data
        cages:
          - name: c
            modules: {elsewhere}
        """,
    )
    cfg = load_config(path)
    assert cfg.data_dir == elsewhere / "data"
    assert cfg.cages[0].modules == elsewhere


def test_int_where_float_expected_and_anchors_and_merge_keys(node_dir: Path) -> None:
    path = write(
        node_dir,
        """
        node: n
        graceful_timeout: 1
        cages:
          - &base
            name: a
            modules: modules
            threads: 2
          - <<: *base
            name: b
        """,
    )
    cfg = load_config(path)
    assert cfg.graceful_timeout == 1.0
    assert [(c.name, c.threads) for c in cfg.cages] == [("a", 2), ("b", 2)]


def test_an_aliased_cage_is_read_each_time_it_appears(node_dir: Path) -> None:
    path = write(
        node_dir,
        """
        node: n
        cages:
          - &c
            <<: {threads: 3}
            name: same
            modules: modules
          - *c
        """,
    )
    assert errors_of(path) == [
        f"{path}:5: cages[1].name: expected a name unique in the node, "
        "got 'same' (already the name of cages[0])"
    ]


def test_safe_dir_and_module_names(node_dir: Path) -> None:
    mods = node_dir / "modules"
    for name in ("b.py", "a.py", "_private.py", "notes.txt", "__init__.py"):
        (mods / name).write_text("")
    (mods / "pkg.py").mkdir()  # a directory named like a module is not one
    cfg = load_config(write(node_dir, MINIMAL))
    assert cfg.module_names(cfg.cages[0]) == ["a", "b"]
    assert cfg.safe_dir("c", "a") == node_dir / "var" / "safe" / "n1.c.a"


def test_module_file_names_that_no_url_could_reach_are_refused_at_load(node_dir: Path) -> None:
    mods = node_dir / "modules"
    longest = "m" * 64
    for name in ("ok.py", "Mixed_9.py", f"{longest}.py", "_private helper.py", "notes me.txt"):
        (mods / name).write_text("")
    assert load_config(write(node_dir, MINIMAL)).module_names  # all of those are fine
    for name in ("my mod.py", "caf\u00e9.py", "1st.py", "a-b.py", f"{longest}m.py"):
        (mods / name).write_text("")
    path = write(node_dir, MINIMAL)
    expected = (
        f"{path}:4: cages[0].modules: expected module file names matching [A-Za-z_][A-Za-z0-9_]* "
        "(ASCII Python identifiers) of 1 to 64 characters, plus .py, got "
        f"'1st.py', 'a-b.py', 'caf\u00e9.py', {longest + 'm.py'!r}, 'my mod.py' in {mods}"
    )
    assert one_error(path) == expected
    result = check(path)  # `pmnc-runtime check` says the same
    assert (result.returncode, result.stderr) == (2, expected + "\n")


def test_the_sample_config_loads() -> None:
    cfg = load_config(REPO / "config" / "node.yaml")
    assert cfg.node == "node1"
    assert cfg.data_dir == REPO / "var"
    assert cfg.cages == (
        CageConfig(
            name="demo",
            modules=REPO / "examples" / "modules",
            workers=4,
            threads=8,
            http=HttpAddress("127.0.0.1", 8080),
        ),
        CageConfig(
            name="web",
            modules=REPO / "examples" / "webapp" / "modules",
            workers=2,
            threads=8,
            http=HttpAddress("127.0.0.1", 8081),
        ),
    )


# --- HTTP addresses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("0.0.0.0:1", "0.0.0.0", 1),
        ("localhost:65535", "localhost", 65535),
        ("node-1.example.com:80", "node-1.example.com", 80),
        ("[::1]:8080", "::1", 8080),
        ("[::]:9000", "::", 9000),
        ("[fe80::1:2]:443", "fe80::1:2", 443),
    ],
)
def test_http_parse(text: str, host: str, port: int) -> None:
    address = HttpAddress.parse(text)
    assert address == HttpAddress(host, port)
    assert str(address) == text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("127.0.0.1", "no ':PORT'"),
        ("127.0.0.1:", "port '' is not a number"),
        (":8080", "no host before ':'"),
        ("127.0.0.1:0", "port 0 is not in 1..65535"),
        ("127.0.0.1:65536", "port 65536 is not in 1..65535"),
        ("127.0.0.1:80a", "port '80a' is not a number"),
        ("127.0.0.1:-1", "port '-1' is not a number"),
        ("127.0.0.1:\uff18\uff10", "is not a number"),  # fullwidth digits
        ("300.0.0.1:80", "'300.0.0.1' is not an IPv4 address"),
        ("::1:8080", "an IPv6 host needs brackets, as in [::1]:8080"),
        ("[::1:8080", "no ']' closing the IPv6 address"),
        ("[::1]8080", "no ':PORT' after ']'"),
        ("[nonsense]:80", "'nonsense' is not an IPv6 address"),
        ("bad_host:80", "'bad_host' is not a host name"),
        ("http://x:80", "a URL is not an address"),
        ("a:b:80", "'a:b' is not a host name"),
    ],
)
def test_http_parse_refuses(text: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        HttpAddress.parse(text)
    assert why in str(info.value)


def test_bad_http_in_config_names_line_key_and_reason(node_dir: Path) -> None:
    path = write(
        node_dir,
        """
        node: n
        cages:
          - name: c
            modules: modules
            http: localhost:99999
        """,
    )
    assert one_error(path) == (
        f'{path}:5: cages[0].http: expected an address "HOST:PORT" or "[IPV6]:PORT" with '
        "PORT 1..65535, got 'localhost:99999' (port 99999 is not in 1..65535)"
    )


def test_http_sexagesimal_trap_is_read_as_text(node_dir: Path) -> None:
    # YAML 1.1 would read an unquoted 10:80 as the integer 680; the address is meant.
    path = write(node_dir, MINIMAL + "    http: 10:80\n")
    errors = errors_of(path)
    assert len(errors) == 1
    assert "got '10:80' ('10' is not an IPv4 address)" in errors[0]


@pytest.mark.parametrize("value", ["8080", "true", "[127.0.0.1, 80]", "{host: x}", "null"])
def test_http_of_the_wrong_type(node_dir: Path, value: str) -> None:
    error = one_error(write(node_dir, MINIMAL + f"    http: {value}\n"))
    assert error.startswith(f"{node_dir / 'node.yaml'}:5: cages[0].http: expected an address")


def test_duplicate_http_addresses_across_cages(node_dir: Path) -> None:
    path = write(
        node_dir,
        """
        node: n
        cages:
          - name: a
            modules: modules
            http: 127.0.0.1:8080
          - name: b
            modules: modules
            http: 127.0.0.1:8081
          - name: c
            modules: modules
            http: 127.0.0.1:8080
          - name: d
            modules: modules
            http: 0.0.0.0:8081
          - name: e
            modules: modules
            http: "[::1]:8080"
        """,
    )
    assert errors_of(path) == [
        f"{path}:11: cages[2].http: expected an address no other cage listens on, "
        "got '127.0.0.1:8080' (overlaps cages[0].http, 127.0.0.1:8080 at line 5)",
        f"{path}:14: cages[3].http: expected an address no other cage listens on, "
        "got '0.0.0.0:8081' (overlaps cages[1].http, 127.0.0.1:8081 at line 8)",
    ]


# --- what is refused, and how it reads ---------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert one_error(path) == f"{path}: cannot read the config: No such file or directory"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert one_error(tmp_path).startswith(f"{tmp_path}: cannot read the config: ")


def test_error_names_the_file_as_given(node_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(node_dir, "node: n\n")
    monkeypatch.chdir(node_dir)
    assert one_error(Path("node.yaml")).startswith("node.yaml:1: cages: ")


def test_invalid_yaml_names_the_line(node_dir: Path) -> None:
    path = write(node_dir, "node: n\ncages:\n  - name: [unclosed\n")
    error = one_error(path)
    assert error.startswith(f"{path}:4: invalid YAML: ")


def test_tab_indentation_is_invalid_yaml(node_dir: Path) -> None:
    path = write(node_dir, "node: n\ncages:\n\t- name: c\n")
    assert one_error(path).startswith(f"{path}:3: invalid YAML: ")


def test_invalid_utf8(node_dir: Path) -> None:
    path = node_dir / "node.yaml"
    path.write_bytes(b"node: n\ncages: \xff\n")
    assert one_error(path) == (
        f"{path}:2: invalid YAML: unacceptable character #x00ff: invalid start byte"
    )


def test_several_documents_are_refused(node_dir: Path) -> None:
    path = write(node_dir, MINIMAL + "---\nnode: again\n")
    assert one_error(path) == (
        f"{path}:5: invalid YAML: expected a single document in the stream, "
        "but found another document"
    )


def test_python_tags_are_refused_not_run(node_dir: Path) -> None:
    path = write(node_dir, "node: !!python/object/apply:os.system [echo pwned]\n" + MINIMAL[9:])
    error = one_error(path)
    assert error.startswith(f"{path}:1: node: expected a name")


@pytest.mark.parametrize(
    ("text", "got"),
    [
        ("", "an empty file"),
        ("# only a comment\n", "an empty file"),
        ("- a\n- b\n", "a list"),
        ("just a string\n", "'just a string' (a string)"),
        ("42\n", "42 (an integer)"),
    ],
)
def test_top_level_must_be_a_mapping(node_dir: Path, text: str, got: str) -> None:
    path = write(node_dir, text)
    error = one_error(path)
    assert error.startswith(f"{path}")
    assert error.endswith(f"expected a mapping of node settings, got {got}")


def test_missing_required_keys(node_dir: Path) -> None:
    path = write(
        node_dir,
        """
        data_dir: var
        """,
    )
    assert errors_of(path) == [
        f"{path}:1: node: expected a name of 1 to 64 characters from [A-Za-z0-9_-], got nothing "
        "(a required key is missing)",
        f"{path}:1: cages: expected a non-empty list of cages, got nothing "
        "(a required key is missing)",
    ]


def test_missing_cage_keys_name_the_cage_line(node_dir: Path) -> None:
    path = write(
        node_dir,
        """
        node: n
        cages:
          - workers: 2
        """,
    )
    errors = errors_of(path)
    assert errors == [
        f"{path}:3: cages[0].name: expected a name of 1 to 64 characters from [A-Za-z0-9_-], "
        "got nothing (a required key is missing)",
        f"{path}:3: cages[0].modules: expected an existing directory of modules, "
        "got nothing (a required key is missing)",
    ]


@pytest.mark.parametrize(
    ("cages", "got"),
    [
        ("[]", "an empty list"),
        ("", "null"),
        ("demo", "'demo' (a string)"),
        ("{name: demo, modules: modules}", "a mapping"),
    ],
)
def test_cages_must_be_a_non_empty_list(node_dir: Path, cages: str, got: str) -> None:
    path = write(node_dir, f"node: n\ncages: {cages}\n")
    assert one_error(path) == f"{path}:2: cages: expected a non-empty list of cages, got {got}"


def test_cage_must_be_a_mapping(node_dir: Path) -> None:
    path = write(node_dir, MINIMAL + "  - just-a-name\n")
    assert one_error(path) == (
        f"{path}:5: cages[1]: expected a mapping of cage settings, got 'just-a-name' (a string)"
    )


def test_unknown_top_level_key(node_dir: Path) -> None:
    path = write(node_dir, "datadir: x\n" + MINIMAL.lstrip("\n"))
    assert one_error(path) == (
        f"{path}:1: datadir: expected one of node, data_dir, cages, graceful_timeout, "
        "checkpoint_interval, durable, max_body, heartbeat_timeout, keepalive_timeout, "
        "request_timeout, max_connections, cache_size, replication, got an unknown key; "
        "did you mean 'data_dir'?"
    )


def test_unknown_cage_key(node_dir: Path) -> None:
    path = write(node_dir, MINIMAL + "    wrokers: 2\n    colour: blue\n")
    assert errors_of(path) == [
        f"{path}:5: cages[0].wrokers: expected one of name, modules, workers, threads, http, "
        "got an unknown key; did you mean 'workers'?",
        f"{path}:6: cages[0].colour: expected one of name, modules, workers, threads, http, "
        "got an unknown key",
    ]


def test_non_string_key(node_dir: Path) -> None:
    path = write(node_dir, MINIMAL + "7: x\n")
    assert one_error(path) == f"{path}:5: (top level): expected string keys, got 7 (an integer)"


def test_duplicate_key(node_dir: Path) -> None:
    path = write(node_dir, MINIMAL + "node: n2\n")
    assert (
        one_error(path) == f"{path}:5: node: expected each key once, got it again (first at line 1)"
    )


@pytest.mark.parametrize(
    ("key", "value", "expected", "got"),
    [
        ("workers", "true", "an integer from 1 to 256", "true (a boolean)"),
        ("workers", "yes", "an integer from 1 to 256", "true (a boolean)"),
        ("workers", "0", "an integer from 1 to 256", "0 (an integer)"),
        ("workers", "257", "an integer from 1 to 256", "257 (an integer)"),
        ("workers", "-1", "an integer from 1 to 256", "-1 (an integer)"),
        ("workers", "2.0", "an integer from 1 to 256", "2.0 (a number)"),
        ("workers", '"4"', "an integer from 1 to 256", "'4' (a string)"),
        ("workers", "", "an integer from 1 to 256", "null"),
        ("workers", "[4]", "an integer from 1 to 256", "a list"),
        ("threads", "false", "an integer from 1 to 1024", "false (a boolean)"),
        ("threads", "0", "an integer from 1 to 1024", "0 (an integer)"),
        ("threads", "100000", "an integer from 1 to 1024", "100000 (an integer)"),
        (
            "name",
            "bad name",
            "a name of 1 to 64 characters from [A-Za-z0-9_-]",
            "'bad name' (a string)",
        ),
        ("name", "a.b", "a name of 1 to 64 characters from [A-Za-z0-9_-]", "'a.b' (a string)"),
        ("name", "x" * 65, "a name of 1 to 64 characters from [A-Za-z0-9_-]", "(a string)"),
        ("name", "12", "a name of 1 to 64 characters from [A-Za-z0-9_-]", "12 (an integer)"),
        ("name", '""', "a name of 1 to 64 characters from [A-Za-z0-9_-]", "'' (a string)"),
    ],
)
def test_bad_cage_values(node_dir: Path, key: str, value: str, expected: str, got: str) -> None:
    text = MINIMAL if key != "name" else MINIMAL.replace("name: c", f"name: {value}")
    if key != "name":
        text += f"    {key}: {value}\n"
    path = write(node_dir, text)
    line = 3 if key == "name" else 5
    error = one_error(path)
    assert error.startswith(f"{path}:{line}: cages[0].{key}: expected {expected}, got ")
    assert error.endswith(got)


@pytest.mark.parametrize(
    ("key", "value", "got"),
    [
        ("node", "node 1", "'node 1' (a string)"),
        ("node", "", "null"),
        ("node", "ünïcode", "'ünïcode' (a string)"),
        ("data_dir", "5", "5 (an integer)"),
        ("data_dir", '""', "'' (a string)"),
        ("graceful_timeout", '"10"', "'10' (a string)"),
        ("graceful_timeout", "true", "true (a boolean)"),
        ("graceful_timeout", "0", "0 (an integer)"),
        ("graceful_timeout", "-1.5", "-1.5 (a number)"),
        ("graceful_timeout", "3601", "3601 (an integer)"),
        ("graceful_timeout", ".inf", "inf (a number)"),
        ("graceful_timeout", ".nan", "nan (a number)"),
        ("checkpoint_interval", "0.0", "0.0 (a number)"),
        ("heartbeat_timeout", "-3", "-3 (an integer)"),
        ("durable", "1", "1 (an integer)"),
        ("durable", '"true"', "'true' (a string)"),
        ("max_body", "true", "true (a boolean)"),
        ("max_body", "0", "0 (an integer)"),
        ("max_body", "1.5", "1.5 (a number)"),
        ("max_body", "1MB", "'1MB' (a string)"),
        ("cache_size", "1048575", "1048575 (an integer)"),
        ("cache_size", "68719476737", "68719476737 (an integer)"),
        ("cache_size", "0", "0 (an integer)"),
        ("cache_size", "true", "true (a boolean)"),
        ("cache_size", "4194304.0", "4194304.0 (a number)"),
        ("cache_size", "4MiB", "'4MiB' (a string)"),
    ],
)
def test_bad_node_values(node_dir: Path, key: str, value: str, got: str) -> None:
    text = MINIMAL.replace("node: n1", "") if key == "node" else MINIMAL
    path = write(node_dir, f"{key}: {value}\n" + text.lstrip("\n"))
    error = one_error(path)
    assert error.startswith(f"{path}:1: {key}: expected ")
    assert error.endswith(f", got {got}")


def test_modules_directory_missing_or_a_file(node_dir: Path) -> None:
    (node_dir / "file.py").write_text("")
    path = write(
        node_dir,
        """
        node: n
        cages:
          - name: a
            modules: nowhere
          - name: b
            modules: file.py
          - name: c
            modules: 3
        """,
    )
    assert errors_of(path) == [
        f"{path}:4: cages[0].modules: expected an existing directory of modules, "
        f"got 'nowhere' ({node_dir / 'nowhere'} does not exist)",
        f"{path}:6: cages[1].modules: expected an existing directory of modules, "
        f"got 'file.py' ({node_dir / 'file.py'} is not a directory)",
        f"{path}:8: cages[2].modules: expected an existing directory of modules, "
        "got 3 (an integer)",
    ]


def test_duplicate_cage_names(node_dir: Path) -> None:
    path = write(node_dir, MINIMAL + "  - name: c\n    modules: modules\n")
    assert one_error(path) == (
        f"{path}:5: cages[1].name: expected a name unique in the node, "
        "got 'c' (already the name of cages[0])"
    )


def test_every_error_is_reported_at_once_in_file_order(node_dir: Path) -> None:
    path = write(
        node_dir,
        """
        node: bad name
        durable: 1
        extra: true
        cages:
          - name: ok
            modules: modules
            workers: yes
            http: "::1:80"
          - name: ok
            modules: missing
            threads: 0
        """,
    )
    errors = errors_of(path)
    assert [e.split(": ")[0:2] for e in errors] == [
        [f"{path}:1", "node"],
        [f"{path}:2", "durable"],
        [f"{path}:3", "extra"],
        [f"{path}:7", "cages[0].workers"],
        [f"{path}:8", "cages[0].http"],
        [f"{path}:9", "cages[1].name"],
        [f"{path}:10", "cages[1].modules"],
        [f"{path}:11", "cages[1].threads"],
    ]


def test_config_error_pickles_with_its_list() -> None:
    error = pickle.loads(pickle.dumps(ConfigError(["a", "b"])))
    assert error.errors == ["a", "b"]
    assert str(error) == "a\nb"


# --- ports -------------------------------------------------------------------------------------


def test_check_ports_reports_a_port_in_use(node_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        free = free_port()
        path = write(
            node_dir,
            f"""
            node: n
            cages:
              - name: a
                modules: modules
              - name: b
                modules: modules
                http: 127.0.0.1:{free}
              - name: c
                modules: modules
                http: 127.0.0.1:{port}
            """,
        )
        cfg = load_config(path)
        errors = check_ports(cfg)
    assert len(errors) == 1
    assert errors[0].startswith(
        f"{path}:10: cages[2].http: expected an address this host can listen on, "
        f"got '127.0.0.1:{port}' ("
    )
    assert "in use" in errors[0]
    assert check_ports(cfg) == []  # released: nothing of check_ports stays bound


def test_check_ports_without_origin_names_the_file(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cfg = NodeConfig(
            file=tmp_path / "x.yaml",
            node="n",
            data_dir=tmp_path,
            cages=(CageConfig("c", tmp_path, http=HttpAddress("127.0.0.1", port)),),
        )
        (error,) = check_ports(cfg)
    assert error.startswith(f"{tmp_path / 'x.yaml'}: cages[0].http: expected an address")


# --- pmnc-runtime check ------------------------------------------------------------------------


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pmnc.runtime.cli", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_good_config(node_dir: Path) -> None:
    (node_dir / "modules" / "counter.py").write_text("def inc():\n    return 1\n")
    (node_dir / "modules" / "echo.py").write_text("def echo(x):\n    return x\n")
    path = write(node_dir, MINIMAL + f"    http: 127.0.0.1:{free_port()}\n")
    result = check(path)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"{path}: node n1: 1 cage, 2 modules, ok\n"
    assert not (node_dir / "var").exists()  # check creates nothing


def test_check_lists_every_error_and_starts_nothing(node_dir: Path) -> None:
    marker = node_dir / "ran"
    (node_dir / "modules" / "bad.py").write_text(f"open({str(marker)!r}, 'w')\ndef f(:\n")
    path = write(
        node_dir,
        """
        node: bad name
        cages:
          - name: c
            modules: modules
            workers: true
            wrokers: 2
        """,
    )
    result = check(path)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert [line.split(": ")[:2] for line in lines] == [
        [f"{path}:1", "node"],
        [f"{path}:5", "cages[0].workers"],
        [f"{path}:6", "cages[0].wrokers"],
    ]
    assert not marker.exists()
    assert not (node_dir / "var").exists()


def test_check_reports_modules_that_do_not_compile_without_running_them(node_dir: Path) -> None:
    marker = node_dir / "ran"
    mods = node_dir / "modules"
    (mods / "bad.py").write_text(f"open({str(marker)!r}, 'w')\n\ndef f(:\n    pass\n")
    (mods / "good.py").write_text(f"open({str(marker)!r}, 'w')\n")
    (mods / "nul.py").write_bytes(b"x = 1\0\n")
    result = check(write(node_dir, MINIMAL))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"{mods / 'bad.py'}:3: cages[0].modules: expected a module that")
    # Python 3.12 reports null bytes as a SyntaxError, 3.11 as a ValueError: either is listed.
    assert lines[1].startswith(f"{mods / 'nul.py'}: cages[0].modules: expected a ")
    assert "null bytes" in lines[1]
    assert not marker.exists()


def test_check_reports_port_in_use(node_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        path = write(node_dir, MINIMAL + f"    http: 127.0.0.1:{port}\n")
        result = check(path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"{path}:5: cages[0].http: expected an address this host")


def test_check_reports_a_data_dir_that_cannot_be_created(node_dir: Path) -> None:
    (node_dir / "blocker").write_text("")
    path = write(node_dir, "data_dir: blocker/var\n" + MINIMAL.lstrip("\n"))
    result = check(path)
    assert result.returncode == 2
    assert result.stderr == (
        f"{path}:1: data_dir: expected a directory where safes can be created, "
        f"got '{node_dir / 'blocker' / 'var'}' ({node_dir / 'blocker'} is not a directory)\n"
    )


def test_check_reports_a_safe_path_that_is_a_file(node_dir: Path) -> None:
    (node_dir / "modules" / "m.py").write_text("")
    safe_root = node_dir / "var" / "safe"
    safe_root.mkdir(parents=True)
    (safe_root / "n1.c.m").write_text("")
    result = check(write(node_dir, MINIMAL))
    assert result.returncode == 2
    assert f"(safe {safe_root / 'n1.c.m'} is not a directory)" in result.stderr


def test_check_missing_file(tmp_path: Path) -> None:
    result = check(tmp_path / "absent.yaml")
    assert result.returncode == 2
    assert result.stderr == (
        f"{tmp_path / 'absent.yaml'}: cannot read the config: No such file or directory\n"
    )


def test_check_data_dir_not_writable(node_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As root os.access says yes to everything but a read-only file system: mock it instead.
    seen: list[str] = []

    def access(path: str | os.PathLike[str], mode: int) -> bool:
        seen.append(os.fspath(path))
        return False

    cfg = load_config(write(node_dir, "data_dir: a/b/c\n" + MINIMAL.lstrip("\n")))
    with monkeypatch.context() as m:
        m.setattr(os, "access", access)
        errors = cmd_check._check_data_dir(cfg)
    assert errors == [
        f"{cfg.file}:1: data_dir: expected a directory where safes can be created, "
        f"got '{node_dir / 'a' / 'b' / 'c'}' ({node_dir} is not writable)"
    ]
    assert seen == [str(node_dir)]  # the nearest existing ancestor decides
    assert not (node_dir / "a").exists()


def test_check_data_dir_creatable_deep_path(node_dir: Path) -> None:
    cfg = load_config(write(node_dir, "data_dir: x/y/z\n" + MINIMAL.lstrip("\n")))
    assert cmd_check._check_data_dir(cfg) == []
    assert not (node_dir / "x").exists()
