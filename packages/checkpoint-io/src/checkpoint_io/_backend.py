"""The small set of hooks a storage backend provides; streaming and retries live elsewhere.

Each hook makes ONE attempt at one request and raises the client's own error; the caller
(``_stream``) wraps it in the retry policy and translates what the error means.
"""

from __future__ import annotations

import abc
import dataclasses
import io
import re
from collections.abc import AsyncIterator
from typing import Any

from ._errors import RangeMismatch

__all__ = ["Backend", "BackendOptions", "BufferBody", "PartRecord", "SegmentSink",
           "SharedTarget", "Source", "Upload", "check_range", "grown_part_size",
           "joined_range"]

MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """Switches that change how a backend writes, fixed when it is built (part of the key
    under which :func:`~checkpoint_io._registry.backend_for` shares it). Set them per File
    with :meth:`File.with_options <checkpoint_io.File.with_options>`."""

    #: Local saves write whole blocks with ``O_DIRECT``, past the page cache (off: through
    #: it, say on an NFS mount where direct writes are synchronous round trips).
    direct_writes: bool = True
    #: Which client serves S3, GCS and Azure: ``"obstore"`` (Rust, its per-byte work outside
    #: the GIL), ``"fsspec"`` (s3fs, gcsfs, adlfs), or ``"auto"``: obstore when it is
    #: installed and the storage options translate, else fsspec (logged once, with why).
    data_path: str = "auto"
    #: GCS saves upload parts as temporary objects in parallel, then compose them (opt-in:
    #: see :class:`~checkpoint_io._gcs.GCSBackend`).
    gcs_composite: bool = False


class Source(abc.ABC):
    """One version of one object, opened for ranged reads.

    Pinning the version (an open file descriptor, an ETag, a generation) means an object
    overwritten while we read it yields an error, never a mix of old and new bytes.
    """

    size: int

    @abc.abstractmethod
    async def read_range(self, start: int, end: int) -> bytes:
        """Return bytes ``[start, end)``; ``0 <= start < end <= size``."""

    async def stream_range(self, start: int, end: int) -> AsyncIterator[Any]:
        """Yield bytes ``[start, end)`` in order, as they arrive, from ONE request.

        Each piece is ``bytes`` or any buffer-protocol object (a memoryview, a client's own
        buffer type): the caller hands it on as a view, never joined.

        Backends override this with a single long GET whose body is read incrementally;
        the caller (``_stream``) bounds how far it reads ahead, and after a fault resumes
        with a new call from the first byte it did not receive. A body that ends early
        just stops; the caller notices. This fallback makes one ranged read per MiB.
        """
        while start < end:
            stop = min(start + MiB, end)
            yield await self.read_range(start, stop)
            start = stop

    async def close(self) -> None:  # noqa: B027 -- optional hook; the default does nothing
        """Release what ``open_source`` acquired."""

    #: Optional fast path for streaming reads: a blocking ``read_blocking(start, end)``
    #: returning bytes ``[start, end)`` cheaply enough to call from the reading thread
    #: itself, with no hop through the I/O loop (local files, memory).
    read_blocking = None
    #: Whether ``read_blocking`` never blocks (memory), so it may run on an event loop.
    read_blocking_is_instant = False

    #: Optional fast path for downloads: a blocking ``copy_into(fd)`` that writes the whole
    #: object into a local descriptor (local files use the kernel's copy, no user buffers).
    copy_into = None


class PartPieces:
    """One part held as the pieces it was written in: views of immutable buffers, so no
    copy was made to fill it. ``len()`` is its size in bytes, as for a part buffer."""

    __slots__ = ("nbytes", "views")

    def __init__(self) -> None:
        self.views: list[memoryview] = []
        self.nbytes = 0

    def append(self, view: memoryview) -> None:
        self.views.append(view)
        self.nbytes += view.nbytes

    def __len__(self) -> int:
        return self.nbytes

    def __bool__(self) -> bool:
        return self.nbytes > 0

    def join(self) -> bytes:
        return b"".join(self.views)


class Upload(abc.ABC):
    """One write of one object that becomes visible only in :meth:`finish`/:meth:`put_whole`.

    The streaming writer calls either ``put_whole`` once (the object fits in one part), or
    ``begin``, then ``put_part`` for parts 1..n-1, then ``finish`` with the final part; and
    ``abort`` on any failure or cancellation. With ``ordered`` set, parts are sent one at a
    time in order; otherwise up to the writer's concurrency are in flight together.
    """

    ordered: bool = False
    #: Parts are objects of their own until the upload ends (GCS composite uploads): an
    #: abort lets parts in flight finish, so that its cleanup finds all of them.
    parts_are_objects: bool = False
    #: Parts may come as :class:`PartPieces` (views of the writer's own immutable buffers,
    #: no copy into a part buffer): for clients that take a part in pieces (obstore).
    takes_pieces: bool = False
    #: The transfer's retry policy, set by the writer before the first call: for clients
    #: that retry single part requests themselves (obstore has no call for one part).
    policy: Any = None
    #: The caller's parts in flight (``File.with_options(concurrency=)``), set by the writer;
    #: ``None`` where the width is the writer's or the client's own to choose.
    concurrency: int | None = None

    async def begin(self) -> None:  # noqa: B027 -- optional hook; the default does nothing
        """Start a multipart/resumable session (nothing visible yet)."""

    @abc.abstractmethod
    async def put_part(self, number: int, data: bytes | bytearray) -> None:
        """Send part ``number`` (1-based) of a multipart upload; not the final one.

        ``data`` is the writer's own buffer (a ``bytearray`` for parts, handed over without
        a copy): send it as it is, never change it (a retry sends it again)."""

    @abc.abstractmethod
    async def finish(self, number: int, data: bytes | bytearray, total: int) -> None:
        """Send the final part (possibly empty) and publish the object atomically."""

    @abc.abstractmethod
    async def put_whole(self, data: bytes) -> None:
        """Publish a small object in one request."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Discard everything sent so far; the previous object stays as it was."""


def grown_part_size(base: int, sent: int, max_parts: int, max_part_size: int) -> int:
    """The size of the part being filled after ``sent`` parts of a stream whose length is
    unknown: ``base``, doubled after every tenth of ``max_parts`` (at most 9 times, never
    past ``max_part_size``), so that the stream never runs out of part numbers. On S3
    (10,000 parts, 5 MiB to start) the first 4.9 GiB go in 5 MiB parts and the limit is
    about 5 TiB. Streaming writes and the segments of shared uploads both follow it."""
    doublings = min(sent // max(1, max_parts // 10), 9)
    return max(base, min(base << doublings, max_part_size))


#: One part of a segment as the store knows it: its part number, the store's identifier for
#: it (an S3 ETag, an Azure block ID, a GCS temporary object "name#generation"; empty on
#: local files) and its size in bytes.
PartRecord = tuple[int, str, int]


class SegmentSink(abc.ABC):
    """The store's side of one segment of a shared upload (see ``checkpoint_io._shared``):
    parts sent in any order, several at once, each a retried request of its own.

    Part numbers run from ``first_part`` to ``first_part + max_parts - 1``; every part but
    the segment's last holds at least ``min_part`` bytes (the writer holds back its last
    full part to make sure). Each hook makes ONE attempt and raises the client's error, or
    :class:`~checkpoint_io.SharedUploadError` when the upload is no longer open.
    """

    first_part: int = 1
    max_parts: int = 1_000_000
    min_part: int = 1

    async def open(self) -> None:  # noqa: B027 -- optional hook; the default does nothing
        """Check that the upload is still open and take what the segment needs."""

    @abc.abstractmethod
    async def put_part(self, number: int, offset: int, data: bytes) -> str:
        """Send part ``number``, the segment's bytes ``[offset, offset + len(data))``;
        return the store's identifier of it."""

    async def close(self, size: int) -> None:  # noqa: B027 -- optional hook
        """Every part was sent (``size`` bytes in all): make them durable where that is a
        separate step, and check the upload is still open."""

    async def abort(self) -> None:  # noqa: B027 -- optional hook; the default does nothing
        """Remove what this segment sent, where the store keeps parts apart until the
        commit; stores that drop unused parts with the upload do nothing."""


class SharedTarget(abc.ABC):
    """The store's side of a shared upload: ``segments`` pieces written by any processes,
    published as ONE object, pieces in index order, by :meth:`commit` alone.

    Built by :meth:`Backend.shared_target` from the upload's random ``upload`` id and, when
    another process joins, from the ``state`` that :meth:`begin` returned (JSON-able: it
    travels in the token). Hooks make one attempt each, as :class:`Upload`'s do.
    """

    #: Bytes every segment but the last must hold, unless it is empty.
    min_segment: int = 1
    #: Most segments one upload may have.
    max_segments: int = 10_000
    #: The commit runs under the retry policy (one request); False for a commit that is one
    #: long local step, which a retry after ``attempt_timeout`` would only race.
    commit_retried: bool = True

    def __init__(self, path: str, segments: int, upload: str, state: dict | None) -> None:
        self.path = path
        self.segments = segments
        self.upload = upload
        self.state = dict(state or {})

    async def begin(self) -> dict:
        """Start the upload (nothing visible at ``path`` yet); returns ``state``."""
        return self.state

    @abc.abstractmethod
    def segment(self, index: int) -> SegmentSink:
        """The sink of segment ``index``; makes no request yet."""

    @abc.abstractmethod
    async def commit(self, segments: list[tuple[int, int, list[PartRecord]]]) -> None:
        """Publish the object atomically from ``(index, size, parts)`` of every segment, in
        index order, parts in number order; then drop what is left of the upload."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Remove everything every segment sent; the previous object stays as it was."""


class Backend(abc.ABC):
    """The hooks one URI scheme provides. Instances live on the I/O loop."""

    #: Default part size for streaming writes and block size for reads and downloads.
    part_size: int = 8 * MiB
    #: Part size a write of known size (``File.with_options(size_hint=)``) starts from,
    #: grown where the hint needs larger parts to fit ``max_parts``; ``None``: ``part_size``.
    sized_part_size: int | None = None
    #: Smallest part the service accepts (except the last).
    min_part_size: int = 1
    #: Every part except the last must be a multiple of this many bytes.
    part_multiple: int = 1
    #: Most parts one multipart upload may have, and the largest part.
    max_parts: int = 1_000_000
    max_part_size: int = 4000 * MiB
    #: Default number of parts or ranges in flight at once.
    concurrency: int = 4
    #: Block a streaming read hands out (and aligns to), and most bytes it fetches ahead.
    read_block: int = MiB
    read_ahead: int = 16 * MiB
    #: Span of one request when a download streams segments in parallel.
    download_segment: int = 256 * MiB
    #: Streaming reads: most ranged GETs in flight at once, each over its own connection,
    #: and the span of each. 1 keeps one long GET (stores where a connection is cheap and
    #: fast: local disk, memory). An object smaller than two ranges is read by one GET.
    read_concurrency: int = 1
    read_range: int = 8 * MiB
    #: Whether a width the caller leaves unset adapts to the measured throughput (object
    #: stores, where each connection is slow and many are fast), and up to how many
    #: requests in flight (the memory budget may allow fewer).
    widen: bool = False
    #: Whether writes adapt too where ``widen`` is set (obstore's keep the width they are
    #: given: its uploads keep their own bounded number of parts in flight).
    widen_writes: bool = True
    max_in_flight: int = 64

    def __init__(self, storage_options: dict[str, Any],
                 options: BackendOptions | None = None) -> None:
        self.storage_options = storage_options
        self.options = options or BackendOptions()

    @abc.abstractmethod
    async def size(self, path: str) -> int:
        """Size of the object; raises the client's not-found error when absent."""

    @abc.abstractmethod
    async def open_source(self, path: str) -> Source:
        """Pin the current version of the object for ranged reads."""

    @abc.abstractmethod
    def new_upload(self, path: str) -> Upload:
        """Prepare a write to ``path``; makes no request yet."""

    def shared_target(self, path: str, segments: int, upload: str,
                      state: dict | None) -> SharedTarget:
        """The store's side of a shared upload to ``path`` (see :class:`SharedTarget`)."""
        raise io.UnsupportedOperation(
            f"{path}: this store cannot assemble one object from segments written by several "
            "processes (shared uploads work on local paths, s3://, gs:// and Azure)")

    async def sweep_shared(self, path: str, older_than: float) -> list[str]:
        """Remove what shared uploads to ``path`` started over ``older_than`` seconds ago
        left behind (processes killed before a commit or an abort); returns what went."""
        return []

    async def close(self) -> None:  # noqa: B027 -- optional hook; the default does nothing
        """Release client sessions."""


def streamed_body(data: bytes | bytearray) -> io.BytesIO | bytes | bytearray:
    """A request body for aiohttp-based clients (gcsfs, the Azure SDK). aiohttp sends a
    file-like body in pieces; a large ``bytes`` body it sends whole, with a ResourceWarning
    that strict runs turn into a failed upload. Make a new one per attempt."""
    return io.BytesIO(data) if len(data) > MiB else data


class BufferBody(io.BytesIO):
    """A file-like request body over a buffer the caller keeps unchanged, read as views of
    it: no copy of the buffer (``io.BytesIO(bytearray)`` would copy it whole, and each of
    its reads copies again). For clients that read a body in chunks and seek back to retry
    or to checksum it (botocore, and aiohttp, which sends a ``BytesIO`` as it reads it)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._at = 0

    def read(self, size: int | None = -1) -> memoryview:  # type: ignore[override]
        end = self._view.nbytes if size is None or size < 0 else self._at + size
        piece = self._view[self._at:end]
        self._at += piece.nbytes
        return piece

    read1 = read

    def readinto(self, buffer: Any) -> int:  # type: ignore[override]
        piece = self.read(memoryview(buffer).nbytes)
        memoryview(buffer).cast("B")[:piece.nbytes] = piece
        return piece.nbytes

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: self._view.nbytes}[whence]
        self._at = max(0, base + offset)
        return self._at

    def tell(self) -> int:
        return self._at

    def getbuffer(self) -> memoryview:
        return self._view[:]

    def getvalue(self) -> bytes:
        return self._view.tobytes()

    def __len__(self) -> int:
        return self._view.nbytes


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def check_range(start: int, end: int, size: int, status: int,
                content_range: str | None, content_length: str | int | None) -> None:
    """Raise :class:`RangeMismatch` unless the answer to a GET of bytes ``[start, end)`` of
    a ``size``-byte object serves exactly those bytes: a 206 whose ``Content-Range`` is
    ``bytes start-(end-1)/size`` (or ``/*``), or a 200 without one when the whole object
    was asked; and a ``Content-Length``, when the answer gives one, of ``end - start``.

    Call it on the response headers before handing out any of the body: a server (or a
    cache in front of it) that answers with another range would otherwise have the bytes
    of one offset taken for another's, silently. A 200 with the whole object for part of it
    is a server that ignores ``Range``: ``RangeMismatch.ignored``, not retried.
    """
    asked = f"bytes {start}-{end - 1}/{size}"
    try:
        length = None if content_length in (None, "") else int(content_length)
    except (TypeError, ValueError):
        raise RangeMismatch(asked, f"{status} with a malformed Content-Length"
                                   f" {content_length!r}") from None
    if content_range:
        match = _CONTENT_RANGE.fullmatch(content_range.strip())
        served = f"{status} {content_range.strip()}"
        good = (status == 206 and match is not None and int(match[1]) == start
                and int(match[2]) == end - 1 and match[3] in ("*", str(size)))
    else:
        served = f"{status} without Content-Range"
        if status == 200:
            served += " (the whole object)"
        good = status == 200 and start == 0 and end == size
        if status == 200 and not good:
            # The server (or a proxy) ignores Range, as HTTP allows: it will answer every
            # ranged GET so, and retrying would only spend the policy. Fails at once.
            raise RangeMismatch(asked, served + ": it ignores Range requests", ignored=True)
    if good and length is not None and length != end - start:
        served += f", Content-Length {length}"
        good = False
    if not good:
        raise RangeMismatch(asked, served)


async def joined_range(source: Source, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` read whole through ``source.stream_range`` (one request, its
    range checked by the backend); a body that ends early is a dropped connection."""
    data = b"".join([chunk async for chunk in source.stream_range(start, end)])
    if len(data) > end - start:
        raise RangeMismatch(f"bytes {start}-{end - 1}", f"a body of {len(data)} bytes")
    if len(data) < end - start:
        raise ConnectionResetError(
            f"short read: got {len(data)} of {end - start} bytes at offset {start}"
        )
    return data
