"""Reading a tar archive from elsewhere without letting Python's tar reader parse a crafted header.

:func:`tar_stream` gives :mod:`tarfile` (in stream mode, ``"r|"``) the decompressed archive through
:class:`_HeaderGuard`, which follows the 512-byte header blocks as they pass and refuses an
oversized extended header before ``tarfile`` sees it (faults.md #41).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import re
from collections.abc import Iterator
from pathlib import Path

from sd35trt.errors import UnsafeArtifactError

#: Largest PAX (``x``, ``g``) or GNU long-name (``L``, ``K``) extended header read (bytes). Real
#: ones hold a long path and a few numbers; Python's tar reader takes time quadratic in a crafted
#: one's size before 3.11.10 / 3.12.6 (CVE-2024-6232: 411 bytes of gzip, a long run of digits
#: once expanded, cost 130 s of CPU), so larger ones are refused before it parses them, whatever
#: the interpreter's patch level; at this size the quadratic search costs milliseconds.
MAX_EXTENDED_HEADER_BYTES = 16 * 1024
_BLOCK = 512
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")  # tarfile's own record pattern


class _HeaderGuard(io.RawIOBase):
    """A tar stream that checks each 512-byte header block as the tar reader reads it.

    It follows the stream as :mod:`tarfile` does (a header, then its data rounded up to 512
    bytes; a PAX ``size`` record overriding the next member's, or every later one's for a global
    header) and refuses an extended header (PAX ``x`` / ``g``, GNU ``L`` / ``K``) larger than
    :data:`MAX_EXTENDED_HEADER_BYTES` before its bytes are passed on.
    """

    def __init__(self, raw: io.BufferedIOBase, archive: Path) -> None:
        super().__init__()
        self._raw, self._archive = raw, archive
        self._header = b""  # the part of the current header block read so far
        self._skip = 0  # data bytes before the next header block
        self._pax: bytearray | None = None  # the extended header being collected
        self._pax_global = False
        self._size_next: int | None = None  # a PAX "size" for the next member
        self._size_all: int | None = None  # a global PAX "size"
        self._padding = 0  # the zeros after an extended header's records
        self._lost = False  # a header the tar reader will refuse too: stop following

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self._raw.read(len(buffer))
        if not self._lost:
            self._follow(data)
        buffer[: len(data)] = data
        return len(data)

    def _follow(self, data: bytes) -> None:
        i = 0
        while i < len(data) and not self._lost:
            if self._skip:
                k = min(self._skip, len(data) - i)
                if self._pax is not None:
                    self._pax += data[i : i + k]
                self._skip -= k
                i += k
                if not self._skip and self._pax is not None:
                    self._pax_done()
                continue
            k = min(_BLOCK - len(self._header), len(data) - i)
            self._header += data[i : i + k]
            i += k
            if len(self._header) == _BLOCK:
                block, self._header = self._header, b""
                self._block(block)

    def _block(self, block: bytes) -> None:
        if block == bytes(_BLOCK):
            return  # end-of-archive blocks
        try:
            size = _tar_number(block[124:136])
        except ValueError:
            self._lost = True  # tarfile raises on it too and reads no further header
            return
        kind = block[156:157]
        if kind in (b"x", b"g", b"L", b"K"):
            if size > MAX_EXTENDED_HEADER_BYTES:
                name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")[:80]
                raise UnsafeArtifactError(
                    f"{self._archive}: member {name!r} is an extended tar header of {size} bytes, more "
                    f"than the {MAX_EXTENDED_HEADER_BYTES} allowed (a crafted archive?)"
                )
            if kind in (b"x", b"g"):  # collect its records (for "size"), then skip the padding
                self._pax, self._pax_global, self._padding = bytearray(), kind == b"g", -size % _BLOCK
                self._skip = size
                if size == 0:
                    self._pax_done()
                return
        elif self._size_next is not None or self._size_all is not None:
            size = self._size_next if self._size_next is not None else self._size_all
            self._size_next = None
        self._skip = -(-size // _BLOCK) * _BLOCK

    def _pax_done(self) -> None:
        records, self._pax = bytes(self._pax or b""), None
        size = _pax_size(records)
        if size is not None:
            if self._pax_global:
                self._size_all = size
            else:
                self._size_next = size
        self._skip = self._padding


def _tar_number(field: bytes) -> int:
    """A tar header's numeric field, read as :mod:`tarfile` reads it (octal text or base-256)."""
    if field[0] in (0o200, 0o377):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0o377 else n
    text = field.split(b"\0", 1)[0].decode("ascii")  # UnicodeDecodeError is a ValueError
    return int(text.strip() or "0", 8)


def _pax_size(records: bytes) -> int | None:
    """The ``size`` a PAX header sets (as :mod:`tarfile` applies it: an unreadable number is 0)."""
    size, pos = None, 0
    while pos < len(records):
        m = _PAX_RECORD.match(records, pos)
        if m is None or int(m[1]) < 1:
            break
        length = int(m[1])
        if m[2] == b"size":
            try:
                size = int(records[m.end() : pos + length - 1])
            except ValueError:
                size = 0
        pos += length
    return size


@contextlib.contextmanager
def tar_stream(archive: Path) -> Iterator[io.BufferedReader]:
    """``archive`` (gzip-compressed or not) as a checked tar stream (see :class:`_HeaderGuard`)."""
    with open(archive, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        source = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        try:
            yield io.BufferedReader(_HeaderGuard(source, archive), 1 << 20)
        finally:
            source.close()
