"""Streaming writer and reader, parallel download and upload, on top of the backend hooks.

Everything here runs on the I/O loop. Memory is bounded by the part size times the number
of parts in flight, whatever the object's size.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from ._backend import Backend, Source, Upload
from ._localfs import fsync_dir, open_temp_sibling, pwrite_all
from ._retry import RetryPolicy, call_with_retries

__all__ = ["StreamReader", "StreamWriter", "download_to", "upload_from"]

T = TypeVar("T")
log = logging.getLogger("checkpoint_io")

# Aborting is best effort (the object is never published either way), so it gets a short
# budget instead of the caller's full deadline.
#: How long an abort lets part uploads in flight end when parts are visible objects.
_PARTS_SETTLE_SECONDS = 30.0
_ABORT_POLICY = RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.1, deadline=10.0,
                            attempt_timeout=10.0)


class Transfer:
    """What one transfer needs: where, through which backend, how hard to try, how wide.

    Each width is the caller's argument (``File.with_options``) over the backend's default:
    ``concurrency`` parts uploaded at once by a streaming write, ``read_concurrency`` ranged
    GETs per streaming read (1 reads with one long GET: for servers where a ranged GET costs
    as much as the whole object, as moto's do). Nothing is read from ``CHECKPOINT_*``
    variables: flyte-checkpoint's ``Settings`` turns them into these arguments.
    """

    def __init__(self, backend: Backend, path: str, uri: str, policy: RetryPolicy,
                 part_size: int | None, concurrency: int | None,
                 read_ahead: int | None = None, read_concurrency: int | None = None) -> None:
        self.backend = backend
        self.path = path
        self.uri = uri
        self.policy = policy
        size = max(part_size or backend.part_size, backend.min_part_size)
        self.part_size = -(-size // backend.part_multiple) * backend.part_multiple
        self.concurrency = max(1, concurrency or backend.concurrency)
        self.read_ahead = max(read_ahead or backend.read_ahead, backend.read_block)
        self.read_concurrency = max(1, read_concurrency or backend.read_concurrency)
        # Whole blocks, so each range hands out whole blocks like one long GET does.
        self.read_range = max(backend.read_range // backend.read_block, 1) * backend.read_block

    def read_width(self, remaining: int) -> int:
        """How many ranged GETs a streaming read of ``remaining`` bytes keeps in flight: one
        (a single long GET) below two ranges, else up to ``read_concurrency``."""
        if remaining < 2 * self.read_range:
            return 1
        return max(1, min(self.read_concurrency, -(-remaining // self.read_range)))

    def retried(self, operation: str, request: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        return call_with_retries(self.policy, self.uri, operation, request)


class StreamWriter:
    """Buffers writes into parts, keeps a bounded number of part uploads in flight, and
    publishes the object only in :meth:`commit`. :meth:`abort` (or any failure) leaves the
    previous object as it was."""

    def __init__(self, transfer: Transfer) -> None:
        self._t = transfer
        self._upload: Upload = transfer.backend.new_upload(transfer.path)
        self._upload.policy = transfer.policy
        width = 1 if self._upload.ordered else transfer.concurrency
        self._slots = asyncio.Semaphore(width)
        self._buffer = bytearray()
        self._parts_sent = 0
        self._written = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None
        self._state = "open"  # -> "committed" | "aborted"

    @property
    def closed(self) -> bool:
        return self._state != "open"

    def tell(self) -> int:
        return self._written

    async def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._state != "open":
            raise ValueError(f"write to {self._t.uri}: file is already {self._state}")
        view = memoryview(data).cast("B")
        size = view.nbytes
        try:
            while view.nbytes:
                if len(self._buffer) == self._part_size():
                    # A full part is only sent once more data arrives, so the final part
                    # handed to finish() is never empty unless the object is.
                    part, self._buffer = bytes(self._buffer), bytearray()
                    await self._send(part)
                room = self._part_size() - len(self._buffer)
                self._buffer += view[:room]
                view = view[room:]
        except BaseException:
            await self.abort()
            raise
        self._written += size
        return size

    def _part_size(self) -> int:
        """The size of the part being filled. It doubles after every tenth of the backend's
        part limit, so that a stream of unknown length never runs out of parts: on S3
        (10,000 parts, 5 MiB to start) the first 4.9 GiB go in 5 MiB parts, memory stays
        small for the usual checkpoint, and the limit is about 5 TiB instead of 48 GiB."""
        backend = self._t.backend
        doublings = min(self._parts_sent // max(1, backend.max_parts // 10), 9)
        return max(self._t.part_size, min(self._t.part_size << doublings, backend.max_part_size))

    async def _send(self, part: bytes) -> None:
        self._raise_failure()
        await self._slots.acquire()
        try:
            self._raise_failure()
            if self._parts_sent == 0:
                await self._t.retried("start upload", self._upload.begin)
            self._parts_sent += 1
            if self._parts_sent >= self._t.backend.max_parts:
                raise OSError(f"write to {self._t.uri}: more than {self._t.backend.max_parts}"
                              f" parts (the last of {len(part)} bytes); raise part_size")
        except BaseException:
            self._slots.release()
            raise
        task = asyncio.ensure_future(self._put_part(self._parts_sent, part))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _put_part(self, number: int, part: bytes) -> None:
        try:
            await self._t.retried(
                f"upload part {number}", lambda: self._upload.put_part(number, part)
            )
        except BaseException as exc:
            if self._failure is None:
                self._failure = exc
        finally:
            self._slots.release()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def commit(self) -> None:
        """Send what is left and publish the object; on failure, abort and raise."""
        if self._state == "committed":
            return
        if self._state == "aborted":
            raise ValueError(f"commit of {self._t.uri}: the write was aborted")
        try:
            if self._parts_sent == 0:
                data = bytes(self._buffer)
                await self._t.retried("upload", lambda: self._upload.put_whole(data))
            else:
                if self._tasks:
                    await asyncio.gather(*list(self._tasks))
                self._raise_failure()
                number, data, total = self._parts_sent + 1, bytes(self._buffer), self._written
                await self._t.retried(
                    "complete upload", lambda: self._upload.finish(number, data, total)
                )
        except BaseException:
            await self.abort()
            raise
        self._buffer = bytearray()
        self._state = "committed"

    async def abort(self) -> None:
        """Drop everything written so far; the previous object (if any) stays intact."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._buffer = bytearray()
        tasks = list(self._tasks)
        if tasks and self._upload.parts_are_objects:
            # A part request cancelled after the server took it whole would create its
            # object after the cleanup below: let parts in flight end first (bounded).
            await asyncio.wait(tasks, timeout=_PARTS_SETTLE_SECONDS)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await call_with_retries(_ABORT_POLICY, self._t.uri, "abort upload",
                                    self._upload.abort)
        except Exception as exc:  # the object was never published; say so and move on
            log.warning("abort of %s failed (nothing was published): %s", self._t.uri, exc)


class _ResumableStream:
    """Bytes ``[start, end)`` of a pinned source, handed out in blocks, read from as few
    long requests as possible (``Source.stream_range``).

    Blocks end at multiples of ``block`` counted from byte 0, so a caller reading
    ``block`` bytes at a time gets each block whole, without a copy. Each block is one
    retried operation: ``attempt_timeout`` bounds a stall, not the whole body, and a fault
    drops the request and resumes with a new one from the first byte not yet received,
    so nothing is read twice and nothing is skipped. The version stays pinned, so a
    resumed request that finds another version fails with ``ObjectChangedError``.
    """

    def __init__(self, transfer: Transfer, source: Source, start: int, end: int,
                 block: int) -> None:
        self._t = transfer
        self._source = source
        self._end = end
        self._block = block
        self._received = start  # first byte not yet received from the server
        self._pieces: list[bytes | memoryview] = []  # received, not yet handed out
        self._held = 0
        self._body: AsyncIterator[bytes] | None = None

    @property
    def position(self) -> int:
        """The first byte not yet handed out."""
        return self._received - self._held

    async def next_block(self) -> bytes | None:
        """The next block, or ``None`` at the end."""
        first = self.position
        if first >= self._end:
            return None
        size = min(self._end, (first // self._block + 1) * self._block) - first
        return await self._t.retried(f"read bytes {first}-{first + size - 1}",
                                     lambda: self._fill(size))

    async def _fill(self, size: int) -> bytes:
        try:
            while self._held < size:
                if self._body is None:
                    self._body = aiter(self._source.stream_range(self._received, self._end))
                try:
                    piece = await anext(self._body)
                except StopAsyncIteration:
                    self._body = None
                    raise ConnectionResetError(
                        f"body ended at byte {self._received}, before byte {self._end}"
                    ) from None
                if len(piece) > self._end - self._received:
                    raise OSError(f"server sent more than bytes {self.position}-{self._end - 1}")
                self._pieces.append(piece)
                self._held += len(piece)
                self._received += len(piece)
                if self._received == self._end:
                    await self.close()  # all there: release the connection now
        except BaseException:
            await self.close()
            raise
        return self._take(size)

    def _take(self, size: int) -> bytes:
        pieces, taken = [], 0
        while taken < size:
            piece = self._pieces[0]
            if taken + len(piece) <= size:
                self._pieces.pop(0)
            else:
                view = memoryview(piece)
                piece, self._pieces[0] = view[:size - taken], view[size - taken:]
            pieces.append(piece)
            taken += len(piece)
        self._held -= size
        if len(pieces) == 1 and isinstance(pieces[0], bytes):
            return pieces[0]
        return b"".join(pieces)

    async def close(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            await body.aclose()


class StreamReader:
    """Sequential reads of one pinned version, with a bounded read-ahead.

    Remote objects are read by a background task into a queue of blocks, never more than
    ``read_ahead`` bytes ahead of the reader. Where the backend allows several connections
    and the object spans two ranges or more, that task keeps up to ``read_concurrency``
    ranged GETs in flight, each over its own connection and pinned to the same version,
    and hands their blocks to the queue in order; memory stays within ``read_concurrency``
    ranges plus the read-ahead. Otherwise it reads one long request. Either way a request
    resumes where it broke off after a transient fault, alone (see
    :class:`_ResumableStream`). Sources
    that read cheaply in the caller's thread (local files, memory) are read directly:
    :meth:`read_direct` serves blocking callers with no hop through the I/O loop.
    """

    def __init__(self, transfer: Transfer, source: Source) -> None:
        self._t = transfer
        self._source = source
        self.size = source.size
        self._pos = 0
        self._closed = False
        self.direct = source.read_blocking is not None
        self.block_size = transfer.backend.read_block
        #: Most bytes fetched ahead of the reader; the queue never holds more.
        self.read_ahead = transfer.read_ahead
        #: Most ranged GETs in flight, once reading has started (1: one long GET).
        self.width = 0
        self._queue: collections.deque[bytes | memoryview] = collections.deque()
        self._queued = 0
        #: Highest ``_queued`` seen: lets tests check the bound holds.
        self.peak_queued = 0
        self._producer: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()

    def tell(self) -> int:
        return self._pos

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queued(self) -> int:
        """Bytes fetched and not yet read."""
        return self._queued

    def _wanted(self, n: int | None) -> int:
        if self._closed:
            raise ValueError(f"read from {self._t.uri}: file is closed")
        remaining = self.size - self._pos
        return remaining if n is None or n < 0 else min(n, remaining)

    def read_direct(self, n: int = -1) -> bytes:
        """``read`` for sources with ``read_blocking``, run in the calling thread."""
        n = self._wanted(n)
        if n <= 0:
            return b""
        data = self._source.read_blocking(self._pos, self._pos + n)
        self._pos += len(data)
        return data

    async def read(self, n: int = -1) -> bytes:
        if self.direct:
            if self._source.read_blocking_is_instant:
                return self.read_direct(n)
            return await asyncio.get_running_loop().run_in_executor(None, self.read_direct, n)
        n = self._wanted(n)
        if n <= 0:
            return b""
        if self._producer is None:
            self._producer = asyncio.ensure_future(self._produce())
        pieces: list[bytes | memoryview] = []
        taken = 0
        try:
            while taken < n:
                while not self._queue:
                    if self._failure is not None:
                        raise self._failure
                    self._arrived.clear()
                    await self._arrived.wait()
                piece = self._queue[0]
                if taken + len(piece) <= n:
                    self._queue.popleft()
                else:
                    view = memoryview(piece)
                    piece, self._queue[0] = view[:n - taken], view[n - taken:]
                pieces.append(piece)
                taken += len(piece)
                self._queued -= len(piece)
                self._room.set()
        except BaseException:
            # Cancelled or failed halfway: put back what was taken, so the next read
            # starts at the same byte.
            self._queue.extendleft(reversed(pieces))
            self._queued += taken
            raise
        self._pos += taken
        if len(pieces) == 1 and isinstance(pieces[0], bytes):
            return pieces[0]  # a whole block: handed over without a copy
        return b"".join(pieces)

    async def _produce(self) -> None:
        width = self.width = self._t.read_width(self.size - self._pos)
        fetched = self._ranges(width) if width > 1 else self._one_request()
        try:
            async for block in fetched:
                while self._queued + len(block) > self.read_ahead and self._queued:
                    self._room.clear()
                    await self._room.wait()
                self._queue.append(block)
                self._queued += len(block)
                self.peak_queued = max(self.peak_queued, self._queued)
                self._arrived.set()
        except BaseException as exc:
            # Handed to the reader, which raises it; a reader must never wait on a
            # producer that is gone, so even a stray cancellation becomes an error.
            if not self._closed:
                self._failure = exc if isinstance(exc, Exception) else ConnectionAbortedError(
                    f"read of {self._t.uri} stopped at byte {self._pos + self._queued}:"
                    f" {exc!r}")
            if not isinstance(exc, Exception):
                raise
        finally:
            self._arrived.set()
            await fetched.aclose()

    async def _one_request(self) -> AsyncIterator[bytes]:
        stream = _ResumableStream(self._t, self._source, self._pos, self.size, self.block_size)
        try:
            while (block := await stream.next_block()) is not None:
                yield block
        finally:
            await stream.close()

    async def _ranges(self, width: int) -> AsyncIterator[bytes]:
        """Blocks of ``[pos, size)`` in order, fetched as ranges ``width`` at a time."""
        span = self._t.read_range
        starts = iter(range(self._pos, self.size, span))
        in_flight: collections.deque[asyncio.Task[list[bytes]]] = collections.deque()

        def launch() -> None:
            start = next(starts, None)
            if start is not None:
                in_flight.append(asyncio.ensure_future(self._fetch_range(start, span)))

        try:
            for _ in range(width):
                launch()
            while in_flight:
                blocks = await in_flight[0]
                in_flight.popleft()
                while blocks:
                    yield blocks.pop(0)
                # Only now: ranges held never exceed ``width`` (plus the read-ahead queue).
                launch()
        finally:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def _fetch_range(self, start: int, span: int) -> list[bytes]:
        """One range, whole: its own request, retried and resumed alone."""
        end = min(start + span, self.size)
        stream = _ResumableStream(self._t, self._source, start, end, self.block_size)
        blocks = []
        try:
            while (block := await stream.next_block()) is not None:
                blocks.append(block)
        finally:
            await stream.close()
        return blocks

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
        self._queue.clear()
        self._queued = 0
        await self._source.close()


async def download_to(transfer: Transfer, source: Source, local_path: str) -> None:
    """Fetch ranges in parallel into a hidden temp sibling of ``local_path``, then rename
    it into place: the destination never shows a partial download."""
    loop = asyncio.get_running_loop()
    directory = os.path.dirname(os.path.abspath(local_path))
    os.makedirs(directory, exist_ok=True)
    temp, fd = open_temp_sibling(os.path.abspath(local_path))
    slots = asyncio.Semaphore(transfer.concurrency)

    async def fetch(start: int, end: int) -> None:
        async with slots:
            data = await transfer.retried(
                f"download bytes {start}-{end - 1}", lambda: source.read_range(start, end)
            )
            await loop.run_in_executor(None, pwrite_all, fd, data, start)

    try:
        step = transfer.part_size
        # One task per slot pulling ranges keeps the number of tasks small for huge objects.
        ranges = iter(range(0, source.size, step))

        async def worker() -> None:
            for start in ranges:
                await fetch(start, min(start + step, source.size))

        if source.copy_into is not None:
            await loop.run_in_executor(None, source.copy_into, fd)
        elif type(source).stream_range is not Source.stream_range:
            await _download_segments(transfer, source, fd)
        else:
            await asyncio.gather(*(worker() for _ in range(transfer.concurrency)))
        # No fsync: a download is a re-fetchable copy, and the rename alone guarantees that
        # the name never shows a partial file. (Writes *to* a local store do fsync.) Closed
        # after the rename: until then the lock keeps a save's sweep away from the file.
        os.replace(temp, local_path)
        fd, done = -1, fd
        os.close(done)
        fsync_dir(directory)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


async def _download_segments(transfer: Transfer, source: Source, fd: int) -> None:
    """Fewer, longer GETs streamed straight to disk: each segment is one request whose body
    is written as it arrives, so memory stays at about one block per segment in flight,
    and a fault resumes the segment where it broke off (see :class:`_ResumableStream`)."""
    loop = asyncio.get_running_loop()
    segment = max(transfer.backend.download_segment, transfer.part_size)
    block = transfer.backend.read_block * 4  # fewer hops to the writing thread
    starts = iter(range(0, source.size, segment))

    async def fetch(start: int, end: int) -> None:
        stream = _ResumableStream(transfer, source, start, end, block)
        try:
            while (data := await stream.next_block()) is not None:
                await loop.run_in_executor(None, pwrite_all, fd, data,
                                           stream.position - len(data))
        finally:
            await stream.close()

    async def worker() -> None:
        for start in starts:
            await fetch(start, min(start + segment, source.size))

    await asyncio.gather(*(worker() for _ in range(transfer.concurrency)))


async def upload_from(transfer: Transfer, local_path: str) -> None:
    """Stream a local file through a :class:`StreamWriter` (parts upload in parallel)."""
    loop = asyncio.get_running_loop()
    writer = StreamWriter(transfer)
    with open(local_path, "rb") as f:
        try:
            while True:
                chunk = await loop.run_in_executor(None, f.read, transfer.part_size)
                if not chunk:
                    break
                await writer.write(chunk)
        except BaseException:
            await writer.abort()
            raise
    await writer.commit()
