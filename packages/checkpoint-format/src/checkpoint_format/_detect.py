"""Spec §2: classify an object as tarball, raw payload or no checkpoint from a bounded prefix."""

from __future__ import annotations

import dataclasses
import io
from typing import BinaryIO, Literal

from . import _codec
from ._errors import CorruptArchiveError
from ._spec import BLOCK
from ._tarheader import is_header_block

__all__ = ["PREFIX_SIZE", "Detection", "PrefixedReader", "detect", "sniff"]

#: CF-DETECT-01: the most of an object (compressed bytes) that classification reads.
PREFIX_SIZE = 65_536
#: CF-DETECT-01: the most of the decompressed stream that classification looks at.
_DECOMPRESSED_LOOK = 10_241
#: The largest stream CF-DETECT-04 (2) still calls an empty archive: one 10 KiB tar record.
_EMPTY_ARCHIVE_MAX = 10_240
_EMPTY_ARCHIVE_MIN = 2 * BLOCK
_FEED_SMALL = 16  # until the first block has decoded
_FEED_LARGE = 4096

Kind = Literal["tarball", "raw", "none"]


@dataclasses.dataclass(frozen=True)
class Detection:
    """What an object is: ``kind`` (``tarball``, ``raw`` or ``none``) and its ``compression``."""

    kind: Kind
    compression: str
    #: Which clause of the spec decided, for inspect output and tests.
    reason: str


def _decompressed_head(prefix: bytes, compression: str, complete: bool) -> tuple[bytes, bool]:
    """Up to ``_DECOMPRESSED_LOOK`` bytes of the decoded prefix, and whether the stream ended."""
    decoder = _codec.Decoder(compression)
    head = bytearray()
    try:
        # Fed in small pieces so that what decodes is seen before a later fault (a bad CRC
        # in the trailer of a tiny archive) stops the decoder: that is a corrupt tarball,
        # to be reported as such by the reader, not a raw payload (CF-DETECT-04/-05).
        start = 0
        while start < len(prefix):
            step = _FEED_SMALL if len(head) < BLOCK else _FEED_LARGE
            for chunk in decoder.feed(prefix[start : start + step]):
                head += chunk
                if len(head) >= _DECOMPRESSED_LOOK:
                    return bytes(head[:_DECOMPRESSED_LOOK]), False
            start += step
    except CorruptArchiveError:
        return bytes(head), False
    ended = complete and decoder.at_member_boundary
    return bytes(head), ended


def detect(prefix: bytes, *, complete: bool) -> Detection:
    """Classify an object from its first bytes.

    ``prefix`` is the first ``PREFIX_SIZE`` bytes of the object (or all of it, if shorter);
    ``complete`` says whether ``prefix`` is the whole object.
    """
    prefix = prefix[:PREFIX_SIZE]
    if not prefix:
        return Detection("none", _codec.NONE, "CF-OBJ-03: zero-byte object")
    compression = _codec.sniff_compression(prefix)
    if compression == _codec.NONE:
        if is_header_block(prefix[:BLOCK]):
            return Detection("tarball", compression, "CF-DETECT-04(1): first block is a tar header")
        return Detection("raw", compression, "CF-DETECT-04: first block is not a tar header")
    head, ended = _decompressed_head(prefix, compression, complete)
    if is_header_block(head[:BLOCK]):
        return Detection(
            "tarball", compression, "CF-DETECT-04(1): first decompressed block is a tar header"
        )
    if (
        ended
        and _EMPTY_ARCHIVE_MIN <= len(head) <= _EMPTY_ARCHIVE_MAX
        and len(head) % BLOCK == 0
        and not head.strip(b"\0")
    ):
        return Detection("tarball", compression, "CF-DETECT-04(2): compressed empty archive")
    return Detection(
        "raw", compression, "CF-DETECT-04: decompressed stream does not start a tar archive"
    )


class PrefixedReader(io.RawIOBase):
    """A binary stream that replays an already-read prefix, then continues with the source."""

    def __init__(self, prefix: bytes, source: BinaryIO) -> None:
        super().__init__()
        self._prefix = memoryview(prefix)
        self._source = source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        data = self._source.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n

    def read(self, size: int = -1) -> bytes:
        if self._prefix:
            if size is None or size < 0:
                data = bytes(self._prefix) + self._source.read()
                self._prefix = memoryview(b"")
                return data
            data = bytes(self._prefix[:size])
            self._prefix = self._prefix[size:]
            return data
        return self._source.read(size)

    def read_pieces(self, size: int = -1) -> list[bytes | memoryview]:
        """Like :meth:`read`, as the buffers the source handed out, unjoined (``[]`` at the
        end): the prefix's rest as a view, then the source's own ``read_pieces`` where it
        has one (a streaming object reader), else one ``read``."""
        if self._prefix:
            if size is not None and 0 <= size < len(self._prefix):
                piece, self._prefix = self._prefix[:size], self._prefix[size:]
                return [piece]
            piece, self._prefix = self._prefix, memoryview(b"")
            if size is None or size < 0:
                return [piece, *read_pieces_of(self._source, -1)]
            return [piece]
        return read_pieces_of(self._source, size)


def read_pieces_of(source: BinaryIO, size: int) -> list[bytes | memoryview]:
    """``source.read_pieces(size)`` if the source has it, else ``[source.read(size)]``."""
    read_pieces = getattr(source, "read_pieces", None)
    if read_pieces is not None:
        return [piece for piece in read_pieces(size) if len(piece)]
    data = source.read(size)
    return [data] if data else []


def read_up_to(source: BinaryIO, size: int) -> bytes:
    """Read until ``size`` bytes or end of stream (a single ``read`` may return less)."""
    parts = []
    remaining = size
    while remaining > 0:
        chunk = source.read(remaining)
        if not chunk:
            break
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


def sniff(source: BinaryIO) -> tuple[Detection, BinaryIO]:
    """Read a bounded prefix of ``source`` and classify it.

    Returns the detection and a stream that yields the whole object again from its start,
    so that nothing is downloaded twice.
    """
    prefix = read_up_to(source, PREFIX_SIZE)
    complete = len(prefix) < PREFIX_SIZE
    detection = detect(prefix, complete=complete)
    return detection, PrefixedReader(prefix, source)
