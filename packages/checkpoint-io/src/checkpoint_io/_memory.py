"""fsspec's in-process memory filesystem: the object is set only when the write succeeds."""

from __future__ import annotations

from typing import Any

from ._backend import Backend, BackendOptions, Source, Upload

__all__ = ["MemoryBackend"]


class _MemorySource(Source):
    def __init__(self, data: bytes) -> None:
        self._data = data  # a snapshot: later overwrites do not affect this reader
        self.size = len(data)

    read_blocking_is_instant = True

    async def read_range(self, start: int, end: int) -> bytes:
        return self._data[start:end]

    def read_blocking(self, start: int, end: int) -> bytes:
        if start == 0 and end == self.size:
            return self._data  # bytes are immutable: the whole snapshot needs no copy
        return self._data[start:end]


class _MemoryUpload(Upload):
    ordered = True

    def __init__(self, fs, path: str) -> None:
        self._fs = fs
        self._path = path
        self._parts: list[bytes] = []

    async def put_part(self, number: int, data: bytes) -> None:
        self._parts.append(data)

    async def finish(self, number: int, data: bytes, total: int) -> None:
        self._fs.pipe_file(self._path, b"".join([*self._parts, data]))
        self._parts = []

    async def put_whole(self, data: bytes) -> None:
        self._fs.pipe_file(self._path, data)

    async def abort(self) -> None:
        self._parts = []


class MemoryBackend(Backend):
    def __init__(self, storage_options: dict[str, Any],
                 options: BackendOptions | None = None) -> None:
        super().__init__(storage_options, options)
        from fsspec.implementations.memory import MemoryFileSystem

        self.fs = MemoryFileSystem(**storage_options)

    async def size(self, path: str) -> int:
        info = self.fs.info(path)
        if info["type"] != "file":
            raise FileNotFoundError(path)
        return info["size"]

    async def open_source(self, path: str) -> Source:
        return _MemorySource(self.fs.cat_file(path))

    def new_upload(self, path: str) -> Upload:
        return _MemoryUpload(self.fs, path)
