"""A streamed write never runs out of parts: the part size doubles as parts accumulate."""

from __future__ import annotations

import typing

from checkpoint_io import File
from checkpoint_io._backend import PartPieces
from checkpoint_io._memory import MemoryBackend, _MemoryUpload
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


class _PiecesUpload(_MemoryUpload):
    """A memory upload that takes parts in pieces, as obstore's does, and keeps them."""

    takes_pieces = True
    seen: typing.ClassVar[list] = []

    async def put_part(self, number, data):
        type(self).seen.append(data)
        await super().put_part(number, data.join() if isinstance(data, PartPieces) else data)

    async def finish(self, number, data, total):
        type(self).seen.append(data)
        await super().finish(number, data.join() if isinstance(data, PartPieces) else data, total)


class _PiecesMemory(MemoryBackend):
    def new_upload(self, path):
        return _PiecesUpload(self.fs, path)


def test_parts_in_pieces_keep_immutable_buffers_and_copy_the_rest():
    backend = _PiecesMemory({})
    transfer = Transfer(backend, "memory://p/x", "memory://p/x", RetryPolicy(), 4 * KiB, 1)
    _PiecesUpload.seen = []
    members = [_data(3 * KiB), _data(5 * KiB + 1)]
    reused = bytearray(b"r" * (2 * KiB))

    async def write():
        writer = StreamWriter(transfer)
        for member in members:
            await writer.write(member)
        await writer.write(reused)
        reused[:] = b"x" * len(reused)  # the caller reuses its buffer at once
        await writer.write(memoryview(members[0])[:100])
        await writer.commit()

    from checkpoint_io._loop import run_sync

    run_sync(write, name="test write")
    expected = members[0] + members[1] + b"r" * (2 * KiB) + members[0][:100]
    with File(path="memory://p/x").open_sync("rb") as back:
        assert back.read() == expected
    first = _PiecesUpload.seen[0]
    assert len(first) == 4 * KiB
    assert [v.obj for v in first.views] == members  # the same objects, not copies:
    assert all(v.obj is m for v, m in zip(first.views, members, strict=True))
    # The bytearray was copied (its pieces view a bytes of their own), the bytes were not.
    owners = {type(v.obj) for part in _PiecesUpload.seen if isinstance(part, PartPieces)
              for v in part.views}
    assert owners == {bytes}


def test_a_buffer_handed_over_is_kept_as_it_is():
    """``owned=True`` (the tar writer's members, filled in a bytearray of their own and
    never touched again): kept as views, as bytes are, not copied."""
    backend = _PiecesMemory({})
    transfer = Transfer(backend, "memory://p/y", "memory://p/y", RetryPolicy(), 4 * KiB, 1)
    _PiecesUpload.seen = []
    member = bytearray(_data(9 * KiB))

    async def write():
        writer = StreamWriter(transfer)
        await writer.write(member, owned=True)
        await writer.commit()

    from checkpoint_io._loop import run_sync

    run_sync(write, name="test write")
    with File(path="memory://p/y").open_sync("rb") as back:
        assert back.read() == member
    kept = [v.obj for part in _PiecesUpload.seen if isinstance(part, PartPieces)
            for v in part.views]
    assert kept and all(obj is member for obj in kept)
