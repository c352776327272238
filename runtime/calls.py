"""Calls between modules and cages: the global `pmnc` every application module has.

    pmnc.<module>.<function>(**kwargs)                 same cage, same worker, a plain call
    pmnc("<cage>").<module>.<function>(**kwargs)       another cage of this node, over its HTTP
    pmnc("<node>.<cage>", timeout=S).<module>...       a cage of a peer node, over its HTTP

The whole user-facing story (errors, loading order, what may run twice) is `docs/calls.md`;
this module is the mechanism. One `Calls` per worker holds the cage's loaded modules (a
registry filled by `modules.load_module`), the routes to every cage it may call, and a pool of
keep-alive connections; each module gets its own `Pmnc` bound to it (like `pmnc_safe`), which
only adds the caller's name to the chain that error messages show.

In-process calls pass Python objects as they are and let exceptions through untouched: they are
function calls, with a depth limit (`MAX_DEPTH`) so that a cycle between modules fails with the
chain named instead of running into Python's recursion limit somewhere unrelated. Remote calls
send the arguments as one JSON object (refused here, before anything is sent, if they are not
JSON), and turn every answer that is not a 200 into `RemoteError`.

The chain of calls crosses cages: every remote call sends it in the `X-Pmnc-Chain` header
(`CHAIN_HEADER`: "node.cage.module.function" entries, the call being made last), and the cage
that receives it runs the request inside `request_chain(header, module, function)`, which makes
it the chain of that request. A call whose target is already in the chain (a cycle through
HTTP: cage a calls b, which calls a...) or that nests more than MAX_DEPTH deep raises
`CallDepthError` before anything is sent, naming the chain, in the cage that would close the
cycle; the receiving side refuses such a chain too. Without it a cycle holds a thread per hop
until the innermost call times out.

Retrying a POST (after Go's net/http transport, which retries a non-idempotent request only
when nothing of it was written or the server had closed the idle connection): a pooled
connection is checked before use (readable means the server closed it or sent something
unasked: dropped), and one idle longer than the server's keep-alive timeout allows is not used;
a request whose sending fails on a reused connection is sent once more on a fresh one, since a
server acts only on a complete request. Once the request is sent, a lost connection or a
timeout is raised, never retried: the remote function may have run (a worker killed mid-call).
"""

from __future__ import annotations

import contextlib
import contextvars
import http.client
import json
import math
import re
import select
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import HttpAddress, NodeConfig

__all__ = [
    "CHAIN_HEADER",
    "DEFAULT_TIMEOUT",
    "MAX_DEPTH",
    "CallDepthError",
    "Calls",
    "NotFoundError",
    "Pmnc",
    "RemoteError",
    "Routes",
    "encode_arguments",
    "master_route",
    "node_routes",
    "parse_target",
    "remote_error",
    "request_chain",
]

DEFAULT_TIMEOUT = 30.0  # seconds a remote call may take, connecting included
MAX_DEPTH = 32  # in-process calls nested in one thread; far below Python's recursion limit
LOAD_WAIT = 30.0  # how long a call from another thread waits for the cage's modules to load
MAX_IDLE_PER_ADDRESS = 64  # pooled connections kept per remote address; more are closed
CHAIN_HEADER = "X-Pmnc-Chain"  # the chain of calls a remote call is part of (request_chain)

# node -> cage -> its HTTP address (None: the cage has no `http`). This node's cages come from
# its config; a peer node's from its `replication.peers[].http` map (`node_routes`).
Routes = Mapping[str, Mapping[str, "HttpAddress | None"]]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# The chain of the calls running in this thread (context): the calling module, then
# "module.function" per in-process call; a request that came with a chain (request_chain)
# starts from that one, whose entries are "node.cage.module.function".
_CHAIN: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("pmnc_chain", default=())
# The "module.function" a request that came without a chain (from a client, not a cage) serves:
# the first entry of the chain its remote calls send.
_ENTRY: contextvars.ContextVar[str | None] = contextvars.ContextVar("pmnc_entry", default=None)
# One entry of an X-Pmnc-Chain header: node.cage.module.function, or node.cage.module for a
# call made outside any request (a module's background thread).
_HOP = re.compile(
    r"[A-Za-z0-9_-]{1,64}\.[A-Za-z0-9_-]{1,64}\.[A-Za-z_][A-Za-z0-9_]{0,63}"
    r"(?:\.[A-Za-z_][A-Za-z0-9_]{0,63})?"
)


class RemoteError(Exception):
    """A remote call answered with an error: `type` and `message` are the remote exception's
    (`"NotFound"`, `"TypeError"`, `"ValueError"`... as its `{"error": "Type: message"}` says),
    `status` the HTTP status (400 bad arguments, 404 no such function, 500 the function raised,
    503 the cage could not take it: recovering, stopping, or out of connections), `call` what
    was called, as `pmnc('cage').m.f`."""

    def __init__(self, call: str, status: int, type: str, message: str) -> None:
        super().__init__(f"{call}: {status} {type}: {message}")
        self.call = call
        self.status = status
        self.type = type
        self.message = message

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, int, str, str]]:
        return (type(self), (self.call, self.status, self.type, self.message))


class CallDepthError(RecursionError):
    """Calls nested deeper than MAX_DEPTH, or (`cycle`) a call to a cage's function already in
    the chain of calls across cages; `chain` is the nesting, the calling module first, then
    `module.function` per in-process call and `node.cage.module.function` per remote one."""

    def __init__(self, chain: tuple[str, ...], cycle: bool = False) -> None:
        if cycle:
            what = f"a cycle of calls between cages, {chain[-1]} is already in the chain: "
        else:
            what = f"calls between modules nested more than {MAX_DEPTH} deep (a cycle?): "
        super().__init__(what + " -> ".join(chain))
        self.chain = chain
        self.cycle = cycle

    def __reduce__(self) -> tuple[type[CallDepthError], tuple[tuple[str, ...], bool]]:
        return (type(self), (self.chain, self.cycle))


class NotFoundError(LookupError):
    """Nothing to call there: no such module or served function in this cage, no such cage or
    node, or a cage without an `http` address."""


def remote_error(call: str, status: int, body: bytes) -> RemoteError:
    """The RemoteError for a non-200 answer: its `{"error": "Type: message"}` body split, or,
    for a body that is not one (something other than pmnc answered), `HTTP <status>` and the
    start of the body."""
    try:
        text = json.loads(body)["error"]
    except (ValueError, TypeError, KeyError):
        shown = body[:200].decode(errors="replace")
        return RemoteError(call, status, f"HTTP {status}", shown)
    if not isinstance(text, str):
        return RemoteError(call, status, f"HTTP {status}", repr(text)[:200])
    kind, sep, message = text.partition(": ")
    if not sep or not _IDENT.fullmatch(kind):
        return RemoteError(call, status, f"HTTP {status}", text)
    return RemoteError(call, status, kind, message)


def encode_arguments(call: str, kwargs: Mapping[str, object]) -> bytes:
    """The JSON body of a remote call, refused here (before anything is sent) with the error
    the server would answer 400 for, or json's own: NaN and Infinity, an integer over the
    int/str conversion limit, a lone surrogate, a value json cannot encode (a set, bytes, an
    object). Tuples go as lists and non-string dict keys as strings, as json does for results.
    """
    try:
        return json.dumps(kwargs, allow_nan=False, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ValueError(
            f"{call}: arguments go as JSON: a string with a lone surrogate cannot be sent"
        ) from None
    except (TypeError, ValueError, RecursionError) as e:
        raise type(e)(f"{call}: arguments go as JSON: {e}") from e


def parse_target(target: str) -> tuple[str | None, str]:
    """`"cage"` -> (None, "cage"); `"node.cage"` -> ("node", "cage"); ValueError otherwise."""
    if not isinstance(target, str):
        raise TypeError(f"pmnc(): expected a cage name as a string, got {type(target).__name__}")
    node, dot, cage = target.rpartition(".")
    if (dot and not _NAME.fullmatch(node)) or not _NAME.fullmatch(cage):
        raise ValueError(
            f"pmnc({target!r}): expected 'CAGE' or 'NODE.CAGE', names of 1 to 64 characters "
            "from [A-Za-z0-9_-]"
        )
    return (node if dot else None), cage


def node_routes(cfg: NodeConfig) -> dict[str, dict[str, HttpAddress | None]]:
    """Every cage `Calls` may reach: this node's cages (None: no `http`) and, for a replicated
    node, each peer's cages at the addresses its `replication.peers[].http` lists (a cage left
    out there is not callable on that peer: absent from its routes)."""
    routes: dict[str, dict[str, HttpAddress | None]] = {
        cfg.node: {cage.name: cage.http for cage in cfg.cages}
    }
    if cfg.replication is not None:
        for peer in cfg.replication.peers:
            routes[peer.node] = dict(peer.http)
    return routes


def master_route(cfg: NodeConfig, node: str, cage: str) -> HttpAddress | None:
    """The HTTP address of `cage` on `node` of `cfg`'s group (this node or a peer), or None if
    the config gives none: where to send a call once `node` is known to be the master."""
    return node_routes(cfg).get(node, {}).get(cage)


@contextlib.contextmanager
def request_chain(header: str | None, module: str, function: str) -> Iterator[None]:
    """Run a request for `module.function` as part of the chain its `X-Pmnc-Chain` header
    carries (None: a request from a client, the chain starts there).

    The server calls the function inside this, so that the remote calls it makes send the
    whole chain and a cycle across cages is refused where it would close (`Calls.chain_to`).
    Refuses, before the function runs: a header that is not a chain ending with this call
    (ValueError), a chain in which this call already appears or longer than MAX_DEPTH + 1
    (CallDepthError naming it).
    """
    if header is None:
        token = _ENTRY.set(f"{module}.{function}")
        try:
            yield
        finally:
            _ENTRY.reset(token)
        return
    chain = tuple(hop.strip() for hop in header.split(","))
    bad = next((hop for hop in chain if not _HOP.fullmatch(hop)), None)
    here = chain[-1]
    if bad is not None or here.count(".") != 3 or not here.endswith(f".{module}.{function}"):
        raise ValueError(
            f"{CHAIN_HEADER}: expected node.cage.module.function entries ending with this call "
            f"({module}.{function}), got {header[:200]!r}"
        )
    if chain[-1] in chain[:-1]:
        raise CallDepthError(chain, cycle=True)
    if len(chain) > MAX_DEPTH + 1:
        raise CallDepthError(chain)
    token_chain = _CHAIN.set(chain)
    try:
        yield
    finally:
        _CHAIN.reset(token_chain)


def _check_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout: expected seconds as a number, got {type(timeout).__name__}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout: expected seconds > 0, got {timeout!r}")
    return float(timeout)


class _Pool:
    """Idle keep-alive connections per address, newest first (the warm ones get reused and the
    others age out); any thread takes one for a call and gives it back after the answer."""

    def __init__(self, idle_limit: float) -> None:
        self._idle_limit = idle_limit
        self._idle: dict[tuple[str, int], list[tuple[http.client.HTTPConnection, float]]] = {}
        self._lock = threading.Lock()

    def take(self, address: tuple[str, int]) -> http.client.HTTPConnection | None:
        """A pooled connection that still looks usable, or None."""
        now = time.monotonic()
        while True:
            with self._lock:
                idle = self._idle.get(address)
                if not idle:
                    return None
                conn, since = idle.pop()
            if now - since < self._idle_limit and _usable(conn):
                return conn
            conn.close()

    def give(self, address: tuple[str, int], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(address, [])
            idle.append((conn, time.monotonic()))
            extra = idle[:-MAX_IDLE_PER_ADDRESS]
            del idle[:-MAX_IDLE_PER_ADDRESS]
        for old, _ in extra:
            old.close()

    def idle(self) -> int:
        """Idle connections held (for tests and figures)."""
        with self._lock:
            return sum(len(v) for v in self._idle.values())

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c, _ in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


def _usable(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle connection is still open: readable means the server closed it (or sent
    what nobody asked for), either way it cannot carry a request. poll, not select: a worker's
    descriptors go past FD_SETSIZE with many connections."""
    sock = conn.sock
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
    return not poller.poll(0)


class Calls:
    """One worker's call layer: its cage's modules (registered as they load), the routes to the
    cages it may call, and the pooled connections to them. Thread-safe."""

    def __init__(
        self,
        node: str,
        cage: str,
        routes: Routes,
        *,
        idle_limit: float = 4.0,
        default_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """`idle_limit`: seconds a pooled connection may have been idle and still be used; keep
        it under the servers' keep-alive timeout, so that they do not close one under a request.
        """
        self.node = node
        self.cage = cage
        self.routes = routes
        self.default_timeout = _check_timeout(default_timeout)
        self._modules: dict[str, Mapping[str, Callable[..., object]]] = {}
        self._loaded = threading.Event()
        self._loader = threading.get_ident()  # the thread that loads the modules
        self.pool = _Pool(idle_limit)

    @classmethod
    def for_node(cls, cfg: NodeConfig, cage: str) -> Calls:
        """The call layer of a worker of `cage` in the node `cfg`, its peers' cages included."""
        # Reuse a connection only well within the servers' keep-alive timeout (our own config's:
        # a group's nodes run the same config but for names and addresses); they close it after
        # that, checked every 0.2 s.
        return cls(cfg.node, cage, node_routes(cfg), idle_limit=cfg.keepalive_timeout * 0.8)

    # -- the cage's modules ------------------------------------------------------------------

    def bind(self, module: str) -> Pmnc:
        """The `pmnc` global of `module`."""
        return Pmnc(self, module)

    def add_module(self, name: str, functions: Mapping[str, Callable[..., object]]) -> None:
        """Register a loaded module's served functions (modules.py decides which they are)."""
        self._modules[name] = dict(functions)

    def loaded(self) -> None:
        """Every module is loaded: calls between modules may run (and waiting threads go on)."""
        self._loaded.set()

    def call_local(
        self, caller: str, module: str, function: str, kwargs: Mapping[str, Any]
    ) -> object:
        label = f"pmnc.{module}.{function}"  # for messages
        if not self._loaded.is_set():
            self._wait_loaded(caller, label)
        functions = self._modules.get(module)
        if functions is None:
            known = ", ".join(sorted(self._modules)) or "none"
            raise NotFoundError(
                f"{label}(): no module {module!r} in cage {self.cage!r} (modules: {known})"
            )
        fn = functions.get(function)
        if fn is None:
            raise NotFoundError(
                f"{label}(): no function {function!r} in module {module!r}: callable are the "
                "public functions it defines with def, as over HTTP"
            )
        chain = _CHAIN.get() or (caller,)
        here = f"{module}.{function}"
        if len(chain) > MAX_DEPTH:
            raise CallDepthError((*chain, here))
        token = _CHAIN.set((*chain, here))
        try:
            return fn(**kwargs)
        finally:
            _CHAIN.reset(token)

    def _wait_loaded(self, caller: str, label: str) -> None:
        why = (
            f"{label}(): calls between modules start once every module of cage {self.cage!r} is "
            f"loaded, and {caller!r} called while modules load"
        )
        if threading.get_ident() == self._loader:
            # Top-level code runs at load, in name order: waiting here would wait for itself.
            raise RuntimeError(f"{why} (from its top-level code: make the call in a function)")
        if not self._loaded.wait(LOAD_WAIT):
            raise RuntimeError(f"{why}, and they were still loading after {LOAD_WAIT:g} s")

    # -- other cages -------------------------------------------------------------------------

    def chain_to(self, caller: str, target: str) -> tuple[str, ...]:
        """The chain a remote call to `target` ("node.cage.module.function") sends: the chain
        running in this thread, its entries made "node.cage.module[.function]" with this cage's
        names, then `target`. CallDepthError, before anything is sent, if `target` is already
        in it (a cycle across cages) or it is already MAX_DEPTH deep."""
        chain = _CHAIN.get() or (caller,)
        entry = _ENTRY.get()
        if entry is not None and "." not in chain[0] and entry.startswith(f"{chain[0]}."):
            chain = (entry, *chain[1:])  # the function the request called, not just its module
        prefix = f"{self.node}.{self.cage}."
        hops = tuple(hop if hop.count(".") == 3 else prefix + hop for hop in chain)
        if target in hops:
            raise CallDepthError((*hops, target), cycle=True)
        if len(hops) > MAX_DEPTH:
            raise CallDepthError((*hops, target))
        return (*hops, target)

    def address(self, call: str, node: str | None, cage: str) -> tuple[str, int]:
        """Where `node.cage` listens, as a connectable (host, port); NotFoundError if nowhere."""
        node = node or self.node
        cages = self.routes.get(node)
        if cages is None:
            known = ", ".join(sorted(self.routes))
            raise NotFoundError(
                f"{call}: no node {node!r} known to node {self.node!r} (known: {known}); "
                "a peer node is reached at the addresses its entry in this node's "
                "replication.peers lists"
            )
        if cage not in cages:
            known = ", ".join(sorted(cages)) or "none"
            if node == self.node:
                raise NotFoundError(f"{call}: no cage {cage!r} in node {node!r} (cages: {known})")
            raise NotFoundError(
                f"{call}: no cage {cage!r} of node {node!r} in this node's "
                f"replication.peers[].http for it (cages listed: {known})"
            )
        http_address = cages[cage]
        if http_address is None:
            raise NotFoundError(
                f"{call}: cage {cage!r} of node {node!r} has no http address in its config, "
                "so it cannot be called from another cage"
            )
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(http_address.host, http_address.host)
        return host, http_address.port

    def call_remote(
        self,
        call: str,
        address: tuple[str, int],
        path: str,
        body: bytes,
        timeout: float,
        *,
        chain: tuple[str, ...] = (),
    ) -> object:
        """POST `body` to `path` at `address`, with `chain` in its X-Pmnc-Chain header if any;
        the result, or RemoteError, TimeoutError, ConnectionError (the latter two naming
        whether the call may have run)."""
        headers = {"Content-Type": "application/json"}
        if chain:
            headers[CHAIN_HEADER] = ",".join(chain)
        deadline = time.monotonic() + timeout
        host, port = address
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        for attempt in range(2):
            conn = self.pool.take(address) if attempt == 0 else None  # the retry: a new one
            reused = conn is not None
            if conn is None:
                conn = http.client.HTTPConnection(address[0], address[1], timeout=timeout)
            try:
                _set_timeout(conn, deadline)
                conn.request("POST", path, body, headers)
            except TimeoutError:
                conn.close()
                raise TimeoutError(
                    f"{call}: could not send the call to {where} within {timeout:g} s "
                    "(it did not run)"
                ) from None
            except OSError as e:
                conn.close()
                if reused and attempt == 0:
                    continue  # the server had closed it: an incomplete request runs nothing
                raise ConnectionError(
                    f"{call}: cannot reach {where}: {type(e).__name__}: {e} (it did not run; "
                    "is the cage running?)"
                ) from e
            try:
                _set_timeout(conn, deadline)
                response = conn.getresponse()
                _set_timeout(conn, deadline)
                data = response.read()
            except TimeoutError:
                conn.close()  # a late answer must not be read as the next call's
                raise TimeoutError(
                    f"{call}: no answer from {where} within {timeout:g} s "
                    "(the call may have run, or may still be running)"
                ) from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise ConnectionError(
                    f"{call}: the connection to {where} was lost before an answer "
                    f"({type(e).__name__}: {e}): the call may or may not have run"
                ) from e
            if response.will_close:
                conn.close()
            else:
                self.pool.give(address, conn)
            if response.status != 200:
                raise remote_error(call, response.status, data)
            try:
                return json.loads(data)["result"]
            except (ValueError, TypeError, KeyError):
                raise RemoteError(
                    call, 200, "HTTP 200", f"not a pmnc answer: {data[:200]!r}"
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close the pooled connections (a worker's exit does it anyway)."""
        self.pool.close()


def _set_timeout(conn: http.client.HTTPConnection, deadline: float) -> None:
    """What is left of the call's time, for the next blocking step (connect, send or read)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    conn.timeout = left
    if conn.sock is not None:
        conn.sock.settimeout(left)


# -- what a module sees -------------------------------------------------------------------------


class Pmnc:
    """The global `pmnc` of one module: `pmnc.<module>.<function>(**kwargs)` calls a module of
    this cage in this thread; `pmnc("cage")` or `pmnc("node.cage", timeout=S)` is another cage.

    Attributes are module names only: everything of its own is private (`_x`), so no module
    name is ever shadowed (modules named `_x` are not loaded).
    """

    __slots__ = ("_calls", "_owner")

    def __init__(self, calls: Calls, owner: str) -> None:
        self._calls = calls
        self._owner = owner

    def __getattr__(self, module: str) -> _LocalModule:
        if module.startswith("_"):
            raise AttributeError(f"pmnc.{module}: private names are not callable")
        return _LocalModule(self._calls, self._owner, module)

    def __call__(self, target: str, *, timeout: float | None = None) -> RemoteCage:
        node, cage = parse_target(target)
        return RemoteCage(
            self._calls,
            self._owner,
            target,
            node=node,
            cage=cage,
            timeout=self._calls.default_timeout if timeout is None else _check_timeout(timeout),
        )

    def __repr__(self) -> str:
        return f"<pmnc of module {self._owner!r} in cage {self._calls.cage!r}>"


class _LocalModule:
    __slots__ = ("_calls", "_module", "_owner")

    def __init__(self, calls: Calls, owner: str, module: str) -> None:
        self._calls = calls
        self._owner = owner
        self._module = module

    def __getattr__(self, function: str) -> Callable[..., Any]:
        if function.startswith("_"):
            raise AttributeError(f"pmnc.{self._module}.{function}: private names are not callable")
        calls, owner, module = self._calls, self._owner, self._module

        def call(**kwargs: Any) -> Any:
            return calls.call_local(owner, module, function, kwargs)

        call.__name__ = call.__qualname__ = f"pmnc.{module}.{function}"
        return call


class RemoteCage:
    """`pmnc("cage")`: `.<module>.<function>(**kwargs)` calls it over HTTP."""

    __slots__ = ("_cage", "_calls", "_node", "_owner", "_target", "_timeout")

    def __init__(
        self,
        calls: Calls,
        owner: str,
        target: str,
        *,
        node: str | None,
        cage: str,
        timeout: float,
    ) -> None:
        self._calls = calls
        self._owner = owner
        self._target = target
        self._node = node
        self._cage = cage
        self._timeout = timeout

    def __getattr__(self, module: str) -> _RemoteModule:
        if module.startswith("__") or not _IDENT.fullmatch(module):
            raise AttributeError(f"pmnc({self._target!r}).{module}: not a module name")
        return _RemoteModule(self, module)

    def _call(self, module: str, function: str, kwargs: Mapping[str, Any]) -> object:
        call = f"pmnc({self._target!r}).{module}.{function}"
        body = encode_arguments(call, kwargs)
        calls = self._calls
        address = calls.address(call, self._node, self._cage)
        target = f"{self._node or calls.node}.{self._cage}.{module}.{function}"
        chain = calls.chain_to(self._owner, target)
        return calls.call_remote(
            call, address, f"/{module}/{function}", body, self._timeout, chain=chain
        )


class _RemoteModule:
    __slots__ = ("_cage", "_module")

    def __init__(self, cage: RemoteCage, module: str) -> None:
        self._cage = cage
        self._module = module

    def __getattr__(self, function: str) -> Callable[..., Any]:
        if function.startswith("__") or not _IDENT.fullmatch(function):
            raise AttributeError(f"{self._module}.{function}: not a function name")
        cage, module = self._cage, self._module

        def call(**kwargs: Any) -> Any:
            return cage._call(module, function, kwargs)

        call.__name__ = call.__qualname__ = f"{module}.{function}"
        return call
