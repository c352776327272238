"""`pmnc-runtime safe ...`: inspect, dump, load, verify, back up, restore and recover safes.

What an operator needs on the day something goes wrong. Rules every command keeps:

- It never runs code stored in a safe: values are shown through `pmnc.runtime.cli.unpickle` (plain
  data and placeholders), dumped and loaded as the stored pickles, unless `--trust` is given.
- It never creates a safe, except `load` and `restore` for their target: a path is only opened
  once it holds a safe's data file, because opening a directory creates environment files there.
- It joins a safe in use like any other process (`recover=False`: recovery is never run under
  processes that use the safe; the node's supervisor owns it). Joining is not isolation: if a
  tool is killed (kill -9) while joined, the node's workers meet a dead registrant and the
  supervisor recovers the cage, restarting its workers (nothing acknowledged is lost). Let a
  tool finish, or stop it with Ctrl-C, which closes the safe cleanly.
- Success is exit 0; any failure is one line on stderr naming the path and the reason.

Exit codes (runtime/cli/__init__.py's scheme): 0 ok; 1 a missing key, or `verify` found the database
damaged; 2 bad usage; 3 an operational failure (not a safe, in use, no space, permission...);
4 `verify` or `get` found a value that cannot be decoded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

from pmnc.safe import Safe, SafeBusyError, SafeCorruptError, SafeError, disk_usage, is_safe
from pmnc.safe import backup as safe_backup
from pmnc.safe import recover as safe_recover
from pmnc.safe import restore as safe_restore
from pmnc.safe import users as safe_users
from pmnc.safe import verify as safe_verify
from pmnc.safe.queue import Queue

from ..status import human_size, rss_bytes
from . import dumpfile, unpickle
from .progress import Progress

__all__ = ["add_parser", "run"]

OK, FAILED, USAGE, ERROR, UNDECODABLE = 0, 1, 2, 3, 4

# A dump file's mode, whatever the umask: it holds every value of the safe (README).
DUMP_MODE = 0o600
BACKUP_DIR_MODE = 0o700
# Values written per checkpoint while loading (writes are non-durable until then, for speed).
LOAD_CHECKPOINT_EVERY = 10_000


class CommandError(Exception):
    """A failure to report as one line "<path>: <reason>" with an exit code."""

    def __init__(self, path: str | os.PathLike[str], reason: str, code: int = ERROR) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.code = code


# -- argument parsing -----------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    """Register `safe` and its subcommands (the CLI keeps one module per command)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "safe",
        help="inspect and operate module safes",
        description="Inspect, dump, load, verify, back up, restore and recover safes. "
        "Exit 0 on success; 1 a missing key or a damaged database; 3 an operational failure; "
        "4 a value that cannot be decoded. Nothing runs code stored in a safe without --trust.",
    )
    sub = parser.add_subparsers(dest="safe_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("list", help="one row per safe under DATA_DIR/safe/")
    p.add_argument("data_dir", metavar="DATA_DIR", help="a node's data_dir")
    p.set_defaults(action=_list)

    p = sub.add_parser("keys", help="one key per line")
    p.add_argument("safe", metavar="SAFE", help="the safe's directory")
    p.add_argument("--prefix", default="", help="only keys starting with P", metavar="P")
    p.add_argument(
        "--null",
        action="store_true",
        help="end each key with NUL instead of a newline, written exactly (for xargs -0); "
        "without it a key that is not printable is written as its Python repr",
    )
    p.set_defaults(action=_keys)

    p = sub.add_parser("get", help="print the repr of a value")
    p.add_argument("safe", metavar="SAFE", help="the safe's directory")
    p.add_argument("key", metavar="KEY")
    p.add_argument(
        "--trust",
        action="store_true",
        help="unpickle fully: imports and runs code named by the stored value",
    )
    p.set_defaults(action=_get)

    p = sub.add_parser("dump", help="write every key and value to a dump file")
    p.add_argument("safe", metavar="SAFE", help="the safe's directory")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="'-' for stdout")
    p.add_argument("--progress", action="store_true", help="show progress even if not a TTY")
    p.set_defaults(action=_dump)

    p = sub.add_parser("load", help="store every key and value of a dump (creates the safe)")
    p.add_argument("safe", metavar="SAFE", help="the safe's directory")
    p.add_argument("file", metavar="FILE", help="a dump; '-' for stdin")
    p.add_argument("--progress", action="store_true", help="show progress even if not a TTY")
    p.set_defaults(action=_load)

    p = sub.add_parser("verify", help="check the database and that every value decodes")
    p.add_argument("safe", metavar="SAFE", help="the safe's directory")
    p.set_defaults(action=_verify)

    p = sub.add_parser("backup", help="hot backup of a safe, or of every safe of a data_dir")
    p.add_argument("source", metavar="SAFE|DATA_DIR")
    p.add_argument("dest", metavar="DEST", help="a new or empty directory")
    p.set_defaults(action=_backup)

    p = sub.add_parser("restore", help="replace a stopped (or create a new) safe from a backup")
    p.add_argument("backup", metavar="BACKUP", help="a directory written by backup")
    p.add_argument("safe", metavar="SAFE", help="the safe's directory")
    p.set_defaults(action=_restore)

    p = sub.add_parser("recover", help="recover a safe no process is using")
    p.add_argument("safe", metavar="SAFE", help="the safe's directory")
    p.add_argument("--catastrophic", action="store_true", help="replay every log file")
    p.set_defaults(action=_recover)

    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run one subcommand; turn every expected failure into one stderr line and an exit code."""
    action: Callable[[argparse.Namespace], int] = args.action
    try:
        return action(args)
    except CommandError as e:
        _say_error(str(e))
        return e.code
    except SafeError as e:
        _say_error(str(e))
        return ERROR
    except BrokenPipeError:
        # The reader went away (`keys | head`): not our failure, and nothing left to say.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OK
    except OSError as e:
        where = e.filename if e.filename is not None else "?"
        _say_error(f"{where}: {e.strerror or e}")
        return ERROR


def _say_error(line: str) -> None:
    print(" ".join(line.split("\n")), file=sys.stderr)


# -- helpers ---------------------------------------------------------------------------------------


def _require_safe(path: str | os.PathLike[str]) -> Path:
    """The path, if it is a safe's directory; CommandError otherwise (and nothing created)."""
    p = Path(path)
    if not p.exists():
        raise CommandError(p, "no such safe (the path does not exist)")
    if not p.is_dir():
        raise CommandError(p, "not a safe (not a directory)")
    if not is_safe(p):
        raise CommandError(p, "not a safe (no data file in it)")
    return p


def _open(path: Path, **options: Any) -> Safe:
    """Join the safe like another process; recover only if nobody uses it.

    Recovery under live processes is forbidden (they would keep running in the removed region),
    so a safe in use is joined without it: the supervisor of a running node owns recovery. A
    safe nobody uses may need recovery just to open (fresh regions after `restore` or a reboot).
    Joining does not shield the node: a tool killed while joined leaves a dead registrant, which
    the node's workers detect; the supervisor then recovers the cage (nothing acknowledged is
    lost, requests in flight on that cage fail)."""
    return Safe.open(path, recover=not safe_users(path), **options)


@contextlib.contextmanager
def _opened(path: Path, **options: Any) -> Iterator[Safe]:
    """An existing safe (never created), closed on exit."""
    safe = _open(path, create=False, **options)
    try:
        yield safe
    finally:
        safe.close()


def _decode(raw: bytes, *, trust: bool) -> object:
    if trust:
        try:
            return pickle.loads(raw)
        except Exception as e:  # a trusted value may still fail: missing module, bad state
            raise unpickle.UndecodableError(f"{type(e).__name__}: {e}") from e
    return unpickle.loads(raw)


def _show_key(key: str) -> str:
    return key if key.isprintable() else repr(key)


def _pids(pids: list[int]) -> str:
    return ", ".join(map(str, pids))


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _safes_under(data_dir: Path) -> list[Path]:
    root = data_dir / "safe"
    if not root.is_dir():
        raise CommandError(root, "no such directory (DATA_DIR/safe/ holds a node's safes)")
    return [
        p
        for p in sorted(root.iterdir())
        if not p.name.startswith(".") and p.is_dir() and is_safe(p)
    ]


# -- commands --------------------------------------------------------------------------------------


def _rss(pids: list[int]) -> str:
    """Each user's resident set, in the USERS column's order ("-" where /proc cannot say)."""
    sizes = [rss_bytes(pid) for pid in pids]
    return ",".join(human_size(n).replace(" ", "") for n in sizes)


def _list(args: argparse.Namespace) -> int:
    """A table of every safe; a safe that cannot be read gets "?" and one stderr line.

    REGIONS is the disk the shared regions hold (read before opening: our own opening does
    not change it), RSS the resident set of each process in USERS.
    """
    rows: list[tuple[str, ...]] = [
        ("SAFE", "KEYS", "DATA", "LOG", "REGIONS", "CHECKPOINT", "USERS", "RSS")
    ]
    failures = []
    now = time.time()
    for path in _safes_under(Path(args.data_dir)):
        pids = safe_users(path)  # before opening: our own opening would count as a user
        usage = disk_usage(path)
        data, log, regions = (human_size(n) for n in (usage.data, usage.log, usage.regions))
        try:
            with _opened(path, checkpoint_interval=3600) as safe:
                keys = str(len(safe))
                stamp = safe.stats().get("last_checkpoint", 0)
        except SafeError as e:
            failures.append(str(e))
            keys, stamp = "?", 0
        checkpoint = _age(now - stamp) + " ago" if isinstance(stamp, int | float) and stamp else "-"
        entry = (path.name, keys, data, log, regions, checkpoint, _pids(pids), _rss(pids))
        rows.append(tuple(cell or "-" for cell in entry))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
    for failure in failures:
        _say_error(failure)
    return ERROR if failures else OK


def _keys(args: argparse.Namespace) -> int:
    path = _require_safe(args.safe)
    out = sys.stdout
    with _opened(path) as safe:
        for key, _ in safe.raw_items(args.prefix):
            if args.null:
                out.flush()
                out.buffer.write(key.encode("utf-8", "surrogatepass") + b"\0")
            else:
                out.write(_show_key(key) + "\n")
    out.flush()
    return OK


def _get(args: argparse.Namespace) -> int:
    path = _require_safe(args.safe)
    with _opened(path) as safe:
        try:
            raw = safe.get_raw(args.key)
        except KeyError:
            raise CommandError(path, f"no key {args.key!r}", FAILED) from None
    try:
        value = _decode(raw, trust=args.trust)
    except unpickle.UndecodableError as e:
        raise CommandError(
            path, f"key {args.key!r}: value cannot be decoded: {e}", UNDECODABLE
        ) from e
    print(repr(value))
    return OK


def _dump(args: argparse.Namespace) -> int:
    """Stream every record; a file is written beside its name and renamed when complete.

    A dump holds every value of the safe, so a file it creates is its owner's only (0600),
    also when it replaces an existing file. What the user names that is not a plain file (a
    device such as /dev/stdout, a FIFO) or a symlink is written through as it is: its mode and
    the file it points to are not ours to change or replace.
    """
    path = _require_safe(args.safe)
    target = Path(args.output)
    to_stdout = args.output == "-"
    # /dev/stdout is a symlink too: a summary on stdout could land in the dump itself.
    through = not to_stdout and (target.is_symlink() or (target.exists() and not target.is_file()))
    with _opened(path) as safe:
        total = len(safe) + sum(len(safe.queue(name)) for name in safe.queues())
        if to_stdout:
            count = _dump_to(safe, sys.stdout.buffer, total, args.progress)
        else:
            try:
                if through:
                    count = _dump_through(safe, target, total, args.progress)
                else:
                    count = _dump_file(safe, target, total, args.progress)
            except OSError as e:  # the file the user named, not our temporary one beside it
                raise CommandError(target, f"cannot write the dump: {e.strerror or e}") from e
    where = "stdout" if to_stdout else args.output
    summary = sys.stderr if to_stdout or through else sys.stdout
    print(f"{path}: dumped {_what(count)} to {where}", file=summary)
    return OK


def _what(totals: dumpfile.Totals) -> str:
    """ "3 keys (1 expiring) and 2 queue items": a dump's or a load's summary."""
    expiring = f" ({totals.expiring} expiring)" if totals.expiring else ""
    return f"{totals.keys} keys{expiring} and {totals.items} queue items"


def _dump_file(safe: Safe, target: Path, total: int, progress: bool) -> dumpfile.Totals:
    """Dump into a temporary file beside `target`, renamed to it once complete and on disk."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        os.fchmod(fd, DUMP_MODE)  # mkstemp's 0600 is cut by the umask: make it exact
        with os.fdopen(fd, "wb") as stream:
            count = _dump_to(safe, stream, total, progress)
            os.fsync(stream.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return count


def _dump_through(safe: Safe, target: Path, total: int, progress: bool) -> dumpfile.Totals:
    """Write into what the user named as it is (a device, a FIFO, a symlink's target)."""
    with open(target, "wb") as stream:
        count = _dump_to(safe, stream, total, progress)
        if stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
            os.fsync(stream.fileno())
    return count


def _dump_to(safe: Safe, stream: BinaryIO, total: int, progress: bool) -> dumpfile.Totals:
    """Keys in key order, each with its expiry (expired ones are left out), then each queue's
    items in FIFO order, leased ones included (docs/dump-format.md)."""
    writer = dumpfile.DumpWriter(stream)
    keys = expiring = items = 0
    with Progress("dump", total, enabled=True if progress else None) as bar:
        for key, raw, expires_at in safe.raw_records():
            writer.write(key, raw, expires_at)
            keys += 1
            expiring += expires_at is not None
            bar.advance()
        for name in safe.queues():
            for data in safe.queue(name).raw_items():
                writer.write_item(name, data)
                items += 1
                bar.advance()
    writer.finish()
    return dumpfile.Totals(keys, expiring, items)


def _load(args: argparse.Namespace) -> int:
    """Check the whole dump first (so a damaged one writes nothing), then store its records:
    keys replace the safe's (with their expiry time, if any), queue items are appended after
    the items the queues already hold, in the dump's order (docs/dump-format.md)."""
    path = Path(args.safe)
    with _dump_source(args.file) as stream:
        try:
            expected = dumpfile.totals(stream)
        except dumpfile.DumpError as e:
            raise CommandError(args.file, f"refused, nothing loaded: {e}") from None
        stream.seek(0)
        fresh = not path.exists() or (path.is_dir() and not any(path.iterdir()))
        if not fresh and not is_safe(path):
            raise CommandError(path, "not a safe, and not a new or empty directory to load into")
        # Non-durable writes with a checkpoint every so often and at the end: one fsync per key
        # would make a large load crawl, and a load cut short is simply run again (its queue
        # items then appended again: docs/dump-format.md).
        with _open(path, durable=False, max_value_size=1 << 40) as safe:
            keys = expiring = items = 0
            queues: dict[str, Queue] = {}
            try:
                with Progress("load", expected.records, enabled=args.progress or None) as bar:
                    for record in dumpfile.records(stream):
                        if isinstance(record, dumpfile.Item):
                            q = queues.get(record.queue)
                            if q is None:
                                q = queues[record.queue] = safe.queue(record.queue)
                            q.put_raw(record.value)
                            items += 1
                        elif record.expires_at is None:
                            safe.set_raw(record.key, record.value)
                            keys += 1
                        else:
                            safe.set_raw_until(record.key, record.value, record.expires_at)
                            keys += 1
                            expiring += 1
                        bar.advance()
                        if (keys + items) % LOAD_CHECKPOINT_EVERY == 0:
                            safe.checkpoint()
                safe.checkpoint()
            except (SafeError, dumpfile.DumpError) as e:
                done = dumpfile.Totals(keys, expiring, items)
                raise CommandError(
                    path, f"load stopped after {_what(done)} of {_what(expected)}: {e}"
                ) from e
            now = len(safe)
    print(f"{path}: loaded {_what(expected)} from {args.file}; the safe has {now} keys")
    return OK


@contextlib.contextmanager
def _dump_source(name: str) -> Iterator[BinaryIO]:
    """The dump as a seekable file: stdin is spooled to a temporary file to be read twice."""
    if name != "-":
        with open(name, "rb") as f:
            yield f
        return
    spool: IO[bytes]
    with tempfile.TemporaryFile() as spool:
        while chunk := sys.stdin.buffer.read(1 << 20):
            spool.write(chunk)
        spool.seek(0)
        yield spool


def _verify(args: argparse.Namespace) -> int:
    """The database first (Berkeley DB's verify), then every value through the restricted
    unpickler: placeholders count as decoded, a pickle that cannot be built at all does not."""
    path = _require_safe(args.safe)
    try:
        safe_verify(path)
    except SafeBusyError as e:
        raise CommandError(path, f"verify refused: {e.why} (stop those processes first)") from e
    except SafeCorruptError as e:
        raise CommandError(path, f"database damaged: {e.why} ({e.todo})", FAILED) from e
    total, bad, first = 0, 0, ""
    with _opened(path) as safe:
        for key, raw in safe.raw_items():
            total += 1
            try:
                unpickle.loads(raw)
            except unpickle.UndecodableError as e:
                bad += 1
                first = first or f"key {key!r}: {e}"
    if bad:
        raise CommandError(
            path, f"{bad} of {total} values cannot be decoded (first: {first})", UNDECODABLE
        )
    print(f"{path}: ok, {total} keys")
    return OK


def _backup(args: argparse.Namespace) -> int:
    """One safe into DEST, or every safe of a data_dir into DEST/<name>."""
    source, dest = Path(args.source), Path(args.dest)
    if is_safe(source):
        count = safe_backup(source, dest)
        print(f"{source}: backed up {count} keys to {dest}")
        return OK
    if not (source / "safe").is_dir():
        _require_safe(source)  # says why it is neither a safe nor a data_dir
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CommandError(dest, "the destination exists and is not an empty directory")
    safes = _safes_under(source)
    # DEST holds copies of the data: 0700 like each backup in it (pmnc.safe makes a missing
    # DEST so, as it makes every directory it creates for a safe).
    if dest.is_dir() and safes and dest.stat().st_uid == os.geteuid():
        os.chmod(dest, BACKUP_DIR_MODE)
    for path in safes:
        count = safe_backup(path, dest / path.name)
        print(f"{path}: backed up {count} keys to {dest / path.name}")
    return OK


def _restore(args: argparse.Namespace) -> int:
    """Onto a new path, an empty directory or a stopped safe: never over anything else, which
    restore would replace whole (and delete)."""
    target = Path(args.safe)
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise CommandError(target, "restore refused: not a directory (give a safe's directory)")
        if any(target.iterdir()) and not is_safe(target):
            raise CommandError(
                target,
                "restore refused: not a safe (no data file) and not empty: "
                "give a new path, an empty directory or an existing safe",
            )
    count = safe_restore(args.backup, args.safe)
    print(f"{args.safe}: restored {count} keys from {args.backup}")
    return OK


def _recover(args: argparse.Namespace) -> int:
    path = _require_safe(args.safe)
    try:  # pmnc.safe checks the users itself, just before recovering
        seconds = safe_recover(path, catastrophic=args.catastrophic)
    except SafeBusyError as e:
        raise CommandError(path, f"recover refused: {e.why} (stop them first)") from e
    kind = "catastrophic recovery" if args.catastrophic else "recovery"
    print(f"{path}: {kind} done in {seconds:.2f}s")
    return OK
