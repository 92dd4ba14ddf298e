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

__all__ = ["Backend", "BackendOptions", "Source", "Upload", "check_range", "joined_range"]

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

    async def stream_range(self, start: int, end: int) -> AsyncIterator[bytes]:
        """Yield bytes ``[start, end)`` in order, as they arrive, from ONE request.

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
    #: The transfer's retry policy, set by the writer before the first call: for clients
    #: that retry single part requests themselves (obstore has no call for one part).
    policy: Any = None

    async def begin(self) -> None:  # noqa: B027 -- optional hook; the default does nothing
        """Start a multipart/resumable session (nothing visible yet)."""

    @abc.abstractmethod
    async def put_part(self, number: int, data: bytes) -> None:
        """Send part ``number`` (1-based) of a multipart upload; not the final one."""

    @abc.abstractmethod
    async def finish(self, number: int, data: bytes, total: int) -> None:
        """Send the final part (possibly empty) and publish the object atomically."""

    @abc.abstractmethod
    async def put_whole(self, data: bytes) -> None:
        """Publish a small object in one request."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Discard everything sent so far; the previous object stays as it was."""


class Backend(abc.ABC):
    """The hooks one URI scheme provides. Instances live on the I/O loop."""

    #: Default part size for streaming writes and block size for reads and downloads.
    part_size: int = 8 * MiB
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

    async def close(self) -> None:  # noqa: B027 -- optional hook; the default does nothing
        """Release client sessions."""


def streamed_body(data: bytes) -> io.BytesIO | bytes:
    """A request body for aiohttp-based clients (gcsfs, the Azure SDK). aiohttp sends a
    file-like body in pieces; a large ``bytes`` body it sends whole, with a ResourceWarning
    that strict runs turn into a failed upload. Make a new one per attempt."""
    return io.BytesIO(data) if len(data) > MiB else data


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
