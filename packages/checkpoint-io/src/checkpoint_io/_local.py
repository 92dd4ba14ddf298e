"""Local files: a temp sibling, fsynced and renamed into place; reads pin the inode."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from typing import Any

from ._backend import Backend, MiB, Source, Upload
from ._stream import _fsync_dir, _pwrite_all, _temp_sibling

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


class _LocalUpload(Upload):
    ordered = True

    def __init__(self, path: str) -> None:
        self._path = path
        self._temp: str | None = None
        self._fd = -1
        self._offset = 0

    def _open_temp(self) -> None:
        directory = os.path.dirname(self._path)
        os.makedirs(directory, exist_ok=True)
        self._temp = _temp_sibling(self._path)
        self._fd = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)

    async def begin(self) -> None:
        if self._fd < 0:
            await _blocking(self._open_temp)

    async def put_part(self, number: int, data: bytes) -> None:
        await _blocking(_pwrite_all, self._fd, data, self._offset)
        self._offset += len(data)

    async def finish(self, number: int, data: bytes, total: int) -> None:
        await self.begin()
        if data:
            await self.put_part(number, data)
        await _blocking(self._publish)

    async def put_whole(self, data: bytes) -> None:
        await self.finish(1, data, len(data))

    def _publish(self) -> None:
        # Data on disk before the name points at it, and the rename itself made durable.
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        os.replace(self._temp, self._path)
        self._temp = None
        _fsync_dir(os.path.dirname(self._path))

    async def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._temp)
            self._temp = None


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
        return _LocalUpload(self.local_path(path))
