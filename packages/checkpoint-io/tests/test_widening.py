"""Widths that adapt (ranges read and parts sent in flight grow with measured throughput,
within a memory budget) and buffers handed on as they arrived (no joins, no copies).

The controller is driven with a made-up clock; the end-to-end tests run through the shaping
proxy, where each connection is slow and only more of them make a transfer faster."""

from __future__ import annotations

import asyncio
import os

import pytest
from checkpoint_io import File, RetryPolicy
from checkpoint_io._backend import BufferBody, Upload
from checkpoint_io._memory import MemoryBackend
from checkpoint_io._stream import (
    DEFAULT_MEMORY_BUDGET,
    StreamReader,
    StreamWriter,
    Transfer,
    Widening,
)

MiB = 1 << 20
FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, deadline=20, attempt_timeout=10)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(widening: Widening, clock: Clock, rate_at, rounds: int = 12,
          unit: int = 8 * MiB) -> list[int]:
    """Complete ``rounds`` rounds of requests, each round's rate ``rate_at(width)``."""
    widening.launched()
    for _ in range(rounds):
        width = widening.width
        for _ in range(width):
            clock.now += unit / rate_at(width)
            widening.completed(unit)
    return widening.history


class TestWideningLogic:
    def test_doubles_while_each_connection_adds_its_share(self):
        clock = Clock()
        widening = Widening(2, 64, clock=clock)
        assert drive(widening, clock, lambda w: w * 64 * MiB) == [2, 4, 8, 16, 32, 64]
        assert widening.settled and widening.width == 64

    def test_stops_where_more_connections_stop_paying(self):
        clock = Clock()
        widening = Widening(2, 64, clock=clock)
        # The link saturates at 8 connections: doubling to 16 brings nothing.
        history = drive(widening, clock, lambda w: min(w, 8) * 64 * MiB)
        assert history == [2, 4, 8, 16]
        assert widening.settled and widening.width == 16
        drive(widening, clock, lambda w: 1e12)  # settled: a later burst changes nothing
        assert widening.width == 16

    def test_a_gain_below_half_a_connection_each_stops_it(self):
        clock = Clock()
        widening = Widening(2, 64, clock=clock)
        # 2 -> 4 brings 1.4x (each added connection 40% of one before): not enough.
        assert drive(widening, clock, lambda w: {2: 100, 4: 140}.get(w, 140) * MiB) == [2, 4]

    def test_up_to_the_floor_it_doubles_whatever_it_measures(self):
        clock = Clock()
        widening = Widening(2, 64, floor=8, clock=clock)
        # No gain at all (a busy machine): still the store's known width, then no further.
        assert drive(widening, clock, lambda w: 100 * MiB) == [2, 4, 8]
        assert widening.settled and widening.width == 8

    def test_never_beyond_the_cap_and_lowering_the_cap_narrows(self):
        clock = Clock()
        widening = Widening(2, 6, clock=clock)
        assert drive(widening, clock, lambda w: w * 64 * MiB) == [2, 4, 6]
        widening.limit(3)
        assert widening.width == 3 and widening.settled

    def test_a_start_at_the_cap_never_measures(self):
        widening = Widening(8, 8)
        assert widening.settled and widening.completed(MiB) == 8


def transfer(backend=None, **options) -> Transfer:
    backend = backend or WideMemory({})
    return Transfer(backend, "memory://b/k", "memory://b/k", FAST, options.get("part_size"),
                    options.get("concurrency"), options.get("read_ahead"),
                    options.get("read_concurrency"), options.get("memory_budget"))


class WideMemory(MemoryBackend):
    """The memory store, with the object stores' adaptive widths."""

    widen = True
    read_concurrency = 8
    concurrency = 8


class TestBudget:
    def test_the_budget_bounds_ranges_and_parts_in_flight(self):
        t = transfer(memory_budget=64 * MiB)
        # (64 MiB - 16 MiB read-ahead) / (2 x 8 MiB ranges), parts 64 MiB / (2 x part)
        assert t.read_cap() == 3
        assert t.write_cap(8 * MiB) == 4
        assert transfer().read_cap() == (DEFAULT_MEMORY_BUDGET - 16 * MiB) // (16 * MiB)
        assert transfer().write_cap(5 * MiB) == DEFAULT_MEMORY_BUDGET // (10 * MiB)

    def test_a_width_the_caller_sets_stays_fixed(self):
        t = transfer(read_concurrency=5, concurrency=3)
        assert t.read_widening(100 * MiB).history == [5]
        assert t.read_widening(100 * MiB).settled
        assert t.write_widening().width == 3 and t.write_widening().settled

    def test_a_store_whose_writes_keep_their_width_still_widens_reads(self):
        class ReadsOnly(WideMemory):  # as obstore's backend: its uploads pace themselves
            widen_writes = False

        t = transfer(ReadsOnly({}))
        assert t.adaptive_reads and not t.adaptive_writes
        assert t.write_widening().history == [8] and t.write_widening().settled
        assert t.read_widening(200 * MiB).width == 8 and not t.read_widening(200 * MiB).settled

    def test_a_small_object_is_one_request(self):
        widening = transfer().read_widening(2 * MiB)
        assert widening.width == 1 and widening.cap == 1

    def test_adaptive_reads_start_at_the_stores_width_and_writes_at_two(self):
        widening = transfer().read_widening(200 * MiB)
        assert widening.width == 8 and widening.cap > 8 and widening.floor == 8
        assert transfer().read_widening(24 * MiB).width == 3  # no more than its ranges
        writes = transfer().write_widening()
        assert writes.width == 2 and writes.floor == 8

    def test_file_with_options_takes_the_budget(self):
        file = File(path="memory://b/k").with_options(memory_budget=32 * MiB)
        assert file._transfer().memory_budget == 32 * MiB
        assert File(path="memory://b/k")._transfer().memory_budget == DEFAULT_MEMORY_BUDGET

    @pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1"])
    def test_a_bad_budget_is_refused_naming_the_uri(self, bad):
        with pytest.raises(ValueError, match="memory://b/k: memory_budget must be"):
            File(path="memory://b/k").with_options(memory_budget=bad)._transfer()


class PiecesSource:
    """A source whose body comes in ``piece``-byte buffers of a type of its own (a buffer,
    not bytes, as obstore's are); records them."""

    read_blocking = None
    read_blocking_is_instant = False
    copy_into = None

    def __init__(self, data: bytes, piece: int = 200_000) -> None:
        self.data, self.size, self.piece = data, len(data), piece
        self.handed: list[bytearray] = []

    async def read_range(self, start, end):  # pragma: no cover - never used
        raise AssertionError

    async def stream_range(self, start, end):
        for at in range(start, end, self.piece):
            buffer = bytearray(self.data[at:min(at + self.piece, end)])
            self.handed.append(buffer)
            await asyncio.sleep(0)
            yield buffer

    async def close(self) -> None:
        pass


class TestNoCopies:
    def test_read_pieces_are_views_of_the_buffers_received(self):
        data = os.urandom(3 * MiB + 17)
        source = PiecesSource(data)

        async def run():
            stream = StreamReader(transfer(read_concurrency=1), source)
            pieces = []
            while got := await stream.read_pieces(5 * MiB):
                pieces += got
            await stream.close()
            return pieces

        pieces = asyncio.run(run())
        assert b"".join(pieces) == data
        received = {id(buffer) for buffer in source.handed}
        # Every piece is a view of a buffer the source yielded: none was joined or copied.
        assert all(isinstance(p, memoryview) and id(p.obj) in received for p in pieces)

    def test_read_still_returns_one_bytes(self):
        data = os.urandom(2 * MiB + 5)

        async def run():
            stream = StreamReader(transfer(read_concurrency=1), PiecesSource(data))
            first, rest = await stream.read(MiB + 3), await stream.read()
            await stream.close()
            return first, rest

        first, rest = asyncio.run(run())
        assert type(first) is bytes and type(rest) is bytes and first + rest == data

    def test_parts_go_out_as_the_buffer_they_were_filled_in(self):
        sent: list[tuple[int, object]] = []

        class Recording(Upload):
            async def put_part(self, number, data):
                sent.append((number, data))

            async def finish(self, number, data, total):
                sent.append((number, data))

            async def put_whole(self, data):  # pragma: no cover
                raise AssertionError

            async def abort(self):  # pragma: no cover
                raise AssertionError

        backend = WideMemory({})
        backend.new_upload = lambda path: Recording()
        data = os.urandom(5 * MiB + MiB // 2)

        async def run():
            writer = StreamWriter(transfer(backend, part_size=2 * MiB))
            for at in range(0, len(data), 300_000):
                await writer.write(data[at:at + 300_000])
            await writer.commit()

        asyncio.run(run())
        assert [n for n, _ in sent] == [1, 2, 3]
        assert all(type(part) is bytearray for _, part in sent[:2])
        assert b"".join(part for _, part in sent) == data

    def test_buffer_body_reads_views_and_seeks_back(self):
        data = bytearray(os.urandom(100_000))
        body = BufferBody(data)
        first = body.read(40_000)
        assert isinstance(first, memoryview) and first.obj is data
        assert body.tell() == 40_000 and body.seek(0, 2) == 100_000 and len(body) == 100_000
        body.seek(0)
        assert bytes(body.read()) == bytes(data) and body.getvalue() == bytes(data)
        with body.getbuffer() as view:
            assert view.nbytes == 100_000


def _put(file: File, data: bytes) -> None:
    with file.open_sync("wb") as f:
        f.write(data)


@pytest.mark.emulator
class TestShapedWidening:
    """Through the shaping proxy (64 MiB/s and 50 ms to the first byte per connection), a
    big object is read over several connections at once; a 2 MiB one costs one request."""

    def test_a_big_read_is_wide(self, remote_store):
        from checkpoint_testing.shaper import ShapingProxy

        data = os.urandom(56 * MiB)
        _put(remote_store.file("big.bin"), data)
        with ShapingProxy(remote_store.server.port, down=64 * MiB, first_byte=0.05) as shaper:
            file = remote_store.file("big.bin", retry=FAST, storage_options=(
                remote_store.server.options(shaper.endpoint)))
            with file.open_sync("rb") as f:
                got = f.read()
                widening = f._afile._stream.widening
        assert got == data
        # Both data paths start at the store's width (8), here capped by the object's 7
        # ranges: all of them at once from the first request.
        assert widening.history == [7], widening.history
        assert shaper.stats.most_concurrent > 2

    def test_a_small_read_is_one_request(self, remote_store):
        from checkpoint_testing.shaper import ShapingProxy

        data = os.urandom(2 * MiB)
        _put(remote_store.file("small.bin"), data)
        with ShapingProxy(remote_store.server.port, down=64 * MiB, first_byte=0.05) as shaper:
            file = remote_store.file("small.bin", retry=FAST, storage_options=(
                remote_store.server.options(shaper.endpoint)))
            with file.open_sync("rb") as f:
                got = f.read()
                width = f._afile._stream.width
            requests = shaper.stats.requests
        assert got == data and width == 1
        assert requests <= 2  # the GET (and the HEAD that pinned the version)

    def test_a_big_write_widens(self, remote_store):
        from checkpoint_testing.shaper import ShapingProxy

        data = os.urandom(48 * MiB)
        with ShapingProxy(remote_store.server.port, up=64 * MiB, first_byte=0.05) as shaper:
            file = remote_store.file("up.bin", retry=FAST, part_size=2 * MiB if
                                     remote_store.kind != "s3" else 5 * MiB,
                                     storage_options=remote_store.server.options(
                                         shaper.endpoint))
            with file.open_sync("wb") as f:
                f.write(data)
                widening = f._afile._stream.widening
        if remote_store.kind == "gcs":  # a resumable upload: one part at a time, in order
            assert widening.history == [1]
        elif remote_store.data_path == "obstore":
            # Parts go to obstore in order, one at a time; obstore keeps its own bounded
            # number of part requests in flight (see _ObstoreUpload), so ours stays at 1.
            assert widening.history == [1]
        else:
            assert widening.history[0] == 2 and widening.width > 2, widening.history
        with remote_store.file("up.bin").open_sync("rb") as f:
            assert f.read() == data
