"""The `pmnc-dump` formats: a safe's keys, expiries and queue items, with a checked trailer.

Layout (docs/dump-format.md; integers big-endian):

    b"pmnc-dump 2\\n"                 (b"pmnc-dump 1\\n": version 1, "R" records only)
    key:           b"R"  u32 key length  key (UTF-8, surrogatepass)  u64 value length  value
    expiring key:  b"T"  u32 key length  key  f64 expiry (wall-clock s)  u64 value length  value
    queue item:    b"Q"  u32 name length  queue name (UTF-8)  u64 item length  item
    trailer:       b"E"  u64 record count  SHA-256 of every byte before this b"E" (32 bytes)

Values and items are the pickles exactly as the safe stores them, so writing and reading a dump
never unpickles anything. The trailer is what makes a truncated or altered file detectable: a
reader only trusts a dump once it has reached a trailer whose count and digest match, so `check`
is run over the whole file before anything is loaded from it. `DumpWriter` writes version 2;
readers take both.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

__all__ = [
    "MAGIC",
    "MAGIC_V1",
    "DumpError",
    "DumpWriter",
    "Item",
    "Key",
    "Totals",
    "check",
    "records",
    "totals",
]

MAGIC_V1 = b"pmnc-dump 1\n"
MAGIC = b"pmnc-dump 2\n"
_KEY, _EXPIRING, _ITEM, _END = b"R", b"T", b"Q", b"E"
_TAGS = {MAGIC_V1: (_KEY,), MAGIC: (_KEY, _EXPIRING, _ITEM)}
_NAME_LEN = struct.Struct(">I")
_VALUE_LEN = struct.Struct(">Q")
_TIME = struct.Struct(">d")
_COUNT = struct.Struct(">Q")
_DIGEST_SIZE = 32
# Long fields are read in pieces: a damaged length must not make us allocate it up front.
_CHUNK = 1 << 20


class DumpError(ValueError):
    """The file is not a complete, intact pmnc dump; the message says where it went wrong."""


class Key(NamedTuple):
    """A key record: the stored pickle, and the key's expiry (wall clock) or None."""

    key: str
    value: bytes
    expires_at: float | None = None


class Item(NamedTuple):
    """A queue item record: the queue's name and the item's stored pickle."""

    queue: str
    value: bytes


class Totals(NamedTuple):
    """What an intact dump holds."""

    keys: int
    expiring: int  # of `keys`
    items: int

    @property
    def records(self) -> int:
        return self.keys + self.items


class DumpWriter:
    """Append records to a binary stream in format 2; `finish` writes the trailer (without it,
    no reader accepts the file)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()
        self.count = 0
        self._emit(MAGIC)

    def _emit(self, data: bytes) -> None:
        self._hash.update(data)
        self._stream.write(data)

    def write(self, key: str, value: bytes, expires_at: float | None = None) -> None:
        """One key: `value` is the stored pickle, written as is; `expires_at` its expiry."""
        k = key.encode("utf-8", "surrogatepass")
        if expires_at is None:
            head = _KEY + _NAME_LEN.pack(len(k)) + k
        else:
            if not expires_at > 0 or not math.isfinite(expires_at):
                raise ValueError(f"an expiry time must be > 0 and finite, got {expires_at!r}")
            head = _EXPIRING + _NAME_LEN.pack(len(k)) + k + _TIME.pack(expires_at)
        self._emit(head + _VALUE_LEN.pack(len(value)))
        self._emit(value)
        self.count += 1

    def write_item(self, queue: str, value: bytes) -> None:
        """One queue item (its stored pickle); a queue's items are written in its FIFO order."""
        name = queue.encode("utf-8", "surrogatepass")
        self._emit(_ITEM + _NAME_LEN.pack(len(name)) + name + _VALUE_LEN.pack(len(value)))
        self._emit(value)
        self.count += 1

    def finish(self) -> None:
        """Write the trailer: the record count and the digest of everything before it."""
        self._stream.write(_END + _COUNT.pack(self.count) + self._hash.digest())
        self._stream.flush()


class _Reader:
    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()
        self.offset = 0

    def raw(self, n: int, what: str) -> bytes:
        """Exactly `n` bytes, or DumpError naming what was cut short and where."""
        parts, left = [], n
        while left:
            part = self._stream.read(min(left, _CHUNK))
            if not part:
                raise DumpError(f"truncated at byte {self.offset + n - left}: incomplete {what}")
            parts.append(part)
            left -= len(part)
        self.offset += n
        return b"".join(parts)

    def read(self, n: int, what: str) -> bytes:
        return self.absorb(self.raw(n, what))

    def absorb(self, data: bytes) -> bytes:
        """Count bytes read by `raw` into the digest (the trailer's own bytes are not)."""
        self._hash.update(data)
        return data

    def digest(self) -> bytes:
        return self._hash.digest()

    def text(self, start: int, what: str) -> str:
        """A u32-length-prefixed UTF-8 (surrogatepass) field: a key or a queue name."""
        (length,) = _NAME_LEN.unpack(self.read(_NAME_LEN.size, f"{what} length"))
        data = self.read(length, what)
        try:
            return data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as e:
            raise DumpError(f"damaged at byte {start}: the {what} is not UTF-8 ({e})") from None


def records(stream: BinaryIO) -> Iterator[Key | Item]:
    """Yield every record (`Key` or `Item`) in file order; DumpError on any damage.

    The trailer is checked only after the last record has been yielded: call `check` first
    when nothing may be acted on before the whole file is known to be intact.
    """
    reader = _Reader(stream)
    magic = reader.read(len(MAGIC), "header")
    if magic not in _TAGS:
        raise DumpError("not a pmnc dump (expected the header line 'pmnc-dump 1' or 'pmnc-dump 2')")
    tags = _TAGS[magic]
    count = 0
    while True:
        start = reader.offset
        tag = reader.raw(1, "record tag (no trailer: the dump was cut short)")
        if tag == _END:
            break
        if tag not in tags:
            raise DumpError(f"damaged at byte {start}: unknown record tag {tag!r}")
        reader.absorb(tag)
        record: Key | Item
        if tag == _ITEM:
            name = reader.text(start, "queue name")
            if not name:
                raise DumpError(f"damaged at byte {start}: an empty queue name")
            (length,) = _VALUE_LEN.unpack(reader.read(_VALUE_LEN.size, "item length"))
            record = Item(name, reader.read(length, "item"))
        else:
            key = reader.text(start, "key")
            expires: float | None = None
            if tag == _EXPIRING:
                (expires,) = _TIME.unpack(reader.read(_TIME.size, "expiry time"))
                if not expires > 0 or not math.isfinite(expires):
                    raise DumpError(f"damaged at byte {start}: expiry time {expires!r}")
            (length,) = _VALUE_LEN.unpack(reader.read(_VALUE_LEN.size, "value length"))
            record = Key(key, reader.read(length, "value"), expires)
        count += 1
        yield record
    digest, end = reader.digest(), reader.offset - 1
    (expected,) = _COUNT.unpack(reader.raw(_COUNT.size, "trailer"))
    if reader.raw(_DIGEST_SIZE, "trailer") != digest:
        raise DumpError(
            f"checksum mismatch over bytes 0-{end - 1} (trailer at byte {end}): "
            "the dump was altered or damaged"
        )
    if expected != count:
        raise DumpError(
            f"the trailer at byte {end} counts {expected} records, the file holds {count}"
        )
    if stream.read(1):
        raise DumpError(f"unexpected data after the trailer at byte {reader.offset}")


def totals(stream: BinaryIO) -> Totals:
    """Read a whole dump without keeping it; what it holds, or DumpError."""
    keys = expiring = items = 0
    for record in records(stream):
        if isinstance(record, Item):
            items += 1
        else:
            keys += 1
            expiring += record.expires_at is not None
    return Totals(keys, expiring, items)


def check(stream: BinaryIO) -> int:
    """Read a whole dump without keeping it; return its record count or raise DumpError."""
    return totals(stream).records
