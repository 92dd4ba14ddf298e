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


class _FixedParts(MemoryBackend):
    """Parts as obstore's S3 uploads have them: 10,000 at most, never grown."""

    part_size = 16 << 20
    sized_part_size = 8 << 20
    min_part_size = 5 << 20
    max_parts = 10_000
    max_part_size = 5 << 20


def _sized(hint, part_size=None, backend=None) -> int:
    backend = backend or _FixedParts({})
    return Transfer(backend, "memory://g/x", "memory://g/x", RetryPolicy(), part_size, 1,
                    size_hint=hint).part_size


def test_a_write_of_known_size_starts_from_the_sized_part_and_fits_the_limit():
    GiB = 1 << 30
    assert _sized(None) == 16 << 20  # unknown size: the default, 156 GiB in 10,000 parts
    assert _sized(0) == _sized(1 << 20) == _sized(GiB) == 8 << 20
    for hint in (78 * GiB, 200 * GiB, 2048 * GiB):
        part = _sized(hint)
        assert part % (1 << 20) == 0
        assert (_FixedParts.max_parts - 1) * part >= hint * 1.06  # room for headers, growth
        assert part <= max(8 << 20, hint // 8_000)  # not much larger than it needs
    # The caller's part size stands; a backend without a sized part keeps its own.
    assert _sized(GiB, part_size=6 << 20) == 6 << 20
    assert _sized(GiB, backend=MemoryBackend({})) == MemoryBackend.part_size


def test_a_bad_size_hint_is_refused_naming_the_uri():
    for bad in (-1, 1.5, True, "1"):
        file = File(path="memory://g/x").with_options(size_hint=bad)
        try:
            file._transfer()
        except ValueError as exc:
            assert str(exc).startswith("memory://g/x: size_hint must be")
        else:
            raise AssertionError(f"size_hint={bad!r} was taken")
