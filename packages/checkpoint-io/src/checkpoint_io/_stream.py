"""Streaming writer and reader, parallel download and upload, on top of the backend hooks.

Everything here runs on the I/O loop. Memory is bounded by the part size times the number
of parts in flight, whatever the object's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ._backend import Backend, Source, Upload
from ._retry import RetryPolicy, call_with_retries

__all__ = ["StreamReader", "StreamWriter", "download_to", "upload_from"]

T = TypeVar("T")
log = logging.getLogger("checkpoint_io")

# Aborting is best effort (the object is never published either way), so it gets a short
# budget instead of the caller's full deadline.
_ABORT_POLICY = RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.1, deadline=10.0,
                            attempt_timeout=10.0)


class Transfer:
    """What one transfer needs: where, through which backend, how hard to try, how wide."""

    def __init__(self, backend: Backend, path: str, uri: str, policy: RetryPolicy,
                 part_size: int | None, concurrency: int | None) -> None:
        self.backend = backend
        self.path = path
        self.uri = uri
        self.policy = policy
        size = max(part_size or backend.part_size, backend.min_part_size)
        self.part_size = -(-size // backend.part_multiple) * backend.part_multiple
        self.concurrency = max(1, concurrency or backend.concurrency)

    def retried(self, operation: str, request: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        return call_with_retries(self.policy, self.uri, operation, request)


class StreamWriter:
    """Buffers writes into parts, keeps a bounded number of part uploads in flight, and
    publishes the object only in :meth:`commit`. :meth:`abort` (or any failure) leaves the
    previous object as it was."""

    def __init__(self, transfer: Transfer) -> None:
        self._t = transfer
        self._upload: Upload = transfer.backend.new_upload(transfer.path)
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
        part_size = self._t.part_size
        try:
            while view.nbytes:
                if len(self._buffer) == part_size:
                    # A full part is only sent once more data arrives, so the final part
                    # handed to finish() is never empty unless the object is.
                    part, self._buffer = bytes(self._buffer), bytearray()
                    await self._send(part)
                room = part_size - len(self._buffer)
                self._buffer += view[:room]
                view = view[room:]
        except BaseException:
            await self.abort()
            raise
        self._written += size
        return size

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
                              f" parts of {self._t.part_size} bytes; raise part_size")
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
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        try:
            await call_with_retries(_ABORT_POLICY, self._t.uri, "abort upload",
                                    self._upload.abort)
        except Exception as exc:  # the object was never published; say so and move on
            log.warning("abort of %s failed (nothing was published): %s", self._t.uri, exc)


class StreamReader:
    """Sequential reads served from a bounded window of prefetched ranges."""

    def __init__(self, transfer: Transfer, source: Source) -> None:
        self._t = transfer
        self._source = source
        self.size = source.size
        self._pos = 0
        self._blocks: dict[int, asyncio.Task[bytes]] = {}
        self._closed = False

    def tell(self) -> int:
        return self._pos

    @property
    def closed(self) -> bool:
        return self._closed

    def _fetch(self, index: int) -> asyncio.Task[bytes]:
        task = self._blocks.get(index)
        if task is None:
            start = index * self._t.part_size
            end = min(start + self._t.part_size, self.size)
            task = asyncio.ensure_future(self._t.retried(
                f"read bytes {start}-{end - 1}", lambda: self._source.read_range(start, end)
            ))
            self._blocks[index] = task
        return task

    async def read(self, n: int = -1) -> bytes:
        if self._closed:
            raise ValueError(f"read from {self._t.uri}: file is closed")
        if n is None or n < 0:
            n = self.size - self._pos
        chunks: list[bytes] = []
        block_size = self._t.part_size
        while n > 0 and self._pos < self.size:
            index, offset = divmod(self._pos, block_size)
            last = (self.size - 1) // block_size
            for ahead in range(index, min(index + self._t.concurrency, last + 1)):
                self._fetch(ahead)
            block = await self._blocks[index]
            piece = block[offset:offset + n] if (offset or n < len(block)) else block
            chunks.append(piece)
            self._pos += len(piece)
            n -= len(piece)
            if offset + len(piece) == len(block):
                del self._blocks[index]
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._blocks.values():
            task.cancel()
        if self._blocks:
            await asyncio.gather(*self._blocks.values(), return_exceptions=True)
        self._blocks.clear()
        await self._source.close()


def _temp_sibling(path: str) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.partial-{secrets.token_hex(6)}")


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem allows it
        fd = os.open(directory or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


async def download_to(transfer: Transfer, source: Source, local_path: str) -> None:
    """Fetch ranges in parallel into a hidden temp sibling of ``local_path``, then rename
    it into place: the destination never shows a partial download."""
    loop = asyncio.get_running_loop()
    directory = os.path.dirname(os.path.abspath(local_path))
    os.makedirs(directory, exist_ok=True)
    temp = _temp_sibling(os.path.abspath(local_path))
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    slots = asyncio.Semaphore(transfer.concurrency)

    async def fetch(start: int, end: int) -> None:
        async with slots:
            data = await transfer.retried(
                f"download bytes {start}-{end - 1}", lambda: source.read_range(start, end)
            )
            await loop.run_in_executor(None, _pwrite_all, fd, data, start)

    try:
        step = transfer.part_size
        # One task per slot pulling ranges keeps the number of tasks small for huge objects.
        ranges = iter(range(0, source.size, step))

        async def worker() -> None:
            for start in ranges:
                await fetch(start, min(start + step, source.size))

        if source.copy_into is not None:
            await loop.run_in_executor(None, source.copy_into, fd)
        elif getattr(source, "stream_range", None) is not None:
            await _download_segments(transfer, source, fd)
        else:
            await asyncio.gather(*(worker() for _ in range(transfer.concurrency)))
        # No fsync: a download is a re-fetchable copy, and the rename alone guarantees that
        # the name never shows a partial file. (Writes *to* a local store do fsync.)
        os.close(fd)
        fd = -1
        os.replace(temp, local_path)
        _fsync_dir(directory)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


async def _download_segments(transfer: Transfer, source: Source, fd: int) -> None:
    """Fewer, longer GETs streamed straight to disk: each segment is one request whose body
    is written as it arrives, so memory stays at one chunk per segment in flight, and a
    retry resumes the segment where it broke off."""
    loop = asyncio.get_running_loop()
    segment = transfer.part_size * 32
    starts = iter(range(0, source.size, segment))

    async def fetch(start: int, end: int) -> None:
        pos = start

        async def attempt() -> None:
            nonlocal pos
            async for chunk in source.stream_range(pos, end):
                if pos + len(chunk) > end:
                    raise OSError(f"server sent more than bytes {start}-{end - 1}")
                await loop.run_in_executor(None, _pwrite_all, fd, chunk, pos)
                pos += len(chunk)
            if pos != end:
                raise ConnectionResetError(f"body ended at byte {pos} of {start}-{end - 1}")

        await transfer.retried(f"download bytes {start}-{end - 1}", attempt)

    async def worker() -> None:
        for start in starts:
            await fetch(start, min(start + segment, source.size))

    await asyncio.gather(*(worker() for _ in range(transfer.concurrency)))


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


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
