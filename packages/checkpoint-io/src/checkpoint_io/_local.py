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

from ._backend import Backend, MiB, PartRecord, SegmentSink, SharedTarget, Source, Upload
from ._errors import SharedUploadError
from ._localfs import (
    _NO_FLOCK,
    _PARTIAL,
    _same_file,
    fsync_dir,
    open_temp_sibling,
    pwrite_all,
    sweep_partials,
)

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


# --- shared uploads --------------------------------------------------------------------
#
# Segment i of upload U to /d/name is the part file /d/.name.partial-<U><i as 4 hex digits>,
# and /d/.name.partial-<U>ffff marks the upload as open: named like the temp siblings of
# ordinary saves, so that the same sweep removes what a killed process left (unlocked and
# idle for PARTIAL_IDLE). The process that began the upload holds a shared flock on the
# marker, a segment writer an exclusive one on its part file, for as long as they live.

_MARKER_INDEX = 0xFFFF
#: Open markers of this process: path -> the descriptor holding its shared lock.
_markers: dict[str, int] = {}
_markers_lock = threading.Lock()


def _shared_name(path: str, upload: str, index: int) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}{_PARTIAL}{upload}{index:04x}")


def _flock(fd: int, how: int) -> bool:
    """Take a lock; False if another holds it. A file system without flock counts as
    locked by us (the sweep's idle guard protects the file then)."""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_FLOCK:
            raise
    return True


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                             errno.EPERM})


def _copy_range(src: int, dst: int, size: int, offset: int) -> None:
    """Write the first ``size`` bytes of ``src`` at ``offset`` of ``dst``: in the kernel with
    ``copy_file_range`` (a reflink on file systems that share extents), else ``sendfile``,
    else through a buffer."""
    done = 0
    for step in (_copy_file_range, _sendfile, _buffered):
        try:
            done = step(src, dst, size, offset, done)
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY or step is _buffered:
                raise
            continue  # refused here (another file system, an old kernel): the next way
        if done == size:
            return


def _ended(done: int, size: int) -> OSError:
    return OSError(errno.EIO, f"part file ended at byte {done} of {size} (it shrank?)")


def _copy_file_range(src: int, dst: int, size: int, offset: int, done: int) -> int:
    copy = getattr(os, "copy_file_range", None)
    if copy is None:
        raise OSError(errno.ENOSYS, "no copy_file_range")
    while done < size:
        sent = copy(src, dst, size - done, done, offset + done)
        if sent == 0:
            raise _ended(done, size)
        done += sent
    return done


def _sendfile(src: int, dst: int, size: int, offset: int, done: int) -> int:
    os.lseek(dst, offset + done, os.SEEK_SET)
    while done < size:
        sent = os.sendfile(dst, src, done, size - done)
        if sent == 0:
            raise _ended(done, size)
        done += sent
    return done


def _buffered(src: int, dst: int, size: int, offset: int, done: int) -> int:
    while done < size:
        chunk = os.pread(src, min(8 * MiB, size - done), done)
        if not chunk:
            raise _ended(done, size)
        pwrite_all(dst, chunk, offset + done)
        done += len(chunk)
    return done


class _LocalSegment(SegmentSink):
    """One segment written into its own part file, at the offsets of its parts."""

    def __init__(self, target: _LocalShared, index: int) -> None:
        self._target = target
        self._index = index
        self._name = _shared_name(target.path, target.upload, index)
        self._fd = -1
        self._lock = threading.Lock()

    def _open(self) -> None:
        self._target.check_open(f"open segment {self._index}", self._index)
        fd = os.open(self._name, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            if not _flock(fd, fcntl.LOCK_EX):
                raise SharedUploadError(self._target.path, f"open segment {self._index}",
                                        f"segment {self._index} is being written by another "
                                        f"writer ({self._name} is locked)", self._index)
            if not _same_file(fd, self._name):  # aborted in between
                self._target.check_open(f"open segment {self._index}", self._index)
                raise OSError(errno.ESTALE, f"{self._name} was removed while opening")
            os.ftruncate(fd, 0)  # what a writer of this segment that died left
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            old, self._fd = self._fd, fd
        _close_quietly(old)
        self._target.touch()

    async def open(self) -> None:
        await _blocking(self._open)

    def _write(self, offset: int, data: bytes) -> None:
        with self._lock:
            if self._fd < 0:
                raise OSError(errno.EBADF, f"segment {self._index} of {self._target.path} "
                              "is closed")
            fd = os.dup(self._fd)
        try:
            pwrite_all(fd, data, offset)
        finally:
            os.close(fd)

    async def put_part(self, number: int, offset: int, data: bytes) -> str:
        await _blocking(self._write, offset, data)
        return ""

    def _close(self, size: int) -> None:
        with self._lock:
            fd = self._fd
        operation = f"close segment {self._index}"
        if fd < 0:
            raise OSError(errno.EBADF, f"{operation} of {self._target.path}: not open")
        if os.fstat(fd).st_size != size:
            raise OSError(errno.EIO, f"{operation} of {self._target.path}: {self._name} holds "
                          f"{os.fstat(fd).st_size} bytes, {size} were written")
        os.fsync(fd)
        if not _same_file(fd, self._name):
            raise SharedUploadError(self._target.path, operation, f"{self._name} was removed "
                                    "(the upload was aborted, or swept)", self._index)
        self._target.check_open(operation, self._index)
        self._target.touch()
        with self._lock:
            self._fd = -1
        os.close(fd)  # the lock goes: the file waits, fresh, for the commit

    async def close(self, size: int) -> None:
        await _blocking(self._close, size)

    async def abort(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            if _same_file(fd, self._name):  # removed while still locked: no sweep races
                _unlink_quietly(self._name)
            _close_quietly(fd)


class _LocalShared(SharedTarget):
    """Part files beside the destination, joined in the kernel into a temp sibling that is
    fsynced and renamed into place; see the comment above."""

    max_segments = _MARKER_INDEX  # indexes 0-fffe; ffff is the marker
    commit_retried = False  # one long local copy: never raced by a retry after a timeout

    def __init__(self, path: str, segments: int, upload: str, state: dict | None) -> None:
        super().__init__(path, segments, upload, state)
        self.marker = _shared_name(path, upload, _MARKER_INDEX)

    def check_open(self, operation: str, index: int | None = None) -> None:
        if not os.path.exists(self.marker):
            raise SharedUploadError(
                self.path, operation, f"shared upload {self.upload} is no longer open (it was "
                f"committed or aborted, or swept: {self.marker} is gone)", index)

    def touch(self) -> None:
        # Keeps the marker fresh for the sweep's idle guard while segments come and go.
        with contextlib.suppress(OSError):
            os.utime(self.marker)

    def _begin(self) -> dict:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        sweep_partials(self.path)
        fd = os.open(self.marker, os.O_RDONLY | os.O_CREAT | os.O_EXCL
                     | getattr(os, "O_CLOEXEC", 0), 0o666)
        _flock(fd, fcntl.LOCK_SH)
        with _markers_lock:
            _markers[self.marker] = fd
        fsync_dir(os.path.dirname(self.path))
        return self.state

    async def begin(self) -> dict:
        return await _blocking(self._begin)

    def segment(self, index: int) -> SegmentSink:
        return _LocalSegment(self, index)

    def _release_marker(self) -> None:
        _unlink_quietly(self.marker)
        with _markers_lock:
            fd = _markers.pop(self.marker, -1)
        _close_quietly(fd)

    def _remove_parts(self) -> None:
        for index in range(self.segments):
            _unlink_quietly(_shared_name(self.path, self.upload, index))

    def _commit(self, segments: list[tuple[int, int, list[PartRecord]]]) -> None:
        operation = "commit shared upload"
        self.check_open(operation)
        if os.path.isdir(self.path):
            raise IsADirectoryError(errno.EISDIR, "commit: a directory is there, and an object "
                                    "is one file, not a directory", self.path)
        sources = []
        try:
            for index, size, _ in segments:
                if size == 0:
                    continue
                name = _shared_name(self.path, self.upload, index)
                try:
                    fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except FileNotFoundError:
                    raise SharedUploadError(self.path, operation, f"the part file of segment "
                                            f"{index} is gone ({name})", index) from None
                sources.append(fd)
                held = os.fstat(fd).st_size
                if held != size:
                    raise SharedUploadError(self.path, operation, f"the part file of segment "
                                            f"{index} holds {held} bytes, its receipt says "
                                            f"{size}", index)
            temp, out = open_temp_sibling(self.path)
            try:
                offset = 0
                for fd in sources:
                    size = os.fstat(fd).st_size
                    _copy_range(fd, out, size, offset)
                    offset += size
                os.fsync(out)
                self.check_open(operation)  # aborted meanwhile: publish nothing
                os.replace(temp, self.path)
            except BaseException:
                _unlink_quietly(temp)
                raise
            finally:
                os.close(out)
        finally:
            for fd in sources:
                os.close(fd)
        fsync_dir(os.path.dirname(self.path))
        self._release_marker()
        self._remove_parts()

    async def commit(self, segments: list[tuple[int, int, list[PartRecord]]]) -> None:
        await _blocking(self._commit, segments)

    def _abort(self) -> None:
        self._release_marker()  # first: segments still writing fail at close
        self._remove_parts()

    async def abort(self) -> None:
        await _blocking(self._abort)


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

    def shared_target(self, path: str, segments: int, upload: str,
                      state: dict | None) -> SharedTarget:
        local = self.local_path(path)
        if os.path.isdir(local):
            raise IsADirectoryError(errno.EISDIR, "write: a directory is there, and an "
                                    "object is one file, not a directory", path)
        return _LocalShared(local, segments, upload, state)

    async def sweep_shared(self, path: str, older_than: float) -> list[str]:
        local = self.local_path(path)
        return await _blocking(sweep_partials, local, older_than)
