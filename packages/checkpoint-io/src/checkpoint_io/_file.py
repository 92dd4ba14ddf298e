"""The File model: the upstream ``flyte.io.File`` shape, over any backend."""

from __future__ import annotations

import errno
import io
import os
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr

from ._backend import BackendOptions
from ._loop import on_io_loop, refuse_in_loop, run_sync, sync_twin
from ._registry import backend_for, scheme_of
from ._retry import RetryPolicy
from ._stream import StreamReader, StreamWriter, Transfer, download_to, upload_from

__all__ = ["AsyncFile", "File", "SyncFile"]

_MODES = {"rb": "r", "r": "r", "wb": "w", "w": "w"}


@dataclass(frozen=True)
class _Options:
    storage_options: dict[str, Any] = field(default_factory=dict)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    part_size: int | None = None
    concurrency: int | None = None
    read_ahead: int | None = None
    read_concurrency: int | None = None
    memory_budget: int | None = None
    size_hint: int | None = None
    backend: BackendOptions = field(default_factory=BackendOptions)


class File(BaseModel):
    """A reference to one object (or local file), serialised like upstream ``flyte.io.File``.

    ``storage_options``, the :class:`RetryPolicy` and transfer tuning are runtime settings,
    not part of the serialised form: set them with :meth:`with_options`.
    """

    model_config = ConfigDict(extra="ignore")

    path: str
    name: str | None = None
    format: str = ""
    hash: str | None = None

    _options: _Options = PrivateAttr(default_factory=_Options)

    def model_post_init(self, context: Any) -> None:
        scheme_of(self.path)  # fail at construction on an unsupported scheme
        if self.name is None:
            self.name = self.path.rstrip("/").rsplit("/", 1)[-1]

    # --- configuration -------------------------------------------------------------

    def with_options(
        self,
        *,
        storage_options: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
        part_size: int | None = None,
        concurrency: int | None = None,
        read_ahead: int | None = None,
        read_concurrency: int | None = None,
        memory_budget: int | None = None,
        size_hint: int | None = None,
        direct_writes: bool | None = None,
        gcs_composite: bool | None = None,
        data_path: str | None = None,
    ) -> File:
        """A copy with client options (passed to the fsspec filesystem), a retry policy, a
        part/block size in bytes, a number of parts in flight (default: the store's, 8 on
        object stores), the most bytes a streaming read fetches ahead of the reader (default
        16 MiB), or the most ranged GETs a streaming read keeps in flight (default 8 on
        object stores; 1 is one long GET). Widths left unset adapt on object stores: reads
        start at the store's width and writes at 2, and they grow with the measured
        throughput while ``memory_budget`` bytes of buffers (default 160 MiB) hold the
        requests in flight. ``size_hint`` is about how many bytes a write will hold: parts
        are sized from the start so that the object fits the store's part limit (obstore's
        uploads cannot grow their parts), and on obstore's S3 and Azure uploads, smaller
        parts than for a write of unknown size keep more of them in flight.

        Backend switches: ``direct_writes`` (default on) writes local objects with
        ``O_DIRECT``, ``gcs_composite`` (default off) uploads GCS parts as temporary objects
        composed at the end. ``data_path`` picks the client for S3, GCS and Azure:
        ``"obstore"`` (its per-byte work outside the GIL), ``"fsspec"`` (s3fs, gcsfs,
        adlfs) or ``"auto"`` (the default: obstore when installed and the storage options
        translate, else fsspec). An argument left ``None`` keeps the value this File has."""
        changes: dict[str, Any] = {}
        if storage_options is not None:
            changes["storage_options"] = dict(storage_options)
        if retry is not None:
            changes["retry"] = retry
        if part_size is not None:
            changes["part_size"] = part_size
        if concurrency is not None:
            changes["concurrency"] = concurrency
        if read_ahead is not None:
            changes["read_ahead"] = read_ahead
        if read_concurrency is not None:
            changes["read_concurrency"] = read_concurrency
        if memory_budget is not None:
            changes["memory_budget"] = memory_budget
        if size_hint is not None:
            changes["size_hint"] = size_hint
        switches: dict[str, Any] = {}
        if direct_writes is not None:
            switches["direct_writes"] = bool(direct_writes)
        if gcs_composite is not None:
            switches["gcs_composite"] = bool(gcs_composite)
        if data_path is not None:
            from ._registry import DATA_PATHS

            if data_path not in DATA_PATHS:
                raise ValueError(f"data_path must be one of {', '.join(DATA_PATHS)}, "
                                 f"not {data_path!r}")
            switches["data_path"] = data_path
        if switches:
            changes["backend"] = replace(self._options.backend, **switches)
        copy = self.model_copy()
        copy._options = replace(self._options, **changes)
        return copy

    def _transfer(self) -> Transfer:
        if self.path.endswith("/"):
            # Every store would take it for another object: local paths drop the '/' (the
            # object became a file beside the directory meant), S3 and GCS keep it in the
            # key (a "folder" marker). A File is one object; say so, whatever the store.
            raise IsADirectoryError(
                errno.EISDIR, "the path ends in '/', so it names a directory or prefix, not "
                "an object (drop the trailing '/')", self.path)
        opts = self._options
        backend = backend_for(self.path, opts.storage_options, opts.backend)
        return Transfer(backend, self.path, self.path, opts.retry, opts.part_size,
                        opts.concurrency, opts.read_ahead, opts.read_concurrency,
                        opts.memory_budget, opts.size_hint)

    # --- constructors --------------------------------------------------------------

    @classmethod
    def from_existing_remote(cls, remote_path: str, **options: Any) -> File:
        """Refer to an object that already exists (nothing is checked or transferred)."""
        file = cls(path=remote_path)
        return file.with_options(**options) if options else file

    @classmethod
    async def from_local(
        cls, local_path: str | os.PathLike[str], remote_destination: str, **options: Any
    ) -> File:
        """Upload a local file to ``remote_destination`` (a trailing ``/`` means "into this
        prefix, under the file's own name") and return the File that refers to it."""
        local = os.fspath(local_path)
        if remote_destination.endswith("/"):
            remote_destination += os.path.basename(local)
        file = cls.from_existing_remote(remote_destination, **options)

        async def run() -> None:
            await upload_from(file._transfer(), local)

        await on_io_loop(run)
        return file

    # --- operations ----------------------------------------------------------------

    async def exists(self) -> bool:
        """Whether the object exists. Transient faults are retried, not reported as False."""

        async def run() -> bool:
            transfer = self._transfer()
            try:
                await transfer.retried("exists", lambda: transfer.backend.size(self.path))
            except FileNotFoundError:
                return False
            return True

        return await on_io_loop(run)

    async def download(self, local_path: str | os.PathLike[str] | None = None) -> str:
        """Copy the object to ``local_path`` (default: a new temp directory), atomically:
        the destination appears only once complete. Returns the local path."""
        if local_path is None:
            target = os.path.join(tempfile.mkdtemp(prefix="checkpoint-io-"), self.name or "file")
        else:
            target = os.fspath(local_path)
            if os.path.isdir(target):
                target = os.path.join(target, self.name or "file")

        async def run() -> None:
            transfer = self._transfer()
            source = await transfer.retried("open", lambda: transfer.backend.open_source(self.path))
            try:
                await download_to(transfer, source, target)
            finally:
                await source.close()

        await on_io_loop(run)
        return target

    def open(self, mode: Literal["rb", "wb", "r", "w"] = "rb") -> _Opening:
        """``async with file.open("wb") as f: await f.write(...)`` streams into the object,
        which is published only if the block exits without an exception. ``"rb"`` streams
        reads with a bounded prefetch. Modes are binary; ``"r"``/``"w"`` mean the same."""
        if mode not in _MODES:
            raise ValueError(f"open {self.path}: mode must be one of {sorted(_MODES)}, "
                             f"not {mode!r}")
        return _Opening(self, _MODES[mode])

    def open_sync(self, mode: Literal["rb", "wb", "r", "w"] = "rb") -> _SyncOpening:
        """Blocking twin of :meth:`open`: ``with file.open_sync("rb") as f: f.read(n)``."""
        return _SyncOpening(self.open(mode))

    exists_sync = sync_twin(exists)
    download_sync = sync_twin(download)
    from_local_sync = classmethod(sync_twin(from_local.__func__))


class AsyncFile:
    """A file object streaming to or from one object; every method runs on the I/O loop."""

    def __init__(self, uri: str, stream: StreamReader | StreamWriter) -> None:
        self.uri = uri
        self._stream = stream

    def readable(self) -> bool:
        return isinstance(self._stream, StreamReader)

    def writable(self) -> bool:
        return isinstance(self._stream, StreamWriter)

    @property
    def closed(self) -> bool:
        return self._stream.closed

    @property
    def size(self) -> int | None:
        """The object's size when reading; ``None`` when writing."""
        return self._stream.size if isinstance(self._stream, StreamReader) else None

    def tell(self) -> int:
        return self._stream.tell()

    def _reader(self) -> StreamReader:
        if not isinstance(self._stream, StreamReader):
            raise io.UnsupportedOperation(f"read from {self.uri}: opened for writing")
        return self._stream

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all the rest when ``n < 0``); ``b""`` at the end."""
        stream = self._reader()
        if stream.direct:  # local/memory: holds no state bound to the I/O loop
            return await stream.read(n)
        return await on_io_loop(lambda: stream.read(n))

    async def read_pieces(self, n: int = -1) -> list[Any]:
        """Up to ``n`` bytes like :meth:`read`, as the buffers they arrived in (bytes or
        memoryviews, in order; ``[]`` at the end): no copy joins them."""
        stream = self._reader()
        if stream.direct:
            return await stream.read_pieces(n)
        return await on_io_loop(lambda: stream.read_pieces(n))

    async def write(self, data: bytes | bytearray | memoryview, *, owned: bool = False) -> int:
        """Append ``data``; returns its length. Waits while enough parts are in flight.
        ``owned=True`` hands ``data`` over: the caller promises never to change it again,
        so it may be uploaded as it is instead of copied (``bytes`` always may)."""
        if not isinstance(self._stream, StreamWriter):
            raise io.UnsupportedOperation(f"write to {self.uri}: opened for reading")
        stream = self._stream
        return await on_io_loop(lambda: stream.write(data, owned=owned))

    async def close(self) -> None:
        """Finish: a writer publishes the object (aborting, then raising, if that fails)."""
        stream = self._stream
        if isinstance(stream, StreamWriter):
            await on_io_loop(stream.commit)
        else:
            await on_io_loop(stream.close)

    async def abort(self) -> None:
        """Discard a write; the previous object (if any) stays intact."""
        stream = self._stream
        if isinstance(stream, StreamWriter):
            await on_io_loop(stream.abort)
        else:
            await on_io_loop(stream.close)

    async def __aenter__(self) -> AsyncFile:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.abort()


class SyncFile:
    """Blocking twin of :class:`AsyncFile`; each method runs its coroutine on the I/O loop."""

    def __init__(self, afile: AsyncFile) -> None:
        self._afile = afile
        self.uri = afile.uri

    def __getattr__(self, name: str) -> Any:  # readable, writable, closed, size, tell
        return getattr(self._afile, name)

    def read(self, n: int = -1) -> bytes:
        stream = self._afile._reader()
        if stream.direct:
            # Local files and memory are read right here, in the caller's thread.
            refuse_in_loop("read")
            return stream.read_direct(n)
        return run_sync(lambda: stream.read(n), name="read")

    def read_pieces(self, n: int = -1) -> list[Any]:
        """Blocking twin of :meth:`AsyncFile.read_pieces`."""
        stream = self._afile._reader()
        if stream.direct:
            refuse_in_loop("read_pieces")
            data = stream.read_direct(n)
            return [data] if data else []
        return run_sync(lambda: stream.read_pieces(n), name="read_pieces")

    def write(self, data: bytes | bytearray | memoryview, *, owned: bool = False) -> int:
        """Blocking twin of :meth:`AsyncFile.write`."""
        stream = self._afile._stream
        if not isinstance(stream, StreamWriter):
            return run_sync(lambda: self._afile.write(data, owned=owned), name="write")
        # The copy into the part buffer is made here, in the caller's thread; only full
        # parts hop to the I/O loop (which has every connection's work to do).
        refuse_in_loop("write")
        size, parts = stream.stage(data, owned=owned)
        if parts:
            run_sync(lambda: stream.send(parts), name="write")
        return size

    def close(self) -> None:
        run_sync(self._afile.close, name="close")

    def abort(self) -> None:
        run_sync(self._afile.abort, name="abort")

    def __enter__(self) -> SyncFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        run_sync(lambda: self._afile.__aexit__(exc_type, exc, tb), name="__exit__")


class _Opening:
    """The async context manager returned by :meth:`File.open`."""

    def __init__(self, file: File, mode: str) -> None:
        self._file = file
        self._mode = mode
        self._afile: AsyncFile | None = None

    async def _start(self) -> AsyncFile:
        file = self._file

        async def run() -> AsyncFile:
            transfer = file._transfer()
            if self._mode == "w":
                return AsyncFile(file.path, StreamWriter(transfer))
            source = await transfer.retried("open", lambda: transfer.backend.open_source(file.path))
            return AsyncFile(file.path, StreamReader(transfer, source))

        return await on_io_loop(run)

    async def __aenter__(self) -> AsyncFile:
        self._afile = await self._start()
        return self._afile

    async def __aexit__(self, exc_type, exc, tb) -> None:
        assert self._afile is not None
        await self._afile.__aexit__(exc_type, exc, tb)


class _SyncOpening:
    def __init__(self, opening: _Opening) -> None:
        self._opening = opening
        self._file: SyncFile | None = None

    def __enter__(self) -> SyncFile:
        self._file = SyncFile(run_sync(self._opening.__aenter__, name="open_sync"))
        return self._file

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._file is not None
        self._file.__exit__(exc_type, exc, tb)




