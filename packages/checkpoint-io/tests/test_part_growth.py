"""A streamed write never runs out of parts: the part size doubles as parts accumulate."""

from __future__ import annotations

from checkpoint_io import File
from checkpoint_io._memory import MemoryBackend
from checkpoint_io._retry import RetryPolicy
from checkpoint_io._stream import StreamWriter, Transfer

KiB = 1024


def _data(size: int) -> bytes:
    return bytes(i * 7 % 253 for i in range(size))


def test_parts_double_after_every_tenth_of_the_limit(monkeypatch):
    monkeypatch.setattr(MemoryBackend, "max_parts", 20)  # doubling every 2 parts
    sizes: list[int] = []
    real_send = StreamWriter._send

    async def record(self, part):
        sizes.append(len(part))
        await real_send(self, part)

    monkeypatch.setattr(StreamWriter, "_send", record)
    file = File(path="memory://growth/obj.bin").with_options(part_size=KiB)
    data = _data(40 * KiB + 5)
    with file.open_sync("wb") as out:
        for start in range(0, len(data), 700):
            out.write(data[start : start + 700])
    with file.open_sync("rb") as back:
        assert back.read() == data
    assert sizes[:8] == [KiB, KiB, 2 * KiB, 2 * KiB, 4 * KiB, 4 * KiB, 8 * KiB, 8 * KiB]
    assert len(sizes) < 20  # 40 KiB would need 41 parts of 1 KiB


def test_part_growth_stops_at_nine_doublings_and_the_largest_part(monkeypatch):
    monkeypatch.setattr(MemoryBackend, "max_parts", 10)  # a doubling per part
    monkeypatch.setattr(MemoryBackend, "max_part_size", 64 * KiB)
    backend = MemoryBackend({})
    transfer = Transfer(backend, "memory://g/x", "memory://g/x", RetryPolicy(), KiB, 1)
    writer = StreamWriter(transfer)
    grown = []
    for sent in range(12):
        writer._parts_sent = sent
        grown.append(writer._part_size())
    assert grown == [KiB << min(n, 9) for n in range(7)] + [64 * KiB] * 5
