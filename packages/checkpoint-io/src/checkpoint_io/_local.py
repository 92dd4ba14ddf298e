"""Local files: a temp sibling, fsynced and renamed into place; reads pin the inode."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import mmap
import os
import threading
from typing import Any

from ._backend import Backend, MiB, Source, Upload
from ._localfs import fsync_dir, open_temp_sibling, pwrite_all, sweep_partials

__all__ = ["LocalBackend"]


async def _blocking(fn, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))


class _LocalSource(Source):
    def __init__(self, fd: int) -> None:
        # Holding the descriptor pins this inode: a concurrent replace cannot mix versions.
        self._fd = fd
        self.size = os.fstat(fd).st_size

    async def read_range(self, start: int, end: int) -> bytes:
        return await _blocking(_pread_all, self._fd, start, end)

    def read_blocking(self, start: int, end: int) -> bytes:
        # A pread from the pinned descriptor: the kernel reads ahead, no loop hop needed.
        return _pread_all(self._fd, start, end)

    def copy_into(self, fd: int) -> None:
        offset = 0
        while offset < self.size:
            sent = os.sendfile(fd, self._fd, offset, self.size - offset)
            if sent == 0:
                raise OSError(f"unexpected end of file at byte {offset} (file shrank?)")
            offset += sent

    async def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _pread_all(fd: int, start: int, end: int) -> bytes:
    first = os.pread(fd, end - start, start)
    if len(first) == end - start:
        return first  # the usual case: no join, no copy
    chunks = [first]
    start += len(first)
    if not first:
        raise OSError(f"unexpected end of file at byte {start} (file shrank?)")
    while start < end:
        chunk = os.pread(fd, end - start, start)
        if not chunk:
            raise OSError(f"unexpected end of file at byte {start} (file shrank?)")
        chunks.append(chunk)
        start += len(chunk)
    return b"".join(chunks)


class _DirectWriter:
    """Writes of a large object, bypassing the page cache where it can.

    Whole blocks go through ``O_DIRECT``, copied into a page-aligned buffer: the device
    reads them straight from it, no kernel copy, no page cache to fill (and evict the
    training job's own pages), so the CPU is left to compression and hashing. On a VM whose
    page cache is cold this is several times faster than a buffered write. The unaligned
    tail, and everything on a file system that refuses ``O_DIRECT`` (tmpfs, some network
    mounts), is written the ordinary way.

    Writes may overlap (a retry beside a write that outlived its attempt): each holds an
    aligned buffer of its own while it writes; one is kept for reuse.
    """

    ALIGN = 4096

    def __init__(self, fd: int, *, direct: bool = True) -> None:
        """``direct=False`` writes through the page cache (say, on an NFS mount where direct
        writes are synchronous round trips and turn out slower):
        ``BackendOptions.direct_writes``."""
        # The flag belongs to the open file, shared by every descriptor of it; no descriptor
        # is kept here, since the one given may be closed before the next write.
        self._direct = False
        self._lock = threading.Lock()  # guards _direct and _spare
        self._spare: mmap.mmap | None = None
        flag = getattr(os, "O_DIRECT", 0)
        if flag and direct:
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | flag)
                self._direct = True

    def pwrite(self, fd: int, data: bytes, offset: int) -> None:
        """Write ``data`` at ``offset`` through ``fd``, a descriptor of the open file given at
        construction (its flags are shared)."""
        view = memoryview(data).cast("B")
        if self._direct and offset % self.ALIGN == 0:
            whole = len(view) - len(view) % self.ALIGN
            if whole and self._write_direct(fd, view[:whole], offset):
                view, offset = view[whole:], offset + whole
            if view:
                self._stop_direct(fd)  # the unaligned tail: the object's last bytes
        pwrite_all(fd, view, offset)

    def _write_direct(self, fd: int, view: memoryview, offset: int) -> bool:
        with self._lock:
            buffer, self._spare = self._spare, None
        if buffer is None or len(buffer) < len(view):
            _unmap(buffer)
            buffer = mmap.mmap(-1, len(view))  # page-aligned, as O_DIRECT needs
        try:
            with memoryview(buffer) as aligned:
                aligned[: len(view)] = view
                try:
                    pwrite_all(fd, aligned[: len(view)], offset)
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    self._stop_direct(fd)  # accepted at open, refused at write: buffered it is
                    return False
            return True
        finally:
            with self._lock:
                if self._spare is None:
                    self._spare, buffer = buffer, None
            _unmap(buffer)

    def _stop_direct(self, fd: int) -> None:
        with self._lock:
            if not self._direct:
                return
            self._direct = False
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)

    def close(self) -> None:
        with self._lock:
            spare, self._spare = self._spare, None
        _unmap(spare)


def _unmap(buffer: mmap.mmap | None) -> None:
    if buffer is not None:
        # A failed write's traceback may still hold a view of the buffer; the mapping then
        # goes when that does.
        with contextlib.suppress(BufferError):
            buffer.close()


def _close_quietly(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


class _LocalUpload(Upload):
    """A temp sibling, written at fixed offsets, fsynced and renamed into place.

    Each step runs on an executor thread, and a step that outlives its attempt timeout keeps
    running while the retry goes ahead. So a write goes through a descriptor of its own
    (closing the upload's never leaves a late write aimed at a reused number), to an offset
    fixed by the data (a late write repeats the same bytes at the same place, even after
    the rename), and ``_lock`` is only ever held for bookkeeping, never across I/O that can
    stall: a retry never queues behind a stalled write, and abort never waits.
    """

    ordered = True

    def __init__(self, path: str, *, direct_writes: bool = True) -> None:
        self._path = path
        self._direct_writes = direct_writes
        self._temp: str | None = None
        self._fd = -1
        self._hold = -1  # keeps the temp file's flock until it is renamed or removed
        self._offset = 0  # where the next part goes (advanced once a part is written)
        self._writer: _DirectWriter | None = None
        self._lock = threading.Lock()
        self._state = "new"  # -> "open" -> "published" | "aborted"
        self._sync = "no"  # -> "running" -> "done" | "failed": the fsync before the rename
        self._publishing: asyncio.Future[None] | None = None

    def _open_temp(self) -> None:
        directory = os.path.dirname(self._path)
        os.makedirs(directory, exist_ok=True)
        # What a save killed mid-write left beside the object goes now; a live save's temp
        # file is locked and stays (see sweep_partials).
        sweep_partials(self._path)
        temp, fd = open_temp_sibling(self._path)
        with self._lock:
            if self._state == "new":
                # The lock on the temp file lives as long as one descriptor of it does: this
                # one is kept until the file is renamed into place or removed.
                self._temp, self._fd, self._hold, self._state = temp, fd, os.dup(fd), "open"
                return
        os.unlink(temp)  # a late first attempt: the retry's file is the one in use
        os.close(fd)

    def _write(self, data: bytes, offset: int, direct: bool) -> None:
        with self._lock:
            if self._state == "published" or self._sync != "no":
                # A retried finish whose publish ran late: every byte was written before
                # the publish began.
                return
            if self._state != "open":
                raise OSError(f"write to {self._path} after the upload was {self._state}")
            fd = os.dup(self._fd)
            if direct and self._writer is None:
                self._writer = _DirectWriter(fd, direct=self._direct_writes)
            writer = self._writer
        try:
            if writer is not None:
                writer.pwrite(fd, data, offset)
            else:
                pwrite_all(fd, data, offset)
        finally:
            os.close(fd)

    async def begin(self) -> None:
        if self._state == "new":
            await _blocking(self._open_temp)

    async def put_part(self, number: int, data: bytes) -> None:
        # Parts come only for objects larger than one part: worth bypassing the page cache.
        await _blocking(self._write, data, self._offset, True)
        self._offset += len(data)

    async def finish(self, number: int, data: bytes, total: int) -> None:
        if self._state == "published":  # a retry of a finish whose publish ran late
            return
        await self.begin()
        if data:  # at its final place whatever happened before: a retry writes it again there
            await _blocking(self._write, data, total - len(data), number > 1)
        if self._publishing is None or self._publishing.done():
            self._publishing = asyncio.get_running_loop().run_in_executor(None, self._publish)
            # Retrieved here, so that a failure nobody awaits any more is not reported.
            self._publishing.add_done_callback(lambda job: job.cancelled() or job.exception())
        # A retry after a timeout waits for the publish still running (an fsync can be long),
        # holding no thread, instead of starting another.
        await asyncio.shield(self._publishing)

    async def put_whole(self, data: bytes) -> None:
        await self.finish(1, data, len(data))

    def _publish(self) -> None:
        # Data on disk before the name points at it, and the rename itself made durable.
        with self._lock:
            if self._state == "published":
                return
            if self._state != "open":
                raise OSError(f"publish of {self._path} after the upload was {self._state}")
            if self._sync == "failed":
                raise OSError(errno.EIO, f"fsync of {self._temp} failed earlier; not publishing")
            if self._sync == "running":  # a late attempt is still syncing: retry later
                raise TimeoutError(f"fsync of {self._temp} still running")
            fd = -1
            if self._sync == "no":
                fd, self._fd, self._sync = self._fd, -1, "running"
        if fd >= 0:
            try:
                os.fsync(fd)
                os.close(fd)
            except OSError as exc:
                with self._lock:
                    self._sync = "failed"
                with contextlib.suppress(OSError):
                    os.close(fd)
                # Never retried: Linux reports lost write-back once, so a second fsync
                # could succeed over pages that never reached the disk.
                raise OSError(errno.EIO, f"fsync of {self._temp} failed: {exc}") from None
            with self._lock:
                self._sync = "done"
        with self._lock:
            if self._state != "open":  # aborted meanwhile: the temp file is gone
                raise OSError(f"publish of {self._path} after the upload was {self._state}")
            os.replace(self._temp, self._path)
            self._temp, self._state = None, "published"
            writer, self._writer = self._writer, None
            hold, self._hold = self._hold, -1
        _close_quietly(hold)
        if writer is not None:
            writer.close()
        fsync_dir(os.path.dirname(self._path))

    def _discard(self) -> None:
        with self._lock:
            if self._state == "published":
                return
            self._state = "aborted"
            writer, self._writer = self._writer, None
            fd, self._fd = self._fd, -1
            temp, self._temp = self._temp, None
            hold, self._hold = self._hold, -1
        if writer is not None:
            writer.close()
        if temp is not None:  # removed while still locked: no sweep races for it
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        _close_quietly(fd)
        _close_quietly(hold)

    async def abort(self) -> None:
        self._discard()  # never waits on anything: no executor hop


class LocalBackend(Backend):
    part_size = 8 * MiB
    concurrency = 2

    @staticmethod
    def local_path(path: str) -> str:
        if path.startswith("file://"):
            path = path[len("file://"):]
        return os.path.abspath(os.path.expanduser(path))

    async def size(self, path: str) -> int:
        st = await _blocking(os.stat, self.local_path(path))
        if not os.path.isfile(self.local_path(path)):
            raise FileNotFoundError(path)
        return st.st_size

    async def open_source(self, path: str) -> Source:
        local = self.local_path(path)
        if os.path.isdir(local):
            raise IsADirectoryError(local)
        fd = await _blocking(os.open, local, os.O_RDONLY)
        return _LocalSource(fd)

    def new_upload(self, path: str) -> Upload:
        local = self.local_path(path)
        if os.path.isdir(local):
            # os.replace would refuse it only after the whole object was written.
            raise IsADirectoryError(errno.EISDIR, "write: a directory is there, and an "
                                    "object is one file, not a directory", path)
        return _LocalUpload(local, direct_writes=self.options.direct_writes)
