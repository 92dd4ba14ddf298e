"""Compression: multi-member decoding for gzip, bzip2 and xz; the writer's gzip member encoder.

ISA-L (the ``fast`` extra, PyPI ``isal``) is used when importable: it emits the same format
(RFC 1951/1952) several times faster than zlib. Nothing here does I/O of its own.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from collections.abc import Callable, Iterator

from ._errors import CorruptArchiveError

try:  # optional speed extra
    from isal import isal_zlib as _fast_zlib
except ImportError:  # pragma: no cover - exercised when the extra is absent
    _fast_zlib = None

GZIP = "gzip"
BZIP2 = "bzip2"
XZ = "xz"
NONE = "none"

#: Largest decompressed chunk handed to the tar reader at once: bounds memory on bombs.
OUT_CHUNK = 1 << 20

_GZIP_MAGIC = b"\x1f\x8b\x08"


def sniff_compression(prefix: bytes) -> str:
    """CF-DETECT-02: the compression named by the object's leading bytes."""
    if prefix.startswith(_GZIP_MAGIC):
        return GZIP
    if prefix[:3] == b"BZh" and prefix[3:4] in b"123456789" and len(prefix) >= 4:
        return BZIP2
    if prefix.startswith(b"\xfd7zXZ\x00"):
        return XZ
    return NONE


def codec_name() -> str:
    """Which deflate implementation this process uses (for logs and benchmarks)."""
    return "isal" if _fast_zlib is not None else "zlib"


# --------------------------------------------------------------------------- decoding


class _Member:
    """Adapts zlib/isal, bz2 and lzma decompressors to one interface (max_length, tail, eof)."""

    def __init__(self, compression: str) -> None:
        self.compression = compression
        if compression == GZIP:
            self._d = (_fast_zlib or zlib).decompressobj(wbits=31)
        elif compression == BZIP2:
            self._d = bz2.BZ2Decompressor()
        else:
            self._d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        self._pending = b""
        self._head = b"" if compression == GZIP else None  # gzip header bytes not yet checked

    def decompress(self, data: bytes, max_length: int) -> bytes:
        """Feed ``data`` (may be empty to drain) and return at most ``max_length`` bytes."""
        if self._head is not None:
            # RFC 1952: reserved FLG bits must be zero. zlib refuses them and ISA-L does not;
            # check here so that the optional extra never changes what is accepted.
            self._head += data
            if len(self._head) < 4:
                return b""
            if self._head[3] & 0xE0:
                raise CorruptArchiveError(
                    "CF-INTEG-03", "gzip member header has reserved flag bits set"
                )
            data, self._head = self._head, None
        if self.compression == GZIP:
            out = self._d.decompress(self._pending + data, max_length)
            self._pending = self._d.unconsumed_tail
            return out
        if data and self._pending:  # bz2/lzma buffer internally; never hand them data twice
            data = self._pending + data
            self._pending = b""
        return self._d.decompress(data, max_length)

    @property
    def needs_input(self) -> bool:
        if self.compression == GZIP:
            return not self._pending
        return self._d.needs_input

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def unused_data(self) -> bytes:
        return self._d.unused_data


_FIRST_MAGIC_BYTE = {GZIP: 0x1F, BZIP2: 0x42, XZ: 0xFD}


class Decoder:
    """Incremental decoder for a possibly multi-member compressed stream.

    ``feed(data)`` yields decompressed chunks of at most ``OUT_CHUNK`` bytes; ``finish()``
    checks that the stream ended on a member boundary. Zero bytes after the last member are
    accepted (CF-INTEG-05); anything else raises :class:`CorruptArchiveError`.
    """

    def __init__(self, compression: str) -> None:
        self.compression = compression
        self._member: _Member | None = None
        self._started = False
        self._trailing_zeros = False
        self.compressed_in = 0
        self.decompressed_out = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        self.compressed_in += len(data)
        drain = False
        while data or drain:
            if self._member is None:
                if not data:
                    return
                if self._trailing_zeros or (self._started and data[0] == 0):
                    self._trailing_zeros = True
                    if data.strip(b"\0"):
                        raise self._trailing_garbage()
                    return
                if self._started and data[0] != _FIRST_MAGIC_BYTE[self.compression]:
                    raise self._trailing_garbage()
                self._member = _Member(self.compression)
                self._started = True
            member = self._member
            try:
                out = member.decompress(data, OUT_CHUNK)
            except CorruptArchiveError:
                raise
            except Exception as exc:  # zlib.error, OSError, EOFError, LZMAError, isal's error
                raise CorruptArchiveError(
                    "CF-INTEG-03", f"{self.compression} stream is corrupt: {exc}"
                ) from None
            data = b""
            if out:
                self.decompressed_out += len(out)
                yield out
            if member.eof:
                data = member.unused_data
                self._member = None
                drain = False
            else:
                drain = len(out) == OUT_CHUNK or not member.needs_input

    def _trailing_garbage(self) -> CorruptArchiveError:
        return CorruptArchiveError(
            "CF-INTEG-05", f"unexpected data after the last {self.compression} member"
        )

    @property
    def at_member_boundary(self) -> bool:
        """True when every byte fed so far belongs to complete members (or trailing zeros)."""
        return self._started and self._member is None

    def finish(self) -> None:
        """The input is exhausted: the last member must be complete."""
        if not self.at_member_boundary:
            raise CorruptArchiveError(
                "CF-INTEG-01",
                f"{self.compression} stream ends in the middle of a member (truncated)",
            )


# --------------------------------------------------------------------------- encoding

_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # CF-WRITE-01: no mtime/name, OS=255
_STORED_MAX = 0xFFFF
_SAMPLE = 16 << 10

#: Level used for compressible slices when the caller asks for ``"auto"``.
AUTO_LEVEL = 1
#: A sample that does not shrink below this fraction is stored, not compressed.
STORE_THRESHOLD = 0.90


def _stored_deflate(data: memoryview) -> list[bytes | memoryview]:
    """Raw deflate made of stored blocks (BTYPE=00): a memcpy, no compression work."""
    parts: list[bytes | memoryview] = []
    size = len(data)
    if size == 0:
        return [b"\x01\x00\x00\xff\xff"]
    for start in range(0, size, _STORED_MAX):
        block = data[start : start + _STORED_MAX]
        final = 1 if start + _STORED_MAX >= size else 0
        parts.append(struct.pack("<BHH", final, len(block), len(block) ^ 0xFFFF))
        parts.append(block)
    return parts


def _deflate(data: memoryview, level: int) -> bytes:
    impl = _fast_zlib or zlib
    level = min(level, 3) if _fast_zlib is not None else level  # isal levels are 0..3
    compressor = impl.compressobj(level, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()


def _worth_compressing(data: memoryview) -> bool:
    """Judge a slice by compressing a small sample from its middle at the fastest level."""
    if len(data) <= _SAMPLE:
        sample = data
    else:
        mid = (len(data) - _SAMPLE) // 2
        sample = data[mid : mid + _SAMPLE]
    squeezed = len((_fast_zlib or zlib).compress(sample, 1))
    return squeezed < STORE_THRESHOLD * len(sample)


def gzip_member(data: bytes | memoryview, level: int | str = "auto") -> bytes:
    """One complete gzip member holding ``data``.

    ``level`` is 0-9, or ``"auto"``: slices whose sample does not compress are stored, the
    rest use ``AUTO_LEVEL``. Thread-safe; zlib, isal, crc32 release the GIL on large buffers.
    """
    view = memoryview(data).cast("B")
    if level == "auto":
        level = AUTO_LEVEL if _worth_compressing(view) else 0
    if not isinstance(level, int) or not 0 <= level <= 9:
        raise ValueError(f"compression level must be 0-9 or 'auto', got {level!r}")
    body: list[bytes | memoryview] = (
        _stored_deflate(view) if level == 0 else [_deflate(view, level)]
    )
    trailer = struct.pack("<II", (_fast_zlib or zlib).crc32(view), len(view) & 0xFFFFFFFF)
    return b"".join([_GZIP_HEADER, *body, trailer])


ReadFn = Callable[[int], bytes]
