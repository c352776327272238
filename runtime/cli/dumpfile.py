"""The `pmnc-dump 1` format: a safe's keys and pickled values, streamed, with a checked trailer.

Layout (docs/dump-format.md; integers big-endian):

    b"pmnc-dump 1\\n"
    per key:  b"R"  u32 key length  key (UTF-8, surrogatepass)  u64 value length  value (pickle)
    trailer:  b"E"  u64 record count  SHA-256 of every byte before this b"E" (32 bytes)

Values are the pickles exactly as the safe stores them, so writing and reading a dump never
unpickles anything. The trailer is what makes a truncated or altered file detectable: a reader
only trusts a dump once it has reached a trailer whose count and digest match, so `check` is run
over the whole file before anything is loaded from it.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from typing import BinaryIO

__all__ = ["MAGIC", "DumpError", "DumpWriter", "check", "records"]

MAGIC = b"pmnc-dump 1\n"
_RECORD, _END = b"R", b"E"
_KEY_LEN = struct.Struct(">I")
_VALUE_LEN = struct.Struct(">Q")
_COUNT = struct.Struct(">Q")
_DIGEST_SIZE = 32
# Long fields are read in pieces: a damaged length must not make us allocate it up front.
_CHUNK = 1 << 20


class DumpError(ValueError):
    """The file is not a complete, intact pmnc dump; the message says where it went wrong."""


class DumpWriter:
    """Append records to a binary stream; `finish` writes the trailer (without it, no reader
    accepts the file)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()
        self.count = 0
        self._emit(MAGIC)

    def _emit(self, data: bytes) -> None:
        self._hash.update(data)
        self._stream.write(data)

    def write(self, key: str, value: bytes) -> None:
        """One record: `value` is the stored pickle, written as is."""
        k = key.encode("utf-8", "surrogatepass")
        self._emit(_RECORD + _KEY_LEN.pack(len(k)) + k + _VALUE_LEN.pack(len(value)))
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


def records(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """Yield (key, pickled value) in file order; DumpError on any damage.

    The trailer is checked only after the last record has been yielded: call `check` first
    when nothing may be acted on before the whole file is known to be intact.
    """
    reader = _Reader(stream)
    if reader.read(len(MAGIC), "header") != MAGIC:
        raise DumpError("not a pmnc dump (expected the header line 'pmnc-dump 1')")
    count = 0
    while True:
        start = reader.offset
        tag = reader.raw(1, "record tag (no trailer: the dump was cut short)")
        if tag == _END:
            break
        if tag != _RECORD:
            raise DumpError(f"damaged at byte {start}: unknown record tag {tag!r}")
        reader.absorb(tag)
        (key_len,) = _KEY_LEN.unpack(reader.read(_KEY_LEN.size, "key length"))
        key_bytes = reader.read(key_len, "key")
        (value_len,) = _VALUE_LEN.unpack(reader.read(_VALUE_LEN.size, "value length"))
        value = reader.read(value_len, "value")
        try:
            key = key_bytes.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as e:
            raise DumpError(f"damaged at byte {start}: the key is not UTF-8 ({e})") from None
        count += 1
        yield key, value
    digest = reader.digest()
    (expected,) = _COUNT.unpack(reader.raw(_COUNT.size, "trailer"))
    if reader.raw(_DIGEST_SIZE, "trailer") != digest:
        raise DumpError("checksum mismatch: the dump was altered or damaged")
    if expected != count:
        raise DumpError(f"the trailer counts {expected} records, the file holds {count}")
    if stream.read(1):
        raise DumpError(f"unexpected data after the trailer at byte {reader.offset}")


def check(stream: BinaryIO) -> int:
    """Read a whole dump without keeping it; return its record count or raise DumpError."""
    n = 0
    for _ in records(stream):
        n += 1
    return n
