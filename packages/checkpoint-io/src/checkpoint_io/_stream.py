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
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from ._backend import Backend, MiB, PartPieces, Source, Upload, grown_part_size
from ._localfs import fsync_dir, open_temp_sibling, pwrite_all
from ._retry import RetryPolicy, call_with_retries

__all__ = ["DEFAULT_MEMORY_BUDGET", "StreamReader", "StreamWriter", "Widening", "download_to",
           "upload_from"]

T = TypeVar("T")
#: A piece of an object as it arrived: ``bytes``, or a view of a buffer (a memoryview, or
#: any buffer-protocol object a backend yields). Handed on as it is, never joined.
Piece = bytes | bytearray | memoryview
log = logging.getLogger("checkpoint_io")

# Aborting is best effort (the object is never published either way), so it gets a short
# budget instead of the caller's full deadline.
#: How long an abort lets part uploads in flight end when parts are visible objects.
_PARTS_SETTLE_SECONDS = 30.0
_ABORT_POLICY = RetryPolicy(attempts=2, base_delay=0.05, max_delay=0.1, deadline=10.0,
                            attempt_timeout=10.0)

#: Most bytes of buffers a transfer holds for requests in flight, when the caller does not
#: say (``File.with_options(memory_budget=)``): ranges being read plus the read-ahead, or
#: parts being sent, each counted twice (ours and the HTTP client's copy of its body). It
#: leaves room, under the 200 MiB a save or a load may add to a process, for the rest of
#: the process: measured, a 512 MiB load at the 15 ranges a 256 MiB budget allowed grew RSS
#: by 171 MiB on a quiet machine and 218 MiB on a busy one (its consumers fall behind).
DEFAULT_MEMORY_BUDGET = 160 << 20
#: Where an adaptive write width starts: small, so that a small write pays for few
#: connections. Reads start at the backend's floor instead: a read never opens more ranges
#: than the object has, and the rounds spent doubling up to the floor (which they do
#: whatever they measure) only cost time: a 512 MiB load through the shaping proxy took
#: 2.28-2.39 s starting at 2 and 2.04 s at 8.
_START_WIDTH = 2


def _nbytes(piece: Piece) -> int:
    return piece.nbytes if isinstance(piece, memoryview) else len(piece)


def _joined(pieces: list[Piece]) -> bytes:
    """The pieces as one ``bytes``: the piece itself when it is one whole ``bytes`` (or a
    view covering one), a copy only when pieces must be joined."""
    if len(pieces) == 1:
        piece = pieces[0]
        if type(piece) is bytes:
            return piece
        if isinstance(piece, memoryview) and type(piece.obj) is bytes and \
                piece.nbytes == len(piece.obj):
            return piece.obj
    return b"".join(pieces)


class Widening:
    """How many requests (ranges read, parts sent) a transfer keeps in flight, grown with
    the throughput it measures.

    It starts at ``start``. Each time a whole round at the current width has completed (as
    many requests as the width), the width doubles up to ``floor`` unconditionally; past it
    the round's rate (bytes completed over the round's time) is compared with the rate at
    the width before: the width doubles while the connections added each bring at least
    ``hold`` of what a connection brought before, and stops growing for good the first time
    they do not, or at ``cap`` (the backend's cap, or what the memory budget allows,
    whichever is smaller). ``clock`` is injectable, so tests can
    drive it with made-up throughput.
    """

    def __init__(self, start: int, cap: int, *, floor: int = 0, hold: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cap = max(1, cap)
        self.width = max(1, min(start, self.cap))
        #: Below this width every round doubles, whatever it measured: the width a store
        #: was known to sustain before (8 on object stores), so that a noisy measurement
        #: (a busy machine, a slow first response) never leaves a transfer narrower.
        self.floor = min(floor, self.cap)
        self.hold = hold
        self._clock = clock
        self.settled = self.width >= self.cap
        self._round_started: float | None = None
        self._round_bytes = 0
        self._round_done = 0
        self._rate: float | None = None  # of the round before, at ``_width_before``
        self._width_before = 0
        #: Every width taken, in order (for logs and tests).
        self.history = [self.width]

    def launched(self) -> None:
        """A request started: the first one starts the first round's clock."""
        if self._round_started is None:
            self._round_started = self._clock()

    def limit(self, cap: int) -> None:
        """Lower the cap (a part size that grew: fewer parts fit in the budget)."""
        self.cap = max(1, min(self.cap, cap))
        if self.width >= self.cap:
            self.width, self.settled = self.cap, True

    def completed(self, nbytes: int) -> int:
        """A request of ``nbytes`` completed; returns the width to keep now."""
        if self.settled:
            return self.width
        now = self._clock()
        if self._round_started is None:
            self._round_started = now
        self._round_bytes += nbytes
        self._round_done += 1
        if self._round_done < self.width:
            return self.width
        rate = self._round_bytes / max(now - self._round_started, 1e-9)
        if self._rate is not None and self.width >= self.floor:
            added = (self.width - self._width_before) / self._width_before
            if rate < self._rate * (1 + self.hold * added):
                self.settled = True  # the added connections did not pay: stay here
                return self.width
        self._rate, self._width_before = rate, self.width
        self.width = min(self.width * 2, self.cap)
        self.history.append(self.width)
        self.settled = self.width >= self.cap
        self._round_started, self._round_bytes, self._round_done = now, 0, 0
        return self.width


def _sized_part(backend: Backend, size_hint: int | None) -> int:
    """The part size a write starts from: the backend's, or for a write of about
    ``size_hint`` bytes its ``sized_part_size``, grown so that the hint and some slack (tar
    headers, a file grown since) fill at most ``max_parts`` parts whatever growth the
    backend allows (obstore's uploads: none)."""
    if size_hint is None:
        return backend.part_size
    slack = size_hint // 16 + 64 * MiB
    needed = -(-(size_hint + slack) // max(1, backend.max_parts - 1))
    return max(backend.sized_part_size or backend.part_size, -(-needed // MiB) * MiB)


class Transfer:
    """What one transfer needs: where, through which backend, how hard to try, how wide.

    Each width is the caller's argument (``File.with_options``) over the backend's default:
    ``concurrency`` parts uploaded at once by a streaming write, ``read_concurrency`` ranged
    GETs per streaming read (1 reads with one long GET: for servers where a ranged GET costs
    as much as the whole object, as moto's do). Nothing is read from ``CHECKPOINT_*``
    variables: flyte-checkpoint's ``Settings`` turns them into these arguments.

    A width the caller leaves unset adapts where the backend allows it (``Backend.widen``,
    object stores): reads start at the backend's width and writes at 2, and both grow with
    measured throughput (see :class:`Widening`) up to ``Backend.max_in_flight`` and to what
    ``memory_budget`` bytes of buffers hold. A width the caller sets is kept fixed, as before.
    """

    def __init__(self, backend: Backend, path: str, uri: str, policy: RetryPolicy,
                 part_size: int | None, concurrency: int | None,
                 read_ahead: int | None = None, read_concurrency: int | None = None,
                 memory_budget: int | None = None, size_hint: int | None = None) -> None:
        self.backend = backend
        self.path = path
        self.uri = uri
        self.policy = policy
        if size_hint is not None and (isinstance(size_hint, bool)
                                      or not isinstance(size_hint, int) or size_hint < 0):
            raise ValueError(f"{uri}: size_hint must be a whole number of bytes or None, got"
                             f" {size_hint!r}")
        self.size_hint = size_hint
        size = max(part_size or _sized_part(backend, size_hint), backend.min_part_size)
        self.part_size = -(-size // backend.part_multiple) * backend.part_multiple
        self.concurrency = max(1, concurrency or backend.concurrency)
        self.read_ahead = max(read_ahead or backend.read_ahead, backend.read_block)
        self.read_concurrency = max(1, read_concurrency or backend.read_concurrency)
        # Whole blocks, so each range hands out whole blocks like one long GET does.
        self.read_range = max(backend.read_range // backend.read_block, 1) * backend.read_block
        if memory_budget is not None and (isinstance(memory_budget, bool)
                                          or not isinstance(memory_budget, int)
                                          or memory_budget < 1):
            raise ValueError(f"{uri}: memory_budget must be a whole number of bytes of 1 or"
                             f" more or None, got {memory_budget!r}")
        self.memory_budget = memory_budget or DEFAULT_MEMORY_BUDGET
        self.adaptive_reads = read_concurrency is None and backend.widen \
            and backend.read_concurrency > 1
        self.adaptive_writes = concurrency is None and backend.widen and backend.widen_writes
        #: The caller's parts in flight, ``None`` when left to the backend.
        self.caller_concurrency = concurrency
        #: Most bytes the ranges of a wide read hold beyond the first one before they pause
        #: (see :class:`_Holding`): a quarter of what the budget leaves beside the read-ahead.
        self.read_holding = max(self.read_range,
                                (self.memory_budget - self.read_ahead) // 4)

    def read_width(self, remaining: int) -> int:
        """How many ranged GETs a streaming read of ``remaining`` bytes keeps in flight: one
        (a single long GET) below two ranges, else up to ``read_concurrency`` (the most, for
        an adaptive width)."""
        if remaining < 2 * self.read_range:
            return 1
        return max(1, min(self.read_cap(), -(-remaining // self.read_range)))

    def read_cap(self) -> int:
        """Most ranges in flight: the caller's width, or for an adaptive one the backend's
        cap and what the budget holds beside the read-ahead (at least 2)."""
        if not self.adaptive_reads:
            return self.read_concurrency
        fits = (self.memory_budget - self.read_ahead) // (2 * self.read_range)
        return max(2, min(self.backend.max_in_flight, fits))

    def write_cap(self, part_size: int) -> int:
        """Most parts in flight for parts of ``part_size`` bytes (see :meth:`read_cap`)."""
        if not self.adaptive_writes:
            return self.concurrency
        return max(1, min(self.backend.max_in_flight, self.memory_budget // (2 * part_size)))

    def read_widening(self, remaining: int) -> Widening:
        width = self.read_width(remaining)
        if not self.adaptive_reads:
            return Widening(width, width)
        floor = self.backend.read_concurrency
        return Widening(floor, width, floor=floor)

    def write_widening(self) -> Widening:
        cap = self.write_cap(self.part_size)
        if not self.adaptive_writes:
            return Widening(cap, cap)
        return Widening(_START_WIDTH, cap, floor=self.backend.concurrency)

    def retried(self, operation: str, request: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        return call_with_retries(self.policy, self.uri, operation, request)


class StreamWriter:
    """Buffers writes into parts, keeps a bounded number of part uploads in flight, and
    publishes the object only in :meth:`commit`. :meth:`abort` (or any failure) leaves the
    previous object as it was.

    Each part is one buffer filled once and handed to the backend as it is (no copy into a
    ``bytes``); how many are in flight adapts to the throughput where the backend allows
    it (see :class:`Transfer`), within the memory budget."""

    def __init__(self, transfer: Transfer) -> None:
        self._t = transfer
        self._upload: Upload = transfer.backend.new_upload(transfer.path)
        self._upload.policy = transfer.policy
        self._upload.concurrency = transfer.caller_concurrency
        #: Parts in flight: grows with the measured rate (one at a time when ordered).
        self.widening = Widening(1, 1) if self._upload.ordered else transfer.write_widening()
        self._in_flight = 0
        self._room = asyncio.Event()
        self._buffer = bytearray()
        #: The part being filled, for uploads that take pieces (else ``_buffer``).
        self._pieces: PartPieces | None = PartPieces() if self._upload.takes_pieces else None
        self._filled = 0
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

    async def write(self, data: Piece, *, owned: bool = False) -> int:
        """Append ``data``; waits while enough parts are in flight. ``owned``: see
        :meth:`stage`."""
        size, parts = self.stage(data, owned=owned)
        await self.send(parts)
        return size

    def stage(self, data: Piece, *, owned: bool = False) -> tuple[int, list[bytearray]]:
        """Copy ``data`` into the part being filled, off the I/O loop: a blocking writer
        calls this in its own thread, so that the copy is not the loop's work. Returns its
        length and the parts it filled, for :meth:`send` (on the loop) to upload. A full
        part is only handed out once more data arrives, so the final part handed to
        ``finish`` is never empty unless the object is. ``owned`` hands ``data`` over: its
        writer never changes it again (the tar writer's members), so an upload that takes
        pieces keeps it as it is, as it keeps ``bytes``."""
        if self._state != "open":
            raise ValueError(f"write to {self._t.uri}: file is already {self._state}")
        view = memoryview(data).cast("B")
        size = view.nbytes
        if self._pieces is not None:
            full_pieces = self._stage_pieces(data, view, owned)
            self._written += size
            return size, full_pieces
        full: list[bytearray] = []
        parts_sent = self._parts_sent
        while view.nbytes:
            part_size = self._part_size(parts_sent)
            if self._filled == part_size:
                full.append(self._buffer)
                self._buffer, self._filled = bytearray(), 0
                parts_sent += 1
                part_size = self._part_size(parts_sent)
            if not self._buffer:
                self._buffer = bytearray(part_size)  # filled once, sent as it is
            room = min(part_size - self._filled, view.nbytes)
            # Through a view of the part: a bytearray's own slice assignment copies any
            # other buffer into a temporary bytearray first, a second pass over every byte.
            with memoryview(self._buffer) as part:
                part[self._filled:self._filled + room] = view[:room]
            self._filled += room
            view = view[room:]
        self._written += size
        return size, full

    def _stage_pieces(self, data: Piece, view: memoryview, owned: bool) -> list[PartPieces]:
        """:meth:`stage` for uploads that take pieces: an immutable buffer (``bytes``, or a
        view of one) or one handed over (``owned``: the tar writer's members) is kept as
        views, not copied; anything else is copied once into a ``bytes`` of its own, since
        its owner may reuse it."""
        immutable = owned or type(data) is bytes or (isinstance(data, memoryview)
                                                     and type(data.obj) is bytes)
        if not immutable and view.nbytes:
            view = memoryview(bytes(view))
        assert self._pieces is not None
        full: list[PartPieces] = []
        parts_sent = self._parts_sent
        while view.nbytes:
            part_size = self._part_size(parts_sent)
            if self._filled == part_size:
                full.append(self._pieces)
                self._pieces, self._filled = PartPieces(), 0
                parts_sent += 1
                part_size = self._part_size(parts_sent)
            room = min(part_size - self._filled, view.nbytes)
            self._pieces.append(view[:room])
            self._filled += room
            view = view[room:]
        return full

    async def send(self, parts: list[bytearray] | list[PartPieces]) -> None:
        """Upload the parts :meth:`stage` filled (each waits for room in the width)."""
        try:
            for part in parts:
                await self._send(part)
        except BaseException:
            await self.abort()
            raise

    def _last_part(self) -> bytes | bytearray | PartPieces:
        """What is buffered, for the final part or a whole object: small ones as ``bytes``
        (every client takes those), larger ones as the buffer itself, cut to its length."""
        if self._pieces is not None:
            pieces, self._pieces, self._filled = self._pieces, PartPieces(), 0
            return pieces.join() if pieces.nbytes <= MiB else pieces
        buffer, filled = self._buffer, self._filled
        self._buffer, self._filled = bytearray(), 0
        if filled <= MiB:
            return bytes(memoryview(buffer)[:filled])
        del buffer[filled:]
        return buffer

    def _part_size(self, parts_sent: int | None = None) -> int:
        """The size of the part being filled. It doubles after every tenth of the backend's
        part limit, so that a stream of unknown length never runs out of parts: on S3
        (10,000 parts, 5 MiB to start) the first 4.9 GiB go in 5 MiB parts, memory stays
        small for the usual checkpoint, and the limit is about 5 TiB instead of 48 GiB."""
        backend = self._t.backend
        sent = self._parts_sent if parts_sent is None else parts_sent
        return grown_part_size(self._t.part_size, sent, backend.max_parts,
                               backend.max_part_size)

    async def _send(self, part: bytearray) -> None:
        self._raise_failure()
        self.widening.limit(self._t.write_cap(len(part)))
        while self._in_flight >= self.widening.width:
            self._room.clear()
            await self._room.wait()
            self._raise_failure()
        self._raise_failure()
        if self._parts_sent == 0:
            await self._t.retried("start upload", self._upload.begin)
        self._parts_sent += 1
        if self._parts_sent >= self._t.backend.max_parts:
            raise OSError(f"write to {self._t.uri}: more than {self._t.backend.max_parts}"
                          f" parts (the last of {len(part)} bytes); raise part_size")
        self._in_flight += 1
        self.widening.launched()
        task = asyncio.ensure_future(self._put_part(self._parts_sent, part))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _put_part(self, number: int, part: bytearray) -> None:
        try:
            await self._t.retried(
                f"upload part {number}", lambda: self._upload.put_part(number, part)
            )
            self.widening.completed(len(part))
        except BaseException as exc:
            if self._failure is None:
                self._failure = exc
        finally:
            self._in_flight -= 1
            self._room.set()

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
                if self._pieces is not None:
                    data = self._pieces.join()
                    self._pieces = PartPieces()
                else:
                    data = bytes(memoryview(self._buffer)[:self._filled])
                self._buffer, self._filled = bytearray(), 0
                await self._t.retried("upload", lambda: self._upload.put_whole(data))
            else:
                if self._tasks:
                    await asyncio.gather(*list(self._tasks))
                self._raise_failure()
                number, data, total = self._parts_sent + 1, self._last_part(), self._written
                await self._t.retried(
                    "complete upload", lambda: self._upload.finish(number, data, total)
                )
        except BaseException:
            await self.abort()
            raise
        self._buffer, self._filled = bytearray(), 0
        self._state = "committed"

    async def abort(self) -> None:
        """Drop everything written so far; the previous object (if any) stays intact."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._buffer, self._filled = bytearray(), 0
        if self._pieces is not None:
            self._pieces = PartPieces()
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

    Blocks end at multiples of ``block`` counted from byte 0. A block is handed out as the
    pieces it arrived in (views of the buffers the backend yielded, cut at the block's
    edges, never joined: no copy). Each block is one retried operation: ``attempt_timeout``
    bounds a stall, not the whole body, and a fault drops the request and resumes with a
    new one from the first byte not yet received, so nothing is read twice and nothing is
    skipped. The version stays pinned, so a resumed request that finds another version
    fails with ``ObjectChangedError``.
    """

    def __init__(self, transfer: Transfer, source: Source, start: int, end: int,
                 block: int) -> None:
        self._t = transfer
        self._source = source
        self._end = end
        self._block = block
        self._received = start  # first byte not yet received from the server
        self._pieces: collections.deque[Piece] = collections.deque()  # not yet handed out
        self._held = 0
        self._body: AsyncIterator[Piece] | None = None

    @property
    def position(self) -> int:
        """The first byte not yet handed out."""
        return self._received - self._held

    async def next_block(self) -> list[Piece] | None:
        """The pieces of the next block, or ``None`` at the end."""
        first = self.position
        if first >= self._end:
            return None
        size = min(self._end, (first // self._block + 1) * self._block) - first
        return await self._t.retried(f"read bytes {first}-{first + size - 1}",
                                     lambda: self._fill(size))

    async def _fill(self, size: int) -> list[Piece]:
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
                if not isinstance(piece, bytes):
                    piece = memoryview(piece).cast("B")  # any buffer: counted in bytes
                length = _nbytes(piece)
                if length > self._end - self._received:
                    raise OSError(f"server sent more than bytes {self.position}-{self._end - 1}")
                if length:
                    self._pieces.append(piece)
                self._held += length
                self._received += length
                if self._received == self._end:
                    await self.close()  # all there: release the connection now
        except BaseException:
            await self.close()
            raise
        return self._take(size)

    def _take(self, size: int) -> list[Piece]:
        pieces: list[Piece] = []
        taken = 0
        while taken < size:
            piece = self._pieces[0]
            length = _nbytes(piece)
            if taken + length <= size:
                self._pieces.popleft()
            else:
                view = memoryview(piece)
                piece, self._pieces[0] = view[:size - taken], view[size - taken:]
                length = size - taken
            pieces.append(piece)
            taken += length
        self._held -= size
        return pieces

    async def close(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            await body.aclose()


class _Holding:
    """Bytes the ranges after the first hold (arrived, not yet handed on), and the most
    they may: past it they pause, their connections kept, until the reader takes more. The
    first range in order never pauses (the reader waits on it). So the bytes held follow
    the reader, not the number of connections: when the reader is what is slow (a fast
    store) they stay within the limit; when the network is, they stay in flight."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        #: Highest ``held`` seen: lets tests check the bound holds.
        self.peak = 0
        self._room = asyncio.Event()

    async def room(self, fetch: _Range) -> None:
        while self.held >= self.limit and not fetch.first:
            self._room.clear()
            await self._room.wait()

    def add(self, nbytes: int) -> None:
        self.held += nbytes
        self.peak = max(self.peak, self.held)

    def release(self, nbytes: int) -> None:
        self.held -= nbytes
        self.wake()

    def wake(self) -> None:
        """Let paused ranges look again (one of them may have become the first)."""
        self._room.set()


class _Range:
    """One range of a wide read, fetched by a task of its own (its own request, retried and
    resumed alone) into blocks that the reader takes in order, each as soon as it is in."""

    def __init__(self, stream: _ResumableStream, size: int, holding: _Holding) -> None:
        self.size = size
        #: Whether this is the first range in order (the one the reader waits on).
        self.first = False
        self._holding = holding
        self._blocks: collections.deque[tuple[list[Piece], int]] = collections.deque()
        self._arrived = asyncio.Event()
        self.task = asyncio.ensure_future(self._fetch(stream))

    async def _fetch(self, stream: _ResumableStream) -> None:
        try:
            while True:
                await self._holding.room(self)
                block = await stream.next_block()
                if block is None:
                    return
                nbytes = sum(map(_nbytes, block))
                self._holding.add(nbytes)
                self._blocks.append((block, nbytes))
                self._arrived.set()
        finally:
            self._arrived.set()
            await stream.close()

    def make_first(self) -> None:
        self.first = True
        self._holding.wake()

    async def next_block(self) -> list[Piece] | None:
        """The next block, or ``None`` once the range is all handed out; the range's
        failure, once its retries are spent, is raised here."""
        while not self._blocks:
            if self.task.done():
                self.task.result()
                return None
            self._arrived.clear()
            await self._arrived.wait()
        block, nbytes = self._blocks.popleft()
        self._holding.release(nbytes)
        return block

    def drop(self) -> None:
        """Stop fetching; what it holds no longer counts."""
        self.task.cancel()
        self._holding.release(sum(nbytes for _, nbytes in self._blocks))
        self._blocks.clear()


class StreamReader:
    """Sequential reads of one pinned version, with a bounded read-ahead.

    Remote objects are read by a background task into a queue of pieces, never more than
    ``read_ahead`` bytes ahead of the reader. Where the backend allows several connections
    and the object spans two ranges or more, that task keeps several ranged GETs in flight,
    each over its own connection and pinned to the same version, and hands their pieces to
    the queue in order, the first range block by block as it arrives: a width the caller
    set, or the backend's, grown with the measured throughput (:class:`Widening`) within
    the memory budget; memory stays within the ranges in flight plus the read-ahead, and the
    ranges after the first pause once they hold ``Transfer.read_holding`` bytes. Otherwise
    it reads one long request. Either way a request resumes where it broke off after a
    transient fault, alone (see :class:`_ResumableStream`).

    :meth:`read_pieces` hands out the bytes as the pieces they arrived in (no copy);
    :meth:`read` joins them into one ``bytes`` when they are more than one. Sources that
    read cheaply in the caller's thread (local files, memory) are read directly:
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
        #: How the width grew (set once reading has started).
        self.widening: Widening | None = None
        #: What the ranges after the first hold, for a wide read (set once it has started).
        self.holding: _Holding | None = None
        self._queue: collections.deque[Piece] = collections.deque()
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
        """Up to ``n`` bytes (all the rest when ``n < 0``) as one ``bytes``."""
        if self.direct:
            if self._source.read_blocking_is_instant:
                return self.read_direct(n)
            return await asyncio.get_running_loop().run_in_executor(None, self.read_direct, n)
        return _joined(await self.read_pieces(n))

    async def read_pieces(self, n: int = -1) -> list[Piece]:
        """Up to ``n`` bytes (all the rest when ``n < 0``) as the pieces they arrived in:
        views of the network's buffers, in order, never joined (``[]`` at the end)."""
        if self.direct:
            data = await self.read(n)
            return [data] if data else []
        n = self._wanted(n)
        if n <= 0:
            return []
        if self._producer is None:
            self._producer = asyncio.ensure_future(self._produce())
        pieces: list[Piece] = []
        taken = 0
        try:
            while taken < n:
                while not self._queue:
                    if self._failure is not None:
                        raise self._failure
                    self._arrived.clear()
                    await self._arrived.wait()
                piece = self._queue[0]
                length = _nbytes(piece)
                if taken + length <= n:
                    self._queue.popleft()
                else:
                    view = memoryview(piece)
                    piece, self._queue[0] = view[:n - taken], view[n - taken:]
                    length = n - taken
                pieces.append(piece)
                taken += length
                self._queued -= length
                self._room.set()
        except BaseException:
            # Cancelled or failed halfway: put back what was taken, so the next read
            # starts at the same byte.
            self._queue.extendleft(reversed(pieces))
            self._queued += taken
            raise
        self._pos += taken
        return pieces

    async def _produce(self) -> None:
        remaining = self.size - self._pos
        self.widening = self._t.read_widening(remaining)
        self.width = self.widening.width
        fetched = self._ranges(self.widening) if self.widening.cap > 1 else self._one_request()
        try:
            async for block in fetched:
                size = sum(map(_nbytes, block))
                while self._queued + size > self.read_ahead and self._queued:
                    self._room.clear()
                    await self._room.wait()
                self._queue.extend(block)
                self._queued += size
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

    async def _one_request(self) -> AsyncIterator[list[Piece]]:
        stream = _ResumableStream(self._t, self._source, self._pos, self.size, self.block_size)
        try:
            while (block := await stream.next_block()) is not None:
                yield block
        finally:
            await stream.close()

    async def _ranges(self, widening: Widening) -> AsyncIterator[list[Piece]]:
        """Blocks of ``[pos, size)`` in order, fetched as ranges, as many at a time as
        ``widening`` says (it measures each range completed). The first range in order is
        handed on block by block as it arrives; the ranges after it fill their buffers
        meanwhile, and the next range starts as soon as the first is all handed on."""
        span = self._t.read_range
        starts = iter(range(self._pos, self.size, span))
        in_flight: collections.deque[_Range] = collections.deque()
        self.holding = holding = _Holding(self._t.read_holding)

        def launch() -> None:
            while len(in_flight) < widening.width:
                start = next(starts, None)
                if start is None:
                    break
                widening.launched()
                end = min(start + span, self.size)
                stream = _ResumableStream(self._t, self._source, start, end, self.block_size)
                in_flight.append(_Range(stream, end - start, holding))
            if in_flight:
                in_flight[0].make_first()

        try:
            launch()
            while in_flight:
                head = in_flight[0]
                while (block := await head.next_block()) is not None:
                    yield block
                in_flight.popleft()
                widening.completed(head.size)
                self.width = max(self.width, widening.width)
                # Only now: ranges held never exceed the width (plus the read-ahead queue).
                launch()
        finally:
            for fetch in in_flight:
                fetch.drop()
            await asyncio.gather(*(fetch.task for fetch in in_flight), return_exceptions=True)

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
            while (pieces := await stream.next_block()) is not None:
                size = sum(map(_nbytes, pieces))
                await loop.run_in_executor(None, _pwrite_pieces, fd, pieces,
                                           stream.position - size)
        finally:
            await stream.close()

    async def worker() -> None:
        for start in starts:
            await fetch(start, min(start + segment, source.size))

    await asyncio.gather(*(worker() for _ in range(transfer.concurrency)))


def _pwrite_pieces(fd: int, pieces: list[Piece], offset: int) -> None:
    """Write the pieces in order at ``offset``, each as it is (no join)."""
    for piece in pieces:
        pwrite_all(fd, piece, offset)
        offset += _nbytes(piece)


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
