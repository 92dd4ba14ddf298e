"""A loopback TCP proxy that makes a local emulator behave like a real object store.

On loopback one connection is fast and the emulator is the bottleneck; on a real store each
connection is slow (tens of MB/s) and waits tens of milliseconds for its first byte, and
throughput comes from many connections at once. :class:`ShapingProxy` sits in front of moto,
fake-gcs-server or Azurite and gives every TCP connection its own bandwidth cap in each
direction, plus a first-byte delay for each response (per request, on kept-alive
connections too). It is what the transfer tests and benchmarks measure through.

    with ShapingProxy(emulator_port, down=64 * MiB, first_byte=0.05) as proxy:
        ... point the client at proxy.endpoint ...
        proxy.stats  # connections, most at once, bytes each way
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass

__all__ = ["ShapingProxy", "ShapingStats"]

MiB = 1 << 20
_CHUNK = 256 * 1024


@dataclass
class ShapingStats:
    connections: int = 0
    concurrent: int = 0
    most_concurrent: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    requests: int = 0
    stalled: int = 0


class _Bucket:
    """A token bucket: ``rate`` bytes per second with a burst of one chunk."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.allowance = float(_CHUNK)
        self.last = time.monotonic()

    async def take(self, count: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self.allowance = min(float(_CHUNK), self.allowance + (now - self.last) * self.rate)
        self.last = now
        self.allowance -= count
        if self.allowance < 0:
            await asyncio.sleep(-self.allowance / self.rate)


class ShapingProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``upstream_port``, shaping each connection.

    Args:
        down: bytes per second per connection, server to client (``None``: unlimited).
        up: bytes per second per connection, client to server.
        first_byte: seconds before the first byte of each response reaches the client.
        stall_after: if set, a connection stops forwarding responses (without closing) once
            it has sent this many bytes down; :meth:`release_stalls` lets them go on.
        stall_connections: how many connections stall that way (the first ones to get that
            far); default all.
    """

    def __init__(self, upstream_port: int, *, down: float | None = None,
                 up: float | None = None, first_byte: float = 0.0,
                 stall_after: int | None = None,
                 stall_connections: int | None = None) -> None:
        self.upstream_port = upstream_port
        self.down, self.up, self.first_byte = down, up, first_byte
        self.stall_after = stall_after
        self.stall_connections = stall_connections
        self.stats = ShapingStats()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._unstall: asyncio.Event | None = None
        self._server: asyncio.base_events.Server | None = None
        #: Every connection's writers (both sides), closed and awaited by stop().
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._serve, name="shaping-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ShapingProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._unstall = asyncio.Event()
            self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def release_stalls(self) -> None:
        self._loop.call_soon_threadsafe(self._unstall.set)

    def stop(self) -> None:
        if self._loop.is_closed():
            return

        async def shutdown() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # A writer's close() only schedules its transport's; let every one finish before
            # the loop stops, or the transports are found open (ResourceWarning) when they are
            # collected, inside whatever test runs then.
            writers = list(self._writers)
            for writer in writers:
                with contextlib.suppress(Exception):
                    writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(
                    *(w.wait_closed() for w in writers), return_exceptions=True), 5)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _connection(self, client_reader: asyncio.StreamReader,
                          client_writer: asyncio.StreamWriter) -> None:
        stats = self.stats
        self._writers.add(client_writer)
        stats.connections += 1
        stats.concurrent += 1
        stats.most_concurrent = max(stats.most_concurrent, stats.concurrent)
        try:
            server_reader, server_writer = await asyncio.open_connection(
                "127.0.0.1", self.upstream_port)
        except OSError:
            stats.concurrent -= 1
            client_writer.close()
            return
        self._writers.add(server_writer)
        awaiting_response = asyncio.Event()  # set by each request, cleared by its response

        async def upstream() -> None:
            bucket = _Bucket(self.up)
            while data := await client_reader.read(_CHUNK):
                if not awaiting_response.is_set():
                    stats.requests += 1
                    awaiting_response.set()
                await bucket.take(len(data))
                stats.bytes_up += len(data)
                server_writer.write(data)
                await server_writer.drain()

        async def downstream() -> None:
            bucket = _Bucket(self.down)
            sent = 0
            while data := await server_reader.read(_CHUNK):
                if awaiting_response.is_set():
                    awaiting_response.clear()
                    if self.first_byte:
                        await asyncio.sleep(self.first_byte)
                if (self.stall_after is not None and sent + len(data) > self.stall_after
                        and (self.stall_connections is None
                             or stats.stalled < self.stall_connections)):
                    data = data[:self.stall_after - sent]
                    client_writer.write(data)
                    stats.bytes_down += len(data)
                    stats.stalled += 1
                    await self._unstall.wait()
                    return
                await bucket.take(len(data))
                sent += len(data)
                stats.bytes_down += len(data)
                client_writer.write(data)
                await client_writer.drain()

        pumps = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in (client_writer, server_writer):
                with contextlib.suppress(Exception):
                    writer.close()
            stats.concurrent -= 1
