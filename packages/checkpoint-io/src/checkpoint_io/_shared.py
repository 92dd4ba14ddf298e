"""Shared uploads: ONE object assembled from ``segments`` pieces that any processes write,
published atomically by one commit.

>>> upload = SharedUpload.begin_sync(File(path="s3://b/ckpt.tar"), segments=4)  # doctest: +SKIP
>>> # in each process i, with the token sent over:
>>> shared = SharedUpload.join(File(path="s3://b/ckpt.tar"), upload.token)  # doctest: +SKIP
>>> with shared.open_segment_sync(i, pad=zero_blocks) as segment:  # doctest: +SKIP
...     segment.write(piece)
>>> upload.commit_sync(receipts)  # the receipts of every segment  # doctest: +SKIP

The store's side (a multipart upload, blocks of one blob, temporary objects composed, part
files joined) is each backend's :class:`~checkpoint_io._backend.SharedTarget`; this module
holds what is common: the token, the segment writer (parts in flight, held-back last part,
padding), the receipts and their checks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from ._backend import PartRecord, SegmentSink, SharedTarget, grown_part_size
from ._errors import SharedUploadError
from ._file import File
from ._loop import on_io_loop, run_sync, sync_twin
from ._retry import RetryPolicy, call_with_retries
from ._stream import Transfer

__all__ = ["AsyncSegmentWriter", "SegmentReceipt", "SegmentWriter", "SharedUpload",
           "sweep_shared_uploads", "sweep_shared_uploads_sync"]

log = logging.getLogger("checkpoint_io")

_TOKEN_KIND = "checkpoint-io/shared-upload"
_TOKEN_VERSION = 1
# Aborting is best effort (nothing is published either way): a short budget of its own.
_ABORT_POLICY = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2, deadline=20.0,
                            attempt_timeout=10.0)
#: How long an abort lets a segment's part uploads in flight end, so that a part the store
#: took whole after a cancelled request is found by the cleanup (GCS temporaries).
_PARTS_SETTLE_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class SegmentReceipt:
    """What the commit needs to know of one closed segment: picklable, and JSON-able with
    :meth:`to_json` / :meth:`from_json` to travel between processes.

    ``size`` counts the padding (``padding`` bytes from the caller's ``pad``); ``parts`` are
    ``(part number, the store's identifier, size)`` in number order; ``upload`` is the id
    of the shared upload the segment belongs to (a receipt of another is refused)."""

    upload: str
    index: int
    size: int
    padding: int = 0
    parts: tuple[PartRecord, ...] = ()

    def to_json(self) -> str:
        return json.dumps({"upload": self.upload, "index": self.index, "size": self.size,
                           "padding": self.padding, "parts": [list(p) for p in self.parts]})

    @classmethod
    def from_json(cls, text: str | bytes) -> SegmentReceipt:
        """Rebuild a receipt; ``ValueError`` saying what is wrong when ``text`` is not one."""
        try:
            data = json.loads(text)
            upload, index, size = data["upload"], data["index"], data["size"]
            padding = data.get("padding", 0)
            parts = tuple((int(n), str(pid), int(sz)) for n, pid, sz in data.get("parts", []))
            if not (isinstance(upload, str) and all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0
                    for v in (index, size, padding))):
                raise TypeError("upload must be a string; index, size, padding whole numbers >= 0")
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"not a segment receipt: {exc} (in {str(text)[:200]!r})") from None
        return cls(upload, index, size, padding, parts)


def _seconds(value: float | datetime.timedelta) -> float:
    return value.total_seconds() if isinstance(value, datetime.timedelta) else float(value)


class SharedUpload:
    """One object at ``file.path`` made of ``segments`` pieces, piece ``i`` written by any
    process through :meth:`open_segment`, published (pieces in index order) by
    :meth:`commit` alone; :meth:`abort` removes what was sent and leaves the previous object
    as it was. Readers never see a partial result.

    Start it with :meth:`begin`; other processes rebuild it from :attr:`token` with
    :meth:`join`. Every segment but the last must hold :attr:`min_segment` bytes or none.
    """

    def __init__(self, file: File, *, upload: str, segments: int, min_segment: int,
                 state: dict[str, Any]) -> None:
        self.file = file
        self.upload = upload
        self.segments = segments
        self.min_segment = min_segment
        self._state = dict(state)
        self._status = "open"  # -> "committed" | "aborted" (as far as this process knows)

    def __repr__(self) -> str:
        return (f"SharedUpload({self.file.path!r}, segments={self.segments}, "
                f"upload={self.upload!r}, {self._status})")

    # --- starting and joining ------------------------------------------------------

    def _target(self) -> tuple[Transfer, SharedTarget]:
        transfer = _transfer(self.file)
        target = transfer.backend.shared_target(self.file.path, self.segments, self.upload,
                                                self._state)
        return transfer, target

    @classmethod
    async def begin(cls, file: File, *, segments: int) -> SharedUpload:
        """Start a shared upload of ``segments`` pieces to ``file``; nothing is visible at
        its path until :meth:`commit`."""
        if isinstance(segments, bool) or not isinstance(segments, int) or segments < 1:
            raise ValueError(f"shared upload to {file.path}: segments must be a whole number "
                             f">= 1, not {segments!r}")

        async def run() -> SharedUpload:
            transfer = _transfer(file)
            upload = secrets.token_hex(4)
            target = transfer.backend.shared_target(file.path, segments, upload, None)
            if segments > target.max_segments:
                raise ValueError(f"shared upload to {file.path}: {segments} segments; this "
                                 f"store takes at most {target.max_segments}")
            state = await transfer.retried("start shared upload", target.begin)
            return cls(file, upload=upload, segments=segments,
                       min_segment=target.min_segment, state=state)

        return await on_io_loop(run)

    @property
    def token(self) -> str:
        """Small JSON text holding what another process needs to :meth:`join` (the object,
        the store's upload id or prefix, the segment count). No credentials."""
        return json.dumps({"kind": _TOKEN_KIND, "version": _TOKEN_VERSION,
                           "uri": self.file.path, "segments": self.segments,
                           "upload": self.upload, "min_segment": self.min_segment,
                           "state": self._state}, sort_keys=True)

    @classmethod
    def join(cls, file: File, token: str) -> SharedUpload:
        """The shared upload that ``token`` (from :attr:`token`) describes, writing to
        ``file`` (the same path; its options are this process's own). No I/O: a token of an
        upload committed or aborted meanwhile fails when a segment opens or at the commit."""
        def bad(reason: str) -> SharedUploadError:
            return SharedUploadError(file.path, "join shared upload", reason)

        try:
            data = json.loads(token)
        except (TypeError, ValueError) as exc:
            raise bad(f"the token is not JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("kind") != _TOKEN_KIND:
            raise bad("the token is not a shared-upload token")
        if data.get("version") != _TOKEN_VERSION:
            raise bad(f"token version {data.get('version')!r}; this checkpoint-io reads "
                      f"version {_TOKEN_VERSION}")
        if data.get("uri") != file.path:
            raise bad(f"the token is for {data.get('uri')!r}, not this object")
        segments, upload = data.get("segments"), data.get("upload")
        min_segment, state = data.get("min_segment"), data.get("state")
        if not (isinstance(segments, int) and segments >= 1 and isinstance(upload, str)
                and isinstance(min_segment, int) and isinstance(state, dict)):
            raise bad("the token lacks segments, upload, min_segment or state")
        return cls(file, upload=upload, segments=segments, min_segment=min_segment,
                   state=state)

    # --- segments --------------------------------------------------------------------

    def open_segment(self, index: int, *,
                     pad: Callable[[int], bytes] | None = None) -> _SegmentOpening:
        """Write segment ``index`` (``0 <= index < segments``): ``async with
        upload.open_segment(i) as segment: await segment.write(...)``, then
        ``segment.receipt``; or ``segment = await upload.open_segment(i)`` and ``receipt =
        await segment.close()``.

        A segment other than the last holding fewer than :attr:`min_segment` bytes (but
        some) at close gets ``pad(missing)`` appended first: bytes that add nothing to the
        caller's format, at least ``missing`` of them. Without ``pad`` that is an error."""
        return _SegmentOpening(self, index, pad)

    def open_segment_sync(self, index: int, *,
                          pad: Callable[[int], bytes] | None = None) -> SegmentWriter:
        """Blocking twin of :meth:`open_segment`: ``with upload.open_segment_sync(i) as
        segment: segment.write(...)``; the writer is open when this returns."""
        opening = self.open_segment(index, pad=pad)
        return SegmentWriter(run_sync(opening._open, name="open_segment_sync"))

    def _check_open(self, operation: str, index: int | None = None) -> None:
        if self._status != "open":
            raise SharedUploadError(self.file.path, operation,
                                    f"shared upload {self.upload} was {self._status} already",
                                    index)

    # --- commit and abort -------------------------------------------------------------

    def _checked(self, receipts: Sequence[SegmentReceipt]) -> list[SegmentReceipt]:
        path, operation = self.file.path, "commit shared upload"
        found: dict[int, SegmentReceipt] = {}
        for receipt in receipts:
            if not isinstance(receipt, SegmentReceipt):
                raise TypeError(f"{operation} of {path}: receipts must be SegmentReceipt, "
                                f"not {type(receipt).__name__}")
            index = receipt.index
            if receipt.upload != self.upload:
                raise SharedUploadError(
                    path, operation, f"the receipt of segment {index} belongs to another "
                    f"shared upload ({receipt.upload}; this one is {self.upload})", index)
            if not 0 <= index < self.segments:
                raise SharedUploadError(
                    path, operation, f"a receipt names segment {index}; this upload has "
                    f"segments 0-{self.segments - 1}", index)
            if index in found:
                raise SharedUploadError(path, operation,
                                        f"two receipts for segment {index}", index)
            if sum(part[2] for part in receipt.parts) != receipt.size:
                raise SharedUploadError(
                    path, operation, f"the receipt of segment {index} says {receipt.size} "
                    "bytes, its parts another size", index)
            if index != self.segments - 1 and 0 < receipt.size < self.min_segment:
                raise SharedUploadError(
                    path, operation, f"segment {index} holds {receipt.size} bytes, fewer than "
                    f"the {self.min_segment} every segment but the last must hold", index)
            found[index] = receipt
        missing = [i for i in range(self.segments) if i not in found]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            raise SharedUploadError(
                path, operation, f"no receipt for segment{'s' if len(missing) > 1 else ''} "
                f"{shown}: every segment (an empty one too) must be closed first", missing[0])
        return [found[i] for i in range(self.segments)]

    async def commit(self, receipts: Sequence[SegmentReceipt]) -> None:
        """Publish the object atomically from the receipts of every segment, pieces in
        index order. A missing, duplicated or foreign receipt, or one whose parts the store
        does not hold as it says, raises :class:`SharedUploadError` naming the segment, and
        nothing is published (the upload stays open: commit again, or abort). If the store
        fails the commit otherwise, the upload is aborted and the error raised; either way
        the previous object stays as it was."""
        self._check_open("commit shared upload")
        ordered = self._checked(list(receipts))

        async def run() -> None:
            transfer, target = self._target()
            segments = [(r.index, r.size, list(r.parts)) for r in ordered]
            try:
                if target.commit_retried:
                    await transfer.retried("commit shared upload",
                                           lambda: target.commit(segments))
                else:
                    await target.commit(segments)
            except SharedUploadError:
                raise  # the store's check of the receipts: nothing published, still open
            except BaseException:
                await self._abort_on_loop(transfer, target)
                raise
            self._status = "committed"

        await on_io_loop(run)

    async def abort(self) -> None:
        """Remove what every segment sent (best effort: what a store keeps invisible and
        expires on its own may stay until then); the previous object stays as it was.
        Idempotent, and harmless after a commit (it never touches the object)."""
        if self._status == "committed":
            return

        async def run() -> None:
            transfer, target = self._target()
            await self._abort_on_loop(transfer, target)

        await on_io_loop(run)

    async def _abort_on_loop(self, transfer: Transfer, target: SharedTarget) -> None:
        self._status = "aborted"
        try:
            await call_with_retries(_ABORT_POLICY, self.file.path, "abort shared upload",
                                    target.abort)
        except Exception as exc:  # nothing was published; say so and move on
            log.warning("abort of the shared upload %s to %s failed (nothing was published): "
                        "%s", self.upload, self.file.path, exc)

    begin_sync = classmethod(sync_twin(begin.__func__))
    commit_sync = sync_twin(commit)
    abort_sync = sync_twin(abort)


class _SegmentStream:
    """One segment's bytes, cut into parts sent ``concurrency`` at a time (each retried on
    its own); lives on the I/O loop.

    A full part is sent only once more data follows, and where the store wants every part
    but the segment's last to be large (S3: 5 MiB) the last full part is held back too,
    until it is known not to be the segment's last: a short tail is then sent joined to it.
    Memory: the part being filled, the held one, and ``concurrency`` parts in flight.
    """

    def __init__(self, upload: SharedUpload, transfer: Transfer, sink: SegmentSink,
                 index: int, pad: Callable[[int], bytes] | None) -> None:
        self._upload = upload
        self._t = transfer
        self._sink = sink
        self.index = index
        self._pad = pad
        self._last = index == upload.segments - 1
        self._slots = asyncio.Semaphore(transfer.concurrency)
        self._buffer = bytearray()
        self._held: bytes | None = None
        self._next_part = sink.first_part
        self._offset = 0
        self._written = 0
        self._parts: list[PartRecord] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None
        self._status = "open"  # -> "closed" | "aborted"
        self.receipt: SegmentReceipt | None = None

    @property
    def uri(self) -> str:
        return self._t.uri

    @property
    def closed(self) -> bool:
        return self._status != "open"

    def tell(self) -> int:
        return self._written

    def _part_size(self) -> int:
        return grown_part_size(self._t.part_size, self._next_part - self._sink.first_part,
                               self._sink.max_parts, self._t.backend.max_part_size)

    async def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._status != "open":
            raise ValueError(f"write to segment {self.index} of {self.uri}: it is "
                             f"{self._status} already")
        view = memoryview(data).cast("B")
        size = view.nbytes
        try:
            while view.nbytes:
                if len(self._buffer) >= self._part_size():
                    part, self._buffer = bytes(self._buffer), bytearray()
                    if self._sink.min_part > 1:
                        held, self._held = self._held, part
                        if held is not None:
                            await self._send(held)
                    else:
                        await self._send(part)
                room = self._part_size() - len(self._buffer)
                self._buffer += view[:room]
                view = view[room:]
        except BaseException:
            await self.abort()
            raise
        self._written += size
        return size

    async def _send(self, part: bytes) -> None:
        self._raise_failure()
        number = self._next_part
        if number >= self._sink.first_part + self._sink.max_parts:
            raise SharedUploadError(
                self.uri, f"write segment {self.index}", f"the segment needs more than its "
                f"{self._sink.max_parts} parts; raise part_size or use fewer segments",
                self.index)
        await self._slots.acquire()
        self._next_part += 1
        offset, self._offset = self._offset, self._offset + len(part)
        task = asyncio.ensure_future(self._put(number, offset, part))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _put(self, number: int, offset: int, part: bytes) -> None:
        try:
            identifier = await self._t.retried(
                f"upload part {number} of segment {self.index}",
                lambda: self._sink.put_part(number, offset, part))
            self._parts.append((number, identifier, len(part)))
        except BaseException as exc:
            if self._failure is None:
                self._failure = exc
        finally:
            self._slots.release()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _padding(self) -> bytes:
        missing = self._upload.min_segment - self._written
        if self._last or self._written == 0 or missing <= 0:
            return b""
        operation = f"close segment {self.index}"
        if self._pad is None:
            raise SharedUploadError(
                self.uri, operation, f"segment {self.index} holds {self._written} bytes; "
                f"every segment but the last must hold at least {self._upload.min_segment} "
                "bytes on this store, or none (give open_segment a pad callable)", self.index)
        padding = bytes(self._pad(missing))
        if len(padding) < missing:
            raise SharedUploadError(
                self.uri, operation, f"pad({missing}) returned {len(padding)} bytes, fewer "
                "than asked", self.index)
        return padding

    async def close(self) -> SegmentReceipt:
        """Send what is left, wait for every part; returns the receipt. On failure the
        segment is aborted and the error raised."""
        if self._status == "closed":
            assert self.receipt is not None
            return self.receipt
        if self._status == "aborted":
            raise ValueError(f"close of segment {self.index} of {self.uri}: it was aborted")
        try:
            padding = self._padding()
            self._buffer += padding
            tail, self._buffer = bytes(self._buffer), bytearray()
            held, self._held = self._held, None
            if held is not None and len(tail) < self._sink.min_part:
                await self._send(held + tail)
            else:
                for part in (held, tail):
                    if part:
                        await self._send(part)
            if self._tasks:
                await asyncio.gather(*list(self._tasks))
            self._raise_failure()
            size = self._offset
            await self._t.retried(f"close segment {self.index}",
                                  lambda: self._sink.close(size))
        except BaseException:
            await self.abort()
            raise
        self._status = "closed"
        self.receipt = SegmentReceipt(self._upload.upload, self.index, size, len(padding),
                                      tuple(sorted(self._parts)))
        return self.receipt

    async def abort(self) -> None:
        """Drop this segment's parts (where the store keeps them apart); the upload goes on
        and can still be aborted whole."""
        if self._status != "open":
            return
        self._status = "aborted"
        self._buffer, self._held = bytearray(), None
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=_PARTS_SETTLE_SECONDS)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await call_with_retries(_ABORT_POLICY, self.uri, f"abort segment {self.index}",
                                    self._sink.abort)
        except Exception as exc:
            log.warning("abort of segment %d of %s failed: %s", self.index, self.uri, exc)


class AsyncSegmentWriter:
    """A binary file-like writer of one segment; every method runs on the I/O loop.
    ``async with``: closed on a clean exit (then :attr:`receipt`), aborted on an error."""

    def __init__(self, stream: _SegmentStream) -> None:
        self._stream = stream
        self.index = stream.index
        self.uri = stream.uri

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._stream.closed

    @property
    def receipt(self) -> SegmentReceipt | None:
        """The receipt, once closed."""
        return self._stream.receipt

    def tell(self) -> int:
        return self._stream.tell()

    async def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data``; returns its length. Waits while enough parts are in flight."""
        stream = self._stream
        return await on_io_loop(lambda: stream.write(data))

    async def close(self) -> SegmentReceipt:
        """Finish the segment and return its receipt (for :meth:`SharedUpload.commit`)."""
        return await on_io_loop(self._stream.close)

    async def abort(self) -> None:
        """Discard this segment's parts."""
        await on_io_loop(self._stream.abort)

    async def __aenter__(self) -> AsyncSegmentWriter:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.abort()


class SegmentWriter:
    """Blocking twin of :class:`AsyncSegmentWriter`: ``write(buffer) -> int``, ``close() ->
    SegmentReceipt``, ``abort()``; a context manager (closed on a clean exit, aborted on an
    error)."""

    def __init__(self, writer: AsyncSegmentWriter) -> None:
        self._writer = writer
        self.index = writer.index
        self.uri = writer.uri

    def __getattr__(self, name: str) -> Any:  # writable, readable, closed, receipt, tell
        return getattr(self._writer, name)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return run_sync(lambda: self._writer.write(data), name="write")

    def close(self) -> SegmentReceipt:
        return run_sync(self._writer.close, name="close")

    def abort(self) -> None:
        run_sync(self._writer.abort, name="abort")

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        run_sync(lambda: self._writer.__aexit__(exc_type, exc, tb), name="__exit__")


class _SegmentOpening:
    """What :meth:`SharedUpload.open_segment` returns: awaitable (the open writer) and an
    async context manager."""

    def __init__(self, upload: SharedUpload, index: int,
                 pad: Callable[[int], bytes] | None) -> None:
        self._upload = upload
        self._index = index
        self._pad = pad
        self._writer: AsyncSegmentWriter | None = None

    async def _open(self) -> AsyncSegmentWriter:
        upload, index = self._upload, self._index
        operation = f"open segment {index}"
        if isinstance(index, bool) or not isinstance(index, int) \
                or not 0 <= index < upload.segments:
            raise SharedUploadError(upload.file.path, operation,
                                    f"no segment {index!r}: this upload has segments "
                                    f"0-{upload.segments - 1}", None)
        upload._check_open(operation, index)

        async def run() -> AsyncSegmentWriter:
            transfer, target = upload._target()
            sink = target.segment(index)
            await transfer.retried(operation, sink.open)
            return AsyncSegmentWriter(_SegmentStream(upload, transfer, sink, index, self._pad))

        return await on_io_loop(run)

    def __await__(self):
        return self._open().__await__()

    async def __aenter__(self) -> AsyncSegmentWriter:
        self._writer = await self._open()
        return self._writer

    async def __aexit__(self, exc_type, exc, tb) -> None:
        assert self._writer is not None
        await self._writer.__aexit__(exc_type, exc, tb)


def _transfer(file: File) -> Transfer:
    """The transfer a shared upload runs on: always through the fsspec clients (s3fs, gcsfs,
    adlfs). obstore, the other data path, has no call that uploads one part of a multipart
    upload another process began, nor one that commits parts it did not send."""
    return file.with_options(data_path="fsspec")._transfer()


async def sweep_shared_uploads(file: File, *,
                               older_than: float | datetime.timedelta = 86400.0) -> list[str]:
    """Remove what shared uploads to ``file`` started more than ``older_than`` (seconds,
    or a ``timedelta``; default a day) ago left behind when their processes died before a
    commit or an abort: S3 multipart uploads of that key (aborted), GCS temporary objects
    beside it, local part files beside it that no process holds (and idle as long).
    Azure needs nothing: uncommitted blocks expire on their own. Returns what went."""
    seconds = _seconds(older_than)
    if seconds < 0:
        raise ValueError(f"sweep of {file.path}: older_than must be >= 0, not {older_than!r}")

    async def run() -> list[str]:
        transfer = _transfer(file)
        return await transfer.retried("sweep shared uploads",
                                      lambda: transfer.backend.sweep_shared(file.path, seconds))

    return await on_io_loop(run)


sweep_shared_uploads_sync = sync_twin(sweep_shared_uploads)
