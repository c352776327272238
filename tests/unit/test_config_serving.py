"""The serving keys of a node config: `keepalive_timeout`, `request_timeout`, `max_connections`.

Validated like every other key (README, "Config"): the defaults when absent, the exact types
loaded, and each wrong value refused as `FILE:LINE: key: expected X, got Y` (a boolean is not a
number, zero and negative values are not limits).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pmnc.runtime.config import ConfigError, NodeConfig, load_config

MINIMAL = """
node: n1
cages:
  - name: c
    modules: modules
"""


def write(directory: Path, head: str) -> Path:
    (directory / "modules").mkdir(exist_ok=True)
    path = directory / "node.yaml"
    path.write_text(textwrap.dedent(head) + MINIMAL.lstrip("\n"))
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.errors


def test_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert (cfg.keepalive_timeout, cfg.request_timeout, cfg.max_connections) == (5, 30, 1024)
    assert isinstance(cfg.keepalive_timeout, float) and isinstance(cfg.request_timeout, float)
    assert type(cfg.max_connections) is int
    # The dataclass defaults say the same as the loader (a config built in code).
    defaults = NodeConfig(file=tmp_path, node="n", data_dir=tmp_path, cages=())
    assert (defaults.keepalive_timeout, defaults.request_timeout, defaults.max_connections) == (
        5,
        30,
        1024,
    )


def test_values_load_with_their_types(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, "keepalive_timeout: 0.25\nrequest_timeout: 2\nmax_connections: 8\n")
    )
    assert (cfg.keepalive_timeout, cfg.request_timeout, cfg.max_connections) == (0.25, 2.0, 8)
    assert type(cfg.request_timeout) is float  # an integer of seconds is read as a float


@pytest.mark.parametrize(
    ("key", "value", "got"),
    [
        ("keepalive_timeout", "true", "true (a boolean)"),
        ("keepalive_timeout", "no", "false (a boolean)"),
        ("keepalive_timeout", "0", "0 (an integer)"),
        ("keepalive_timeout", "-1", "-1 (an integer)"),
        ("keepalive_timeout", "-0.5", "-0.5 (a number)"),
        ("keepalive_timeout", '"5"', "'5' (a string)"),
        ("keepalive_timeout", "5s", "'5s' (a string)"),
        ("keepalive_timeout", ".inf", "inf (a number)"),
        ("keepalive_timeout", ".nan", "nan (a number)"),
        ("keepalive_timeout", "3601", "3601 (an integer)"),
        ("keepalive_timeout", "", "null"),
        ("keepalive_timeout", "[5]", "a list"),
        ("request_timeout", "true", "true (a boolean)"),
        ("request_timeout", "0.0", "0.0 (a number)"),
        ("request_timeout", "-30", "-30 (an integer)"),
        ("request_timeout", '"30"', "'30' (a string)"),
        ("request_timeout", ".inf", "inf (a number)"),
        ("request_timeout", "{s: 1}", "a mapping"),
        ("max_connections", "true", "true (a boolean)"),
        ("max_connections", "yes", "true (a boolean)"),
        ("max_connections", "0", "0 (an integer)"),
        ("max_connections", "-8", "-8 (an integer)"),
        ("max_connections", "8.0", "8.0 (a number)"),
        ("max_connections", "1.5", "1.5 (a number)"),
        ("max_connections", '"1024"', "'1024' (a string)"),
        ("max_connections", ".inf", "inf (a number)"),
        ("max_connections", "", "null"),
    ],
)
def test_wrong_values_are_refused_naming_file_line_and_key(
    tmp_path: Path, key: str, value: str, got: str
) -> None:
    path = write(tmp_path, f"{key}: {value}\n")
    errors = errors_of(path)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{path}:1: {key}: expected "), errors[0]
    assert errors[0].endswith(f", got {got}"), errors[0]


def test_every_serving_error_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "keepalive_timeout: 0\nrequest_timeout: false\nmax_connections: -1\n")
    errors = errors_of(path)
    assert [e.split(": expected")[0] for e in errors] == [
        f"{path}:1: keepalive_timeout",
        f"{path}:2: request_timeout",
        f"{path}:3: max_connections",
    ]


def test_a_misspelt_key_is_refused_not_ignored(tmp_path: Path) -> None:
    (error,) = errors_of(write(tmp_path, "keepalive_timeouts: 5\n"))
    assert "keepalive_timeouts" in error, error
