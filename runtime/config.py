"""The node's YAML, parsed once into frozen, typed dataclasses.

Everything downstream (supervisor, workers, tools) trusts a `NodeConfig` without checking it
again, so every check happens here, before anything starts, and every problem is reported at
once: a user fixing a config should not have to run the command once per typo. Each error reads
"FILE:LINE: key.path: expected X, got Y". To know the line of each key we compose the YAML node
graph ourselves (SafeLoader, so no tag can run code) instead of calling `yaml.safe_load`, which
throws line numbers away.

Side effects are kept out: `load_config` reads one file and stats directories; binding the HTTP
ports (`check_ports`) is left to `pmnc-runtime check`.

The optional `replication:` section (`ReplicationConfig`) makes the node one of a group whose
safes are copies of each other: every safe takes its own port, `replication.address.port + i`
for the i-th (cage, module) in sorted order (`safe_sites`), on every node of the group, so the
group's nodes run the same cages and modules, at most MAX_REPLICATED_SAFES of them.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pmnc.safe import DEFAULT_CACHE_SIZE
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = [
    "ACK_POLICIES",
    "MAX_CACHE_SIZE",
    "MAX_REPLICATED_SAFES",
    "MIN_CACHE_SIZE",
    "CageConfig",
    "ConfigError",
    "HttpAddress",
    "NodeConfig",
    "PeerConfig",
    "ReplicationConfig",
    "check_ports",
    "dump_config",
    "load_config",
    "load_config_or_report",
    "locate",
    "replication_errors",
    "safe_sites",
]

ACK_POLICIES = ("quorum", "all", "one", "none")
# Each safe of a replicated node listens on its own port, `replication.address.port + i`: two
# nodes on one machine whose addresses are 100 apart never collide, whatever their modules.
MAX_REPLICATED_SAFES = 100
# The node-level `cache_size` (bytes): each safe's cache maximum. 1 MiB holds only 64 of the
# 16 KiB pages (docs/berkeleydb.md, "Page size and cache"); at 64 GiB the mutex region alone,
# written whole when the regions are created (about 5 % of the maximum, docs/footprint.md), is
# some 3 GiB per safe (extrapolated).
MIN_CACHE_SIZE = 1 << 20
MAX_CACHE_SIZE = 64 << 30

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NAME_EXPECTED = "a name of 1 to 64 characters from [A-Za-z0-9_-]"
# A module's name is the stem of its file: it is a URL path segment and part of its safe's
# directory name, and a module is a Python module, so ASCII identifiers (64 characters at most).
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_MODULE_EXPECTED = (
    "module file names matching [A-Za-z_][A-Za-z0-9_]* (ASCII Python identifiers) "
    "of 1 to 64 characters, plus .py"
)
_HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
_PORT = re.compile(r"[0-9]{1,5}")
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"

T = TypeVar("T")


class ConfigError(Exception):
    """An invalid node config: `errors` lists every problem found, one line each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)

    def __reduce__(self) -> tuple[type[ConfigError], tuple[list[str]]]:
        # Default pickling would call ConfigError(str(self)): keep the list across processes.
        return (type(self), (self.errors,))


@dataclass(frozen=True)
class HttpAddress:
    """Where a cage listens: `host` is bare (no brackets around IPv6), `port` is 1..65535."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HttpAddress:
        """Parse "host:port" or "[ipv6]:port"; ValueError saying what is wrong otherwise."""
        if "/" in text:
            raise ValueError("a URL is not an address: no scheme or path, just HOST:PORT")
        if text.startswith("["):
            end = text.find("]")
            if end < 0:
                raise ValueError("no ']' closing the IPv6 address")
            host, rest = text[1:end], text[end + 1 :]
            if not rest.startswith(":"):
                raise ValueError("no ':PORT' after ']'")
            port_text = rest[1:]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{host!r} is not an IPv6 address") from None
        else:
            host, colon, port_text = text.rpartition(":")
            if not colon:
                raise ValueError("no ':PORT'")
            if not host:
                raise ValueError("no host before ':'")
            if ":" in host and _is_ipv6(host):
                raise ValueError("an IPv6 host needs brackets, as in [::1]:8080")
            if re.fullmatch(r"[0-9.]+", host):
                try:
                    ipaddress.IPv4Address(host)
                except ValueError:
                    raise ValueError(f"{host!r} is not an IPv4 address") from None
            elif not _HOSTNAME.fullmatch(host):
                raise ValueError(f"{host!r} is not a host name")
        if not _PORT.fullmatch(port_text):
            raise ValueError(f"port {port_text!r} is not a number")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is not in 1..65535")
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class CageConfig:
    """One cage: a set of application modules served by `workers` processes."""

    name: str
    modules: Path
    workers: int = 1
    threads: int = 4
    http: HttpAddress | None = None


@dataclass(frozen=True)
class PeerConfig:
    """Another node of the replication group: where its safes replicate and its cages listen.

    `address` is the base of its replication ports (its safe number i listens on
    `address.port + i`, as this node's do); `http` maps each of its cages that may be called
    (`pmnc("<node>.<cage>")`, docs/calls.md) to its HTTP address. A group's nodes run the same
    cages and modules, so `http` may name only cages this node has.
    """

    node: str
    address: HttpAddress
    # Left out of the hash (a dict has none); compared like every other field.
    http: Mapping[str, HttpAddress] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ReplicationConfig:
    """The node-level `replication:` section: this node's place in a group of nodes whose
    safes are copies of each other, kept by Berkeley DB's replication manager (repmgr).

    `address` is this node's replication base address (safe number i listens on
    `address.port + i`, see `safe_sites`); `ack` how many peers must have a write before it
    returns (one of ACK_POLICIES); `priority` this node's weight in master elections, 0 for a
    node that must never be master; `peers` every other node of the group (none: a group of one).
    """

    address: HttpAddress
    ack: str = "quorum"
    priority: int = 100
    peers: tuple[PeerConfig, ...] = ()


@dataclass(frozen=True)
class _Origin:
    """Where a loaded config came from, so later checks can name FILE:LINE like the loader."""

    label: str
    lines: Mapping[str, int]


@dataclass(frozen=True)
class NodeConfig:
    """A validated node: paths are absolute, values in range; nothing here needs rechecking."""

    file: Path
    node: str
    data_dir: Path
    cages: tuple[CageConfig, ...]
    graceful_timeout: float = 10.0
    checkpoint_interval: float = 30.0
    durable: bool = True
    max_body: int = 1 << 20
    heartbeat_timeout: float = 10.0
    keepalive_timeout: float = 5.0
    request_timeout: float = 30.0
    max_connections: int = 1024
    # Every safe's Berkeley DB cache maximum, applied where its regions are created (a new safe,
    # or one recovered after a crash): docs/berkeleydb.md "Region settings belong to the creator".
    cache_size: int = DEFAULT_CACHE_SIZE
    replication: ReplicationConfig | None = None
    _origin: _Origin | None = field(default=None, compare=False, repr=False)

    def safe_dir(self, cage: str, module: str) -> Path:
        """The directory of one module's safe: <data_dir>/safe/<node>.<cage>.<module>."""
        return self.data_dir / "safe" / f"{self.node}.{cage}.{module}"

    def module_names(self, cage: CageConfig) -> list[str]:
        """The cage's application modules: sorted stems of its *.py files, minus private ones."""
        return sorted(p.stem for p in _module_files(cage.modules))

    def safes(self) -> list[tuple[str, str]]:
        """Every (cage, module) of the node, sorted: a safe's index here is its replication
        port's offset from `replication.address.port` (`safe_sites`)."""
        return sorted((cage.name, name) for cage in self.cages for name in self.module_names(cage))


def _module_files(directory: Path) -> list[Path]:
    """The files loaded as modules: *.py, not starting with "_" (private helpers)."""
    return [
        p
        for p in directory.iterdir()
        if p.suffix == ".py" and not p.name.startswith("_") and p.is_file()
    ]


def locate(cfg: NodeConfig, key: str) -> str:
    """ "FILE:LINE" (or "FILE" when unknown) of a key path, for errors found after loading."""
    if cfg._origin is None:
        return str(cfg.file)
    line = cfg._origin.lines.get(key)
    return cfg._origin.label if line is None else f"{cfg._origin.label}:{line}"


# --- loading -----------------------------------------------------------------------------------


class _Missing:
    """Marks a key that is absent (distinct from an explicit null)."""


_MISSING = _Missing()


def _describe(value: object) -> str:
    """A value as the user wrote it, plus its YAML kind, for the "got Y" part of an error."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int):
        return f"{value} (an integer)"
    if isinstance(value, float):
        return f"{value} (a number)"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return f"{text!r} (a string)"
    return f"{value!r} (a {type(value).__name__})"


class _Reader:
    """Walks the composed YAML node graph, converting and checking values, collecting errors."""

    def __init__(self, label: str, loader: yaml.SafeLoader) -> None:
        self.label = label
        self.loader = loader
        self.found: list[tuple[int, str]] = []
        self.lines: dict[str, int] = {}
        self.merged: dict[int, int] = {}  # id(mapping node) -> how many of its entries merged
        self.cage_names: list[str] = []  # every cage name read, valid cage or not

    @property
    def errors(self) -> list[str]:
        """Every error so far, in document order (a stable sort keeps ties in check order)."""
        return [message for _, message in sorted(self.found, key=lambda f: f[0])]

    def error(self, node: Node | None, path: str, message: str) -> None:
        line = 0 if node is None else node.start_mark.line + 1
        where = f"{self.label}:{line}" if line else self.label
        self.found.append((line, f"{where}: {path}: {message}" if path else f"{where}: {message}"))

    def expected(self, node: Node, path: str, what: str, got: str | None = None) -> None:
        self.error(node, path, f"expected {what}, got {got or self.describe(node)}")

    def describe(self, node: Node) -> str:
        if isinstance(node, MappingNode):
            return "a mapping" if node.tag == _MAP_TAG else f"a mapping tagged {node.tag}"
        if isinstance(node, SequenceNode):
            return "a list" if node.tag == _SEQ_TAG else f"a list tagged {node.tag}"
        try:
            return _describe(self.scalar(node))
        except yaml.YAMLError:
            return f"{node.value!r} tagged {node.tag}"

    def scalar(self, node: Node) -> object:
        """The Python value of a scalar node, as `yaml.safe_load` would build it."""
        value: object = self.loader.construct_object(node, deep=True)
        return value

    def mapping(
        self, node: Node, path: str, allowed: tuple[str, ...], what: str
    ) -> dict[str, Node] | None:
        """The string-keyed entries of a mapping; unknown, duplicate or odd keys are errors."""
        if not isinstance(node, MappingNode) or node.tag != _MAP_TAG:
            self.expected(node, path, what)
            return None
        merged = self.merged.get(id(node))
        if merged is None:  # first visit (an aliased mapping is the same node, flattened once)
            explicit = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
            try:
                self.loader.flatten_mapping(node)  # resolve "<<" merge keys as safe_load would
            except yaml.YAMLError as e:
                self.expected(node, path, what, f"an invalid merge ({getattr(e, 'problem', e)})")
                return None
            # flatten_mapping puts the merged entries first; the explicit ones override them.
            merged = self.merged[id(node)] = len(node.value) - explicit
        entries: dict[str, Node] = {}
        seen: dict[str, int] = {}
        for index, (key_node, value_node) in enumerate(node.value):
            key: object = None
            if isinstance(key_node, ScalarNode):
                try:
                    key = self.scalar(key_node)
                except yaml.YAMLError:
                    key = None
            if not isinstance(key, str):
                self.expected(
                    key_node, path or "(top level)", "string keys", self.describe(key_node)
                )
                continue
            key_path = f"{path}.{key}" if path else key
            line = key_node.start_mark.line + 1
            if index >= merged:
                if key in seen:
                    self.expected(
                        key_node, key_path, "each key once", f"it again (first at line {seen[key]})"
                    )
                    continue
                seen[key] = line
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                self.error(
                    key_node,
                    key_path,
                    f"expected one of {', '.join(allowed)}, got an unknown key{hint}",
                )
                continue
            self.lines[key_path] = line
            entries[key] = value_node
        return entries

    def value(
        self,
        entries: Mapping[str, Node],
        prefix: str,
        key: str,
        what: str,
        convert: Callable[[object], T | None],
    ) -> T | _Missing | None:
        """Convert one entry: `_MISSING` if absent, None (and an error) if invalid."""
        path = f"{prefix}.{key}" if prefix else key
        node = entries.get(key)
        if node is None:
            return _MISSING
        got: object = _MISSING
        if isinstance(node, ScalarNode):
            try:
                got = self.scalar(node)
            except yaml.YAMLError as e:
                self.expected(node, path, what, f"{node.value!r} ({getattr(e, 'problem', e)})")
                return None
        converted = None if got is _MISSING else convert(got)
        if converted is None:
            self.expected(node, path, what)
        return converted

    def required(
        self,
        entries: Mapping[str, Node],
        prefix: str,
        key: str,
        what: str,
        convert: Callable[[object], T | None],
        *,
        parent: Node,
    ) -> T | None:
        """Like `value`, but a missing key is an error reported at its parent mapping's line."""
        got = self.value(entries, prefix, key, what, convert)
        if isinstance(got, _Missing):
            path = f"{prefix}.{key}" if prefix else key
            self.expected(parent, path, what, "nothing (a required key is missing)")
            return None
        return got


def _name(value: object) -> str | None:
    return value if isinstance(value, str) and _NAME.fullmatch(value) else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _boolean(value: object) -> bool | None:
    return value if isinstance(value, bool) else None


def _integer(low: int, high: int) -> Callable[[object], int | None]:
    def convert(value: object) -> int | None:
        # bool is an int subclass: `workers: yes` must not mean one worker.
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        return value if ok else None  # type: ignore[return-value]

    return convert


def _seconds(high: float) -> Callable[[object], float | None]:
    def convert(value: object) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        number = float(value)
        return number if math.isfinite(number) and 0 < number <= high else None

    return convert


_NODE_KEYS = (
    "node",
    "data_dir",
    "cages",
    "graceful_timeout",
    "checkpoint_interval",
    "durable",
    "max_body",
    "heartbeat_timeout",
    "keepalive_timeout",
    "request_timeout",
    "max_connections",
    "cache_size",
    "replication",
)
_CAGE_KEYS = ("name", "modules", "workers", "threads", "http")
_REPLICATION_KEYS = ("address", "ack", "priority", "peers")
_PEER_KEYS = ("node", "address", "http")


def load_config(path: str | os.PathLike[str]) -> NodeConfig:
    """Read and validate a node config; ConfigError listing every problem if it is not valid."""
    label = os.fspath(path)
    file = Path(os.path.abspath(label))
    base = file.parent
    try:
        with open(file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError([f"{label}: cannot read the config: {e.strerror or e}"]) from None
    loader, root = _compose(label, data)
    try:
        if root is None:
            raise ConfigError([f"{label}: expected a mapping of node settings, got an empty file"])
        reader = _Reader(label, loader)
        cfg = _read_node(reader, root, file, base)
    finally:
        loader.dispose()
    if cfg is not None and not reader.errors:
        # The ports a replicated node takes depend on how many modules it has: checked here,
        # where the module directories have been listed, with the same FILE:LINE as the rest.
        for key, message in _replication_problems(cfg, len(cfg.safes())):
            reader.found.append((reader.lines.get(key, 0), f"{locate(cfg, key)}: {key}: {message}"))
    if reader.errors or cfg is None:
        raise ConfigError(reader.errors)
    return cfg


def load_config_or_report(path: str | os.PathLike[str]) -> NodeConfig | None:
    """`load_config`, or None having printed every error to stderr, one per line (for the CLI's
    subcommands, which then exit 2)."""
    try:
        return load_config(path)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return None


def dump_config(cfg: NodeConfig) -> str:
    """`cfg` as YAML that `load_config` reads back to an equal NodeConfig (paths absolute).

    For tools that run a node on a changed copy of a config (`pmnc-runtime torture`: a scratch
    data_dir, modules and ports): change it with `dataclasses.replace`, write it with this, and
    the key names, the address format and the safe paths (`NodeConfig.safe_dir`) stay this
    module's. Every key the loader knows is written, so a new node key is carried over as soon
    as it is in `_NODE_KEYS` (tests/unit/test_config_dump.py round-trips every one).
    """
    document: dict[str, object] = {}
    for key in _NODE_KEYS:
        value = getattr(cfg, key)
        if key == "cages":
            value = [_cage_document(cage) for cage in cfg.cages]
        elif key == "replication":
            if value is None:
                continue  # optional: a node on its own
            value = _replication_document(value)
        elif isinstance(value, Path):
            value = str(value)
        document[key] = value
    return yaml.safe_dump(document, sort_keys=False)


def _cage_document(cage: CageConfig) -> dict[str, object]:
    entry: dict[str, object] = {}
    for key in _CAGE_KEYS:
        value = getattr(cage, key)
        if value is None:
            continue  # an optional key left out (no http)
        entry[key] = str(value) if isinstance(value, Path | HttpAddress) else value
    return entry


def _replication_document(replication: ReplicationConfig) -> dict[str, object]:
    return {
        "address": str(replication.address),
        "ack": replication.ack,
        "priority": replication.priority,
        "peers": [
            {
                "node": peer.node,
                "address": str(peer.address),
                "http": {cage: str(address) for cage, address in peer.http.items()},
            }
            for peer in replication.peers
        ],
    }


def _compose(label: str, data: bytes) -> tuple[yaml.SafeLoader, Node | None]:
    """Compose the one YAML document into nodes (which keep their lines); ConfigError if bad.

    Bytes, not text: the YAML reader detects the encoding (UTF-8/16 BOM) and reports bad bytes.
    """
    try:
        loader = yaml.SafeLoader(data)
        return loader, loader.get_single_node()
    except yaml.reader.ReaderError as e:
        line = data.count(b"\n", 0, e.position) + 1
        reason = str(e).splitlines()[0]
        raise ConfigError([f"{label}:{line}: invalid YAML: {reason}"]) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{label}:{mark.line + 1}" if mark else label
        detail = ", ".join(part for part in (e.context, e.problem) if part) or "unknown problem"
        raise ConfigError([f"{where}: invalid YAML: {detail}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{label}: invalid YAML: {e}"]) from None


def _read_node(reader: _Reader, root: Node, file: Path, base: Path) -> NodeConfig | None:
    """Convert the top-level mapping; None if anything was wrong (the reader has the errors)."""
    top = reader.mapping(root, "", _NODE_KEYS, "a mapping of node settings")
    if top is None:
        return None
    node = reader.required(top, "", "node", _NAME_EXPECTED, _name, parent=root)
    data_dir = reader.value(top, "", "data_dir", "a directory path", _text)
    options: dict[str, Any] = {}
    for key, what, convert in (
        ("graceful_timeout", "a number of seconds > 0 and <= 3600", _seconds(3600)),
        ("checkpoint_interval", "a number of seconds > 0 and <= 86400", _seconds(86400)),
        ("heartbeat_timeout", "a number of seconds > 0 and <= 3600", _seconds(3600)),
        ("durable", "true or false", _boolean),
        ("max_body", "a number of bytes from 1 to 1073741824", _integer(1, 1 << 30)),
        ("keepalive_timeout", "a number of seconds > 0 and <= 3600", _seconds(3600)),
        ("request_timeout", "a number of seconds > 0 and <= 3600", _seconds(3600)),
        ("max_connections", "a number of connections from 1 to 1000000", _integer(1, 1_000_000)),
        (
            "cache_size",
            f"a number of bytes from {MIN_CACHE_SIZE} (1 MiB) to {MAX_CACHE_SIZE} (64 GiB)",
            _integer(MIN_CACHE_SIZE, MAX_CACHE_SIZE),
        ),
    ):
        got = reader.value(top, "", key, what, convert)
        if not isinstance(got, _Missing):
            options[key] = got
    cages = _read_cages(reader, top, root, base)
    replication = _read_replication(reader, top, node)
    if reader.errors or node is None or cages is None or replication is None:
        return None
    return NodeConfig(
        file=file,
        node=node,
        data_dir=(base / (data_dir if isinstance(data_dir, str) else "var")).resolve(),
        cages=cages,
        replication=None if isinstance(replication, _Missing) else replication,
        _origin=_Origin(reader.label, reader.lines),
        **options,
    )


def _read_cages(
    reader: _Reader, top: Mapping[str, Node], root: Node, base: Path
) -> tuple[CageConfig, ...] | None:
    what = "a non-empty list of cages"
    seq = top.get("cages")
    if seq is None:
        reader.expected(root, "cages", what, "nothing (a required key is missing)")
        return None
    if not isinstance(seq, SequenceNode) or seq.tag != _SEQ_TAG or not seq.value:
        reader.expected(seq, "cages", what, "an empty list" if seq.value == [] else None)
        return None
    cages: list[CageConfig] = []
    names: dict[str, str] = {}
    addresses: list[tuple[HttpAddress, str, Node]] = []
    for i, item in enumerate(seq.value):
        path = f"cages[{i}]"
        entries = reader.mapping(item, path, _CAGE_KEYS, "a mapping of cage settings")
        if entries is None:
            continue
        name = reader.required(entries, path, "name", _NAME_EXPECTED, _name, parent=item)
        if name is not None:
            if name in names:
                reader.expected(
                    entries["name"],
                    f"{path}.name",
                    "a name unique in the node",
                    f"{name!r} (already the name of {names[name]})",
                )
            else:
                names[name] = path
                reader.cage_names.append(name)
        modules = _read_modules(reader, entries, path, item, base)
        workers = reader.value(
            entries, path, "workers", "an integer from 1 to 256", _integer(1, 256)
        )
        threads = reader.value(
            entries, path, "threads", "an integer from 1 to 1024", _integer(1, 1024)
        )
        http = _read_http(reader, entries, f"{path}.http", addresses)
        if name is None or modules is None or workers is None or threads is None or http is None:
            continue
        cages.append(
            CageConfig(
                name=name,
                modules=modules,
                workers=1 if isinstance(workers, _Missing) else workers,
                threads=4 if isinstance(threads, _Missing) else threads,
                http=None if isinstance(http, _Missing) else http,
            )
        )
    return tuple(cages)


def _read_modules(
    reader: _Reader, entries: Mapping[str, Node], prefix: str, parent: Node, base: Path
) -> Path | None:
    what = "an existing directory of modules"
    path = f"{prefix}.modules"
    text = reader.required(entries, prefix, "modules", what, _text, parent=parent)
    if text is None:
        return None
    directory = (base / text).resolve()
    if not directory.is_dir():
        why = "is not a directory" if directory.exists() else "does not exist"
        reader.expected(entries["modules"], path, what, f"{text!r} ({directory} {why})")
        return None
    try:
        files = _module_files(directory)
    except OSError as e:
        reader.expected(entries["modules"], path, what, f"{text!r} ({e.strerror or e})")
        return None
    # A module whose name cannot be a URL segment and a safe's name would load but never be
    # reachable: refuse it before anything starts, every such file at once.
    bad = sorted(p.name for p in files if not _MODULE.fullmatch(p.stem))
    if bad:
        shown = ", ".join(repr(name) for name in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        reader.expected(entries["modules"], path, _MODULE_EXPECTED, f"{shown}{more} in {directory}")
        return None
    return directory


def _overlaps(a: HttpAddress, b: HttpAddress) -> bool:
    """Whether two listening addresses would collide: same port, same or wildcard host."""
    if a.port != b.port:
        return False
    ha, hb = _canonical(a.host), _canonical(b.host)
    if ha == hb or "::" in (ha, hb):  # "::" is dual-stack on Linux: it takes IPv4 too
        return True
    # 0.0.0.0 takes every IPv4 address (and a host name may well resolve to one), not IPv6 ones.
    other = hb if ha == "0.0.0.0" else ha if hb == "0.0.0.0" else None
    return other is not None and ":" not in other


def _read_http(
    reader: _Reader,
    entries: Mapping[str, Node],
    path: str,
    seen: list[tuple[HttpAddress, str, Node]],
) -> HttpAddress | _Missing | None:
    node = entries.get("http")
    if node is None:
        return _MISSING
    address = _read_address(reader, node, path)
    if address is None:
        return None
    for other, other_path, other_node in seen:
        if _overlaps(address, other):
            line = other_node.start_mark.line + 1
            reader.expected(
                node,
                path,
                "an address no other cage listens on",
                f"{node.value!r} (overlaps {other_path}, {other} at line {line})",
            )
            return None
    seen.append((address, path, node))
    return address


_ADDRESS_EXPECTED = 'an address "HOST:PORT" or "[IPV6]:PORT" with PORT 1..65535'


def _read_address(
    reader: _Reader, node: Node, path: str, what: str = _ADDRESS_EXPECTED
) -> HttpAddress | None:
    """One HOST:PORT scalar; None (and an error) if it is not one."""
    # The raw text, not the constructed value: YAML 1.1 reads `8080:80` as a base-60 integer.
    if not isinstance(node, ScalarNode) or node.tag not in (
        "tag:yaml.org,2002:str",
        "tag:yaml.org,2002:int",
    ):
        reader.expected(node, path, what)
        return None
    try:
        return HttpAddress.parse(node.value)
    except ValueError as e:
        reader.expected(node, path, what, f"{node.value!r} ({e})")
        return None


# --- replication -------------------------------------------------------------------------------

_REPLICATION_ADDRESS = (
    'an address "HOST:PORT" or "[IPV6]:PORT" that peers can connect to (not a wildcard such '
    "as 0.0.0.0 or ::), PORT 1..65535"
)


def _read_replication_address(reader: _Reader, node: Node, path: str) -> HttpAddress | None:
    address = _read_address(reader, node, path, _REPLICATION_ADDRESS)
    if address is not None and _canonical(address.host) in ("0.0.0.0", "::"):
        # Berkeley DB tells its peers the local site's address: it must be one they can reach.
        reader.expected(node, path, _REPLICATION_ADDRESS, f"{node.value!r} (a wildcard)")
        return None
    return address


def _read_replication(
    reader: _Reader, top: Mapping[str, Node], node_name: str | None
) -> ReplicationConfig | _Missing | None:
    """The optional `replication:` section; None (errors reported) if anything in it is wrong."""
    section = top.get("replication")
    if section is None:
        return _MISSING
    entries = reader.mapping(section, "replication", _REPLICATION_KEYS, "a mapping of settings")
    if entries is None:
        return None
    ok = True
    address: HttpAddress | None = None
    if "address" in entries:
        address = _read_replication_address(reader, entries["address"], "replication.address")
    else:
        reader.expected(
            section,
            "replication.address",
            _REPLICATION_ADDRESS,
            "nothing (a required key is missing)",
        )
    ack = reader.value(
        entries,
        "replication",
        "ack",
        f"one of {', '.join(ACK_POLICIES)}",
        lambda v: v if isinstance(v, str) and v in ACK_POLICIES else None,
    )
    priority = reader.value(
        entries,
        "replication",
        "priority",
        "an integer from 0 (never master) to 1000000",
        _integer(0, 1_000_000),
    )
    peers: list[PeerConfig] = []
    seq = entries.get("peers")
    if seq is not None:
        if not isinstance(seq, SequenceNode) or seq.tag != _SEQ_TAG:
            reader.expected(seq, "replication.peers", "a list of peer nodes (may be empty)")
            ok = False
        else:
            seen: dict[str, int] = {}
            for i, item in enumerate(seq.value):
                peer = _read_peer(reader, item, f"replication.peers[{i}]", node_name, seen)
                if peer is None:
                    ok = False
                else:
                    peers.append(peer)
    if not ok or address is None or ack is None or priority is None:
        return None
    return ReplicationConfig(
        address=address,
        ack="quorum" if isinstance(ack, _Missing) else ack,
        priority=100 if isinstance(priority, _Missing) else priority,
        peers=tuple(peers),
    )


def _read_peer(
    reader: _Reader, item: Node, path: str, node_name: str | None, seen: dict[str, int]
) -> PeerConfig | None:
    entries = reader.mapping(item, path, _PEER_KEYS, "a mapping of peer settings")
    if entries is None:
        return None
    name = reader.required(entries, path, "node", _NAME_EXPECTED, _name, parent=item)
    if name is not None:
        if name == node_name:
            reader.expected(
                entries["node"], f"{path}.node", "another node's name", f"{name!r} (this node)"
            )
            name = None
        elif name in seen:
            reader.expected(
                entries["node"],
                f"{path}.node",
                "each peer once",
                f"{name!r} again (first at line {seen[name]})",
            )
            name = None
        else:
            seen[name] = entries["node"].start_mark.line + 1
    address: HttpAddress | None = None
    if "address" in entries:
        address = _read_replication_address(reader, entries["address"], f"{path}.address")
    else:
        reader.expected(
            item, f"{path}.address", _REPLICATION_ADDRESS, "nothing (a required key is missing)"
        )
    http: dict[str, HttpAddress] = {}
    ok = True
    if "http" in entries:
        # The group's nodes run the same cages: a peer's cage is one of this node's.
        cages = tuple(reader.cage_names)
        what = f"a mapping of this node's cages ({', '.join(cages) or 'none'}) to addresses"
        before = len(reader.found)
        mapping = reader.mapping(entries["http"], f"{path}.http", cages, what)
        if mapping is None or len(reader.found) > before:
            ok = False  # an unknown cage (reported): the peer is not usable as written
        for cage, node in (mapping or {}).items():
            cage_address = _read_address(reader, node, f"{path}.http.{cage}")
            if cage_address is None:
                ok = False
            else:
                http[cage] = cage_address
    if name is None or address is None or not ok:
        return None
    return PeerConfig(node=name, address=address, http=http)


def _canonical(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower().rstrip(".")


def _ports(first: int, count: int) -> str:
    return f"port {first}" if count == 1 else f"ports {first}..{first + count - 1}"


def _replication_problems(cfg: NodeConfig, count: int) -> list[tuple[str, str]]:
    """(key path, "expected X, got Y") for each port problem of a node with `count` safes.

    Safe i of a node listens on `address.port + i` (`safe_sites`), so the node takes `count`
    ports from its address on: they must exist (<= 65535), be at most MAX_REPLICATED_SAFES,
    and collide with nothing else the group listens on. Two addresses of this node collide as
    the HTTP addresses do (a wildcard takes every address); an address of a peer collides only
    with one of the same host as written, since a wildcard here says nothing of another machine.
    """
    replication = cfg.replication
    if replication is None or count == 0:
        return []
    problems: list[tuple[str, str]] = []
    if count > MAX_REPLICATED_SAFES:
        problems.append(
            (
                "replication.address",
                f"expected at most {MAX_REPLICATED_SAFES} modules on a replicated node (each "
                f"safe takes a port), got {count}",
            )
        )
    # (key path, address, port count, this node's, an HTTP address) in the order written.
    claims: list[tuple[str, HttpAddress, int, bool, bool]] = [
        (f"cages[{i}].http", cage.http, 1, True, True)
        for i, cage in enumerate(cfg.cages)
        if cage.http is not None
    ]
    claims.append(("replication.address", replication.address, count, True, False))
    for j, peer in enumerate(replication.peers):
        claims.append((f"replication.peers[{j}].address", peer.address, count, False, False))
        for cage, address in peer.http.items():
            claims.append((f"replication.peers[{j}].http.{cage}", address, 1, False, True))
    for key, address, n, _, is_http in claims:
        if not is_http and address.port + n - 1 > 65535:
            problems.append(
                (
                    key,
                    f"expected a port of at most {65536 - n} (one port per safe, {n} safes), "
                    f"got {str(address)!r} ({_ports(address.port, n)})",
                )
            )
    for b, (key, address, n, local, is_http) in enumerate(claims):
        for other_key, other, m, other_local, other_http in claims[:b]:
            if local and other_local and is_http and other_http:
                continue  # two cages of this node: checked as they were read
            if local and other_local:
                same_host = _overlaps(HttpAddress(address.host, 1), HttpAddress(other.host, 1))
            else:
                same_host = _canonical(address.host) == _canonical(other.host)
            if (
                same_host
                and address.port <= other.port + m - 1
                and other.port <= address.port + n - 1
            ):
                line = locate(cfg, other_key)
                problems.append(
                    (
                        key,
                        "expected ports nothing else of the group listens on, got "
                        f"{str(address)!r} ({_ports(address.port, n)}: overlaps {other_key}, "
                        f"{_ports(other.port, m)} at {line})",
                    )
                )
    return problems


def replication_errors(cfg: NodeConfig) -> list[str]:
    """The port problems of `cfg`'s `replication` with its modules as they are now listed
    ("FILE:LINE: key: expected X, got Y"); `load_config` reports the same at load."""
    return [
        f"{locate(cfg, key)}: {key}: {message}"
        for key, message in _replication_problems(cfg, len(cfg.safes()))
    ]


Site = tuple[str, int]


def safe_sites(cfg: NodeConfig) -> dict[tuple[str, str], tuple[Site, list[Site]]]:
    """For each (cage, module) of a replicated node: this node's (host, port) for its safe and
    the peers' (host, port) for the same safe, in `replication.peers` order.

    The safe's index i in `cfg.safes()` (every (cage, module), sorted) gives its port,
    `address.port + i`, on this node and on every peer alike: so the nodes of a group must run
    the same cages and modules (a module added on one node only shifts the ports of the safes
    after it there). Empty for a node without `replication`; ConfigError if the modules now
    listed make the ports invalid (`replication_errors`).
    """
    replication = cfg.replication
    if replication is None:
        return {}
    safes = cfg.safes()
    problems = _replication_problems(cfg, len(safes))
    if problems:
        raise ConfigError([f"{locate(cfg, key)}: {key}: {message}" for key, message in problems])
    return {
        safe: (
            (replication.address.host, replication.address.port + i),
            [(peer.address.host, peer.address.port + i) for peer in replication.peers],
        )
        for i, safe in enumerate(safes)
    }


# --- port check --------------------------------------------------------------------------------


def check_ports(cfg: NodeConfig) -> list[str]:
    """Try to listen on every cage's HTTP address and, on a replicated node, on each safe's
    replication port (`safe_sites`); one error string per address that fails.

    A side effect (a socket bound for an instant), hence not part of `load_config`. SO_REUSEADDR
    as the server (and Berkeley DB's replication manager) will use, so a port in TIME_WAIT does
    not count as taken.
    """
    wanted: list[tuple[str, HttpAddress, str]] = [
        (f"cages[{i}].http", cage.http, "")
        for i, cage in enumerate(cfg.cages)
        if cage.http is not None
    ]
    if cfg.replication is not None:
        host, base = cfg.replication.address.host, cfg.replication.address.port
        for i, (cage, module) in enumerate(cfg.safes()):
            if base + i <= 65535:  # beyond: a load error already
                wanted.append(
                    (
                        "replication.address",
                        HttpAddress(host, base + i),
                        f" for safe {cage}.{module}",
                    )
                )
    errors: list[str] = []
    for key, address, what in wanted:
        try:
            infos = socket.getaddrinfo(
                address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, kind, proto, _, sockaddr = infos[0]
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(sockaddr)
                sock.listen(1)  # on Linux a clash with another listener can show only here
        except OSError as e:
            errors.append(
                f"{locate(cfg, key)}: {key}: expected an address this host can listen on, "
                f"got {str(address)!r}{what} ({e.strerror or e})"
            )
    return errors
