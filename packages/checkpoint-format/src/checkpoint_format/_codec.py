"""Compression: multi-member decoding for gzip, bzip2 and xz; the writer's gzip member encoder.

ISA-L (the ``fast`` extra, PyPI ``isal``) is used when importable: it emits the same format
(RFC 1951/1952) several times faster than zlib. Nothing here does I/O of its own, except
:class:`GzipMembers`, which pulls the object through the read function it is given.
"""

from __future__ import annotations

import bz2
import collections
import lzma
import struct
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from ._errors import CorruptArchiveError
from ._spec import PADDING_RECORD_ID, SIZE_RECORD, SIZE_RECORD_ID
from ._width import decode_width

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

#: Members whose recorded sizes are within this bound are cut out whole and inflated on a
#: worker; larger ones stream through one decompressor (CF-INTEG-06 allows either).
WHOLE_MEMBER_MAX = 16 << 20
_FEXTRA = 0x04
_RESERVED_FLAGS = 0xE0


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

_FIRST_MAGIC_BYTE = {GZIP: 0x1F, BZIP2: 0x42, XZ: 0xFD}


def _check_gzip_flags(head: bytes | bytearray) -> None:
    """RFC 1952: the reserved FLG bits of the gzip member header starting ``head`` (at
    least 4 bytes) must be zero. zlib refuses them and ISA-L does not; both decoders check
    here, so that the optional extra never changes what is accepted."""
    if head[3] & _RESERVED_FLAGS:
        raise CorruptArchiveError("CF-INTEG-03", "gzip member header has reserved flag bits set")


def _starts_member(data: bytes | bytearray, compression: str) -> bool:
    """CF-INTEG-05, at a boundary after a complete member: whether ``data`` (not empty)
    begins another member (True) or the zero bytes that may end the object (False, their
    rest to be checked with :func:`_check_zeros`). Anything else is refused."""
    if data[0] == 0:
        return False
    if data[0] != _FIRST_MAGIC_BYTE[compression]:
        raise _trailing_garbage(compression)
    return True


def _check_zeros(data: bytes | bytearray, compression: str) -> None:
    """CF-INTEG-05: after the last member, zero bytes only."""
    if data.strip(b"\0"):
        raise _trailing_garbage(compression)


def _trailing_garbage(compression: str) -> CorruptArchiveError:
    return CorruptArchiveError(
        "CF-INTEG-05", f"unexpected data after the last {compression} member"
    )


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
        if self._head is not None:  # the header's flags are checked before zlib sees it
            self._head += data
            if len(self._head) < 4:
                return b""
            _check_gzip_flags(self._head)
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
                if self._trailing_zeros or (
                    self._started and not _starts_member(data, self.compression)
                ):
                    self._trailing_zeros = True
                    _check_zeros(data, self.compression)
                    return
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


# --------------------------------------------------------------------------- gzip members

_NEED = object()  # member_record: the buffer does not yet hold the whole header


def member_record(head: bytes | bytearray) -> tuple[int, int] | object | None:
    """The member-size record (CF-WRITE-11) of the gzip member starting ``head``.

    Returns ``(member_length, inflated_size)``, ``None`` when the member has no record, or
    :data:`_NEED` when ``head`` is too short to tell (the header's extra field is not all
    there yet). Raises :class:`CorruptArchiveError` for reserved flags, an extra field whose
    subfields overrun it, or a record that cannot be right (CF-INTEG-06).
    """
    if len(head) < 10:
        return _NEED
    _check_gzip_flags(head)
    if not head[3] & _FEXTRA:
        return None
    if len(head) < 12:
        return _NEED
    (extra_length,) = struct.unpack_from("<H", head, 10)
    if len(head) < 12 + extra_length:
        return _NEED
    position, end = 12, 12 + extra_length
    record = None
    while position < end:
        if end - position < 4:
            raise CorruptArchiveError(
                "CF-INTEG-03", "gzip extra field ends inside a subfield header"
            )
        subfield, length = struct.unpack_from("<2sH", head, position)
        position += 4
        if position + length > end:
            raise CorruptArchiveError("CF-INTEG-03", "gzip extra subfield overruns the extra field")
        if subfield == SIZE_RECORD_ID:
            if record is not None:
                raise CorruptArchiveError(
                    "CF-INTEG-06", "gzip member-size subfield appears twice in one extra field"
                )
            if length != SIZE_RECORD.size:
                raise CorruptArchiveError(
                    "CF-INTEG-06", f"gzip member-size subfield has LEN {length} (must be 16)"
                )
            record = SIZE_RECORD.unpack_from(head, position)
        position += length
    if record is not None and record[0] < end + _GZIP_TRAILER_SIZE:
        raise CorruptArchiveError(
            "CF-INTEG-06", f"gzip member-size record says {record[0]} bytes, less than its header"
        )
    return record


#: A member read in more pieces than this (the network's buffers, tens to hundreds of KiB
#: each) is joined into one buffer first, on the inflating worker: one output per piece
#: would hand the tar reader and the file writers thousands of small chunks per GiB.
_JOIN_PIECES = 4


def inflate_member(pieces: list[bytes | memoryview], inflated_size: int,
                   offset: int) -> list[bytes]:
    """Inflate one whole gzip member, given as the pieces it was read in (any buffers),
    whose record says it is exactly those bytes and inflates to ``inflated_size`` bytes.
    Checks CRC-32 and ISIZE (the decompressor) and the record (CF-INTEG-06). Thread-safe:
    zlib and ISA-L release the GIL while inflating, ``bytes.join`` while joining large
    buffers."""
    decompressor = (_fast_zlib or zlib).decompressobj(wbits=31)
    length = sum(map(len, pieces))
    if len(pieces) > _JOIN_PIECES:
        pieces = [b"".join(pieces)]
    outs: list[bytes] = []
    produced = 0
    problem = None
    try:
        for index, piece in enumerate(pieces):
            # One output per piece read (a whole member, for local and most network reads):
            # outputs cut smaller cost page faults in every worker thread's arena. The reader
            # bounds what it holds in bytes, not in outputs.
            out = decompressor.decompress(piece, inflated_size + 1 - produced)
            produced += len(out)
            if out:
                outs.append(out)
            if produced > inflated_size:
                problem = f"inflates to more than the {inflated_size} bytes its record says"
                break
            if decompressor.eof:
                unused = len(decompressor.unused_data) + sum(map(len, pieces[index + 1 :]))
                if unused:
                    problem = f"ends {unused} byte(s) before the {length} its record says"
                break
    except Exception as exc:  # zlib.error, isal's IsalError
        raise CorruptArchiveError(
            "CF-INTEG-03", f"gzip member at offset {offset} is corrupt: {exc}"
        ) from None
    if problem is None and not decompressor.eof:
        problem = f"does not end at the {length} bytes its record says"
    if problem is None and produced != inflated_size:
        problem = f"inflates to {produced} bytes, its record says {inflated_size}"
    if problem is not None:
        raise CorruptArchiveError("CF-INTEG-06", f"gzip member at offset {offset} {problem}")
    return outs


class GzipMembers:
    """Decodes a gzip stream pulled through ``read``, using every core it is given.

    Members with a member-size record (CF-WRITE-11) within :data:`WHOLE_MEMBER_MAX` are cut
    out whole and inflated on ``width`` worker threads, at most ``width + 1`` at a time;
    the others stream through one decompressor, their record (if any) checked when they end.
    :meth:`chunks` yields the output in order. Trailing zero bytes are accepted after the
    last member, anything else is refused (CF-INTEG-05), a stream ending inside a member is
    truncated (CF-INTEG-01).
    """

    def __init__(self, read: ReadFn, *, width: int | None = None, read_size: int = 1 << 20,
                 read_pieces: PiecesFn | None = None) -> None:
        self._read = read
        #: Whole members are taken through this where given: the buffers as the source
        #: handed them out (views of the network's), never joined on the reading thread.
        self._read_pieces = read_pieces
        self._read_size = read_size
        self._width = decode_width(width)
        # Bytes read past the last member taken: a header being parsed, or what a streamed
        # member's decompressor did not use. Whole members go to workers as the pieces they
        # were read in, never copied into one buffer.
        self._head = b""
        self._eof = False
        self._offset = 0  # of the first byte of ``_head`` in the compressed stream
        self.compressed_in = 0
        self.decompressed_out = 0

    def _fill(self, size: int) -> bool:
        """Read until ``_head`` holds ``size`` bytes; False if the stream ends first."""
        while len(self._head) < size and not self._eof:
            data = self._read(max(size - len(self._head), 64))
            if data:
                self._head += data
            else:
                self._eof = True
        return len(self._head) >= size

    def _take(self, size: int) -> list[bytes | memoryview] | None:
        """The next ``size`` bytes of the stream, as read; None if the stream ends first."""
        pieces: list[bytes | memoryview] = [self._head[:size]] if self._head else []
        self._head = self._head[size:]
        have = len(pieces[0]) if pieces else 0
        while have < size:
            if self._read_pieces is not None:
                got = [] if self._eof else self._read_pieces(size - have)
            else:
                data = b"" if self._eof else self._read(size - have)
                got = [data] if data else []
            if not got:
                self._eof = True
                return None
            pieces.extend(got)
            have += sum(map(len, got))
        self._offset += size
        self.compressed_in += size
        return pieces

    def chunks(self) -> Iterator[bytes]:
        pool = ThreadPoolExecutor(self._width, "checkpoint-inflate") if self._width > 1 else None
        pending: collections.deque[Future[list[bytes]] | list[bytes]] = collections.deque()
        try:
            yield from self._members(pool, pending)
        except Exception:
            # A fault found while cutting the stream (a corrupt header, or the source
            # failing: a store that died) lies after every member in flight: those come
            # first, with their own faults if they have any, so that the fault reaches the
            # consumer at the member whose data it cut short.
            yield from self._deliver(pending, 0)
            raise
        finally:
            for item in pending:
                if isinstance(item, Future):
                    item.cancel()
            if pool is not None:
                pool.shutdown(wait=True)

    def _members(
        self, pool: ThreadPoolExecutor | None, pending: collections.deque
    ) -> Iterator[bytes]:
        started = False
        while self._fill(1):
            if started and not _starts_member(self._head, GZIP):
                yield from self._deliver(pending, 0)
                self._trailing_zeros()
                return
            if not self._fill(3):
                raise self._truncated("inside its header")
            if not self._head.startswith(_GZIP_MAGIC):
                raise CorruptArchiveError(
                    "CF-INTEG-03", f"no gzip member header at offset {self._offset}"
                )
            started = True
            record = self._record()
            if record is not None and max(record) <= WHOLE_MEMBER_MAX:
                length, inflated = record
                offset, pieces = self._offset, self._take(length)
                if pieces is None:
                    raise self._truncated(f"its record says {length} bytes", offset)
                if pool is None:
                    pending.append(inflate_member(pieces, inflated, offset))
                else:
                    pending.append(pool.submit(inflate_member, pieces, inflated, offset))
                yield from self._deliver(pending, self._width)
            else:
                yield from self._deliver(pending, 0)
                yield from self._stream_member(record)
        yield from self._deliver(pending, 0)
        if not started:
            raise CorruptArchiveError("CF-INTEG-01", "gzip stream is empty")

    def _record(self) -> tuple[int, int] | None:
        size = 10
        while True:
            if not self._fill(size):
                raise self._truncated("inside its header")
            record = member_record(self._head)
            if record is not _NEED:
                return record  # type: ignore[return-value]
            size = 12 if len(self._head) < 12 else 12 + struct.unpack_from("<H", self._head, 10)[0]

    def _deliver(self, pending: collections.deque, keep: int) -> Iterator[bytes]:
        while len(pending) > keep:
            item = pending.popleft()
            try:
                outs = item.result() if isinstance(item, Future) else item
            except BaseException:
                for later in pending:  # nothing after a fault is delivered
                    if isinstance(later, Future):
                        later.cancel()
                pending.clear()
                raise
            for out in outs:
                self.decompressed_out += len(out)
                if out:
                    yield out

    def _stream_member(self, record: tuple[int, int] | None) -> Iterator[bytes]:
        """One member through one decompressor, in bounded output chunks."""
        start = self._offset
        member = _Member(GZIP)
        data, self._head = self._head, b""
        consumed = produced = 0
        while True:
            consumed += len(data)
            self.compressed_in += len(data)  # as fed: the expansion ratio is judged meanwhile
            try:
                out = member.decompress(data, OUT_CHUNK)
            except CorruptArchiveError:
                raise
            except Exception as exc:
                raise CorruptArchiveError(
                    "CF-INTEG-03", f"gzip member at offset {start} is corrupt: {exc}"
                ) from None
            produced += len(out)
            if out:
                self.decompressed_out += len(out)
                yield out
            if member.eof:
                self._head = member.unused_data
                break
            data = b""
            if member.needs_input:
                data = b"" if self._eof else self._read(self._read_size)
                if not data:
                    self._eof = True
                    raise self._truncated("in the middle of it", start)
        length = consumed - len(self._head)
        self._offset = start + length
        self.compressed_in -= len(self._head)
        if record is not None and record[0] > length and self._ends_within(record[0] - length):
            # CF-INTEG-06: a record that says the member extends past the end of the object
            # is truncation, as it is for a member cut by its record (see _members), when
            # the object ends within 64 MiB of the member; past that, a disagreement.
            raise self._truncated(f"its record says {record[0]} bytes", start)
        if record is not None and record != (length, produced):
            raise CorruptArchiveError(
                "CF-INTEG-06",
                f"gzip member at offset {start} is {length} bytes inflating to {produced},"
                f" its record says {record[0]} and {record[1]}",
            )

    def _ends_within(self, size: int, lookahead: int = 64 << 20) -> bool:
        """Whether the stream ends within ``size`` more bytes, looking at most ``lookahead``
        bytes ahead (CF-INTEG-06): a stream that goes on that far counts as not ending,
        however far ``size`` (any u64 of a record) reaches. Reads and drops what it looks
        at: only asked on the way to an error, to tell which rule the error falls under."""
        size = min(size, lookahead)
        have = len(self._head)
        while have < size and not self._eof:
            data = self._read(min(size - have, self._read_size))
            if not data:
                self._eof = True
            have += len(data)
        return have < size

    def _truncated(self, where: str, offset: int | None = None) -> CorruptArchiveError:
        at = self._offset if offset is None else offset
        return CorruptArchiveError(
            "CF-INTEG-01", f"gzip stream ends in the member at offset {at} ({where}; truncated)"
        )

    def _trailing_zeros(self) -> None:
        while True:
            _check_zeros(self._head, GZIP)
            self.compressed_in += len(self._head)
            self._head = b""
            if self._eof:
                return
            self._head = self._read(self._read_size)
            self._eof = not self._head


# --------------------------------------------------------------------------- encoding

# CF-WRITE-01: no mtime or name, OS=255; CF-WRITE-11: FEXTRA with the member-size record only.
_GZIP_HEADER_START = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
_EXTRA_FIELD = struct.pack("<H2sH", 4 + SIZE_RECORD.size, SIZE_RECORD_ID, SIZE_RECORD.size)
_GZIP_HEADER_SIZE = len(_GZIP_HEADER_START) + len(_EXTRA_FIELD) + SIZE_RECORD.size
_GZIP_TRAILER_SIZE = 8
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


def _sample_span(length: int) -> tuple[int, int]:
    """Where the sample that judges a slice of ``length`` bytes lies: its middle 16 KiB."""
    if length <= _SAMPLE:
        return 0, length
    mid = (length - _SAMPLE) // 2
    return mid, mid + _SAMPLE


def _squeezes(sample: bytes | memoryview) -> bool:
    """Whether a sample shrinks enough at the fastest level for its slice to be compressed."""
    squeezed = len((_fast_zlib or zlib).compress(sample, 1))
    return squeezed < STORE_THRESHOLD * len(sample)


def _worth_compressing(data: memoryview) -> bool:
    start, end = _sample_span(len(data))
    return _squeezes(data[start:end])


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
    length = _GZIP_HEADER_SIZE + sum(map(len, body)) + _GZIP_TRAILER_SIZE
    record = SIZE_RECORD.pack(length, len(view))
    return b"".join([_GZIP_HEADER_START, _EXTRA_FIELD, record, *body, trailer])


def stored_member(length: int) -> tuple[bytearray, list[memoryview]]:
    """A gzip member storing ``length`` bytes whose data is still to be filled in: the
    member's buffer (header, size record and stored-block headers written) and the views of
    it the data goes into, in order, at most 65,535 bytes each. Read the data straight into
    the views (``os.preadv``), then finish the member with :func:`seal_member`: the data is
    copied once, by the read, where :func:`gzip_member` needs it in a buffer of its own
    first."""
    blocks = max(1, -(-length // _STORED_MAX))
    total = _GZIP_HEADER_SIZE + 5 * blocks + length + _GZIP_TRAILER_SIZE
    member = bytearray(total)
    member[:_GZIP_HEADER_SIZE] = b"".join(
        [_GZIP_HEADER_START, _EXTRA_FIELD, SIZE_RECORD.pack(total, length)]
    )
    view = memoryview(member)
    slots: list[memoryview] = []
    position = _GZIP_HEADER_SIZE
    for start in range(0, max(length, 1), _STORED_MAX):
        size = min(_STORED_MAX, length - start)
        final = 1 if start + _STORED_MAX >= length else 0
        struct.pack_into("<BHH", member, position, final, size, size ^ 0xFFFF)
        position += 5
        if size:
            slots.append(view[position : position + size])
        position += size
    return member, slots


def seal_member(member: bytearray, slots: list[memoryview],
                level: int | str = "auto") -> bytes | bytearray:
    """Finish a :func:`stored_member` whose views hold its data, judged as
    :func:`gzip_member` judges a slice: returns the member itself, its CRC-32 and size
    written in place, when ``level`` is 0 or ``"auto"`` finds the data incompressible, else
    a new member with the data compressed. Either way the same bytes ``gzip_member`` gives
    for the same data and level."""
    length = sum(slot.nbytes for slot in slots)
    if level == "auto":
        level = AUTO_LEVEL if _squeezes(_gather(slots, *_sample_span(length))) else 0
    if level != 0:  # compressible: worth the copy into one buffer
        return gzip_member(b"".join(slots), level)
    crc = 0
    for slot in slots:
        crc = (_fast_zlib or zlib).crc32(slot, crc)
    struct.pack_into("<II", member, len(member) - _GZIP_TRAILER_SIZE, crc, length & 0xFFFFFFFF)
    return member


def _gather(slots: list[memoryview], start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` of the data the views hold, one after the other."""
    out: list[memoryview] = []
    offset = 0
    for slot in slots:
        low, high = max(start, offset), min(end, offset + slot.nbytes)
        if low < high:
            out.append(slot[low - offset : high - offset])
        offset += slot.nbytes
    return b"".join(out)


# CF-ASM-06: a padding member is a header with FEXTRA holding the FP subfield alone, the empty
# fixed-Huffman deflate block, and a trailer of CRC-32 0 and ISIZE 0.
_EMPTY_DEFLATE = b"\x03\x00"
_PADDING_OVERHEAD = len(_GZIP_HEADER_START) + 2 + 4 + len(_EMPTY_DEFLATE) + _GZIP_TRAILER_SIZE
#: The smallest and the largest padding member (XLEN is 16 bits: LEN at most 65,531).
PADDING_MIN = _PADDING_OVERHEAD
PADDING_MAX = _PADDING_OVERHEAD + 0xFFFF - 4


def padding_member(length: int) -> bytes:
    """One padding member of exactly ``length`` bytes (PADDING_MIN to PADDING_MAX)."""
    data = length - _PADDING_OVERHEAD
    assert 0 <= data <= 0xFFFF - 4, length
    extra = struct.pack("<H2sH", 4 + data, PADDING_RECORD_ID, data)
    return b"".join(
        [_GZIP_HEADER_START, extra, bytes(data), _EMPTY_DEFLATE, bytes(_GZIP_TRAILER_SIZE)]
    )


def padding_members(size: int) -> bytes:
    """Padding members (CF-ASM-06) of exactly ``size`` bytes in all, as few as can be, of
    near-equal lengths; ``size`` 0 is no bytes, and 1 to PADDING_MIN - 1 is one member of
    PADDING_MIN bytes (the least there is)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"padding size must be a whole number of 0 or more, got {size!r}")
    if size == 0:
        return b""
    size = max(size, PADDING_MIN)
    count = -(-size // PADDING_MAX)
    base, longer = divmod(size, count)  # base >= PADDING_MIN for every count (see spec)
    return b"".join(padding_member(base + (index < longer)) for index in range(count))


ReadFn = Callable[[int], bytes]
PiecesFn = Callable[[int], "list[bytes | memoryview]"]
