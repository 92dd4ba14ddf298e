"""Streaming reads: one long request, bounded read-ahead, resume after a drop, and a
pinned version. Unit tests use a scripted source; the rest run against the emulators."""

from __future__ import annotations

import asyncio
import os

import pytest
from checkpoint_io import File, ObjectChangedError, RetryPolicy
from checkpoint_io._backend import Source
from checkpoint_io._memory import MemoryBackend
from checkpoint_io._stream import StreamReader, Transfer

MiB = 1024 * 1024
FAST = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, deadline=20, attempt_timeout=10)


class ScriptedSource(Source):
    """Serves ``data`` through ``stream_range`` in ``piece``-byte pieces; the first
    ``drops`` requests break (raise a reset) after ``drop_after`` bytes, and every request
    is recorded as ``(start, end)``."""

    def __init__(self, data: bytes, piece: int = 256 * 1024, drops: int = 0,
                 drop_after: int = 0, gate: asyncio.Event | None = None,
                 gate_after: int = 0) -> None:
        self.data = data
        self.size = len(data)
        self.piece = piece
        self.drops = drops
        self.drop_after = drop_after
        self.gate, self.gate_after = gate, gate_after
        self.requests: list[tuple[int, int]] = []
        self.sent = 0  # bytes yielded over all requests
        self.pieces: list[bytes] = []

    async def read_range(self, start: int, end: int) -> bytes:
        raise AssertionError("streaming reads must not fall back to ranged reads")

    async def stream_range(self, start: int, end: int):
        self.requests.append((start, end))
        breaking = self.drops > 0
        self.drops -= 1
        position = start
        while position < end:
            if breaking and position - start >= self.drop_after:
                raise ConnectionResetError("connection reset by peer (scripted)")
            if self.gate is not None and position >= self.gate_after:
                await self.gate.wait()
            piece = self.data[position:min(position + self.piece, end)]
            self.pieces.append(piece)
            self.sent += len(piece)
            position += len(piece)
            await asyncio.sleep(0)
            yield piece


def reader(source: Source, read_ahead: int | None = None) -> StreamReader:
    transfer = Transfer(MemoryBackend({}), "memory://b/k", "memory://b/k", FAST, None, None,
                        read_ahead)
    return StreamReader(transfer, source)


async def drain(stream: StreamReader, n: int = MiB) -> bytes:
    parts = []
    while chunk := await stream.read(n):
        parts.append(chunk)
    await stream.close()
    return b"".join(parts)


class TestResumableStream:
    def test_one_request_for_the_whole_object(self):
        data = os.urandom(5 * MiB + 123)
        source = ScriptedSource(data)
        assert asyncio.run(drain(reader(source), 100_003)) == data
        assert source.requests == [(0, len(data))]

    def test_drop_mid_body_resumes_from_the_first_missing_byte(self):
        data = os.urandom(3 * MiB + 7)
        cut = MiB + 256 * 1024
        source = ScriptedSource(data, drops=2, drop_after=cut)
        assert asyncio.run(drain(reader(source))) == data
        # Nothing fetched twice, nothing skipped: each retry starts where the last stopped.
        assert source.requests == [(0, len(data)), (cut, len(data)),
                                   (2 * cut, len(data))]
        assert source.sent == len(data)

    def test_persistent_drops_give_one_clear_error(self):
        source = ScriptedSource(os.urandom(2 * MiB), drops=100, drop_after=0)

        async def go():
            stream = reader(source)
            try:
                await stream.read(10)
            finally:
                await stream.close()

        with pytest.raises(OSError, match=r"read bytes 0-1048575 of memory://b/k failed "
                                          r"after 4 attempts") as info:
            asyncio.run(go())
        assert isinstance(info.value.__cause__, ConnectionResetError)

    def test_a_body_that_ends_early_is_resumed(self):
        data = os.urandom(2 * MiB)

        class Short(ScriptedSource):
            async def stream_range(self, start, end):
                async for piece in super().stream_range(start, end):
                    yield piece
                    if start == 0 and self.sent >= MiB // 2:
                        return  # a clean end of body, before the promised end

        source = Short(data)
        assert asyncio.run(drain(reader(source))) == data
        assert source.requests == [(0, len(data)), (MiB // 2, len(data))]

    def test_whole_blocks_are_handed_over_without_a_copy(self):
        data = os.urandom(3 * MiB)
        source = ScriptedSource(data, piece=MiB)

        async def go():
            stream = reader(source)
            got = [await stream.read(MiB) for _ in range(3)]
            await stream.close()
            return got

        got = asyncio.run(go())
        assert all(a is b for a, b in zip(got, source.pieces, strict=True))


class TestBoundedReadAhead:
    def test_a_slow_reader_never_has_more_than_read_ahead_buffered(self):
        data = os.urandom(40 * MiB)
        source = ScriptedSource(data)
        cap = 4 * MiB

        async def go():
            stream = reader(source, read_ahead=cap)
            assert await stream.read(1) == data[:1]
            for _ in range(50):  # a slow reader: the producer gets every chance to run
                await asyncio.sleep(0.001)
            assert stream.queued <= cap
            # Bounded by the cap plus the block being assembled, not the object.
            assert source.sent <= cap + 2 * MiB
            parts = [data[:1]]
            while chunk := await stream.read(300_000):
                parts.append(chunk)
                await asyncio.sleep(0)
                assert stream.queued <= cap
            await stream.close()
            return b"".join(parts), stream.peak_queued

        got, peak = asyncio.run(go())
        assert got == data
        assert 0 < peak <= cap

    def test_cancelled_read_loses_no_bytes(self):
        data = os.urandom(3 * MiB)
        gate = asyncio.Event()
        source = ScriptedSource(data, gate=gate, gate_after=MiB + MiB // 2)

        async def go():
            stream = reader(source)
            assert await stream.read(10) == data[:10]
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(stream.read(2 * MiB), 0.2)  # stalls at 1.5 MiB
            assert stream.tell() == 10
            gate.set()
            return data[:10] + await drain(stream)

        assert asyncio.run(go()) == data

    def test_closing_mid_read_stops_the_request(self):
        source = ScriptedSource(os.urandom(64 * MiB))

        async def go():
            stream = reader(source, read_ahead=2 * MiB)
            await stream.read(1)
            await stream.close()
            sent = source.sent
            await asyncio.sleep(0.05)
            assert source.sent == sent
            with pytest.raises(ValueError, match="file is closed"):
                await stream.read(1)

        asyncio.run(go())


def test_local_sync_reads_do_not_touch_the_io_loop(tmp_path, monkeypatch):
    import checkpoint_io._file as file_module

    data = os.urandom(3 * MiB + 1)
    (tmp_path / "x.bin").write_bytes(data)
    with File(path=str(tmp_path / "x.bin")).open_sync("rb") as f:
        def no_hop(*args, **kwargs):
            raise AssertionError("a local read went through the I/O loop")

        monkeypatch.setattr(file_module, "run_sync", no_hop)
        parts = []
        while chunk := f.read(MiB):
            parts.append(chunk)
        monkeypatch.undo()
    assert b"".join(parts) == data


# --- against the emulators ---------------------------------------------------------------


def put(file: File, data: bytes) -> None:
    with file.open_sync("wb") as f:
        f.write(data)


def ranged_gets(proxy) -> list[str]:
    return [r for r in proxy.gets if r]


@pytest.mark.emulator
class TestRemoteStreamingRead:
    def test_drop_mid_body_resumes_with_a_range_from_there(self, remote_store):
        data = os.urandom(3 * MiB + 17)
        put(remote_store.file("drop.bin"), data)
        proxy, options = remote_store.proxy()
        file = remote_store.file("drop.bin", storage_options=options, retry=FAST)
        cut = 2 * MiB + 12_345
        parts = []
        with file.open_sync("rb") as f:
            proxy.cut_next_bodies(1, after=cut)
            while chunk := f.read(MiB):
                parts.append(chunk)
        assert b"".join(parts) == data
        first, resumed = ranged_gets(proxy)
        assert first == f"bytes=0-{len(data) - 1}"
        start, end = resumed.removeprefix("bytes=").split("-")
        assert 0 < int(start) <= cut and int(end) == len(data) - 1

    def test_object_replaced_mid_read_raises_instead_of_mixing(self, remote_store):
        old, new = os.urandom(3 * MiB), os.urandom(3 * MiB)
        direct = remote_store.file("replaced.bin")
        put(direct, old)
        proxy, options = remote_store.proxy()
        file = remote_store.file("replaced.bin", storage_options=options, retry=FAST)
        got = []
        with pytest.raises(ObjectChangedError) as info, file.open_sync("rb") as f:
            # The body in flight still carries the old version; the overwrite lands
            # before the drop, so the resumed request finds another version.
            proxy.cut_next_bodies(1, after=MiB + 1000, on_cut=lambda: put(direct, new))
            while chunk := f.read(MiB // 2):
                got.append(chunk)
        received = b"".join(got)
        assert received == old[:len(received)]
        err = info.value
        assert err.uri == file.path
        assert "the object was replaced or deleted while being read" in str(err)
        assert file.path in str(err) and err.__cause__ is not None
        with file.open_sync("rb") as f:  # opened again: the new version, whole
            assert f.read() == new

    def test_slow_reader_buffers_at_most_read_ahead_from_one_request(self, remote_store):
        data = os.urandom(8 * MiB)
        put(remote_store.file("slow.bin"), data)
        proxy, options = remote_store.proxy()
        cap = 2 * MiB
        file = remote_store.file("slow.bin", storage_options=options, retry=FAST,
                                 read_ahead=cap)
        parts = []
        with file.open_sync("rb") as f:
            stream = f._afile._stream
            parts.append(f.read(1))
            import time

            time.sleep(0.3)
            assert stream.queued <= cap
            while chunk := f.read(256 * 1024):
                parts.append(chunk)
                assert stream.queued <= cap
        assert b"".join(parts) == data
        assert 0 < stream.peak_queued <= cap
        assert ranged_gets(proxy) == [f"bytes=0-{len(data) - 1}"]


def test_direct_sync_read_still_refuses_to_run_inside_a_loop(tmp_path):
    from checkpoint_io import SyncInAsyncError

    (tmp_path / "x.bin").write_bytes(b"abc")
    with File(path=str(tmp_path / "x.bin")).open_sync("rb") as f:
        async def inside():
            f.read(1)

        with pytest.raises(SyncInAsyncError, match=r"read\(\) blocks and was called from"):
            asyncio.run(inside())
        assert f.read() == b"abc"


# --- parallel ranged reads ------------------------------------------------------------------


class CountingSource(ScriptedSource):
    """A ScriptedSource that records how many requests were open at once."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.open = self.most_open = 0

    async def stream_range(self, start: int, end: int):
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            async for piece in super().stream_range(start, end):
                yield piece
        finally:
            self.open -= 1


def wide_reader(source: Source, width: int, read_ahead: int | None = None) -> StreamReader:
    transfer = Transfer(MemoryBackend({}), "memory://b/k", "memory://b/k", FAST, None, None,
                        read_ahead, width)
    return StreamReader(transfer, source)


class TestParallelRanges:
    def test_ranges_in_flight_arrive_in_order(self):
        data = os.urandom(40 * MiB + 5)
        source = CountingSource(data)
        stream = wide_reader(source, 4)
        assert asyncio.run(drain(stream, 3 * MiB + 1)) == data
        span = 8 * MiB
        assert sorted(source.requests) == [(s, min(s + span, len(data)))
                                           for s in range(0, len(data), span)]
        assert stream.width == 4 and 1 < source.most_open <= 4
        assert source.sent == len(data)

    @pytest.mark.parametrize("size", [2 * MiB, 8 * MiB, 16 * MiB - 1])
    def test_less_than_two_ranges_is_one_request(self, size):
        data = os.urandom(size)
        source = CountingSource(data)
        stream = wide_reader(source, 8)
        assert asyncio.run(drain(stream)) == data
        assert source.requests == [(0, len(data))] and stream.width == 1

    def test_a_range_that_drops_is_resumed_alone(self):
        data = os.urandom(24 * MiB)
        cut = 3 * MiB + 100
        source = CountingSource(data, drops=1, drop_after=cut)  # the first request breaks
        assert asyncio.run(drain(reader_with(source))) == data
        resumed = [r for r in source.requests if r[0] % (8 * MiB)]
        assert len(resumed) == 1 and cut <= resumed[0][0] < 8 * MiB == resumed[0][1]
        assert source.requests.count((0, 8 * MiB)) == 1  # not refetched from its start
        assert source.sent == len(data)  # nothing fetched twice

    def test_memory_stays_within_the_window(self):
        data = os.urandom(64 * MiB)
        source = CountingSource(data, piece=MiB)

        async def go():
            stream = wide_reader(source, 3, read_ahead=4 * MiB)
            await stream.read(1)
            for _ in range(50):  # let every range in flight arrive
                await asyncio.sleep(0)
            held = source.sent - 1
            rest = await drain(stream)
            return stream, held, rest

        stream, held, rest = asyncio.run(go())
        assert len(rest) == len(data) - 1
        # Held: at most 3 ranges (the one being handed over among them) and the read-ahead.
        assert held <= 3 * 8 * MiB + 4 * MiB
        assert stream.peak_queued <= 4 * MiB


def reader_with(source: Source) -> StreamReader:
    return wide_reader(source, 3)


@pytest.mark.emulator
class TestRemoteParallelRanges:
    def test_ranges_over_separate_connections(self, remote_store):
        from checkpoint_testing.shaper import ShapingProxy

        data = os.urandom(40 * MiB + 3)
        put(remote_store.file("wide.bin"), data)
        with ShapingProxy(remote_store.server.port, down=32 * MiB) as shaper:
            file = remote_store.file("wide.bin", retry=FAST,
                                     storage_options=remote_store.server.options(
                                         shaper.endpoint))
            with file.open_sync("rb") as f:
                got = f.read()
            assert got == data
            assert shaper.stats.most_concurrent >= 4  # several connections at once

    def test_a_range_cut_mid_body_is_resumed_alone(self, remote_store):
        data = os.urandom(24 * MiB)
        put(remote_store.file("cut.bin"), data)
        proxy, options = remote_store.proxy()
        file = remote_store.file("cut.bin", storage_options=options, retry=FAST)
        with file.open_sync("rb") as f:
            proxy.cut_next_bodies(1, after=2 * MiB + 5)
            got = f.read()
        assert got == data
        gets = ranged_gets(proxy)
        assert len(gets) == 4  # three ranges, and one resumed from inside the cut one
        first = [tuple(map(int, g.removeprefix("bytes=").split("-"))) for g in gets]
        assert sorted(first)[:3] != sorted(first)[1:]  # the resumed one starts mid-range
        assert sum(1 for s, e in first if s % (8 * MiB) != 0) == 1

    def test_object_replaced_between_ranges_fails_instead_of_mixing(self, remote_store):
        old, new = os.urandom(24 * MiB), os.urandom(24 * MiB)
        direct = remote_store.file("swap.bin")
        put(direct, old)
        proxy, options = remote_store.proxy()
        file = remote_store.file("swap.bin", storage_options=options, retry=FAST)
        with pytest.raises(ObjectChangedError), file.open_sync("rb") as f:
            proxy.cut_next_bodies(1, after=MiB, on_cut=lambda: put(direct, new))
            f.read()

    def test_a_stalled_connection_is_dropped_and_its_range_refetched(self, remote_store):
        from checkpoint_testing.shaper import ShapingProxy

        data = os.urandom(24 * MiB)
        put(remote_store.file("stall.bin"), data)
        quick = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05, deadline=60,
                            attempt_timeout=1.0)
        with ShapingProxy(remote_store.server.port, stall_after=3 * MiB,
                          stall_connections=1) as shaper:
            file = remote_store.file("stall.bin", retry=quick,
                                     storage_options=remote_store.server.options(
                                         shaper.endpoint))
            with file.open_sync("rb") as f:
                got = f.read()
            shaper.release_stalls()
        assert got == data
        assert shaper.stats.stalled == 1
        assert shaper.stats.requests > 3  # the stalled range was asked for again


class SlowFirstRange(CountingSource):
    """The range starting at byte 0 sends nothing until ``gate`` is set; the others flow."""

    def __init__(self, *args, gate: asyncio.Event, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.first_gate = gate

    async def stream_range(self, start: int, end: int):
        if start == 0:
            await self.first_gate.wait()
        async for piece in super().stream_range(start, end):
            yield piece


class TestHolding:
    """The ranges after the first pause once they hold ``read_holding`` bytes, and go on
    when the reader takes them; the first range never pauses."""

    def test_ranges_behind_a_slow_first_one_pause_at_the_limit(self):
        data = os.urandom(80 * MiB)

        async def go():
            gate = asyncio.Event()
            source = SlowFirstRange(data, piece=MiB, gate=gate)
            transfer = Transfer(MemoryBackend({}), "memory://b/k", "memory://b/k", FAST, None,
                                None, 4 * MiB, 8, 28 * MiB)
            assert transfer.read_holding == 8 * MiB
            stream = StreamReader(transfer, source)
            first = asyncio.ensure_future(stream.read(1))
            for _ in range(200):  # every range after the first fetches what it may
                await asyncio.sleep(0)
            sent_while_paused, open_while_paused = source.sent, source.open
            gate.set()
            rest = await first + await drain(stream)
            return source, stream, sent_while_paused, open_while_paused, rest

        source, stream, sent, still_open, rest = asyncio.run(go())
        assert rest == data
        # The limit, plus the block each of the 7 other ranges had asked for when it hit it.
        assert 8 * MiB <= sent <= 8 * MiB + 7 * MiB
        assert still_open == 7  # the 7 after the first paused, their connections kept
        assert stream.holding.peak <= 8 * MiB + 7 * MiB and stream.holding.held == 0
        assert source.sent == len(data)  # nothing fetched twice

    def test_a_fast_reader_leaves_the_limit_unreached_and_reads_everything(self):
        data = os.urandom(48 * MiB + 3)
        source = CountingSource(data, piece=MiB)
        stream = wide_reader(source, 6)
        assert asyncio.run(drain(stream, 8 * MiB)) == data
        assert stream.holding.held == 0 and source.sent == len(data)
